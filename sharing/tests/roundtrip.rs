//! Round trips through the share file format for both schemes, and every error path of
//! combining a wrong share set.

mod common;

use common::{data, Replay};
use sharing::format::{HEADER_LEN, TRAILER_LEN};
use sharing::rng::{ChaChaRounds, ChaChaSource};
use sharing::scheme::subsets;
use sharing::{
    combine, split, ChunkedSplit, Combiner, Scheme, SchemeKind, SharingError, SplitDigest, Splitter,
};

/// A multiple of 1, 2, 4, 6, 10, 12 and 16: valid for every XOR prime up to 17.
const CS: usize = 240;

const PARAMS: &[(u8, u8)] = &[
    (2, 2),
    (2, 3),
    (3, 3),
    (2, 4),
    (3, 4),
    (3, 5),
    (4, 7),
    (5, 7),
];

fn rng(seed: u8) -> ChaChaSource {
    ChaChaSource::from_seed(ChaChaRounds::R8, [seed; 32])
}

fn schemes() -> Vec<Scheme> {
    PARAMS
        .iter()
        .flat_map(|&(k, n)| {
            [
                Scheme::xor(k, n).expect("valid"),
                Scheme::shamir(k, n).expect("valid"),
            ]
        })
        .collect()
}

#[test]
fn every_k_subset_reconstructs_awkward_lengths() {
    let lengths = [0, 1, 7, CS - 1, CS, CS + 1, 3 * CS + 13];
    for scheme in schemes() {
        let (k, n) = (usize::from(scheme.k()), usize::from(scheme.n()));
        for (li, &len) in lengths.iter().enumerate() {
            let secret = data(len, li as u64 + 1);
            let shares = split(scheme, CS, rng(li as u8), &secret).expect("split");
            assert_eq!(shares.len(), n);
            let chunks = len.div_ceil(CS);
            for s in &shares {
                assert_eq!(
                    s.len(),
                    HEADER_LEN + chunks * CS + TRAILER_LEN,
                    "share size"
                );
            }
            for subset in subsets(n, k) {
                let mut picked: Vec<&[u8]> = subset.iter().map(|&i| shares[i].as_slice()).collect();
                assert_eq!(
                    combine(&picked).expect("combine"),
                    secret,
                    "{scheme:?} {subset:?} len {len}"
                );
                picked.reverse();
                assert_eq!(combine(&picked).expect("combine reversed"), secret);
            }
            for subset in subsets(n, k - 1) {
                let picked: Vec<&[u8]> = subset.iter().map(|&i| shares[i].as_slice()).collect();
                match combine(&picked) {
                    Err(SharingError::NotEnoughShares { have, need }) => {
                        assert_eq!((have, need), (k - 1, k));
                    }
                    other => {
                        panic!("{scheme:?} {subset:?}: expected NotEnoughShares, got {other:?}")
                    }
                }
            }
        }
    }
}

#[test]
fn larger_n_up_to_16() {
    for kind in [SchemeKind::Xor, SchemeKind::Shamir] {
        for (k, n) in [(2u8, 16u8), (9, 16), (16, 16), (3, 11), (6, 13)] {
            let scheme = Scheme::new(kind, k, n).expect("valid");
            let secret = data(2 * CS + 5, u64::from(k));
            let shares = split(scheme, CS, rng(k), &secret).expect("split");
            // First k, last k and every other share.
            let mut sets = vec![
                (0..k).collect::<Vec<u8>>(),
                (n - k..n).collect(),
                (0..n)
                    .rev()
                    .step_by(2)
                    .chain((0..n).rev().skip(1).step_by(2))
                    .take(usize::from(k))
                    .collect(),
            ];
            sets.dedup();
            for set in sets {
                let picked: Vec<&[u8]> = set
                    .iter()
                    .map(|&i| shares[usize::from(i)].as_slice())
                    .collect();
                assert_eq!(
                    combine(&picked).expect("combine"),
                    secret,
                    "{scheme:?} {set:?}"
                );
            }
        }
    }
}

#[test]
fn fast_path_2_3_equals_general_equation() {
    let scheme = Scheme::xor(2, 3).expect("valid");
    let secret = data(CS, 42);
    let mut fast = Splitter::new(scheme, CS, Replay::new(data(4096, 7))).expect("ok");
    let mut slow = Splitter::new(scheme, CS, Replay::new(data(4096, 7)))
        .expect("ok")
        .without_fast_path();
    let mut a = vec![vec![0u8; CS]; 3];
    let mut b = vec![vec![0u8; CS]; 3];
    for _ in 0..3 {
        fast.split_chunk(&secret, &mut a).expect("split");
        slow.split_chunk(&secret, &mut b).expect("split");
        assert_eq!(a, b);
    }
}

#[test]
fn chunk_api_checks_lengths_and_indices() {
    let scheme = Scheme::xor(3, 5).expect("valid");
    let mut sp = Splitter::new(scheme, CS, rng(1)).expect("ok");
    let mut shares = vec![vec![0u8; CS]; 5];
    assert!(matches!(
        sp.split_chunk(&[0u8; CS - 1], &mut shares),
        Err(SharingError::ChunkLength { .. })
    ));
    assert!(matches!(
        sp.split_chunk(&[0u8; CS], &mut shares[..4]),
        Err(SharingError::ShareCount { .. })
    ));
    assert!(Splitter::new(scheme, CS + 1, rng(1)).is_err());
    assert!(matches!(
        Combiner::new(scheme, CS, &[0, 1]),
        Err(SharingError::NotEnoughShares { have: 2, need: 3 })
    ));
    assert!(matches!(
        Combiner::new(scheme, CS, &[0, 1, 1]),
        Err(SharingError::DuplicateIndex { index: 1 })
    ));
    assert!(matches!(
        Combiner::new(scheme, CS, &[0, 1, 5]),
        Err(SharingError::IndexOutOfRange { index: 5, n: 5 })
    ));
    let c = Combiner::new(scheme, CS, &[4, 0, 2]).expect("ok");
    let secret = data(CS, 3);
    sp.split_chunk(&secret, &mut shares).expect("split");
    let picked = [&shares[4], &shares[0], &shares[2]];
    let mut out = vec![0u8; CS];
    c.combine_chunk(&picked, &mut out).expect("combine");
    assert_eq!(out, secret);
    assert!(matches!(
        c.combine_chunk(&picked[..2], &mut out),
        Err(SharingError::ShareCount { .. })
    ));
}

fn two_sets(kind: SchemeKind) -> (Vec<Vec<u8>>, Vec<Vec<u8>>, Vec<u8>) {
    let scheme = Scheme::new(kind, 2, 3).expect("valid");
    let secret = data(5 * CS + 17, 11);
    let a = split(scheme, CS, rng(1), &secret).expect("split");
    let b = split(scheme, CS, rng(2), &secret).expect("split");
    (a, b, secret)
}

#[test]
fn wrong_share_sets_are_refused() {
    for kind in [SchemeKind::Xor, SchemeKind::Shamir] {
        let (a, b, secret) = two_sets(kind);
        // Mixed set IDs.
        assert!(matches!(
            combine(&[&a[0], &b[1]]),
            Err(SharingError::MixedSets { pos: 1 })
        ));
        // Duplicate index.
        assert!(matches!(
            combine(&[&a[1], &a[1]]),
            Err(SharingError::DuplicateIndex { index: 1 })
        ));
        // No shares.
        assert!(matches!(combine::<&[u8]>(&[]), Err(SharingError::NoShares)));
        // Mismatched parameters: same set ID but a different scheme / chunk size is
        // only possible by forging a header; a share of another scheme is another set.
        let other =
            split(Scheme::new(kind, 3, 3).expect("valid"), CS, rng(3), &secret).expect("split");
        assert!(matches!(
            combine(&[&a[0], &other[1]]),
            Err(SharingError::MixedSets { .. })
        ));
        // Not a share at all.
        assert!(matches!(
            combine(&[&a[0], &vec![0u8; 500]]),
            Err(SharingError::Format { pos: 1, .. })
        ));
        // Truncated share: payload cut.
        let mut cut = a[1].clone();
        cut.truncate(a[1].len() - TRAILER_LEN - 10);
        assert!(combine(&[&a[0], &cut]).is_err());
        // Truncated share: header cut.
        assert!(matches!(
            combine(&[&a[0], &a[1][..10]]),
            Err(SharingError::Truncated { pos: 1 })
        ));
        // Trailing data.
        let mut long = a[1].clone();
        long.push(0);
        assert!(combine(&[&a[0], &long]).is_err());
        // Corrupted payload byte: digest mismatch.
        let mut bad = a[1].clone();
        bad[HEADER_LEN + 3 * CS + 5] ^= 0x01;
        assert!(matches!(
            combine(&[&a[0], &bad]),
            Err(SharingError::DigestMismatch)
        ));
        // Corrupted trailer byte.
        let mut bad = a[1].clone();
        let l = bad.len();
        bad[l - 40] ^= 0x80;
        assert!(matches!(
            combine(&[&a[0], &bad]),
            Err(SharingError::Format { pos: 1, .. })
        ));
        // A whole extra chunk inserted: chunk count mismatch is detected.
        let mut extra = a[1].clone();
        let at = HEADER_LEN + CS;
        let chunk: Vec<u8> = extra[at..at + CS].to_vec();
        extra.splice(at..at, chunk);
        assert!(combine(&[&a[0], &extra]).is_err());
        // Correct pair still fine.
        assert_eq!(combine(&[&a[2], &a[0]]).expect("ok"), secret);
    }
}

#[test]
fn forged_header_with_other_params_is_refused() {
    use sharing::format::ShareHeader;
    let (a, _, _) = two_sets(SchemeKind::Xor);
    let mut hb = [0u8; HEADER_LEN];
    hb.copy_from_slice(&a[1][..HEADER_LEN]);
    let mut h = ShareHeader::decode(&hb).expect("valid");
    h.chunk_size = 2 * CS;
    let mut forged = a[1].clone();
    forged[..HEADER_LEN].copy_from_slice(&h.encode().expect("encode"));
    assert!(matches!(
        combine(&[&a[0], &forged]),
        Err(SharingError::MismatchedParams { pos: 1 })
    ));
}

#[test]
fn more_than_k_shares_uses_first_k() {
    let scheme = Scheme::shamir(3, 5).expect("valid");
    let secret = data(1000, 5);
    let shares = split(scheme, CS, rng(9), &secret).expect("split");
    assert_eq!(combine(&shares).expect("combine"), secret);
}

/// The chunk reader under `split_stream` and the client's store: every chunk is read and
/// hashed whether it is split or skipped; the last one is short and zero-padded; input is
/// not read past a short chunk.
#[test]
fn chunked_split_reads_hashes_and_splits_on_demand() {
    for scheme in [
        Scheme::xor(2, 3).expect("valid"),
        Scheme::shamir(3, 5).expect("valid"),
    ] {
        let secret = data(4 * CS + 17, 21);
        let mut input = secret.as_slice();
        let mut chunks = ChunkedSplit::new(scheme, CS, rng(4), &mut input).expect("valid");
        let n = usize::from(scheme.n());
        let k = usize::from(scheme.k());
        let mut shares = vec![vec![0u8; CS]; n];
        let mut seen = Vec::new();
        while let Some(chunk) = chunks.next_chunk().expect("read") {
            let (j, len) = (chunk.index, chunk.len);
            seen.push((j, len));
            if j % 2 == 1 {
                continue; // skipped: read and hashed, not split
            }
            chunk.split_into(&mut shares).expect("split");
            let idx: Vec<u8> = (0..k as u8).collect();
            let c = Combiner::new(scheme, CS, &idx).expect("combiner");
            let mut out = vec![0u8; CS];
            c.combine_chunk(&shares[..k], &mut out).expect("combine");
            let start = j as usize * CS;
            assert_eq!(&out[..len], &secret[start..start + len], "chunk {j}");
            assert!(out[len..].iter().all(|&b| b == 0), "zero-padded");
        }
        assert!(
            chunks.next_chunk().expect("read").is_none(),
            "stays at the end"
        );
        assert_eq!(
            seen,
            vec![(0, CS), (1, CS), (2, CS), (3, CS), (4, 17)],
            "{scheme:?}"
        );
        assert_eq!(
            chunks.finish(),
            SplitDigest {
                original_len: secret.len() as u64,
                chunk_count: 5,
                digest: *blake3::hash(&secret).as_bytes(),
            }
        );
    }
}

#[test]
fn any_k_shares_rebuild_every_other_share_exactly() {
    for scheme in schemes() {
        let (k, n) = (usize::from(scheme.k()), usize::from(scheme.n()));
        let secret = data(CS, 99);
        let mut sp = Splitter::new(scheme, CS, rng(7)).expect("splitter");
        let mut shares = vec![vec![0u8; CS]; n];
        sp.split_chunk(&secret, &mut shares).expect("split");
        for subset in subsets(n, k) {
            let indices: Vec<u8> = subset.iter().map(|&i| i as u8).collect();
            let have: Vec<&[u8]> = subset.iter().map(|&i| shares[i].as_slice()).collect();
            for target in (0..n as u8).filter(|t| !indices.contains(t)) {
                let c = Combiner::regenerating(scheme, CS, &indices, target)
                    .unwrap_or_else(|e| panic!("{scheme:?} {indices:?} -> {target}: {e}"));
                let mut out = vec![0u8; CS];
                c.combine_chunk(&have, &mut out).expect("regenerate");
                assert_eq!(
                    out,
                    shares[usize::from(target)],
                    "{scheme:?}: share {target} from {indices:?}"
                );
            }
        }
    }
}

#[test]
fn regenerating_refuses_a_target_that_is_not_another_share() {
    let scheme = Scheme::xor(2, 3).expect("valid");
    assert!(matches!(
        Combiner::regenerating(scheme, CS, &[0, 1], 1),
        Err(SharingError::DuplicateIndex { index: 1 })
    ));
    assert!(matches!(
        Combiner::regenerating(scheme, CS, &[0, 1], 3),
        Err(SharingError::IndexOutOfRange { index: 3, n: 3 })
    ));
}
