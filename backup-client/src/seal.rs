//! Sealing and opening of chunk frames: one-time pad, then Wegman–Carter tag
//! (encrypt-then-MAC), each with the chunk's own fresh keys.

use crate::auth::{AuthError, Mac, KEY_LEN};
use crate::keys::ChunkKeys;
use crate::otp;
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
    #[error("chunk {chunk}: MAC key has {0} bytes", .have)]
    MacKey { chunk: u64, have: usize },
    #[error("chunk {chunk}: payload of {got} bytes, {expected} expected")]
    Length {
        chunk: u64,
        got: usize,
        expected: usize,
    },
    #[error("chunk {chunk}: a one-time pad is required for a transfer between sites")]
    PadRequired { chunk: u64 },
}

fn mac(keys: &ChunkKeys, chunk: u64) -> Result<Mac, SealError> {
    if keys.mac.len() < KEY_LEN {
        return Err(SealError::MacKey {
            chunk,
            have: keys.mac.len(),
        });
    }
    Mac::new(&keys.mac[..KEY_LEN]).map_err(|source| SealError::Auth { chunk, source })
}

/// Appends a sealed frame of `share` to `out`. `header.len` must equal `share.len()`;
/// `header.otp_key_ids`/`mac_key_id` must name `keys`.
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
    let mut m = mac(keys, chunk)?;
    let (h_start, p_start) = begin_frame(out, header);
    out.extend_from_slice(share);
    if !header.otp_key_ids.is_empty() {
        if keys.otp.len() < share.len() {
            out.truncate(h_start - 8);
            return Err(SealError::ShortPad {
                chunk,
                have: keys.otp.len(),
                need: share.len(),
            });
        }
        otp::apply(&mut out[p_start..], &keys.otp[..share.len()]).map_err(|_| {
            SealError::ShortPad {
                chunk,
                have: keys.otp.len(),
                need: share.len(),
            }
        })?;
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
    let padded = !frame.header.otp_key_ids.is_empty();
    if require_pad && !padded {
        return Err(SealError::PadRequired { chunk });
    }
    let mut m = mac(keys, chunk)?;
    m.update(ctx);
    m.update(frame.header_bytes);
    m.update(frame.payload);
    m.verify(frame.tag)
        .map_err(|source| SealError::Auth { chunk, source })?;
    if padded {
        if keys.otp.len() < out.len() {
            return Err(SealError::ShortPad {
                chunk,
                have: keys.otp.len(),
                need: out.len(),
            });
        }
        otp::apply_into(out, frame.payload, &keys.otp[..out.len()]).map_err(|_| {
            SealError::ShortPad {
                chunk,
                have: keys.otp.len(),
                need: out.len(),
            }
        })?;
    } else {
        out.copy_from_slice(frame.payload);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::parse_frame;
    use uuid::Uuid;
    use zeroize::Zeroizing;

    fn keys(len: usize) -> ChunkKeys {
        ChunkKeys {
            otp_ids: vec![Uuid::new_v4()],
            otp: Zeroizing::new((0..len).map(|i| (i * 7 + 3) as u8).collect()),
            mac_id: Uuid::new_v4(),
            mac: Zeroizing::new((1..=32).collect()),
        }
    }

    #[test]
    fn sealed_frames_open_and_any_flip_is_rejected() {
        let share: Vec<u8> = (0..100u8).collect();
        let k = keys(100);
        let h = FrameHeader {
            chunk: 1,
            nonce: 2,
            otp_key_ids: k.otp_ids.clone(),
            mac_key_id: k.mac_id,
            len: 100,
            error: None,
        };
        let mut buf = Vec::new();
        seal_into(&mut buf, b"ctx", &h, &share, &k).unwrap();
        let (f, _) = parse_frame(&buf, 1000).unwrap().unwrap();
        assert_ne!(f.payload, &share[..], "padded on the wire");
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
