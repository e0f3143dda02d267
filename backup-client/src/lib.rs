//! Library core of the secret-sharing backup client.
//!
//! A file is split with a (k,n) threshold scheme into `n` share files of the same size as the
//! file; any `k` of them rebuild it, fewer reveal nothing (given good randomness). Remote
//! shares are then one-time-pad encrypted with QKD key material ([`otp`]) and authenticated
//! with an information-theoretic Wegman–Carter MAC ([`auth`]).
//!
//! Modules:
//!
//! * [`scheme`] — [`Scheme`]: XOR (Kurihara et al.) or Shamir over GF(2^8), with k, n.
//! * [`sharing`] — chunk-level [`Splitter`] / [`Combiner`] and the [`SharingError`] enum.
//! * [`stream`] — [`split_stream`] / [`combine_stream`] over `std::io`, and in-memory
//!   [`split`] / [`combine`]; bounded memory for inputs of any size.
//! * [`format`](mod@format) — the share file header/trailer.
//! * [`rng`] — randomness sources behind the [`RandomSource`] trait.
//! * [`otp`] — one-time pad.
//! * [`auth`] — Wegman–Carter MAC with POLYVAL.
//! * [`gf256`] — GF(2^8) arithmetic and SIMD region multiply (the only `unsafe` code).
//!
//! # Dependencies and why
//!
//! * `blake3` — digest of the whole secret recorded in every share; several GB/s on one
//!   core with run-time SIMD detection, so it never limits split/combine (SHA-256 would).
//! * `polyval` (RustCrypto) — the GF(2^128) polynomial hash for the Wegman–Carter MAC;
//!   maintained, CLMUL-accelerated with run-time detection, better forgery bound
//!   (`(ℓ+1)/2^128`) than Poly1305 (`8ℓ/2^106`); `zeroize` feature wipes its key on drop.
//! * `subtle` — constant-time tag comparison (already a dependency of `polyval`).
//! * `rand_chacha` + `rand_core` (0.9, matching the workspace's `rand` 0.9) — fast
//!   ChaCha8/12/20 CSPRNG for the random pads.
//! * `getrandom` (0.3, the version `rand_core` 0.9 already uses) — OS randomness for seeds,
//!   set IDs and the [`rng::OsSource`].
//! * `zeroize` — wiping random pads, keys and plaintext buffers.
//! * `thiserror` — error enums. `uuid` — the share set ID type.
//!
//! Dev-only: `proptest` (property tests), `blahaj` (a crates.io Shamir implementation used
//! as a benchmark baseline).

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(missing_docs)]

#[allow(missing_docs)]
pub mod agent;
pub mod auth;
#[allow(missing_docs)]
pub mod config;
pub mod format;
pub mod gf256;
#[allow(missing_docs)]
pub mod keys;
mod kurihara;
pub mod otp;
pub mod rng;
pub mod scheme;
#[allow(missing_docs)]
pub mod seal;
mod shamir;
pub mod sharing;
pub mod stream;
#[allow(missing_docs)]
pub mod transfer;
#[allow(missing_docs)]
pub mod wire;
pub mod xor;

pub use rng::{ChaChaRounds, ChaChaSource, DeviceSource, OsSource, RandomSource, RngChoice};
pub use scheme::{Scheme, SchemeKind};
pub use sharing::{Combiner, SharingError, Splitter};
pub use stream::{combine, combine_stream, split, split_stream, CombineSummary, SplitSummary};
