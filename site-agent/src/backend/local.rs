//! The local driver: shares in a folder of the agent's own disks (the default).
//!
//! ```text
//! STORE/<backup id>/share-<i>/manifest.json   what the share is (written atomically)
//!                            /data            chunk j at offset j * chunk_size
//!                            /chunks.log      48-byte records: chunk, nonce, BLAKE3 of the chunk
//!                            /keys.log        which QKD key IDs carried each chunk
//!                            /renew.json      a pending renewal (written atomically)
//!                            /renew.data      its chunks, as in data
//!                            /renew.chunks.log  their records, as in chunks.log
//!                            /renew.keys.log  which QKD key IDs carried each delta
//!                            /keys.e<N>.log   after renewal N committed: its deltas' key IDs
//! STORE/sets/<owner SAE in hex>/<set>.json      sample-set manifests
//! ```
//!
//! Durability: a chunk is acknowledged only after its data is written and `fdatasync`ed and
//! then its record is appended to `chunks.log` and that is `fdatasync`ed too; on open the
//! log is replayed (a torn last record is ignored, the last record of a chunk wins), so an
//! acknowledged chunk survives a crash and an unacknowledged one is simply sent again.
//! Rewrites append a **tombstone** record (nonce [`TOMBSTONE`]) and `fdatasync` it before
//! the data is overwritten.
//!
//! A renewal commits by rewriting `renew.json` as committed; then the staged files are
//! renamed over the live ones (`renew.data` → `data`, `renew.chunks.log` → `chunks.log`,
//! `renew.keys.log` → `keys.e<N>.log`), the manifest records the epoch, and `renew.json` is
//! removed, each step idempotent. Removing a share renames its folder aside first.
//!
//! Folders are created 0700 and files 0600: shares are for the agent's user alone. Writes
//! use O_DIRECT with 4096-byte aligned buffers when the chunk size allows it and the
//! filesystem accepts it, and fall back to buffered writes otherwise.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use super::{
    decode_records, key_lines, record_bytes, Area, Backend, ChunkRecords, Opened, Put, Record,
    RenewState, ShareIo, RECORD,
};
use crate::aligned::DIO_ALIGN;
use crate::storage::{failpoint, Failpoint, StoreError};
use share_transfer::wire::Manifest;

/// The nonce of a tombstone record: the chunk's data is being replaced; until a later record,
/// the chunk is not held.
pub const TOMBSTONE: u64 = u64::MAX;

const STATE: &str = "renew.json";
const STAGED_DATA: &str = "renew.data";
const STAGED_LOG: &str = "renew.chunks.log";
const STAGED_KEYS: &str = "renew.keys.log";

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A folder of shares.
pub struct LocalBackend {
    root: PathBuf,
    direct_io: bool,
}

impl LocalBackend {
    pub fn new(root: &Path, direct_io: bool) -> Result<Self, StoreError> {
        private_dir(root)?;
        Ok(LocalBackend {
            root: root.to_owned(),
            direct_io,
        })
    }

    fn share_dir(&self, id: Uuid, index: u8) -> PathBuf {
        self.root
            .join(id.to_string())
            .join(format!("share-{index}"))
    }

    fn sets_dir(&self, owner: &str) -> PathBuf {
        self.root.join("sets").join(owner)
    }
}

impl Backend for LocalBackend {
    fn describe(&self) -> String {
        self.root.display().to_string()
    }

    fn open(&self, id: Uuid, index: u8) -> Result<Option<Opened>, StoreError> {
        let dir = self.share_dir(id, index);
        // One read of the renewal state: a committed one is finished first, a pending one
        // is staged beside the share.
        let pending = match read_json::<RenewState>(&dir.join(STATE))? {
            Some(st) if st.committed => {
                finish(&dir, &st)?;
                None
            }
            other => other,
        };
        let Some(manifest) = read_json::<Manifest>(&dir.join("manifest.json"))? else {
            return Ok(None);
        };
        let (live_files, live) = Files::open(&dir, "data", "chunks.log", "keys.log")?;
        let cs = manifest.open.chunk_size as usize;
        let direct = if self.direct_io && cs > 0 && cs.is_multiple_of(DIO_ALIGN) {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(dir.join("data"))
                .inspect_err(|e| tracing::info!(path = %dir.display(), error = %e, "O_DIRECT unavailable; using buffered writes"))
                .ok()
        } else {
            None
        };
        let (staged_files, staged) = match pending {
            Some(st) => {
                let (files, records) = Files::open(&dir, STAGED_DATA, STAGED_LOG, STAGED_KEYS)?;
                (Some(files), Some((st, records)))
            }
            None => (None, None),
        };
        let io = LocalShare {
            dir,
            chunk_size: cs as u64,
            live: live_files,
            direct: Mutex::new(direct),
            staged: Mutex::new(staged_files),
        };
        Ok(Some(Opened {
            io: Arc::new(io),
            manifest,
            live,
            staged,
        }))
    }

    fn create(&self, m: &Manifest) -> Result<(), StoreError> {
        let dir = self.share_dir(m.backup_id, m.share_index);
        private_dir(&dir)?;
        write_manifest(&dir, m)?;
        // The new files and folders must survive a power loss too.
        for d in [
            dir.as_path(),
            dir.parent().unwrap_or(&self.root),
            &self.root,
        ] {
            sync_dir(d)?;
        }
        Ok(())
    }

    fn remove(&self, id: Uuid, index: u8) -> Result<(), StoreError> {
        let dir = self.share_dir(id, index);
        let parent = self.root.join(id.to_string());
        let aside = parent.join(format!(".removed-share-{index}-{}", Uuid::new_v4()));
        fs::rename(&dir, &aside).map_err(io(&dir))?;
        sync_dir(&parent)?;
        fs::remove_dir_all(&aside).map_err(io(&aside))
    }

    fn backups(&self) -> Result<Vec<Uuid>, StoreError> {
        let rd = fs::read_dir(&self.root).map_err(io(&self.root))?;
        Ok(rd
            .flatten()
            .filter_map(|e| e.file_name().to_str().and_then(|n| Uuid::try_parse(n).ok()))
            .collect())
    }

    fn shares(&self, id: Uuid) -> Result<Vec<u8>, StoreError> {
        let dir = self.root.join(id.to_string());
        let rd = match fs::read_dir(&dir) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&dir)(e)),
        };
        Ok(rd
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix("share-"))
                    .and_then(|i| i.parse::<u8>().ok())
            })
            .collect())
    }

    fn recover(&self, id: Uuid, index: u8) -> Result<bool, StoreError> {
        recover_dir(&self.share_dir(id, index))
    }

    fn put_set(&self, owner: &str, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let dir = self.sets_dir(owner);
        private_dir(&dir)?;
        write_atomic(&dir, &format!("{name}.json"), bytes)
    }

    fn set_names(&self, owner: &str) -> Result<Vec<String>, StoreError> {
        let dir = self.sets_dir(owner);
        let Ok(rd) = fs::read_dir(&dir) else {
            return Ok(Vec::new());
        };
        Ok(rd
            .flatten()
            .filter_map(|e| {
                e.file_name()
                    .to_str()
                    .and_then(|n| n.strip_suffix(".json"))
                    .map(str::to_owned)
            })
            .collect())
    }

    fn sets(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        let Ok(owners) = fs::read_dir(self.root.join("sets")) else {
            return Ok(out);
        };
        for owner in owners.flatten() {
            let Ok(files) = fs::read_dir(owner.path()) else {
                continue;
            };
            for f in files.flatten() {
                let p = f.path();
                if p.extension().is_none_or(|e| e != "json") {
                    continue;
                }
                match fs::read(&p) {
                    Ok(b) => out.push((p.display().to_string(), b)),
                    Err(e) => {
                        tracing::warn!(file = %p.display(), error = %e, "unreadable set manifest")
                    }
                }
            }
        }
        Ok(out)
    }

    fn space(&self) -> Option<(u64, u64)> {
        rustix::fs::statvfs(&self.root).ok().map(|s| {
            (
                s.f_bavail.saturating_mul(s.f_frsize),
                s.f_blocks.saturating_mul(s.f_frsize),
            )
        })
    }
}

/// A data file with its chunk log and key log (the live ones, or a renewal's).
struct Files {
    data_path: PathBuf,
    data: File,
    log_path: PathBuf,
    log: Mutex<File>,
    keys_path: PathBuf,
    keys: Mutex<File>,
}

impl Files {
    fn open(
        dir: &Path,
        data: &str,
        log: &str,
        keys: &str,
    ) -> Result<(Self, ChunkRecords), StoreError> {
        let data_path = dir.join(data);
        let log_path = dir.join(log);
        let keys_path = dir.join(keys);
        let data = open_data(&data_path)?;
        let (log, records) = open_log(&log_path)?;
        let keys = open_append(&keys_path)?;
        Ok((
            Files {
                data_path,
                data,
                log_path,
                log: Mutex::new(log),
                keys_path,
                keys: Mutex::new(keys),
            },
            records,
        ))
    }

    /// Appends records to the chunk log and makes them durable.
    fn append_records(&self, records: &[u8]) -> Result<(), StoreError> {
        let mut log = lock(&self.log);
        log.write_all(records).map_err(io(&self.log_path))?;
        log.sync_data().map_err(io(&self.log_path))
    }

    /// Records written chunks: durably in the log, and their key IDs.
    fn record(&self, chunks: &[Put<'_>]) -> Result<(), StoreError> {
        let mut records = Vec::with_capacity(chunks.len() * RECORD);
        for c in chunks {
            record_bytes(&mut records, c.chunk, c.nonce, &c.hash);
        }
        self.append_records(&records)?;
        lock(&self.keys)
            .write_all(key_lines(chunks).as_bytes())
            .map_err(io(&self.keys_path))
    }
}

/// Whether direct I/O accepts `buf`: address and length aligned.
fn aligned(buf: &[u8]) -> bool {
    buf.len().is_multiple_of(DIO_ALIGN) && (buf.as_ptr() as usize).is_multiple_of(DIO_ALIGN)
}

/// One share's files.
struct LocalShare {
    dir: PathBuf,
    chunk_size: u64,
    live: Files,
    /// The live data file opened with O_DIRECT, while the filesystem accepts it.
    direct: Mutex<Option<File>>,
    /// A renewal's files, while one is staged.
    staged: Mutex<Option<Files>>,
}

impl LocalShare {
    /// Writes the chunks' data in place and `fdatasync`s it.
    fn write_live(&self, chunks: &[Put<'_>]) -> Result<(), StoreError> {
        let path = &self.live.data_path;
        let mut direct = lock(&self.direct);
        for c in chunks {
            let off = c.chunk * self.chunk_size;
            let mut done = false;
            // O_DIRECT wants address and length aligned: a short last chunk, or a buffer
            // the caller did not align, goes through the page cache instead.
            if let Some(f) = direct.as_ref().filter(|_| aligned(c.data)) {
                match f.write_all_at(c.data, off) {
                    Ok(()) => done = true,
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        tracing::info!(path = %path.display(), "O_DIRECT refused; using buffered writes");
                        *direct = None;
                    }
                    Err(e) => return Err(io(path)(e)),
                }
            }
            if !done {
                self.live.data.write_all_at(c.data, off).map_err(io(path))?;
            }
        }
        drop(direct);
        self.live.data.sync_data().map_err(io(path))
    }

    fn with_staged<T>(
        &self,
        f: impl FnOnce(&Files) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let staged = lock(&self.staged);
        match staged.as_ref() {
            Some(files) => f(files),
            None => Err(StoreError::Renewal("no renewal is staged".into())),
        }
    }
}

impl ShareIo for LocalShare {
    fn put(&self, area: Area, chunks: &[Put<'_>], crash: &[Failpoint]) -> Result<(), StoreError> {
        match area {
            Area::Live => {
                self.write_live(chunks)?;
                crash.iter().for_each(|f| failpoint(*f));
                self.live.record(chunks)
            }
            Area::Staged => self.with_staged(|files| {
                for c in chunks {
                    files
                        .data
                        .write_all_at(c.data, c.chunk * self.chunk_size)
                        .map_err(io(&files.data_path))?;
                }
                files.data.sync_data().map_err(io(&files.data_path))?;
                crash.iter().for_each(|f| failpoint(*f));
                files.record(chunks)
            }),
        }
    }

    fn retire(&self, held: &[(u64, Record)]) -> Result<(), StoreError> {
        let mut records = Vec::with_capacity(held.len() * RECORD);
        for (j, _) in held {
            record_bytes(&mut records, *j, TOMBSTONE, &[0u8; 32]);
        }
        self.live.append_records(&records)
    }

    fn mend(&self, chunks: &[Put<'_>]) -> Result<(), StoreError> {
        self.write_live(chunks)
    }

    fn read(
        &self,
        area: Area,
        chunk: u64,
        _rec: &Record,
        buf: &mut [u8],
    ) -> Result<(), StoreError> {
        let off = chunk * self.chunk_size;
        if area == Area::Live && aligned(buf) {
            // Direct I/O: no copy through the page cache (see `write_live`).
            let direct = lock(&self.direct);
            if let Some(f) = direct.as_ref() {
                match f.read_exact_at(buf, off) {
                    Ok(()) => return Ok(()),
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        return Err(StoreError::Damaged { chunk })
                    }
                    // Refused (EINVAL): read through the page cache below.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
                    Err(e) => return Err(io(&self.live.data_path)(e)),
                }
            }
        }
        let mut read = |files: &Files| {
            files
                .data
                .read_exact_at(buf, off)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => StoreError::Damaged { chunk },
                    _ => io(&files.data_path)(e),
                })
        };
        match area {
            Area::Live => read(&self.live),
            Area::Staged => self.with_staged(read),
        }
    }

    fn freeze(&self, _area: Area, _records: &ChunkRecords) -> Result<(), StoreError> {
        // The chunk log already is the durable list of records.
        Ok(())
    }

    fn put_manifest(&self, m: &Manifest) -> Result<(), StoreError> {
        write_manifest(&self.dir, m)
    }

    fn begin_renewal(&self, st: &RenewState) -> Result<(), StoreError> {
        let mut staged = lock(&self.staged);
        *staged = None;
        for f in [STAGED_DATA, STAGED_LOG, STAGED_KEYS] {
            remove_if_present(&self.dir.join(f))?;
        }
        write_state(&self.dir, st)?;
        *staged = Some(Files::open(&self.dir, STAGED_DATA, STAGED_LOG, STAGED_KEYS)?.0);
        Ok(())
    }

    fn put_renewal(&self, st: &RenewState) -> Result<(), StoreError> {
        write_state(&self.dir, st)
    }

    fn finish_renewal(&self, st: &RenewState) -> Result<(), StoreError> {
        roll_forward(&self.dir, st)
    }

    fn abort_renewal(&self) -> Result<(), StoreError> {
        *lock(&self.staged) = None;
        for f in [STAGED_DATA, STAGED_LOG, STAGED_KEYS, STATE] {
            remove_if_present(&self.dir.join(f))?;
        }
        sync_dir(&self.dir)
    }
}

/// Finishes a committed renewal left by a crash in `dir`; whether there was one.
fn recover_dir(dir: &Path) -> Result<bool, StoreError> {
    match read_json::<RenewState>(&dir.join(STATE))? {
        Some(st) if st.committed => finish(dir, &st).map(|()| true),
        _ => Ok(false),
    }
}

/// Finishes renewal `st`, committed before a crash, of the share in `dir`.
fn finish(dir: &Path, st: &RenewState) -> Result<(), StoreError> {
    tracing::info!(dir = %dir.display(), epoch = st.epoch, "finishing a committed share renewal");
    roll_forward(dir, st)
}

/// The steps after a renewal's commit point, each idempotent.
fn roll_forward(dir: &Path, st: &RenewState) -> Result<(), StoreError> {
    for (from, to) in [
        (STAGED_DATA.to_owned(), "data".to_owned()),
        (STAGED_LOG.to_owned(), "chunks.log".to_owned()),
        (STAGED_KEYS.to_owned(), format!("keys.e{}.log", st.epoch)),
    ] {
        let from = dir.join(from);
        if from.exists() {
            fs::rename(&from, dir.join(to)).map_err(io(&from))?;
        }
    }
    sync_dir(dir)?;
    let mpath = dir.join("manifest.json");
    let mut m: Manifest =
        read_json(&mpath)?.ok_or_else(|| io(&mpath)(std::io::ErrorKind::NotFound.into()))?;
    if m.open.epoch != st.epoch || m.renewal != Some(st.renewal) {
        m.open.epoch = st.epoch;
        m.renewal = Some(st.renewal);
        write_manifest(dir, &m)?;
    }
    remove_if_present(&dir.join(STATE))?;
    sync_dir(dir)
}

/// Writes `renew.json` atomically and durably.
fn write_state(dir: &Path, st: &RenewState) -> Result<(), StoreError> {
    write_atomic(dir, STATE, &serde_json::to_vec(st).unwrap_or_default())
}

fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

/// Opens a chunk log (created if absent) and replays it: chunk → (nonce, BLAKE3). A torn
/// last record (a crash mid-append) is cut off so later appends stay aligned; a tombstone
/// removes its chunk; the last record of a chunk wins.
fn open_log(path: &Path) -> Result<(File, ChunkRecords), StoreError> {
    let mut log = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))?;
    let mut raw = Vec::new();
    log.read_to_end(&mut raw).map_err(io(path))?;
    let mut chunks = ChunkRecords::new();
    for (j, n, h) in decode_records(&raw) {
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
fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
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
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// The JSON file at `path`, parsed; `None` if it does not exist.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>, StoreError> {
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
fn open_data(path: &Path) -> Result<File, StoreError> {
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
fn open_append(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
        .map_err(io(path))
}
