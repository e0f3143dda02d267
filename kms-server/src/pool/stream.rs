//! One stream of key material: a direction of a QKD link's key, or the local pool.
//!
//! Invariants (each enforced here, not by callers):
//! - A byte of a [`Stream`] is handed out at most once: [`Stream::take_many`] refuses any
//!   range that overlaps bytes already taken, and wipes the bytes it hands out from the stream.
//! - Batches are all or nothing: a request that names one bad range changes nothing, and
//!   neither does one whose bytes cannot be read back from the store.
//!
//! Memory: a stream with a [`Spill`] (a durable stream) keeps at most its budget of key
//! bytes in memory; the newest blocks already durable in the store beyond it are dropped
//! from memory and read back from the store's segment files when they are taken. So a
//! KME's memory does not grow with its pools, however much key they hold.

use std::collections::BTreeMap;

use secret_buf::SecretBuf;
use zeroize::Zeroize;

/// Why a range could not be taken from a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TakeError {
    #[error("range {offset}+{len} is not (or no longer) held in the key stream")]
    NotHeld { offset: u64, len: u64 },
    #[error("range {offset}+{len} overlaps key material already used")]
    AlreadyUsed { offset: u64, len: u64 },
    #[error("ranges in one request overlap")]
    Overlap,
    #[error("key bytes could not be read back from the store: {0}")]
    Unreadable(String),
}

/// Where a durable stream's bytes can be read back from once they are not kept in memory
/// (the store's segment files, see [`crate::pool::store::Store::spill`]).
pub trait Spill: Send {
    /// Fills `buf` with the bytes at `offset` (bytes of the stream that are durable and not
    /// taken), straight into the caller's buffer: no copy in between to wipe.
    fn read_into(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
    /// Offset below which every appended byte is written to the store.
    fn durable_end(&self) -> u64;
    /// Nothing below `low` will be read again (open files may be let go).
    fn forget_below(&mut self, low: u64);
}

/// Offsets and ends of every stream stay below this (2^56 bytes: far beyond any link's
/// lifetime), so that no arithmetic on peer-supplied offsets can overflow.
pub const MAX_OFFSET: u64 = 1 << 56;

/// Why a block could not be appended.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("block at offset {got} does not follow the stream end {expected}")]
pub struct GapError {
    pub expected: u64,
    pub got: u64,
}

struct Block {
    /// The bytes, or `None` when only the store holds them (see [`Spill`]).
    data: Option<SecretBuf>,
    len: usize,
    /// Sorted, disjoint, non-adjacent ranges (relative to the block) already taken.
    taken: Vec<(usize, usize)>,
    remaining: usize,
}

impl Block {
    /// A block none of whose bytes is taken.
    fn fresh(data: SecretBuf) -> Self {
        let len = data.len();
        Block {
            data: Some(data),
            len,
            taken: Vec::new(),
            remaining: len,
        }
    }

    /// A block of `len` free bytes that only the store holds.
    fn stored(len: usize) -> Self {
        Block {
            data: None,
            len,
            taken: Vec::new(),
            remaining: len,
        }
    }

    fn overlaps(&self, start: usize, end: usize) -> bool {
        self.taken.iter().any(|&(s, e)| s < end && start < e)
    }

    fn mark(&mut self, start: usize, end: usize) {
        if let Some(d) = self.data.as_mut() {
            d[start..end].zeroize();
        }
        self.remaining -= end - start;
        let pos = self.taken.partition_point(|&(s, _)| s < start);
        self.taken.insert(pos, (start, end));
        // merge neighbours
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(self.taken.len());
        for &(s, e) in &self.taken {
            match merged.last_mut() {
                Some(last) if last.1 >= s => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        self.taken = merged;
    }
}

/// One direction of a QKD link's key stream (or the local pool), addressed by byte offset.
///
/// Blocks are appended contiguously; bytes are taken by range, either sequentially by the
/// owner of the direction ([`Stream::allocate`]) or at any offset when the peer registers
/// keys it allocated ([`Stream::take_many`]).
#[derive(Default)]
pub struct Stream {
    blocks: BTreeMap<u64, Block>,
    /// Next byte the owner allocates.
    cursor: u64,
    /// Offset just past the last appended byte.
    end: u64,
    /// Bytes held and not yet taken.
    unconsumed: u64,
    /// Where blocks dropped from memory are read back from (durable streams only).
    spill: Option<Box<dyn Spill>>,
    /// Bytes of blocks kept in memory at most, with a spill.
    budget: u64,
    /// Bytes of blocks in memory now.
    in_memory: u64,
}

impl Stream {
    /// Keeps at most `budget` bytes of this stream in memory from now on; blocks beyond it
    /// that `spill` holds durably are read back from it when taken.
    pub fn set_spill(&mut self, spill: Box<dyn Spill>, budget: u64) {
        self.spill = Some(spill);
        self.budget = budget;
        self.shed();
    }

    /// Bytes of key kept in memory now.
    pub fn in_memory(&self) -> u64 {
        self.in_memory
    }

    /// Drops the newest durable blocks from memory while more than the budget is held.
    fn shed(&mut self) {
        let Some(spill) = self.spill.as_ref() else {
            return;
        };
        let durable = spill.durable_end();
        for (&start, block) in self.blocks.iter_mut().rev() {
            if self.in_memory <= self.budget {
                break;
            }
            if block.data.is_some() && start + block.len as u64 <= durable {
                // Dropping SecretBuf wipes the bytes.
                block.data = None;
                self.in_memory -= block.len as u64;
            }
        }
    }

    /// Offset just past the last appended byte.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Bytes the owner can still allocate.
    pub fn available(&self) -> u64 {
        self.end - self.cursor
    }

    /// Bytes held and not yet taken (by either allocation or registration).
    pub fn unconsumed(&self) -> u64 {
        self.unconsumed
    }

    /// Appends a block at `offset`, which must be the current end.
    pub fn append(&mut self, offset: u64, data: SecretBuf) -> Result<(), GapError> {
        let too_far = offset
            .checked_add(data.len() as u64)
            .is_none_or(|e| e > MAX_OFFSET);
        if offset != self.end || too_far {
            return Err(GapError {
                expected: self.end,
                got: offset,
            });
        }
        if data.is_empty() {
            return Ok(());
        }
        self.end += data.len() as u64;
        self.unconsumed += data.len() as u64;
        self.in_memory += data.len() as u64;
        self.blocks.insert(offset, Block::fresh(data));
        self.shed();
        Ok(())
    }

    /// Owner side: takes the next `len` bytes for each entry of `lens`, all or nothing.
    /// Returns `None` if the stream holds fewer bytes than asked.
    pub fn allocate(&mut self, lens: &[u64]) -> Option<Vec<(u64, SecretBuf)>> {
        let total: u64 = lens.iter().sum();
        if total > self.available() {
            return None;
        }
        let mut ranges = Vec::with_capacity(lens.len());
        let mut off = self.cursor;
        for &len in lens {
            ranges.push((off, len));
            off += len;
        }
        // The owner never takes below the cursor, so these cannot overlap.
        let bytes = self.take_all(&ranges).ok()?;
        self.cursor = off;
        Some(ranges.into_iter().map(|(o, _)| o).zip(bytes).collect())
    }

    /// Peer side: takes every `(offset, len)` range, all or nothing.
    pub fn take_many(&mut self, ranges: &[(u64, u64)]) -> Result<Vec<SecretBuf>, TakeError> {
        let mut sorted: Vec<(u64, u64)> = ranges.to_vec();
        sorted.sort_unstable();
        for w in sorted.windows(2) {
            // An end past u64::MAX overlaps everything after it.
            if w[0].0.checked_add(w[0].1).is_none_or(|end| end > w[1].0) {
                return Err(TakeError::Overlap);
            }
        }
        self.take_all(ranges)
    }

    /// Checks every range, reads every range's bytes, then marks them taken: a range that
    /// is not held, or bytes that cannot be read back, change nothing.
    fn take_all(&mut self, ranges: &[(u64, u64)]) -> Result<Vec<SecretBuf>, TakeError> {
        for &(off, len) in ranges {
            self.check(off, len)?;
        }
        let out = ranges
            .iter()
            .map(|&(off, len)| self.gather(off, len))
            .collect::<Result<Vec<_>, _>>()
            .inspect_err(
                |e| tracing::error!(error = %e, "key pool: taking key failed; nothing was taken"),
            )?;
        for &(off, len) in ranges {
            self.mark_taken(off, len);
        }
        if let Some(spill) = self.spill.as_mut() {
            // Every byte still held is at or after the first block.
            spill.forget_below(self.blocks.keys().next().map_or(self.end, |&s| s));
        }
        Ok(out)
    }

    /// Checks that `[offset, offset+len)` is held and untaken.
    fn check(&self, offset: u64, len: u64) -> Result<(), TakeError> {
        let not_held = TakeError::NotHeld { offset, len };
        let end = offset.checked_add(len).ok_or(not_held.clone())?;
        if len == 0 || end > self.end {
            return Err(not_held);
        }
        let mut pos = offset;
        while pos < end {
            let (&start, block) = self
                .blocks
                .range(..=pos)
                .next_back()
                .ok_or(not_held.clone())?;
            let bend = start + block.len as u64;
            if pos >= bend {
                return Err(not_held);
            }
            let seg_end = end.min(bend);
            if block.overlaps((pos - start) as usize, (seg_end - start) as usize) {
                return Err(TakeError::AlreadyUsed { offset, len });
            }
            pos = seg_end;
        }
        Ok(())
    }

    /// The bytes of `[offset, offset+len)`, checked held and free (nothing changes).
    fn gather(&mut self, offset: u64, len: u64) -> Result<SecretBuf, TakeError> {
        let end = offset + len;
        let mut out = SecretBuf::from(Vec::with_capacity(len as usize));
        let mut pos = offset;
        while pos < end {
            let Some((&start, block)) = self.blocks.range(..=pos).next_back() else {
                return Err(TakeError::NotHeld { offset, len });
            };
            let seg_end = end.min(start + block.len as u64);
            let (s, e) = ((pos - start) as usize, (seg_end - start) as usize);
            match (&block.data, self.spill.as_mut()) {
                (Some(d), _) => out.extend_from_slice(&d[s..e]),
                (None, Some(spill)) => {
                    let at = out.len();
                    out.resize(at + (seg_end - pos) as usize, 0);
                    spill
                        .read_into(pos, &mut out[at..])
                        .map_err(TakeError::Unreadable)?;
                }
                (None, None) => return Err(TakeError::Unreadable("no store".into())),
            }
            pos = seg_end;
        }
        Ok(out)
    }

    /// Marks `[offset, offset+len)` taken (checked by [`Stream::check`] first), wiping what
    /// memory holds of it and dropping blocks with nothing left.
    fn mark_taken(&mut self, offset: u64, len: u64) {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let Some((&start, _)) = self.blocks.range(..=pos).next_back() else {
                return;
            };
            let Some(block) = self.blocks.get_mut(&start) else {
                return;
            };
            let seg_end = end.min(start + block.len as u64);
            block.mark((pos - start) as usize, (seg_end - start) as usize);
            if block.remaining == 0 {
                if block.data.is_some() {
                    self.in_memory -= block.len as u64;
                }
                self.blocks.remove(&start);
            }
            pos = seg_end;
        }
        self.unconsumed -= len;
    }

    /// Ranges `[start, end)` that are held and free, in order.
    pub fn free_ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for (&start, block) in &self.blocks {
            let bend = start + block.len as u64;
            let taken: Vec<(u64, u64)> = block
                .taken
                .iter()
                .map(|&(s, e)| (start + s as u64, start + e as u64))
                .collect();
            out.extend(crate::pool::store::gaps(&taken, start, bend));
        }
        out
    }

    /// The persistent form of the stream. Every allocation writes it, so it is built in one
    /// pass over the blocks, allocating only for the taken ranges (the complement of
    /// [`Stream::free_ranges`] within `0..end`).
    pub fn meta(&self) -> crate::pool::store::StreamMeta {
        let mut taken: Vec<(u64, u64)> = Vec::new();
        let mut push = |s: u64, e: u64| {
            if s >= e {
                return;
            }
            match taken.last_mut() {
                Some(last) if last.1 >= s => last.1 = last.1.max(e),
                _ => taken.push((s, e)),
            }
        };
        let mut pos = 0;
        for (&start, block) in &self.blocks {
            push(pos, start); // before the block: no longer held
            for &(s, e) in &block.taken {
                push(start + s as u64, start + e as u64);
            }
            pos = start + block.len as u64;
        }
        push(pos, self.end);
        crate::pool::store::StreamMeta {
            end: self.end,
            cursor: self.cursor,
            taken,
        }
    }

    /// Rebuilds a durable stream from its persistent form, its free bytes left in the
    /// store: nothing is read until taken (see [`Spill`]).
    pub fn restore_stored(
        meta: &crate::pool::store::StreamMeta,
        spill: Box<dyn Spill>,
        budget: u64,
    ) -> Self {
        let mut s = Stream {
            cursor: meta.cursor,
            end: meta.end,
            spill: Some(spill),
            budget,
            ..Stream::default()
        };
        for (start, end) in crate::pool::store::gaps(&meta.taken, 0, meta.end) {
            s.unconsumed += end - start;
            s.blocks
                .insert(start, Block::stored((end - start) as usize));
        }
        s
    }

    /// The lowest offset still needed by the stream itself (first free byte, else the end).
    pub fn low_water(&self) -> u64 {
        for (&start, block) in &self.blocks {
            // `taken` is sorted and merged: the block's first free byte is at 0 or right
            // after its first taken range.
            let first_free = match block.taken.first() {
                Some(&(0, e)) => e,
                _ => 0,
            };
            if first_free < block.len {
                return start + first_free as u64;
            }
        }
        self.end
    }

    /// Link synchronisation: discards every free byte (wiping it) and moves the end (and the
    /// owner's cursor) to `to`, which must not be below the end. Taken bytes (keys awaiting
    /// slaves) are unaffected. Returns the ranges discarded.
    pub fn discard_free_and_skip(&mut self, to: u64) -> Vec<(u64, u64)> {
        let to = to.min(MAX_OFFSET);
        let freed = self.free_ranges();
        // Dropping the blocks wipes their data (SecretBuf).
        self.blocks.clear();
        self.unconsumed = 0;
        self.in_memory = 0;
        self.end = self.end.max(to);
        self.cursor = self.end;
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream_with(blocks: &[&[u8]]) -> Stream {
        let mut s = Stream::default();
        for b in blocks {
            s.append(s.end(), SecretBuf::from(b.to_vec())).unwrap();
        }
        s
    }

    #[test]
    fn allocate_is_sequential_and_spans_blocks() {
        let mut s = stream_with(&[&[1, 2, 3], &[4, 5, 6]]);
        let got = s.allocate(&[2, 3]).unwrap();
        assert_eq!(got[0].0, 0);
        assert_eq!(&got[0].1[..], &[1, 2]);
        assert_eq!(&got[1].1[..], &[3, 4, 5]);
        assert_eq!(s.available(), 1);
        assert!(s.allocate(&[2]).is_none());
        assert_eq!(s.available(), 1, "failed allocation changes nothing");
    }

    #[test]
    fn take_refuses_reuse_and_is_all_or_nothing() {
        let mut s = stream_with(&[&[1, 2, 3, 4], &[5, 6, 7, 8]]);
        assert_eq!(&s.take_many(&[(3, 2)]).unwrap()[0][..], &[4, 5]);
        assert_eq!(
            s.take_many(&[(0, 1), (4, 1)]),
            Err(TakeError::AlreadyUsed { offset: 4, len: 1 })
        );
        assert_eq!(s.unconsumed(), 6, "nothing taken by the failed batch");
        assert_eq!(s.take_many(&[(0, 2), (1, 1)]), Err(TakeError::Overlap));
        assert!(matches!(
            s.take_many(&[(7, 2)]),
            Err(TakeError::NotHeld { .. })
        ));
        let all = s.take_many(&[(0, 3), (5, 3)]).unwrap();
        assert_eq!(&all[0][..], &[1, 2, 3]);
        assert_eq!(&all[1][..], &[6, 7, 8]);
        assert_eq!(s.unconsumed(), 0);
        assert!(s.blocks.is_empty(), "fully used blocks are dropped");
    }

    /// A store holding the whole stream, of which the first `written` bytes are written.
    struct FakeSpill {
        bytes: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
        written: std::sync::Arc<std::sync::atomic::AtomicU64>,
        fail: std::sync::Arc<std::sync::atomic::AtomicBool>,
    }

    impl Spill for FakeSpill {
        fn read_into(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
            if self.fail.load(std::sync::atomic::Ordering::Relaxed) {
                return Err("disk gone".into());
            }
            let b = self.bytes.lock().unwrap();
            buf.copy_from_slice(&b[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn durable_end(&self) -> u64 {
            self.written.load(std::sync::atomic::Ordering::Relaxed)
        }
        fn forget_below(&mut self, _low: u64) {}
    }

    #[test]
    fn a_durable_stream_keeps_its_budget_in_memory_and_reads_the_rest_back() {
        use std::sync::atomic::Ordering::Relaxed;
        let spill = FakeSpill {
            bytes: Default::default(),
            written: Default::default(),
            fail: Default::default(),
        };
        let (bytes, written, fail) = (
            spill.bytes.clone(),
            spill.written.clone(),
            spill.fail.clone(),
        );
        let mut s = Stream::default();
        s.set_spill(Box::new(spill), 8);
        for i in 0..4u8 {
            let block = vec![i + 1; 8];
            bytes.lock().unwrap().extend_from_slice(&block);
            s.append(s.end(), SecretBuf::from(block)).unwrap();
            // Not yet written by the store: kept in memory whatever the budget.
            assert_eq!(s.in_memory(), 8 * (u64::from(i) + 1));
        }
        written.store(24, Relaxed);
        s.append(32, SecretBuf::from(vec![5; 8])).unwrap();
        bytes.lock().unwrap().extend_from_slice(&[5; 8]);
        // The written blocks 0..=2 left memory (newest first, until within budget or none
        // is left); blocks 3 and 4 are not written yet and stay.
        assert_eq!(s.in_memory(), 16);
        // Taking reads memory and store alike, and never the same byte twice.
        let got = s.allocate(&[4, 12, 8]).unwrap();
        assert_eq!(&got[0].1[..], &[1; 4]);
        assert_eq!(&got[1].1[..], &[[1u8; 4], [2; 4], [2; 4]].concat()[..]);
        assert_eq!(&got[2].1[..], &[3; 8]);
        assert!(s.take_many(&[(20, 1)]).is_err(), "taken bytes are gone");
        // A read that fails takes nothing, in a batch of several ranges too.
        s.allocate(&[4]).unwrap();
        written.store(40, Relaxed);
        s.append(40, SecretBuf::from(vec![6; 8])).unwrap();
        bytes.lock().unwrap().extend_from_slice(&[6; 8]);
        fail.store(true, Relaxed);
        let before = (s.unconsumed(), s.meta());
        // Byte 28 is in a block read back from the store, byte 41 in one still in memory.
        assert!(matches!(
            s.take_many(&[(41, 1), (28, 1)]),
            Err(TakeError::Unreadable(_))
        ));
        assert_eq!((s.unconsumed(), s.meta()), before, "nothing taken");
        fail.store(false, Relaxed);
        let rest = s.available();
        let all = s.allocate(&[rest]).unwrap();
        assert_eq!(
            &all[0].1[..],
            &[&[4u8; 4][..], &[5; 8], &[6; 8]].concat()[..]
        );
        assert_eq!((s.unconsumed(), s.in_memory()), (0, 0));
    }

    #[test]
    fn append_must_be_contiguous() {
        let mut s = stream_with(&[&[1]]);
        assert!(s.append(5, SecretBuf::from(vec![1])).is_err());
    }

    #[test]
    fn meta_and_low_water_agree_with_the_free_ranges() {
        let mut s = stream_with(&[&[1; 8], &[2; 8], &[3; 8], &[4; 8]]);
        let check = |s: &Stream| {
            let want = crate::pool::store::gaps(&s.free_ranges(), 0, s.end());
            assert_eq!(s.meta().taken, want);
            assert_eq!(
                s.low_water(),
                s.free_ranges().first().map_or(s.end(), |r| r.0)
            );
        };
        check(&s);
        s.allocate(&[3, 2]).unwrap();
        check(&s);
        s.take_many(&[(12, 4), (20, 1)]).unwrap();
        check(&s);
        s.allocate(&[3, 4]).unwrap();
        check(&s);
        s.take_many(&[(26, 6)]).unwrap();
        check(&s);
        let all = s.available();
        let mut left = all;
        while left > 0 {
            let n = left.min(3);
            if s.allocate(&[n]).is_none() {
                break;
            }
            left -= n;
            check(&s);
        }
    }
}
