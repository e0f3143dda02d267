//! The simulated link: blocks derived from a secret seed at both ends.
//!
//! At start the producing end draws a 256-bit seed from the operating system; block `seq` is
//! the ChaCha8 stream `seq` under that seed. The reference carries seed and sequence number
//! (over the mutually authenticated KME-to-KME channel only), and the far end derives the
//! same bytes. This stands in for a QKD device (quantum channel plus post-processing, which
//! make both ends hold identical key); its key is therefore only computationally secret.
//! The faithful mode (`bb84`) runs the protocol instead.

use std::sync::atomic::{AtomicU64, Ordering};

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use secret_buf::SecretBuf;
use zeroize::Zeroizing;

use super::{BlockRef, KeySource, Produced, SourceError};

pub const KIND: &str = "simulated";

/// The simulator at one end of a link.
pub struct Simulated {
    seed: Zeroizing<[u8; 32]>,
    seq: AtomicU64,
}

impl Simulated {
    /// A fresh seed from the operating system.
    pub fn new() -> Result<Self, SourceError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut seed[..]).map_err(|e| {
            SourceError::Failed(format!("cannot draw a link seed from the OS: {e}"))
        })?;
        Ok(Simulated {
            seed,
            seq: AtomicU64::new(0),
        })
    }
}

/// The bytes of block `seq` under `seed`: ChaCha8 stream `seq`.
fn derive(seed: &[u8; 32], seq: u64, len: usize) -> SecretBuf {
    let mut rng = ChaCha8Rng::from_seed(*seed);
    rng.set_stream(seq);
    let mut data = SecretBuf::zeroed(len);
    rng.fill_bytes(&mut data);
    data
}

fn encode(seed: &[u8; 32], seq: u64, len: usize) -> String {
    // Sized up front so no partial copies of the seed are left behind while it grows.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(96);
    for b in seed {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s.push(':');
    s.push_str(&seq.to_string());
    s.push(':');
    s.push_str(&len.to_string());
    s
}

fn decode(detail: &str) -> Option<(Zeroizing<[u8; 32]>, u64, usize)> {
    let mut parts = detail.split(':');
    let hex = parts.next()?;
    let seq = parts.next()?.parse().ok()?;
    let len = parts.next()?.parse().ok()?;
    if hex.len() != 64 || parts.next().is_some() {
        return None;
    }
    let mut seed = Zeroizing::new([0u8; 32]);
    for (i, out) in seed.iter_mut().enumerate() {
        *out = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some((seed, seq, len))
}

#[async_trait::async_trait]
impl KeySource for Simulated {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn modelled(&self) -> bool {
        true
    }

    async fn next_block(&self, max_len: usize) -> Result<Option<Produced>, SourceError> {
        if max_len == 0 {
            return Ok(None);
        }
        let seq = self.seq.fetch_add(1, Ordering::Relaxed);
        Ok(Some(Produced {
            reference: BlockRef {
                source: KIND.into(),
                detail: encode(&self.seed, seq, max_len),
            },
            data: derive(&self.seed, seq, max_len),
        }))
    }

    async fn fetch_block(
        &self,
        reference: &BlockRef,
        len: usize,
    ) -> Result<SecretBuf, SourceError> {
        let (seed, seq, n) = decode(&reference.detail)
            .ok_or_else(|| SourceError::BadReference("malformed simulator block".into()))?;
        if n != len {
            return Err(SourceError::BadReference(format!(
                "block length {len} does not match its reference ({n})"
            )));
        }
        Ok(derive(&seed, seq, len))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn far_end_derives_the_same_bytes() {
        let producer = Simulated::new().unwrap();
        let far = Simulated::new().unwrap();
        let a = producer.next_block(1000).await.unwrap().unwrap();
        let b = producer.next_block(1000).await.unwrap().unwrap();
        assert_ne!(&a.data[..], &b.data[..], "blocks differ");
        let got = far.fetch_block(&a.reference, 1000).await.unwrap();
        assert_eq!(&got[..], &a.data[..]);
        assert!(far.fetch_block(&a.reference, 999).await.is_err());
        let bad = BlockRef {
            source: KIND.into(),
            detail: "zz".into(),
        };
        assert!(far.fetch_block(&bad, 1).await.is_err());
    }
}
