//! Chunk-level threshold secret sharing: [`Splitter`] turns one secret chunk into `n` share
//! chunks, [`Combiner`] turns `k` share chunks back into the secret chunk.
//!
//! Two schemes are available, chosen per backup with [`Scheme`]:
//!
//! * **XOR** — Kurihara, Kiyomoto, Fukushima, Tanaka, "A New (k,n)-Threshold Secret
//!   Sharing Scheme and Its Extension", ISC 2008. With the smallest prime `p >= n`, a chunk
//!   is cut into `p − 1` pieces `K_1..K_{p−1}` (`K_0 = 0`) and share `i` gets
//!   `S(i,m) = XOR_{t=0}^{k−2} R^t_{(t·i+m) mod p} XOR K_{(m−i) mod p}` for `m = 0..p−2`.
//!   Only XOR is used. For (2,3) a dedicated fused loop deals
//!   `S0 = (R0, R1⊕K1), S1 = (R0⊕K2, R1), S2 = (R0⊕K1, R1⊕K2)`.
//!   Reconstruction: for the given k-subset, Gaussian elimination over GF(2) (random
//!   columns first) yields once, in [`Combiner::new`], the list of share pieces whose XOR is
//!   each secret piece; chunks are then rebuilt with plain XOR loops.
//! * **Shamir** over GF(2^8), x-coordinates `1..=n`, with SIMD region multiplies
//!   ([`crate::gf256`]); reconstruction by Lagrange interpolation at 0.
//!
//! Both are *ideal*: each share chunk is exactly as long as the secret chunk. Both are
//! *perfect* given uniform randomness: any `k − 1` shares are independent of the secret
//! (see [`crate::rng`] for what the randomness source implies).
//!
//! Secret chunks must be exactly `chunk_size` bytes; the stream layer
//! ([`crate::stream`]) zero-pads the last chunk and records the true length.

use std::io;

use thiserror::Error;
use zeroize::{Zeroize, Zeroizing};

use crate::format::FormatError;
use crate::kurihara::{self, Schedule};
use crate::rng::{RandomSource, RngError, Secrecy};
pub use crate::scheme::{Scheme, SchemeError, SchemeKind};
use crate::shamir;

/// Everything that can go wrong while splitting or combining.
#[derive(Debug, Error)]
pub enum SharingError {
    /// Invalid scheme parameters or chunk size.
    #[error(transparent)]
    Scheme(#[from] SchemeError),
    /// A secret or output chunk of the wrong length was passed.
    #[error("chunk of {got} bytes, expected {expected}")]
    ChunkLength {
        /// Required length.
        expected: usize,
        /// Given length.
        got: usize,
    },
    /// The wrong number of share buffers was passed.
    #[error("{got} share buffers, expected {expected}")]
    ShareCount {
        /// Required count.
        expected: usize,
        /// Given count.
        got: usize,
    },
    /// A share chunk of the wrong length was passed.
    #[error("share at position {pos} has {got} bytes, expected {expected}")]
    ShareLength {
        /// Position in the given list.
        pos: usize,
        /// Required length.
        expected: usize,
        /// Given length.
        got: usize,
    },
    /// No shares at all were given.
    #[error("no shares given")]
    NoShares,
    /// Fewer than k shares.
    #[error("{have} shares given, the scheme needs {need}")]
    NotEnoughShares {
        /// Shares given.
        have: usize,
        /// Threshold k.
        need: usize,
    },
    /// Two shares with the same index.
    #[error("share index {index} given twice")]
    DuplicateIndex {
        /// The repeated index.
        index: u8,
    },
    /// A share index not below n.
    #[error("share index {index} out of range for n = {n}")]
    IndexOutOfRange {
        /// The index.
        index: u8,
        /// n.
        n: u8,
    },
    /// The linear system for this subset is singular (cannot happen for valid parameters).
    #[error("share subset {indices:?} cannot reconstruct")]
    Singular {
        /// The subset.
        indices: Vec<u8>,
    },
    /// A share belongs to a different split (set ID differs from the first share's).
    #[error("share at position {pos} belongs to a different backup set")]
    MixedSets {
        /// Position of the odd share.
        pos: usize,
    },
    /// A share's scheme or chunk size differs from the first share's.
    #[error("share at position {pos} has different scheme parameters or chunk size")]
    MismatchedParams {
        /// Position of the odd share.
        pos: usize,
    },
    /// A header or trailer is malformed.
    #[error("share at position {pos}: {source}")]
    Format {
        /// Position of the share.
        pos: usize,
        /// What is wrong.
        source: FormatError,
    },
    /// A share ended early (missing payload or trailer).
    #[error("share at position {pos} is truncated")]
    Truncated {
        /// Position of the share.
        pos: usize,
    },
    /// Bytes follow a share's trailer.
    #[error("share at position {pos} has data after its trailer")]
    TrailingData {
        /// Position of the share.
        pos: usize,
    },
    /// Shares disagree on length, chunk count or digest.
    #[error("share at position {pos} disagrees with the first share's trailer")]
    TrailerMismatch {
        /// Position of the odd share.
        pos: usize,
    },
    /// The trailer's chunk count differs from the chunks actually present.
    #[error("trailer announces {expected} chunks but {got} were read")]
    ChunkCountMismatch {
        /// Chunks announced.
        expected: u64,
        /// Chunks read.
        got: u64,
    },
    /// The reconstructed secret does not hash to the recorded digest: some share is
    /// corrupted or was tampered with. The bytes already written must be discarded.
    #[error("reconstructed data does not match the recorded digest")]
    DigestMismatch,
    /// The randomness source failed.
    #[error(transparent)]
    Rng(#[from] RngError),
    /// Reading or writing failed.
    #[error("I/O: {0}")]
    Io(#[from] io::Error),
}

/// Checks the share-buffer count and lengths.
fn check_shares<S, F: Fn(&S) -> usize>(
    shares: &[S],
    expected_count: usize,
    chunk_size: usize,
    len: F,
) -> Result<(), SharingError> {
    if shares.len() != expected_count {
        return Err(SharingError::ShareCount {
            expected: expected_count,
            got: shares.len(),
        });
    }
    for (pos, s) in shares.iter().enumerate() {
        if len(s) != chunk_size {
            return Err(SharingError::ShareLength {
                pos,
                expected: chunk_size,
                got: len(s),
            });
        }
    }
    Ok(())
}

/// Deals secret chunks into `n` share chunks, drawing randomness from `R`.
///
/// Invariant: `chunk_size` is valid for `scheme` ([`Scheme::check_chunk_size`]); the pad
/// buffer holds `scheme.random_bytes_per_chunk(chunk_size)` bytes (empty on the (2,3) XOR
/// fast path, which writes the random pieces straight into shares 0 and 1) and is wiped
/// with `zeroize` after every chunk and on drop.
pub struct Splitter<R: RandomSource> {
    scheme: Scheme,
    chunk_size: usize,
    rng: R,
    pad: Zeroizing<Vec<u8>>,
    fast_2_3: bool,
}

impl<R: RandomSource> std::fmt::Debug for Splitter<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Splitter")
            .field("scheme", &self.scheme)
            .field("chunk_size", &self.chunk_size)
            .field("fast_2_3", &self.fast_2_3)
            .finish_non_exhaustive()
    }
}

impl<R: RandomSource> Splitter<R> {
    /// A splitter for chunks of `chunk_size` bytes.
    ///
    /// # Errors
    /// [`SharingError::Scheme`] if the chunk size is invalid for the scheme.
    pub fn new(scheme: Scheme, chunk_size: usize, rng: R) -> Result<Self, SharingError> {
        scheme.check_chunk_size(chunk_size)?;
        let fast_2_3 = scheme.kind() == SchemeKind::Xor && scheme.k() == 2 && scheme.n() == 3;
        let mut s = Self {
            scheme,
            chunk_size,
            rng,
            pad: Zeroizing::new(Vec::new()),
            fast_2_3,
        };
        s.alloc_pad();
        Ok(s)
    }

    fn alloc_pad(&mut self) {
        let len = if self.fast_2_3 {
            0
        } else {
            self.scheme.random_bytes_per_chunk(self.chunk_size)
        };
        *self.pad = vec![0; len];
    }

    /// Disables the (2,3) fast path (for testing that both paths agree).
    #[doc(hidden)]
    #[must_use]
    pub fn without_fast_path(mut self) -> Self {
        self.fast_2_3 = false;
        self.alloc_pad();
        self
    }

    /// The scheme.
    #[must_use]
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Bytes per chunk.
    #[must_use]
    pub fn chunk_size(&self) -> usize {
        self.chunk_size
    }

    /// What the randomness source guarantees.
    #[must_use]
    pub fn secrecy(&self) -> Secrecy {
        self.rng.secrecy()
    }

    /// Mutable access to the randomness source (e.g. to draw a set ID).
    pub fn rng_mut(&mut self) -> &mut R {
        &mut self.rng
    }

    /// Splits one chunk. `secret.len()` must equal the chunk size; `shares` must hold `n`
    /// buffers of the chunk size each; share `i` is written to `shares[i]`.
    ///
    /// # Errors
    /// [`SharingError::ChunkLength`], [`SharingError::ShareCount`],
    /// [`SharingError::ShareLength`], or [`SharingError::Rng`] if randomness fails.
    pub fn split_chunk<S: AsMut<[u8]>>(
        &mut self,
        secret: &[u8],
        shares: &mut [S],
    ) -> Result<(), SharingError> {
        let cs = self.chunk_size;
        if secret.len() != cs {
            return Err(SharingError::ChunkLength {
                expected: cs,
                got: secret.len(),
            });
        }
        if shares.len() != usize::from(self.scheme.n()) {
            return Err(SharingError::ShareCount {
                expected: usize::from(self.scheme.n()),
                got: shares.len(),
            });
        }
        for (pos, s) in shares.iter_mut().enumerate() {
            let got = s.as_mut().len();
            if got != cs {
                return Err(SharingError::ShareLength {
                    pos,
                    expected: cs,
                    got,
                });
            }
        }
        let k = usize::from(self.scheme.k());
        if self.fast_2_3 {
            let [s0, s1, s2] = shares else {
                unreachable!("share count checked above");
            };
            let (s0, s1, s2) = (s0.as_mut(), s1.as_mut(), s2.as_mut());
            let d = cs / 2;
            self.rng.fill(&mut s0[..d])?; // R0
            self.rng.fill(&mut s1[d..])?; // R1
            kurihara::deal_2_3(secret, s0, s1, s2);
            return Ok(());
        }
        self.rng.fill(&mut self.pad)?;
        match self.scheme.kind() {
            SchemeKind::Xor => {
                let p = usize::from(self.scheme.prime());
                kurihara::deal(k, p, secret, &self.pad, shares);
            }
            SchemeKind::Shamir => shamir::deal(k, secret, &self.pad, shares),
        }
        self.pad.as_mut_slice().zeroize();
        Ok(())
    }
}

/// How a [`Combiner`] rebuilds a chunk.
#[derive(Clone, Debug)]
enum Plan {
    Xor {
        schedule: Schedule,
        piece_len: usize,
    },
    Shamir {
        lambdas: Vec<u8>,
    },
}

/// Reconstructs secret chunks from a fixed k-subset of shares.
///
/// Invariant: `indices` are `k` distinct values below `n`, and `plan` was derived for
/// exactly these indices in this order.
#[derive(Clone, Debug)]
pub struct Combiner {
    scheme: Scheme,
    chunk_size: usize,
    indices: Vec<u8>,
    plan: Plan,
}

impl Combiner {
    /// Prepares reconstruction from the shares with these indices (in this order). Exactly
    /// `k` indices must be given.
    ///
    /// # Errors
    /// [`SharingError::NotEnoughShares`], [`SharingError::ShareCount`] (more than `k`),
    /// [`SharingError::IndexOutOfRange`], [`SharingError::DuplicateIndex`], or an invalid
    /// chunk size.
    pub fn new(scheme: Scheme, chunk_size: usize, indices: &[u8]) -> Result<Self, SharingError> {
        scheme.check_chunk_size(chunk_size)?;
        let k = usize::from(scheme.k());
        if indices.len() < k {
            return Err(SharingError::NotEnoughShares {
                have: indices.len(),
                need: k,
            });
        }
        if indices.len() > k {
            return Err(SharingError::ShareCount {
                expected: k,
                got: indices.len(),
            });
        }
        for (pos, &index) in indices.iter().enumerate() {
            if index >= scheme.n() {
                return Err(SharingError::IndexOutOfRange {
                    index,
                    n: scheme.n(),
                });
            }
            if indices[..pos].contains(&index) {
                return Err(SharingError::DuplicateIndex { index });
            }
        }
        let singular = || SharingError::Singular {
            indices: indices.to_vec(),
        };
        let plan = match scheme.kind() {
            SchemeKind::Xor => {
                let p = usize::from(scheme.prime());
                let schedule = Schedule::new(k, p, indices).ok_or_else(singular)?;
                Plan::Xor {
                    schedule,
                    piece_len: chunk_size / (p - 1),
                }
            }
            SchemeKind::Shamir => Plan::Shamir {
                lambdas: shamir::lagrange_at_zero(indices).ok_or_else(singular)?,
            },
        };
        Ok(Self {
            scheme,
            chunk_size,
            indices: indices.to_vec(),
            plan,
        })
    }

    /// Prepares the repair of share `target` from the shares with these indices (in this
    /// order, exactly `k`): [`Combiner::combine_chunk`] then yields share `target`'s chunk,
    /// the same bytes the dealer gave it, never the secret. For XOR the schedule is solved
    /// from the dealing equations; for Shamir it is Lagrange interpolation at the target's
    /// x-coordinate. Whoever runs it holds k shares, so only the data's owner should.
    ///
    /// # Errors
    /// As [`Combiner::new`], and [`SharingError::IndexOutOfRange`] or
    /// [`SharingError::DuplicateIndex`] for a target that is not another share's index.
    pub fn regenerating(
        scheme: Scheme,
        chunk_size: usize,
        indices: &[u8],
        target: u8,
    ) -> Result<Self, SharingError> {
        let mut c = Self::new(scheme, chunk_size, indices)?;
        if target >= scheme.n() {
            return Err(SharingError::IndexOutOfRange {
                index: target,
                n: scheme.n(),
            });
        }
        if indices.contains(&target) {
            return Err(SharingError::DuplicateIndex { index: target });
        }
        let singular = || SharingError::Singular {
            indices: indices.to_vec(),
        };
        c.plan = match scheme.kind() {
            SchemeKind::Xor => {
                let p = usize::from(scheme.prime());
                Plan::Xor {
                    schedule: Schedule::regenerate(usize::from(scheme.k()), p, indices, target)
                        .ok_or_else(singular)?,
                    piece_len: chunk_size / (p - 1),
                }
            }
            SchemeKind::Shamir => Plan::Shamir {
                lambdas: shamir::lagrange_at(shamir::x_of(target), indices).ok_or_else(singular)?,
            },
        };
        Ok(c)
    }

    /// The share indices this combiner expects, in order.
    #[must_use]
    pub fn indices(&self) -> &[u8] {
        &self.indices
    }

    /// The scheme.
    #[must_use]
    pub fn scheme(&self) -> Scheme {
        self.scheme
    }

    /// Rebuilds one secret chunk. `shares[j]` must be the chunk of the share with index
    /// `self.indices()[j]`; `out.len()` must equal the chunk size.
    ///
    /// # Errors
    /// [`SharingError::ChunkLength`], [`SharingError::ShareCount`] or
    /// [`SharingError::ShareLength`].
    pub fn combine_chunk<S: AsRef<[u8]>>(
        &self,
        shares: &[S],
        out: &mut [u8],
    ) -> Result<(), SharingError> {
        if out.len() != self.chunk_size {
            return Err(SharingError::ChunkLength {
                expected: self.chunk_size,
                got: out.len(),
            });
        }
        check_shares(shares, self.indices.len(), self.chunk_size, |s| {
            s.as_ref().len()
        })?;
        match &self.plan {
            Plan::Xor {
                schedule,
                piece_len,
            } => schedule.apply(shares, out, *piece_len),
            Plan::Shamir { lambdas } => shamir::combine(lambdas, shares, out),
        }
        Ok(())
    }
}
