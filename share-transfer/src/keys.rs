//! QKD key material for the transfers, from the SAE's own KME over ETSI GS QKD 014.
//!
//! Every chunk frame uses fresh keys: the one-time pad (when the transfer leaves its site)
//! and a 256-bit MAC key. The sender takes them as master with `enc_keys`, the receiver gets
//! the same bytes as slave with `dec_keys`. A key obtained is used for exactly one chunk and
//! then dropped (zeroized); a failed transfer is retried with new keys, never the old ones.
//!
//! When the KME has too few keys (503) the fetcher waits and retries, up to a limit, and
//! publishes what it is waiting for in a [`Notice`] that the progress display shows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etsi_spec::codec::DecodedKey;
use etsi_spec::{Client, ClientError, KeyIds, KeyRequest, Status};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::auth::KEY_LEN;

/// Errors while getting keys.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("KME {kme}: {source}")]
    Kme { kme: String, source: ClientError },
    #[error("KME {kme} had too few keys for {waited:?}; the QKD link may be down or too slow")]
    Exhausted { kme: String, waited: Duration },
    #[error("KME {kme} returned {got} keys, {expected} expected")]
    Count {
        kme: String,
        got: usize,
        expected: usize,
    },
    #[error("KME {kme} limits cannot carry a chunk of {chunk} bytes: {why}")]
    Limits {
        kme: String,
        chunk: usize,
        why: String,
    },
}

/// A line of text the progress display shows while waiting (None = not waiting).
#[derive(Default)]
pub struct Notice(Mutex<Option<String>>);

impl Notice {
    pub fn set(&self, text: Option<String>) {
        if let Ok(mut n) = self.0.lock() {
            *n = text;
        }
    }

    pub fn get(&self) -> Option<String> {
        self.0.lock().ok().and_then(|n| n.clone())
    }
}

/// How the keys of one chunk are laid out, derived from the chunk size and the KME's limits.
///
/// A chunk takes `keys` keys of `key_bytes` each; their concatenation holds the pad (when
/// the transfer leaves its site) followed by the [`KEY_LEN`]-byte MAC key. So one `enc_keys`
/// request serves several chunks, pad and MAC alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPlan {
    /// Keys per chunk.
    pub keys: usize,
    /// Bytes per key.
    pub key_bytes: usize,
    /// Bytes of pad per chunk (0 within a site).
    pub pad_bytes: usize,
    /// Most keys per request at this KME.
    pub max_per_request: usize,
}

impl KeyPlan {
    /// The plan for chunks of `chunk` bytes; `pad` = the transfer leaves its site.
    pub fn new(kme: &str, chunk: usize, pad: bool, status: &Status) -> Result<Self, KeyError> {
        let err = |why: String| KeyError::Limits {
            kme: kme.to_owned(),
            chunk,
            why,
        };
        let min = (status.min_key_size / 8) as usize;
        let max = (status.max_key_size / 8) as usize;
        let per_req = status.max_key_per_request as usize;
        if max == 0 || per_req == 0 {
            return Err(err("max_key_size or max_key_per_request is 0".into()));
        }
        let pad_bytes = if pad { chunk } else { 0 };
        let need = pad_bytes + KEY_LEN;
        let keys = need.div_ceil(max);
        let key_bytes = need.div_ceil(keys).max(min);
        if key_bytes > max {
            return Err(err(format!(
                "min_key_size {min} B exceeds max_key_size {max} B"
            )));
        }
        if keys > per_req {
            return Err(err(format!(
                "needs {keys} keys per chunk, max_key_per_request is {per_req}"
            )));
        }
        Ok(KeyPlan {
            keys,
            key_bytes,
            pad_bytes,
            max_per_request: per_req,
        })
    }

    /// How many chunks' keys fit in one request.
    pub fn chunks_per_request(&self) -> usize {
        (self.max_per_request / self.keys).max(1)
    }
}

/// The key material of one chunk. Wiped when dropped.
pub struct ChunkKeys {
    pub ids: Vec<Uuid>,
    /// Concatenated keys: pad (if any), then the MAC key.
    pub material: Zeroizing<Vec<u8>>,
}

impl ChunkKeys {
    /// The pad for `len` bytes, if the material holds it and a MAC key after it.
    pub fn pad(&self, len: usize) -> Option<&[u8]> {
        (self.material.len() >= len + KEY_LEN).then(|| &self.material[..len])
    }

    /// The MAC key that follows `pad_len` bytes of pad.
    pub fn mac(&self, pad_len: usize) -> Option<&[u8]> {
        self.material.get(pad_len..pad_len + KEY_LEN)
    }
}

/// Gets keys from one KME as one SAE.
pub struct KeyFetcher {
    client: Client,
    kme: String,
    max_wait: Duration,
    notice: Arc<Notice>,
}

impl KeyFetcher {
    pub fn new(client: Client, kme_url: &str, max_wait: Duration, notice: Arc<Notice>) -> Self {
        KeyFetcher {
            client,
            kme: kme_url.to_owned(),
            max_wait,
            notice,
        }
    }

    /// Status of the pair (this SAE as master, `slave`).
    pub async fn status(&self, slave: &str) -> Result<Status, KeyError> {
        self.client
            .status(slave)
            .await
            .map_err(|source| KeyError::Kme {
                kme: self.kme.clone(),
                source,
            })
    }

    async fn enc(
        &self,
        slave: &str,
        number: usize,
        bytes: usize,
    ) -> Result<Vec<DecodedKey>, KeyError> {
        let req = KeyRequest {
            number: Some(number as u64),
            size: Some(bytes as u64 * 8),
            ..KeyRequest::default()
        };
        let start = Instant::now();
        let mut delay = Duration::from_millis(50);
        loop {
            match self.client.enc_keys_decoded(slave, &req).await {
                Ok(keys) => {
                    self.notice.set(None);
                    if keys.len() != number || keys.iter().any(|(_, k)| k.len() != bytes) {
                        return Err(KeyError::Count {
                            kme: self.kme.clone(),
                            got: keys.len(),
                            expected: number,
                        });
                    }
                    return Ok(keys);
                }
                Err(e) if e.status().is_some_and(|s| s.as_u16() == 503) => {
                    let waited = start.elapsed();
                    if waited > self.max_wait {
                        self.notice.set(None);
                        return Err(KeyError::Exhausted {
                            kme: self.kme.clone(),
                            waited,
                        });
                    }
                    self.notice.set(Some(format!(
                        "waiting for QKD key for {slave} ({:.0} s): {}",
                        waited.as_secs_f64(),
                        match &e {
                            ClientError::Api { error, .. } => error.message.as_str(),
                            _ => "KME busy",
                        }
                    )));
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
                Err(source) => {
                    return Err(KeyError::Kme {
                        kme: self.kme.clone(),
                        source,
                    })
                }
            }
        }
    }

    /// Master side: key material for `chunks` chunks shared with `slave`.
    pub async fn take(
        &self,
        slave: &str,
        plan: &KeyPlan,
        chunks: usize,
    ) -> Result<Vec<ChunkKeys>, KeyError> {
        let mut out = Vec::with_capacity(chunks);
        let mut left = chunks;
        while left > 0 {
            let n = left.min(plan.chunks_per_request());
            let keys = self.enc(slave, n * plan.keys, plan.key_bytes).await?;
            let mut it = keys.into_iter();
            for _ in 0..n {
                let mut ids = Vec::with_capacity(plan.keys);
                let mut material = Zeroizing::new(Vec::with_capacity(plan.keys * plan.key_bytes));
                for (id, bytes) in it.by_ref().take(plan.keys) {
                    ids.push(id);
                    material.extend_from_slice(&bytes);
                }
                out.push(ChunkKeys { ids, material });
            }
            left -= n;
        }
        Ok(out)
    }

    /// Slave side: the keys with these IDs that `master` obtained for this SAE.
    pub async fn fetch(
        &self,
        master: &str,
        ids: &[Uuid],
        max_per_request: usize,
    ) -> Result<HashMap<Uuid, Zeroizing<Vec<u8>>>, KeyError> {
        let mut out = HashMap::with_capacity(ids.len());
        for part in ids.chunks(max_per_request.max(1)) {
            let req = KeyIds::from_ids(part.iter().map(Uuid::to_string));
            let keys = self
                .client
                .dec_keys_decoded(master, &req)
                .await
                .map_err(|source| KeyError::Kme {
                    kme: self.kme.clone(),
                    source,
                })?;
            out.extend(keys);
        }
        if out.len() != ids.len() {
            return Err(KeyError::Count {
                kme: self.kme.clone(),
                got: out.len(),
                expected: ids.len(),
            });
        }
        Ok(out)
    }
}

/// Assembles one chunk's key material from fetched keys (removing them from `keys`).
pub fn assemble(
    header: &crate::wire::FrameHeader,
    keys: &mut HashMap<Uuid, Zeroizing<Vec<u8>>>,
) -> Option<ChunkKeys> {
    // Sized up front: a growing Vec would leave unwiped copies of key bytes behind.
    let total: usize = header
        .key_ids
        .iter()
        .map(|id| keys.get(id).map_or(0, |k| k.len()))
        .sum();
    let mut material = Zeroizing::new(Vec::with_capacity(total));
    for id in &header.key_ids {
        material.extend_from_slice(&keys.remove(id)?);
    }
    Some(ChunkKeys {
        ids: header.key_ids.clone(),
        material,
    })
}
