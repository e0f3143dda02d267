//! Key files dropped by a QKD device (kind `key-files`).
//!
//! Many QKD devices deliver final (privacy-amplified) key as files with identical names at
//! both ends of the link. Each end of the link watches its own directory.
//!
//! ## What the device must do
//! - Write each file under a temporary name (one starting with `.`, or ending in `.tmp` or
//!   `.part`) and **rename** it into place when complete: a ready file is never appended to
//!   or rewritten. A file whose name starts with `.` or ends in `.tmp`/`.part` is ignored.
//! - Never reuse a name; give both ends the same name and the same bytes.
//! - Names must be valid UTF-8 of at most 255 bytes without `/`, `..` or control characters
//!   (others are ignored with a warning). Symbolic links, directories and other non-regular
//!   files are ignored, and never followed: every key file and marker is opened with
//!   `O_NOFOLLOW | O_NONBLOCK` and checked to be a regular file, so a link planted in the
//!   folder can neither feed the link nor make the KME read, zero or remove its target, and
//!   nothing is written outside the folder. Markers are created with mode 0600.
//!
//! ## How the files are consumed
//! The producing end hands out the ready files in lexicographic name order (a file it
//! already started comes first), in pieces of at most the size the link asks for. A block
//! reference names `<offset>:<len>:<file name>` (decimal offset and length in bytes, no
//! sign, no leading zeros; the name is everything after the second colon).
//!
//! Progress survives restarts in a marker file next to each key file, `.NAME.consumed`,
//! holding the decimal count of bytes consumed from the start of the file (written to
//! `.NAME.consumed.tmp`, fsynced, renamed, directory fsynced). Releasing a block first
//! records it in the marker, then overwrites the released bytes with zeros (fdatasync); once
//! the whole file is consumed the file is overwritten with zeros once more, unlinked, and the
//! directory fsynced. A crash can therefore lose key but never hand out released bytes
//! again: `next_block` starts at the marker, and `fetch_block` answers
//! [`SourceError::Gone`] for any range that starts below it.
//!
//! The marker of a fully consumed file stays behind as a tombstone, so that the far end can
//! still answer `Gone` (rather than "not here yet") if the producer re-announces the last
//! piece of that file after a crash. Tombstones are removed as soon as a block of another
//! file is released: the producer keeps at most one block outstanding and announces a block
//! of the next file only after releasing the previous one, so by then no reference into the
//! earlier file can come back. A producer creates the marker (at 0) when it hands out the
//! first piece of a file, so after a restart it finishes that file before any other.
//!
//! Releasing a block also discards any unreleased bytes of the same file below it, and the
//! first release of a block of another file discards what is left of every other started
//! file: the producer finishes a file before it moves on, so such bytes are ones it
//! discarded (e.g. a piece re-cut differently after a restart that overlapped what the far
//! end had consumed, and so was `Gone`). A file the far end never started and the producer
//! never announces stays until the operator removes it. Each directory must serve exactly
//! one end of one link. `next_block` returns `None` when no ready file is left; the link then
//! looks again after `poll_ms` ([`KeySource::poll_interval`]).

use std::collections::{HashMap, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use secret_buf::SecretBuf;

use super::{BlockRef, KeySource, Produced, SourceError};

pub const KIND: &str = "key-files";

/// Suffix of the progress marker `.NAME.consumed`.
const MARKER_SUFFIX: &str = ".consumed";
/// Suffix of a marker being written.
const TMP_SUFFIX: &str = ".tmp";
/// Longest accepted file name, bytes.
const MAX_NAME: usize = 255;
/// Zeros written per call when wiping.
const WIPE_CHUNK: usize = 64 * 1024;

/// The key-file directory at one end of a link.
pub struct KeyFiles {
    inner: Arc<Inner>,
    poll_ms: u64,
}

struct Inner {
    dir: PathBuf,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Producer: per file, the end of the last piece handed out by this instance.
    handed: HashMap<String, u64>,
    /// The file of the last block released by this instance (tombstones of other files are
    /// removed when this changes).
    last_released: Option<String>,
    /// File names already reported as unusable.
    warned: HashSet<String>,
}

impl KeyFiles {
    /// Watches `dir`, which must exist.
    pub fn new(dir: &Path, poll_ms: u64) -> Result<Self, SourceError> {
        let meta = fs::metadata(dir).map_err(|e| {
            SourceError::Failed(format!("key-files directory {}: {e}", dir.display()))
        })?;
        if !meta.is_dir() {
            return Err(SourceError::Failed(format!(
                "key-files directory {} is not a directory",
                dir.display()
            )));
        }
        Ok(KeyFiles {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                state: Mutex::new(State::default()),
            }),
            poll_ms,
        })
    }

    /// The watched directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// Runs blocking file work off the async threads.
    async fn blocking<T, F>(&self, f: F) -> Result<T, SourceError>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T, SourceError> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || f(&inner))
            .await
            .map_err(|e| SourceError::Failed(format!("key-files worker failed: {e}")))?
    }
}

/// Whether `name` is a file the device has finished (not hidden, not being written).
fn is_ready_name(name: &str) -> bool {
    !name.starts_with('.') && !name.ends_with(".tmp") && !name.ends_with(".part")
}

/// Checks a key file name (from the directory or from a peer's reference).
fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(format!("file name must be 1..={MAX_NAME} bytes"));
    }
    if name.contains('/') || name.contains("..") {
        return Err("file name must not contain '/' or '..'".into());
    }
    if name.chars().any(char::is_control) {
        return Err("file name must not contain control characters".into());
    }
    if !is_ready_name(name) {
        return Err("file name must not start with '.' or end in .tmp or .part".into());
    }
    Ok(())
}

/// A strict decimal: digits only, no leading zeros (except `0` itself).
fn parse_decimal(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) || (s.len() > 1 && s.starts_with('0'))
    {
        return None;
    }
    s.parse().ok()
}

fn encode(name: &str, offset: u64, len: usize) -> String {
    format!("{offset}:{len}:{name}")
}

/// `<offset>:<len>:<name>` → (name, offset, len).
fn decode(reference: &BlockRef) -> Result<(String, u64, usize), SourceError> {
    if reference.source != KIND {
        return Err(SourceError::BadReference(format!(
            "a block of a {:?} source given to a {KIND} source",
            reference.source
        )));
    }
    let bad = |why: &str| SourceError::BadReference(format!("{KIND} block reference: {why}"));
    let mut parts = reference.detail.splitn(3, ':');
    let (Some(off), Some(len), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
        return Err(bad("expected <offset>:<len>:<file name>"));
    };
    let offset = parse_decimal(off).ok_or_else(|| bad("offset is not a decimal number"))?;
    let len = parse_decimal(len)
        .and_then(|l| usize::try_from(l).ok())
        .filter(|&l| l > 0)
        .ok_or_else(|| bad("length is not a positive decimal number"))?;
    if offset.checked_add(len as u64).is_none() {
        return Err(bad("offset + length overflows"));
    }
    check_name(name).map_err(|e| bad(&e))?;
    Ok((name.to_owned(), offset, len))
}

/// Opens `path` without following a symbolic link (`O_NOFOLLOW`) or blocking on a FIFO
/// (`O_NONBLOCK`), and only if it is a regular file.
fn open_regular(path: &Path, write: bool) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(libc::ELOOP) {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "is a symbolic link (never followed)",
                )
            } else {
                e
            }
        })?;
    if f.metadata()?.is_file() {
        Ok(f)
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "is not a regular file",
        ))
    }
}

fn io_failed(path: &Path, what: &str, e: io::Error) -> SourceError {
    SourceError::Failed(format!("{what} {}: {e}", path.display()))
}

impl Inner {
    fn lock(&self) -> Result<MutexGuard<'_, State>, SourceError> {
        self.state
            .lock()
            .map_err(|_| SourceError::Failed("key-files state poisoned by an earlier panic".into()))
    }

    fn key_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn marker_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{name}{MARKER_SUFFIX}"))
    }

    fn marker_tmp_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!(".{name}{MARKER_SUFFIX}{TMP_SUFFIX}"))
    }

    fn sync_dir(&self) -> Result<(), SourceError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| io_failed(&self.dir, "syncing directory", e))
    }

    /// Bytes consumed from the start of `name`, if a marker exists.
    fn read_marker(&self, name: &str) -> Result<Option<u64>, SourceError> {
        let path = self.marker_path(name);
        let read = open_regular(&path, false).and_then(|mut f| {
            let mut text = String::new();
            f.read_to_string(&mut text).map(|_| text)
        });
        match read {
            Ok(text) => {
                let value = text.strip_suffix('\n').unwrap_or(&text);
                parse_decimal(value).map(Some).ok_or_else(|| {
                    SourceError::Failed(format!(
                        "progress marker {} is corrupt (expected a decimal byte count); \
                         inspect it: removing it would serve the file again from its start",
                        path.display()
                    ))
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_failed(&path, "reading progress marker", e)),
        }
    }

    /// Durably records that `consumed` bytes of `name` are used up.
    fn write_marker(&self, name: &str, consumed: u64) -> Result<(), SourceError> {
        let tmp = self.marker_tmp_path(name);
        let path = self.marker_path(name);
        (|| {
            use std::os::unix::fs::OpenOptionsExt;
            // A leftover (or planted) temporary is removed, never written through.
            match fs::remove_file(&tmp) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&tmp)?;
            f.write_all(format!("{consumed}\n").as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &path)
        })()
        .map_err(|e| io_failed(&path, "writing progress marker", e))?;
        self.sync_dir()
    }

    /// Reads `len` bytes of `name` from `offset`; `Ok(None)` if the file is missing or too
    /// short.
    fn read_range(
        &self,
        name: &str,
        offset: u64,
        len: usize,
    ) -> Result<Option<SecretBuf>, SourceError> {
        let path = self.key_path(name);
        let mut f = match open_regular(&path, false) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_failed(&path, "opening key file", e)),
        };
        let meta = f
            .metadata()
            .map_err(|e| io_failed(&path, "reading key file", e))?;
        if !meta.is_file() {
            return Err(SourceError::Failed(format!(
                "{} is not a regular file",
                path.display()
            )));
        }
        if meta.len() < offset.saturating_add(len as u64) {
            return Ok(None);
        }
        let mut data = SecretBuf::zeroed(len);
        match f
            .seek(SeekFrom::Start(offset))
            .and_then(|_| f.read_exact(&mut data[..]))
        {
            Ok(()) => Ok(Some(data)),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(None),
            Err(e) => Err(io_failed(&path, "reading key file", e)),
        }
    }

    /// Overwrites bytes `from..to` of an open key file with zeros and fdatasyncs it.
    fn wipe(f: &mut File, path: &Path, from: u64, to: u64) -> Result<(), SourceError> {
        let zeros = [0u8; WIPE_CHUNK];
        (|| {
            f.seek(SeekFrom::Start(from))?;
            let mut left = to.saturating_sub(from);
            while left > 0 {
                let n = left.min(WIPE_CHUNK as u64) as usize;
                f.write_all(&zeros[..n])?;
                left -= n as u64;
            }
            f.sync_data()
        })()
        .map_err(|e| io_failed(path, "wiping key file", e))
    }

    /// A fully consumed file: wipe it all, unlink it, sync the directory. The marker (which
    /// already records the whole file) stays as a tombstone.
    fn finish(&self, name: &str, f: &mut File) -> Result<(), SourceError> {
        let path = self.key_path(name);
        let len = f
            .metadata()
            .map_err(|e| io_failed(&path, "reading key file", e))?
            .len();
        Self::wipe(f, &path, 0, len)?;
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_failed(&path, "removing key file", e)),
        }
        self.sync_dir()
    }

    fn open_rw(&self, name: &str) -> Result<Option<File>, SourceError> {
        let path = self.key_path(name);
        match open_regular(&path, true) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_failed(&path, "opening key file", e)),
        }
    }

    /// Ready files, those already started first, then by name.
    fn candidates(&self, st: &mut State) -> Result<Vec<String>, SourceError> {
        let entries =
            fs::read_dir(&self.dir).map_err(|e| io_failed(&self.dir, "listing directory", e))?;
        let mut files = Vec::new();
        let mut markers = HashSet::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_failed(&self.dir, "listing directory", e))?;
            let os_name = entry.file_name();
            let Some(name) = os_name.to_str() else {
                let lossy = os_name.to_string_lossy().into_owned();
                if st.warned.insert(lossy.clone()) {
                    tracing::warn!(dir = %self.dir.display(), file = %lossy, "ignoring key file whose name is not UTF-8");
                }
                continue;
            };
            if let Some(key) = name
                .strip_prefix('.')
                .and_then(|n| n.strip_suffix(MARKER_SUFFIX))
            {
                markers.insert(key.to_owned());
                continue;
            }
            if !is_ready_name(name) {
                continue;
            }
            let is_file = entry.file_type().map(|t| t.is_file()).unwrap_or(false);
            if !is_file {
                continue;
            }
            if let Err(why) = check_name(name) {
                if st.warned.insert(name.to_owned()) {
                    tracing::warn!(dir = %self.dir.display(), file = %name.escape_debug(), %why, "ignoring key file");
                }
                continue;
            }
            files.push(name.to_owned());
        }
        files.sort_by(|a, b| {
            (!markers.contains(a), a.as_bytes()).cmp(&(!markers.contains(b), b.as_bytes()))
        });
        Ok(files)
    }

    fn next_block(&self, max_len: usize) -> Result<Option<Produced>, SourceError> {
        if max_len == 0 {
            return Ok(None);
        }
        let mut st = self.lock()?;
        for name in self.candidates(&mut st)? {
            let path = self.key_path(&name);
            let flen = match fs::symlink_metadata(&path) {
                Ok(m) if m.is_file() => m.len(),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_failed(&path, "reading key file", e)),
            };
            let marker = self.read_marker(&name)?;
            if flen == 0 {
                // Nothing to serve: remove the file (and any marker).
                for p in [&path, &self.marker_path(&name)] {
                    match fs::remove_file(p) {
                        Ok(()) => {}
                        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                        Err(e) => return Err(io_failed(p, "removing empty key file", e)),
                    }
                }
                self.sync_dir()?;
                st.handed.remove(&name);
                continue;
            }
            let consumed = marker.unwrap_or(0);
            if consumed >= flen {
                // Consumed before a crash that came before the unlink: finish the job.
                if let Some(mut f) = self.open_rw(&name)? {
                    self.finish(&name, &mut f)?;
                }
                st.handed.remove(&name);
                continue;
            }
            let start = consumed.max(st.handed.get(&name).copied().unwrap_or(0));
            if start >= flen {
                continue; // all handed out, awaiting release
            }
            let n = usize::try_from(flen - start).map_or(max_len, |left| left.min(max_len));
            if marker.is_none() {
                // Started: after a restart this file is finished before any other.
                self.write_marker(&name, 0)?;
            }
            let Some(data) = self.read_range(&name, start, n)? else {
                continue; // vanished or shrank meanwhile
            };
            st.handed.insert(name.clone(), start + n as u64);
            return Ok(Some(Produced {
                reference: BlockRef {
                    source: KIND.into(),
                    detail: encode(&name, start, n),
                },
                data,
            }));
        }
        Ok(None)
    }

    fn fetch_block(&self, name: &str, offset: u64, len: usize) -> Result<SecretBuf, SourceError> {
        let _st = self.lock()?;
        let end = offset + len as u64;
        if let Some(consumed) = self.read_marker(name)? {
            if offset < consumed {
                return Err(SourceError::Gone(format!(
                    "bytes {offset}..{end} of key file {name:?} were already consumed here \
                     ({consumed} bytes consumed)"
                )));
            }
        }
        self.read_range(name, offset, len)?.ok_or_else(|| {
            SourceError::NotYet(format!(
                "key file {name:?} is missing here or shorter than {end} bytes"
            ))
        })
    }

    fn release(&self, name: &str, offset: u64, len: usize) -> Result<(), SourceError> {
        let mut st = self.lock()?;
        let end = offset + len as u64;
        let marker = self.read_marker(name)?;
        let consumed = marker.unwrap_or(0);
        if marker.is_some() && end <= consumed {
            return Ok(()); // released before
        }
        // Record first: a crash from here on can only lose these bytes.
        self.write_marker(name, end)?;
        if let Some(mut f) = self.open_rw(name)? {
            let path = self.key_path(name);
            let flen = f
                .metadata()
                .map_err(|e| io_failed(&path, "reading key file", e))?
                .len();
            if end >= flen {
                self.finish(name, &mut f)?;
                st.handed.remove(name);
            } else {
                Self::wipe(&mut f, &path, consumed, end)?;
            }
        }
        if st.last_released.as_deref() != Some(name) {
            self.retire_others(name);
            st.last_released = Some(name.to_owned());
        }
        Ok(())
    }

    /// Called when a block of `keep` is released and the previous release was of another
    /// file (or none since start): every other file with a marker is done with. The producer
    /// finishes a started file before it hands out any other, so it has released all of
    /// them. Removes their tombstones, wipes and removes what is left of them (a far end's
    /// remainder that the producer discarded), and removes leftover temporary markers.
    /// Failures are only logged.
    fn retire_others(&self, keep: &str) {
        let Ok(entries) = fs::read_dir(&self.dir) else {
            return;
        };
        let tmp_suffix = format!("{MARKER_SUFFIX}{TMP_SUFFIX}");
        let mut removed = false;
        for entry in entries.flatten() {
            let os_name = entry.file_name();
            let Some(rest) = os_name.to_str().and_then(|f| f.strip_prefix('.')) else {
                continue;
            };
            if rest.ends_with(&tmp_suffix) {
                removed |= remove_logged(&entry.path());
                continue;
            }
            let Some(key) = rest.strip_suffix(MARKER_SUFFIX) else {
                continue;
            };
            if key == keep || check_name(key).is_err() {
                continue;
            }
            if let Err(e) = self.retire(key) {
                tracing::warn!(dir = %self.dir.display(), file = %key, error = %e, "cannot retire a finished key file");
                continue;
            }
            removed |= remove_logged(&entry.path());
        }
        if removed {
            if let Err(e) = self.sync_dir() {
                tracing::warn!(error = %e, "cannot sync key-files directory");
            }
        }
    }

    /// Marks all of `name` consumed, wipes and unlinks it (if it still exists).
    fn retire(&self, name: &str) -> Result<(), SourceError> {
        let Some(mut f) = self.open_rw(name)? else {
            return Ok(());
        };
        let path = self.key_path(name);
        let flen = f
            .metadata()
            .map_err(|e| io_failed(&path, "reading key file", e))?
            .len();
        if self.read_marker(name)?.unwrap_or(0) < flen {
            self.write_marker(name, flen)?;
        }
        tracing::warn!(dir = %self.dir.display(), file = %name, "discarding the unused rest of a key file the producer has moved on from");
        self.finish(name, &mut f)
    }
}

/// Removes a file, logging a failure; whether it was removed.
fn remove_logged(path: &Path) -> bool {
    match fs::remove_file(path) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot remove stale progress marker");
            false
        }
    }
}

#[async_trait::async_trait]
impl KeySource for KeyFiles {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn poll_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.poll_ms)
    }

    async fn next_block(&self, max_len: usize) -> Result<Option<Produced>, SourceError> {
        self.blocking(move |inner| inner.next_block(max_len)).await
    }

    async fn fetch_block(
        &self,
        reference: &BlockRef,
        len: usize,
    ) -> Result<SecretBuf, SourceError> {
        let (name, offset, n) = decode(reference)?;
        if n != len {
            return Err(SourceError::BadReference(format!(
                "block length {len} does not match its reference ({n})"
            )));
        }
        self.blocking(move |inner| inner.fetch_block(&name, offset, n))
            .await
    }

    async fn release(&self, reference: &BlockRef) -> Result<(), SourceError> {
        let (name, offset, len) = decode(reference)?;
        self.blocking(move |inner| inner.release(&name, offset, len))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ends() -> (tempfile::TempDir, tempfile::TempDir, KeyFiles, KeyFiles) {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        let pa = KeyFiles::new(a.path(), 50).unwrap();
        let pb = KeyFiles::new(b.path(), 50).unwrap();
        (a, b, pa, pb)
    }

    fn bytes(len: usize, salt: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(salt) | 1)
            .collect()
    }

    /// Writes `name` the way a device should: temporary name, then rename.
    fn drop_file(dir: &Path, name: &str, data: &[u8]) {
        let tmp = dir.join(format!("{name}.part"));
        fs::write(&tmp, data).unwrap();
        fs::rename(&tmp, dir.join(name)).unwrap();
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }

    fn reference(detail: &str) -> BlockRef {
        BlockRef {
            source: KIND.into(),
            detail: detail.into(),
        }
    }

    #[tokio::test]
    async fn files_appearing_while_polling_and_ignored_names() {
        let (a, _b, pa, _pb) = ends();
        assert_eq!(pa.poll_interval(), std::time::Duration::from_millis(50));
        assert!(pa.next_block(100).await.unwrap().is_none());
        // Files still being written, hidden files, directories and empty files give nothing.
        fs::write(a.path().join("k1.part"), b"xxxx").unwrap();
        fs::write(a.path().join("k1.tmp"), b"xxxx").unwrap();
        fs::write(a.path().join(".k1"), b"xxxx").unwrap();
        fs::create_dir(a.path().join("subdir")).unwrap();
        fs::write(a.path().join("empty"), b"").unwrap();
        assert!(pa.next_block(100).await.unwrap().is_none());
        assert!(!a.path().join("empty").exists(), "empty file removed");
        drop_file(a.path(), "k1", &bytes(10, 1));
        let p = pa.next_block(100).await.unwrap().unwrap();
        assert_eq!(&p.data[..], &bytes(10, 1)[..]);
        assert_eq!(p.reference.source, KIND);
        assert_eq!(p.reference.detail, "0:10:k1");
        // Handed out and not released: nothing more.
        assert!(pa.next_block(100).await.unwrap().is_none());
        assert!(pa.next_block(0).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn large_file_in_pieces_far_end_not_yet_then_same_bytes_and_cleanup() {
        let (a, b, pa, pb) = ends();
        let data = bytes(1000, 7);
        drop_file(a.path(), "0001.key", &data);
        let mut got = Vec::new();
        let mut refs = Vec::new();
        while let Some(p) = pa.next_block(300).await.unwrap() {
            assert!(p.data.len() <= 300 && !p.data.is_empty());
            got.extend_from_slice(&p.data);
            refs.push((p.reference, p.data.len()));
        }
        assert_eq!(got, data, "pieces concatenate to the file");
        assert_eq!(
            refs.iter()
                .map(|(r, _)| r.detail.as_str())
                .collect::<Vec<_>>(),
            [
                "0:300:0001.key",
                "300:300:0001.key",
                "600:300:0001.key",
                "900:100:0001.key"
            ]
        );

        // The far end's device has not written its copy yet.
        let (r0, n0) = &refs[0];
        assert!(matches!(
            pb.fetch_block(r0, *n0).await,
            Err(SourceError::NotYet(_))
        ));
        // A copy shorter than the block (a device writing in place) is not there yet either.
        fs::write(b.path().join("0001.key"), &data[..500]).unwrap();
        assert!(matches!(
            pb.fetch_block(&refs[3].0, 100).await,
            Err(SourceError::NotYet(_))
        ));
        drop_file(b.path(), "0001.key", &data);
        // Witnesses: second links to both copies, to see what was left in them.
        let w = tempfile::tempdir_in(a.path().parent().unwrap()).unwrap();
        fs::hard_link(a.path().join("0001.key"), w.path().join("a")).unwrap();
        fs::hard_link(b.path().join("0001.key"), w.path().join("b")).unwrap();
        for (r, n) in &refs {
            let far = pb.fetch_block(r, *n).await.unwrap();
            let (_, off, _) = decode(r).unwrap();
            assert_eq!(&far[..], &data[off as usize..off as usize + n]);
            // Far end: into the pool, then release. Producer: release.
            pb.release(r).await.unwrap();
            pa.release(r).await.unwrap();
        }
        // Released ranges were zeroed before removal; the files are gone at both ends and
        // only the tombstone marker is left.
        for dir in [a.path(), b.path()] {
            assert_eq!(names(dir), [".0001.key.consumed"], "{}", dir.display());
        }
        for end in ["a", "b"] {
            let left = fs::read(w.path().join(end)).unwrap();
            assert_eq!(left.len(), 1000);
            assert!(
                left.iter().all(|&b| b == 0),
                "{end}: key file wiped before unlink"
            );
        }
        // Releasing again is harmless; fetching again is Gone.
        pa.release(&refs[3].0).await.unwrap();
        assert!(matches!(
            pb.fetch_block(&refs[3].0, 100).await,
            Err(SourceError::Gone(_))
        ));
        // Length must match the reference.
        assert!(matches!(
            pb.fetch_block(&refs[0].0, 299).await,
            Err(SourceError::BadReference(_))
        ));
    }

    #[tokio::test]
    async fn release_zeroes_the_released_range() {
        let (a, _b, pa, _pb) = ends();
        let data = bytes(100, 3);
        drop_file(a.path(), "f", &data);
        let p = pa.next_block(40).await.unwrap().unwrap();
        pa.release(&p.reference).await.unwrap();
        let on_disk = fs::read(a.path().join("f")).unwrap();
        assert!(
            on_disk[..40].iter().all(|&b| b == 0),
            "released bytes wiped"
        );
        assert_eq!(&on_disk[40..], &data[40..]);
        assert_eq!(
            fs::read_to_string(a.path().join(".f.consumed")).unwrap(),
            "40\n"
        );
    }

    #[tokio::test]
    async fn restart_never_returns_a_released_piece_and_far_end_says_gone() {
        let (a, b, pa, pb) = ends();
        let data = bytes(500, 9);
        drop_file(a.path(), "k", &data);
        drop_file(b.path(), "k", &data);
        let p1 = pa.next_block(200).await.unwrap().unwrap();
        let f1 = pb.fetch_block(&p1.reference, 200).await.unwrap();
        assert_eq!(&f1[..], &p1.data[..]);
        pb.release(&p1.reference).await.unwrap();
        pa.release(&p1.reference).await.unwrap();
        // Second piece handed out, fetched and released at the far end; the producer crashes
        // before releasing it.
        let p2 = pa.next_block(200).await.unwrap().unwrap();
        assert_eq!(p2.reference.detail, "200:200:k");
        pb.fetch_block(&p2.reference, 200).await.unwrap();
        pb.release(&p2.reference).await.unwrap();
        drop(pa);
        // A newer file with a smaller name arrives meanwhile: the started file comes first.
        let newer = bytes(50, 2);
        drop_file(a.path(), "a-new", &newer);
        drop_file(b.path(), "a-new", &newer);
        let pa = KeyFiles::new(a.path(), 50).unwrap();
        let q = pa.next_block(300).await.unwrap().unwrap();
        assert_eq!(q.reference.detail, "200:300:k", "resumes at the marker");
        assert_eq!(&q.data[..], &data[200..]);
        // It overlaps what the far end consumed: Gone (as is the first piece); the producer
        // discards the block and releases its copy.
        assert!(matches!(
            pb.fetch_block(&q.reference, 300).await,
            Err(SourceError::Gone(_))
        ));
        assert!(matches!(
            pb.fetch_block(&p1.reference, 200).await,
            Err(SourceError::Gone(_))
        ));
        pa.release(&q.reference).await.unwrap();
        assert!(!a.path().join("k").exists());
        // Restarting again does not bring any of it back.
        drop(pa);
        let pa = KeyFiles::new(a.path(), 50).unwrap();
        let n = pa.next_block(300).await.unwrap().unwrap();
        assert_eq!(n.reference.detail, "0:50:a-new");
        let far = pb.fetch_block(&n.reference, 50).await.unwrap();
        assert_eq!(&far[..], &newer[..]);
        // The far end moves on to the next file: the rest of `k` it still held (400..500),
        // which the producer discarded, is wiped and removed with its marker.
        pb.release(&n.reference).await.unwrap();
        pa.release(&n.reference).await.unwrap();
        for dir in [a.path(), b.path()] {
            assert_eq!(names(dir), [".a-new.consumed"], "{}", dir.display());
        }
        // Restart after the last piece was released: nothing comes back.
        drop(pa);
        let pa = KeyFiles::new(a.path(), 50).unwrap();
        assert!(pa.next_block(1000).await.unwrap().is_none());
        assert!(matches!(
            pb.fetch_block(&n.reference, 50).await,
            Err(SourceError::Gone(_))
        ));
    }

    #[tokio::test]
    async fn restart_with_the_file_fully_recorded_but_not_yet_removed() {
        let (a, _b, pa, _pb) = ends();
        drop_file(a.path(), "k", &bytes(64, 5));
        // As if a crash came after the marker but before wiping and unlinking.
        fs::write(a.path().join(".k.consumed"), "64\n").unwrap();
        assert!(pa.next_block(1000).await.unwrap().is_none());
        assert!(!a.path().join("k").exists());
        // A corrupt marker stops the source instead of re-serving the file.
        drop_file(a.path(), "m", &bytes(64, 5));
        fs::write(a.path().join(".m.consumed"), "x\n").unwrap();
        assert!(matches!(
            pa.next_block(1000).await,
            Err(SourceError::Failed(_))
        ));
    }

    #[tokio::test]
    async fn malformed_references_are_rejected() {
        let (_a, b, _pa, pb) = ends();
        drop_file(b.path(), "ok", &bytes(10, 1));
        for detail in [
            "",
            "0:10",
            "0:10:",
            "x:10:ok",
            "0:x:ok",
            "0:0:ok",
            "-1:10:ok",
            "+0:10:ok",
            "00:10:ok",
            "0:010:ok",
            "0:10:../ok",
            "0:10:a/b",
            "0:10:..",
            "0:10:.ok.consumed",
            "0:10:ok\n",
            "0:10:o\u{7}k",
            "0:10:ok.tmp",
            "0:10:ok.part",
            "18446744073709551615:10:ok",
        ] {
            let r = reference(detail);
            assert!(
                matches!(
                    pb.fetch_block(&r, 10).await,
                    Err(SourceError::BadReference(_))
                ),
                "{detail:?}"
            );
            assert!(
                matches!(pb.release(&r).await, Err(SourceError::BadReference(_))),
                "{detail:?}"
            );
        }
        let other = BlockRef {
            source: "simulated".into(),
            detail: "0:10:ok".into(),
        };
        assert!(matches!(
            pb.fetch_block(&other, 10).await,
            Err(SourceError::BadReference(_))
        ));
        // Well-formed: served. The name is everything after the second colon.
        drop_file(b.path(), "x:y", &bytes(3, 4));
        assert_eq!(
            &pb.fetch_block(&reference("0:3:x:y"), 3).await.unwrap()[..],
            &bytes(3, 4)[..]
        );
        fs::remove_file(b.path().join("x:y")).unwrap();
        assert_eq!(
            &pb.fetch_block(&reference("0:10:ok"), 10).await.unwrap()[..],
            &bytes(10, 1)[..]
        );
        assert_eq!(
            &pb.fetch_block(&reference("4:6:ok"), 6).await.unwrap()[..],
            &bytes(10, 1)[4..]
        );
        // Nothing was created or removed by the rejected references.
        assert_eq!(names(b.path()), ["ok"]);
    }
}
