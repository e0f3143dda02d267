//! Helpers shared by the integration tests.
#![allow(dead_code)]

use sharing::rng::{RandomSource, RngError, Secrecy};

/// A deterministic "random" source that replays fixed bytes (cycling).
pub struct Replay {
    bytes: Vec<u8>,
    pos: usize,
}

impl Replay {
    pub fn new(bytes: Vec<u8>) -> Self {
        assert!(!bytes.is_empty());
        Self { bytes, pos: 0 }
    }
}

impl RandomSource for Replay {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RngError> {
        for b in buf {
            *b = self.bytes[self.pos % self.bytes.len()];
            self.pos += 1;
        }
        Ok(())
    }
    fn secrecy(&self) -> Secrecy {
        Secrecy::Computational
    }
}

/// Deterministic pseudo-random bytes (xorshift), for test data.
pub fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 32) as u8
        })
        .collect()
}
