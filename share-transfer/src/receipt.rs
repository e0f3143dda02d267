//! Download receipts: how a restoring client shows a site agent that it fetched the keys the
//! agent issued to it, so that the agent can bound the keys issued but never fetched (a
//! reader that starts downloads and drops them would otherwise drain the site's QKD link).
//!
//! A chunk's receipt is a BLAKE3 keyed hash, under the chunk's MAC key, of
//! [`RECEIPT_CONTEXT`] ‖ backup ‖ share ‖ chunk, cut to [`RECEIPT_LEN`] bytes. Only the
//! agent (which took the keys as master) and the client (which fetched them as slave) hold
//! the MAC key, so a receipt cannot be made without fetching the keys. It is sent only after
//! the frame's tag verified, and a Wegman–Carter key is used once, so revealing a hash of
//! it gives nothing away.

use uuid::Uuid;

use crate::keys::ChunkKeys;

/// Bytes of a receipt.
pub const RECEIPT_LEN: usize = 16;

/// Domain of the receipt hash.
pub const RECEIPT_CONTEXT: &[u8; 24] = b"qkd-backup receipt v1\0\0\0";

/// The receipt of chunk `chunk` of share `share` of `backup`, sent with `keys` (whose pad,
/// if any, is `pad_len` bytes); `None` if the material holds no MAC key.
pub fn receipt(
    keys: &ChunkKeys,
    pad_len: usize,
    backup: Uuid,
    share: u8,
    chunk: u64,
) -> Option<[u8; RECEIPT_LEN]> {
    let mac: &[u8; 32] = keys.mac(pad_len)?.try_into().ok()?;
    let mut h = blake3::Hasher::new_keyed(mac);
    h.update(RECEIPT_CONTEXT);
    h.update(backup.as_bytes());
    h.update(&[share]);
    h.update(&chunk.to_le_bytes());
    let mut out = [0u8; RECEIPT_LEN];
    out.copy_from_slice(&h.finalize().as_bytes()[..RECEIPT_LEN]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use secret_buf::SecretBuf;

    fn keys(byte: u8) -> ChunkKeys {
        ChunkKeys {
            ids: vec![Uuid::nil()],
            material: SecretBuf::from(vec![byte; 64 + 32]),
        }
    }

    #[test]
    fn a_receipt_depends_on_the_mac_key_and_on_what_it_acknowledges() {
        let id = Uuid::from_u128(7);
        let r = receipt(&keys(1), 64, id, 0, 3).unwrap();
        assert_eq!(r, receipt(&keys(1), 64, id, 0, 3).unwrap());
        assert_ne!(r, receipt(&keys(2), 64, id, 0, 3).unwrap());
        assert_ne!(r, receipt(&keys(1), 64, id, 1, 3).unwrap());
        assert_ne!(r, receipt(&keys(1), 64, id, 0, 4).unwrap());
        assert_ne!(r, receipt(&keys(1), 64, Uuid::from_u128(8), 0, 3).unwrap());
        assert!(
            receipt(&keys(1), 80, id, 0, 3).is_none(),
            "no MAC key after the pad"
        );
    }
}
