//! Keys handed to a master and awaiting their slaves at this KME.
//!
//! Invariants (each enforced here, not by callers):
//! - A [`KeyRecord`] is delivered at most once to each of its slaves, only to them, only once
//!   it is [`Readiness::Ready`], and is erased (zeroized) when the last slave has it.
//! - A delivery that names one bad key ID changes nothing.

use std::collections::HashMap;

use uuid::Uuid;
use zeroize::Zeroizing;

use super::StreamId;

/// A key that has been given to its master and awaits some of its slaves at this KME.
pub struct KeyRecord {
    /// The master SAE that obtained the key.
    pub master: String,
    /// Slaves at this KME that have not fetched it yet.
    pub pending: Vec<String>,
    pub bytes: Zeroizing<Vec<u8>>,
    /// When the master obtained it (seconds since the Unix epoch); keys no slave fetches in
    /// time are erased.
    pub created_unix: u64,
    /// Where the bytes sit in the durable pool: stream and offset.
    pub stream: StreamId,
    pub offset: u64,
    /// Whether slaves may fetch it yet.
    pub readiness: Readiness,
}

/// Whether a key record may be delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// The master's KME is still registering the key at another slaves' KME: not
    /// deliverable (a record left in this state by a crash just expires).
    AwaitingRegistration,
    /// Deliverable to its pending slaves.
    Ready,
}

impl Readiness {
    /// The persistent form (`ready` in [`RecordMeta`](crate::pool::store::RecordMeta)).
    pub fn is_ready(self) -> bool {
        self == Readiness::Ready
    }

    /// From the persistent form.
    pub fn from_ready(ready: bool) -> Self {
        if ready {
            Readiness::Ready
        } else {
            Readiness::AwaitingRegistration
        }
    }
}

/// Seconds since the Unix epoch, now.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl KeyRecord {
    /// The persistent form of the record (everything but the bytes).
    pub fn meta(&self) -> crate::pool::store::RecordMeta {
        crate::pool::store::RecordMeta {
            master: self.master.clone(),
            pending: self.pending.clone(),
            created_unix: self.created_unix,
            stream: self.stream.name(),
            offset: self.offset,
            len: self.bytes.len() as u64,
            ready: self.readiness.is_ready(),
        }
    }
}

/// Record changes to persist: records updated, and records erased with where their bytes sat
/// (to be overwritten).
#[derive(Default)]
pub struct Changes {
    pub put: Vec<(Uuid, crate::pool::store::RecordMeta)>,
    pub erased: Vec<(Uuid, StreamId, u64, u64)>,
}

impl Changes {
    /// Adds these changes to a store batch.
    pub fn into_batch(self, batch: &mut crate::pool::store::Batch) {
        use crate::pool::store::RecordOp;
        batch
            .records
            .extend(self.put.into_iter().map(|(id, m)| RecordOp::Put(id, m)));
        for (id, stream, off, len) in self.erased {
            batch.records.push(RecordOp::Delete(id));
            batch.wipes.push((stream.name(), off, len));
        }
    }
}

/// Why a key could not be delivered to a slave.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeliverError {
    #[error("key_ID {0} is unknown, was issued for another SAE, or was already retrieved")]
    NotDeliverable(String),
    #[error("key_ID {0} is not a UUID")]
    Malformed(String),
    #[error("key_ID {0} is named twice")]
    Duplicate(String),
    #[error("no key_ID given")]
    Empty,
}

/// Keys delivered by one call: ID and bytes (wiped on drop).
pub type Delivered = Vec<(Uuid, Zeroizing<Vec<u8>>)>;

/// Keys awaiting their slaves, by ID.
#[derive(Default)]
pub struct Records {
    map: HashMap<Uuid, KeyRecord>,
}

impl Records {
    /// Number of keys awaiting at least one slave.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn contains(&self, id: &Uuid) -> bool {
        self.map.contains_key(id)
    }

    /// Stores a key for its pending slaves; a record without pending slaves is dropped (wiped).
    /// Returns the persistent form of what was stored.
    pub fn insert(
        &mut self,
        id: Uuid,
        record: KeyRecord,
    ) -> Option<crate::pool::store::RecordMeta> {
        if record.pending.is_empty() {
            return None;
        }
        let meta = record.meta();
        self.map.insert(id, record);
        Some(meta)
    }

    /// Erases (zeroizes) keys that were obtained more than `max_age_secs` ago and that some
    /// slave never fetched.
    pub fn expire(&mut self, max_age_secs: u64) -> Changes {
        let now = now_unix();
        let old: Vec<Uuid> = self
            .map
            .iter()
            .filter(|(_, r)| now.saturating_sub(r.created_unix) >= max_age_secs)
            .map(|(id, _)| *id)
            .collect();
        let mut ch = Changes::default();
        for id in old {
            if let Some(r) = self.map.remove(&id) {
                ch.erased
                    .push((id, r.stream.clone(), r.offset, r.bytes.len() as u64));
            }
        }
        ch
    }

    /// Makes keys deliverable (their registration elsewhere succeeded).
    pub fn mark_ready(&mut self, ids: &[Uuid]) -> Changes {
        let mut ch = Changes::default();
        for id in ids {
            if let Some(r) = self.map.get_mut(id) {
                r.readiness = Readiness::Ready;
                ch.put.push((*id, r.meta()));
            }
        }
        ch
    }

    /// Erases the named keys (wiping their bytes).
    pub fn remove_many(&mut self, ids: &[Uuid]) -> Changes {
        let mut ch = Changes::default();
        for id in ids {
            if let Some(r) = self.map.remove(id) {
                ch.erased
                    .push((*id, r.stream.clone(), r.offset, r.bytes.len() as u64));
            }
        }
        ch
    }

    /// Per stream, the lowest offset a record's bytes sit at.
    pub fn low_water(&self) -> HashMap<StreamId, u64> {
        let mut m: HashMap<StreamId, u64> = HashMap::new();
        for r in self.map.values() {
            let e = m.entry(r.stream.clone()).or_insert(u64::MAX);
            *e = (*e).min(r.offset);
        }
        m
    }

    /// Delivers the named keys to `slave` for `master`, all or nothing.
    ///
    /// Every ID must name a key obtained by `master` that `slave` has not fetched yet. The
    /// delivered copy is removed from the slave's pending list; the record is erased when no
    /// slave is left.
    pub fn deliver(
        &mut self,
        master: &str,
        slave: &str,
        ids: &[String],
    ) -> Result<(Delivered, Changes), Vec<DeliverError>> {
        if ids.is_empty() {
            return Err(vec![DeliverError::Empty]);
        }
        let mut errors = Vec::new();
        let mut parsed = Vec::with_capacity(ids.len());
        let mut seen = std::collections::HashSet::with_capacity(ids.len());
        for raw in ids {
            let Ok(id) = Uuid::try_parse(raw) else {
                errors.push(DeliverError::Malformed(raw.clone()));
                continue;
            };
            if !seen.insert(id) {
                errors.push(DeliverError::Duplicate(raw.clone()));
                continue;
            }
            match self.map.get(&id) {
                Some(r)
                    if r.readiness.is_ready()
                        && r.master == master
                        && r.pending.iter().any(|s| s == slave) =>
                {
                    parsed.push(id)
                }
                _ => errors.push(DeliverError::NotDeliverable(raw.clone())),
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut out = Vec::with_capacity(parsed.len());
        let mut ch = Changes::default();
        for id in parsed {
            let Some(rec) = self.map.get_mut(&id) else {
                continue; // checked above under the same lock
            };
            rec.pending.retain(|s| s != slave);
            if rec.pending.is_empty() {
                if let Some(rec) = self.map.remove(&id) {
                    ch.erased
                        .push((id, rec.stream.clone(), rec.offset, rec.bytes.len() as u64));
                    out.push((id, rec.bytes));
                }
            } else {
                ch.put.push((id, rec.meta()));
                out.push((id, Zeroizing::new(rec.bytes.to_vec())));
            }
        }
        Ok((out, ch))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_deliver_once_per_slave() {
        let mut r = Records::default();
        let id = Uuid::new_v4();
        r.insert(
            id,
            KeyRecord {
                master: "M".into(),
                pending: vec!["S1".into(), "S2".into()],
                bytes: Zeroizing::new(vec![9; 4]),
                created_unix: now_unix(),
                stream: StreamId::Local,
                offset: 0,
                readiness: Readiness::Ready,
            },
        );
        let ids = [id.to_string()];
        assert!(r.deliver("X", "S1", &ids).is_err(), "wrong master");
        assert!(r.deliver("M", "S3", &ids).is_err(), "not a slave");
        let (got, ch) = r.deliver("M", "S1", &ids).unwrap();
        assert_eq!(&got[0].1[..], &[9; 4]);
        assert_eq!(ch.put.len(), 1, "S2 still pending");
        assert!(r.deliver("M", "S1", &ids).is_err(), "second fetch");
        assert_eq!(r.len(), 1);
        let (_, ch) = r.deliver("M", "S2", &ids).unwrap();
        assert_eq!(ch.erased.len(), 1, "erased record is reported for wiping");
        assert!(r.is_empty(), "erased after the last slave");
        r.insert(
            id,
            KeyRecord {
                master: "M".into(),
                pending: vec!["S1".into()],
                bytes: Zeroizing::new(vec![1; 4]),
                created_unix: now_unix(),
                stream: StreamId::Local,
                offset: 4,
                readiness: Readiness::Ready,
            },
        );
        assert_eq!(r.expire(60).erased.len(), 0);
        assert_eq!(r.expire(0).erased.len(), 1, "unfetched keys expire");
        assert!(r.deliver("M", "S1", &ids).is_err());
    }
}
