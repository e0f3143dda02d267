//! Property tests: random lengths, schemes and share subsets round-trip.

mod common;

use proptest::prelude::*;
use sharing::rng::{ChaChaRounds, ChaChaSource};
use sharing::{combine, split, Scheme, SchemeKind, SharingError};

const CS: usize = 240;

fn scheme_strategy() -> impl Strategy<Value = Scheme> {
    (any::<bool>(), 2u8..=7)
        .prop_flat_map(|(xor, n)| (Just(xor), 2u8..=n, Just(n)))
        .prop_map(|(xor, k, n)| {
            let kind = if xor {
                SchemeKind::Xor
            } else {
                SchemeKind::Shamir
            };
            Scheme::new(kind, k, n).expect("valid by construction")
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn random_subsets_round_trip(
        scheme in scheme_strategy(),
        len in 0usize..(4 * CS + 50),
        seed in any::<u8>(),
        perm_seed in any::<u64>(),
    ) {
        let secret = common::data(len, u64::from(seed));
        let shares = split(scheme, CS, ChaChaSource::from_seed(ChaChaRounds::R8, [seed; 32]), &secret)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        // A pseudo-random permutation of the shares; take k of them (and k−1).
        let mut order: Vec<usize> = (0..shares.len()).collect();
        let mut x = perm_seed | 1;
        for i in (1..order.len()).rev() {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
        let k = usize::from(scheme.k());
        let picked: Vec<&[u8]> = order[..k].iter().map(|&i| shares[i].as_slice()).collect();
        prop_assert_eq!(combine(&picked).map_err(|e| TestCaseError::fail(e.to_string()))?, secret);
        let fewer = combine(&picked[..k - 1]);
        let is_not_enough = matches!(fewer, Err(SharingError::NotEnoughShares { .. }));
        prop_assert!(is_not_enough);
    }
}
