//! Exhaustive perfect-secrecy checks: any k−1 shares have the same distribution for every
//! secret, and any k shares determine it.

mod common;

use std::collections::BTreeMap;

use common::Replay;
use sharing::scheme::subsets;
use sharing::{Combiner, Scheme, Splitter};

/// XOR scheme with 1-bit pieces: chunk = p−1 bytes, each byte 0 or 1 (XOR of 0/1 bytes is
/// XOR of bits). Enumerates every secret and every randomness value.
fn xor_one_bit(k: u8, n: u8) {
    let scheme = Scheme::xor(k, n).expect("valid");
    let p = usize::from(scheme.prime());
    let cs = p - 1;
    let n_rand = scheme.random_bytes_per_chunk(cs);
    let (ku, nu) = (usize::from(k), usize::from(n));
    let bits = |v: usize, len: usize| -> Vec<u8> { (0..len).map(|b| (v >> b & 1) as u8).collect() };
    // histograms[subset][secret] = map share-tuple -> count
    let small = subsets(nu, ku - 1);
    let mut hist: Vec<Vec<BTreeMap<Vec<u8>, u32>>> =
        vec![vec![BTreeMap::new(); 1 << cs]; small.len()];
    let full = subsets(nu, ku);
    let combiners: Vec<Combiner> = full
        .iter()
        .map(|s| {
            let idx: Vec<u8> = s.iter().map(|&i| i as u8).collect();
            Combiner::new(scheme, cs, &idx).expect("combiner")
        })
        .collect();
    let mut shares = vec![vec![0u8; cs]; nu];
    let mut out = vec![0u8; cs];
    for secret in 0..1usize << cs {
        let sbits = bits(secret, cs);
        for r in 0..1usize << n_rand {
            // Fast path draws R0 then R1 (d = 1 byte each): the same 2 bits.
            let mut sp = Splitter::new(scheme, cs, Replay::new(bits(r, n_rand))).expect("ok");
            sp.split_chunk(&sbits, &mut shares).expect("split");
            for (h, set) in hist.iter_mut().zip(&small) {
                let tuple: Vec<u8> = set.iter().flat_map(|&i| shares[i].clone()).collect();
                *h[secret].entry(tuple).or_default() += 1;
            }
            for (c, set) in combiners.iter().zip(&full) {
                let picked: Vec<&[u8]> = set.iter().map(|&i| shares[i].as_slice()).collect();
                c.combine_chunk(&picked, &mut out).expect("combine");
                assert_eq!(out, sbits, "({k},{n}) subset {set:?} secret {secret} r {r}");
            }
        }
    }
    for (h, set) in hist.iter().zip(&small) {
        for (secret, dist) in h.iter().enumerate() {
            assert_eq!(dist, &h[0], "({k},{n}) shares {set:?} leak secret {secret}");
        }
        // And the common distribution is uniform over all tuples.
        let tuples = 1usize << ((ku - 1) * cs);
        assert_eq!(h[0].len(), tuples, "({k},{n}) {set:?} not uniform");
        let first = h[0].values().next().copied();
        assert!(h[0].values().all(|&c| Some(c) == first));
    }
}

#[test]
fn xor_2_3_one_bit_exhaustive() {
    xor_one_bit(2, 3);
}

#[test]
fn xor_2_4_one_bit_exhaustive() {
    xor_one_bit(2, 4);
}

#[test]
fn xor_3_4_one_bit_exhaustive() {
    xor_one_bit(3, 4);
}

#[test]
fn xor_3_5_one_bit_exhaustive() {
    xor_one_bit(3, 5);
}

/// Shamir (2,3) over one byte: every single share takes each of the 256 values exactly once
/// as the randomness ranges over all 256 values, for every secret.
#[test]
fn shamir_2_3_one_byte_exhaustive() {
    let scheme = Scheme::shamir(2, 3).expect("valid");
    let mut shares = vec![vec![0u8; 1]; 3];
    for secret in 0..=255u8 {
        let mut counts = [[0u16; 256]; 3];
        for a in 0..=255u8 {
            let mut sp = Splitter::new(scheme, 1, Replay::new(vec![a])).expect("ok");
            sp.split_chunk(&[secret], &mut shares).expect("split");
            for i in 0..3 {
                counts[i][usize::from(shares[i][0])] += 1;
            }
            for set in subsets(3, 2) {
                let idx: Vec<u8> = set.iter().map(|&i| i as u8).collect();
                let c = Combiner::new(scheme, 1, &idx).expect("ok");
                let mut out = [0u8; 1];
                c.combine_chunk(&[&shares[set[0]], &shares[set[1]]], &mut out)
                    .expect("ok");
                assert_eq!(out[0], secret);
            }
        }
        assert!(
            counts.iter().all(|c| c.iter().all(|&x| x == 1)),
            "secret {secret}"
        );
    }
}

/// Shamir (3,4) over one byte, for a few secrets but all 65 536 coefficient pairs: every
/// pair of shares takes each of the 65 536 value pairs exactly once.
#[test]
fn shamir_3_4_pairs_uniform() {
    let scheme = Scheme::shamir(3, 4).expect("valid");
    let mut shares = vec![vec![0u8; 1]; 4];
    let pairs = subsets(4, 2);
    for secret in [0u8, 0xA5] {
        let mut seen = vec![vec![false; 65536]; pairs.len()];
        for r in 0..65536u32 {
            let mut sp =
                Splitter::new(scheme, 1, Replay::new(vec![r as u8, (r >> 8) as u8])).expect("ok");
            sp.split_chunk(&[secret], &mut shares).expect("split");
            for (s, set) in seen.iter_mut().zip(&pairs) {
                let v = usize::from(shares[set[0]][0]) << 8 | usize::from(shares[set[1]][0]);
                assert!(!s[v], "pair {set:?} value repeated for secret {secret}");
                s[v] = true;
            }
        }
    }
}
