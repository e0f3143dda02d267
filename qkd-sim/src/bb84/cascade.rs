//! Cascade error correction (G. Brassard and L. Salvail, "Secret-key reconciliation by public
//! discussion", EUROCRYPT '93, LNCS 765, 410–423, 1994), split into Alice's and Bob's halves
//! for a request/reply channel driven by Alice.
//!
//! - Pass `p` divides the key into blocks of `k_p` bits, `k_1 ≈ 0.73/QBER` and `k_{p+1} =
//!   2 k_p`. Pass 1 uses the key order; later passes use a random permutation expanded from a
//!   32-byte seed that Alice sends (ChaCha20 stream `p`, Fisher–Yates with unbiased draws).
//! - Alice discloses the parity of every block of a pass at once. Bob compares; each block
//!   whose parity differs holds an odd number of errors and gets a BINARY search: Bob asks for
//!   Alice's parity of the first half of the current range, and keeps the half whose parity
//!   differs. All searches in progress are asked in one batch, so a pass needs about
//!   `log2(k_p)` round trips.
//! - Cascade effect: when Bob flips a bit, the block containing it in every pass already run
//!   changes its parity difference; those that become odd get a new BINARY search (Bob knows
//!   Alice's parities of all blocks of earlier passes). Searches in progress whose current
//!   range contains the flipped bit flip their own parity difference and are dropped if it
//!   becomes even.
//! - Every parity Alice discloses is counted as leaked (`leaked`).
//!
//! Every bit Bob flips is a real error as long as Alice's parities are those of her key, so
//! the number of flips is bounded by the number of errors; a misbehaving peer that makes Bob
//! flip more than `n` bits gets a protocol error.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use zeroize::Zeroizing;

use super::wire::Query;
use super::{sim, Bb84Error};

/// Most passes either end accepts.
pub const MAX_PASSES: usize = 16;

fn protocol(msg: impl Into<String>) -> Bb84Error {
    Bb84Error::Protocol(msg.into())
}

/// First block size `k_1 ≈ 0.73 / QBER` (Brassard–Salvail), within `1..=n`.
pub fn first_block_size(qber: f64, n: usize) -> u32 {
    let k = (0.73 / qber.max(1e-3)).round();
    (k as usize).clamp(1, n.max(1)) as u32
}

/// Block size of pass `pass` (0-based): `k_1 · 2^pass`, at most `n`.
pub fn block_size(first: u32, pass: usize, n: usize) -> u32 {
    let k = u64::from(first)
        .checked_shl(pass as u32)
        .unwrap_or(u64::MAX);
    k.min(n.max(1) as u64) as u32
}

/// The permutation of pass `pass` (identity for pass 0): position in the pass order → key
/// index.
pub fn permutation(seed: &[u8; 32], pass: usize, n: usize) -> Vec<u32> {
    let mut perm: Vec<u32> = (0..n as u32).collect();
    if pass > 0 {
        let mut rng = ChaCha20Rng::from_seed(*seed);
        rng.set_stream(pass as u64);
        for i in (1..n).rev() {
            let j = sim::below(&mut rng, i as u64 + 1) as usize;
            perm.swap(i, j);
        }
    }
    perm
}

/// The passes run so far: block sizes and permutations (public data, shared by both ends).
pub struct Layout {
    n: usize,
    seed: [u8; 32],
    blocks: Vec<u32>,
    perms: Vec<Vec<u32>>,
    /// Key index → position in the pass order (kept by Bob only).
    invs: Vec<Vec<u32>>,
    keep_inverse: bool,
}

impl Layout {
    fn new(n: usize, seed: [u8; 32], keep_inverse: bool) -> Self {
        Layout {
            n,
            seed,
            blocks: Vec::new(),
            perms: Vec::new(),
            invs: Vec::new(),
            keep_inverse,
        }
    }

    pub fn passes(&self) -> usize {
        self.blocks.len()
    }

    fn add_pass(&mut self, block_size: u32) -> Result<(), Bb84Error> {
        if self.blocks.len() >= MAX_PASSES {
            return Err(protocol(format!("more than {MAX_PASSES} Cascade passes")));
        }
        if block_size == 0 || block_size as usize > self.n {
            return Err(protocol(format!(
                "Cascade block size {block_size} for a key of {} bits",
                self.n
            )));
        }
        let perm = permutation(&self.seed, self.blocks.len(), self.n);
        if self.keep_inverse {
            let mut inv = vec![0u32; self.n];
            for (pos, &k) in perm.iter().enumerate() {
                inv[k as usize] = pos as u32;
            }
            self.invs.push(inv);
        }
        self.perms.push(perm);
        self.blocks.push(block_size);
        Ok(())
    }

    fn block_count(&self, pass: usize) -> usize {
        self.n.div_ceil(self.blocks[pass] as usize)
    }

    /// Positions (in pass order) of block `blk`: `(start, len)`.
    fn block_range(&self, pass: usize, blk: usize) -> (usize, usize) {
        let bs = self.blocks[pass] as usize;
        let start = blk * bs;
        (start, bs.min(self.n - start))
    }

    fn parity(&self, key: &[u8], pass: usize, start: usize, len: usize) -> u8 {
        self.perms[pass][start..start + len]
            .iter()
            .fold(0u8, |acc, &k| acc ^ key[k as usize])
    }

    fn block_parities(&self, key: &[u8], pass: usize) -> Vec<u8> {
        (0..self.block_count(pass))
            .map(|b| {
                let (s, l) = self.block_range(pass, b);
                self.parity(key, pass, s, l)
            })
            .collect()
    }
}

/// Alice's half: she discloses parities and counts them.
pub struct CascadeAlice {
    layout: Layout,
    /// Parity bits disclosed so far.
    pub leaked: u64,
}

impl CascadeAlice {
    pub fn new(n: usize, seed: [u8; 32]) -> Self {
        CascadeAlice {
            layout: Layout::new(n, seed, false),
            leaked: 0,
        }
    }

    pub fn passes(&self) -> usize {
        self.layout.passes()
    }

    /// Starts the next pass: her parities of all its blocks.
    pub fn start_pass(&mut self, key: &[u8], block_size: u32) -> Result<Vec<u8>, Bb84Error> {
        self.layout.add_pass(block_size)?;
        let p = self.layout.block_parities(key, self.layout.passes() - 1);
        self.leaked += p.len() as u64;
        Ok(p)
    }

    /// Her parities of the ranges Bob asked for (checked: passes already run, ranges inside
    /// the key, at most one query per block of those passes).
    pub fn answer(&mut self, key: &[u8], queries: &[Query]) -> Result<Vec<u8>, Bb84Error> {
        let l = &self.layout;
        let max: usize = (0..l.passes()).map(|p| l.block_count(p)).sum();
        if queries.len() > max {
            return Err(protocol(format!(
                "{} Cascade queries for {max} blocks",
                queries.len()
            )));
        }
        let mut out = Vec::with_capacity(queries.len());
        for q in queries {
            let (pass, start, len) = (q.pass as usize, q.start as usize, q.len as usize);
            if pass >= l.passes() || len == 0 || start.checked_add(len).is_none_or(|e| e > l.n) {
                return Err(protocol(format!("Cascade query out of range: {q:?}")));
            }
            out.push(l.parity(key, pass, start, len));
        }
        self.leaked += out.len() as u64;
        Ok(out)
    }
}

/// A BINARY search in progress on one block: its current range (positions in the pass
/// order) and whether that range still holds an odd number of errors.
#[derive(Debug, Clone, Copy)]
struct Search {
    start: u32,
    len: u32,
    odd: bool,
}

/// Bob's half: he holds his key, compares parities and corrects it toward Alice's.
pub struct CascadeBob {
    layout: Layout,
    key: Zeroizing<Vec<u8>>,
    /// Per pass and block: Alice's parity XOR Bob's current parity.
    diff: Vec<Vec<u8>>,
    /// Searches in progress, by (pass, block).
    searches: BTreeMap<(u32, u32), Search>,
    /// The searches whose next query went to Alice, in query order.
    pending: Vec<(u32, u32)>,
    /// Blocks whose difference became odd since the last settle.
    dirty: Vec<(u32, u32)>,
    /// Bits Bob flipped.
    pub corrected: u64,
    /// Alice's parity bits received.
    pub leaked: u64,
}

impl CascadeBob {
    pub fn new(key: Zeroizing<Vec<u8>>, seed: [u8; 32]) -> Self {
        CascadeBob {
            layout: Layout::new(key.len(), seed, true),
            key,
            diff: Vec::new(),
            searches: BTreeMap::new(),
            pending: Vec::new(),
            dirty: Vec::new(),
            corrected: 0,
            leaked: 0,
        }
    }

    pub fn passes(&self) -> usize {
        self.layout.passes()
    }

    /// No query is waiting for Alice's answer.
    pub fn idle(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn key(&self) -> &[u8] {
        &self.key
    }

    #[cfg(test)]
    pub fn key_mut(&mut self) -> &mut [u8] {
        &mut self.key
    }

    pub fn into_key(self) -> Zeroizing<Vec<u8>> {
        self.key
    }

    /// Alice's parities of all blocks of the next pass; returns Bob's first queries (empty:
    /// the pass found nothing to correct).
    pub fn start_pass(&mut self, block_size: u32, alice: &[u8]) -> Result<Vec<Query>, Bb84Error> {
        if !self.idle() {
            return Err(protocol("a Cascade pass started while queries are pending"));
        }
        self.layout.add_pass(block_size)?;
        let pass = self.layout.passes() - 1;
        let blocks = self.layout.block_count(pass);
        if alice.len() != blocks {
            return Err(protocol(format!(
                "{} block parities for {blocks} blocks",
                alice.len()
            )));
        }
        self.leaked += blocks as u64;
        let mine = self.layout.block_parities(&self.key, pass);
        let diff: Vec<u8> = mine.iter().zip(alice).map(|(m, a)| (m ^ a) & 1).collect();
        for (b, &d) in diff.iter().enumerate() {
            if d == 1 {
                self.dirty.push((pass as u32, b as u32));
            }
        }
        self.diff.push(diff);
        self.settle()
    }

    /// Alice's answers to the pending queries, in order; returns the next queries (empty:
    /// the pass is finished).
    pub fn answer(&mut self, alice: &[u8]) -> Result<Vec<Query>, Bb84Error> {
        if alice.len() != self.pending.len() {
            return Err(protocol(format!(
                "{} parities for {} pending Cascade queries",
                alice.len(),
                self.pending.len()
            )));
        }
        self.leaked += alice.len() as u64;
        let pending = std::mem::take(&mut self.pending);
        // Narrow every search against the key as it was when the queries were sent.
        for (id, &a) in pending.iter().zip(alice) {
            let Some(s) = self.searches.get(id).copied() else {
                return Err(protocol("Cascade state lost a pending search"));
            };
            let half = s.len / 2;
            let mine =
                self.layout
                    .parity(&self.key, id.0 as usize, s.start as usize, half as usize);
            let narrowed = if (mine ^ a) & 1 == 1 {
                Search { len: half, ..s }
            } else {
                Search {
                    start: s.start + half,
                    len: s.len - half,
                    ..s
                }
            };
            self.searches.insert(*id, narrowed);
        }
        self.settle()
    }

    /// Flips key bit `k` and updates every pass's block differences and searches.
    fn flip(&mut self, k: usize) -> Result<(), Bb84Error> {
        self.corrected += 1;
        if self.corrected > self.key.len() as u64 {
            return Err(protocol("Cascade flipped more bits than the key has"));
        }
        self.key[k] ^= 1;
        for pass in 0..self.layout.passes() {
            let pos = self.layout.invs[pass][k];
            let blk = pos / self.layout.blocks[pass];
            let d = &mut self.diff[pass][blk as usize];
            *d ^= 1;
            if *d == 1 {
                self.dirty.push((pass as u32, blk));
            }
            if let Some(s) = self.searches.get_mut(&(pass as u32, blk)) {
                if (s.start..s.start + s.len).contains(&pos) {
                    s.odd = !s.odd;
                }
            }
        }
        Ok(())
    }

    /// Drops searches that became even, starts searches on odd blocks, finishes searches
    /// down to one bit (cascading), and returns the next batch of queries.
    fn settle(&mut self) -> Result<Vec<Query>, Bb84Error> {
        loop {
            self.searches.retain(|_, s| s.odd);
            for (pass, blk) in std::mem::take(&mut self.dirty) {
                if self.diff[pass as usize][blk as usize] == 1
                    && !self.searches.contains_key(&(pass, blk))
                {
                    let (start, len) = self.layout.block_range(pass as usize, blk as usize);
                    self.searches.insert(
                        (pass, blk),
                        Search {
                            start: start as u32,
                            len: len as u32,
                            odd: true,
                        },
                    );
                }
            }
            let found: Vec<(u32, u32)> = self
                .searches
                .iter()
                .filter(|(_, s)| s.len == 1)
                .map(|(id, _)| *id)
                .collect();
            if found.is_empty() {
                break;
            }
            for id in found {
                // A flip earlier in this loop may have cancelled this search.
                if let Some(s) = self.searches.remove(&id) {
                    if s.odd {
                        let k = self.layout.perms[id.0 as usize][s.start as usize] as usize;
                        self.flip(k)?;
                    }
                }
            }
        }
        self.pending = self.searches.keys().copied().collect();
        Ok(self
            .searches
            .iter()
            .map(|(&(pass, _), s)| Query {
                pass,
                start: s.start,
                len: s.len / 2,
            })
            .collect())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::physics::h2;
    use rand::{RngCore, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Runs Cascade in-process; returns Bob's corrected key, the leak and the round trips.
    pub(crate) fn reconcile(
        alice: &[u8],
        bob: Vec<u8>,
        qber: f64,
        passes: usize,
        seed: [u8; 32],
    ) -> (Zeroizing<Vec<u8>>, u64, u32) {
        let n = alice.len();
        let mut a = CascadeAlice::new(n, seed);
        let mut b = CascadeBob::new(Zeroizing::new(bob), seed);
        let first = first_block_size(qber, n);
        let mut rounds = 0;
        for pass in 0..passes {
            let par = a.start_pass(alice, block_size(first, pass, n)).unwrap();
            let mut q = b.start_pass(block_size(first, pass, n), &par).unwrap();
            rounds += 1;
            while !q.is_empty() {
                let ans = a.answer(alice, &q).unwrap();
                q = b.answer(&ans).unwrap();
                rounds += 1;
            }
        }
        assert_eq!(a.leaked, b.leaked);
        (b.into_key(), a.leaked, rounds)
    }

    fn noisy_pair(rng: &mut ChaCha8Rng, n: usize, errors: usize) -> (Vec<u8>, Vec<u8>) {
        let alice: Vec<u8> = (0..n).map(|_| sim::bit(rng)).collect();
        let mut bob = alice.clone();
        let mut flipped = 0;
        while flipped < errors {
            let i = sim::below(rng, n as u64) as usize;
            if bob[i] == alice[i] {
                bob[i] ^= 1;
                flipped += 1;
            }
        }
        (alice, bob)
    }

    #[test]
    fn corrects_every_error_at_one_to_eight_percent_with_a_leak_near_shannon() {
        let mut rng = ChaCha8Rng::seed_from_u64(84);
        let n = 60_000;
        for p in [0.01, 0.02, 0.04, 0.06, 0.08] {
            for _ in 0..2 {
                let (alice, bob) = noisy_pair(&mut rng, n, (n as f64 * p) as usize);
                let mut seed = [0u8; 32];
                rng.fill_bytes(&mut seed);
                let (fixed, leaked, _) = reconcile(&alice, bob, p, 4, seed);
                assert!(fixed[..] == alice[..], "residual errors at p = {p}");
                let f = leaked as f64 / (n as f64 * h2(p));
                assert!((1.05..1.5).contains(&f), "leak {f:.3} × n·H2(p) at p = {p}");
            }
        }
    }

    #[test]
    fn permutations_are_shared_and_differ_per_pass() {
        let seed = [7u8; 32];
        let p1 = permutation(&seed, 1, 1000);
        assert_eq!(p1, permutation(&seed, 1, 1000));
        assert_ne!(p1, permutation(&seed, 2, 1000));
        assert_eq!(permutation(&seed, 0, 5), vec![0, 1, 2, 3, 4]);
        let mut sorted = p1.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..1000).collect::<Vec<u32>>());
    }

    #[test]
    fn bad_parities_and_queries_are_errors() {
        let seed = [1u8; 32];
        let mut b = CascadeBob::new(Zeroizing::new(vec![0u8; 100]), seed);
        assert!(b.start_pass(10, &[0u8; 9]).is_err(), "wrong count");
        assert!(b.answer(&[1]).is_err(), "nothing pending");
        let mut b = CascadeBob::new(Zeroizing::new(vec![0u8; 100]), seed);
        assert!(b.start_pass(0, &[]).is_err(), "zero block size");
        let mut a = CascadeAlice::new(100, seed);
        a.start_pass(&[0u8; 100], 10).unwrap();
        let bad = Query {
            pass: 0,
            start: 95,
            len: 10,
        };
        assert!(a.answer(&[0u8; 100], &[bad]).is_err());
        let bad = Query {
            pass: 1,
            start: 0,
            len: 1,
        };
        assert!(a.answer(&[0u8; 100], &[bad]).is_err());
    }
}
