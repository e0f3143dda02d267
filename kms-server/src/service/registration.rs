//! Keys a peer KME handed to its masters, registered here for slaves attached here: only
//! IDs and stream ranges cross the wire, the bytes are taken from this KME's copy of the
//! peer's direction of the link.
//!
//! At a link's producing end, a registration can arrive before the block it names: the
//! producer adds its copy of a block only after the far end has acknowledged it, and the far
//! end's masters may take keys from the block at once. Refusing such a registration would
//! leave those bytes free here while the far end has discarded them; counted as held, they
//! would stop the producer from refilling the far end's pool for good. So the producing end
//! first waits, bounded by [`APPEND_WAIT`], until it holds every named range
//! ([`Kme::await_appended`]).

use std::time::Duration;

use super::{Kme, KmeError};
use crate::peer::Registration;
use crate::pool::records::{now_unix, KeyBytes};
use crate::pool::store::{Batch, RecordOp};
use crate::pool::stream::TakeError;
use crate::pool::{KeyRecord, Readiness, State, StreamId};

/// How long the producing end waits for its own copy of a block that a registration names.
pub const APPEND_WAIT: Duration = Duration::from_secs(5);

impl Kme {
    /// Registers keys a peer handed to its masters, for slaves attached here; per
    /// registration `None` (registered, durably) or why not. Each is all or nothing.
    pub async fn register_many(
        &self,
        from_kme: &str,
        regs: Vec<Registration>,
    ) -> Vec<Option<String>> {
        self.await_appended(from_kme, &regs).await;
        let (results, durable) = {
            let mut st = match self.lock() {
                Ok(st) => st,
                Err(e) => return vec![Some(e.body.message); regs.len()],
            };
            let mut batch = Batch::default();
            let mut results = Vec::with_capacity(regs.len());
            for reg in regs {
                let r = self.register_locked(&mut st, from_kme, reg, &mut batch);
                results.push(r.err().map(|e| e.body.message));
            }
            // Registered or refused for want of room, ranges may have been taken.
            if self.durable() {
                if let Some(link) = st.links.get(from_kme) {
                    batch
                        .streams
                        .push((StreamId::theirs(from_kme).name(), link.theirs.meta()));
                }
            }
            (results, self.persist(batch))
        };
        if let Err(e) = durable.await {
            return vec![Some(e.body.message); results.len()];
        }
        self.consumed.notify_waiters();
        results
    }

    /// At the producing end of the link to `from_kme`: waits until this end's copy of the
    /// peer's direction reaches the end of every range `regs` name, or [`APPEND_WAIT`] has
    /// passed (then the registration is checked, and refused, as it stands).
    pub async fn await_appended(&self, from_kme: &str, regs: &[Registration]) {
        let needed = regs
            .iter()
            .flat_map(|r| &r.keys)
            .map(|k| k.offset.saturating_add(k.len))
            .max()
            .unwrap_or(0);
        self.await_stream_end(from_kme, needed).await;
    }

    /// At the producing end of the link to `from_kme`: waits until this end's copy of the
    /// peer's direction reaches `needed`, or [`APPEND_WAIT`] has passed.
    pub async fn await_stream_end(&self, from_kme: &str, needed: u64) {
        if self.kme_id() >= from_kme {
            return; // the far end appends before it acknowledges: nothing to wait for
        }
        let deadline = tokio::time::Instant::now() + APPEND_WAIT;
        loop {
            // Created before the check, so an append between the check and the wait wakes it.
            let appended = self.appended.notified();
            let end = match self.lock() {
                Ok(st) => st.links.get(from_kme).map_or(u64::MAX, |l| l.theirs.end()),
                Err(_) => return,
            };
            if end >= needed {
                return;
            }
            if tokio::time::timeout_at(deadline, appended).await.is_err() {
                return;
            }
        }
    }

    /// One registration, under the state lock: the master must sit at `from_kme`, every
    /// slave here, every key ID be new, and every range be free in the peer's direction.
    fn register_locked(
        &self,
        st: &mut State,
        from_kme: &str,
        reg: Registration,
        batch: &mut Batch,
    ) -> Result<(), KmeError> {
        if self.homes.get(&reg.master).map(String::as_str) != Some(from_kme) {
            return Err(KmeError::bad_request(format!(
                "master SAE {:?} is not attached to KME {from_kme}",
                reg.master
            )));
        }
        if reg.slaves.is_empty() {
            return Err(KmeError::bad_request("registration names no slave"));
        }
        for s in &reg.slaves {
            if self.homes.get(s).map(String::as_str) != Some(self.kme_id()) {
                return Err(KmeError::bad_request(format!(
                    "slave SAE {s:?} is not attached to KME {}",
                    self.kme_id()
                )));
            }
        }
        let mut ids = std::collections::HashSet::with_capacity(reg.keys.len());
        if reg
            .keys
            .iter()
            .any(|k| !ids.insert(k.key_id) || st.records.contains(&k.key_id))
        {
            return Err(KmeError::bad_request(
                "a registered key ID already exists or is named twice",
            ));
        }
        let link = st
            .links
            .get_mut(from_kme)
            .ok_or_else(|| KmeError::unauthorized(format!("no link with KME {from_kme}")))?;
        let ranges: Vec<(u64, u64)> = reg.keys.iter().map(|k| (k.offset, k.len)).collect();
        let taken = link.theirs.take_many(&ranges).map_err(|e| match e {
            // Our disk failed us, not the peer: nothing was taken, the peer retries.
            TakeError::Unreadable(_) => KmeError::unavailable(e.to_string()),
            _ => KmeError::bad_request(e.to_string()),
        })?;
        let stream = StreamId::theirs(from_kme);
        // Counted at the longest key's size (one Get key request asks keys of one size). A
        // refusal still consumes the ranges, as the master's KME discards its copy: left free
        // here, they would never be taken and would fill this end's pool for good.
        let longest = reg.keys.iter().map(|k| k.len).max().unwrap_or(0);
        if let Err(full) = st
            .records
            .check_room(&reg.master, reg.keys.len() as u64, longest)
        {
            drop(taken); // wiped
            if self.durable() {
                for &(off, len) in &ranges {
                    batch.wipes.push((stream.name(), off, len));
                }
            }
            return Err(super::keys::awaiting_full(full));
        }
        let now = now_unix();
        for (k, bytes) in reg.keys.iter().zip(taken) {
            let meta = st.records.insert(
                k.key_id,
                KeyRecord {
                    master: reg.master.clone(),
                    pending: reg.slaves.clone(),
                    bytes: KeyBytes::Held(bytes),
                    created_unix: now,
                    stream: stream.clone(),
                    offset: k.offset,
                    readiness: Readiness::Ready,
                },
            );
            batch
                .records
                .extend(meta.map(|m| RecordOp::Put(k.key_id, m)));
        }
        self.metrics
            .consumed(from_kme, ranges.iter().map(|r| r.1).sum());
        Ok(())
    }
}
