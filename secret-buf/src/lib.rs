//! `secret-buf`: [`SecretBuf`], the byte vector that holds key material (QKD key bytes, one-time
//! pads, MAC keys, secret shares) on both sides of the workspace, and wipes its whole
//! allocation when dropped.
//!
//! Owns nothing else, and depends on nothing of the workspace: the KME and the backup side
//! both use it.
//!
//! # Why not `zeroize::Zeroizing<Vec<u8>>`
//! `zeroize` 1.9 wipes a `Vec<u8>` element by element (its `Vec` impl zeroizes each `u8` with
//! a volatile write): about one byte per cycle. Profiles of a backup showed that loop at 5–8 %
//! of the client's and every KME's CPU, since every key byte is wiped at least once in each
//! process it crosses. A byte slice, and a `Vec`'s spare capacity, zeroize in bulk instead: a
//! `memset` followed by an optimisation barrier, so the compiler cannot drop the writes as
//! dead stores. [`SecretBuf`] wipes that way: it empties the vector (which writes nothing for
//! bytes), then zeroizes the whole allocation as spare capacity. Same guarantee as
//! `Zeroizing` (every byte of the allocation is overwritten before it is freed; like it, it
//! cannot reach copies left by an earlier reallocation), at memory speed.
//!
//! Dependency: `zeroize` (RustCrypto; its bulk path is the memset-plus-barrier above).
// No unsafe code outside the tests (which read the wiped spare capacity back).
#![cfg_attr(not(test), forbid(unsafe_code))]

use std::ops::{Deref, DerefMut};

use zeroize::Zeroize;

/// A `Vec<u8>` of key material, wiped (every byte of its allocation) on drop and on
/// [`Zeroize::zeroize`]. Derefs to the `Vec`, so it reads and grows like one.
#[derive(Default, Clone, PartialEq, Eq)]
pub struct SecretBuf(Vec<u8>);

impl SecretBuf {
    /// `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        SecretBuf(vec![0; len])
    }

    /// Empty, with room for `cap` bytes.
    pub fn with_capacity(cap: usize) -> Self {
        SecretBuf(Vec::with_capacity(cap))
    }
}

impl Zeroize for SecretBuf {
    fn zeroize(&mut self) {
        // `clear` writes nothing for bytes; then the whole allocation is spare capacity,
        // which zeroize wipes in bulk.
        self.0.clear();
        self.0.spare_capacity_mut().zeroize();
    }
}

impl Drop for SecretBuf {
    fn drop(&mut self) {
        self.zeroize();
    }
}

impl zeroize::ZeroizeOnDrop for SecretBuf {}

impl From<Vec<u8>> for SecretBuf {
    fn from(v: Vec<u8>) -> Self {
        SecretBuf(v)
    }
}

impl From<&[u8]> for SecretBuf {
    fn from(v: &[u8]) -> Self {
        SecretBuf(v.to_vec())
    }
}

/// Takes the vector out of a `Zeroizing` without copying it (the `Zeroizing` is left empty).
impl From<zeroize::Zeroizing<Vec<u8>>> for SecretBuf {
    fn from(mut z: zeroize::Zeroizing<Vec<u8>>) -> Self {
        SecretBuf(std::mem::take(&mut *z))
    }
}

impl Deref for SecretBuf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.0
    }
}

impl DerefMut for SecretBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.0
    }
}

impl AsRef<[u8]> for SecretBuf {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Never prints the bytes.
impl std::fmt::Debug for SecretBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretBuf({} bytes)", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zeroize_wipes_the_whole_allocation_and_empties_it() {
        let mut s = SecretBuf::with_capacity(64);
        s.extend_from_slice(&[0xA5; 40]);
        let cap = s.capacity();
        s.zeroize();
        assert!(s.is_empty());
        assert_eq!(s.capacity(), cap, "wiped in place, not reallocated");
        let spare = s.spare_capacity_mut();
        assert_eq!(spare.len(), cap);
        // SAFETY: `zeroize` initialised every byte of the spare capacity (with zeros); that
        // is what this test checks.
        assert!(spare.iter().all(|b| unsafe { b.assume_init() } == 0));
    }

    #[test]
    fn converts_from_zeroizing_without_copying_and_hides_the_bytes() {
        let z = zeroize::Zeroizing::new(vec![7u8; 10]);
        let ptr = z.as_ptr();
        let s = SecretBuf::from(z);
        assert_eq!(s.as_ptr(), ptr);
        assert_eq!(&s[..], &[7u8; 10]);
        assert_eq!(format!("{s:?}"), "SecretBuf(10 bytes)");
    }
}
