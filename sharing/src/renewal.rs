//! Proactive share renewal: fresh shares of the same secret without ever gathering it.
//!
//! Both schemes are linear over GF(2)-vectors: the XOR scheme's share pieces are XORs of
//! random and secret pieces, and Shamir's share bytes are polynomial values over GF(2^8),
//! whose addition is XOR. So if `D_0 … D_{n−1}` is a sharing of the all-zero chunk (same
//! scheme, same `k`, `n`, chunk size, fresh randomness), then `S_i ⊕ D_i` is a sharing of
//! the same secret whose randomness is the sum of the old and the new:
//!
//! * any `k` renewed shares rebuild the secret (the zero sharing adds nothing to it);
//! * any set of shares with fewer than `k` of each epoch reveals nothing: the renewed
//!   shares in it are the old ones plus fewer than `k` shares of zero, which are uniform
//!   and independent of everything else, so together with the old ones they are
//!   distributed as fresh shares with fewer than `k` of the old epoch.
//!
//! A [`Refresher`] deals the zero sharings chunk by chunk ([`Refresher::deal_chunk`]);
//! whoever holds share `i` folds `D_i` in with [`apply`]. Only the owner's client deals,
//! and each site sees only its own `D_i`, which is (for `k ≥ 2`) uniformly random on its
//! own: it learns nothing, not even the secret's relation to its old share.

use zeroize::Zeroizing;

use crate::rng::RandomSource;
use crate::scheme::Scheme;
use crate::sharing::{SharingError, Splitter};
use crate::xor;

/// Deals sharings of zero, one chunk at a time.
pub struct Refresher<R: RandomSource> {
    splitter: Splitter<R>,
    zero: Zeroizing<Vec<u8>>,
}

impl<R: RandomSource> std::fmt::Debug for Refresher<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refresher")
            .field("splitter", &self.splitter)
            .finish_non_exhaustive()
    }
}

impl<R: RandomSource> Refresher<R> {
    /// A refresher for shares of `scheme` in chunks of `chunk_size` bytes.
    ///
    /// # Errors
    /// [`SharingError::Scheme`] if the chunk size is invalid for the scheme.
    pub fn new(scheme: Scheme, chunk_size: usize, rng: R) -> Result<Self, SharingError> {
        Ok(Self {
            splitter: Splitter::new(scheme, chunk_size, rng)?,
            zero: Zeroizing::new(vec![0; chunk_size]),
        })
    }

    /// The scheme.
    #[must_use]
    pub fn scheme(&self) -> Scheme {
        self.splitter.scheme()
    }

    /// Writes a fresh sharing of the all-zero chunk into `deltas` (`n` buffers of the
    /// chunk size): `deltas[i]` is what share `i` must be XORed with.
    ///
    /// # Errors
    /// As [`Splitter::split_chunk`].
    pub fn deal_chunk<S: AsMut<[u8]>>(&mut self, deltas: &mut [S]) -> Result<(), SharingError> {
        self.splitter.split_chunk(&self.zero, deltas)
    }
}

/// Folds a delta into a share chunk: `share ^= delta`.
///
/// # Errors
/// [`SharingError::ChunkLength`] if the lengths differ.
pub fn apply(share: &mut [u8], delta: &[u8]) -> Result<(), SharingError> {
    if share.len() != delta.len() {
        return Err(SharingError::ChunkLength {
            expected: share.len(),
            got: delta.len(),
        });
    }
    xor::xor_assign(share, delta);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::{ChaChaRounds, ChaChaSource};
    use crate::Combiner;

    #[test]
    fn renewed_shares_rebuild_the_secret_and_differ_from_the_old() {
        for scheme in [
            Scheme::xor(2, 3).unwrap(),
            Scheme::xor(3, 5).unwrap(),
            Scheme::shamir(2, 3).unwrap(),
            Scheme::shamir(3, 4).unwrap(),
        ] {
            let cs = scheme.default_chunk_size();
            let secret: Vec<u8> = (0..cs).map(|i| (i * 7 + 1) as u8).collect();
            let n = usize::from(scheme.n());
            let rng = ChaChaSource::from_seed(ChaChaRounds::R20, [1; 32]);
            let mut sp = Splitter::new(scheme, cs, rng).unwrap();
            let mut shares = vec![vec![0u8; cs]; n];
            sp.split_chunk(&secret, &mut shares).unwrap();
            let old = shares.clone();
            let rng = ChaChaSource::from_seed(ChaChaRounds::R20, [2; 32]);
            let mut r = Refresher::new(scheme, cs, rng).unwrap();
            let mut deltas = vec![vec![0u8; cs]; n];
            r.deal_chunk(&mut deltas).unwrap();
            for (s, d) in shares.iter_mut().zip(&deltas) {
                apply(s, d).unwrap();
            }
            for (o, s) in old.iter().zip(&shares) {
                assert_ne!(o, s, "{scheme:?}: a renewed share changed");
            }
            for sub in crate::scheme::subsets(n, usize::from(scheme.k())) {
                let idx: Vec<u8> = sub.iter().map(|&i| i as u8).collect();
                let picked: Vec<&[u8]> = sub.iter().map(|&i| shares[i].as_slice()).collect();
                let mut out = vec![0u8; cs];
                Combiner::new(scheme, cs, &idx)
                    .unwrap()
                    .combine_chunk(&picked, &mut out)
                    .unwrap();
                assert_eq!(out, secret, "{scheme:?} subset {sub:?}");
            }
        }
    }

    #[test]
    fn apply_checks_lengths() {
        assert!(apply(&mut [0u8; 4], &[0u8; 3]).is_err());
    }
}
