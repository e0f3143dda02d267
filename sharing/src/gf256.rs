//! Arithmetic in GF(2^8) and the region kernels used by the Shamir scheme.
//!
//! Field: GF(2)\[x\] / (x^8 + x^4 + x^3 + x + 1), i.e. the AES polynomial `0x11B`. Addition is
//! XOR. The choice is part of the share format (see [`crate::format`]); it also keeps the
//! door open for the x86 `GF2P8MULB` instruction, which is hard-wired to this polynomial.
//!
//! Region multiply (`dst = c·src` or `dst ^= c·src` for a constant `c`) uses the split-nibble
//! table technique of Intel ISA-L / GF-Complete: because multiplication by `c` is GF(2)-linear,
//! `c·b = c·(b & 0x0F) ⊕ c·(b & 0xF0)`, so two 16-entry tables (`lo[v] = c·v`,
//! `hi[v] = c·(v<<4)`) and two byte shuffles (`pshufb`) multiply 16 or 32 bytes at once.
//!
//! Invariant: every kernel ([`Kernel::Scalar`], [`Kernel::Ssse3`], [`Kernel::Avx2`]) computes
//! exactly the same bytes; the SIMD kernels are selected at run time with
//! `is_x86_feature_detected!` and are tested against the scalar one for all 256 constants.
//! `unsafe` code in this crate lives only in this module's SIMD kernels.

/// The reduction polynomial, without the x^8 term (x^4 + x^3 + x + 1).
const POLY_LOW: u8 = 0x1B;

/// Multiplies two field elements (bitwise "Russian peasant" method; constant time in the data).
#[must_use]
pub const fn mul(a: u8, b: u8) -> u8 {
    let mut a = a;
    let mut b = b;
    let mut acc = 0u8;
    let mut i = 0;
    while i < 8 {
        acc ^= a & 0u8.wrapping_sub(b & 1);
        let carry = 0u8.wrapping_sub(a >> 7);
        a = (a << 1) ^ (POLY_LOW & carry);
        b >>= 1;
        i += 1;
    }
    acc
}

/// Raises `a` to the power `e`.
#[must_use]
pub const fn pow(a: u8, mut e: u32) -> u8 {
    let mut base = a;
    let mut acc = 1u8;
    while e > 0 {
        if e & 1 == 1 {
            acc = mul(acc, base);
        }
        base = mul(base, base);
        e >>= 1;
    }
    acc
}

/// Multiplicative inverse; `None` for 0 (which has none).
#[must_use]
pub const fn inv(a: u8) -> Option<u8> {
    if a == 0 {
        None
    } else {
        // a^(2^8 - 2) = a^-1 in GF(2^8)*.
        Some(pow(a, 254))
    }
}

/// Split-nibble multiplication tables for one constant `c`.
///
/// Invariant: `lo[v] == mul(c, v)` and `hi[v] == mul(c, v << 4)` for `v < 16`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NibbleTables {
    /// Products with the low nibble.
    pub lo: [u8; 16],
    /// Products with the high nibble.
    pub hi: [u8; 16],
}

impl NibbleTables {
    /// Builds the tables for multiplication by `c`.
    #[must_use]
    pub const fn new(c: u8) -> Self {
        let mut lo = [0u8; 16];
        let mut hi = [0u8; 16];
        let mut v = 0;
        while v < 16 {
            lo[v] = mul(c, v as u8);
            hi[v] = mul(c, (v as u8) << 4);
            v += 1;
        }
        Self { lo, hi }
    }

    #[inline(always)]
    fn apply(&self, b: u8) -> u8 {
        self.lo[usize::from(b & 0x0F)] ^ self.hi[usize::from(b >> 4)]
    }
}

/// Which implementation of the region kernels to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Portable table look-ups, one byte at a time.
    Scalar,
    /// 16 bytes per step with `pshufb` (x86 SSSE3).
    Ssse3,
    /// 32 bytes per step with `vpshufb` (x86 AVX2).
    Avx2,
}

impl Kernel {
    /// The fastest kernel this CPU supports (detected at run time, cached by std).
    #[must_use]
    pub fn detect() -> Self {
        #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
        {
            if std::is_x86_feature_detected!("avx2") {
                return Kernel::Avx2;
            }
            if std::is_x86_feature_detected!("ssse3") {
                return Kernel::Ssse3;
            }
        }
        Kernel::Scalar
    }

    /// Whether this kernel can run on the current CPU.
    #[must_use]
    pub fn is_available(self) -> bool {
        match self {
            Kernel::Scalar => true,
            #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
            Kernel::Ssse3 => std::is_x86_feature_detected!("ssse3"),
            #[cfg(any(target_arch = "x86_64", target_arch = "x86"))]
            Kernel::Avx2 => std::is_x86_feature_detected!("avx2"),
            #[cfg(not(any(target_arch = "x86_64", target_arch = "x86")))]
            _ => false,
        }
    }
}

/// `dst = c · src` (or `dst ^= c · src` when `accumulate`), with the best available kernel.
///
/// # Panics
/// If `dst.len() != src.len()` (a programming error, never caused by input data).
pub fn mul_region(dst: &mut [u8], src: &[u8], c: u8, accumulate: bool) {
    assert_eq!(dst.len(), src.len(), "region lengths differ");
    // Cheap special cases keep the x = 1 share and λ = 1 terms on plain XOR/copy.
    match (c, accumulate) {
        (0, true) => {}
        (0, false) => dst.fill(0),
        (1, false) => dst.copy_from_slice(src),
        (1, true) => crate::xor::xor_assign(dst, src),
        _ => mul_region_with(Kernel::detect(), dst, src, c, accumulate),
    }
}

/// Like [`mul_region`] but with an explicit kernel and no special cases; an unavailable
/// kernel falls back to [`Kernel::Scalar`] (so this function is always safe to call).
///
/// # Panics
/// If `dst.len() != src.len()`.
pub fn mul_region_with(kernel: Kernel, dst: &mut [u8], src: &[u8], c: u8, accumulate: bool) {
    assert_eq!(dst.len(), src.len(), "region lengths differ");
    let tables = NibbleTables::new(c);
    let done = match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 if std::is_x86_feature_detected!("avx2") => {
            // SAFETY: AVX2 support was just checked at run time; lengths are equal.
            unsafe { x86::mul_avx2(dst, src, &tables, accumulate) }
        }
        #[cfg(target_arch = "x86_64")]
        Kernel::Ssse3 if std::is_x86_feature_detected!("ssse3") => {
            // SAFETY: SSSE3 support was just checked at run time; lengths are equal.
            unsafe { x86::mul_ssse3(dst, src, &tables, accumulate) }
        }
        _ => 0,
    };
    mul_scalar(&mut dst[done..], &src[done..], &tables, accumulate);
}

/// Scalar kernel (also handles the tails of the SIMD kernels).
fn mul_scalar(dst: &mut [u8], src: &[u8], t: &NibbleTables, accumulate: bool) {
    if accumulate {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d ^= t.apply(s);
        }
    } else {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = t.apply(s);
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::NibbleTables;
    use std::arch::x86_64::*;

    /// AVX2 region multiply; returns how many leading bytes it processed (a multiple of 32).
    ///
    /// # Safety
    /// The caller must ensure the CPU supports AVX2, and `dst.len() == src.len()`.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn mul_avx2(
        dst: &mut [u8],
        src: &[u8],
        t: &NibbleTables,
        accumulate: bool,
    ) -> usize {
        let len = dst.len().min(src.len());
        let blocks = len / 32;
        let dp = dst.as_mut_ptr();
        let sp = src.as_ptr();
        // SAFETY (whole block): the tables are 16-byte arrays read with unaligned loads; every
        // pointer offset `i * 32 .. i * 32 + 32` stays below `blocks * 32 <= len`, which is
        // within both `dst` and `src`; `dst` and `src` cannot overlap (`&mut` vs `&`).
        unsafe {
            let lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(t.lo.as_ptr().cast()));
            let hi = _mm256_broadcastsi128_si256(_mm_loadu_si128(t.hi.as_ptr().cast()));
            let mask = _mm256_set1_epi8(0x0F);
            for i in 0..blocks {
                let s = _mm256_loadu_si256(sp.add(i * 32).cast());
                let l = _mm256_and_si256(s, mask);
                let h = _mm256_and_si256(_mm256_srli_epi64(s, 4), mask);
                let mut p =
                    _mm256_xor_si256(_mm256_shuffle_epi8(lo, l), _mm256_shuffle_epi8(hi, h));
                if accumulate {
                    p = _mm256_xor_si256(p, _mm256_loadu_si256(dp.add(i * 32).cast()));
                }
                _mm256_storeu_si256(dp.add(i * 32).cast(), p);
            }
        }
        blocks * 32
    }

    /// SSSE3 region multiply; returns how many leading bytes it processed (a multiple of 16).
    ///
    /// # Safety
    /// The caller must ensure the CPU supports SSSE3, and `dst.len() == src.len()`.
    #[target_feature(enable = "ssse3")]
    pub(super) unsafe fn mul_ssse3(
        dst: &mut [u8],
        src: &[u8],
        t: &NibbleTables,
        accumulate: bool,
    ) -> usize {
        let len = dst.len().min(src.len());
        let blocks = len / 16;
        let dp = dst.as_mut_ptr();
        let sp = src.as_ptr();
        // SAFETY (whole block): as in `mul_avx2`, with 16-byte steps; all offsets stay below
        // `blocks * 16 <= len`.
        unsafe {
            let lo = _mm_loadu_si128(t.lo.as_ptr().cast());
            let hi = _mm_loadu_si128(t.hi.as_ptr().cast());
            let mask = _mm_set1_epi8(0x0F);
            for i in 0..blocks {
                let s = _mm_loadu_si128(sp.add(i * 16).cast());
                let l = _mm_and_si128(s, mask);
                let h = _mm_and_si128(_mm_srli_epi64(s, 4), mask);
                let mut p = _mm_xor_si128(_mm_shuffle_epi8(lo, l), _mm_shuffle_epi8(hi, h));
                if accumulate {
                    p = _mm_xor_si128(p, _mm_loadu_si128(dp.add(i * 16).cast()));
                }
                _mm_storeu_si128(dp.add(i * 16).cast(), p);
            }
        }
        blocks * 16
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_axioms_small() {
        // Known AES-field product: 0x57 · 0x83 = 0xC1 (FIPS-197 §4.2).
        assert_eq!(mul(0x57, 0x83), 0xC1);
        assert_eq!(mul(0x57, 0x13), 0xFE);
        for a in 1..=255u8 {
            let ai = inv(a).expect("non-zero has an inverse");
            assert_eq!(mul(a, ai), 1, "a = {a}");
        }
        assert_eq!(inv(0), None);
    }

    #[test]
    fn tables_match_mul() {
        for c in 0..=255u8 {
            let t = NibbleTables::new(c);
            for b in 0..=255u8 {
                assert_eq!(t.apply(b), mul(c, b));
            }
        }
    }

    fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect()
    }

    #[test]
    fn simd_kernels_equal_scalar_for_all_constants() {
        // Odd length exercises the tail path of both SIMD kernels.
        let src = pseudo_random(1000 + 37, 7);
        let base = pseudo_random(src.len(), 9);
        for kernel in [Kernel::Ssse3, Kernel::Avx2] {
            if !kernel.is_available() {
                eprintln!("{kernel:?} not available on this CPU; skipped");
                continue;
            }
            for c in 0..=255u8 {
                for accumulate in [false, true] {
                    let mut want = base.clone();
                    mul_region_with(Kernel::Scalar, &mut want, &src, c, accumulate);
                    let mut got = base.clone();
                    mul_region_with(kernel, &mut got, &src, c, accumulate);
                    assert_eq!(got, want, "{kernel:?} c={c} acc={accumulate}");
                    // And the scalar kernel against the reference multiply.
                    for (i, (&w, &s)) in want.iter().zip(&src).enumerate() {
                        let r = if accumulate {
                            base[i] ^ mul(c, s)
                        } else {
                            mul(c, s)
                        };
                        assert_eq!(w, r);
                    }
                }
            }
        }
    }
}
