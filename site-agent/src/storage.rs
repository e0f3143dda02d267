//! How a site agent keeps shares on disk.
//!
//! ```text
//! STORE/<backup id>/share-<i>/manifest.json   what the share is (written atomically)
//!                            /data            chunk j at offset j * chunk_size
//!                            /chunks.log      48-byte records: chunk, nonce, BLAKE3 of the chunk
//!                            /keys.log        which QKD key IDs carried each chunk
//! STORE/sets/<owner SAE in hex>/<set>.json      sample-set manifests (see `sets`)
//! ```
//!
//! Durability: a chunk is acknowledged only after its data is written and `fdatasync`ed and
//! then its record is appended to `chunks.log` and that is `fdatasync`ed too; on start the log
//! is replayed (a torn last record is ignored, the last record of a chunk wins), so an
//! acknowledged chunk survives a crash and an unacknowledged one is simply sent again.
//!
//! Rewrites (a resumed store sends a chunk of a new split): a **tombstone** record (nonce
//! [`TOMBSTONE`]) is appended and `fdatasync`ed *before* the data is overwritten, so a crash
//! at any moment leaves the chunk either recorded with the data it describes, or missing (and
//! sent again), never a record that describes other bytes. One upload at a time may write a
//! given chunk: a second one racing it is refused ([`StoreError::Busy`]) and retries. The manifest, checked and marked complete at
//! finalisation, lets the catalogue be rebuilt from the sites alone.
//!
//! Folders are created 0700 and files 0600: shares are for the agent's user alone.
//!
//! Writes use O_DIRECT with 4096-byte aligned buffers when the chunk size allows it and the
//! filesystem accepts it, and fall back to buffered writes otherwise.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use share_transfer::wire::{Manifest, ShareCheck, ShareOpen};
use sharing::format::{ShareHeader, ShareTrailer, HEADER_LEN, TRAILER_LEN};

pub use crate::aligned::{AlignedBuf, DIO_ALIGN};
use crate::staging::{self, Staging};

const RECORD: usize = 48;

/// The nonce of a tombstone record: the chunk's data is being replaced; until a later record,
/// the chunk is not held.
pub const TOMBSTONE: u64 = u64::MAX;

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("share {index} of backup {id} is not here")]
    NotFound { id: Uuid, index: u8 },
    #[error("share {index} of backup {id} exists with other parameters")]
    Conflict { id: Uuid, index: u8 },
    #[error("share {index} of backup {id} was stored by {owner}, not {caller}")]
    NotOwner {
        id: Uuid,
        index: u8,
        owner: String,
        caller: String,
    },
    #[error("share {index} of backup {id} is complete and cannot change (only damaged chunks can be repaired, with the bytes their records describe)")]
    Complete { id: Uuid, index: u8 },
    #[error("cannot finalise: {0}")]
    Finalize(String),
    #[error("chunk {chunk} is damaged (its BLAKE3 does not match the record)")]
    Damaged { chunk: u64 },
    #[error("chunk {chunk} is missing")]
    Missing { chunk: u64 },
    #[error("chunk {chunk} is being written by another upload; retry")]
    Busy { chunk: u64 },
    #[error("share renewal: {0}")]
    Renewal(String),
}

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// A point where a crash test makes the agent abort, to check what a real crash there
/// leaves (set by the configuration's `failpoint`, once per process).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Failpoint {
    /// Any write of chunks: after their data is written, before their records.
    Write,
    /// A rewrite of held chunks: after their tombstones are durable and the new data is
    /// written, before the new records.
    Rewrite,
    /// Staging a renewal: after renewed chunks are written, before their records.
    RenewStage,
    /// Committing a renewal: when the commit is asked, before the commit point.
    RenewPrecommit,
    /// Committing a renewal: after the commit point, before the staged files are swapped in.
    RenewCommit,
}

static FAILPOINT: std::sync::OnceLock<Failpoint> = std::sync::OnceLock::new();

/// Arms `f` for this process.
pub fn arm_failpoint(f: Failpoint) {
    let _ = FAILPOINT.set(f);
    tracing::warn!(failpoint = ?f, "crash-test failpoint armed: this agent will abort on purpose");
}

pub(crate) fn failpoint(at: Failpoint) {
    if FAILPOINT.get() == Some(&at) {
        tracing::error!(failpoint = ?at, "failpoint reached: aborting");
        std::process::abort();
    }
}

/// One chunk ready to be written: index, split nonce, plaintext share chunk, key IDs used.
pub struct ChunkWrite {
    pub chunk: u64,
    pub nonce: u64,
    pub data: AlignedBuf,
    pub key_ids: Vec<Uuid>,
}

/// The files of one share.
pub struct ShareFiles {
    pub id: Uuid,
    pub index: u8,
    dir: PathBuf,
    data: File,
    direct: Mutex<Option<File>>,
    log: Mutex<File>,
    keys: Mutex<File>,
    manifest: Mutex<Manifest>,
    /// chunk → (nonce, BLAKE3)
    chunks: Mutex<ChunkRecords>,
    /// Chunks an upload is writing now.
    writing: Mutex<std::collections::HashSet<u64>>,
    broken: AtomicBool,
    /// A renewal staged and not committed (see `staging`).
    staging: Mutex<Option<Arc<Staging>>>,
}

/// The chunks one upload claimed; released when dropped.
struct Claim<'a> {
    share: &'a ShareFiles,
    chunks: Vec<u64>,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut w = self.share.writing.lock().unwrap_or_else(|e| e.into_inner());
        for j in &self.chunks {
            w.remove(j);
        }
    }
}

impl ShareFiles {
    pub fn manifest(&self) -> Manifest {
        self.manifest
            .lock()
            .map(|m| m.clone())
            .unwrap_or_else(|e| e.into_inner().clone())
    }

    fn chunk_size(&self) -> usize {
        self.manifest().open.chunk_size as usize
    }

    /// `(chunk, nonce)` of every durable chunk, sorted.
    pub fn state(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self
            .chunks
            .lock()
            .map(|c| c.iter().map(|(&j, &(n, _))| (j, n)).collect())
            .unwrap_or_default();
        v.sort_unstable();
        v
    }

    /// Claims `chunks` for one upload, or says which one another upload is writing.
    fn claim(&self, chunks: Vec<u64>) -> Result<Claim<'_>, StoreError> {
        let mut w = self.writing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(&chunk) = chunks.iter().find(|j| w.contains(j)) {
            return Err(StoreError::Busy { chunk });
        }
        w.extend(chunks.iter().copied());
        Ok(Claim {
            share: self,
            chunks,
        })
    }

    /// Appends `records` to the chunk log and makes them durable.
    fn append_records(&self, records: &[u8]) -> Result<(), StoreError> {
        let log_path = self.dir.join("chunks.log");
        let mut log = self.log.lock().unwrap_or_else(|e| e.into_inner());
        log.write_all(records).map_err(io(&log_path))?;
        log.sync_data().map_err(io(&log_path))
    }

    /// Before chunks that are held are overwritten: durably records them as not held
    /// (tombstones), and forgets them, so no crash or reader sees a record of other bytes.
    /// Returns whether any was held.
    fn retire(&self, writes: &[ChunkWrite]) -> Result<bool, StoreError> {
        let held: Vec<u64> = {
            let c = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
            writes
                .iter()
                .map(|w| w.chunk)
                .filter(|j| c.contains_key(j))
                .collect()
        };
        if held.is_empty() {
            return Ok(false);
        }
        let mut records = Vec::with_capacity(held.len() * RECORD);
        for j in &held {
            record_bytes(&mut records, *j, TOMBSTONE, &[0u8; 32]);
        }
        {
            let mut c = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
            for j in &held {
                c.remove(j);
            }
        }
        self.append_records(&records)?;
        Ok(true)
    }

    /// Writes chunks durably, then records them. All chunks must be full-size. A chunk
    /// already held is first retired (see the module doc); a chunk another upload is writing
    /// is refused.
    pub fn write_chunks(&self, writes: &[ChunkWrite]) -> Result<(), StoreError> {
        if self.manifest().complete {
            return self.mend(writes);
        }
        let _claim = self.claim(writes.iter().map(|w| w.chunk).collect())?;
        let rewrite = self.retire(writes)?;
        self.write_data(writes)?;
        failpoint(Failpoint::Write);
        if rewrite {
            failpoint(Failpoint::Rewrite);
        }
        self.record(writes)
    }

    /// Repairs damaged chunks of a complete share: each write must be exactly the bytes its
    /// chunk's record describes (same split nonce, same BLAKE3), so a complete share can
    /// only ever get back what it held; the records do not change. A crash mid-write leaves
    /// the chunk as damaged as it was.
    fn mend(&self, writes: &[ChunkWrite]) -> Result<(), StoreError> {
        let complete = || StoreError::Complete {
            id: self.id,
            index: self.index,
        };
        {
            let c = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
            for w in writes {
                match c.get(&w.chunk) {
                    Some(&(n, h)) if n == w.nonce && h == *blake3::hash(&w.data).as_bytes() => {}
                    _ => return Err(complete()),
                }
            }
        }
        let _claim = self.claim(writes.iter().map(|w| w.chunk).collect())?;
        self.write_data(writes)?;
        tracing::info!(backup = %self.id, share = self.index, chunks = ?writes.iter().map(|w| w.chunk).collect::<Vec<_>>(), "damaged chunks repaired");
        Ok(())
    }

    /// Writes the chunks' data in place and `fdatasync`s it (step 2 of a write).
    fn write_data(&self, writes: &[ChunkWrite]) -> Result<(), StoreError> {
        let cs = self.chunk_size() as u64;
        let data_path = self.dir.join("data");
        let mut direct = self.direct.lock().unwrap_or_else(|e| e.into_inner());
        for w in writes {
            let off = w.chunk * cs;
            let mut done = false;
            if let Some(f) = direct.as_ref() {
                match f.write_all_at(&w.data, off) {
                    Ok(()) => done = true,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        tracing::info!(path = %data_path.display(), "O_DIRECT refused; using buffered writes");
                        *direct = None;
                    }
                    Err(e) => return Err(io(&data_path)(e)),
                }
            }
            if !done {
                self.data
                    .write_all_at(&w.data, off)
                    .map_err(io(&data_path))?;
            }
        }
        drop(direct);
        self.data.sync_data().map_err(io(&data_path))
    }

    /// Records the written chunks (step 3 of a write): durably in the log, then in memory.
    fn record(&self, writes: &[ChunkWrite]) -> Result<(), StoreError> {
        let mut records = Vec::with_capacity(writes.len() * RECORD);
        let mut key_lines = String::new();
        let mut hashes = Vec::with_capacity(writes.len());
        for w in writes {
            let h = *blake3::hash(&w.data).as_bytes();
            record_bytes(&mut records, w.chunk, w.nonce, &h);
            key_lines.push_str(&w.chunk.to_string());
            for k in &w.key_ids {
                key_lines.push(' ');
                key_lines.push_str(&k.to_string());
            }
            key_lines.push('\n');
            hashes.push((w.chunk, w.nonce, h));
        }
        self.append_records(&records)?;
        {
            let keys_path = self.dir.join("keys.log");
            let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
            keys.write_all(key_lines.as_bytes())
                .map_err(io(&keys_path))?;
        }
        let mut chunks = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
        for (j, n, h) in hashes {
            chunks.insert(j, (n, h));
        }
        Ok(())
    }

    /// Reads chunk `j` into `buf` (chunk-size long) and checks it against its record.
    pub fn read_chunk(&self, j: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let want = self
            .chunks
            .lock()
            .ok()
            .and_then(|c| c.get(&j).map(|&(_, h)| h))
            .ok_or(StoreError::Missing { chunk: j })?;
        let path = self.dir.join("data");
        self.data
            .read_exact_at(buf, j * buf.len() as u64)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => StoreError::Damaged { chunk: j },
                _ => io(&path)(e),
            })?;
        if *blake3::hash(buf).as_bytes() != want {
            self.broken.store(true, Ordering::Relaxed);
            return Err(StoreError::Damaged { chunk: j });
        }
        Ok(())
    }

    /// Marks the share complete after checking the header, trailer, chunk coverage, and every
    /// chunk's BLAKE3 against its record.
    pub fn finalize(
        &self,
        header: &[u8],
        trailer: &[u8],
        splits: &str,
    ) -> Result<Manifest, StoreError> {
        let fail = |m: String| StoreError::Finalize(m);
        let current = self.manifest();
        if current.complete {
            // Idempotent for the same share; anything else is another backup's finalisation.
            let same = current.header_hex.as_deref() == Some(&hex::encode(header)[..])
                && current.trailer_hex.as_deref() == Some(&hex::encode(trailer)[..]);
            return if same {
                Ok(current)
            } else {
                Err(StoreError::Complete {
                    id: self.id,
                    index: self.index,
                })
            };
        }
        let h: &[u8; HEADER_LEN] = header
            .try_into()
            .map_err(|_| fail("header length".into()))?;
        let t: &[u8; TRAILER_LEN] = trailer
            .try_into()
            .map_err(|_| fail("trailer length".into()))?;
        let hd = ShareHeader::decode(h).map_err(|e| fail(format!("header: {e}")))?;
        let mut m = self.manifest();
        let tr = ShareTrailer::decode(t, h, m.open.chunk_size as usize)
            .map_err(|e| fail(format!("trailer: {e}")))?;
        if hd.index != self.index
            || hd.set_id != *self.id.as_bytes()
            || hd.chunk_size != m.open.chunk_size as usize
            || tr.chunk_count != m.open.chunk_count
            || tr.original_len != m.open.original_len
        {
            return Err(fail("header or trailer does not match this share".into()));
        }
        // One look at the chunk records: coverage and the splits they came from.
        let (stored, held) = {
            let c = self.chunks.lock().unwrap_or_else(|e| e.into_inner());
            let stored = (0..m.open.chunk_count)
                .filter(|j| c.contains_key(j))
                .count() as u64;
            let held = share_transfer::wire::splits_digest(
                (0..m.open.chunk_count).map(|j| (j, c.get(&j).map_or(0, |&(n, _)| n))),
            );
            (stored, held)
        };
        if stored != m.open.chunk_count {
            return Err(fail(format!(
                "only {stored} of {} chunks are stored",
                m.open.chunk_count
            )));
        }
        if held != splits {
            return Err(fail(
                "this share holds chunks of other splits than the client's; run the store again"
                    .into(),
            ));
        }
        // Every chunk is read back and hashed: a share is never complete with a damaged one.
        let check = self.check();
        if !check.damaged.is_empty() || !check.missing.is_empty() {
            return Err(fail(format!(
                "chunks {:?} are damaged and {:?} missing on disk; run the store again",
                check.damaged, check.missing
            )));
        }
        m.header_hex = Some(hex::encode(header));
        m.trailer_hex = Some(hex::encode(trailer));
        m.complete = true;
        write_manifest(&self.dir, &m)?;
        *self.manifest.lock().unwrap_or_else(|e| e.into_inner()) = m.clone();
        Ok(m)
    }

    /// Records the backup's new placement (a share moved; see
    /// [`share_transfer::wire::PlacementUpdate`]): only a higher version changes it; the same
    /// version with the same placement is a no-op.
    pub fn set_placement(
        &self,
        placement: &[String],
        version: u32,
    ) -> Result<Manifest, StoreError> {
        let mut m = self.manifest();
        if m.open.placement_version == version && m.open.placement == placement {
            return Ok(m);
        }
        if version <= m.open.placement_version
            || placement.len() != usize::from(m.open.scheme.n)
            || !m.complete
        {
            return Err(StoreError::Conflict {
                id: self.id,
                index: self.index,
            });
        }
        m.open.placement = placement.to_vec();
        m.open.placement_version = version;
        write_manifest(&self.dir, &m)?;
        *self.manifest.lock().unwrap_or_else(|e| e.into_inner()) = m.clone();
        Ok(m)
    }

    /// The renewal staged for this share, if any.
    pub fn staging(&self) -> Option<Arc<Staging>> {
        self.staging
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Starts staging renewal `renewal` to `epoch`: the share must be complete and at the
    /// epoch before; the same renewal again is a no-op, another one pending is refused.
    pub fn begin_renewal(&self, renewal: Uuid, epoch: u32) -> Result<Arc<Staging>, StoreError> {
        let m = self.manifest();
        let mut slot = self.staging.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slot.as_ref() {
            if s.renewal() == renewal && s.epoch() == epoch {
                return Ok(s.clone());
            }
            return Err(StoreError::Renewal(format!(
                "renewal {} to epoch {} is pending here: finish or abort it first",
                s.renewal(),
                s.epoch()
            )));
        }
        if !m.complete {
            return Err(StoreError::Renewal(
                "the share is not complete: finish the store or repair it first".into(),
            ));
        }
        if m.open.epoch.checked_add(1) != Some(epoch) {
            return Err(StoreError::Renewal(format!(
                "the share is at epoch {}; a renewal moves it to {}, not {epoch}",
                m.open.epoch,
                m.open.epoch.saturating_add(1)
            )));
        }
        let s = Arc::new(Staging::begin(&self.dir, &m, renewal, epoch)?);
        *slot = Some(s.clone());
        Ok(s)
    }

    /// Forgets the staged renewal (after it was committed or aborted).
    pub fn end_renewal(&self) {
        *self.staging.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Re-reads every chunk and compares it with its record.
    pub fn check(&self) -> ShareCheck {
        let m = self.manifest();
        let cs = m.open.chunk_size as usize;
        let mut buf = vec![0u8; cs];
        let mut out = ShareCheck {
            share_index: self.index,
            complete: m.complete,
            chunk_count: m.open.chunk_count,
            chunks_ok: 0,
            missing: Vec::new(),
            damaged: Vec::new(),
        };
        for j in 0..m.open.chunk_count {
            match self.read_chunk(j, &mut buf) {
                Ok(()) => out.chunks_ok += 1,
                Err(StoreError::Missing { .. }) => out.missing.push(j),
                Err(_) => out.damaged.push(j),
            }
        }
        out
    }
}

/// Opens a chunk log (created if absent) and replays it: chunk → (nonce, BLAKE3). A torn
/// last record (a crash mid-append) is cut off so later appends stay aligned; a tombstone
/// removes its chunk; the last record of a chunk wins.
pub(crate) fn open_log(path: &Path) -> Result<(File, ChunkRecords), StoreError> {
    let mut log = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    let mut raw = Vec::new();
    log.read_to_end(&mut raw).map_err(io(path))?;
    let mut chunks = HashMap::new();
    for rec in raw.chunks_exact(RECORD) {
        let j = u64::from_le_bytes(rec[0..8].try_into().unwrap_or([0; 8]));
        let n = u64::from_le_bytes(rec[8..16].try_into().unwrap_or([0; 8]));
        let mut h = [0u8; 32];
        h.copy_from_slice(&rec[16..48]);
        if n == TOMBSTONE {
            chunks.remove(&j);
        } else {
            chunks.insert(j, (n, h));
        }
    }
    if raw.len() % RECORD != 0 {
        log.set_len((raw.len() / RECORD * RECORD) as u64)
            .map_err(io(path))?;
    }
    Ok((log, chunks))
}

/// Chunk → (split nonce, BLAKE3 of its bytes), as a chunk log records them.
pub(crate) type ChunkRecords = HashMap<u64, (u64, [u8; 32])>;

/// One chunk log record.
pub(crate) fn record_bytes(out: &mut Vec<u8>, chunk: u64, nonce: u64, hash: &[u8; 32]) {
    out.extend_from_slice(&chunk.to_le_bytes());
    out.extend_from_slice(&nonce.to_le_bytes());
    out.extend_from_slice(hash);
}

/// Creates `dir` and its missing parents with mode 0700 (whatever the umask: a mode can only
/// lose bits to it); an existing folder is left as it is.
fn private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io(dir))
}

pub(crate) fn write_manifest(dir: &Path, m: &Manifest) -> Result<(), StoreError> {
    let text = serde_json::to_vec_pretty(m).unwrap_or_default();
    write_atomic(dir, "manifest.json", &text)
}

/// Replaces `dir/name` with `bytes` atomically and durably: a temporary file, synced, renamed
/// over it, then the folder synced. A crash leaves the old file or the new one, never a mix.
pub(crate) fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    let tmp = dir.join(format!("{name}.tmp"));
    let fin = dir.join(name);
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, &fin).map_err(io(&fin))?;
    sync_dir(dir)
}

/// Makes the entries of folder `dir` (new, renamed or removed files) durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// The JSON file at `path`, parsed; `None` if it does not exist.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(
    path: &Path,
) -> Result<Option<T>, StoreError> {
    match fs::read(path) {
        Ok(t) => serde_json::from_slice(&t)
            .map(Some)
            .map_err(|e| StoreError::Io {
                path: path.to_owned(),
                source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
            }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(path)(e)),
    }
}

/// Opens (creating it, 0600) a file of chunks written in place at their offsets.
pub(crate) fn open_data(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(io(path))
}

/// Opens (creating it, 0600) a file only ever appended to.
pub(crate) fn open_append(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))
}

/// All shares kept by one agent.
pub struct Storage {
    root: PathBuf,
    direct_io: bool,
    open: Mutex<HashMap<(Uuid, u8), Arc<ShareFiles>>>,
}

impl Storage {
    pub fn new(root: &Path, direct_io: bool) -> Result<Self, StoreError> {
        private_dir(root)?;
        Ok(Storage {
            root: root.to_owned(),
            direct_io,
            open: Mutex::new(HashMap::new()),
        })
    }

    fn share_dir(&self, id: Uuid, index: u8) -> PathBuf {
        self.root
            .join(id.to_string())
            .join(format!("share-{index}"))
    }

    /// Opens a share for storing, creating it if new. Re-opening with the same parameters
    /// by the same client resumes it.
    pub fn create(
        &self,
        id: Uuid,
        index: u8,
        open: &ShareOpen,
        client: &str,
    ) -> Result<Arc<ShareFiles>, StoreError> {
        if let Some(s) = self.get(id, index)? {
            let m = s.manifest();
            if m.open.scheme != open.scheme
                || m.open.chunk_size != open.chunk_size
                || m.open.chunk_count != open.chunk_count
                || m.open.original_len != open.original_len
                || m.open.epoch != open.epoch
            {
                return Err(StoreError::Conflict { id, index });
            }
            if m.client_sae != client {
                return Err(StoreError::NotOwner {
                    id,
                    index,
                    owner: m.client_sae,
                    caller: client.to_owned(),
                });
            }
            return Ok(s);
        }
        let dir = self.share_dir(id, index);
        private_dir(&dir)?;
        let m = Manifest {
            backup_id: id,
            share_index: index,
            open: open.clone(),
            client_sae: client.to_owned(),
            header_hex: None,
            trailer_hex: None,
            complete: false,
            renewal: None,
        };
        write_manifest(&dir, &m)?;
        let share = self
            .get(id, index)?
            .ok_or(StoreError::NotFound { id, index })?;
        // The new files and folders must survive a power loss too.
        for d in [
            dir.as_path(),
            dir.parent().unwrap_or(&self.root),
            &self.root,
        ] {
            sync_dir(d)?;
        }
        Ok(share)
    }

    /// The share, if this agent holds it.
    pub fn get(&self, id: Uuid, index: u8) -> Result<Option<Arc<ShareFiles>>, StoreError> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = open.get(&(id, index)) {
            return Ok(Some(s.clone()));
        }
        let dir = self.share_dir(id, index);
        // A renewal committed before a crash is finished before anything is read.
        staging::recover(&dir)?;
        let Some(manifest) = read_json::<Manifest>(&dir.join("manifest.json"))? else {
            return Ok(None);
        };
        let staged = Staging::open(&dir, &manifest)?.map(Arc::new);
        let data_path = dir.join("data");
        let data = open_data(&data_path)?;
        let cs = manifest.open.chunk_size as usize;
        let direct = if self.direct_io && cs > 0 && cs.is_multiple_of(DIO_ALIGN) {
            OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&data_path)
                .ok()
        } else {
            None
        };
        let (log, chunks) = open_log(&dir.join("chunks.log"))?;
        let keys = open_append(&dir.join("keys.log"))?;
        let s = Arc::new(ShareFiles {
            id,
            index,
            dir,
            data,
            direct: Mutex::new(direct),
            log: Mutex::new(log),
            keys: Mutex::new(keys),
            manifest: Mutex::new(manifest),
            chunks: Mutex::new(chunks),
            writing: Mutex::new(std::collections::HashSet::new()),
            broken: AtomicBool::new(false),
            staging: Mutex::new(staged),
        });
        open.insert((id, index), s.clone());
        Ok(Some(s))
    }

    /// Finishes every share renewal a crash left committed but not swapped in (at start,
    /// so that a restarted agent serves renewed shares from its first request).
    pub fn recover_renewals(&self) -> Result<usize, StoreError> {
        let mut done = 0;
        let rd = fs::read_dir(&self.root).map_err(io(&self.root))?;
        for e in rd.flatten() {
            if Uuid::try_parse(&e.file_name().to_string_lossy()).is_err() {
                continue;
            }
            for share in fs::read_dir(e.path()).into_iter().flatten().flatten() {
                let dir = share.path();
                if staging::recover(&dir)? {
                    done += 1;
                }
            }
        }
        Ok(done)
    }

    /// Removes share `i` of backup `id` from disk (renamed aside first, so a crash never
    /// leaves half a share under its name).
    pub fn remove(&self, id: Uuid, index: u8) -> Result<(), StoreError> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(id, index));
        let dir = self.share_dir(id, index);
        let parent = self.root.join(id.to_string());
        let aside = parent.join(format!(".removed-share-{index}-{}", Uuid::new_v4()));
        fs::rename(&dir, &aside).map_err(io(&dir))?;
        sync_dir(&parent)?;
        fs::remove_dir_all(&aside).map_err(io(&aside))
    }

    /// Drops the cached files of share `i` of backup `id` and opens them again (after a
    /// renewal swapped them); requests already holding the old ones finish on them.
    pub fn reload(&self, id: Uuid, index: u8) -> Result<Option<Arc<ShareFiles>>, StoreError> {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&(id, index));
        self.get(id, index)
    }

    /// Every share of backup `id` held here.
    pub fn shares_of(&self, id: Uuid) -> Result<Vec<Arc<ShareFiles>>, StoreError> {
        let dir = self.root.join(id.to_string());
        let mut out = Vec::new();
        let rd = match fs::read_dir(&dir) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(io(&dir)(e)),
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let Some(idx) = name.to_str().and_then(|n| n.strip_prefix("share-")) else {
                continue;
            };
            if let Ok(i) = idx.parse::<u8>() {
                if let Some(s) = self.get(id, i)? {
                    out.push(s);
                }
            }
        }
        out.sort_by_key(|s| s.index);
        Ok(out)
    }

    /// Manifests of every share held here.
    pub fn list(&self) -> Result<Vec<Manifest>, StoreError> {
        let mut out = Vec::new();
        let rd = fs::read_dir(&self.root).map_err(io(&self.root))?;
        for e in rd.flatten() {
            let Some(id) = e.file_name().to_str().and_then(|n| Uuid::try_parse(n).ok()) else {
                continue;
            };
            for s in self.shares_of(id)? {
                out.push(s.manifest());
            }
        }
        out.sort_by_key(|m| (m.open.created, m.backup_id));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use share_transfer::wire::{SchemeInfo, SchemeName};

    const CS: usize = 4096;

    fn open() -> ShareOpen {
        ShareOpen {
            scheme: SchemeInfo {
                kind: SchemeName::Xor,
                k: 2,
                n: 3,
            },
            chunk_size: CS as u32,
            chunk_count: 4,
            original_len: 4 * CS as u64,
            name: "f".into(),
            created: 1,
            placement: Vec::new(),
            readers: None,
            epoch: 0,
            placement_version: 0,
        }
    }

    fn chunk(j: u64, nonce: u64, byte: u8) -> ChunkWrite {
        let mut data = AlignedBuf::new(CS);
        data.fill(byte);
        ChunkWrite {
            chunk: j,
            nonce,
            data,
            key_ids: Vec::new(),
        }
    }

    fn reopen(dir: &Path, id: Uuid) -> Arc<ShareFiles> {
        Storage::new(dir, false)
            .unwrap()
            .get(id, 0)
            .unwrap()
            .expect("share")
    }

    #[test]
    fn a_crash_mid_rewrite_leaves_the_chunk_missing_never_a_record_of_other_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let id = Uuid::new_v4();
        let store = Storage::new(dir.path(), false).unwrap();
        let share = store.create(id, 0, &open(), "C").unwrap();
        share.write_chunks(&[chunk(0, 1, 0xAA)]).unwrap();
        share.write_chunks(&[chunk(1, 1, 0xBB)]).unwrap();
        // A resumed store rewrites chunk 0 from a new split; the agent dies after the data
        // is overwritten, before the new record (steps 1 and 2 of 3).
        let rewrite = [chunk(0, 2, 0xCC)];
        share.retire(&rewrite).unwrap();
        share.write_data(&rewrite).unwrap();
        drop(share);
        drop(store);
        let share = reopen(dir.path(), id);
        assert_eq!(
            share.state(),
            vec![(1, 1)],
            "chunk 0 is not held, so it is sent again"
        );
        let mut buf = vec![0u8; CS];
        assert!(matches!(
            share.read_chunk(0, &mut buf),
            Err(StoreError::Missing { chunk: 0 })
        ));
        let check = share.check();
        assert_eq!(
            (check.missing.clone(), check.damaged.clone()),
            (vec![0, 2, 3], vec![])
        );
        // Sent again, it is held with the new split and reads back.
        share.write_chunks(&[chunk(0, 2, 0xCC)]).unwrap();
        drop(share);
        let share = reopen(dir.path(), id);
        share.read_chunk(0, &mut buf).unwrap();
        assert_eq!(buf, vec![0xCC; CS]);
        assert_eq!(share.state(), vec![(0, 2), (1, 1)]);
    }

    #[test]
    fn a_complete_share_takes_back_only_the_bytes_its_records_describe() {
        let dir = tempfile::tempdir().unwrap();
        let id = Uuid::new_v4();
        let store = Storage::new(dir.path(), false).unwrap();
        let share = store.create(id, 0, &open(), "C").unwrap();
        share
            .write_chunks(&[chunk(0, 1, 0xAA), chunk(1, 1, 0xBB)])
            .unwrap();
        let mut m = share.manifest();
        m.complete = true;
        write_manifest(&share.dir, &m).unwrap();
        *share.manifest.lock().unwrap() = m;
        // Chunk 1 rots on disk.
        share.data.write_all_at(&[0xBC], CS as u64 + 9).unwrap();
        let mut buf = vec![0u8; CS];
        assert!(share.read_chunk(1, &mut buf).is_err());
        for wrong in [chunk(1, 1, 0xBC), chunk(1, 2, 0xBB), chunk(2, 1, 0xBB)] {
            assert!(matches!(
                share.write_chunks(&[wrong]),
                Err(StoreError::Complete { .. })
            ));
        }
        share.write_chunks(&[chunk(1, 1, 0xBB)]).unwrap();
        share.read_chunk(1, &mut buf).unwrap();
        assert_eq!(buf, vec![0xBB; CS]);
        assert_eq!(share.state(), vec![(0, 1), (1, 1)], "records unchanged");
    }

    #[test]
    fn two_uploads_never_write_one_chunk_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Storage::new(dir.path(), false).unwrap();
        let share = store.create(Uuid::new_v4(), 0, &open(), "C").unwrap();
        let claim = share.claim(vec![2, 3]).unwrap();
        assert!(matches!(
            share.write_chunks(&[chunk(1, 1, 1), chunk(3, 1, 1)]),
            Err(StoreError::Busy { chunk: 3 })
        ));
        assert!(
            share.state().is_empty(),
            "nothing of the refused upload was written"
        );
        drop(claim);
        share
            .write_chunks(&[chunk(1, 1, 1), chunk(3, 1, 1)])
            .unwrap();
        assert_eq!(share.state().len(), 2);
    }
}
