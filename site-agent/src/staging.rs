//! A share renewal staged beside its share, and how it is committed or rolled back.
//!
//! The protocol, whatever the backend (the files or objects each uses are in its doc:
//! [`crate::backend::local`], [`crate::backend::s3`]):
//!
//! Staging never touches the current share: a chunk's delta is XORed into the current
//! chunk (read back and checked against its record first) and the result is made durable in
//! the backend's staged area with its record, as a store's chunks are. Staging a chunk twice
//! is idempotent when the result is the same bytes, refused otherwise.
//!
//! **Prepare** checks that every chunk is staged from the client's splits and reads each
//! back against its record, then rewrites the renewal state with `prepared`.
//!
//! **Commit** rewrites the renewal state with `committed` (atomically and durably): that is
//! the commit point. Then the backend swaps the staged chunks in, the manifest records the
//! new epoch and the renewal, and the state is removed; each step is idempotent, and a
//! share opened with a committed state is finished first. So a crash before the commit
//! point leaves the share as it was with the renewal still staged (the client finishes or
//! rolls it back); a crash after it always ends with the renewed share.
//!
//! **Abort** (before commit) drops the staged chunks and the state.
//!
//! A renewal needs the share's size again in free space until it commits.

use std::sync::{Arc, Mutex};

use uuid::Uuid;

use crate::backend::{Area, ChunkRecords, Put, Record, RenewState, ShareIo};
use crate::storage::{failpoint, ChunkWrite, Failpoint, ShareFiles, StoreError};
use share_transfer::wire::{splits_digest, Manifest, PendingRenewal};

/// A renewal staged for one share.
pub struct Staging {
    io: Arc<dyn ShareIo>,
    chunk_size: usize,
    chunk_count: u64,
    state: Mutex<RenewState>,
    chunks: Mutex<ChunkRecords>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn conflict(m: String) -> StoreError {
    StoreError::Renewal(m)
}

impl Staging {
    /// Starts staging renewal `renewal` of the share `io` (manifest `m`) to `epoch`.
    pub(crate) fn begin(
        io: Arc<dyn ShareIo>,
        m: &Manifest,
        renewal: Uuid,
        epoch: u32,
    ) -> Result<Self, StoreError> {
        let st = RenewState {
            renewal,
            epoch,
            prepared: false,
            committed: false,
        };
        io.begin_renewal(&st)?;
        Ok(Self::new(io, m, st, ChunkRecords::new()))
    }

    /// A renewal the backend found staged, with its staged chunks' records.
    pub(crate) fn new(
        io: Arc<dyn ShareIo>,
        m: &Manifest,
        state: RenewState,
        chunks: ChunkRecords,
    ) -> Self {
        Staging {
            io,
            chunk_size: m.open.chunk_size as usize,
            chunk_count: m.open.chunk_count,
            state: Mutex::new(state),
            chunks: Mutex::new(chunks),
        }
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
    /// ⊕ delta is staged with the write's nonce. The buffers are turned into the renewed
    /// chunks in place.
    pub fn stage(&self, share: &ShareFiles, writes: &mut [ChunkWrite]) -> Result<(), StoreError> {
        if lock(&self.state).prepared {
            return Err(conflict("renewal already prepared: no more chunks".into()));
        }
        let mut current = vec![0u8; self.chunk_size];
        let mut fresh = Vec::with_capacity(writes.len());
        let mut hashes = Vec::with_capacity(writes.len());
        for (i, w) in writes.iter_mut().enumerate() {
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
            fresh.push(i);
            hashes.push(h);
        }
        use zeroize::Zeroize;
        current.zeroize();
        if fresh.is_empty() {
            return Ok(());
        }
        let chosen: Vec<Put<'_>> = fresh
            .iter()
            .zip(&hashes)
            .map(|(&i, h)| writes[i].put(*h))
            .collect();
        self.io
            .put(Area::Staged, &chosen, &[Failpoint::RenewStage])?;
        let mut c = lock(&self.chunks);
        for p in &chosen {
            c.insert(p.chunk, (p.nonce, p.hash));
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
        for (j, r) in &records {
            let Some(r) = r else { continue };
            self.io.read(Area::Staged, *j, r, &mut buf)?;
            if r.1 != *blake3::hash(&buf).as_bytes() {
                return Err(conflict(format!("staged chunk {j} does not read back")));
            }
        }
        self.io.freeze(Area::Staged, &lock(&self.chunks))?;
        let mut st = lock(&self.state);
        let next = RenewState {
            prepared: true,
            ..*st
        };
        self.io.put_renewal(&next)?;
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
        let next = RenewState {
            committed: true,
            ..*st
        };
        self.io.put_renewal(&next)?;
        *st = next;
        failpoint(Failpoint::RenewCommit);
        self.io.finish_renewal(&next)
    }

    /// Drops the staged renewal (only before commit).
    pub fn abort(&self) -> Result<(), StoreError> {
        if lock(&self.state).committed {
            return Err(conflict("renewal already committed".into()));
        }
        self.io.abort_renewal()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use std::fs;
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::backend::local::write_manifest;
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
            let s = RenewState {
                committed: true,
                ..*lock(&st.state)
            };
            fs::write(dir.join("renew.json"), serde_json::to_vec(&s).unwrap()).unwrap();
            fs::rename(dir.join("renew.data"), dir.join("data")).unwrap();
            old
        };
        let store = Storage::new(root.path(), false).unwrap();
        assert_eq!(store.recover_renewals().unwrap(), 1);
        let (now, state, epoch) = read_all(&store, id);
        assert_ne!(now, old);
        assert_eq!(now, renewed());
        assert_eq!(state, vec![(0, 5), (1, 6)]);
        assert_eq!(epoch, 1);
        assert!(!dir.join("renew.json").exists() && dir.join("keys.e1.log").exists());
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
        assert!(!dir.join("renew.json").exists() && !dir.join("renew.data").exists());
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
