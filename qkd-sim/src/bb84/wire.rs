//! Compact wire encodings for the BB84 messages: bit strings, sorted pulse indices and
//! Cascade range queries travel as base64 strings of packed bytes, never as one JSON number
//! per bit. Every decoder checks lengths and ranges and returns [`Bb84Error::Protocol`] on
//! malformed input; none of them panics on peer data.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use super::Bb84Error;

fn protocol(what: &str, detail: impl std::fmt::Display) -> Bb84Error {
    Bb84Error::Protocol(format!("{what}: {detail}"))
}

fn decode_b64(what: &str, s: &str) -> Result<Zeroizing<Vec<u8>>, Bb84Error> {
    B64.decode(s)
        .map(Zeroizing::new)
        .map_err(|e| protocol(what, format_args!("bad base64 ({e})")))
}

/// A string of `len` bits, packed least-significant bit first into bytes, base64 (standard
/// alphabet, padded). The string is wiped when the value is dropped; `Debug` shows only the
/// length.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackedBits {
    /// Number of bits.
    pub len: u64,
    /// `ceil(len / 8)` bytes, base64.
    pub b64: String,
}

impl Drop for PackedBits {
    fn drop(&mut self) {
        self.b64.zeroize();
    }
}

impl std::fmt::Debug for PackedBits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedBits")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl PackedBits {
    /// Packs bits given one per item (only the lowest bit of each item is used).
    pub fn from_bits<I: IntoIterator<Item = u8>>(bits: I) -> Self {
        let mut bytes = Zeroizing::new(Vec::new());
        let mut len = 0u64;
        for b in bits {
            if len.is_multiple_of(8) {
                bytes.push(0u8);
            }
            if let Some(last) = bytes.last_mut() {
                *last |= (b & 1) << (len % 8);
            }
            len += 1;
        }
        PackedBits {
            len,
            b64: B64.encode(&bytes[..]),
        }
    }

    /// Packs the first `len` bits of LSB-first 64-bit words.
    pub fn from_words(words: &[u64], len: usize) -> Self {
        let nbytes = len.div_ceil(8);
        let mut bytes = Zeroizing::new(Vec::with_capacity(nbytes));
        for w in words {
            bytes.extend_from_slice(&w.to_le_bytes());
        }
        bytes.resize(nbytes, 0);
        if !len.is_multiple_of(8) {
            if let Some(last) = bytes.last_mut() {
                *last &= (1u8 << (len % 8)) - 1;
            }
        }
        PackedBits {
            len: len as u64,
            b64: B64.encode(&bytes[..]),
        }
    }

    fn bytes(&self, what: &str, expected: Option<usize>) -> Result<Zeroizing<Vec<u8>>, Bb84Error> {
        if let Some(e) = expected {
            if self.len != e as u64 {
                return Err(protocol(
                    what,
                    format_args!("{} bits where {e} are expected", self.len),
                ));
            }
        }
        if self.len > super::MAX_WIRE_BITS {
            return Err(protocol(
                what,
                format_args!("{} bits is too long", self.len),
            ));
        }
        let bytes = decode_b64(what, &self.b64)?;
        if bytes.len() as u64 != self.len.div_ceil(8) {
            return Err(protocol(
                what,
                format_args!("{} bytes for {} bits", bytes.len(), self.len),
            ));
        }
        Ok(bytes)
    }

    /// The bits, one per byte (0 or 1). `expected`: the length the receiver requires.
    pub fn to_bits(
        &self,
        what: &str,
        expected: Option<usize>,
    ) -> Result<Zeroizing<Vec<u8>>, Bb84Error> {
        let bytes = self.bytes(what, expected)?;
        let len = self.len as usize;
        let mut out = Zeroizing::new(Vec::with_capacity(len));
        out.extend((0..len).map(|i| (bytes[i / 8] >> (i % 8)) & 1));
        Ok(out)
    }

    /// The bits as LSB-first 64-bit words (bits past `len` are zero).
    pub fn to_words(
        &self,
        what: &str,
        expected: Option<usize>,
    ) -> Result<Zeroizing<Vec<u64>>, Bb84Error> {
        let bytes = self.bytes(what, expected)?;
        let len = self.len as usize;
        let mut out = Zeroizing::new(vec![0u64; len.div_ceil(64)]);
        for (i, b) in bytes.iter().enumerate() {
            out[i / 8] |= u64::from(*b) << (8 * (i % 8));
        }
        if !len.is_multiple_of(64) {
            if let Some(last) = out.last_mut() {
                *last &= (1u64 << (len % 64)) - 1;
            }
        }
        Ok(out)
    }
}

/// Strictly increasing indices (of pulses), as LEB128 varints of the gaps
/// (`first`, then `next − previous − 1`), base64.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackedIndices {
    /// Number of indices.
    pub count: u64,
    /// The varint-coded gaps, base64.
    pub b64: String,
}

impl std::fmt::Debug for PackedIndices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedIndices")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl PackedIndices {
    /// Encodes indices that must be strictly increasing (the caller's own data).
    pub fn encode(indices: &[u64]) -> Self {
        let mut bytes = Vec::with_capacity(indices.len() + indices.len() / 4);
        let mut next = 0u64;
        for &i in indices {
            let mut gap = i.wrapping_sub(next);
            next = i.wrapping_add(1);
            loop {
                let b = (gap & 0x7f) as u8;
                gap >>= 7;
                if gap == 0 {
                    bytes.push(b);
                    break;
                }
                bytes.push(b | 0x80);
            }
        }
        PackedIndices {
            count: indices.len() as u64,
            b64: B64.encode(&bytes),
        }
    }

    /// Decodes and checks: strictly increasing, all `< limit`, at most `max_count` of them.
    pub fn decode(&self, what: &str, limit: u64, max_count: u64) -> Result<Vec<u64>, Bb84Error> {
        if self.count > max_count {
            return Err(protocol(
                what,
                format_args!("{} indices is too many", self.count),
            ));
        }
        let bytes = decode_b64(what, &self.b64)?;
        let mut out = Vec::with_capacity(self.count as usize);
        let mut next = 0u64;
        let mut pos = 0usize;
        while pos < bytes.len() {
            let mut gap = 0u64;
            let mut shift = 0u32;
            loop {
                let Some(&b) = bytes.get(pos) else {
                    return Err(protocol(what, "truncated varint"));
                };
                pos += 1;
                if shift > 63 || (shift == 63 && b & 0x7e != 0) {
                    return Err(protocol(what, "varint overflows 64 bits"));
                }
                gap |= u64::from(b & 0x7f) << shift;
                shift += 7;
                if b & 0x80 == 0 {
                    break;
                }
            }
            let idx = next
                .checked_add(gap)
                .filter(|&i| i < limit)
                .ok_or_else(|| protocol(what, format_args!("index beyond {limit}")))?;
            if out.len() as u64 >= self.count {
                return Err(protocol(what, "more indices than announced"));
            }
            out.push(idx);
            next = idx + 1;
        }
        if out.len() as u64 != self.count {
            return Err(protocol(
                what,
                format_args!("{} indices where {} were announced", out.len(), self.count),
            ));
        }
        Ok(out)
    }
}

/// One Cascade query: "send me your parity of positions `start .. start + len` of pass
/// `pass`'s permuted key".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Query {
    pub pass: u32,
    pub start: u32,
    pub len: u32,
}

/// A batch of [`Query`]s: 12 bytes each (pass, start, len as little-endian u32), base64.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackedQueries {
    /// Number of queries.
    pub count: u64,
    /// The queries, base64.
    pub b64: String,
}

impl std::fmt::Debug for PackedQueries {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PackedQueries")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl PackedQueries {
    pub fn encode(queries: &[Query]) -> Self {
        let mut bytes = Vec::with_capacity(12 * queries.len());
        for q in queries {
            bytes.extend_from_slice(&q.pass.to_le_bytes());
            bytes.extend_from_slice(&q.start.to_le_bytes());
            bytes.extend_from_slice(&q.len.to_le_bytes());
        }
        PackedQueries {
            count: queries.len() as u64,
            b64: B64.encode(&bytes),
        }
    }

    /// Decodes at most `max_count` queries (ranges are checked by the caller).
    pub fn decode(&self, what: &str, max_count: u64) -> Result<Vec<Query>, Bb84Error> {
        if self.count > max_count {
            return Err(protocol(
                what,
                format_args!("{} queries is too many", self.count),
            ));
        }
        let bytes = decode_b64(what, &self.b64)?;
        if bytes.len() as u64 != 12 * self.count {
            return Err(protocol(what, "length does not match the count"));
        }
        let word = |c: &[u8]| u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        Ok(bytes
            .chunks_exact(12)
            .map(|c| Query {
                pass: word(&c[0..4]),
                start: word(&c[4..8]),
                len: word(&c[8..12]),
            })
            .collect())
    }
}

/// A 32-byte seed, base64.
pub fn encode_seed(seed: &[u8; 32]) -> String {
    B64.encode(seed)
}

pub fn decode_seed(what: &str, s: &str) -> Result<[u8; 32], Bb84Error> {
    let bytes = decode_b64(what, s)?;
    <[u8; 32]>::try_from(&bytes[..]).map_err(|_| protocol(what, "a seed has 32 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_round_trip_in_both_representations() {
        let bits: Vec<u8> = (0..203u32).map(|i| ((i * 7 + i / 3) % 2) as u8).collect();
        let p = PackedBits::from_bits(bits.iter().copied());
        assert_eq!(&p.to_bits("t", Some(203)).unwrap()[..], &bits[..]);
        let words = p.to_words("t", None).unwrap();
        assert_eq!(PackedBits::from_words(&words, 203), p);
        assert!(p.to_bits("t", Some(202)).is_err());
        let bad = PackedBits {
            len: 9,
            b64: B64.encode([1u8]),
        };
        assert!(bad.to_bits("t", None).is_err());
        let garbage = PackedBits {
            len: 1,
            b64: "%%%".into(),
        };
        assert!(garbage.to_words("t", None).is_err());
    }

    #[test]
    fn indices_round_trip_and_reject_bad_input() {
        let idx = vec![0u64, 1, 5, 300, 70_000, 1 << 40];
        let p = PackedIndices::encode(&idx);
        assert_eq!(p.decode("t", (1 << 40) + 1, 10).unwrap(), idx);
        assert!(p.decode("t", 1 << 40, 10).is_err(), "beyond the limit");
        assert!(p.decode("t", u64::MAX, 5).is_err(), "too many");
        let truncated = PackedIndices {
            count: 1,
            b64: B64.encode([0x80u8]),
        };
        assert!(truncated.decode("t", 10, 10).is_err());
        let overflow = PackedIndices {
            count: 1,
            b64: B64.encode([0xffu8; 11]),
        };
        assert!(overflow.decode("t", u64::MAX, 10).is_err());
        let miscounted = PackedIndices {
            count: 2,
            ..p.clone()
        };
        assert!(miscounted.decode("t", u64::MAX, 10).is_err());
    }

    #[test]
    fn queries_round_trip() {
        let q = vec![
            Query {
                pass: 0,
                start: 7,
                len: 3,
            },
            Query {
                pass: 3,
                start: u32::MAX,
                len: 1,
            },
        ];
        let p = PackedQueries::encode(&q);
        assert_eq!(p.decode("t", 2).unwrap(), q);
        assert!(p.decode("t", 1).is_err());
    }
}
