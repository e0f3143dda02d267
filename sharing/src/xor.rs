//! Byte-region XOR kernels shared by the XOR scheme, the one-time pad and Shamir.
//!
//! Written as plain safe loops over `chunks_exact(LANE)` so that LLVM auto-vectorises them
//! (SSE2 on the baseline x86-64 target, wider where the build enables it). All functions
//! require equal region lengths; a mismatch is a programming error and panics.

/// Bytes processed per unrolled step; a multiple of every x86 vector width.
const LANE: usize = 64;

/// `dst ^= a`.
///
/// # Panics
/// If the lengths differ.
#[inline]
pub fn xor_assign(dst: &mut [u8], a: &[u8]) {
    assert_eq!(dst.len(), a.len(), "xor_assign: lengths differ");
    let mut d = dst.chunks_exact_mut(LANE);
    let mut s = a.chunks_exact(LANE);
    for (d, s) in (&mut d).zip(&mut s) {
        for i in 0..LANE {
            d[i] ^= s[i];
        }
    }
    for (d, s) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *d ^= *s;
    }
}

/// `dst ^= a ^ b`.
///
/// # Panics
/// If the lengths differ.
#[inline]
pub fn xor_assign2(dst: &mut [u8], a: &[u8], b: &[u8]) {
    assert!(
        dst.len() == a.len() && a.len() == b.len(),
        "xor_assign2: lengths differ"
    );
    let mut d = dst.chunks_exact_mut(LANE);
    let mut sa = a.chunks_exact(LANE);
    let mut sb = b.chunks_exact(LANE);
    for ((d, a), b) in (&mut d).zip(&mut sa).zip(&mut sb) {
        for i in 0..LANE {
            d[i] ^= a[i] ^ b[i];
        }
    }
    for ((d, a), b) in d
        .into_remainder()
        .iter_mut()
        .zip(sa.remainder())
        .zip(sb.remainder())
    {
        *d ^= *a ^ *b;
    }
}

/// `dst = a ^ b`.
///
/// # Panics
/// If the lengths differ.
#[inline]
pub fn xor_into(dst: &mut [u8], a: &[u8], b: &[u8]) {
    assert!(
        dst.len() == a.len() && a.len() == b.len(),
        "xor_into: lengths differ"
    );
    let mut d = dst.chunks_exact_mut(LANE);
    let mut sa = a.chunks_exact(LANE);
    let mut sb = b.chunks_exact(LANE);
    for ((d, a), b) in (&mut d).zip(&mut sa).zip(&mut sb) {
        for i in 0..LANE {
            d[i] = a[i] ^ b[i];
        }
    }
    for ((d, a), b) in d
        .into_remainder()
        .iter_mut()
        .zip(sa.remainder())
        .zip(sb.remainder())
    {
        *d = *a ^ *b;
    }
}

/// `dst = a ^ b ^ c`.
///
/// # Panics
/// If the lengths differ.
#[inline]
pub fn xor3_into(dst: &mut [u8], a: &[u8], b: &[u8], c: &[u8]) {
    assert!(
        dst.len() == a.len() && a.len() == b.len() && b.len() == c.len(),
        "xor3_into: lengths differ"
    );
    let mut d = dst.chunks_exact_mut(LANE);
    let mut sa = a.chunks_exact(LANE);
    let mut sb = b.chunks_exact(LANE);
    let mut sc = c.chunks_exact(LANE);
    for (((d, a), b), c) in (&mut d).zip(&mut sa).zip(&mut sb).zip(&mut sc) {
        for i in 0..LANE {
            d[i] = a[i] ^ b[i] ^ c[i];
        }
    }
    for (((d, a), b), c) in d
        .into_remainder()
        .iter_mut()
        .zip(sa.remainder())
        .zip(sb.remainder())
        .zip(sc.remainder())
    {
        *d = *a ^ *b ^ *c;
    }
}

/// `dst = XOR of all srcs` (zero when `srcs` is empty), reading each source once.
///
/// # Panics
/// If any source length differs from `dst.len()`.
pub fn xor_many(dst: &mut [u8], srcs: &[&[u8]]) {
    let rest = match srcs {
        [] => {
            dst.fill(0);
            return;
        }
        [a] => {
            dst.copy_from_slice(a);
            return;
        }
        [a, b] => {
            xor_into(dst, a, b);
            return;
        }
        [a, b, c, rest @ ..] => {
            xor3_into(dst, a, b, c);
            rest
        }
    };
    xor_many_assign(dst, rest);
}

/// `dst ^= XOR of all srcs`, two sources per pass.
///
/// # Panics
/// If any source length differs from `dst.len()`.
pub fn xor_many_assign(dst: &mut [u8], srcs: &[&[u8]]) {
    let mut pairs = srcs.chunks_exact(2);
    for p in &mut pairs {
        xor_assign2(dst, p[0], p[1]);
    }
    if let [last] = pairs.remainder() {
        xor_assign(dst, last);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xor_many_matches_naive() {
        for count in 0..9usize {
            for len in [0usize, 1, 63, 64, 65, 200] {
                let srcs: Vec<Vec<u8>> = (0..count)
                    .map(|s| (0..len).map(|i| (i * 31 + s * 7 + 3) as u8).collect())
                    .collect();
                let refs: Vec<&[u8]> = srcs.iter().map(Vec::as_slice).collect();
                let mut want = vec![0u8; len];
                for s in &srcs {
                    for (w, b) in want.iter_mut().zip(s) {
                        *w ^= b;
                    }
                }
                let mut got = vec![0xAAu8; len];
                xor_many(&mut got, &refs);
                assert_eq!(got, want, "count={count} len={len}");
            }
        }
    }
}
