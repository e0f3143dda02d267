//! Fast paths for the Key container, the one format that carries bulk data.
//!
//! [`write_key_container`] writes the JSON straight into one buffer, base64-encoding each key
//! in place with the SIMD engine (no intermediate `String` per key, no `serde_json::Value`);
//! [`read_key_container`] parses a reply without copying key strings (they are borrowed from
//! the body) and decodes them with the SIMD engine into buffers that are wiped on drop.
//! Both produce and accept exactly the Key container format of clause 6.3.

use std::sync::OnceLock;

use base64::engine::general_purpose::PAD;
use base64::engine::simd::Simd;
use base64::Engine;
use secret_buf::SecretBuf;
use serde::Deserialize;
use uuid::Uuid;

/// The STANDARD alphabet with padding, SIMD-accelerated where the CPU allows.
pub fn engine() -> &'static Simd {
    static ENGINE: OnceLock<Simd> = OnceLock::new();
    ENGINE.get_or_init(|| Simd::standard(PAD))
}

/// Writes `{"keys":[{"key_ID":"…","key":"…"},…]}` for the given keys.
pub fn write_key_container<'a, I>(keys: I, out: &mut Vec<u8>)
where
    I: IntoIterator<Item = (Uuid, &'a [u8])>,
{
    let e = engine();
    out.extend_from_slice(b"{\"keys\":[");
    let mut first = true;
    for (id, bytes) in keys {
        if !first {
            out.push(b',');
        }
        first = false;
        out.extend_from_slice(b"{\"key_ID\":\"");
        let mut idbuf = [0u8; 36];
        out.extend_from_slice(id.hyphenated().encode_lower(&mut idbuf).as_bytes());
        out.extend_from_slice(b"\",\"key\":\"");
        let start = out.len();
        let len = bytes.len().div_ceil(3) * 4;
        out.resize(start + len, 0);
        // encode_slice cannot fail with an exactly sized output.
        let _ = e.encode_slice(bytes, &mut out[start..]);
        out.extend_from_slice(b"\"}");
    }
    out.extend_from_slice(b"]}");
}

#[derive(Deserialize)]
struct KeyRef<'a> {
    #[serde(borrow, rename = "key_ID")]
    key_id: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    key: std::borrow::Cow<'a, str>,
    #[serde(default, rename = "key_ID_extension")]
    _id_ext: Option<serde::de::IgnoredAny>,
    #[serde(default, rename = "key_extension")]
    _key_ext: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
struct ContainerRef<'a> {
    #[serde(borrow)]
    keys: Vec<KeyRef<'a>>,
    #[serde(default, rename = "key_container_extension")]
    _ext: Option<serde::de::IgnoredAny>,
}

/// Why a Key container could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    #[error("not a Key container: {0}")]
    Json(#[from] serde_json::Error),
    #[error("key_ID {0:?} is not a UUID")]
    KeyId(String),
    #[error("key {0} is not valid base64")]
    Base64(Uuid),
}

/// The keys of a container in order, their base64 text borrowed from the body: for callers
/// that decode each key straight into its final place ([`decode_key_into`]).
pub fn borrow_key_container(
    body: &[u8],
) -> Result<Vec<(Uuid, std::borrow::Cow<'_, str>)>, ContainerError> {
    let c: ContainerRef<'_> = serde_json::from_slice(body)?;
    c.keys
        .into_iter()
        .map(|k| {
            let id = Uuid::try_parse(&k.key_id)
                .map_err(|_| ContainerError::KeyId(k.key_id.to_string()))?;
            Ok((id, k.key))
        })
        .collect()
}

/// Bytes that the base64 text `b64` decodes to (if it is valid base64).
pub fn decoded_len(b64: &str) -> usize {
    let pad = b64.bytes().rev().take(2).filter(|&b| b == b'=').count();
    (b64.len() / 4 * 3).saturating_sub(pad)
}

/// Decodes key `id`'s base64 text into `out`, which must be exactly its decoded length.
pub fn decode_key_into(id: Uuid, b64: &str, out: &mut [u8]) -> Result<(), ContainerError> {
    if decoded_len(b64) != out.len() {
        return Err(ContainerError::Base64(id));
    }
    match engine().decode_slice(b64.as_bytes(), out) {
        Ok(n) if n == out.len() => Ok(()),
        _ => Err(ContainerError::Base64(id)),
    }
}

/// A key decoded from a container; the bytes are wiped when dropped.
pub type DecodedKey = (Uuid, SecretBuf);

/// Parses a Key container and decodes its keys.
pub fn read_key_container(body: &[u8]) -> Result<Vec<DecodedKey>, ContainerError> {
    borrow_key_container(body)?
        .into_iter()
        .map(|(id, b64)| {
            let mut buf = SecretBuf::zeroed(decoded_len(&b64));
            decode_key_into(id, &b64, &mut buf)?;
            Ok((id, buf))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::KeyContainer;

    #[test]
    fn written_containers_are_spec_containers_and_read_back() {
        let keys: Vec<(Uuid, Vec<u8>)> = (0..5u8)
            .map(|i| {
                (
                    Uuid::new_v4(),
                    (0..(i as usize * 7 + 1)).map(|b| b as u8 ^ i).collect(),
                )
            })
            .collect();
        let mut out = Vec::new();
        write_key_container(keys.iter().map(|(id, k)| (*id, &k[..])), &mut out);
        let generic: KeyContainer = serde_json::from_slice(&out).unwrap();
        for ((id, k), g) in keys.iter().zip(&generic.keys) {
            assert_eq!(g.key_ID, id.to_string());
            assert_eq!(&g.decode().unwrap()[..], &k[..]);
        }
        let fast = read_key_container(&out).unwrap();
        for ((id, k), (fid, fk)) in keys.iter().zip(&fast) {
            assert_eq!(id, fid);
            assert_eq!(&k[..], &fk[..]);
        }
        let borrowed = borrow_key_container(&out).unwrap();
        for ((id, k), (bid, b64)) in keys.iter().zip(&borrowed) {
            assert_eq!(id, bid);
            assert_eq!(decoded_len(b64), k.len());
            let mut into = vec![0u8; k.len()];
            decode_key_into(*bid, b64, &mut into).unwrap();
            assert_eq!(&into[..], &k[..]);
            // A destination of the wrong size is refused.
            assert!(decode_key_into(*bid, b64, &mut vec![0u8; k.len() + 1]).is_err());
        }
        assert!(read_key_container(br#"{"keys":[{"key_ID":"x","key":"AA=="}]}"#).is_err());
        assert!(read_key_container(
            br#"{"keys":[{"key_ID":"00000000-0000-0000-0000-000000000000","key":"!!"}]}"#
        )
        .is_err());
    }
}
