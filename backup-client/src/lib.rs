//! `backup-client`: the backup client (`backup-client store|restore|list|verify`) and the
//! binary that also runs the site agent (`backup-client serve`, from `site-agent`).
//!
//! Owns: the client's configuration ([`config`]) and its pipelines ([`transfer`]): store
//! (read, split, pad and tag, upload, finalize), restore (gather manifests, download, open,
//! combine, verify the digest), list and verify, with resume state for interrupted runs.
//! Splitting and combining come from `sharing`; frames, seals and key plans from
//! `share-transfer`, the same code the agent runs.
//!
//! Must never depend on: `kms-server` (any ETSI 014 KME must do; `cargo tree -p
//! backup-client` shows none), or the site agent's internals (the binary only starts it).
//!
//! Dependencies: reqwest (through `mtls`'s client builder) for the agent API, the 014 client
//! from `etsi-spec`, `async-channel` for the multi-consumer upload queues, `indicatif` for the
//! progress line, `mimalloc` so large short-lived buffers are reused, `libc` for O_DIRECT
//! reads where allowed.

#![forbid(unsafe_code)]

pub mod config;
pub mod transfer;
