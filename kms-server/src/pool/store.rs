//! The durable key pool: key bytes in segment files, the state of every byte and key in an
//! embedded transactional database.
//!
//! Layout under `store_dir`:
//! - `state.redb` ([redb]: crash-safe, copy-on-write B-trees, `fsync` on every commit): per
//!   stream its end and which byte ranges are taken ([`StreamMeta`]); per key awaiting slaves,
//!   its master, pending slaves, age and where its bytes sit ([`RecordMeta`]). No key bytes.
//! - `pool/<stream>/<segment>.key`: the key bytes of each stream, at their stream offset
//!   (segments of [`SEGMENT_BYTES`]). Bytes are written and `fdatasync`ed *before* the
//!   transaction that makes them part of the pool commits; bytes that are consumed are
//!   overwritten with zeros in place (then `fdatasync`ed), and a segment file is removed once
//!   every byte in it is consumed. redb is not used for key bytes because it does not
//!   overwrite the pages it frees.
//!
//! The folders are created 0700 and every file 0600 (key bytes and the state that locates
//! them are for the KME's user alone).
//!
//! All writes go through one committer thread in the order the KME made its changes (the
//! caller enqueues under the KME's state lock), batched: one group commit serves every
//! request that arrived meanwhile. A caller acts on a change (hands a key out, acknowledges a
//! block or a registration) only after its [`Store::submit`] resolved: so after `kill -9`
//! the store never shows a byte as free that left the KME, and never misses a key that a
//! peer or SAE was told is held.
//!
//! A failure to write is sticky: the store refuses all later work, and so does the KME, until
//! it is restarted and reloads the last committed state.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use secret_buf::SecretBuf;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Size of one segment file of a stream.
pub const SEGMENT_BYTES: u64 = 16 << 20;

const STREAMS: TableDefinition<&str, &[u8]> = TableDefinition::new("streams");
const RECORDS: TableDefinition<u128, &[u8]> = TableDefinition::new("records");

/// Why the store failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    #[error("key store {path}: {message}")]
    Io { path: String, message: String },
    #[error("key store database: {0}")]
    Db(String),
    #[error("key store is unusable after an earlier write failure; restart the KME")]
    Failed,
}

fn io(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Io {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

fn db(e: impl std::fmt::Display) -> StoreError {
    StoreError::Db(e.to_string())
}

/// The persistent state of one stream: everything in `[0, end)` not listed in `taken` is
/// held and free.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamMeta {
    /// Offset just past the last appended byte (the next block goes here).
    pub end: u64,
    /// Next byte the owner allocates (owner and local streams).
    pub cursor: u64,
    /// Sorted, disjoint ranges `[start, end)` below `end` that are taken (consumed, or held by
    /// a key record).
    pub taken: Vec<(u64, u64)>,
}

/// The persistent state of a key awaiting slaves. Its bytes sit in `stream` at `offset`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordMeta {
    pub master: String,
    pub pending: Vec<String>,
    /// Seconds since the Unix epoch when the master obtained the key.
    pub created_unix: u64,
    pub stream: String,
    pub offset: u64,
    pub len: u64,
    /// False while the master's KME is still registering the key at the other slaves' KME:
    /// not deliverable yet (a record left unready by a crash just expires).
    #[serde(default = "yes")]
    pub ready: bool,
}

fn yes() -> bool {
    true
}

/// A change to the persisted key records.
pub enum RecordOp {
    Put(Uuid, RecordMeta),
    Delete(Uuid),
}

/// One set of changes, applied atomically with respect to a crash (except that wipes and
/// segment removals happen just after the commit, and are redone at the next start if a
/// crash interrupts them).
#[derive(Default)]
pub struct Batch {
    /// New key bytes: (stream, offset, bytes).
    pub appends: Vec<(String, u64, SecretBuf)>,
    /// The new state of streams (later entries for a stream win).
    pub streams: Vec<(String, StreamMeta)>,
    /// Record changes, applied in order (a later put or delete of a key wins).
    pub records: Vec<RecordOp>,
    /// Consumed ranges whose bytes are to be overwritten: (stream, offset, len).
    pub wipes: Vec<(String, u64, u64)>,
    /// Everything below this offset of the stream is consumed: its segment files can go.
    pub low_water: Vec<(String, u64)>,
}

impl Batch {
    pub fn is_empty(&self) -> bool {
        self.appends.is_empty()
            && self.streams.is_empty()
            && self.records.is_empty()
            && self.wipes.is_empty()
            && self.low_water.is_empty()
    }

    fn merge(&mut self, other: Batch) {
        self.appends.extend(other.appends);
        self.streams.extend(other.streams);
        self.records.extend(other.records);
        self.wipes.extend(other.wipes);
        self.low_water.extend(other.low_water);
    }
}

/// What the store held at start.
pub struct Loaded {
    /// Every stream's state; its free bytes stay in the segment files, read when taken
    /// (through [`Store::spill`]).
    pub streams: HashMap<String, StreamMeta>,
    /// Keys awaiting slaves; their bytes stay on disk ([`Store::read`]).
    pub records: Vec<(Uuid, RecordMeta)>,
}

type Done = tokio::sync::oneshot::Sender<Result<(), StoreError>>;

/// Per stream: the offset below which every appended byte is written to its segment files
/// (advanced by the committer after each write, read by [`Store::spill`]'s readers).
type Written = Arc<std::sync::Mutex<HashMap<String, Arc<AtomicU64>>>>;

fn written_of(w: &Written, stream: &str) -> Arc<AtomicU64> {
    w.lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(stream.to_owned())
        .or_default()
        .clone()
}

/// Handle to the durable store (cheap to clone).
#[derive(Clone)]
pub struct Store {
    tx: mpsc::Sender<(Batch, Option<Done>)>,
    failed: Arc<AtomicBool>,
    /// `store_dir/pool`, for reading the bytes of keys awaiting slaves.
    pool: PathBuf,
    written: Written,
}

impl Store {
    /// Opens (or creates) the store in `dir`, scrubs bytes that a crash left unwiped, and
    /// returns what it holds.
    pub fn open(dir: &Path) -> Result<(Store, Loaded), StoreError> {
        private_dir(dir)?;
        private_dir(&dir.join("pool"))?;
        let path = dir.join("state.redb");
        private_file(&path)?;
        let database = redb::Database::create(&path).map_err(db)?;
        let segments = Segments {
            root: dir.join("pool"),
            files: HashMap::new(),
        };
        let (wipe_tx, wipe_rx) = mpsc::channel::<Batch>();
        let written = Written::default();
        let mut committer = Committer {
            db: database,
            segments,
            wiper: wipe_tx,
            written: written.clone(),
        };
        let loaded = committer.load()?;
        for (name, meta) in &loaded.streams {
            written_of(&written, name).store(meta.end, Ordering::Release);
        }
        let (tx, rx) = mpsc::channel::<(Batch, Option<Done>)>();
        let failed = Arc::new(AtomicBool::new(false));
        let flag = failed.clone();
        std::thread::Builder::new()
            .name("key-store".into())
            .spawn(move || committer.run(rx, flag))
            .map_err(|e| io(dir, e))?;
        let mut wiper = Segments {
            root: dir.join("pool"),
            files: HashMap::new(),
        };
        let flag = failed.clone();
        std::thread::Builder::new()
            .name("key-wiper".into())
            .spawn(move || {
                while let Ok(mut batch) = wipe_rx.recv() {
                    while let Ok(more) = wipe_rx.try_recv() {
                        batch.merge(more);
                    }
                    if let Err(e) = wiper.cleanup(&batch) {
                        tracing::error!(error = %e, "key store could not overwrite consumed key bytes; refusing further key service until restart");
                        flag.store(true, Ordering::Release);
                    }
                }
            })
            .map_err(|e| io(dir, e))?;
        Ok((
            Store {
                tx,
                failed,
                pool: dir.join("pool"),
                written,
            },
            loaded,
        ))
    }

    /// Queues `batch` and returns a future that resolves once it is durable. Enqueue under
    /// the same lock that made the changes, so batches reach the disk in order.
    pub fn submit(
        &self,
        batch: Batch,
    ) -> impl std::future::Future<Output = Result<(), StoreError>> + Send + 'static {
        let (done, rx) = tokio::sync::oneshot::channel();
        let sent = if self.failed.load(Ordering::Acquire) {
            Err(StoreError::Failed)
        } else {
            self.tx
                .send((batch, Some(done)))
                .map_err(|_| StoreError::Failed)
        };
        async move {
            sent?;
            rx.await.unwrap_or(Err(StoreError::Failed))
        }
    }

    /// A reader of the bytes of keys awaiting slaves that a restart left on disk only
    /// (it keeps the segment files it opens until dropped). Safe beside the committer: a
    /// record's range is neither overwritten nor unlinked before the record's deletion is
    /// committed.
    pub fn reader(&self) -> StoredReader {
        StoredReader(Segments {
            root: self.pool.clone(),
            files: HashMap::new(),
        })
    }

    /// A reader of `stream`'s free bytes that are no longer kept in memory (see
    /// [`crate::pool::stream::Spill`]). Safe beside the committer and the wiper: free bytes
    /// are written before the offset it reports moves past them, and neither overwritten
    /// nor unlinked before they are taken.
    pub fn spill(&self, stream: &str) -> Box<dyn crate::pool::stream::Spill> {
        Box::new(SegmentSpill {
            stream: stream.to_owned(),
            segments: Segments {
                root: self.pool.clone(),
                files: HashMap::new(),
            },
            written: written_of(&self.written, stream),
        })
    }

    /// Queues `batch` without waiting (for wipes and housekeeping).
    pub fn submit_nowait(&self, batch: Batch) {
        if !batch.is_empty() {
            let _ = self.tx.send((batch, None));
        }
    }
}

/// Reads key bytes from the segment files (see [`Store::reader`]).
pub struct StoredReader(Segments);

impl StoredReader {
    /// Reads `len` bytes at `offset` of `stream`.
    pub fn read(&mut self, stream: &str, offset: u64, len: u64) -> Result<SecretBuf, StoreError> {
        self.0.read(stream, offset, len)
    }
}

/// A stream's bytes read back from its segment files (see [`Store::spill`]).
struct SegmentSpill {
    stream: String,
    segments: Segments,
    written: Arc<AtomicU64>,
}

impl crate::pool::stream::Spill for SegmentSpill {
    fn read_into(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.segments
            .read_into(&self.stream, offset, buf)
            .map_err(|e| e.to_string())
    }

    fn durable_end(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    fn forget_below(&mut self, low: u64) {
        // Segments wholly below `low` are consumed: the wiper unlinks them, and an open
        // file would keep their blocks allocated.
        self.segments
            .files
            .retain(|(_, seg), _| segment_range(*seg).1 > low);
    }
}

struct Segments {
    root: PathBuf,
    files: HashMap<(String, u64), File>,
}

/// A stream's folder name: the stream name with anything but `[A-Za-z0-9_-]` hex-escaped.
fn folder(stream: &str) -> String {
    let mut s = String::with_capacity(stream.len());
    for b in stream.bytes() {
        if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' {
            s.push(b as char);
        } else {
            s.push_str(&format!("%{b:02x}"));
        }
    }
    s
}

fn unfolder(name: &str) -> Option<String> {
    let mut out = Vec::with_capacity(name.len());
    let b = name.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            out.push(u8::from_str_radix(name.get(i + 1..i + 3)?, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// The stream offsets `[start, end)` that segment `seg` holds.
fn segment_range(seg: u64) -> (u64, u64) {
    (
        seg.saturating_mul(SEGMENT_BYTES),
        seg.saturating_add(1).saturating_mul(SEGMENT_BYTES),
    )
}

impl Segments {
    /// The segment numbers of `stream` present on disk.
    fn on_disk(&self, stream: &str) -> Vec<u64> {
        let Ok(entries) = std::fs::read_dir(self.root.join(folder(stream))) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".key"))
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .collect()
    }

    /// Unlinks a segment file (its bytes must already be overwritten).
    fn remove(&mut self, stream: &str, seg: u64) -> Result<(), StoreError> {
        self.files.remove(&(stream.to_owned(), seg));
        let p = self.path(stream, seg);
        std::fs::remove_file(&p).map_err(|e| io(&p, e))
    }

    fn path(&self, stream: &str, seg: u64) -> PathBuf {
        self.root.join(folder(stream)).join(format!("{seg:08}.key"))
    }

    fn file(&mut self, stream: &str, seg: u64, create: bool) -> Result<Option<&File>, StoreError> {
        let key = (stream.to_owned(), seg);
        if !self.files.contains_key(&key) {
            let path = self.path(stream, seg);
            if !create && !path.exists() {
                return Ok(None);
            }
            let dir = self.root.join(folder(stream));
            if create && !dir.exists() {
                private_dir(&dir)?;
                sync_dir(&self.root)?;
            }
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(create)
                .truncate(false)
                .mode(0o600)
                .open(&path)
                .map_err(|e| io(&path, e))?;
            if create {
                sync_dir(&dir)?;
            }
            self.files.insert(key.clone(), f);
        }
        Ok(self.files.get(&key))
    }

    /// Writes `data` at stream offset `off`; returns the segments touched.
    fn write(
        &mut self,
        stream: &str,
        off: u64,
        data: &[u8],
        touched: &mut HashSet<(String, u64)>,
    ) -> Result<(), StoreError> {
        let mut pos = 0usize;
        while pos < data.len() {
            let abs = off + pos as u64;
            let seg = abs / SEGMENT_BYTES;
            let in_seg = abs % SEGMENT_BYTES;
            let n = ((SEGMENT_BYTES - in_seg) as usize).min(data.len() - pos);
            let path = self.path(stream, seg);
            let f = self
                .file(stream, seg, true)?
                .ok_or_else(|| io(&path, "segment missing"))?;
            f.write_all_at(&data[pos..pos + n], in_seg)
                .map_err(|e| io(&path, e))?;
            touched.insert((stream.to_owned(), seg));
            pos += n;
        }
        Ok(())
    }

    /// Overwrites `[off, off+len)` with zeros where a segment file exists.
    fn zero(
        &mut self,
        stream: &str,
        off: u64,
        len: u64,
        touched: &mut HashSet<(String, u64)>,
    ) -> Result<(), StoreError> {
        static ZEROS: [u8; 64 * 1024] = [0u8; 64 * 1024];
        let end = off.saturating_add(len);
        let mut pos = off;
        while pos < end {
            let seg = pos / SEGMENT_BYTES;
            let in_seg = pos % SEGMENT_BYTES;
            let n = (SEGMENT_BYTES - in_seg).min(end - pos);
            let path = self.path(stream, seg);
            if let Some(f) = self.file(stream, seg, false)? {
                let size = f.metadata().map_err(|e| io(&path, e))?.len();
                let stop = (in_seg + n).min(size);
                let mut p = in_seg;
                while p < stop {
                    let k = ((stop - p) as usize).min(ZEROS.len());
                    f.write_all_at(&ZEROS[..k], p).map_err(|e| io(&path, e))?;
                    p += k as u64;
                }
                touched.insert((stream.to_owned(), seg));
            }
            pos += n;
        }
        Ok(())
    }

    fn read(&mut self, stream: &str, off: u64, len: u64) -> Result<SecretBuf, StoreError> {
        let mut out = SecretBuf::zeroed(len as usize);
        self.read_into(stream, off, &mut out)?;
        Ok(out)
    }

    fn read_into(&mut self, stream: &str, off: u64, out: &mut [u8]) -> Result<(), StoreError> {
        let len = out.len() as u64;
        let mut pos = 0u64;
        while pos < len {
            let abs = off + pos;
            let seg = abs / SEGMENT_BYTES;
            let in_seg = abs % SEGMENT_BYTES;
            let n = (SEGMENT_BYTES - in_seg).min(len - pos);
            let path = self.path(stream, seg);
            let f = self
                .file(stream, seg, false)?
                .ok_or_else(|| io(&path, "segment file missing: key bytes lost"))?;
            f.read_exact_at(&mut out[pos as usize..(pos + n) as usize], in_seg)
                .map_err(|e| io(&path, e))?;
            pos += n;
        }
        Ok(())
    }

    fn sync(&mut self, touched: &HashSet<(String, u64)>) -> Result<(), StoreError> {
        for (stream, seg) in touched {
            let path = self.path(stream, *seg);
            if let Some(f) = self.files.get(&(stream.clone(), *seg)) {
                f.sync_data().map_err(|e| io(&path, e))?;
            }
        }
        Ok(())
    }

    /// Removes the segment files of `stream` that lie wholly below `low`.
    fn drop_below(&mut self, stream: &str, low: u64) -> Result<(), StoreError> {
        let mut removed = false;
        for seg in self.on_disk(stream) {
            let (start, end) = segment_range(seg);
            if end <= low {
                // Its bytes were overwritten when they were consumed; make sure, then unlink.
                let mut touched = HashSet::new();
                self.zero(stream, start, end - start, &mut touched)?;
                self.sync(&touched)?;
                self.remove(stream, seg)?;
                removed = true;
            }
        }
        if removed {
            sync_dir(&self.root.join(folder(stream)))?;
        }
        Ok(())
    }

    /// After a commit: overwrite consumed bytes, drop consumed segments.
    fn cleanup(&mut self, batch: &Batch) -> Result<(), StoreError> {
        let mut touched = HashSet::new();
        // Keys are consumed in runs (a batch of keys is one contiguous range): merge first,
        // so a thousand keys cost one write, not a thousand.
        let mut by_stream: HashMap<&str, Vec<(u64, u64)>> = HashMap::new();
        for (stream, off, len) in &batch.wipes {
            by_stream
                .entry(stream)
                .or_default()
                .push((*off, off.saturating_add(*len)));
        }
        for (stream, ranges) in by_stream {
            for (s, e) in merge(&ranges) {
                self.zero(stream, s, e - s, &mut touched)?;
            }
        }
        self.sync(&touched)?;
        for (stream, low) in &batch.low_water {
            self.drop_below(stream, *low)?;
        }
        Ok(())
    }

    fn streams_on_disk(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Vec::new();
        };
        entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(unfolder))
            .collect()
    }
}

/// Creates `dir` (and its parents) if missing, and makes it 0700: key material lives below.
fn private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| io(dir, e))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(|e| io(dir, e))
}

/// Creates `path` if missing, and makes it 0600.
fn private_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::PermissionsExt;
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| io(path, e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| io(path, e))
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io(dir, e))
}

/// Complement of sorted disjoint `ranges` within `[lo, hi)`.
pub fn gaps(ranges: &[(u64, u64)], lo: u64, hi: u64) -> Vec<(u64, u64)> {
    let mut out = Vec::new();
    let mut pos = lo;
    for &(s, e) in ranges {
        if e <= pos {
            continue;
        }
        if s >= hi {
            break;
        }
        if s > pos {
            out.push((pos, s.min(hi)));
        }
        pos = pos.max(e);
    }
    if pos < hi {
        out.push((pos, hi));
    }
    out
}

struct Committer {
    db: redb::Database,
    segments: Segments,
    /// Overwrites consumed bytes and removes consumed segments, off the commit path.
    wiper: mpsc::Sender<Batch>,
    written: Written,
}

impl Committer {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        let mut streams: HashMap<String, StreamMeta> = HashMap::new();
        let mut records = Vec::new();
        {
            let w = self.db.begin_write().map_err(db)?;
            w.open_table(STREAMS).map_err(db)?;
            w.open_table(RECORDS).map_err(db)?;
            w.commit().map_err(db)?;
        }
        let r = self.db.begin_read().map_err(db)?;
        let t = r.open_table(STREAMS).map_err(db)?;
        for item in t.iter().map_err(db)? {
            let (k, v) = item.map_err(db)?;
            let meta: StreamMeta = serde_json::from_slice(v.value()).map_err(db)?;
            streams.insert(k.value().to_owned(), meta);
        }
        let t = r.open_table(RECORDS).map_err(db)?;
        let mut metas = Vec::new();
        for item in t.iter().map_err(db)? {
            let (k, v) = item.map_err(db)?;
            let meta: RecordMeta = serde_json::from_slice(v.value()).map_err(db)?;
            metas.push((Uuid::from_u128(k.value()), meta));
        }
        drop(r);
        // Ranges whose bytes must survive: free bytes and bytes of records.
        let mut keep: BTreeMap<String, Vec<(u64, u64)>> = BTreeMap::new();
        let mut out_streams = HashMap::new();
        for (name, meta) in &streams {
            let free = gaps(&meta.taken, 0, meta.end);
            keep.entry(name.clone()).or_default().extend(free);
            out_streams.insert(name.clone(), meta.clone());
        }
        for (id, meta) in metas {
            keep.entry(meta.stream.clone())
                .or_default()
                .push((meta.offset, meta.offset.saturating_add(meta.len)));
            records.push((id, meta));
        }
        // Scrub: overwrite every byte on disk that is neither free nor held by a record (a
        // crash may have interrupted a wipe), and drop segments with nothing to keep.
        for name in self.segments.streams_on_disk() {
            let keep = merge(&keep.remove(&name).unwrap_or_default());
            let mut touched = HashSet::new();
            for seg in self.segments.on_disk(&name) {
                let (lo, hi) = segment_range(seg);
                for (s, e) in gaps(&keep, lo, hi) {
                    self.segments.zero(&name, s, e - s, &mut touched)?;
                }
                self.segments.sync(&touched)?;
                touched.clear();
                if !keep.iter().any(|&(s, e)| s < hi && lo < e) {
                    self.segments.remove(&name, seg)?;
                }
            }
            sync_dir(&self.segments.root.join(folder(&name)))?;
        }
        Ok(Loaded {
            streams: out_streams,
            records,
        })
    }

    fn run(mut self, rx: mpsc::Receiver<(Batch, Option<Done>)>, failed: Arc<AtomicBool>) {
        while let Ok(first) = rx.recv() {
            let (mut batch, done) = first;
            let mut waiters: Vec<Done> = done.into_iter().collect();
            // Group commit: take whatever else is queued.
            for _ in 0..4096 {
                match rx.try_recv() {
                    Ok((b, d)) => {
                        batch.merge(b);
                        waiters.extend(d);
                    }
                    Err(_) => break,
                }
            }
            let result = if failed.load(Ordering::Acquire) {
                Err(StoreError::Failed)
            } else {
                self.commit(&mut batch)
            };

            if let Err(e) = &result {
                tracing::error!(error = %e, "key store write failed; refusing further key service until restart");
                failed.store(true, Ordering::Release);
            }
            let ok = result.is_ok();
            for w in waiters {
                let _ = w.send(result.clone());
            }
            if ok && !(batch.wipes.is_empty() && batch.low_water.is_empty()) {
                // This thread no longer writes below the low water: let go of those files.
                for (stream, low) in &batch.low_water {
                    self.segments
                        .files
                        .retain(|(s, seg), _| s != stream || segment_range(*seg).1 > *low);
                }
                let _ = self.wiper.send(Batch {
                    wipes: std::mem::take(&mut batch.wipes),
                    low_water: std::mem::take(&mut batch.low_water),
                    ..Batch::default()
                });
            }
        }
    }

    /// Makes the batch durable: new bytes first, then the state that refers to them.
    fn commit(&mut self, batch: &mut Batch) -> Result<(), StoreError> {
        let mut touched = HashSet::new();
        for (stream, off, data) in &batch.appends {
            self.segments.write(stream, *off, data, &mut touched)?;
        }
        self.segments.sync(&touched)?;
        // Appends of a stream come in stream order: its last one here ends what is written.
        let mut ends: HashMap<&str, u64> = HashMap::new();
        for (stream, off, data) in &batch.appends {
            let end = ends.entry(stream).or_default();
            *end = (*end).max(off + data.len() as u64);
        }
        for (stream, end) in ends {
            written_of(&self.written, stream).fetch_max(end, Ordering::AcqRel);
        }
        batch.appends.clear(); // wipes the in-flight copies
        if batch.streams.is_empty() && batch.records.is_empty() {
            return Ok(());
        }
        let w = self.db.begin_write().map_err(db)?;
        {
            let mut latest: HashMap<&str, &StreamMeta> = HashMap::new();
            for (name, meta) in &batch.streams {
                latest.insert(name, meta);
            }
            let mut t = w.open_table(STREAMS).map_err(db)?;
            for (name, meta) in latest {
                let v = serde_json::to_vec(meta).map_err(db)?;
                t.insert(name, v.as_slice()).map_err(db)?;
            }
            let mut t = w.open_table(RECORDS).map_err(db)?;
            // In queue order: the last change of a key wins.
            let mut last: HashMap<Uuid, Option<&RecordMeta>> = HashMap::new();
            for op in &batch.records {
                match op {
                    RecordOp::Put(id, meta) => last.insert(*id, Some(meta)),
                    RecordOp::Delete(id) => last.insert(*id, None),
                };
            }
            for (id, op) in last {
                match op {
                    Some(meta) => {
                        let v = serde_json::to_vec(meta).map_err(db)?;
                        t.insert(id.as_u128(), v.as_slice()).map_err(db)?;
                    }
                    None => {
                        t.remove(id.as_u128()).map_err(db)?;
                    }
                }
            }
        }
        w.commit().map_err(db)?;
        Ok(())
    }
}

/// Sorts and merges overlapping or adjacent ranges.
pub fn merge(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges.iter().copied().filter(|r| r.0 < r.1).collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if last.1 >= s => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_and_merge() {
        assert_eq!(
            gaps(&[(2, 4), (6, 7)], 0, 10),
            vec![(0, 2), (4, 6), (7, 10)]
        );
        assert_eq!(gaps(&[], 3, 5), vec![(3, 5)]);
        assert_eq!(gaps(&[(0, 10)], 0, 10), vec![]);
        assert_eq!(merge(&[(5, 6), (1, 3), (3, 4)]), vec![(1, 4), (5, 6)]);
        assert_eq!(
            unfolder(&folder("own:KME B/x")).as_deref(),
            Some("own:KME B/x")
        );
    }

    #[tokio::test]
    async fn survives_reopen_and_overwrites_consumed_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let (store, loaded) = Store::open(dir.path()).unwrap();
        assert!(loaded.streams.is_empty());
        let data: Vec<u8> = (1..=100u8).collect();
        let id = Uuid::new_v4();
        store
            .submit(Batch {
                appends: vec![("s".into(), 0, SecretBuf::from(data.clone()))],
                streams: vec![(
                    "s".into(),
                    StreamMeta {
                        end: 100,
                        cursor: 20,
                        taken: vec![(0, 20)],
                    },
                )],
                records: vec![RecordOp::Put(
                    id,
                    RecordMeta {
                        master: "M".into(),
                        pending: vec!["S".into()],
                        created_unix: 1,
                        stream: "s".into(),
                        offset: 10,
                        len: 5,
                        ready: true,
                    },
                )],
                wipes: vec![("s".into(), 0, 10), ("s".into(), 15, 5)],
                ..Batch::default()
            })
            .await
            .unwrap();
        // Wipes run on the wiper thread after the commit, off the commit path: nothing
        // orders the test after them, so wait (bounded) for the overwrite.
        store.submit(Batch::default()).await.unwrap();
        drop(store);
        let seg = dir.path().join("pool/s/00000000.key");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut raw = std::fs::read(&seg).unwrap();
        while raw[..10] != [0u8; 10] && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
            raw = std::fs::read(&seg).unwrap();
        }
        assert_eq!(&raw[..10], &[0u8; 10], "consumed bytes overwritten");
        assert_eq!(&raw[10..15], &data[10..15], "record bytes kept");
        // The committer thread lets go of the database once the last handle is dropped.
        let mut reopened = Store::open(dir.path());
        for _ in 0..100 {
            if reopened.is_ok() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            reopened = Store::open(dir.path());
        }
        let (_store, loaded) = reopened.unwrap();
        let meta = &loaded.streams["s"];
        assert_eq!(meta.end, 100);
        // The free bytes stay on disk; the stream reads them when they are taken.
        let mut stream = crate::pool::Stream::restore_stored(meta, _store.spill("s"), 0);
        assert_eq!(stream.in_memory(), 0);
        assert_eq!(&stream.allocate(&[80]).unwrap()[0].1[..], &data[20..]);
        assert_eq!(loaded.records.len(), 1);
        let m = &loaded.records[0].1;
        assert_eq!(
            &_store.reader().read(&m.stream, m.offset, m.len).unwrap()[..],
            &data[10..15]
        );
    }
}
