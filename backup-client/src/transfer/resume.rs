//! What survives an interrupted command, and the small-file writes that make it safe.
//!
//! * A store records itself in `state_dir/pending-stores/<hash of the path>.json`
//!   ([`PendingStore`], the JSON format is unchanged) under an exclusive lock next to it
//!   (`.json.lock`); re-running the same store of the unchanged file reuses its backup ID.
//! * A restore writes `<out>.partial` and checkpoints the chunks it has made durable in
//!   `<out>.partial.json` ([`RestoreState`]); the output is renamed into place only after
//!   the whole-file digest matched.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::{io_err, TransferError};
use share_transfer::wire::SchemeInfo;

/// State of an interrupted store, kept under `state_dir`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub(super) struct PendingStore {
    pub(super) backup_id: Uuid,
    pub(super) path: PathBuf,
    pub(super) size: u64,
    pub(super) mtime_ns: u128,
    pub(super) scheme: SchemeInfo,
    pub(super) chunk_size: usize,
    pub(super) created: u64,
}

impl PendingStore {
    /// Whether `earlier` recorded a store of the same, unchanged file with the same
    /// parameters (its backup ID and creation time are then taken over).
    fn continued_by(&self, earlier: &PendingStore) -> bool {
        earlier.path == self.path
            && earlier.size == self.size
            && earlier.mtime_ns == self.mtime_ns
            && earlier.scheme == self.scheme
            && earlier.chunk_size == self.chunk_size
    }
}

/// Whether a store starts a new backup or continues an interrupted one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Start {
    Fresh,
    Resumed,
}

/// The pending-store record of one file, held under its lock until dropped.
pub(super) struct StoreResume {
    path: PathBuf,
    pub(super) state: PendingStore,
    pub(super) start: Start,
    _lock: File,
}

impl StoreResume {
    /// Takes over the record of an interrupted store that `fresh` continues, or records
    /// `fresh`; fails if another store of the same file holds the lock.
    pub(super) fn begin(state_dir: &Path, fresh: PendingStore) -> Result<Self, TransferError> {
        let path = pending_path(state_dir, &fresh.path);
        let earlier = fs::read(&path)
            .ok()
            .and_then(|text| serde_json::from_slice::<PendingStore>(&text).ok())
            .filter(|old| fresh.continued_by(old));
        let (state, start) = match earlier {
            Some(old) => (old, Start::Resumed),
            None => (fresh, Start::Fresh),
        };
        if let Some(dir) = path.parent() {
            private_dir(dir)?;
        }
        // One store of a file at a time: two would interleave different splits.
        let lock = lock_exclusive(&with_suffix(&path, ".lock")).map_err(|_| {
            TransferError::Usage(format!(
                "another store of {} is running; wait for it to finish",
                state.path.display()
            ))
        })?;
        write_atomic(
            &path,
            &serde_json::to_vec_pretty(&state).unwrap_or_default(),
        )?;
        Ok(StoreResume {
            path,
            state,
            start,
            _lock: lock,
        })
    }

    /// Forgets the record (the store finished, or must start again as a new backup).
    pub(super) fn remove(&self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Where the pending-store record of `file` lives.
fn pending_path(state_dir: &Path, file: &Path) -> PathBuf {
    let key = blake3::hash(file.as_os_str().as_encoded_bytes()).to_hex();
    state_dir
        .join("pending-stores")
        .join(format!("{}.json", &key[..32]))
}

/// Progress of a restore, kept next to its partial output.
#[derive(Serialize, Deserialize)]
struct RestoreState {
    backup_id: Uuid,
    chunks_done: u64,
}

/// The partial output of a restore: `<out>.partial`, its checkpoint file, and the running
/// digest of what it holds.
pub(super) struct PartialOutput {
    /// The absolute output path the partial file is renamed to.
    pub(super) target: PathBuf,
    partial: PathBuf,
    state_path: PathBuf,
    file: File,
    hasher: blake3::Hasher,
    backup: Uuid,
    /// Chunks already in the partial file when the restore started (0 for a fresh one).
    pub(super) start_chunk: u64,
    since_sync: u64,
}

impl PartialOutput {
    /// Opens the partial output for backup `id` of `original_len` bytes in `chunk_count`
    /// chunks of `cs` bytes, resuming after the last checkpoint if it is of the same backup
    /// and the partial file really holds what it says; records the starting checkpoint.
    pub(super) fn open(
        out: &Path,
        id: Uuid,
        chunk_count: u64,
        original_len: u64,
        cs: usize,
    ) -> Result<Self, TransferError> {
        let target = absolute(out)?;
        let partial = with_suffix(&target, ".partial");
        let state_path = with_suffix(&target, ".partial.json");
        // The restored genome goes into these files: never through a link, never into a
        // file someone else made or can read.
        check_private(&partial)?;
        check_private(&state_path)?;
        let start_chunk =
            resumable_chunks(&state_path, &partial, id, chunk_count, original_len, cs);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(start_chunk == 0)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&partial)
            .map_err(io_err(&partial))?;
        let mut output = PartialOutput {
            target,
            partial,
            state_path,
            file,
            hasher: blake3::Hasher::new(),
            backup: id,
            start_chunk,
            since_sync: 0,
        };
        if start_chunk > 0 {
            output.rehash_prefix((start_chunk * cs as u64).min(original_len))?;
        }
        output.write_state(start_chunk)?;
        Ok(output)
    }

    /// Hashes the first `prefix` bytes already written (the last chunk is shorter than a
    /// chunk), cuts anything after them and positions the file there.
    fn rehash_prefix(&mut self, prefix: u64) -> Result<(), TransferError> {
        let partial = &self.partial;
        let mut r = (&self.file).take(prefix);
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = r.read(&mut buf).map_err(io_err(partial))?;
            if n == 0 {
                break;
            }
            self.hasher.update(&buf[..n]);
        }
        self.file.set_len(prefix).map_err(io_err(partial))?;
        self.file
            .seek(SeekFrom::Start(prefix))
            .map_err(io_err(partial))?;
        Ok(())
    }

    fn write_state(&self, chunks_done: u64) -> Result<(), TransferError> {
        write_atomic(
            &self.state_path,
            &serde_json::to_vec(&RestoreState {
                backup_id: self.backup,
                chunks_done,
            })
            .unwrap_or_default(),
        )
    }

    /// Appends the next chunk's bytes of the secret (and hashes them).
    pub(super) fn append(&mut self, data: &[u8]) -> Result<(), TransferError> {
        self.hasher.update(data);
        self.file.write_all(data).map_err(io_err(&self.partial))
    }

    /// Counts a chunk written; every `every` chunks, makes the file durable and records
    /// `chunks_done` as the point to resume from.
    pub(super) fn chunk_written(
        &mut self,
        chunks_done: u64,
        every: u64,
    ) -> Result<(), TransferError> {
        self.since_sync += 1;
        if self.since_sync >= every {
            self.since_sync = 0;
            self.file.sync_data().map_err(io_err(&self.partial))?;
            self.write_state(chunks_done)?;
        }
        Ok(())
    }

    /// Forgets the checkpoint (the restore cannot go on from it).
    pub(super) fn forget_checkpoint(&self) {
        let _ = fs::remove_file(&self.state_path);
    }

    /// Whether what was written hashes to `digest`.
    pub(super) fn matches(&self, digest: &[u8; 32]) -> bool {
        self.hasher.finalize().as_bytes() == digest
    }

    /// Removes the partial output and its checkpoint (its bytes are not the file's).
    pub(super) fn discard(self) {
        drop(self.file);
        let _ = fs::remove_file(&self.partial);
        let _ = fs::remove_file(&self.state_path);
    }

    /// Renames the output into place if its digest is `digest`; otherwise removes it and
    /// fails, naming `shown` (the output as the user gave it).
    pub(super) fn commit(
        self,
        id: Uuid,
        digest: &[u8; 32],
        shown: &Path,
    ) -> Result<PathBuf, TransferError> {
        if self.hasher.finalize().as_bytes() != digest {
            let _ = fs::remove_file(&self.partial);
            let _ = fs::remove_file(&self.state_path);
            return Err(TransferError::Failed(format!(
                "backup {id}: the restored data does not match the recorded digest; nothing was written to {}",
                shown.display()
            )));
        }
        self.file.sync_all().map_err(io_err(&self.partial))?;
        drop(self.file);
        fs::rename(&self.partial, &self.target).map_err(io_err(&self.target))?;
        if let Some(dir) = self.target.parent() {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        let _ = fs::remove_file(&self.state_path);
        Ok(self.target)
    }
}

/// Chunks of backup `id` that the partial file holds according to its checkpoint, or 0.
fn resumable_chunks(
    state_path: &Path,
    partial: &Path,
    id: Uuid,
    chunk_count: u64,
    original_len: u64,
    cs: usize,
) -> u64 {
    let (Ok(text), Ok(meta)) = (fs::read(state_path), fs::metadata(partial)) else {
        return 0;
    };
    let Ok(st) = serde_json::from_slice::<RestoreState>(&text) else {
        return 0;
    };
    // Resume only if the partial file really holds what the state says.
    let prefix = (st.chunks_done * cs as u64).min(original_len);
    if st.backup_id == id && st.chunks_done <= chunk_count && meta.len() >= prefix {
        st.chunks_done
    } else {
        0
    }
}

fn absolute(p: &Path) -> Result<PathBuf, TransferError> {
    if p.is_absolute() {
        Ok(p.to_owned())
    } else {
        Ok(std::env::current_dir().map_err(io_err(p))?.join(p))
    }
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// Creates `dir` and its missing parents with mode 0700 (a mode only loses bits to the
/// umask); an existing folder is left as it is.
fn private_dir(dir: &Path) -> Result<(), TransferError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

/// A file the restore will write into, if it exists already, must be a regular file (not a
/// link), owned by this user and closed to group and others; otherwise the restore stops and
/// says so, rather than write a genome where someone else can read it.
fn check_private(path: &Path) -> Result<(), TransferError> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let meta = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    };
    let why = if meta.file_type().is_symlink() {
        Some("is a symbolic link")
    } else if !meta.is_file() {
        Some("is not a regular file")
    } else if meta.uid() != rustix::process::geteuid().as_raw() {
        Some("belongs to another user")
    } else if meta.permissions().mode() & 0o077 != 0 {
        Some("is open to group or others")
    } else {
        None
    };
    match why {
        None => Ok(()),
        Some(why) => Err(TransferError::Usage(format!(
            "{} {why}: the restore will not write there; remove it (or restore to another path)",
            path.display()
        ))),
    }
}

/// An exclusive advisory lock on `path`, held while the returned file is open.
fn lock_exclusive(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    f.try_lock().map_err(std::io::Error::from)?;
    Ok(f)
}

/// Replaces `path` with `data` atomically (temporary file, fsync, rename).
fn write_atomic(path: &Path, data: &[u8]) -> Result<(), TransferError> {
    let tmp = with_suffix(path, ".tmp");
    // A leftover (or planted) temporary is removed, never written through.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io_err(&tmp)(e)),
        _ => {}
    }
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}
