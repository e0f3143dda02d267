//! A vendor KME that exposes ETSI GS QKD 014 (kind `upstream-014`).
//!
//! Our KME is an SAE of the vendor's KME at each end (mutual TLS with its own certificate,
//! trusting the vendor's CA). The producing end asks its vendor KME for keys with the far
//! end's SAE ID as slave (Get key, `POST enc_keys`); a block is the concatenation of the keys
//! and its reference is `<key size in bits>:<key ID>,<key ID>,...` (the IDs as lower-case
//! hyphenated UUIDs, in block order). The far end asks its own vendor KME for exactly those
//! IDs with the producer's SAE ID as master (Get key with key IDs, `POST dec_keys`).
//!
//! Vendor replies map to the link's outcomes: 503 from `enc_keys` (the vendor's pool is
//! empty) is "nothing right now"; 400 from `dec_keys` (unknown or already retrieved key IDs)
//! is [`SourceError::Gone`], so the producer discards the block; anything else is
//! [`SourceError::Failed`] with the vendor's message. Note that a 400 caused by a
//! misconfiguration at the far end (e.g. a wrong `peer_sae_id`) also reads as `Gone`: the
//! link then keeps discarding blocks, which loses key but never uses any twice.
//!
//! [`KeySource::release`] does nothing: a 014 KME erases a key when it delivers it (the
//! master's KME on `enc_keys`, the slave's on `dec_keys`), so once a block is in our hands the
//! vendor holds no copy we could erase, and it will never hand the same keys out again (a
//! repeated `dec_keys` is refused with 400, i.e. `Gone`). A crash between obtaining keys and
//! storing them can only lose them.
//!
//! Configure `keys_per_request` no larger than the vendor's `max_key_per_request` at both
//! ends, and `key_size` within its key sizes. Key bytes live only in wiped buffers.

use std::collections::HashMap;
use std::path::Path;

use etsi_spec::{Client, ClientError, Identity, KeyIds, KeyRequest};
use secret_buf::SecretBuf;
use uuid::Uuid;

use super::{BlockRef, KeySource, Produced, SourceError};

pub const KIND: &str = "upstream-014";

/// The vendor KME at one end of a link.
pub struct Upstream014 {
    client: Client,
    url: String,
    peer_sae_id: String,
    /// Bits.
    key_size: u64,
    key_bytes: usize,
    keys_per_request: u64,
}

/// An error with its causes (reqwest hides the TLS reason in the source chain).
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let m = c.to_string();
        if !text.contains(&m) {
            text.push_str(": ");
            text.push_str(&m);
        }
        cause = c.source();
    }
    text
}

fn status_of(e: &ClientError) -> Option<u16> {
    e.status().map(|s| s.as_u16())
}

impl Upstream014 {
    /// A client of the vendor KME at `url` as the SAE whose certificate and key are given.
    pub fn new(
        url: &str,
        ca: &Path,
        cert: &Path,
        key: &Path,
        peer_sae_id: &str,
        key_size: u64,
        keys_per_request: u64,
    ) -> Result<Self, SourceError> {
        let fail = |m: String| SourceError::Failed(format!("{KIND} source: {m}"));
        if key_size == 0 || !key_size.is_multiple_of(8) {
            return Err(fail(format!(
                "key_size must be a positive multiple of 8 bits, got {key_size}"
            )));
        }
        let key_bytes = usize::try_from(key_size / 8)
            .map_err(|_| fail(format!("key_size {key_size} is too large")))?;
        if keys_per_request == 0 {
            return Err(fail("keys_per_request must be at least 1".into()));
        }
        if peer_sae_id.is_empty() {
            return Err(fail("peer_sae_id must not be empty".into()));
        }
        let ca_pem = std::fs::read(ca)
            .map_err(|e| fail(format!("vendor CA certificate {}: {e}", ca.display())))?;
        let identity = Identity::from_files(cert, key).map_err(|e| fail(describe(&e)))?;
        let client = Client::new(url, &ca_pem, Some(&identity)).map_err(|e| fail(describe(&e)))?;
        Ok(Upstream014 {
            client,
            url: url.trim_end_matches('/').to_owned(),
            peer_sae_id: peer_sae_id.to_owned(),
            key_size,
            key_bytes,
            keys_per_request,
        })
    }
}

fn encode(key_size: u64, ids: &[Uuid]) -> String {
    let mut s = String::with_capacity(8 + ids.len() * 37);
    s.push_str(&key_size.to_string());
    s.push(':');
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(id.hyphenated().encode_lower(&mut Uuid::encode_buffer()));
    }
    s
}

/// `<bits>:<id>,<id>,...` → (bits, IDs): strict (canonical numbers and UUIDs, no duplicates).
fn decode(reference: &BlockRef) -> Result<(u64, Vec<Uuid>), SourceError> {
    if reference.source != KIND {
        return Err(SourceError::BadReference(format!(
            "a block of a {:?} source given to a {KIND} source",
            reference.source
        )));
    }
    let bad = |why: &str| SourceError::BadReference(format!("{KIND} block reference: {why}"));
    let (size, list) = reference
        .detail
        .split_once(':')
        .ok_or_else(|| bad("expected <key size>:<key ID>,<key ID>,..."))?;
    let canonical = !size.is_empty()
        && size.bytes().all(|b| b.is_ascii_digit())
        && !(size.len() > 1 && size.starts_with('0'));
    let bits: u64 = size
        .parse()
        .ok()
        .filter(|b| canonical && *b > 0 && b % 8 == 0)
        .ok_or_else(|| bad("key size is not a positive multiple of 8"))?;
    let mut ids = Vec::new();
    for part in list.split(',') {
        let id = Uuid::try_parse(part).map_err(|_| bad("a key ID is not a UUID"))?;
        if id.hyphenated().encode_lower(&mut Uuid::encode_buffer()) != part {
            return Err(bad("key IDs must be lower-case hyphenated UUIDs"));
        }
        if ids.contains(&id) {
            return Err(bad("a key ID is listed twice"));
        }
        ids.push(id);
    }
    Ok((bits, ids))
}

#[async_trait::async_trait]
impl KeySource for Upstream014 {
    fn kind(&self) -> &'static str {
        KIND
    }

    async fn next_block(&self, max_len: usize) -> Result<Option<Produced>, SourceError> {
        let number = self.keys_per_request.min((max_len / self.key_bytes) as u64);
        if number == 0 {
            return Ok(None);
        }
        let request = KeyRequest {
            number: Some(number),
            size: Some(self.key_size),
            ..KeyRequest::default()
        };
        let keys = match self
            .client
            .enc_keys_decoded(&self.peer_sae_id, &request)
            .await
        {
            Ok(keys) => keys,
            Err(e) if status_of(&e) == Some(503) => {
                tracing::debug!(url = %self.url, error = %e, "vendor KME has no key right now");
                return Ok(None);
            }
            Err(e) => {
                return Err(SourceError::Failed(format!(
                    "vendor KME {}: Get key for slave {:?}: {}",
                    self.url,
                    self.peer_sae_id,
                    describe(&e)
                )))
            }
        };
        // The keys are wiped on every early return below (they are lost to both ends).
        if keys.is_empty() || keys.len() as u64 > number {
            return Err(SourceError::Failed(format!(
                "vendor KME {} returned {} keys for a request of {number}",
                self.url,
                keys.len()
            )));
        }
        let mut ids = Vec::with_capacity(keys.len());
        let mut data = SecretBuf::from(Vec::with_capacity(keys.len() * self.key_bytes));
        for (id, key) in &keys {
            if key.len() != self.key_bytes {
                return Err(SourceError::Failed(format!(
                    "vendor KME {} returned a key of {} bits for a request of {} bits",
                    self.url,
                    key.len() * 8,
                    self.key_size
                )));
            }
            if ids.contains(id) {
                return Err(SourceError::Failed(format!(
                    "vendor KME {} returned key ID {id} twice",
                    self.url
                )));
            }
            ids.push(*id);
            data.extend_from_slice(key);
        }
        Ok(Some(Produced {
            reference: BlockRef {
                source: KIND.into(),
                detail: encode(self.key_size, &ids),
            },
            data,
        }))
    }

    async fn fetch_block(
        &self,
        reference: &BlockRef,
        len: usize,
    ) -> Result<SecretBuf, SourceError> {
        let (bits, ids) = decode(reference)?;
        let key_bytes = usize::try_from(bits / 8)
            .map_err(|_| SourceError::BadReference(format!("key size {bits} is too large")))?;
        if key_bytes.checked_mul(ids.len()) != Some(len) {
            return Err(SourceError::BadReference(format!(
                "block length {len} does not match its reference ({} keys of {bits} bits)",
                ids.len()
            )));
        }
        let body = KeyIds::from_ids(ids.iter().map(Uuid::to_string));
        let keys = match self.client.dec_keys_decoded(&self.peer_sae_id, &body).await {
            Ok(keys) => keys,
            Err(e) if status_of(&e) == Some(400) => {
                return Err(SourceError::Gone(format!(
                    "vendor KME {} refused the key IDs (unknown or already retrieved): {}",
                    self.url,
                    describe(&e)
                )))
            }
            Err(e) => {
                return Err(SourceError::Failed(format!(
                    "vendor KME {}: Get key with key IDs from master {:?}: {}",
                    self.url,
                    self.peer_sae_id,
                    describe(&e)
                )))
            }
        };
        let by_id: HashMap<Uuid, &SecretBuf> = keys.iter().map(|(id, k)| (*id, k)).collect();
        let total: usize = keys.iter().map(|(_, k)| k.len()).sum();
        if keys.len() != ids.len() || by_id.len() != ids.len() || total != len {
            return Err(SourceError::BadReference(format!(
                "vendor KME {} delivered {} keys, {total} bytes, for a block of {} keys, {len} bytes; discarded",
                self.url,
                keys.len(),
                ids.len()
            )));
        }
        let mut data = SecretBuf::from(Vec::with_capacity(len));
        for id in &ids {
            match by_id.get(id) {
                Some(k) if k.len() == key_bytes => data.extend_from_slice(k),
                _ => {
                    return Err(SourceError::BadReference(format!(
                        "vendor KME {} did not deliver key {id} of {bits} bits; block discarded",
                        self.url
                    )))
                }
            }
        }
        Ok(data)
    }

    /// Nothing to erase: the vendor KME erased the keys when it delivered them (module docs).
    async fn release(&self, reference: &BlockRef) -> Result<(), SourceError> {
        let _ = reference;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(detail: &str) -> BlockRef {
        BlockRef {
            source: KIND.into(),
            detail: detail.into(),
        }
    }

    #[test]
    fn references_round_trip_and_are_strict() {
        let ids = vec![Uuid::new_v4(), Uuid::new_v4()];
        let detail = encode(256, &ids);
        assert_eq!(detail, format!("256:{},{}", ids[0], ids[1]));
        assert_eq!(decode(&r(&detail)).unwrap(), (256, ids.clone()));
        let id = ids[0].to_string();
        for bad in [
            String::new(),
            "256".into(),
            "256:".into(),
            format!(":{id}"),
            format!("0:{id}"),
            format!("12:{id}"),
            format!("0256:{id}"),
            format!("+256:{id}"),
            format!("256:{id},"),
            format!("256:{id},{id}"),
            format!("256:{}", id.to_uppercase()),
            format!("256:{}", id.replace('-', "")),
            format!("256:{id} "),
        ] {
            assert!(
                matches!(decode(&r(&bad)), Err(SourceError::BadReference(_))),
                "{bad:?}"
            );
        }
        let other = BlockRef {
            source: "key-files".into(),
            detail,
        };
        assert!(matches!(decode(&other), Err(SourceError::BadReference(_))));
    }
}
