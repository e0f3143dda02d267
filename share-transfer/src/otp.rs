//! One-time pad: XOR data with an equally long key, in place.
//!
//! Secrecy is information-theoretic only if every key byte is uniformly random, secret and
//! **never used again** (for data, a MAC, or anything else). The loops are plain XORs over
//! 64-byte lanes that LLVM auto-vectorises (see [`sharing::xor`]).

use thiserror::Error;
use zeroize::Zeroize;

use sharing::xor;

/// One-time-pad errors.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum OtpError {
    /// Data and key lengths differ.
    #[error("one-time pad key has {key} bytes but data has {data}")]
    LengthMismatch {
        /// Data length.
        data: usize,
        /// Key length.
        key: usize,
    },
}

/// `data ^= key`; encryption and decryption are the same operation.
///
/// # Errors
/// [`OtpError::LengthMismatch`] if the lengths differ (nothing is modified then).
pub fn apply(data: &mut [u8], key: &[u8]) -> Result<(), OtpError> {
    if data.len() != key.len() {
        return Err(OtpError::LengthMismatch {
            data: data.len(),
            key: key.len(),
        });
    }
    xor::xor_assign(data, key);
    Ok(())
}

/// Like [`apply`], then wipes `key` so it cannot be reused by accident.
///
/// # Errors
/// [`OtpError::LengthMismatch`] if the lengths differ (neither buffer is modified then).
pub fn apply_and_wipe(data: &mut [u8], key: &mut [u8]) -> Result<(), OtpError> {
    apply(data, key)?;
    key.zeroize();
    Ok(())
}

/// `out = data ^ key` without modifying the inputs.
///
/// # Errors
/// [`OtpError::LengthMismatch`] if any length differs.
pub fn apply_into(out: &mut [u8], data: &[u8], key: &[u8]) -> Result<(), OtpError> {
    if data.len() != key.len() || out.len() != data.len() {
        return Err(OtpError::LengthMismatch {
            data: data.len(),
            key: key.len(),
        });
    }
    xor::xor_into(out, data, key);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_mismatch() {
        let plain: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        let key: Vec<u8> = (0..1000u32).map(|i| (i * 13 + 5) as u8).collect();
        let mut c = plain.clone();
        apply(&mut c, &key).expect("same length");
        assert_ne!(c, plain);
        let mut out = vec![0; 1000];
        apply_into(&mut out, &c, &key).expect("same length");
        assert_eq!(out, plain);
        let mut k2 = key.clone();
        apply_and_wipe(&mut c, &mut k2).expect("same length");
        assert_eq!(c, plain);
        assert!(k2.iter().all(|&b| b == 0));
        assert_eq!(
            apply(&mut c, &key[..999]),
            Err(OtpError::LengthMismatch {
                data: 1000,
                key: 999
            })
        );
    }
}
