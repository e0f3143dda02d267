//! `backup-client`: the backup client (`backup-client store|restore|list|verify`) and the
//! binary that also runs the site agent (`backup-client serve`, from `site-agent`).
//!
//! Owns: the client's configuration ([`config`]) and its pipelines ([`transfer`]): store
//! (plan, open the shares, read/split/upload, finalize), restore (gather manifests, choose
//! shares, resume, download/open/combine, verify the digest and rename into place), list and
//! verify, with resume state for interrupted runs. Reading, hashing and splitting the file
//! is `sharing`'s [`ChunkedSplit`](sharing::ChunkedSplit) (the same code `split_stream`, the
//! tests and the benches run), combining is `sharing`'s `Combiner`; frames, seals (one-time
//! pad through `share_transfer::otp`, Wegman–Carter tag) and key plans come from
//! `share-transfer`, the same code the agent runs.
//!
//! Must never depend on: `kms-server` (any ETSI 014 KME must do; `cargo tree -p
//! backup-client` shows none), or the site agent's internals (the binary only starts it with
//! `site_agent::serve`).
//!
//! Modules:
//!
//! * [`config`] — `ClientConfig`: TOML plus `BACKUP_*` environment overrides.
//! * [`transfer`] — `BackupClient` and its commands, one file per concern: `store`,
//!   `upload`, `restore`, `download`, `resume`, `catalogue` (see the module's doc).
//!
//! Dependencies: reqwest (through `mtls`'s client builder) for the agent API, the 014 client
//! from `etsi-spec`, `async-channel` for the multi-consumer upload queues, `indicatif` for the
//! progress line, `mimalloc` so large short-lived buffers are reused, `blake3` for the restore
//! digest and the resume-state file names, `getrandom` for split nonces, `actix-web`'s
//! runtime to run the agent under `serve`, `libc` for `O_NOFOLLOW` and `rustix` for a safe
//! `geteuid` (a restore writes only into files that are this user's own and private).

#![forbid(unsafe_code)]

pub mod config;
pub mod transfer;
