//! The S3 driver: shares in a bucket of an S3-compatible object store (Garage, MinIO, Ceph
//! RGW, AWS S3), for a site whose shares outgrow a machine's disks.
//!
//! Why `object_store` (Apache Arrow's): one well-kept crate that speaks the S3 API with
//! SigV4, path-style or virtual-host addressing, multipart uploads, and retries with
//! exponential back-off on 5xx, timeouts and connection errors built in, and nothing else;
//! the AWS SDK would bring its whole configuration and credential machinery for the same
//! few calls.
//!
//! ```text
//! PREFIX<backup id>/share-<i>/manifest.json              what the share is
//!                            /e<N>/<j:020>.<nonce:016x>.<BLAKE3 hex>
//!                                                         chunk j of epoch N: its bytes,
//!                                                         its record in its name
//!                            /e<N>.records                 every record of epoch N (48-byte
//!                                                         records as a local chunks.log),
//!                                                         written when the epoch is complete
//!                            /keys/e<N>/<j:020>.<uuid>      which QKD key IDs carried the
//!                                                         chunks of one write, from chunk j
//!                            /renew.json                   a pending renewal to epoch N+1
//! PREFIX sets/<owner SAE in hex>/<set>.json                 sample-set manifests
//! ```
//!
//! Object semantics instead of in-place writes: a PUT replaces an object whole and
//! atomically, so a chunk's object *is* its record. A chunk is acknowledged once the store
//! acknowledged its PUT; a rewrite first DELETEs the object of the old record (the local
//! driver's tombstone), so a crash leaves the chunk missing, never mis-described; mending
//! PUTs the same name again. A renewal stages into the next epoch's prefix (`e<N+1>/`);
//! `renew.json` marked committed is the commit point, after which the manifest moves to
//! epoch N+1 and the old epoch's objects are deleted: no object is copied. A share is
//! removed by deleting its manifest first (from then on it is not there), then the rest;
//! whatever a crash leaves under a removed share's name is deleted before a share of that
//! name is created again.
//!
//! Reads of a complete share take its records from `e<N>.records` (one GET), so an object
//! deleted behind the agent's back reads as damaged and can be mended; a share being stored
//! lists its epoch's prefix.
//!
//! The store is called from the agent's blocking threads: each call runs on the driver's
//! own Tokio runtime and the caller waits for it. Requests in flight are bounded
//! (`max_requests`); a chunk's bytes are copied once into the request body, so memory stays
//! within the agent's upload bounds.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{
    BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::{
    decode_records, key_lines, record_bytes, Area, Backend, ChunkRecords, Opened, Put, Record,
    RenewState, ShareIo, RECORD,
};
use crate::config::S3Config;
use crate::storage::{failpoint, Failpoint, StoreError};
use share_transfer::wire::Manifest;

/// `access_key_id` and `secret_access_key`, as a credentials file holds them.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    access_key_id: String,
    secret_access_key: String,
}

/// What every share of the bucket shares: the client, the runtime, the request bound.
struct Inner {
    store: Arc<AmazonS3>,
    prefix: String,
    describe: String,
    part_bytes: usize,
    requests: Arc<Semaphore>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

fn backend_error(store: &str, what: String, e: object_store::Error) -> StoreError {
    StoreError::Backend {
        store: store.to_owned(),
        what,
        error: Box::new(e),
    }
}

impl Inner {
    /// Runs `f` on the driver's runtime and waits for it (from any thread).
    fn run<T: Send + 'static>(
        &self,
        what: impl FnOnce() -> String,
        f: impl Future<Output = Result<T, object_store::Error>> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let stopped = |what: String| StoreError::Backend {
            store: self.describe.clone(),
            what,
            error: "the agent's object store driver has stopped".into(),
        };
        let Some(rt) = self.rt.as_ref() else {
            return Err(stopped(what()));
        };
        rt.spawn(async move {
            let _ = tx.send(f.await);
        });
        match rx.recv() {
            Ok(r) => r.map_err(|e| backend_error(&self.describe, what(), e)),
            Err(_) => Err(stopped(what())),
        }
    }

    fn path(&self, rest: &str) -> ObjectPath {
        ObjectPath::from(format!("{}{rest}", self.prefix))
    }

    fn share_root(&self, id: Uuid, index: u8) -> String {
        format!("{id}/share-{index}")
    }

    /// The object at `rest`, or `None` if there is none.
    fn get(&self, rest: &str) -> Result<Option<Bytes>, StoreError> {
        let (store, path, sem) = (self.store.clone(), self.path(rest), self.requests.clone());
        self.run(|| format!("GET {rest}"), async move {
            let _permit = sem.acquire_owned().await;
            match store.get(&path).await {
                Ok(r) => r.bytes().await.map(Some),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    fn put(&self, rest: &str, bytes: Bytes) -> Result<(), StoreError> {
        let (store, path, sem) = (self.store.clone(), self.path(rest), self.requests.clone());
        self.run(|| format!("PUT {rest}"), async move {
            let _permit = sem.acquire_owned().await;
            store.put(&path, PutPayload::from(bytes)).await.map(drop)
        })
    }

    /// Every object under `rest/`: (name below `rest/`, size).
    fn list(&self, rest: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let (store, path) = (self.store.clone(), self.path(rest));
        let base = format!("{}/", path.as_ref());
        self.run(|| format!("LIST {rest}/"), async move {
            let all: Vec<_> = store.list(Some(&path)).try_collect().await?;
            Ok(all
                .into_iter()
                .filter_map(|o| {
                    o.location
                        .as_ref()
                        .strip_prefix(&base)
                        .map(|n| (n.to_owned(), o.size))
                })
                .collect())
        })
    }

    /// The "folders" right under `rest/` (all of the bucket's prefix for `""`).
    fn folders(&self, rest: &str) -> Result<Vec<String>, StoreError> {
        let store = self.store.clone();
        let path = if rest.is_empty() {
            ObjectPath::from(self.prefix.trim_end_matches('/'))
        } else {
            self.path(rest)
        };
        self.run(|| format!("LIST {rest}/ by folder"), async move {
            let prefix = (!path.as_ref().is_empty()).then_some(path);
            let r = store.list_with_delimiter(prefix.as_ref()).await?;
            Ok(r.common_prefixes
                .into_iter()
                .filter_map(|p| p.filename().map(str::to_owned))
                .collect())
        })
    }

    /// Deletes the objects `rests` (absent ones are fine), a bounded number at a time.
    fn delete(&self, rests: Vec<String>) -> Result<(), StoreError> {
        if rests.is_empty() {
            return Ok(());
        }
        let store = self.store.clone();
        let paths: Vec<ObjectPath> = rests.iter().map(|r| self.path(r)).collect();
        let sem = self.requests.clone();
        let first = rests[0].clone();
        self.run(
            || format!("DELETE {first} and {} more", rests.len() - 1),
            async move {
                futures_util::stream::iter(paths)
                    .map(|p| {
                        let (store, sem) = (store.clone(), sem.clone());
                        async move {
                            let _permit = sem.acquire_owned().await;
                            match store.delete(&p).await {
                                Err(object_store::Error::NotFound { .. }) => Ok(()),
                                r => r,
                            }
                        }
                    })
                    .buffer_unordered(16)
                    .try_collect::<Vec<()>>()
                    .await
                    .map(drop)
            },
        )
    }

    /// Deletes every object under `rest/`.
    fn delete_all(&self, rest: &str) -> Result<(), StoreError> {
        let names = self
            .list(rest)?
            .into_iter()
            .map(|(n, _)| format!("{rest}/{n}"))
            .collect();
        self.delete(names)
    }
}

/// A bucket of shares.
pub struct S3Backend {
    inner: Arc<Inner>,
}

impl S3Backend {
    pub fn new(cfg: &S3Config) -> Result<Self, StoreError> {
        let describe = format!(
            "{}/{}/{}",
            cfg.endpoint.trim_end_matches('/'),
            cfg.bucket,
            cfg.prefix
        );
        let fail = |what: String, e: object_store::Error| backend_error(&describe, what, e);
        let mut b = AmazonS3Builder::from_env()
            .with_endpoint(&cfg.endpoint)
            .with_region(&cfg.region)
            .with_bucket_name(&cfg.bucket)
            .with_virtual_hosted_style_request(cfg.virtual_hosted_style)
            .with_unsigned_payload(!cfg.sign_payload)
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(10),
                    base: 2.0,
                },
                max_retries: cfg.max_retries,
                retry_timeout: Duration::from_secs(cfg.retry_timeout_secs),
            })
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(cfg.endpoint.starts_with("http://"))
                    .with_timeout(Duration::from_secs(cfg.request_timeout_secs))
                    .with_connect_timeout(Duration::from_secs(5)),
            );
        if let Some(path) = &cfg.credentials_file {
            let text = std::fs::read_to_string(path).map_err(crate::backend::local::io(path))?;
            // The parser's own message quotes the offending line, which may be the secret:
            // only its reason is reported.
            let c: Credentials = toml::from_str(&text).map_err(|e| StoreError::Io {
                path: path.clone(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.message()),
            })?;
            b = b
                .with_access_key_id(c.access_key_id)
                .with_secret_access_key(c.secret_access_key);
        }
        let store = b.build().map_err(|e| fail("configuration".into(), e))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Io {
                path: "s3 runtime".into(),
                source: e,
            })?;
        let prefix = match cfg.prefix.trim_matches('/') {
            "" => String::new(),
            p => format!("{p}/"),
        };
        let max = if cfg.max_requests == 0 {
            16
        } else {
            cfg.max_requests
        };
        Ok(S3Backend {
            inner: Arc::new(Inner {
                store: Arc::new(store),
                prefix,
                describe,
                part_bytes: cfg.multipart_part_bytes.max(5 << 20),
                requests: Arc::new(Semaphore::new(max)),
                rt: Some(rt),
            }),
        })
    }

    /// Checks that the bucket can be listed (at start: a wrong endpoint, bucket or key is
    /// reported then, not at the first store).
    pub fn check(&self) -> Result<(), StoreError> {
        self.inner.folders("").map(drop)
    }

    /// The renewal state of the share at `root`, if one is pending.
    fn renewal(&self, root: &str) -> Result<Option<RenewState>, StoreError> {
        let path = format!("{root}/renew.json");
        match self.inner.get(&path)? {
            Some(b) => json(&path, &b).map(Some),
            None => Ok(None),
        }
    }

    /// Finishes renewal `st`, committed before a crash, of the share at `root`.
    fn finish(&self, root: &str, st: &RenewState) -> Result<(), StoreError> {
        tracing::info!(share = %root, epoch = st.epoch, "finishing a committed share renewal");
        S3Share {
            inner: self.inner.clone(),
            root: root.to_owned(),
            epoch: st.epoch.saturating_sub(1),
        }
        .finish_renewal(st)
    }

    fn share(&self, id: Uuid, index: u8, m: &Manifest) -> S3Share {
        S3Share {
            inner: self.inner.clone(),
            root: self.inner.share_root(id, index),
            epoch: m.open.epoch,
        }
    }
}

fn json<T: serde::de::DeserializeOwned>(what: &str, b: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(b).map_err(|e| StoreError::Io {
        path: what.into(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })
}

fn chunk_name(chunk: u64, nonce: u64, hash: &[u8; 32]) -> String {
    format!("{chunk:020}.{nonce:016x}.{}", hex::encode(hash))
}

/// The record a chunk object's name carries.
fn parse_chunk_name(name: &str) -> Option<(u64, Record)> {
    let mut parts = name.split('.');
    let j = parts.next()?.parse().ok()?;
    let n = u64::from_str_radix(parts.next()?, 16).ok()?;
    let h: [u8; 32] = hex::decode(parts.next()?).ok()?.try_into().ok()?;
    parts.next().is_none().then_some((j, (n, h)))
}

fn records_bytes(records: &ChunkRecords) -> Vec<u8> {
    let mut sorted: Vec<_> = records.iter().collect();
    sorted.sort_unstable_by_key(|(j, _)| **j);
    let mut out = Vec::with_capacity(sorted.len() * RECORD);
    for (j, (n, h)) in sorted {
        record_bytes(&mut out, *j, *n, h);
    }
    out
}

fn parse_records(b: &[u8]) -> ChunkRecords {
    decode_records(b).map(|(j, n, h)| (j, (n, h))).collect()
}

/// One share's objects.
struct S3Share {
    inner: Arc<Inner>,
    root: String,
    /// The live epoch (staged chunks are of the next one).
    epoch: u32,
}

impl S3Share {
    fn epoch_of(&self, area: Area) -> u32 {
        match area {
            Area::Live => self.epoch,
            Area::Staged => self.epoch.saturating_add(1),
        }
    }

    fn chunk_path(&self, epoch: u32, chunk: u64, rec: &Record) -> String {
        format!(
            "{}/e{epoch}/{}",
            self.root,
            chunk_name(chunk, rec.0, &rec.1)
        )
    }

    /// The records of epoch `epoch`: its frozen list if `frozen` and there is one, else
    /// a listing of its chunk objects (a chunk found twice is left out: sent or mended again).
    fn records(&self, epoch: u32, frozen: bool) -> Result<ChunkRecords, StoreError> {
        if frozen {
            if let Some(b) = self.inner.get(&format!("{}/e{epoch}.records", self.root))? {
                return Ok(parse_records(&b));
            }
            tracing::warn!(share = %self.root, epoch, "the records of a complete epoch are missing: listing its chunks");
        }
        let mut out = ChunkRecords::new();
        let mut twice = Vec::new();
        for (name, _) in self.inner.list(&format!("{}/e{epoch}", self.root))? {
            match parse_chunk_name(&name) {
                Some((j, r)) => {
                    if out.insert(j, r).is_some() {
                        twice.push(j);
                    }
                }
                None => {
                    tracing::warn!(share = %self.root, object = %name, "not a chunk object; ignored")
                }
            }
        }
        for j in twice {
            tracing::warn!(share = %self.root, chunk = j, "two objects for one chunk; treated as missing");
            out.remove(&j);
        }
        Ok(out)
    }

    fn put_chunks(&self, epoch: u32, chunks: &[Put<'_>]) -> Result<(), StoreError> {
        let inner = &self.inner;
        let jobs: Vec<(ObjectPath, Bytes)> = chunks
            .iter()
            .map(|c| {
                (
                    inner.path(&self.chunk_path(epoch, c.chunk, &(c.nonce, c.hash))),
                    Bytes::copy_from_slice(c.data),
                )
            })
            .collect();
        let (store, sem, part) = (
            inner.store.clone(),
            inner.requests.clone(),
            inner.part_bytes,
        );
        let first = chunks.first().map_or(0, |c| c.chunk);
        let n = chunks.len();
        inner.run(
            || format!("PUT {} chunk(s) from {first} of {}", n, self.root),
            async move {
                let puts = jobs.into_iter().map(|(path, bytes)| {
                    let (store, sem) = (store.clone(), sem.clone());
                    async move {
                        if bytes.len() <= part {
                            let _permit = sem.acquire_owned().await;
                            return store.put(&path, PutPayload::from(bytes)).await.map(drop);
                        }
                        let mut up = store.put_multipart(&path).await?;
                        let mut off = 0;
                        while off < bytes.len() {
                            let end = (off + part).min(bytes.len());
                            let _permit = sem.clone().acquire_owned().await;
                            if let Err(e) =
                                up.put_part(PutPayload::from(bytes.slice(off..end))).await
                            {
                                let _ = up.abort().await;
                                return Err(e);
                            }
                            off = end;
                        }
                        match up.complete().await {
                            Ok(_) => Ok(()),
                            Err(e) => {
                                let _ = up.abort().await;
                                Err(e)
                            }
                        }
                    }
                });
                futures_util::future::try_join_all(puts).await.map(drop)
            },
        )
    }

    fn put_key_ids(&self, epoch: u32, chunks: &[Put<'_>]) -> Result<(), StoreError> {
        if chunks.iter().all(|c| c.key_ids.is_empty()) {
            return Ok(());
        }
        let first = chunks.first().map_or(0, |c| c.chunk);
        self.inner.put(
            &format!("{}/keys/e{epoch}/{first:020}.{}", self.root, Uuid::new_v4()),
            Bytes::from(key_lines(chunks)),
        )
    }

    /// Deletes chunk objects and the frozen records of every epoch below `below`.
    fn drop_epochs_below(&self, below: u32) -> Result<(), StoreError> {
        let mut old = Vec::new();
        for (name, _) in self.inner.list(&self.root)? {
            let Some(e) = name.strip_prefix('e') else {
                continue;
            };
            let epoch = e
                .split(['/', '.'])
                .next()
                .and_then(|n| n.parse::<u32>().ok());
            if epoch.is_some_and(|n| n < below) {
                old.push(format!("{}/{name}", self.root));
            }
        }
        self.inner.delete(old)
    }
}

impl ShareIo for S3Share {
    fn put(&self, area: Area, chunks: &[Put<'_>], crash: &[Failpoint]) -> Result<(), StoreError> {
        let epoch = self.epoch_of(area);
        // The key IDs first: a chunk acknowledged always has them recorded.
        self.put_key_ids(epoch, chunks)?;
        self.put_chunks(epoch, chunks)?;
        crash.iter().for_each(|f| failpoint(*f));
        Ok(())
    }

    fn retire(&self, held: &[(u64, Record)]) -> Result<(), StoreError> {
        self.inner.delete(
            held.iter()
                .map(|(j, r)| self.chunk_path(self.epoch, *j, r))
                .collect(),
        )
    }

    fn mend(&self, chunks: &[Put<'_>]) -> Result<(), StoreError> {
        self.put_chunks(self.epoch, chunks)
    }

    fn read(&self, area: Area, chunk: u64, rec: &Record, buf: &mut [u8]) -> Result<(), StoreError> {
        let path = self.chunk_path(self.epoch_of(area), chunk, rec);
        match self.inner.get(&path)? {
            Some(b) if b.len() == buf.len() => {
                buf.copy_from_slice(&b);
                Ok(())
            }
            _ => Err(StoreError::Damaged { chunk }),
        }
    }

    fn freeze(&self, area: Area, records: &ChunkRecords) -> Result<(), StoreError> {
        let epoch = self.epoch_of(area);
        self.inner.put(
            &format!("{}/e{epoch}.records", self.root),
            Bytes::from(records_bytes(records)),
        )
    }

    fn put_manifest(&self, m: &Manifest) -> Result<(), StoreError> {
        let text = serde_json::to_vec_pretty(m).unwrap_or_default();
        self.inner
            .put(&format!("{}/manifest.json", self.root), Bytes::from(text))
    }

    fn begin_renewal(&self, st: &RenewState) -> Result<(), StoreError> {
        let next = self.epoch.saturating_add(1);
        self.inner.delete_all(&format!("{}/e{next}", self.root))?;
        self.inner
            .delete(vec![format!("{}/e{next}.records", self.root)])?;
        self.put_renewal(st)
    }

    fn put_renewal(&self, st: &RenewState) -> Result<(), StoreError> {
        let text = serde_json::to_vec(st).unwrap_or_default();
        self.inner
            .put(&format!("{}/renew.json", self.root), Bytes::from(text))
    }

    fn finish_renewal(&self, st: &RenewState) -> Result<(), StoreError> {
        let mpath = format!("{}/manifest.json", self.root);
        let Some(b) = self.inner.get(&mpath)? else {
            return Err(StoreError::Renewal(format!("{mpath} is missing")));
        };
        let mut m: Manifest = json(&mpath, &b)?;
        if m.open.epoch != st.epoch || m.renewal != Some(st.renewal) {
            m.open.epoch = st.epoch;
            m.renewal = Some(st.renewal);
            self.put_manifest(&m)?;
        }
        self.drop_epochs_below(st.epoch)?;
        self.inner.delete(vec![format!("{}/renew.json", self.root)])
    }

    fn abort_renewal(&self) -> Result<(), StoreError> {
        let next = self.epoch.saturating_add(1);
        self.inner
            .delete(vec![format!("{}/renew.json", self.root)])?;
        self.inner.delete_all(&format!("{}/e{next}", self.root))?;
        self.inner
            .delete(vec![format!("{}/e{next}.records", self.root)])
    }
}

impl Backend for S3Backend {
    fn describe(&self) -> String {
        self.inner.describe.clone()
    }

    fn open(&self, id: Uuid, index: u8) -> Result<Option<Opened>, StoreError> {
        let root = self.inner.share_root(id, index);
        // One read of the renewal state: a committed one is finished first, a pending one
        // is staged beside the share.
        let pending = match self.renewal(&root)? {
            Some(st) if st.committed => {
                self.finish(&root, &st)?;
                None
            }
            other => other,
        };
        let mpath = format!("{root}/manifest.json");
        let Some(b) = self.inner.get(&mpath)? else {
            return Ok(None);
        };
        let manifest: Manifest = json(&mpath, &b)?;
        let share = self.share(id, index, &manifest);
        let live = share.records(manifest.open.epoch, manifest.complete)?;
        let staged = match pending {
            Some(st) => Some((st, share.records(st.epoch, st.prepared)?)),
            None => None,
        };
        Ok(Some(Opened {
            io: Arc::new(share),
            manifest,
            live,
            staged,
        }))
    }

    fn create(&self, m: &Manifest) -> Result<(), StoreError> {
        let root = self.inner.share_root(m.backup_id, m.share_index);
        // Whatever a removal interrupted by a crash left under this name goes first.
        self.inner.delete_all(&root)?;
        self.share(m.backup_id, m.share_index, m).put_manifest(m)
    }

    fn remove(&self, id: Uuid, index: u8) -> Result<(), StoreError> {
        let root = self.inner.share_root(id, index);
        self.inner.delete(vec![format!("{root}/manifest.json")])?;
        self.inner.delete_all(&root)
    }

    fn backups(&self) -> Result<Vec<Uuid>, StoreError> {
        Ok(self
            .inner
            .folders("")?
            .iter()
            .filter_map(|n| Uuid::try_parse(n).ok())
            .collect())
    }

    fn shares(&self, id: Uuid) -> Result<Vec<u8>, StoreError> {
        Ok(self
            .inner
            .folders(&id.to_string())?
            .iter()
            .filter_map(|n| n.strip_prefix("share-").and_then(|i| i.parse().ok()))
            .collect())
    }

    fn recover(&self, id: Uuid, index: u8) -> Result<bool, StoreError> {
        let root = self.inner.share_root(id, index);
        match self.renewal(&root)? {
            Some(st) if st.committed => self.finish(&root, &st).map(|()| true),
            _ => Ok(false),
        }
    }

    fn put_set(&self, owner: &str, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        self.inner.put(
            &format!("sets/{owner}/{name}.json"),
            Bytes::copy_from_slice(bytes),
        )
    }

    fn set_names(&self, owner: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .inner
            .list(&format!("sets/{owner}"))?
            .into_iter()
            .filter_map(|(n, _)| n.strip_suffix(".json").map(str::to_owned))
            .collect())
    }

    fn sets(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for (name, _) in self.inner.list("sets")? {
            if !name.ends_with(".json") {
                continue;
            }
            let rest = format!("sets/{name}");
            if let Some(b) = self.inner.get(&rest)? {
                out.push((rest, b.to_vec()));
            }
        }
        Ok(out)
    }

    fn space(&self) -> Option<(u64, u64)> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_name_is_its_record() {
        let h = *blake3::hash(b"x").as_bytes();
        let name = chunk_name(7, 0xDEAD_BEEF, &h);
        assert_eq!(parse_chunk_name(&name), Some((7, (0xDEAD_BEEF, h))));
        assert_eq!(name.len(), 20 + 1 + 16 + 1 + 64);
        for bad in ["7.1", "x.1.00", &format!("{name}.tmp")] {
            assert_eq!(parse_chunk_name(bad), None);
        }
        let mut recs = ChunkRecords::new();
        recs.insert(3, (1, h));
        recs.insert(1, (2, h));
        assert_eq!(parse_records(&records_bytes(&recs)), recs);
    }

    #[test]
    fn credentials_files_need_both_keys() {
        let c: Credentials =
            toml::from_str("# site B\naccess_key_id = \"GK1\"\nsecret_access_key = \"s\"\n")
                .unwrap();
        assert_eq!(
            (c.access_key_id.as_str(), c.secret_access_key.as_str()),
            ("GK1", "s")
        );
        assert!(toml::from_str::<Credentials>("access_key_id = \"GK1\"").is_err());
        assert!(toml::from_str::<Credentials>("region = \"x\"").is_err());
    }
}
