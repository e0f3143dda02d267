//! `sharing`: (k,n) threshold secret sharing of files of any size.
//!
//! A file is split with a (k,n) threshold scheme into `n` share files of the same size as the
//! file; any `k` of them rebuild it, fewer reveal nothing (given good randomness).
//!
//! Owns: the schemes, the chunk-level splitter/combiner and the chunk reader that every
//! caller uses (the backup client's store and restore pipelines as well as the tests and
//! benches: there is one read-hash-split path, [`ChunkedSplit`], and one combine path,
//! [`Combiner`]), the share file format, and the randomness sources.
//!
//! Must never depend on: transport, TLS, QKD keys, the KME or any HTTP crate; one-time pads
//! and authentication live in `share-transfer`, which depends on this crate.
//!
//! Modules:
//!
//! * [`scheme`] — [`Scheme`]: XOR (Kurihara et al.) or Shamir over GF(2^8), with k, n.
//! * [`sharing`](mod@sharing) — chunk-level [`Splitter`] / [`Combiner`] and the
//!   [`SharingError`] enum.
//! * [`stream`] — [`ChunkedSplit`], the chunk reader (read, BLAKE3, split on demand) that
//!   [`split_stream`] and the backup client's store pipeline share; [`split_stream`] /
//!   [`combine_stream`] over `std::io`, and in-memory [`split`] / [`combine`]; bounded
//!   memory for inputs of any size.
//! * [`renewal`] — [`Refresher`]: sharings of zero that renew shares without the secret.
//! * [`format`](mod@format) — the share file header/trailer.
//! * [`rng`] — randomness sources behind the [`RandomSource`] trait.
//! * [`xor`] — the XOR kernels (also the one-time pad's).
//! * [`gf256`] — GF(2^8) arithmetic and SIMD region multiply (the only `unsafe` code).
//!
//! # Dependencies and why
//!
//! * `blake3` — digest of the whole secret recorded in every share; several GB/s on one
//!   core with run-time SIMD detection, so it never limits split/combine (SHA-256 would).
//! * `rand_chacha` + `rand_core` (0.9, matching the workspace's `rand` 0.9) — fast
//!   ChaCha8/12/20 CSPRNG for the random shares.
//! * `getrandom` (0.3, the version `rand_core` 0.9 already uses) — OS randomness for seeds,
//!   set IDs and the [`rng::OsSource`].
//! * `zeroize` — wiping random pads and plaintext buffers.
//! * `thiserror` — error enums. `uuid` — the share set ID type.
//!
//! Dev-only: `proptest` (property tests).

#![deny(unsafe_code)]
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

pub mod format;
#[allow(unsafe_code)] // SIMD kernels; every block carries its SAFETY argument
pub mod gf256;
mod kurihara;
pub mod renewal;
pub mod rng;
pub mod scheme;
mod shamir;
pub mod sharing;
pub mod stream;
pub mod xor;

pub use renewal::Refresher;
pub use rng::{ChaChaRounds, ChaChaSource, DeviceSource, OsSource, RandomSource, RngChoice};
pub use scheme::{Scheme, SchemeKind};
pub use sharing::{Combiner, SharingError, Splitter};
pub use stream::{
    combine, combine_stream, split, split_stream, ChunkedSplit, CombineSummary, SecretChunk,
    SplitDigest, SplitSummary,
};
