//! The Kurihara et al. XOR (k,n) threshold scheme: dealing and reconstruction schedules.
//!
//! With a prime `p >= n`, a chunk is cut into `p − 1` pieces `K_1 … K_{p−1}` of `d` bytes
//! (`K_0 = 0`). Random pieces `R^t_l` (`t = 0..k−2`, `l = 0..p−1`) are drawn, except
//! `R^0_{p−1}`, which the equation never uses. Share `i` (0-based) holds `p − 1` pieces
//!
//! ```text
//! S(i, m) = XOR_{t=0}^{k−2} R^t_{(t·i + m) mod p}  XOR  K_{(m − i) mod p},   m = 0..p−2.
//! ```
//!
//! Random pieces are laid out in the pad buffer in the order `R^0_0 … R^0_{p−2}`, then
//! `R^1_0 … R^1_{p−1}`, `R^2_0 …`; this order is fixed by the known-answer test.
//!
//! Reconstruction from a k-subset solves the GF(2) linear system once per subset
//! ([`Schedule::new`]) and then applies only XORs of whole pieces.

use crate::xor;

/// Most sources one output piece needs in the dealing equation: `k − 1` random pieces plus
/// one secret piece, with `k <= 32`.
const MAX_DEAL_TERMS: usize = 33;

/// Index of random piece `R^t_l` in the pad buffer (in units of pieces).
#[inline]
fn random_index(p: usize, t: usize, l: usize) -> usize {
    if t == 0 {
        l
    } else {
        t * p + l - 1
    }
}

/// Deals one chunk with the general equation.
///
/// `secret` has `(p−1)·d` bytes, `random` `((k−1)·p − 1)·d` bytes, each `shares[i]`
/// `(p−1)·d` bytes. Lengths are checked by the caller ([`crate::sharing::Splitter`]).
pub(crate) fn deal<S: AsMut<[u8]>>(
    k: usize,
    p: usize,
    secret: &[u8],
    random: &[u8],
    shares: &mut [S],
) {
    let d = secret.len() / (p - 1);
    fn piece(buf: &[u8], idx: usize, d: usize) -> &[u8] {
        &buf[idx * d..(idx + 1) * d]
    }
    let mut srcs: [&[u8]; MAX_DEAL_TERMS] = [&[]; MAX_DEAL_TERMS];
    for (i, share) in shares.iter_mut().enumerate() {
        let share = share.as_mut();
        for (m, dst) in share.chunks_exact_mut(d.max(1)).take(p - 1).enumerate() {
            let mut count = 0;
            for t in 0..k - 1 {
                srcs[count] = piece(random, random_index(p, t, (t * i + m) % p), d);
                count += 1;
            }
            let q = (m + p - i % p) % p;
            if q != 0 {
                srcs[count] = piece(secret, q - 1, d);
                count += 1;
            }
            xor::xor_many(dst, &srcs[..count]);
        }
    }
}

/// Dedicated (2,3) dealer: `S0 = (R0, R1⊕K1)`, `S1 = (R0⊕K2, R1)`, `S2 = (R0⊕K1, R1⊕K2)`.
///
/// The caller has already written `R0` into `s0[..d]` and `R1` into `s1[d..]`, so no
/// separate pad buffer exists (nothing to wipe: the pads *are* share bytes).
pub(crate) fn deal_2_3(secret: &[u8], s0: &mut [u8], s1: &mut [u8], s2: &mut [u8]) {
    const LANE: usize = 32;
    let d = secret.len() / 2;
    let (k1, k2) = secret.split_at(d);
    let (r0, s0b) = s0.split_at_mut(d);
    let (s1a, r1) = s1.split_at_mut(d);
    let (s2a, s2b) = s2.split_at_mut(d);
    let (r0, r1): (&[u8], &[u8]) = (r0, r1);
    let mut it = k1
        .chunks_exact(LANE)
        .zip(k2.chunks_exact(LANE))
        .zip(r0.chunks_exact(LANE))
        .zip(r1.chunks_exact(LANE))
        .zip(s0b.chunks_exact_mut(LANE))
        .zip(s1a.chunks_exact_mut(LANE))
        .zip(s2a.chunks_exact_mut(LANE))
        .zip(s2b.chunks_exact_mut(LANE));
    for (((((((k1, k2), r0), r1), s0b), s1a), s2a), s2b) in &mut it {
        for j in 0..LANE {
            s0b[j] = r1[j] ^ k1[j];
            s1a[j] = r0[j] ^ k2[j];
            s2a[j] = r0[j] ^ k1[j];
            s2b[j] = r1[j] ^ k2[j];
        }
    }
    let tail = d / LANE * LANE;
    for j in tail..d {
        s0b[j] = r1[j] ^ k1[j];
        s1a[j] = r0[j] ^ k2[j];
        s2a[j] = r0[j] ^ k1[j];
        s2b[j] = r1[j] ^ k2[j];
    }
}

/// One XOR input of a reconstruction step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Term {
    /// Piece `piece` of the share at position `pos` of the subset.
    Share { pos: usize, piece: usize },
    /// An already reconstructed secret piece (0-based: `K_{q+1}`).
    Secret(usize),
}

/// Computes secret piece `target` (0-based, i.e. `K_{target+1}`) as the XOR of `terms`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Step {
    pub target: usize,
    pub terms: Vec<Term>,
}

/// The XOR schedule recovering all `p − 1` secret pieces from one k-subset of shares.
///
/// Invariant: steps are in an order where every [`Term::Secret`] refers to an earlier step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Schedule {
    pub steps: Vec<Step>,
}

/// A growable bitset over GF(2).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Bits(Vec<u64>);

impl Bits {
    fn new(len: usize) -> Self {
        Bits(vec![0; len.div_ceil(64)])
    }
    fn set(&mut self, i: usize) {
        self.0[i / 64] ^= 1 << (i % 64);
    }
    fn get(&self, i: usize) -> bool {
        self.0[i / 64] >> (i % 64) & 1 == 1
    }
    fn xor(&mut self, other: &Bits) {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            *a ^= b;
        }
    }
    fn count(&self) -> usize {
        self.0.iter().map(|w| w.count_ones() as usize).sum()
    }
    fn xor_count(&self, other: &Bits) -> usize {
        self.0
            .iter()
            .zip(&other.0)
            .map(|(a, b)| (a ^ b).count_ones() as usize)
            .sum()
    }
    fn ones(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(w, &word)| {
            (0..64)
                .filter(move |b| word >> b & 1 == 1)
                .map(move |b| w * 64 + b)
        })
    }
}

/// The dealing equation of piece `m` of share `i` as a row over the unknowns (random
/// columns first, then `K_1 … K_{p−1}`).
fn deal_row(k: usize, p: usize, i: usize, m: usize) -> Bits {
    let n_random = (k - 1) * p - 1;
    let mut vars = Bits::new(n_random + p - 1);
    for t in 0..k - 1 {
        vars.set(random_index(p, t, (t * i + m) % p));
    }
    let q = (m + p - i % p) % p;
    if q != 0 {
        vars.set(n_random + q - 1);
    }
    vars
}

/// The equations of the shares at `indices` (each row: which unknowns, and which share
/// pieces it came from), in reduced row echelon form by Gauss–Jordan elimination, random
/// columns first; returns the rows and how many of them (the first ones) are pivot rows.
fn eliminate(k: usize, p: usize, indices: &[u8]) -> (Vec<(Bits, Bits)>, usize) {
    let pieces = p - 1;
    let n_vars = (k - 1) * p - 1 + pieces;
    let n_eqs = indices.len() * pieces;
    let mut rows: Vec<(Bits, Bits)> = Vec::with_capacity(n_eqs);
    for (pos, &i) in indices.iter().enumerate() {
        for m in 0..pieces {
            let mut prov = Bits::new(n_eqs);
            prov.set(pos * pieces + m);
            rows.push((deal_row(k, p, usize::from(i), m), prov));
        }
    }
    let mut pivot_row = 0;
    for col in 0..n_vars {
        let Some(r) = (pivot_row..rows.len()).find(|&r| rows[r].0.get(col)) else {
            continue;
        };
        rows.swap(pivot_row, r);
        let (pv, pp) = rows[pivot_row].clone();
        for (idx, row) in rows.iter_mut().enumerate() {
            if idx != pivot_row && row.0.get(col) {
                row.0.xor(&pv);
                row.1.xor(&pp);
            }
        }
        pivot_row += 1;
    }
    (rows, pivot_row)
}

impl Schedule {
    /// The XOR schedule that rebuilds share `target` from the shares at `indices` (share
    /// repair): each of its pieces, written as a sum of the unknowns, is reduced by the
    /// pivot rows; what remains must be nothing, and the rows used name the share pieces to
    /// XOR. The output never holds the secret: only share `target`'s pieces.
    ///
    /// `None` if the subset does not determine that share.
    pub(crate) fn regenerate(k: usize, p: usize, indices: &[u8], target: u8) -> Option<Self> {
        let pieces = p - 1;
        let (rows, pivot_row) = eliminate(k, p, indices);
        let pivots = &rows[..pivot_row];
        let mut steps = Vec::with_capacity(pieces);
        for m in 0..pieces {
            let mut vars = deal_row(k, p, usize::from(target), m);
            let mut prov = Bits::new(indices.len() * pieces);
            for (v, pr) in pivots {
                // The pivot column of a reduced row is its first set bit.
                if let Some(col) = v.ones().next() {
                    if vars.get(col) {
                        vars.xor(v);
                        prov.xor(pr);
                    }
                }
            }
            if vars.count() != 0 {
                return None;
            }
            steps.push(Step {
                target: m,
                terms: prov
                    .ones()
                    .map(|e| Term::Share {
                        pos: e / pieces,
                        piece: e % pieces,
                    })
                    .collect(),
            });
        }
        Some(Schedule { steps })
    }
}

impl Schedule {
    /// Solves for the secret pieces given the share indices at each position of the subset.
    ///
    /// Returns `None` if the subset cannot recover every piece (never happens for distinct
    /// indices `< n <= p` with `p` prime and `indices.len() == k`, but the caller treats it
    /// as an error rather than trusting that).
    pub(crate) fn new(k: usize, p: usize, indices: &[u8]) -> Option<Self> {
        let pieces = p - 1;
        let n_random = (k - 1) * p - 1;
        let (rows, pivot_row) = eliminate(k, p, indices);
        // Each K_q must appear as a row equal to the unit vector e(K_q).
        let mut sets: Vec<Bits> = Vec::with_capacity(pieces);
        for q in 0..pieces {
            let col = n_random + q;
            let row = rows[..pivot_row]
                .iter()
                .find(|(v, _)| v.get(col) && v.count() == 1)?;
            sets.push(row.1.clone());
        }
        // Order by cost and reuse earlier pieces when that saves XOR inputs:
        // K_q = K_r ⊕ XOR(T_q Δ T_r).
        let mut order: Vec<usize> = (0..pieces).collect();
        order.sort_by_key(|&q| sets[q].count());
        let mut steps = Vec::with_capacity(pieces);
        let mut done: Vec<usize> = Vec::new();
        for &q in &order {
            let mut best: (usize, Option<usize>) = (sets[q].count(), None);
            for &r in &done {
                let cost = sets[q].xor_count(&sets[r]) + 1;
                if cost < best.0 {
                    best = (cost, Some(r));
                }
            }
            let (set, mut terms) = match best.1 {
                Some(r) => {
                    let mut s = sets[q].clone();
                    s.xor(&sets[r]);
                    (s, vec![Term::Secret(r)])
                }
                None => (sets[q].clone(), Vec::new()),
            };
            terms.extend(set.ones().map(|e| Term::Share {
                pos: e / pieces,
                piece: e % pieces,
            }));
            steps.push(Step { target: q, terms });
            done.push(q);
        }
        Some(Schedule { steps })
    }

    /// Applies the schedule: `shares[pos]` are the subset's share chunks (`(p−1)·d` bytes
    /// each), `out` receives the `(p−1)·d` secret bytes. Lengths are checked by the caller.
    pub(crate) fn apply<S: AsRef<[u8]>>(&self, shares: &[S], out: &mut [u8], d: usize) {
        const BATCH: usize = 8;
        if d == 0 {
            return;
        }
        for step in &self.steps {
            let (before, rest) = out.split_at_mut(step.target * d);
            let (dst, after) = rest.split_at_mut(d);
            let (before, after): (&[u8], &[u8]) = (before, after);
            let resolve = |t: &Term| -> &[u8] {
                match *t {
                    Term::Share { pos, piece } => &shares[pos].as_ref()[piece * d..(piece + 1) * d],
                    Term::Secret(r) if r < step.target => &before[r * d..(r + 1) * d],
                    Term::Secret(r) => {
                        let r = r - step.target - 1;
                        &after[r * d..(r + 1) * d]
                    }
                }
            };
            let mut srcs: [&[u8]; BATCH] = [&[]; BATCH];
            for (b, batch) in step.terms.chunks(BATCH).enumerate() {
                for (slot, t) in srcs.iter_mut().zip(batch) {
                    *slot = resolve(t);
                }
                if b == 0 {
                    xor::xor_many(dst, &srcs[..batch.len()]);
                } else {
                    xor::xor_many_assign(dst, &srcs[..batch.len()]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_2_3_matches_research_table() {
        // S0,S1: K1 = S0b ⊕ S1b, K2 = S0a ⊕ S1a (2 XORs, no reuse needed).
        let s = Schedule::new(2, 3, &[0, 1]).expect("solvable");
        assert!(s.steps.iter().all(|st| st.terms.len() == 2));
        // S0,S2: one of the pieces reuses the other.
        let s = Schedule::new(2, 3, &[0, 2]).expect("solvable");
        let total: usize = s.steps.iter().map(|st| st.terms.len()).sum();
        assert_eq!(total, 5);
    }

    #[test]
    fn composite_prime_fails() {
        // The scheme needs a prime: with p = 4, some 2-subsets are singular.
        let bad = (0..4u8)
            .flat_map(|a| (a + 1..4).map(move |b| [a, b]))
            .any(|s| Schedule::new(2, 4, &s).is_none());
        assert!(bad);
    }

    #[test]
    fn all_subsets_solvable_up_to_16() {
        for n in 2..=16u8 {
            let p = usize::from(crate::scheme::Scheme::xor(2, n).expect("ok").prime());
            for k in [2usize, 3, usize::from(n)] {
                if k > usize::from(n) {
                    continue;
                }
                // First, last and a strided subset are enough here; exhaustive subset tests
                // for small n live in tests/.
                let first: Vec<u8> = (0..k as u8).collect();
                let last: Vec<u8> = (n - k as u8..n).collect();
                assert!(Schedule::new(k, p, &first).is_some(), "k={k} n={n}");
                assert!(Schedule::new(k, p, &last).is_some(), "k={k} n={n}");
            }
        }
    }
}
