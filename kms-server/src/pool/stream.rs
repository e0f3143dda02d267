//! One stream of key material: a direction of a QKD link's key, or the local pool.
//!
//! Invariants (each enforced here, not by callers):
//! - A byte of a [`Stream`] is handed out at most once: [`Stream::take_many`] refuses any
//!   range that overlaps bytes already taken, and wipes the bytes it hands out from the stream.
//! - Batches are all or nothing: a request that names one bad range changes nothing.

use std::collections::BTreeMap;

use zeroize::{Zeroize, Zeroizing};

/// Why a range could not be taken from a stream.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TakeError {
    #[error("range {offset}+{len} is not (or no longer) held in the key stream")]
    NotHeld { offset: u64, len: u64 },
    #[error("range {offset}+{len} overlaps key material already used")]
    AlreadyUsed { offset: u64, len: u64 },
    #[error("ranges in one request overlap")]
    Overlap,
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
    data: Zeroizing<Vec<u8>>,
    /// Sorted, disjoint, non-adjacent ranges (relative to the block) already taken.
    taken: Vec<(usize, usize)>,
    remaining: usize,
}

impl Block {
    /// A block none of whose bytes is taken.
    fn fresh(data: Zeroizing<Vec<u8>>) -> Self {
        let remaining = data.len();
        Block {
            data,
            taken: Vec::new(),
            remaining,
        }
    }

    fn overlaps(&self, start: usize, end: usize) -> bool {
        self.taken.iter().any(|&(s, e)| s < end && start < e)
    }

    fn mark(&mut self, start: usize, end: usize) {
        self.data[start..end].zeroize();
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
}

impl Stream {
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
    pub fn append(&mut self, offset: u64, data: Zeroizing<Vec<u8>>) -> Result<(), GapError> {
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
        self.blocks.insert(offset, Block::fresh(data));
        Ok(())
    }

    /// Owner side: takes the next `len` bytes for each entry of `lens`, all or nothing.
    /// Returns `None` if the stream holds fewer bytes than asked.
    pub fn allocate(&mut self, lens: &[u64]) -> Option<Vec<(u64, Zeroizing<Vec<u8>>)>> {
        let total: u64 = lens.iter().sum();
        if total > self.available() {
            return None;
        }
        let mut out = Vec::with_capacity(lens.len());
        for &len in lens {
            let off = self.cursor;
            // The owner never takes below the cursor, so this cannot overlap.
            let bytes = self.take_checked(off, len).ok()?;
            self.cursor += len;
            out.push((off, bytes));
        }
        Some(out)
    }

    /// Peer side: takes every `(offset, len)` range, all or nothing.
    pub fn take_many(
        &mut self,
        ranges: &[(u64, u64)],
    ) -> Result<Vec<Zeroizing<Vec<u8>>>, TakeError> {
        let mut sorted: Vec<(u64, u64)> = ranges.to_vec();
        sorted.sort_unstable();
        for w in sorted.windows(2) {
            // An end past u64::MAX overlaps everything after it.
            if w[0].0.checked_add(w[0].1).is_none_or(|end| end > w[1].0) {
                return Err(TakeError::Overlap);
            }
        }
        for &(off, len) in ranges {
            self.check(off, len)?;
        }
        ranges
            .iter()
            .map(|&(off, len)| self.take_checked(off, len))
            .collect()
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
            let bend = start + block.data.len() as u64;
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

    fn take_checked(&mut self, offset: u64, len: u64) -> Result<Zeroizing<Vec<u8>>, TakeError> {
        self.check(offset, len)?;
        let end = offset + len;
        let mut out = Zeroizing::new(Vec::with_capacity(len as usize));
        let mut pos = offset;
        while pos < end {
            let start = match self.blocks.range(..=pos).next_back() {
                Some((&s, _)) => s,
                None => return Err(TakeError::NotHeld { offset, len }),
            };
            let Some(block) = self.blocks.get_mut(&start) else {
                return Err(TakeError::NotHeld { offset, len });
            };
            let bend = start + block.data.len() as u64;
            let seg_end = end.min(bend);
            let (s, e) = ((pos - start) as usize, (seg_end - start) as usize);
            out.extend_from_slice(&block.data[s..e]);
            block.mark(s, e);
            if block.remaining == 0 {
                self.blocks.remove(&start);
            }
            pos = seg_end;
        }
        self.unconsumed -= len;
        Ok(out)
    }

    /// Ranges `[start, end)` that are held and free, in order.
    pub fn free_ranges(&self) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for (&start, block) in &self.blocks {
            let bend = start + block.data.len() as u64;
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
            pos = start + block.data.len() as u64;
        }
        push(pos, self.end);
        crate::pool::store::StreamMeta {
            end: self.end,
            cursor: self.cursor,
            taken,
        }
    }

    /// Rebuilds a stream from its persistent form and the bytes of its free ranges.
    pub fn restore(
        meta: &crate::pool::store::StreamMeta,
        free: Vec<(u64, Zeroizing<Vec<u8>>)>,
    ) -> Self {
        let mut s = Stream {
            blocks: BTreeMap::new(),
            cursor: meta.cursor,
            end: meta.end,
            unconsumed: 0,
        };
        for (off, data) in free {
            if data.is_empty() {
                continue;
            }
            s.unconsumed += data.len() as u64;
            s.blocks.insert(off, Block::fresh(data));
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
            if first_free < block.data.len() {
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
        // Dropping the blocks zeroizes their data (Zeroizing).
        self.blocks.clear();
        self.unconsumed = 0;
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
            s.append(s.end(), Zeroizing::new(b.to_vec())).unwrap();
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

    #[test]
    fn append_must_be_contiguous() {
        let mut s = stream_with(&[&[1]]);
        assert!(s.append(5, Zeroizing::new(vec![1])).is_err());
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
