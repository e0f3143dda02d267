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
    #[error("KME {kme} returned a key that is not valid base64 or has the wrong size")]
    BadKey { kme: String },
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPlan {
    /// One-time-pad keys per chunk (0 within a site).
    pub otp_keys: usize,
    /// Bytes per one-time-pad key (their concatenation covers the chunk).
    pub otp_key_bytes: usize,
    /// Bytes of the MAC key as requested (at least [`KEY_LEN`], at least the KME minimum).
    pub mac_key_bytes: usize,
    /// Most keys per request at this KME.
    pub max_per_request: usize,
}

impl KeyPlan {
    /// The plan for chunks of `chunk` bytes; `otp` = the transfer leaves its site.
    pub fn new(kme: &str, chunk: usize, otp: bool, status: &Status) -> Result<Self, KeyError> {
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
        let mac_key_bytes = KEY_LEN.max(min);
        if mac_key_bytes > max {
            return Err(err(format!(
                "a {KEY_LEN}-byte MAC key exceeds max_key_size"
            )));
        }
        let (otp_keys, otp_key_bytes) = if otp && chunk > 0 {
            let m = chunk.div_ceil(max);
            let s = chunk.div_ceil(m).max(min);
            if m > per_req {
                return Err(err(format!(
                    "needs {m} keys per chunk, max_key_per_request is {per_req}"
                )));
            }
            (m, s)
        } else {
            (0, 0)
        };
        Ok(KeyPlan {
            otp_keys,
            otp_key_bytes,
            mac_key_bytes,
            max_per_request: per_req,
        })
    }

    /// How many chunks' keys fit in one request.
    pub fn chunks_per_request(&self) -> usize {
        (self.max_per_request / self.otp_keys.max(1)).max(1)
    }
}

/// The keys of one chunk. Wiped when dropped.
pub struct ChunkKeys {
    pub otp_ids: Vec<Uuid>,
    /// Concatenated pad keys (at least the chunk length).
    pub otp: Zeroizing<Vec<u8>>,
    pub mac_id: Uuid,
    pub mac: Zeroizing<Vec<u8>>,
}

/// Gets keys from one KME as one SAE.
pub struct KeyFetcher {
    client: Client,
    kme: String,
    max_wait: Duration,
    notice: Arc<Notice>,
}

fn decode_key(
    k: &etsi_spec::Key,
    len: usize,
    kme: &str,
) -> Result<(Uuid, Zeroizing<Vec<u8>>), KeyError> {
    let bad = || KeyError::BadKey {
        kme: kme.to_owned(),
    };
    let id = Uuid::try_parse(&k.key_ID).map_err(|_| bad())?;
    let bytes = k.decode().map_err(|_| bad())?;
    if bytes.len() != len && len != 0 {
        return Err(bad());
    }
    Ok((id, bytes))
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
    ) -> Result<Vec<(Uuid, Zeroizing<Vec<u8>>)>, KeyError> {
        let req = KeyRequest {
            number: Some(number as u64),
            size: Some(bytes as u64 * 8),
            ..KeyRequest::default()
        };
        let start = Instant::now();
        let mut delay = Duration::from_millis(50);
        loop {
            match self.client.enc_keys(slave, &req).await {
                Ok(c) => {
                    self.notice.set(None);
                    if c.keys.len() != number {
                        return Err(KeyError::Count {
                            kme: self.kme.clone(),
                            got: c.keys.len(),
                            expected: number,
                        });
                    }
                    return c
                        .keys
                        .iter()
                        .map(|k| decode_key(k, bytes, &self.kme))
                        .collect();
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

    /// Master side: keys for `chunks` chunks shared with `slave`.
    pub async fn take(
        &self,
        slave: &str,
        plan: &KeyPlan,
        chunks: usize,
    ) -> Result<Vec<ChunkKeys>, KeyError> {
        let mut otp = Vec::new();
        let mut left = chunks * plan.otp_keys;
        while left > 0 {
            let n = left.min(plan.max_per_request);
            otp.extend(self.enc(slave, n, plan.otp_key_bytes).await?);
            left -= n;
        }
        let mut macs = Vec::new();
        let mut left = chunks;
        while left > 0 {
            let n = left.min(plan.max_per_request);
            macs.extend(self.enc(slave, n, plan.mac_key_bytes).await?);
            left -= n;
        }
        let mut otp = otp.into_iter();
        Ok(macs
            .into_iter()
            .map(|(mac_id, mac)| {
                let mut ids = Vec::with_capacity(plan.otp_keys);
                let mut pad =
                    Zeroizing::new(Vec::with_capacity(plan.otp_keys * plan.otp_key_bytes));
                for (id, bytes) in otp.by_ref().take(plan.otp_keys) {
                    ids.push(id);
                    pad.extend_from_slice(&bytes);
                }
                ChunkKeys {
                    otp_ids: ids,
                    otp: pad,
                    mac_id,
                    mac,
                }
            })
            .collect())
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
            let c = self
                .client
                .dec_keys(master, &req)
                .await
                .map_err(|source| KeyError::Kme {
                    kme: self.kme.clone(),
                    source,
                })?;
            for k in &c.keys {
                let (id, bytes) = decode_key(k, 0, &self.kme)?;
                out.insert(id, bytes);
            }
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

/// Assembles one chunk's keys from fetched key bytes.
pub fn assemble(
    header: &crate::wire::FrameHeader,
    keys: &mut HashMap<Uuid, Zeroizing<Vec<u8>>>,
) -> Option<ChunkKeys> {
    let mac = keys.remove(&header.mac_key_id)?;
    let mut otp = Zeroizing::new(Vec::new());
    for id in &header.otp_key_ids {
        otp.extend_from_slice(&keys.remove(id)?);
    }
    Some(ChunkKeys {
        otp_ids: header.otp_key_ids.clone(),
        otp,
        mac_id: header.mac_key_id,
        mac,
    })
}
