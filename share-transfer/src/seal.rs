//! Sealing and opening of chunk frames: one-time pad, then Wegman–Carter tag
//! (encrypt-then-MAC), each with the chunk's own fresh keys.
//!
//! The pad is applied by [`crate::otp::apply_into`] and the tag computed by
//! [`crate::auth::Mac`]: the same functions the tests and benches exercise.

use crate::auth::{AuthError, Mac, KEY_LEN};
use crate::keys::ChunkKeys;
use crate::otp::{self, OtpError};
use crate::wire::{begin_frame, Frame, FrameHeader};

/// Why a frame could not be sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("chunk {chunk}: authentication failed (altered in transit or wrong keys)")]
    Auth { chunk: u64, source: AuthError },
    #[error("chunk {chunk}: one-time-pad key material covers {have} bytes, {need} needed")]
    ShortPad {
        chunk: u64,
        have: usize,
        need: usize,
    },
    #[error("chunk {chunk}: key material of {have} bytes holds no MAC key")]
    MacKey { chunk: u64, have: usize },
    #[error("chunk {chunk}: payload of {got} bytes, {expected} expected")]
    Length {
        chunk: u64,
        got: usize,
        expected: usize,
    },
    #[error("chunk {chunk}: a one-time pad is required for a transfer between sites")]
    PadRequired { chunk: u64 },
    #[error("chunk {chunk}: {source}")]
    Pad { chunk: u64, source: OtpError },
}

fn mac(keys: &ChunkKeys, pad_len: usize, chunk: u64) -> Result<Mac, SealError> {
    let key = keys.mac(pad_len).ok_or(SealError::MacKey {
        chunk,
        have: keys.material.len(),
    })?;
    Mac::new(key).map_err(|source| SealError::Auth { chunk, source })
}

fn pad(keys: &ChunkKeys, len: usize, chunk: u64) -> Result<&[u8], SealError> {
    keys.pad(len).ok_or(SealError::ShortPad {
        chunk,
        have: keys.material.len(),
        need: len + KEY_LEN,
    })
}

/// Appends a sealed frame of `share` to `out`. `header.len` must equal `share.len()` and
/// `header.key_ids` must name `keys`.
pub fn seal_into(
    out: &mut Vec<u8>,
    ctx: &[u8],
    header: &FrameHeader,
    share: &[u8],
    keys: &ChunkKeys,
) -> Result<(), SealError> {
    let chunk = header.chunk;
    if header.len as usize != share.len() {
        return Err(SealError::Length {
            chunk,
            got: share.len(),
            expected: header.len as usize,
        });
    }
    let pad_len = if header.pad { share.len() } else { 0 };
    let mut m = mac(keys, pad_len, chunk)?;
    let p = if header.pad {
        Some(pad(keys, share.len(), chunk)?)
    } else {
        None
    };
    let (h_start, p_start) = begin_frame(out, header);
    match p {
        Some(p) => {
            out.resize(p_start + share.len(), 0);
            otp::apply_into(&mut out[p_start..], share, p)
                .map_err(|source| SealError::Pad { chunk, source })?;
        }
        None => out.extend_from_slice(share),
    }
    m.update(ctx);
    m.update(&out[h_start..p_start]);
    m.update(&out[p_start..]);
    out.extend_from_slice(&m.finalize().0);
    Ok(())
}

/// Verifies `frame` and writes its plaintext into `out` (`out.len()` = payload length).
/// Nothing is written to `out` unless the tag verifies. With `require_pad`, a frame without
/// one-time pad is refused.
pub fn open_into(
    frame: &Frame<'_>,
    ctx: &[u8],
    keys: &ChunkKeys,
    require_pad: bool,
    out: &mut [u8],
) -> Result<(), SealError> {
    let chunk = frame.header.chunk;
    if out.len() != frame.payload.len() {
        return Err(SealError::Length {
            chunk,
            got: frame.payload.len(),
            expected: out.len(),
        });
    }
    if require_pad && !frame.header.pad {
        return Err(SealError::PadRequired { chunk });
    }
    let pad_len = if frame.header.pad { out.len() } else { 0 };
    let mut m = mac(keys, pad_len, chunk)?;
    m.update(ctx);
    m.update(frame.header_bytes);
    m.update(frame.payload);
    m.verify(frame.tag)
        .map_err(|source| SealError::Auth { chunk, source })?;
    if frame.header.pad {
        let p = pad(keys, out.len(), chunk)?;
        otp::apply_into(out, frame.payload, p)
            .map_err(|source| SealError::Pad { chunk, source })?;
    } else {
        out.copy_from_slice(frame.payload);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::parse_frame;
    use secret_buf::SecretBuf;
    use uuid::Uuid;

    fn keys(len: usize) -> ChunkKeys {
        ChunkKeys {
            ids: vec![Uuid::new_v4()],
            material: SecretBuf::from(
                (0..len + 32)
                    .map(|i| (i * 7 + 3) as u8)
                    .collect::<Vec<u8>>(),
            ),
        }
    }

    #[test]
    fn sealed_frames_open_and_any_flip_is_rejected() {
        let share: Vec<u8> = (0..100u8).collect();
        let k = keys(100);
        let h = FrameHeader {
            chunk: 1,
            nonce: 2,
            key_ids: k.ids.clone(),
            pad: true,
            len: 100,
            error: None,
        };
        let mut buf = Vec::new();
        seal_into(&mut buf, b"ctx", &h, &share, &k).unwrap();
        let (f, _) = parse_frame(&buf, 1000).unwrap().unwrap();
        assert_ne!(f.payload, &share[..], "padded on the wire");
        let mut padded = vec![0; 100];
        crate::otp::apply_into(&mut padded, &share, &k.material[..100]).unwrap();
        assert_eq!(
            f.payload,
            &padded[..],
            "the pad is otp's, from the key's first bytes"
        );
        let mut out = vec![0; 100];
        open_into(&f, b"ctx", &k, true, &mut out).unwrap();
        assert_eq!(out, share);
        assert!(
            open_into(&f, b"other", &k, true, &mut out).is_err(),
            "context bound"
        );
        let hdr_end = buf.len() - 16 - 100;
        for i in [8, hdr_end - 2, hdr_end + 5, buf.len() - 1] {
            let mut bad = buf.clone();
            bad[i] ^= 1;
            if let Ok(Some((f, _))) = parse_frame(&bad, 1000) {
                let mut out = vec![0; f.payload.len()];
                assert!(
                    open_into(&f, b"ctx", &k, true, &mut out).is_err(),
                    "flip at {i}"
                );
            }
        }
    }
}
