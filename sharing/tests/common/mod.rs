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

/// All `k`-element subsets of `0..n`, in lexicographic order.
pub fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
    fn rec(start: usize, n: usize, k: usize, cur: &mut Vec<usize>, out: &mut Vec<Vec<usize>>) {
        if cur.len() == k {
            out.push(cur.clone());
            return;
        }
        for i in start..n {
            cur.push(i);
            rec(i + 1, n, k, cur, out);
            cur.pop();
        }
    }
    let mut out = Vec::new();
    rec(0, n, k, &mut Vec::new(), &mut out);
    out
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
