//! ETSI GS QKD 014 v1.1.1 ("Protocol and data format of REST-based key delivery API"):
//! the five JSON data formats as plain serde types, and a typed async client.
//!
//! This crate owns the wire contract shared by the KME (`kms-server`), the backup client and
//! agent, and the end-to-end tests. `openapi.yaml` beside this crate is the normative
//! description of the same contract; a test in `devnet/tests/` checks every response the
//! server sends against it.
//!
//! Must never depend on: any implementation of either side (the KME, the backup crates) or
//! a server stack; its client takes TLS from `mtls`'s client half only.
//!
//! Units follow the specification: every key *size* is in **bits**, keys travel as
//! **base64** strings, key IDs are **UUID** strings.
//!
//! Dependencies: `serde`/`serde_json` for the formats; `reqwest` (native-tls backend, i.e.
//! the system OpenSSL the server also uses, built by `mtls::client`) for the mTLS client; `uuid` for key IDs;
//! `base64` (0.23, SIMD engine) to encode and decode keys; `zeroize` so decoded key bytes are wiped when dropped.

#![forbid(unsafe_code)]

pub mod client;
pub mod codec;
pub mod types;

pub use client::{Client, ClientError, Identity};
pub use types::*;
