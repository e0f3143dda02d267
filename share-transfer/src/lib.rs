//! `share-transfer`: moving secret shares between a backup client and site agents under
//! QKD keys.
//!
//! Owns what both ends of a share transfer must agree on, so the client and the agent share
//! this code (and neither links the KME):
//!
//! * [`wire`] — the agent API: route constants, every JSON message, and the chunk frame
//!   format (header, payload, tag).
//! * [`seal`] — sealing and opening a frame: one-time pad (through [`otp`]), then
//!   Wegman–Carter tag (through [`auth`]), nothing returned unless the tag verifies.
//! * [`otp`] — the one-time pad (XOR with key material, wiped after use): the one pad path,
//!   used by [`seal`] and exercised directly by the tests and the bench.
//! * [`auth`] — the Wegman–Carter MAC over POLYVAL (the `wegman-carter` crate, which the
//!   KMEs' key relay shares).
//! * [`keys`] — key plans: how many ETSI 014 keys of which size cover a chunk's pad and MAC
//!   key, and fetching them (as master or slave) while waiting out an empty pool.
//! * [`receipt`] — download receipts: a restoring client's proof that it fetched the keys
//!   an agent issued to it, which lets the agent bound keys issued and never fetched.
//! * [`config`] — the configuration file loader and TLS file set both ends use.
//!
//! Must never depend on: `kms-server` (any ETSI 014 KME must do), the HTTP server stack, or
//! the client's or agent's own state.
//!
//! # Dependencies and why
//!
//! * `wegman-carter` — the MAC (POLYVAL; its crate doc says why).
//! * `etsi-spec` — the typed 014 client the key plans use.
//! * `blake3` — the digest of a share's splits ([`wire::splits_digest`]) checked at
//!   finalisation. `config` — layered TOML/env settings.
//! * `clap` — [`wire::SchemeName`] doubles as a command-line value.
//!
//! Dev-only: `blahaj` (a crates.io Shamir implementation used as a benchmark baseline).

#![forbid(unsafe_code)]

pub use wegman_carter as auth;
pub mod config;
pub mod keys;
pub mod otp;
pub mod receipt;
pub mod seal;
pub mod wire;
