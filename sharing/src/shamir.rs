//! Shamir's (k,n) scheme over GF(2^8), byte-sliced: every byte position of a chunk has its
//! own random polynomial `f(x) = K ⊕ a_1·x ⊕ … ⊕ a_{k−1}·x^{k−1}` and share `i` (0-based)
//! holds `f(i + 1)`. All work is done as whole-region multiplies by constants
//! ([`crate::gf256::mul_region`]).
//!
//! Random coefficients are laid out in the pad buffer as `a_1 ‖ a_2 ‖ … ‖ a_{k−1}`, each a
//! full chunk long.

use crate::gf256;

/// x-coordinate of share `index` (never 0, which would reveal the secret).
#[inline]
pub(crate) fn x_of(index: u8) -> u8 {
    index.wrapping_add(1)
}

/// Deals one chunk: `shares[i] = K ⊕ Σ_j a_j · x_i^j`.
/// Lengths are checked by the caller ([`crate::sharing::Splitter`]).
pub(crate) fn deal<S: AsMut<[u8]>>(k: usize, secret: &[u8], random: &[u8], shares: &mut [S]) {
    let len = secret.len();
    for (i, share) in shares.iter_mut().enumerate() {
        let dst = share.as_mut();
        let x = x_of(i as u8);
        dst.copy_from_slice(secret);
        let mut xp = 1u8;
        for j in 1..k {
            xp = gf256::mul(xp, x);
            gf256::mul_region(dst, &random[(j - 1) * len..j * len], xp, true);
        }
    }
}

/// Lagrange coefficients at 0 for the given share indices:
/// `λ_j = Π_{m≠j} x_m / (x_m ⊕ x_j)`. `None` if two indices coincide.
pub(crate) fn lagrange_at_zero(indices: &[u8]) -> Option<Vec<u8>> {
    lagrange_at(0, indices)
}

/// Lagrange coefficients at `x` for the given share indices:
/// `λ_j = Π_{m≠j} (x ⊕ x_m) / (x_j ⊕ x_m)`, so that `f(x) = Σ_j λ_j · f(x_j)` for every
/// polynomial of degree below `indices.len()`. With `x` the x-coordinate of another share,
/// this rebuilds that share (repair). `None` if two indices coincide.
pub(crate) fn lagrange_at(x: u8, indices: &[u8]) -> Option<Vec<u8>> {
    let xs: Vec<u8> = indices.iter().map(|&i| x_of(i)).collect();
    xs.iter()
        .enumerate()
        .map(|(j, &xj)| {
            xs.iter()
                .enumerate()
                .filter(|&(m, _)| m != j)
                .try_fold(1u8, |acc, (_, &xm)| {
                    gf256::inv(xm ^ xj).map(|d| gf256::mul(acc, gf256::mul(x ^ xm, d)))
                })
        })
        .collect()
}

/// Reconstructs one chunk: `out = Σ_j λ_j · shares[j]`.
pub(crate) fn combine<S: AsRef<[u8]>>(lambdas: &[u8], shares: &[S], out: &mut [u8]) {
    for (j, (&l, s)) in lambdas.iter().zip(shares).enumerate() {
        gf256::mul_region(out, s.as_ref(), l, j > 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lagrange_sums_to_one() {
        // Σ λ_j = f(0) for the constant polynomial 1.
        for idx in [[0u8, 1, 2], [3, 7, 254], [0, 100, 200]] {
            let l = lagrange_at_zero(&idx).expect("distinct");
            assert_eq!(l.iter().fold(0, |a, b| a ^ b), 1);
        }
        assert!(lagrange_at_zero(&[1, 1]).is_none());
    }
}
