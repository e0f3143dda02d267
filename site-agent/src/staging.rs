//! A share renewal staged beside its share, and how it is committed or rolled back.
//!
//! ```text
//! STORE/<backup id>/share-<i>/renew.json        the pending renewal (written atomically):
//!                                               renewal ID, target epoch, prepared, committed
//!                            /renew.data        the renewed chunks (current ⊕ delta), chunk j
//!                                               at offset j * chunk_size
//!                            /renew.chunks.log  48-byte records as in chunks.log, new nonces
//!                            /renew.keys.log    which QKD key IDs carried each delta
//!                            /keys.e<N>.log     after commit: the key IDs of epoch N's deltas
//! ```
//!
//! Staging never touches the current share: a chunk's delta is XORed into the current
//! chunk (read back and checked against its record first) and the result goes to
//! `renew.data`, `fdatasync`ed before its record is appended to `renew.chunks.log` and
//! that is `fdatasync`ed too; the log is replayed on start like `chunks.log`. Staging a
//! chunk twice is idempotent when the result is the same bytes, refused otherwise.
//!
//! **Prepare** checks that every chunk is staged from the client's splits and reads each
//! back against its record, then rewrites `renew.json` with `prepared`.
//!
//! **Commit** rewrites `renew.json` with `committed` (atomically, file and folder synced):
//! that is the commit point. Then the staged files are renamed over the current ones
//! (`renew.data` → `data`, `renew.chunks.log` → `chunks.log`, `renew.keys.log` →
//! `keys.e<N>.log`), the manifest records the new epoch and the renewal, and `renew.json`
//! is removed. Each step is idempotent and [`recover`] redoes whatever is left when a share
//! is opened with a committed `renew.json`: a crash before the commit point leaves the share
//! as it was with the renewal still staged (the client finishes or rolls it back); a crash
//! after it always ends with the renewed share.
//!
//! **Abort** (before commit) removes the staged files and `renew.json`.
//!
//! A renewal needs the share's size again in free space until it commits.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::storage::{
    failpoint, io, open_append, open_data, open_log, read_json, record_bytes, sync_dir,
    write_atomic, write_manifest, ChunkRecords, ChunkWrite, Failpoint, ShareFiles, StoreError,
};
use share_transfer::wire::{splits_digest, Manifest, PendingRenewal};

const STATE: &str = "renew.json";
const DATA: &str = "renew.data";
const LOG: &str = "renew.chunks.log";
const KEYS: &str = "renew.keys.log";

/// A chunk's (nonce, BLAKE3) as its log records it.
type Record = (u64, [u8; 32]);

/// What `renew.json` holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct State {
    renewal: Uuid,
    epoch: u32,
    prepared: bool,
    committed: bool,
}

/// A renewal staged for one share.
pub struct Staging {
    dir: PathBuf,
    chunk_size: usize,
    chunk_count: u64,
    state: Mutex<State>,
    data: File,
    log: Mutex<File>,
    keys: Mutex<File>,
    chunks: Mutex<ChunkRecords>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn conflict(m: String) -> StoreError {
    StoreError::Renewal(m)
}

impl Staging {
    /// Starts staging renewal `renewal` of the share in `dir` (manifest `m`) to `epoch`.
    pub(crate) fn begin(
        dir: &Path,
        m: &Manifest,
        renewal: Uuid,
        epoch: u32,
    ) -> Result<Self, StoreError> {
        for f in [DATA, LOG, KEYS] {
            remove_if_present(&dir.join(f))?;
        }
        write_state(
            dir,
            &State {
                renewal,
                epoch,
                prepared: false,
                committed: false,
            },
        )?;
        Self::open(dir, m)?.ok_or_else(|| conflict("staging vanished".into()))
    }

    /// The renewal staged in `dir`, if any and not committed ([`recover`] runs first).
    pub(crate) fn open(dir: &Path, m: &Manifest) -> Result<Option<Self>, StoreError> {
        let Some(state) = read_state(dir)? else {
            return Ok(None);
        };
        let data = open_data(&dir.join(DATA))?;
        let (log, chunks) = open_log(&dir.join(LOG))?;
        let keys = open_append(&dir.join(KEYS))?;
        Ok(Some(Staging {
            dir: dir.to_owned(),
            chunk_size: m.open.chunk_size as usize,
            chunk_count: m.open.chunk_count,
            state: Mutex::new(state),
            data,
            log: Mutex::new(log),
            keys: Mutex::new(keys),
            chunks: Mutex::new(chunks),
        }))
    }

    pub fn renewal(&self) -> Uuid {
        lock(&self.state).renewal
    }

    pub fn epoch(&self) -> u32 {
        lock(&self.state).epoch
    }

    /// Where the renewal stands, as the client sees it.
    pub fn pending(&self) -> PendingRenewal {
        let st = *lock(&self.state);
        PendingRenewal {
            renewal: st.renewal,
            epoch: st.epoch,
            staged: lock(&self.chunks).len() as u64,
            prepared: st.prepared,
        }
    }

    /// Stages chunks: each `ChunkWrite`'s data is the delta; the current chunk of `share`
    /// ⊕ delta is written to the staging files with the write's nonce. The buffers are
    /// turned into the renewed chunks in place.
    pub fn stage(&self, share: &ShareFiles, writes: &mut [ChunkWrite]) -> Result<(), StoreError> {
        if lock(&self.state).prepared {
            return Err(conflict("renewal already prepared: no more chunks".into()));
        }
        let mut current = vec![0u8; self.chunk_size];
        let mut fresh = Vec::with_capacity(writes.len());
        for w in writes.iter_mut() {
            if w.chunk >= self.chunk_count || w.data.len() != self.chunk_size {
                return Err(conflict(format!("chunk {} is not of this share", w.chunk)));
            }
            share.read_chunk(w.chunk, &mut current)?;
            sharing::renewal::apply(&mut w.data, &current).map_err(|e| conflict(e.to_string()))?;
            let h = *blake3::hash(&w.data).as_bytes();
            match lock(&self.chunks).get(&w.chunk) {
                Some(&(n, held)) if n == w.nonce && held == h => continue,
                Some(_) => {
                    return Err(conflict(format!(
                        "chunk {} is already staged with other bytes",
                        w.chunk
                    )))
                }
                None => {}
            }
            let off = w.chunk * self.chunk_size as u64;
            let path = self.dir.join(DATA);
            self.data.write_all_at(&w.data, off).map_err(io(&path))?;
            fresh.push((w.chunk, w.nonce, h, w.key_ids.clone()));
        }
        use zeroize::Zeroize;
        current.zeroize();
        if fresh.is_empty() {
            return Ok(());
        }
        let data_path = self.dir.join(DATA);
        self.data.sync_data().map_err(io(&data_path))?;
        failpoint(Failpoint::RenewStage);
        let mut records = Vec::with_capacity(fresh.len() * 48);
        let mut key_lines = String::new();
        for (j, n, h, ids) in &fresh {
            record_bytes(&mut records, *j, *n, h);
            key_lines.push_str(&j.to_string());
            for k in ids {
                key_lines.push(' ');
                key_lines.push_str(&k.to_string());
            }
            key_lines.push('\n');
        }
        let log_path = self.dir.join(LOG);
        {
            let mut log = lock(&self.log);
            log.write_all(&records).map_err(io(&log_path))?;
            log.sync_data().map_err(io(&log_path))?;
        }
        let keys_path = self.dir.join(KEYS);
        lock(&self.keys)
            .write_all(key_lines.as_bytes())
            .map_err(io(&keys_path))?;
        let mut c = lock(&self.chunks);
        for (j, n, h, _) in fresh {
            c.insert(j, (n, h));
        }
        Ok(())
    }

    /// Checks that every chunk is staged from the splits the client dealt (`splits`) and
    /// reads back as recorded; then marks the renewal prepared.
    pub fn prepare(&self, splits: &str) -> Result<PendingRenewal, StoreError> {
        if lock(&self.state).prepared {
            return Ok(self.pending());
        }
        let records: Vec<(u64, Option<Record>)> = {
            let c = lock(&self.chunks);
            (0..self.chunk_count)
                .map(|j| (j, c.get(&j).copied()))
                .collect()
        };
        let missing = records.iter().filter(|(_, r)| r.is_none()).count();
        if missing > 0 {
            return Err(conflict(format!(
                "{missing} of {} chunks are not staged yet",
                self.chunk_count
            )));
        }
        let held = splits_digest(records.iter().map(|(j, r)| (*j, r.map_or(0, |r| r.0))));
        if held != splits {
            return Err(conflict(
                "the staged chunks come from other splits than the client's".into(),
            ));
        }
        let mut buf = vec![0u8; self.chunk_size];
        let path = self.dir.join(DATA);
        for (j, r) in &records {
            self.data
                .read_exact_at(&mut buf, j * self.chunk_size as u64)
                .map_err(io(&path))?;
            if r.map(|r| r.1) != Some(*blake3::hash(&buf).as_bytes()) {
                return Err(conflict(format!("staged chunk {j} does not read back")));
            }
        }
        let mut st = lock(&self.state);
        let next = State {
            prepared: true,
            ..*st
        };
        write_state(&self.dir, &next)?;
        *st = next;
        drop(st);
        Ok(self.pending())
    }

    /// Commits a prepared renewal (see the module doc); the share must then be reopened.
    pub fn commit(&self) -> Result<(), StoreError> {
        let mut st = lock(&self.state);
        if !st.prepared {
            return Err(conflict(
                "renewal not prepared: stage every chunk first".into(),
            ));
        }
        failpoint(Failpoint::RenewPrecommit);
        let next = State {
            committed: true,
            ..*st
        };
        write_state(&self.dir, &next)?;
        *st = next;
        failpoint(Failpoint::RenewCommit);
        roll_forward(&self.dir, &next)
    }

    /// Drops the staged renewal (only before commit).
    pub fn abort(&self) -> Result<(), StoreError> {
        if lock(&self.state).committed {
            return Err(conflict("renewal already committed".into()));
        }
        for f in [DATA, LOG, KEYS, STATE] {
            remove_if_present(&self.dir.join(f))?;
        }
        sync_dir(&self.dir)
    }
}

/// Finishes a committed renewal left by a crash in `dir`; run before a share is opened.
/// Returns whether there was one.
pub(crate) fn recover(dir: &Path) -> Result<bool, StoreError> {
    match read_state(dir)? {
        Some(st) if st.committed => {
            tracing::info!(dir = %dir.display(), epoch = st.epoch, "finishing a committed share renewal");
            roll_forward(dir, &st).map(|()| true)
        }
        _ => Ok(false),
    }
}

/// The steps after the commit point, each idempotent.
fn roll_forward(dir: &Path, st: &State) -> Result<(), StoreError> {
    for (from, to) in [
        (DATA.to_owned(), "data".to_owned()),
        (LOG.to_owned(), "chunks.log".to_owned()),
        (KEYS.to_owned(), format!("keys.e{}.log", st.epoch)),
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

fn read_state(dir: &Path) -> Result<Option<State>, StoreError> {
    read_json(&dir.join(STATE))
}

/// Writes `renew.json` atomically and durably (temp file, fsync, rename, folder fsync).
fn write_state(dir: &Path, st: &State) -> Result<(), StoreError> {
    write_atomic(dir, STATE, &serde_json::to_vec(st).unwrap_or_default())
}

fn remove_if_present(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::storage::{AlignedBuf, Storage};
    use share_transfer::wire::{SchemeInfo, SchemeName, ShareOpen};

    const CS: usize = 4096;

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

    /// A complete share of two chunks (0x11, 0x22) in a fresh store.
    fn complete_share(root: &Path) -> (Uuid, PathBuf) {
        let id = Uuid::new_v4();
        let store = Storage::new(root, false).unwrap();
        let open = ShareOpen {
            scheme: SchemeInfo {
                kind: SchemeName::Xor,
                k: 2,
                n: 3,
            },
            chunk_size: CS as u32,
            chunk_count: 2,
            original_len: 2 * CS as u64,
            name: "f".into(),
            created: 1,
            placement: Vec::new(),
            readers: None,
            epoch: 0,
            placement_version: 0,
        };
        let share = store.create(id, 0, &open, "C").unwrap();
        share
            .write_chunks(&[chunk(0, 1, 0x11), chunk(1, 1, 0x22)])
            .unwrap();
        let dir = root.join(id.to_string()).join("share-0");
        let mut m = share.manifest();
        m.complete = true;
        write_manifest(&dir, &m).unwrap();
        (id, dir)
    }

    fn read_all(store: &Storage, id: Uuid) -> (Vec<u8>, Vec<(u64, u64)>, u32) {
        let s = store.get(id, 0).unwrap().unwrap();
        let mut out = vec![0u8; 2 * CS];
        for j in 0..2 {
            s.read_chunk(j, &mut out[j as usize * CS..(j as usize + 1) * CS])
                .unwrap();
        }
        (out, s.state(), s.manifest().open.epoch)
    }

    fn renewed() -> Vec<u8> {
        [vec![0x11 ^ 0x0F; CS], vec![0x22 ^ 0xF0; CS]].concat()
    }

    /// Stages and prepares the deltas 0x0F, 0xF0 with nonces 5, 6.
    fn stage_and_prepare(store: &Storage, id: Uuid, rid: Uuid) -> Arc<Staging> {
        let share = store.get(id, 0).unwrap().unwrap();
        let st = share.begin_renewal(rid, 1).unwrap();
        st.stage(&share, &mut [chunk(0, 5, 0x0F)]).unwrap();
        // Sent again (a retried batch): the same bytes are accepted, others refused.
        st.stage(&share, &mut [chunk(0, 5, 0x0F)]).unwrap();
        assert!(st.stage(&share, &mut [chunk(0, 5, 0x0E)]).is_err());
        assert!(
            st.prepare(&splits_digest([(0, 5), (1, 6)])).is_err(),
            "chunk 1 missing"
        );
        st.stage(&share, &mut [chunk(1, 6, 0xF0)]).unwrap();
        assert!(
            st.prepare(&splits_digest([(0, 5), (1, 7)])).is_err(),
            "other splits"
        );
        st.prepare(&splits_digest([(0, 5), (1, 6)])).unwrap();
        st
    }

    #[test]
    fn a_crash_after_the_commit_point_is_finished_at_restart_whatever_was_swapped() {
        let root = tempfile::tempdir().unwrap();
        let (id, dir) = complete_share(root.path());
        let old = {
            let store = Storage::new(root.path(), false).unwrap();
            let old = read_all(&store, id).0;
            let st = stage_and_prepare(&store, id, Uuid::new_v4());
            // The commit point, then a crash half-way through the swap: the data is renamed,
            // the log and the manifest are not.
            let s = State {
                committed: true,
                ..*lock(&st.state)
            };
            write_state(&dir, &s).unwrap();
            fs::rename(dir.join(DATA), dir.join("data")).unwrap();
            old
        };
        let store = Storage::new(root.path(), false).unwrap();
        assert_eq!(store.recover_renewals().unwrap(), 1);
        let (now, state, epoch) = read_all(&store, id);
        assert_ne!(now, old);
        assert_eq!(now, renewed());
        assert_eq!(state, vec![(0, 5), (1, 6)]);
        assert_eq!(epoch, 1);
        assert!(!dir.join(STATE).exists() && dir.join("keys.e1.log").exists());
    }

    #[test]
    fn before_the_commit_point_the_share_is_untouched_and_rolls_back() {
        let root = tempfile::tempdir().unwrap();
        let (id, dir) = complete_share(root.path());
        let rid = Uuid::new_v4();
        let old = {
            let store = Storage::new(root.path(), false).unwrap();
            let old = read_all(&store, id);
            stage_and_prepare(&store, id, rid);
            old
        };
        // Restarted: the share reads as before, the renewal is still there, prepared.
        let store = Storage::new(root.path(), false).unwrap();
        assert_eq!(store.recover_renewals().unwrap(), 0);
        assert_eq!(read_all(&store, id), old);
        let share = store.get(id, 0).unwrap().unwrap();
        let pending = share.staging().unwrap().pending();
        assert_eq!(
            (pending.renewal, pending.staged, pending.prepared),
            (rid, 2, true)
        );
        // Another renewal is refused while it is pending; it is committed or rolled back.
        assert!(share.begin_renewal(Uuid::new_v4(), 1).is_err());
        share.staging().unwrap().abort().unwrap();
        share.end_renewal();
        assert!(!dir.join(STATE).exists() && !dir.join(DATA).exists());
        assert_eq!(read_all(&store, id), old);
        // And it commits when asked.
        let st = stage_and_prepare(&store, id, rid);
        st.commit().unwrap();
        let store = Storage::new(root.path(), false).unwrap();
        assert_eq!(read_all(&store, id).0, renewed());
        assert!(
            store
                .get(id, 0)
                .unwrap()
                .unwrap()
                .begin_renewal(rid, 1)
                .is_err(),
            "epoch 1 renews to 2 only"
        );
    }
}
