//! Which threshold scheme a backup uses, with validated parameters.

use thiserror::Error;

/// Largest `n` supported by the XOR scheme. The reconstruction schedule is found by Gaussian
/// elimination on a matrix of about `k·n_p` rows, so this keeps set-up below a few ms.
pub const MAX_XOR_SHARES: u8 = 32;

/// Largest `n` supported by Shamir over GF(2^8): the x-coordinates are `1..=n`, non-zero bytes.
pub const MAX_SHAMIR_SHARES: u8 = 255;

/// The two share constructions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SchemeKind {
    /// Kurihara et al. XOR (k,n) threshold scheme (see [`crate::sharing`]). Subject to patent
    /// claims in some jurisdictions; see the crate README.
    Xor,
    /// Shamir's scheme over GF(2^8) with x-coordinates `1..=n` (patent-free).
    Shamir,
}

/// A validated (k, n) threshold scheme.
///
/// Invariant: `2 <= k <= n <= max` where `max` is [`MAX_XOR_SHARES`] or
/// [`MAX_SHAMIR_SHARES`]; for [`SchemeKind::Xor`], `prime` is the smallest prime `>= n`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Scheme {
    kind: SchemeKind,
    k: u8,
    n: u8,
}

/// Invalid scheme parameters or chunk size.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SchemeError {
    /// `k` and `n` violate `2 <= k <= n`.
    #[error("threshold k={k} with n={n} shares: need 2 <= k <= n")]
    BadThreshold {
        /// Requested threshold.
        k: u8,
        /// Requested number of shares.
        n: u8,
    },
    /// `n` above what the scheme supports.
    #[error("{kind:?} scheme supports at most {max} shares, {n} requested")]
    TooManyShares {
        /// Scheme kind.
        kind: SchemeKind,
        /// Requested number of shares.
        n: u8,
        /// Supported maximum.
        max: u8,
    },
    /// The chunk size is zero, too large, or not a multiple of the pieces per chunk.
    #[error("chunk size {chunk_size} invalid: must be a positive multiple of {multiple_of}, at most {max}")]
    BadChunkSize {
        /// Requested chunk size.
        chunk_size: usize,
        /// Required divisor.
        multiple_of: usize,
        /// Largest allowed chunk size.
        max: usize,
    },
}

/// Largest chunk size accepted (fits the u32 header field; 256 MiB keeps memory bounded).
pub const MAX_CHUNK_SIZE: usize = 256 << 20;

/// Target chunk size: 1 MiB keeps one chunk plus its shares near the per-core L2 cache.
pub const TARGET_CHUNK_SIZE: usize = 1 << 20;

impl Scheme {
    /// The XOR (Kurihara) scheme with threshold `k` of `n`.
    ///
    /// # Errors
    /// [`SchemeError::BadThreshold`] or [`SchemeError::TooManyShares`].
    pub fn xor(k: u8, n: u8) -> Result<Self, SchemeError> {
        Self::new(SchemeKind::Xor, k, n)
    }

    /// Shamir over GF(2^8) with threshold `k` of `n`.
    ///
    /// # Errors
    /// [`SchemeError::BadThreshold`] or [`SchemeError::TooManyShares`].
    pub fn shamir(k: u8, n: u8) -> Result<Self, SchemeError> {
        Self::new(SchemeKind::Shamir, k, n)
    }

    /// A scheme of the given kind.
    ///
    /// # Errors
    /// [`SchemeError::BadThreshold`] or [`SchemeError::TooManyShares`].
    pub fn new(kind: SchemeKind, k: u8, n: u8) -> Result<Self, SchemeError> {
        if k < 2 || k > n {
            return Err(SchemeError::BadThreshold { k, n });
        }
        let max = match kind {
            SchemeKind::Xor => MAX_XOR_SHARES,
            SchemeKind::Shamir => MAX_SHAMIR_SHARES,
        };
        if n > max {
            return Err(SchemeError::TooManyShares { kind, n, max });
        }
        Ok(Self { kind, k, n })
    }

    /// Scheme kind.
    #[must_use]
    pub fn kind(&self) -> SchemeKind {
        self.kind
    }

    /// Threshold: shares needed to reconstruct.
    #[must_use]
    pub fn k(&self) -> u8 {
        self.k
    }

    /// Number of shares produced.
    #[must_use]
    pub fn n(&self) -> u8 {
        self.n
    }

    /// The XOR scheme's prime `n_p` (smallest prime `>= n`); 0 for Shamir.
    #[must_use]
    pub fn prime(&self) -> u8 {
        match self.kind {
            SchemeKind::Xor => smallest_prime_at_least(self.n),
            SchemeKind::Shamir => 0,
        }
    }

    /// Number of equal pieces a chunk is cut into: `n_p − 1` for XOR, 1 for Shamir.
    #[must_use]
    pub fn pieces_per_chunk(&self) -> usize {
        match self.kind {
            SchemeKind::Xor => usize::from(self.prime()) - 1,
            SchemeKind::Shamir => 1,
        }
    }

    /// Random bytes drawn per chunk of `chunk_size` bytes:
    /// XOR `((k−1)·n_p − 1)·d` with `d = chunk_size / (n_p − 1)`; Shamir `(k−1)·chunk_size`.
    #[must_use]
    pub fn random_bytes_per_chunk(&self, chunk_size: usize) -> usize {
        let k = usize::from(self.k);
        match self.kind {
            SchemeKind::Xor => {
                let p = usize::from(self.prime());
                ((k - 1) * p - 1) * (chunk_size / (p - 1))
            }
            SchemeKind::Shamir => (k - 1) * chunk_size,
        }
    }

    /// A chunk size near 1 MiB that is valid for this scheme (a multiple of 64·pieces).
    #[must_use]
    pub fn default_chunk_size(&self) -> usize {
        let unit = 64 * self.pieces_per_chunk();
        TARGET_CHUNK_SIZE / unit * unit
    }

    /// Checks that `chunk_size` is a positive multiple of [`Self::pieces_per_chunk`] and at
    /// most [`MAX_CHUNK_SIZE`].
    ///
    /// # Errors
    /// [`SchemeError::BadChunkSize`].
    pub fn check_chunk_size(&self, chunk_size: usize) -> Result<(), SchemeError> {
        let multiple_of = self.pieces_per_chunk();
        if chunk_size == 0 || !chunk_size.is_multiple_of(multiple_of) || chunk_size > MAX_CHUNK_SIZE
        {
            return Err(SchemeError::BadChunkSize {
                chunk_size,
                multiple_of,
                max: MAX_CHUNK_SIZE,
            });
        }
        Ok(())
    }
}

/// Smallest prime `>= n` (n >= 2). For `n <= 255` the result fits in a `u8`
/// (the largest needed, for n in 252..=255, would be 257, but XOR is capped at 32).
fn smallest_prime_at_least(n: u8) -> u8 {
    let is_prime = |x: u16| {
        x >= 2
            && (2..x)
                .take_while(|d| d * d <= x)
                .all(|d| !x.is_multiple_of(d))
    };
    let mut x = u16::from(n.max(2));
    while !is_prime(x) {
        x += 1;
    }
    u8::try_from(x).unwrap_or(u8::MAX)
}

/// All `k`-element subsets of `0..n` (share positions), in lexicographic order: what the
/// tests run every subset over, and the order a restore tries subsets of shares in.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primes() {
        let want = [
            (2, 2),
            (3, 3),
            (4, 5),
            (5, 5),
            (6, 7),
            (7, 7),
            (8, 11),
            (16, 17),
            (32, 37),
        ];
        for (n, p) in want {
            assert_eq!(smallest_prime_at_least(n), p, "n={n}");
        }
    }

    #[test]
    fn validation() {
        assert!(Scheme::xor(1, 3).is_err());
        assert!(Scheme::xor(4, 3).is_err());
        assert!(Scheme::xor(2, 33).is_err());
        assert!(Scheme::shamir(2, 255).is_ok());
        let s = Scheme::xor(4, 7).expect("valid");
        assert_eq!(s.prime(), 7);
        assert_eq!(s.default_chunk_size() % 6, 0);
        assert!(s.check_chunk_size(s.default_chunk_size()).is_ok());
        assert!(s.check_chunk_size(1000).is_err());
        assert!(s.check_chunk_size(0).is_err());
    }
}
