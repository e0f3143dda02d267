//! The self-describing share file format (version 1).
//!
//! A share file is `header ‖ payload ‖ trailer`:
//!
//! * **Header**, 64 bytes, written before any payload. It holds everything known before
//!   streaming starts:
//!
//!   | offset | size | field |
//!   | --- | --- | --- |
//!   | 0 | 8 | magic `"BKSHARE\x1A"` |
//!   | 8 | 2 | format version, u16 LE (= 1) |
//!   | 10 | 1 | scheme: 1 = XOR (Kurihara), 2 = Shamir over GF(2^8) mod `0x11B` |
//!   | 11 | 1 | k |
//!   | 12 | 1 | n |
//!   | 13 | 1 | p: the XOR scheme's prime n_p; 0 for Shamir |
//!   | 14 | 1 | share index i, 0-based (Shamir x-coordinate = i + 1) |
//!   | 15 | 1 | digest algorithm: 1 = BLAKE3-256 |
//!   | 16 | 4 | chunk size c in bytes, u32 LE (secret bytes per chunk = share bytes per chunk) |
//!   | 20 | 4 | reserved, zero |
//!   | 24 | 16 | set ID: random (UUID v4) per split, identical in all n shares |
//!   | 40 | 16 | reserved, zero |
//!   | 56 | 8 | first 8 bytes of BLAKE3(bytes 0..56): catches a damaged header |
//!
//! * **Payload**: `chunk_count` share chunks of exactly `c` bytes each. The secret is cut
//!   into chunks of `c` bytes; the last partial chunk is zero-padded before splitting.
//!
//! * **Trailer**, 64 bytes, written after the last chunk, because the length and the digest
//!   are only known once the whole secret has streamed through. This keeps the writer
//!   append-only (pipes, sockets, object stores: no seek/rewrite needed):
//!
//!   | offset | size | field |
//!   | --- | --- | --- |
//!   | 0 | 8 | magic `"BKTRAIL\x1A"` |
//!   | 8 | 8 | original secret length in bytes, u64 LE |
//!   | 16 | 8 | chunk count, u64 LE (= ⌈length / c⌉) |
//!   | 24 | 32 | BLAKE3-256 digest of the whole original secret |
//!   | 56 | 8 | first 8 bytes of BLAKE3(header ‖ trailer bytes 0..56): binds it to its header |
//!
//! A reader tells chunks from the trailer by size: it reads `c` bytes at a time, and since
//! `c > 64` is required for streams ([`MIN_STREAM_CHUNK_SIZE`]), a short read of exactly 64
//! bytes at end of file is the trailer.
//!
//! BLAKE3 was chosen for the digest because it runs at several GB/s on one core (SIMD with
//! run-time detection), so hashing never limits splitting or combining; SHA-256 (≈2 GB/s
//! with SHA-NI) would. The digest is of the secret, so it reveals nothing beyond what a
//! hash of the secret reveals; for a low-entropy secret an adversary holding one share can
//! test guesses against it. Backups of genome files are high-entropy; if that matters,
//! encrypt or MAC the shares (as `share-transfer` does in transit: `share_transfer::auth`).

use thiserror::Error;

use crate::scheme::{Scheme, SchemeError, SchemeKind};

/// Header length in bytes.
pub const HEADER_LEN: usize = 64;
/// Trailer length in bytes.
pub const TRAILER_LEN: usize = 64;
/// Header magic.
pub const HEADER_MAGIC: [u8; 8] = *b"BKSHARE\x1A";
/// Trailer magic.
pub const TRAILER_MAGIC: [u8; 8] = *b"BKTRAIL\x1A";
/// The only format version written and read.
pub const FORMAT_VERSION: u16 = 1;
/// Smallest chunk size for share files (the trailer must be shorter than a chunk).
pub const MIN_STREAM_CHUNK_SIZE: usize = TRAILER_LEN + 1;

const SCHEME_XOR: u8 = 1;
const SCHEME_SHAMIR: u8 = 2;
const DIGEST_BLAKE3: u8 = 1;
const CHECK_LEN: usize = 8;

/// A malformed or unsupported header or trailer.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    /// The first 8 bytes are not the share magic: not a share file.
    #[error("not a share file (bad header magic)")]
    BadMagic,
    /// Written by a newer (or unknown) format version.
    #[error("unsupported share format version {0}")]
    UnsupportedVersion(u16),
    /// Unknown scheme byte.
    #[error("unknown scheme id {0}")]
    UnknownScheme(u8),
    /// Unknown digest algorithm byte.
    #[error("unknown digest algorithm id {0}")]
    UnknownDigest(u8),
    /// k, n or chunk size out of range.
    #[error("invalid scheme parameters in header: {0}")]
    Scheme(#[from] SchemeError),
    /// The stored prime does not match n.
    #[error("header prime {stored} does not match n (expected {expected})")]
    PrimeMismatch {
        /// Prime in the header.
        stored: u8,
        /// Prime implied by n.
        expected: u8,
    },
    /// Share index not below n.
    #[error("share index {index} out of range for n = {n}")]
    IndexOutOfRange {
        /// Index in the header.
        index: u8,
        /// n in the header.
        n: u8,
    },
    /// Chunk size below [`MIN_STREAM_CHUNK_SIZE`].
    #[error("chunk size {0} below the stream minimum {MIN_STREAM_CHUNK_SIZE}")]
    ChunkTooSmall(usize),
    /// Reserved bytes are not zero.
    #[error("reserved header bytes are not zero")]
    ReservedNonZero,
    /// Header check bytes do not match: the header is damaged.
    #[error("header check failed (damaged header)")]
    HeaderCheck,
    /// Trailer magic missing: the file is truncated or damaged.
    #[error("bad trailer magic (truncated or damaged share)")]
    BadTrailerMagic,
    /// Trailer check failed: damaged, or belongs to another header.
    #[error("trailer check failed (damaged, or trailer of another share)")]
    TrailerCheck,
    /// Length and chunk count in the trailer contradict each other.
    #[error("trailer length {len} inconsistent with {chunks} chunks of {chunk_size} bytes")]
    TrailerInconsistent {
        /// Stored length.
        len: u64,
        /// Stored chunk count.
        chunks: u64,
        /// Chunk size from the header.
        chunk_size: usize,
    },
}

/// The decoded header of one share.
///
/// Invariant (for values from [`ShareHeader::decode`]): `index < scheme.n()`, and
/// `chunk_size` is valid for `scheme` and at least [`MIN_STREAM_CHUNK_SIZE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShareHeader {
    /// Scheme and parameters.
    pub scheme: Scheme,
    /// Share index, `0..n`.
    pub index: u8,
    /// Bytes per chunk.
    pub chunk_size: usize,
    /// Random ID common to all shares of one split.
    pub set_id: [u8; 16],
}

/// The decoded trailer of one share.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShareTrailer {
    /// Length of the original secret in bytes.
    pub original_len: u64,
    /// Number of payload chunks.
    pub chunk_count: u64,
    /// BLAKE3-256 of the original secret.
    pub digest: [u8; 32],
}

fn check8(parts: &[&[u8]]) -> [u8; CHECK_LEN] {
    let mut h = blake3::Hasher::new();
    for p in parts {
        h.update(p);
    }
    let mut out = [0u8; CHECK_LEN];
    out.copy_from_slice(&h.finalize().as_bytes()[..CHECK_LEN]);
    out
}

impl ShareHeader {
    /// Serialises the header.
    ///
    /// # Errors
    /// [`FormatError::ChunkTooSmall`] / [`FormatError::Scheme`] if the chunk size is not
    /// valid for a share file, [`FormatError::IndexOutOfRange`] for a bad index.
    pub fn encode(&self) -> Result<[u8; HEADER_LEN], FormatError> {
        self.validate()?;
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&HEADER_MAGIC);
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[10] = match self.scheme.kind() {
            SchemeKind::Xor => SCHEME_XOR,
            SchemeKind::Shamir => SCHEME_SHAMIR,
        };
        b[11] = self.scheme.k();
        b[12] = self.scheme.n();
        b[13] = self.scheme.prime();
        b[14] = self.index;
        b[15] = DIGEST_BLAKE3;
        // validate() bounded chunk_size by MAX_CHUNK_SIZE (< 2^32).
        let cs = u32::try_from(self.chunk_size).unwrap_or(u32::MAX);
        b[16..20].copy_from_slice(&cs.to_le_bytes());
        b[24..40].copy_from_slice(&self.set_id);
        let check = check8(&[&b[..HEADER_LEN - CHECK_LEN]]);
        b[HEADER_LEN - CHECK_LEN..].copy_from_slice(&check);
        Ok(b)
    }

    fn validate(&self) -> Result<(), FormatError> {
        if self.index >= self.scheme.n() {
            return Err(FormatError::IndexOutOfRange {
                index: self.index,
                n: self.scheme.n(),
            });
        }
        self.scheme.check_chunk_size(self.chunk_size)?;
        if self.chunk_size < MIN_STREAM_CHUNK_SIZE {
            return Err(FormatError::ChunkTooSmall(self.chunk_size));
        }
        Ok(())
    }

    /// Parses and validates a header.
    ///
    /// # Errors
    /// Any [`FormatError`] describing what is wrong.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Self, FormatError> {
        if b[0..8] != HEADER_MAGIC {
            return Err(FormatError::BadMagic);
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion(version));
        }
        if check8(&[&b[..HEADER_LEN - CHECK_LEN]]) != b[HEADER_LEN - CHECK_LEN..] {
            return Err(FormatError::HeaderCheck);
        }
        let kind = match b[10] {
            SCHEME_XOR => SchemeKind::Xor,
            SCHEME_SHAMIR => SchemeKind::Shamir,
            other => return Err(FormatError::UnknownScheme(other)),
        };
        if b[15] != DIGEST_BLAKE3 {
            return Err(FormatError::UnknownDigest(b[15]));
        }
        if b[20..24].iter().chain(&b[40..56]).any(|&x| x != 0) {
            return Err(FormatError::ReservedNonZero);
        }
        let scheme = Scheme::new(kind, b[11], b[12])?;
        if b[13] != scheme.prime() {
            return Err(FormatError::PrimeMismatch {
                stored: b[13],
                expected: scheme.prime(),
            });
        }
        let chunk_size = u32::from_le_bytes([b[16], b[17], b[18], b[19]]) as usize;
        let mut set_id = [0u8; 16];
        set_id.copy_from_slice(&b[24..40]);
        let h = ShareHeader {
            scheme,
            index: b[14],
            chunk_size,
            set_id,
        };
        h.validate()?;
        Ok(h)
    }
}

impl ShareTrailer {
    /// Serialises the trailer, binding it to `header` (the encoded header of the same share).
    #[must_use]
    pub fn encode(&self, header: &[u8; HEADER_LEN]) -> [u8; TRAILER_LEN] {
        let mut b = [0u8; TRAILER_LEN];
        b[0..8].copy_from_slice(&TRAILER_MAGIC);
        b[8..16].copy_from_slice(&self.original_len.to_le_bytes());
        b[16..24].copy_from_slice(&self.chunk_count.to_le_bytes());
        b[24..56].copy_from_slice(&self.digest);
        let check = check8(&[header, &b[..TRAILER_LEN - CHECK_LEN]]);
        b[TRAILER_LEN - CHECK_LEN..].copy_from_slice(&check);
        b
    }

    /// Parses a trailer and checks it against its share's encoded header and chunk size.
    ///
    /// # Errors
    /// [`FormatError::BadTrailerMagic`], [`FormatError::TrailerCheck`] or
    /// [`FormatError::TrailerInconsistent`].
    pub fn decode(
        b: &[u8; TRAILER_LEN],
        header: &[u8; HEADER_LEN],
        chunk_size: usize,
    ) -> Result<Self, FormatError> {
        if b[0..8] != TRAILER_MAGIC {
            return Err(FormatError::BadTrailerMagic);
        }
        if check8(&[header, &b[..TRAILER_LEN - CHECK_LEN]]) != b[TRAILER_LEN - CHECK_LEN..] {
            return Err(FormatError::TrailerCheck);
        }
        let mut u = [0u8; 8];
        u.copy_from_slice(&b[8..16]);
        let original_len = u64::from_le_bytes(u);
        u.copy_from_slice(&b[16..24]);
        let chunk_count = u64::from_le_bytes(u);
        let mut digest = [0u8; 32];
        digest.copy_from_slice(&b[24..56]);
        if original_len.div_ceil(chunk_size as u64) != chunk_count {
            return Err(FormatError::TrailerInconsistent {
                len: original_len,
                chunks: chunk_count,
                chunk_size,
            });
        }
        Ok(Self {
            original_len,
            chunk_count,
            digest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> ShareHeader {
        ShareHeader {
            scheme: Scheme::xor(3, 5).expect("valid"),
            index: 4,
            chunk_size: 1024,
            set_id: [7; 16],
        }
    }

    #[test]
    fn header_round_trip_and_damage() {
        let h = header();
        let b = h.encode().expect("encode");
        assert_eq!(ShareHeader::decode(&b), Ok(h));
        for i in 0..HEADER_LEN {
            let mut d = b;
            d[i] ^= 0x10;
            assert!(ShareHeader::decode(&d).is_err(), "byte {i}");
        }
    }

    #[test]
    fn header_rejects_bad_values() {
        let mut h = header();
        h.index = 5;
        assert!(matches!(
            h.encode(),
            Err(FormatError::IndexOutOfRange { .. })
        ));
        let mut h = header();
        h.chunk_size = 1022; // not a multiple of 4
        assert!(matches!(h.encode(), Err(FormatError::Scheme(_))));
        let mut h = header();
        h.chunk_size = 64;
        assert!(matches!(h.encode(), Err(FormatError::ChunkTooSmall(64))));
    }

    #[test]
    fn trailer_round_trip_and_binding() {
        let hb = header().encode().expect("encode");
        let t = ShareTrailer {
            original_len: 2049,
            chunk_count: 3,
            digest: [9; 32],
        };
        let b = t.encode(&hb);
        assert_eq!(ShareTrailer::decode(&b, &hb, 1024), Ok(t));
        let mut other = header();
        other.index = 3;
        let ob = other.encode().expect("encode");
        assert_eq!(
            ShareTrailer::decode(&b, &ob, 1024),
            Err(FormatError::TrailerCheck)
        );
        let bad = ShareTrailer {
            chunk_count: 2,
            ..t
        };
        assert!(matches!(
            ShareTrailer::decode(&bad.encode(&hb), &hb, 1024),
            Err(FormatError::TrailerInconsistent { .. })
        ));
    }
}
