//! Privacy amplification by Toeplitz hashing, and the verification hash.
//!
//! ## Toeplitz hashing
//! The `ℓ × n` Toeplitz matrices over GF(2) form a universal₂ family (H. Krawczyk, "LFSR-based
//! hashing and authentication", CRYPTO '94, LNCS 839, 129–139, 1994; their use for privacy
//! amplification with an `n + ℓ − 1`-bit seed: M. Hayashi and T. Tsurumaru, "More efficient
//! privacy amplification with less random seeds via dual universal hash function", IEEE
//! Trans. Inf. Theory 62, 2213–2232, 2016). The matrix defined by seed `s` is
//! `T[j][i] = s[j − i + n − 1]` (constant along diagonals), and the output is `T · k`.
//!
//! With the key reversed (`k'[i] = k[n − 1 − i]`), output bit `j` is `⊕_i s[i + j] · k'[i]`,
//! so the output is the XOR, over the set bits `i` of `k'`, of the `ℓ`-bit window of the seed
//! starting at bit `i`. Windows are read 64 bits at a time from two adjacent seed words, which
//! makes the inner loop a straight word-wise XOR: `(n/2) · ⌈ℓ/64⌉` word operations, a few tens
//! of milliseconds for n = 256 kbit, ℓ = 128 kbit in release builds.
//!
//! ## Verification hash
//! Polynomial evaluation hashing over the prime field GF(2^61 − 1) (M. N. Wegman and
//! J. L. Carter, "New hash functions and their use in authentication and set equality",
//! JCSS 22, 265–279, 1981; the polynomial form e.g. B. den Boer, 1993, and J. Bierbrauer et
//! al., CRYPTO '93). The key bits are cut into 32-bit coefficients `m_1 … m_d`, preceded by 1
//! and by the bit length; the tag is the polynomial evaluated at a random point `r` that Alice
//! draws after error correction. Two different keys collide with probability at most
//! `(d + 1) / (2^61 − 1)`, below 10^−14 for keys up to a few Mbit.

use zeroize::Zeroizing;

/// The Mersenne prime 2^61 − 1.
pub const P61: u64 = (1 << 61) - 1;

/// Bits a verification tag discloses (counted as leaked; the tag is below 2^61 but travels
/// as a u64, counted in full).
pub const TAG_BITS: u64 = 64;

fn reduce(x: u64) -> u64 {
    let r = (x & P61) + (x >> 61);
    if r >= P61 {
        r - P61
    } else {
        r
    }
}

fn mul_mod(a: u64, b: u64) -> u64 {
    let z = u128::from(a) * u128::from(b);
    reduce(((z as u64) & P61) + ((z >> 61) as u64))
}

/// The verification tag of the first `nbits` bits of LSB-first words, at point `r` (taken
/// modulo 2^61 − 1).
pub fn poly_tag(r: u64, words: &[u64], nbits: usize) -> u64 {
    let r = reduce(r & ((1 << 62) - 1));
    let mut acc = 1u64;
    let mut step = |c: u64| acc = reduce(mul_mod(acc, r) + c);
    step(reduce(nbits as u64 & ((1 << 62) - 1)));
    let full = nbits / 64;
    for (i, &w) in words.iter().enumerate().take(nbits.div_ceil(64)) {
        let w = if i == full {
            w & ((1u64 << (nbits % 64)) - 1)
        } else {
            w
        };
        step(w & 0xffff_ffff);
        step(w >> 32);
    }
    acc
}

/// `T(seed) · key` over GF(2) for an `n`-bit key (LSB-first words) and an `(n + l − 1)`-bit
/// seed: `l` output bits, LSB-first words. Bits past the ends of `key` and `seed` are
/// ignored. Panics only if the slices are shorter than `n` / `n + l − 1` bits, which the
/// callers check.
pub fn toeplitz(seed: &[u64], key: &[u64], n: usize, l: usize) -> Zeroizing<Vec<u64>> {
    let out_words = l.div_ceil(64);
    let mut acc = Zeroizing::new(vec![0u64; out_words]);
    if n == 0 || l == 0 {
        return acc;
    }
    let seed_bits = n + l - 1;
    // Seed copy with its bits past `seed_bits` cleared and two words of zero padding, so that
    // every window reads whole words.
    let mut s = Zeroizing::new(vec![0u64; seed_bits.div_ceil(64) + 2]);
    s[..seed_bits.div_ceil(64)].copy_from_slice(&seed[..seed_bits.div_ceil(64)]);
    if !seed_bits.is_multiple_of(64) {
        s[seed_bits / 64] &= (1u64 << (seed_bits % 64)) - 1;
    }
    for i in 0..n {
        // k'[i'] = k[n − 1 − i'], with i' = n − 1 − i.
        if (key[i / 64] >> (i % 64)) & 1 == 0 {
            continue;
        }
        let start = n - 1 - i;
        let (b, sh) = (start / 64, (start % 64) as u32);
        let lo = &s[b..b + out_words];
        if sh == 0 {
            for (a, &x) in acc.iter_mut().zip(lo) {
                *a ^= x;
            }
        } else {
            let hi = &s[b + 1..b + 1 + out_words];
            for ((a, &x), &y) in acc.iter_mut().zip(lo).zip(hi) {
                *a ^= (x >> sh) | (y << (64 - sh));
            }
        }
    }
    if !l.is_multiple_of(64) {
        acc[out_words - 1] &= (1u64 << (l % 64)) - 1;
    }
    acc
}

/// Packs bits given one per byte into LSB-first words.
pub fn pack(bits: &[u8]) -> Zeroizing<Vec<u64>> {
    let mut w = Zeroizing::new(vec![0u64; bits.len().div_ceil(64)]);
    for (i, &b) in bits.iter().enumerate() {
        w[i / 64] |= u64::from(b & 1) << (i % 64);
    }
    w
}

/// The first `l` bits (a multiple of 8) of LSB-first words as bytes (bit `j` is bit `j % 8`
/// of byte `j / 8`).
pub fn to_bytes(words: &[u64], l: usize) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::with_capacity(l / 8));
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out.truncate(l / 8);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bb84::sim;
    use rand::{RngCore, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn bits(words: &[u64], len: usize) -> Vec<u8> {
        (0..len).map(|i| sim::get(words, i as u64)).collect()
    }

    /// The matrix product straight from the definition `T[j][i] = s[j − i + n − 1]`.
    fn naive(seed: &[u8], key: &[u8], l: usize) -> Vec<u8> {
        let n = key.len();
        (0..l)
            .map(|j| (0..n).fold(0u8, |acc, i| acc ^ (seed[j + n - 1 - i] & key[i])))
            .collect()
    }

    #[test]
    fn matches_the_naive_matrix_product_and_is_linear() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        for &(n, l) in &[
            (1, 1),
            (5, 3),
            (64, 64),
            (65, 1),
            (100, 37),
            (200, 130),
            (333, 64),
            (257, 255),
        ] {
            let seed = sim::random_words(&mut rng, (n + l - 1) as u64);
            let a = sim::random_words(&mut rng, n as u64);
            let b = sim::random_words(&mut rng, n as u64);
            let ta = toeplitz(&seed, &a, n, l);
            let expect = naive(&bits(&seed, n + l - 1), &bits(&a, n), l);
            assert_eq!(bits(&ta, l), expect, "n = {n}, l = {l}");
            let extra = ta.len() * 64 - l;
            assert!(
                extra == 0 || ta[ta.len() - 1] >> (l % 64) == 0,
                "bits past l are clear"
            );
            let ab: Vec<u64> = a.iter().zip(b.iter()).map(|(x, y)| x ^ y).collect();
            let tb = toeplitz(&seed, &b, n, l);
            let tab = toeplitz(&seed, &ab, n, l);
            let xor: Vec<u64> = ta.iter().zip(tb.iter()).map(|(x, y)| x ^ y).collect();
            assert_eq!(&tab[..], &xor[..], "linearity at n = {n}, l = {l}");
        }
    }

    #[test]
    fn the_verification_tag_tells_different_keys_apart() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let key = sim::random_words(&mut rng, 10_000);
        for _ in 0..50 {
            let r = rng.next_u64();
            let t = poly_tag(r, &key, 10_000);
            assert_eq!(t, poly_tag(r, &key, 10_000));
            let mut other = key.clone();
            let i = sim::below(&mut rng, 10_000) as usize;
            other[i / 64] ^= 1 << (i % 64);
            assert_ne!(t, poly_tag(r, &other, 10_000), "one flipped bit");
            assert_ne!(t, poly_tag(r, &key, 9_999), "different length");
            // Bits past the length do not count.
            let mut padded = key.clone();
            padded[156] |= 1 << 40;
            assert_eq!(t, poly_tag(r, &padded, 10_000));
        }
        assert!(poly_tag(5, &key, 10_000) < P61);
    }
}
