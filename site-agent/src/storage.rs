//! How a site agent keeps shares, whatever holds the bytes.
//!
//! [`Storage`] is every share of the agent; [`ShareFiles`] is one share: its manifest and
//! chunk records in memory, and the rules that protect them. The bytes live in a
//! [`Backend`](crate::backend::Backend): a local folder ([`crate::backend::local`], its doc has
//! the on-disk layout) or an S3-compatible bucket ([`crate::backend::s3`]).
//!
//! Durability: a chunk is acknowledged only after the backend holds its bytes and its record
//! durably, so an acknowledged chunk survives a crash and an unacknowledged one is simply
//! sent again. Rewrites (a resumed store sends a chunk of a new split): the held chunk is
//! first durably **retired** and forgotten, so a crash at any moment leaves the chunk either
//! recorded with the data it describes, or missing (and sent again), never a record that
//! describes other bytes. One upload at a time may write a given chunk: a second one racing
//! it is refused ([`StoreError::Busy`]) and retries. The manifest, checked and marked
//! complete at finalisation, lets the catalogue be rebuilt from the sites alone.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use uuid::Uuid;

use share_transfer::wire::{Manifest, ShareCheck, ShareOpen};
use sharing::format::{ShareHeader, ShareTrailer, HEADER_LEN, TRAILER_LEN};

pub use crate::aligned::{AlignedBuf, DIO_ALIGN};
use crate::backend::{Area, Backend, ChunkRecords, Put, ShareIo};
use crate::staging::Staging;

/// Storage failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// The object store failed or could not be reached (after its retries). `error`'s
    /// message already carries its causes, so it is not chained as a source again.
    #[error("object store {store}: {what}: {error}")]
    Backend {
        store: String,
        what: String,
        error: Box<dyn std::error::Error + Send + Sync>,
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

impl ChunkWrite {
    /// The backend's view of this chunk, whose BLAKE3 is `hash`.
    pub(crate) fn put(&self, hash: [u8; 32]) -> Put<'_> {
        Put {
            chunk: self.chunk,
            nonce: self.nonce,
            hash,
            data: &self.data,
            key_ids: &self.key_ids,
        }
    }
}

/// The backend's view of `writes`, with each chunk's BLAKE3.
pub(crate) fn puts<'a>(writes: &'a [ChunkWrite], hashes: &[[u8; 32]]) -> Vec<Put<'a>> {
    writes.iter().zip(hashes).map(|(w, h)| w.put(*h)).collect()
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One share: its manifest and records, and its bytes in the backend.
pub struct ShareFiles {
    pub id: Uuid,
    pub index: u8,
    io: Arc<dyn ShareIo>,
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
        let mut w = lock(&self.share.writing);
        for j in &self.chunks {
            w.remove(j);
        }
    }
}

impl ShareFiles {
    pub fn manifest(&self) -> Manifest {
        lock(&self.manifest).clone()
    }

    /// `(chunk, nonce)` of every durable chunk, sorted.
    pub fn state(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = lock(&self.chunks)
            .iter()
            .map(|(&j, &(n, _))| (j, n))
            .collect();
        v.sort_unstable();
        v
    }

    /// Claims `chunks` for one upload, or says which one another upload is writing.
    fn claim(&self, chunks: Vec<u64>) -> Result<Claim<'_>, StoreError> {
        let mut w = lock(&self.writing);
        if let Some(&chunk) = chunks.iter().find(|j| w.contains(j)) {
            return Err(StoreError::Busy { chunk });
        }
        w.extend(chunks.iter().copied());
        Ok(Claim {
            share: self,
            chunks,
        })
    }

    /// Before chunks that are held are overwritten: durably retires them and forgets them,
    /// so no crash or reader sees a record of other bytes. Returns whether any was held.
    fn retire(&self, writes: &[ChunkWrite]) -> Result<bool, StoreError> {
        let held: Vec<(u64, crate::backend::Record)> = {
            let mut c = lock(&self.chunks);
            writes
                .iter()
                .filter_map(|w| c.remove(&w.chunk).map(|r| (w.chunk, r)))
                .collect()
        };
        if held.is_empty() {
            return Ok(false);
        }
        self.io.retire(&held)?;
        Ok(true)
    }

    /// Writes chunks durably with their records. All chunks must be full-size. A chunk
    /// already held is first retired (see the module doc); a chunk another upload is writing
    /// is refused.
    pub fn write_chunks(&self, writes: &[ChunkWrite]) -> Result<(), StoreError> {
        if self.manifest().complete {
            return self.mend(writes);
        }
        let _claim = self.claim(writes.iter().map(|w| w.chunk).collect())?;
        let hashes: Vec<[u8; 32]> = writes
            .iter()
            .map(|w| *blake3::hash(&w.data).as_bytes())
            .collect();
        let rewrite = self.retire(writes)?;
        let crash: &[Failpoint] = if rewrite {
            &[Failpoint::Write, Failpoint::Rewrite]
        } else {
            &[Failpoint::Write]
        };
        self.io.put(Area::Live, &puts(writes, &hashes), crash)?;
        let mut chunks = lock(&self.chunks);
        for (w, h) in writes.iter().zip(hashes) {
            chunks.insert(w.chunk, (w.nonce, h));
        }
        Ok(())
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
        let mut hashes = Vec::with_capacity(writes.len());
        {
            let c = lock(&self.chunks);
            for w in writes {
                let h = *blake3::hash(&w.data).as_bytes();
                match c.get(&w.chunk) {
                    Some(&(n, held)) if n == w.nonce && held == h => hashes.push(h),
                    _ => return Err(complete()),
                }
            }
        }
        let _claim = self.claim(writes.iter().map(|w| w.chunk).collect())?;
        self.io.mend(&puts(writes, &hashes))?;
        tracing::info!(backup = %self.id, share = self.index, chunks = ?writes.iter().map(|w| w.chunk).collect::<Vec<_>>(), "damaged chunks repaired");
        Ok(())
    }

    /// Reads chunk `j` into `buf` (chunk-size long) and checks it against its record.
    pub fn read_chunk(&self, j: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let rec = lock(&self.chunks)
            .get(&j)
            .copied()
            .ok_or(StoreError::Missing { chunk: j })?;
        self.io.read(Area::Live, j, &rec, buf)?;
        if *blake3::hash(buf).as_bytes() != rec.1 {
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
        let records = lock(&self.chunks).clone();
        let stored = (0..m.open.chunk_count)
            .filter(|j| records.contains_key(j))
            .count() as u64;
        if stored != m.open.chunk_count {
            return Err(fail(format!(
                "only {stored} of {} chunks are stored",
                m.open.chunk_count
            )));
        }
        let held = share_transfer::wire::splits_digest(
            (0..m.open.chunk_count).map(|j| (j, records.get(&j).map_or(0, |&(n, _)| n))),
        );
        if held != splits {
            return Err(fail(
                "this share holds chunks of other splits than the client's; run the store again"
                    .into(),
            ));
        }
        // Every chunk is read back and hashed: a share is never complete with a damaged one.
        let check = self.check()?;
        if !check.damaged.is_empty() || !check.missing.is_empty() {
            return Err(fail(format!(
                "chunks {:?} are damaged and {:?} missing on disk; run the store again",
                check.damaged, check.missing
            )));
        }
        self.io.freeze(Area::Live, &records)?;
        m.header_hex = Some(hex::encode(header));
        m.trailer_hex = Some(hex::encode(trailer));
        m.complete = true;
        self.io.put_manifest(&m)?;
        *lock(&self.manifest) = m.clone();
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
        self.io.put_manifest(&m)?;
        *lock(&self.manifest) = m.clone();
        Ok(m)
    }

    /// The renewal staged for this share, if any.
    pub fn staging(&self) -> Option<Arc<Staging>> {
        lock(&self.staging).clone()
    }

    /// Starts staging renewal `renewal` to `epoch`: the share must be complete and at the
    /// epoch before; the same renewal again is a no-op, another one pending is refused.
    pub fn begin_renewal(&self, renewal: Uuid, epoch: u32) -> Result<Arc<Staging>, StoreError> {
        let m = self.manifest();
        let mut slot = lock(&self.staging);
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
        let s = Arc::new(Staging::begin(self.io.clone(), &m, renewal, epoch)?);
        *slot = Some(s.clone());
        Ok(s)
    }

    /// Forgets the staged renewal (after it was committed or aborted).
    pub fn end_renewal(&self) {
        *lock(&self.staging) = None;
    }

    /// Re-reads every chunk and compares it with its record. A backend that cannot be
    /// reached is an error, not damage.
    pub fn check(&self) -> Result<ShareCheck, StoreError> {
        let m = self.manifest();
        let cs = m.open.chunk_size as usize;
        let mut buf = AlignedBuf::new(cs);
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
                Err(StoreError::Damaged { .. }) => out.damaged.push(j),
                Err(e @ StoreError::Backend { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(backup = %self.id, share = self.index, chunk = j, error = %e, "chunk unreadable");
                    out.damaged.push(j)
                }
            }
        }
        Ok(out)
    }
}

/// All shares kept by one agent.
pub struct Storage {
    backend: Box<dyn Backend>,
    open: Mutex<HashMap<(Uuid, u8), Arc<ShareFiles>>>,
}

impl Storage {
    /// Shares in the folder `root` (the local backend).
    pub fn new(root: &std::path::Path, direct_io: bool) -> Result<Self, StoreError> {
        Ok(Self::with_backend(Box::new(
            crate::backend::local::LocalBackend::new(root, direct_io)?,
        )))
    }

    pub fn with_backend(backend: Box<dyn Backend>) -> Self {
        Storage {
            backend,
            open: Mutex::new(HashMap::new()),
        }
    }

    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
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
        self.backend.create(&Manifest {
            backup_id: id,
            share_index: index,
            open: open.clone(),
            client_sae: client.to_owned(),
            header_hex: None,
            trailer_hex: None,
            complete: false,
            renewal: None,
        })?;
        self.get(id, index)?
            .ok_or(StoreError::NotFound { id, index })
    }

    /// The share, if this agent holds it.
    pub fn get(&self, id: Uuid, index: u8) -> Result<Option<Arc<ShareFiles>>, StoreError> {
        let mut open = lock(&self.open);
        if let Some(s) = open.get(&(id, index)) {
            return Ok(Some(s.clone()));
        }
        let Some(o) = self.backend.open(id, index)? else {
            return Ok(None);
        };
        let staging = o
            .staged
            .map(|(st, records)| Arc::new(Staging::new(o.io.clone(), &o.manifest, st, records)));
        let s = Arc::new(ShareFiles {
            id,
            index,
            io: o.io,
            manifest: Mutex::new(o.manifest),
            chunks: Mutex::new(o.live),
            writing: Mutex::new(std::collections::HashSet::new()),
            broken: AtomicBool::new(false),
            staging: Mutex::new(staging),
        });
        open.insert((id, index), s.clone());
        Ok(Some(s))
    }

    /// Finishes every share renewal a crash left committed but not swapped in (at start,
    /// so that a restarted agent serves renewed shares from its first request).
    pub fn recover_renewals(&self) -> Result<usize, StoreError> {
        let mut done = 0;
        for id in self.backend.backups()? {
            for i in self.backend.shares(id)? {
                if self.backend.recover(id, i)? {
                    done += 1;
                }
            }
        }
        Ok(done)
    }

    /// Removes share `i` of backup `id` (whole or not at all, should the agent crash).
    pub fn remove(&self, id: Uuid, index: u8) -> Result<(), StoreError> {
        lock(&self.open).remove(&(id, index));
        self.backend.remove(id, index)
    }

    /// Drops the cached share `i` of backup `id` and opens it again (after a renewal
    /// swapped it in); requests already holding the old one finish on it.
    pub fn reload(&self, id: Uuid, index: u8) -> Result<Option<Arc<ShareFiles>>, StoreError> {
        lock(&self.open).remove(&(id, index));
        self.get(id, index)
    }

    /// Every share of backup `id` held here.
    pub fn shares_of(&self, id: Uuid) -> Result<Vec<Arc<ShareFiles>>, StoreError> {
        let mut out = Vec::new();
        for i in self.backend.shares(id)? {
            if let Some(s) = self.get(id, i)? {
                out.push(s);
            }
        }
        out.sort_by_key(|s| s.index);
        Ok(out)
    }

    /// Manifests of every share held here.
    pub fn list(&self) -> Result<Vec<Manifest>, StoreError> {
        let mut out = Vec::new();
        for id in self.backend.backups()? {
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
    use std::os::unix::fs::FileExt;
    use std::path::Path;

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

    fn data_file(root: &Path, id: Uuid) -> std::path::PathBuf {
        root.join(id.to_string()).join("share-0").join("data")
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
        std::fs::OpenOptions::new()
            .write(true)
            .open(data_file(dir.path(), id))
            .unwrap()
            .write_all_at(&rewrite[0].data, 0)
            .unwrap();
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
        let check = share.check().unwrap();
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
        share.io.put_manifest(&m).unwrap();
        *share.manifest.lock().unwrap() = m;
        // Chunk 1 rots on disk.
        std::fs::OpenOptions::new()
            .write(true)
            .open(data_file(dir.path(), id))
            .unwrap()
            .write_all_at(&[0xBC], CS as u64 + 9)
            .unwrap();
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
