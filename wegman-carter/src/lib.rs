//! `wegman-carter`: information-theoretic message authentication (Wegman–Carter) with
//! POLYVAL, for messages protected by QKD key.
//!
//! Owns the one MAC construction of the workspace: the backup's share transfers use it
//! (through `share_transfer::auth`) and the KMEs' key relay uses it for every hop. Must never
//! depend on either side: it knows nothing of shares, KMEs or transport.
//!
//! Dependencies: `polyval` (RustCrypto; maintained, CLMUL-accelerated with run-time
//! detection, forgery bound `(ℓ+1)/2^128`, better than Poly1305's `8ℓ/2^106`; its `zeroize`
//! feature wipes the key on drop), `subtle` (constant-time tag comparison), `zeroize`,
//! `thiserror`.
//!
//! # Construction
//!
//! Each message is authenticated with a fresh 32-byte one-time key (e.g. QKD key bytes):
//!
//! * `key[0..16]` = `H`, the POLYVAL hash key (a GF(2^128) element, RFC 8452 encoding);
//!   must not be all-zero ([`AuthError::ZeroHashKey`]).
//! * `key[16..32]` = `s`, a one-time pad for the tag.
//!
//! `tag = POLYVAL_H(M_1, …, M_ℓ, L) ⊕ s`, where `M_1..M_ℓ` are the message's 16-byte
//! blocks (the last one zero-padded) and `L` is a final length block (message length in
//! bytes as a little-endian u128), which makes messages that differ only by trailing zero
//! bytes hash differently. Verification recomputes the tag and compares in constant time
//! (`subtle`).
//!
//! # Forgery bound
//!
//! POLYVAL is a polynomial hash: for two distinct messages, `h(M) ⊕ h(M')` is a non-zero
//! polynomial in `H` of degree at most `ℓ + 1` with no constant term, so for any
//! difference `Δ` at most `ℓ + 1` of the `2^128 − 1` allowed keys satisfy
//! `h(M) ⊕ h(M') = Δ`: the family is ε-almost-XOR-universal with
//!
//! ```text
//! ε = (ℓ + 1) / (2^128 − 1),   ℓ = ⌈message bytes / 16⌉.
//! ```
//!
//! Because `s` is uniform and used once, an adversary who saw `(M, tag)` — with unlimited
//! computing power — forges a different `(M', tag')` with probability at most `ε` per
//! attempt, and at most `q·ε` after `q` attempts. Worked numbers:
//!
//! * 1 MiB chunk: ℓ = 65 536, ε ≈ 65 537 / 2^128 ≈ **2^-112**.
//! * 80 GB share (8·10^10 bytes): ℓ = 5·10^9, ε ≈ 5·10^9 / 2^128 ≈ **2^-95.8**.
//!
//! # Key consumption
//!
//! Exactly [`KEY_LEN`] = 32 key bytes per tag (16 hash key + 16 pad), whatever the message
//! length. **Never reuse a key**: reusing `s` reveals `h(M) ⊕ h(M')`, from which `H` can be
//! solved. A fresh hash key per message (not only a fresh pad) also avoids the gradual
//! leakage analysed by Abidin & Larsson for partially secret (QKD) keys.

#![forbid(unsafe_code)]

use polyval::universal_hash::UniversalHash;
use polyval::Polyval;
use subtle::ConstantTimeEq;
use thiserror::Error;
use zeroize::{Zeroize, Zeroizing};

/// One-time key bytes consumed per tag.
pub const KEY_LEN: usize = 32;
/// Tag length in bytes.
pub const TAG_LEN: usize = 16;
const BLOCK: usize = 16;

/// Authentication errors.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum AuthError {
    /// The key is not [`KEY_LEN`] bytes.
    #[error("MAC key must be {KEY_LEN} bytes, got {0}")]
    KeyLength(usize),
    /// The hash half of the key is all zero (the hash would ignore the message).
    #[error("MAC hash key is all zero")]
    ZeroHashKey,
    /// The tag has the wrong length.
    #[error("MAC tag must be {TAG_LEN} bytes, got {0}")]
    TagLength(usize),
    /// The tag does not match: the message or tag was modified, or the key is wrong.
    #[error("MAC verification failed")]
    BadTag,
}

/// A Wegman–Carter tag.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tag(pub [u8; TAG_LEN]);

/// Incremental MAC computation over one message.
///
/// Invariant: `buf[..buf_len]` holds the bytes of the current partial block
/// (`buf_len < 16`); `len` counts all bytes fed so far.
pub struct Mac {
    hash: Polyval,
    pad: Zeroizing<[u8; TAG_LEN]>,
    buf: [u8; BLOCK],
    buf_len: usize,
    len: u128,
}

impl std::fmt::Debug for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mac")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl Mac {
    /// Starts a MAC with a fresh one-time key of [`KEY_LEN`] bytes.
    ///
    /// # Errors
    /// [`AuthError::KeyLength`] or [`AuthError::ZeroHashKey`].
    pub fn new(key: &[u8]) -> Result<Self, AuthError> {
        if key.len() != KEY_LEN {
            return Err(AuthError::KeyLength(key.len()));
        }
        let mut h = Zeroizing::new([0u8; BLOCK]);
        h.copy_from_slice(&key[..BLOCK]);
        if bool::from(h.ct_eq(&[0u8; BLOCK])) {
            return Err(AuthError::ZeroHashKey);
        }
        let mut pad = Zeroizing::new([0u8; TAG_LEN]);
        pad.copy_from_slice(&key[BLOCK..]);
        let mut hkey = polyval::Key::from(*h);
        let hash = Polyval::new(&hkey);
        hkey[..].zeroize();
        Ok(Self {
            hash,
            pad,
            buf: [0; BLOCK],
            buf_len: 0,
            len: 0,
        })
    }

    /// Feeds more message bytes (any split of the message gives the same tag).
    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u128;
        if self.buf_len > 0 {
            let take = (BLOCK - self.buf_len).min(data.len());
            self.buf[self.buf_len..self.buf_len + take].copy_from_slice(&data[..take]);
            self.buf_len += take;
            data = &data[take..];
            if self.buf_len < BLOCK {
                return;
            }
            self.hash.update_padded(&self.buf);
            self.buf_len = 0;
        }
        let whole = data.len() / BLOCK * BLOCK;
        // A multiple of 16 bytes: update_padded adds no padding here.
        self.hash.update_padded(&data[..whole]);
        let rest = &data[whole..];
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buf_len = rest.len();
    }

    /// Finishes and returns the tag.
    #[must_use]
    pub fn finalize(mut self) -> Tag {
        if self.buf_len > 0 {
            self.buf[self.buf_len..].fill(0);
            self.hash.update_padded(&self.buf);
        }
        self.hash.update_padded(&self.len.to_le_bytes());
        let h = self.hash.finalize();
        let mut tag = [0u8; TAG_LEN];
        for ((t, a), b) in tag.iter_mut().zip(h.iter()).zip(self.pad.iter()) {
            *t = a ^ b;
        }
        Tag(tag)
    }

    /// Finishes and checks `tag` in constant time.
    ///
    /// # Errors
    /// [`AuthError::TagLength`] or [`AuthError::BadTag`].
    pub fn verify(self, tag: &[u8]) -> Result<(), AuthError> {
        if tag.len() != TAG_LEN {
            return Err(AuthError::TagLength(tag.len()));
        }
        let want = self.finalize();
        if bool::from(want.0.ct_eq(tag)) {
            Ok(())
        } else {
            Err(AuthError::BadTag)
        }
    }
}

/// Tags a whole message with a one-time key.
///
/// # Errors
/// As [`Mac::new`].
pub fn tag(key: &[u8], message: &[u8]) -> Result<Tag, AuthError> {
    let mut m = Mac::new(key)?;
    m.update(message);
    Ok(m.finalize())
}

/// Verifies a whole message's tag with its one-time key.
///
/// # Errors
/// As [`Mac::new`] and [`Mac::verify`].
pub fn verify(key: &[u8], message: &[u8], tag: &[u8]) -> Result<(), AuthError> {
    let mut m = Mac::new(key)?;
    m.update(message);
    m.verify(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(seed: u8) -> [u8; KEY_LEN] {
        std::array::from_fn(|i| (i as u8).wrapping_mul(29).wrapping_add(seed) | 1)
    }

    #[test]
    fn incremental_equals_one_shot() {
        let msg: Vec<u8> = (0..1000u32).map(|i| (i * 31 % 251) as u8).collect();
        let k = key(3);
        let whole = tag(&k, &msg).expect("key ok");
        for split in [1usize, 7, 15, 16, 17, 100, 999] {
            let mut m = Mac::new(&k).expect("key ok");
            for part in msg.chunks(split) {
                m.update(part);
            }
            assert_eq!(m.finalize(), whole, "split {split}");
        }
    }

    #[test]
    fn rejects_bad_keys_and_lengths() {
        let mut z = key(1);
        z[..16].fill(0);
        assert_eq!(Mac::new(&z).err(), Some(AuthError::ZeroHashKey));
        assert_eq!(Mac::new(&[1u8; 31]).err(), Some(AuthError::KeyLength(31)));
        let k = key(1);
        assert_eq!(verify(&k, b"x", &[0u8; 15]), Err(AuthError::TagLength(15)));
    }

    #[test]
    fn trailing_zeros_change_tag() {
        let k = key(9);
        let a = tag(&k, b"abc").expect("ok");
        let b = tag(&k, b"abc\0").expect("ok");
        let c = tag(&k, &[0u8; 16]).expect("ok");
        let d = tag(&k, b"").expect("ok");
        assert_ne!(a, b);
        assert_ne!(c, d);
    }
}
