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
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etsi_spec::codec::{borrow_key_container, decode_key_into, decoded_len, ContainerError};
use etsi_spec::{Client, ClientError, KeyIds, KeyRequest, Status};
use secret_buf::SecretBuf;
use uuid::Uuid;

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
    #[error("KME {kme}: {source}")]
    Container {
        kme: String,
        source: etsi_spec::codec::ContainerError,
    },
    #[error("key {id} named twice")]
    Duplicate { id: Uuid },
    #[error("KME sent key {id}, which was not asked for")]
    Unasked { id: Uuid },
    #[error("KME {kme} limits cannot carry a chunk of {chunk} bytes: {why}")]
    Limits {
        kme: String,
        chunk: usize,
        why: String,
    },
}

/// What the progress display shows about key: a line while waiting (None = not waiting),
/// and the time spent waiting for key so far.
#[derive(Default)]
pub struct Notice {
    line: Mutex<Option<String>>,
    waited_ns: AtomicU64,
}

impl Notice {
    pub fn set(&self, text: Option<String>) {
        if let Ok(mut n) = self.line.lock() {
            *n = text;
        }
    }

    pub fn get(&self) -> Option<String> {
        self.line.lock().ok().and_then(|n| n.clone())
    }

    /// Adds time spent waiting for the KME to hold enough key.
    pub fn add_wait(&self, d: Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.waited_ns.fetch_add(ns, Ordering::Relaxed);
    }

    /// Time spent waiting for key so far (summed over concurrent requests).
    pub fn waited(&self) -> Duration {
        Duration::from_nanos(self.waited_ns.load(Ordering::Relaxed))
    }
}

/// The share of a pool that one request may ask for: a request for at most a quarter of a
/// pool can be met while other streams draw on the same pool and the link refills it.
pub const POOL_SHARE: u64 = 4;

/// How the keys of one chunk are laid out, derived from the chunk size and the KME's limits.
///
/// A chunk takes `keys` keys of `key_bytes` each; their concatenation holds the pad (when
/// the transfer leaves its site) followed by the [`KEY_LEN`]-byte MAC key. Requests are
/// sized so that the KME can always meet them: at most `max_key_per_request` keys and at
/// most a [`POOL_SHARE`]th of the pool (`max_key_count` × `key_size`). A chunk may need
/// several requests, or one request may serve several chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyPlan {
    /// Keys per chunk.
    pub keys: usize,
    /// Bytes per key.
    pub key_bytes: usize,
    /// Bytes of pad per chunk (0 within a site).
    pub pad_bytes: usize,
    /// Most keys one request asks for.
    pub keys_per_request: usize,
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
        let pool = status.max_key_count.saturating_mul(status.key_size / 8);
        let budget = usize::try_from(pool / POOL_SHARE).unwrap_or(usize::MAX);
        let max = max.min(budget);
        if max < min.max(1) {
            return Err(err(format!(
                "a quarter of the pool ({pool} B: max_key_count {} × key_size {} bit) is below min_key_size {min} B",
                status.max_key_count, status.key_size
            )));
        }
        let pad_bytes = if pad { chunk } else { 0 };
        let need = pad_bytes + KEY_LEN;
        let keys = need.div_ceil(max);
        let key_bytes = need.div_ceil(keys).max(min);
        Ok(KeyPlan {
            keys,
            key_bytes,
            pad_bytes,
            keys_per_request: per_req.min(budget / key_bytes).max(1),
        })
    }

    /// How many chunks' keys fit in one request (at least 1).
    pub fn chunks_per_request(&self) -> usize {
        (self.keys_per_request / self.keys).max(1)
    }
}

/// The key material of one chunk. Wiped when dropped.
pub struct ChunkKeys {
    pub ids: Vec<Uuid>,
    /// Concatenated keys: pad (if any), then the MAC key.
    pub material: SecretBuf,
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

/// How many keys of the size asked a 503 says the pool holds (its `stored_key_count`
/// detail), 0 when it does not say: only a KME's "too few keys" answer shrinks a request,
/// not a 503 for another reason (a failed registration at the slave's KME, say), for which
/// asking again at once would only waste key.
fn held_detail(e: &ClientError) -> usize {
    let ClientError::Api { error, .. } = e else {
        return 0;
    };
    error
        .details
        .iter()
        .flatten()
        .find_map(|d| d.get("stored_key_count")?.as_u64())
        .map_or(0, |n| usize::try_from(n).unwrap_or(usize::MAX))
}

/// Whether a 503 says that no path to the slave's KME exists (a relaying KME's
/// `relay_path: none` detail): waiting for key would not help.
fn no_path(e: &ClientError) -> bool {
    let ClientError::Api { error, .. } = e else {
        return false;
    };
    error
        .details
        .iter()
        .flatten()
        .any(|d| d.get("relay_path").and_then(|v| v.as_str()) == Some("none"))
}

/// A key's ID and its base64 text, borrowed from a reply body.
type KeyText<'a> = (Uuid, std::borrow::Cow<'a, str>);

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

    /// Time spent waiting for the KME to hold enough key so far.
    pub fn waited(&self) -> Duration {
        self.notice.waited()
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

    /// One `enc_keys` for at most `number` keys of `bytes`. While the KME has too few
    /// (503 with the `stored_key_count` it holds), takes those at once (at least one key),
    /// or waits for the link; so progress follows the link's rate, whatever the pool's size.
    async fn enc(
        &self,
        slave: &str,
        number: usize,
        bytes: usize,
    ) -> Result<(bytes::Bytes, usize), KeyError> {
        let start = Instant::now();
        let mut number = number;
        let mut delay = Duration::from_millis(20);
        let mut waited = false;
        let result = loop {
            let req = KeyRequest {
                number: Some(number as u64),
                size: Some(bytes as u64 * 8),
                ..KeyRequest::default()
            };
            match self.client.enc_keys_body(slave, &req).await {
                Ok(body) => break Ok((body, number)),
                Err(e) if e.status().is_some_and(|s| s.as_u16() == 503) && !no_path(&e) => {
                    waited = true;
                    let elapsed = start.elapsed();
                    if elapsed > self.max_wait {
                        break Err(KeyError::Exhausted {
                            kme: self.kme.clone(),
                            waited: elapsed,
                        });
                    }
                    let held = held_detail(&e);
                    if held > 0 && held < number {
                        // Take what is there now rather than wait for the whole request.
                        number = held;
                        continue;
                    }
                    self.notice.set(Some(format!(
                        "waiting for QKD key for {slave} ({:.0} s): {}",
                        elapsed.as_secs_f64(),
                        match &e {
                            ClientError::Api { error, .. } => error.message.as_str(),
                            _ => "KME busy",
                        }
                    )));
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_millis(500));
                }
                Err(source) => {
                    break Err(KeyError::Kme {
                        kme: self.kme.clone(),
                        source,
                    })
                }
            }
        };
        if waited {
            self.notice.set(None);
            self.notice.add_wait(start.elapsed());
        }
        result
    }

    /// Master side: key material for `chunks` chunks shared with `slave`, in requests of
    /// at most `plan.keys_per_request` keys (a chunk's keys may span requests). Each key is
    /// decoded straight into its chunk's material.
    pub async fn take(
        &self,
        slave: &str,
        plan: &KeyPlan,
        chunks: usize,
    ) -> Result<Vec<ChunkKeys>, KeyError> {
        let kb = plan.key_bytes;
        let mut out: Vec<ChunkKeys> = (0..chunks)
            .map(|_| ChunkKeys {
                ids: Vec::with_capacity(plan.keys),
                material: SecretBuf::zeroed(plan.keys * kb),
            })
            .collect();
        let total = chunks * plan.keys;
        let mut got = 0;
        // A KME that named one key twice would make two chunks share a pad: refused.
        let mut seen = std::collections::HashSet::with_capacity(total);
        while got < total {
            let n = (total - got).min(plan.keys_per_request);
            let (body, asked) = self.enc(slave, n, kb).await?;
            let keys = borrow_key_container(&body).map_err(|e| self.protocol(e))?;
            if keys.len() != asked {
                return Err(KeyError::Count {
                    kme: self.kme.clone(),
                    got: keys.len(),
                    expected: asked,
                });
            }
            for (id, b64) in &keys {
                if !seen.insert(*id) {
                    return Err(KeyError::Duplicate { id: *id });
                }
                let ck = &mut out[got / plan.keys];
                let at = (got % plan.keys) * kb;
                decode_key_into(*id, b64, &mut ck.material[at..at + kb])
                    .map_err(|e| self.protocol(e))?;
                ck.ids.push(*id);
                got += 1;
            }
        }
        Ok(out)
    }

    fn protocol(&self, e: ContainerError) -> KeyError {
        KeyError::Container {
            kme: self.kme.clone(),
            source: e,
        }
    }

    /// Slave side: the key material of each chunk, whose keys (in order) `master` obtained
    /// for this SAE, fetched in requests of at most `max_per_request` IDs; each key is
    /// decoded straight into its chunk's material.
    pub async fn fetch_chunks(
        &self,
        master: &str,
        chunks: &[&[Uuid]],
        max_per_request: usize,
    ) -> Result<Vec<ChunkKeys>, KeyError> {
        // Where each key goes: (chunk, position in the chunk).
        let mut place: HashMap<Uuid, (usize, usize)> = HashMap::new();
        let mut all = Vec::new();
        for (c, ids) in chunks.iter().enumerate() {
            for (p, id) in ids.iter().enumerate() {
                if place.insert(*id, (c, p)).is_some() {
                    return Err(KeyError::Duplicate { id: *id });
                }
                all.push(*id);
            }
        }
        let mut bodies = Vec::new();
        for part in all.chunks(max_per_request.max(1)) {
            let req = KeyIds::from_ids(part.iter().map(Uuid::to_string));
            let body = self
                .client
                .dec_keys_body(master, &req)
                .await
                .map_err(|source| KeyError::Kme {
                    kme: self.kme.clone(),
                    source,
                })?;
            bodies.push(body);
        }
        // Every key's text and length, in its place; then each chunk's material in one piece.
        let mut found: Vec<Vec<Option<KeyText<'_>>>> =
            chunks.iter().map(|ids| vec![None; ids.len()]).collect();
        let mut count = 0;
        for body in &bodies {
            for (id, b64) in borrow_key_container(body).map_err(|e| self.protocol(e))? {
                let Some(&(c, p)) = place.get(&id) else {
                    return Err(KeyError::Unasked { id });
                };
                if found[c][p].replace((id, b64)).is_none() {
                    count += 1;
                }
            }
        }
        if count != all.len() {
            return Err(KeyError::Count {
                kme: self.kme.clone(),
                got: count,
                expected: all.len(),
            });
        }
        found
            .into_iter()
            .map(|keys| self.chunk_material(keys.into_iter().flatten().collect()))
            .collect()
    }

    /// One chunk's keys decoded one after the other into one buffer.
    fn chunk_material(&self, keys: Vec<KeyText<'_>>) -> Result<ChunkKeys, KeyError> {
        let total: usize = keys.iter().map(|(_, b)| decoded_len(b)).sum();
        let mut material = SecretBuf::zeroed(total);
        let mut at = 0;
        let mut ids = Vec::with_capacity(keys.len());
        for (id, b64) in &keys {
            let len = decoded_len(b64);
            decode_key_into(*id, b64, &mut material[at..at + len]).map_err(|e| self.protocol(e))?;
            at += len;
            ids.push(*id);
        }
        Ok(ChunkKeys { ids, material })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(max_key_count: u64, max_key_size: u64, per_request: u64) -> Status {
        Status {
            source_KME_ID: "KME_A".into(),
            target_KME_ID: "KME_B".into(),
            master_SAE_ID: "A".into(),
            slave_SAE_ID: "B".into(),
            key_size: 256,
            stored_key_count: 0,
            max_key_count,
            max_key_per_request: per_request,
            max_key_size,
            min_key_size: 64,
            max_SAE_ID_count: 0,
            status_extension: None,
        }
    }

    /// Every request a plan makes fits in a quarter of the pool and in max_key_per_request,
    /// and a chunk's keys hold its pad and MAC key, whatever the chunk and pool sizes.
    #[test]
    fn plans_never_ask_more_than_a_pool_can_hold() {
        for (count, max_size, per_req) in [
            (100_000, 1 << 20, 1024), // the default devnet: 3.2 MB pools, 128 KiB keys
            (20_000, 65_536, 1024),   // 640 KB pools
            (2_000, 1 << 20, 1024),   // 64 KB pools: a 1 MiB chunk needs many requests
            (1 << 22, 1 << 20, 16),   // big pools, few keys per request
        ] {
            let st = status(count, max_size, per_req);
            let pool = count * 32;
            for chunk in [4096usize, 65_536, 1 << 20, 4 << 20] {
                for pad in [false, true] {
                    let p = KeyPlan::new("KME_A", chunk, pad, &st).unwrap();
                    let asked = (p.keys_per_request * p.key_bytes) as u64;
                    assert!(asked <= pool / POOL_SHARE, "{p:?} asks {asked} of {pool}");
                    assert!(p.keys_per_request as u64 <= per_req);
                    assert!(p.key_bytes as u64 * 8 <= max_size);
                    assert!(p.key_bytes >= 8, "min_key_size");
                    let need = if pad { chunk } else { 0 } + KEY_LEN;
                    assert!(p.keys * p.key_bytes >= need, "{p:?} for {chunk}");
                    assert!(p.chunks_per_request() >= 1);
                }
            }
        }
    }

    #[test]
    fn a_pool_too_small_for_one_key_is_a_clear_error() {
        // 4 keys of 256 bit: a quarter of the pool is 32 bytes, below min_key_size 64 bytes.
        let mut st = status(4, 65_536, 1024);
        st.min_key_size = 512;
        let e = KeyPlan::new("KME_A", 65_536, true, &st).unwrap_err();
        assert!(e.to_string().contains("max_key_count 4"), "{e}");
    }
}
