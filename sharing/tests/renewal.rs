//! Renewal privacy: shares of two epochs never combine into anything about the secret.
//!
//! Exhaustive for small XOR schemes (every secret, every randomness of the split and of the
//! renewal, 1-bit pieces): any set of old and new shares with fewer than `k` of each epoch
//! has the same distribution for every secret. Statistical for byte-sized shares of both
//! schemes over many random secrets: what `k` mixed shares "restore" is independent of the
//! file, while `k` shares of one epoch restore it exactly.

mod common;

use std::collections::BTreeMap;

use common::{data, Replay};
use sharing::renewal::apply;
use sharing::scheme::subsets;
use sharing::{ChaChaRounds, ChaChaSource, Combiner, Refresher, Scheme, Splitter};

/// Every selection of old shares `O` and new shares `N`, each non-empty and below `k`.
fn mixed_selections(n: usize, k: usize) -> Vec<(Vec<usize>, Vec<usize>)> {
    let smaller: Vec<Vec<usize>> = (1..k).flat_map(|s| subsets(n, s)).collect();
    let mut out = Vec::new();
    for o in &smaller {
        for m in &smaller {
            out.push((o.clone(), m.clone()));
        }
    }
    out
}

fn exhaustive_xor(k: u8, n: u8) {
    let scheme = Scheme::xor(k, n).expect("valid");
    let p = usize::from(scheme.prime());
    let cs = p - 1;
    let n_rand = scheme.random_bytes_per_chunk(cs);
    let nu = usize::from(n);
    let bits = |v: usize, len: usize| -> Vec<u8> { (0..len).map(|b| (v >> b & 1) as u8).collect() };
    let selections = mixed_selections(nu, usize::from(k));
    // hist[selection][secret]: share tuple → count
    let mut hist: Vec<Vec<BTreeMap<Vec<u8>, u32>>> =
        vec![vec![BTreeMap::new(); 1 << cs]; selections.len()];
    let mut old = vec![vec![0u8; cs]; nu];
    let mut deltas = vec![vec![0u8; cs]; nu];
    for secret in 0..1usize << cs {
        let sbits = bits(secret, cs);
        for r in 0..1usize << n_rand {
            let mut sp = Splitter::new(scheme, cs, Replay::new(bits(r, n_rand))).expect("ok");
            sp.split_chunk(&sbits, &mut old).expect("split");
            for r2 in 0..1usize << n_rand {
                let mut rf = Refresher::new(scheme, cs, Replay::new(bits(r2, n_rand))).expect("ok");
                rf.deal_chunk(&mut deltas).expect("deal");
                let new: Vec<Vec<u8>> = old
                    .iter()
                    .zip(&deltas)
                    .map(|(o, d)| {
                        let mut s = o.clone();
                        apply(&mut s, d).expect("apply");
                        s
                    })
                    .collect();
                for ((o, m), h) in selections.iter().zip(hist.iter_mut()) {
                    let tuple: Vec<u8> = o
                        .iter()
                        .flat_map(|&i| old[i].clone())
                        .chain(m.iter().flat_map(|&i| new[i].clone()))
                        .collect();
                    *h[secret].entry(tuple).or_default() += 1;
                }
            }
        }
    }
    for ((o, m), h) in selections.iter().zip(&hist) {
        for (secret, dist) in h.iter().enumerate() {
            assert_eq!(
                dist, &h[0],
                "({k},{n}): old shares {o:?} with new shares {m:?} leak secret {secret}"
            );
        }
    }
}

#[test]
fn old_and_new_xor_shares_reveal_nothing_2_3() {
    exhaustive_xor(2, 3);
}

#[test]
fn old_and_new_xor_shares_reveal_nothing_3_3() {
    exhaustive_xor(3, 3);
}

#[test]
fn old_and_new_xor_shares_reveal_nothing_2_5() {
    exhaustive_xor(2, 5);
}

/// Over `files` random secrets: how many output bytes of `k` shares (old at `old_idx`, new
/// at the rest of `subset`) equal the secret's, and the output's byte histogram.
fn mixed_restore_stats(
    scheme: Scheme,
    subset: &[u8],
    old_idx: &[u8],
    files: u64,
) -> (u64, u64, Vec<u64>) {
    let cs = 256;
    let n = usize::from(scheme.n());
    let comb = Combiner::new(scheme, cs, subset).expect("combiner");
    let mut equal = 0;
    let mut hist = vec![0u64; 256];
    for f in 0..files {
        let secret = data(cs, f + 1);
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&f.to_le_bytes());
        let mut sp = Splitter::new(scheme, cs, ChaChaSource::from_seed(ChaChaRounds::R20, seed))
            .expect("ok");
        let mut old = vec![vec![0u8; cs]; n];
        sp.split_chunk(&secret, &mut old).expect("split");
        seed[31] = 1;
        let mut rf = Refresher::new(scheme, cs, ChaChaSource::from_seed(ChaChaRounds::R20, seed))
            .expect("ok");
        let mut new = vec![vec![0u8; cs]; n];
        rf.deal_chunk(&mut new).expect("deal");
        for (s, o) in new.iter_mut().zip(&old) {
            apply(s, o).expect("apply");
        }
        let picked: Vec<&[u8]> = subset
            .iter()
            .map(|&i| {
                let i = usize::from(i);
                if old_idx.contains(&(i as u8)) {
                    old[i].as_slice()
                } else {
                    new[i].as_slice()
                }
            })
            .collect();
        let mut out = vec![0u8; cs];
        comb.combine_chunk(&picked, &mut out).expect("combine");
        equal += out.iter().zip(&secret).filter(|(a, b)| a == b).count() as u64;
        for b in &out {
            hist[usize::from(*b)] += 1;
        }
    }
    (equal, files * cs as u64, hist)
}

#[test]
fn mixing_epochs_restores_noise_over_many_random_files() {
    const FILES: u64 = 400;
    for scheme in [
        Scheme::xor(2, 3).unwrap(),
        Scheme::shamir(2, 3).unwrap(),
        Scheme::xor(3, 4).unwrap(),
        Scheme::shamir(3, 4).unwrap(),
    ] {
        let k = scheme.k();
        let subset: Vec<u8> = (0..k).collect();
        // Sanity: k shares of one epoch (all old, then all new) restore every byte.
        for old_idx in [subset.clone(), Vec::new()] {
            let (equal, total, _) = mixed_restore_stats(scheme, &subset, &old_idx, 20);
            assert_eq!(equal, total, "{scheme:?}: one epoch must restore the file");
        }
        // Every mix of old and new: the output matches the file only by chance (1/256 per
        // byte) and is uniform.
        for cut in 1..k {
            let old_idx: Vec<u8> = subset[..usize::from(cut)].to_vec();
            let (equal, total, hist) = mixed_restore_stats(scheme, &subset, &old_idx, FILES);
            let expect = total as f64 / 256.0;
            let sd = expect.sqrt();
            assert!(
                (equal as f64 - expect).abs() < 5.0 * sd,
                "{scheme:?} old {old_idx:?}: {equal} of {total} bytes match the file (chance: {expect:.0})"
            );
            let chi2: f64 = hist
                .iter()
                .map(|&c| (c as f64 - expect).powi(2) / expect)
                .sum();
            // 255 degrees of freedom: mean 255, sd ≈ 22.6; 400 is beyond 6 sd.
            assert!(
                chi2 < 400.0,
                "{scheme:?} old {old_idx:?}: output not uniform (χ² = {chi2:.0})"
            );
        }
    }
}
