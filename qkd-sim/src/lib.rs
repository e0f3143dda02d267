//! `qkd-sim`: the physics of a simulated QKD link, free of HTTP, storage and threads.
//!
//! Owns:
//! * [`physics`]: the decoy-state BB84 secure-key-rate and QBER model of a fibre link
//!   (GLLP rate, Lo–Ma–Chen estimates), an intercept-resend eavesdropper's effect.
//! * [`bb84`]: the faithful BB84 engine, sans IO: Alice and Bob exchange typed messages
//!   through a [`bb84::Channel`] the caller provides (the KME carries them over its
//!   KME-to-KME channel); simulated photons, sifting, QBER estimation, Cascade, a verification
//!   hash and Toeplitz privacy amplification.
//!
//! Must never depend on: the KME (`kms-server`), any HTTP or TLS crate, storage, or the
//! backup crates. The KME depends on this crate, never the reverse.
//!
//! Dependencies: `rand`/`rand_chacha` (ChaCha20 for the protocol's random choices, seeded
//! from the OS), `zeroize` (key bits wiped when a frame ends), `serde` + `base64` (the
//! protocol messages' wire form), `uuid` (frame IDs), `tracing` (no key bits are logged).

#![forbid(unsafe_code)]

pub mod bb84;
pub mod physics;
