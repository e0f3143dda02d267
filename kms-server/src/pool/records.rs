//! Keys handed to a master and awaiting their slaves at this KME.
//!
//! Invariants (each enforced here, not by callers):
//! - A [`KeyRecord`] is delivered at most once to each of its slaves, only to them, only once
//!   it is [`Readiness::Ready`], and is erased (zeroized) when the last slave has it.
//! - A delivery that names one bad key ID changes nothing.
//! - What keys awaiting slaves hold is counted per master and in total ([`Bound`]); a caller
//!   asks [`Records::check_room`] under the same lock before it takes bytes for new records.
//! - Expiry and the low-water marks cost what they touch, not what is held: records are
//!   indexed by age and, per stream, by offset.
//!
//! After a restart the records' bytes stay in the durable store's segment files
//! ([`KeyBytes::Stored`]) and are read when a slave fetches them, so starting needs no memory
//! in proportion to the keys awaiting slaves.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use secret_buf::SecretBuf;
use uuid::Uuid;

use super::StreamId;

/// A key that has been given to its master and awaits some of its slaves at this KME.
pub struct KeyRecord {
    /// The master SAE that obtained the key.
    pub master: String,
    /// Slaves at this KME that have not fetched it yet.
    pub pending: Vec<String>,
    pub bytes: KeyBytes,
    /// When the master obtained it (seconds since the Unix epoch); keys no slave fetches in
    /// time are erased.
    pub created_unix: u64,
    /// Where the bytes sit in the durable pool: stream and offset.
    pub stream: StreamId,
    pub offset: u64,
    /// Whether slaves may fetch it yet.
    pub readiness: Readiness,
}

/// Where a record's key bytes are.
pub enum KeyBytes {
    /// In memory (wiped on drop).
    Held(SecretBuf),
    /// Only in the durable store, at the record's stream and offset: `len` bytes.
    Stored { len: u64 },
}

impl KeyBytes {
    pub fn len(&self) -> u64 {
        match self {
            KeyBytes::Held(b) => b.len() as u64,
            KeyBytes::Stored { len } => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads `len` bytes at `offset` of a stream from the durable store.
pub type ReadStored<'a> = dyn FnMut(&StreamId, u64, u64) -> Result<SecretBuf, String> + 'a;

/// Memory a key record takes besides its bytes (IDs, names, indexes), counted against the
/// bound so that many tiny keys cannot exceed it either.
pub const RECORD_BYTES: u64 = 256;

/// How much memory keys awaiting slaves may take: per master SAE and in total, in bytes; a
/// key counts its length plus [`RECORD_BYTES`].
#[derive(Debug, Clone, Copy)]
pub struct Bound {
    pub per_master: u64,
    pub total: u64,
}

impl Default for Bound {
    /// No bound (tests of the pool alone).
    fn default() -> Self {
        Bound {
            per_master: u64::MAX,
            total: u64::MAX,
        }
    }
}

impl Bound {
    /// What a key of `len` bytes counts as.
    pub fn charge(&self, len: u64) -> u64 {
        len.saturating_add(RECORD_BYTES)
    }
}

/// Why new keys cannot await their slaves now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RoomError {
    #[error("master SAE {master:?} already has {held} bytes of keys awaiting slaves that have not fetched them; {asked} more would pass its bound of {max} (limits.max_awaiting_bytes_per_master): the slaves must fetch keys, or they expire after limits.key_ttl_secs")]
    PerMaster {
        master: String,
        held: u64,
        asked: u64,
        max: u64,
    },
    #[error("{held} bytes of keys already await slaves at this KME; {asked} more would pass its bound of {max} (limits.max_awaiting_bytes)")]
    Total { held: u64, asked: u64, max: u64 },
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
            len: self.bytes.len(),
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
    /// The durable store could not give back the bytes of a stored key (a server fault).
    #[error("key store: {0}")]
    Unreadable(String),
}

/// Keys delivered by one call: ID and bytes (wiped on drop).
pub type Delivered = Vec<(Uuid, SecretBuf)>;

/// Keys awaiting their slaves, by ID, with the indexes that keep bounds and housekeeping
/// cheap.
#[derive(Default)]
pub struct Records {
    map: HashMap<Uuid, KeyRecord>,
    /// (created_unix, ID) of every record: expiry walks only what has expired.
    by_age: BTreeSet<(u64, Uuid)>,
    /// Per stream, how many records sit at each offset: the low water is the first entry.
    offsets: HashMap<StreamId, BTreeMap<u64, u32>>,
    /// Bytes charged (see [`Bound`]) per master, and in total.
    per_master: HashMap<String, u64>,
    total: u64,
    bound: Bound,
}

impl Records {
    /// No records, bounded by `bound`.
    pub fn new(bound: Bound) -> Self {
        Records {
            bound,
            ..Records::default()
        }
    }

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

    pub fn bound(&self) -> Bound {
        self.bound
    }

    /// Bytes charged for keys awaiting slaves of `master`, and in total.
    pub fn held(&self, master: &str) -> (u64, u64) {
        (
            self.per_master.get(master).copied().unwrap_or(0),
            self.total,
        )
    }

    /// Whether `number` keys of `len` bytes each may be added for `master` now.
    pub fn check_room(&self, master: &str, number: u64, len: u64) -> Result<(), RoomError> {
        let asked = number.saturating_mul(self.bound.charge(len));
        let (mine, total) = self.held(master);
        if mine.saturating_add(asked) > self.bound.per_master {
            return Err(RoomError::PerMaster {
                master: master.to_owned(),
                held: mine,
                asked,
                max: self.bound.per_master,
            });
        }
        if total.saturating_add(asked) > self.bound.total {
            return Err(RoomError::Total {
                held: total,
                asked,
                max: self.bound.total,
            });
        }
        Ok(())
    }

    /// Stores a key for its pending slaves; a record without pending slaves is dropped (wiped).
    /// Returns the persistent form of what was stored. The caller checked
    /// [`Records::check_room`] under the same lock (a restart reloads records regardless).
    pub fn insert(
        &mut self,
        id: Uuid,
        record: KeyRecord,
    ) -> Option<crate::pool::store::RecordMeta> {
        if record.pending.is_empty() {
            return None;
        }
        let meta = record.meta();
        if let Some(old) = self.map.remove(&id) {
            self.unindex(id, &old);
        }
        let charge = self.bound.charge(record.bytes.len());
        *self.per_master.entry(record.master.clone()).or_default() += charge;
        self.total += charge;
        self.by_age.insert((record.created_unix, id));
        *self
            .offsets
            .entry(record.stream.clone())
            .or_default()
            .entry(record.offset)
            .or_default() += 1;
        self.map.insert(id, record);
        Some(meta)
    }

    /// Removes a record and its index entries; its bytes are wiped when dropped.
    fn take(&mut self, id: &Uuid) -> Option<KeyRecord> {
        let r = self.map.remove(id)?;
        self.unindex(*id, &r);
        Some(r)
    }

    fn unindex(&mut self, id: Uuid, r: &KeyRecord) {
        let charge = self.bound.charge(r.bytes.len());
        if let Some(m) = self.per_master.get_mut(&r.master) {
            *m = m.saturating_sub(charge);
            if *m == 0 {
                self.per_master.remove(&r.master);
            }
        }
        self.total = self.total.saturating_sub(charge);
        self.by_age.remove(&(r.created_unix, id));
        if let Some(offs) = self.offsets.get_mut(&r.stream) {
            if let Some(n) = offs.get_mut(&r.offset) {
                *n -= 1;
                if *n == 0 {
                    offs.remove(&r.offset);
                }
            }
            if offs.is_empty() {
                self.offsets.remove(&r.stream);
            }
        }
    }

    /// Erases (zeroizes) at most `at_most` keys that were obtained more than `max_age_secs`
    /// ago and that some slave never fetched, oldest first; the second value says whether
    /// more have expired.
    pub fn expire(&mut self, max_age_secs: u64, at_most: usize) -> (Changes, bool) {
        let cutoff = now_unix().saturating_sub(max_age_secs);
        let old: Vec<Uuid> = self
            .by_age
            .iter()
            .take_while(|(t, _)| *t <= cutoff)
            .take(at_most.saturating_add(1))
            .map(|(_, id)| *id)
            .collect();
        let more = old.len() > at_most;
        let mut ch = Changes::default();
        for id in old.into_iter().take(at_most) {
            if let Some(r) = self.take(&id) {
                ch.erased
                    .push((id, r.stream.clone(), r.offset, r.bytes.len()));
            }
        }
        (ch, more)
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
            if let Some(r) = self.take(id) {
                ch.erased
                    .push((*id, r.stream.clone(), r.offset, r.bytes.len()));
            }
        }
        ch
    }

    /// Per stream, the lowest offset a record's bytes sit at.
    pub fn low_water(&self) -> HashMap<StreamId, u64> {
        self.offsets
            .iter()
            .filter_map(|(s, offs)| offs.keys().next().map(|o| (s.clone(), *o)))
            .collect()
    }

    /// Delivers the named keys to `slave` for `master`, all or nothing; `read` fetches the
    /// bytes of keys that are only in the durable store.
    ///
    /// Every ID must name a key obtained by `master` that `slave` has not fetched yet. The
    /// delivered copy is removed from the slave's pending list; the record is erased when no
    /// slave is left.
    pub fn deliver(
        &mut self,
        master: &str,
        slave: &str,
        ids: &[String],
        read: &mut ReadStored<'_>,
    ) -> Result<(Delivered, Changes), Vec<DeliverError>> {
        let parsed = self.deliverable(master, slave, ids)?;
        // Bytes only on disk are read first: a failure here still changes nothing.
        for id in &parsed {
            if let Some(rec) = self.map.get_mut(id) {
                if let KeyBytes::Stored { len } = rec.bytes {
                    let bytes = read(&rec.stream, rec.offset, len)
                        .map_err(|e| vec![DeliverError::Unreadable(e)])?;
                    rec.bytes = KeyBytes::Held(bytes);
                }
            }
        }
        let mut out = Vec::with_capacity(parsed.len());
        let mut ch = Changes::default();
        for id in parsed {
            let Some(rec) = self.map.get_mut(&id) else {
                continue; // checked above under the same lock
            };
            rec.pending.retain(|s| s != slave);
            if rec.pending.is_empty() {
                if let Some(rec) = self.take(&id) {
                    ch.erased
                        .push((id, rec.stream.clone(), rec.offset, rec.bytes.len()));
                    if let KeyBytes::Held(b) = rec.bytes {
                        out.push((id, b));
                    }
                }
            } else {
                ch.put.push((id, rec.meta()));
                if let KeyBytes::Held(b) = &rec.bytes {
                    out.push((id, SecretBuf::from(b.to_vec())));
                }
            }
        }
        Ok((out, ch))
    }

    /// The IDs, parsed, if every one names a key `slave` may fetch from `master` now.
    fn deliverable(
        &self,
        master: &str,
        slave: &str,
        ids: &[String],
    ) -> Result<Vec<Uuid>, Vec<DeliverError>> {
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
        if errors.is_empty() {
            Ok(parsed)
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_store(_: &StreamId, _: u64, _: u64) -> Result<SecretBuf, String> {
        Err("no store".into())
    }

    #[test]
    fn records_deliver_once_per_slave() {
        let mut r = Records::default();
        let id = Uuid::new_v4();
        r.insert(
            id,
            KeyRecord {
                master: "M".into(),
                pending: vec!["S1".into(), "S2".into()],
                bytes: KeyBytes::Held(SecretBuf::from(vec![9; 4])),
                created_unix: now_unix(),
                stream: StreamId::Local,
                offset: 0,
                readiness: Readiness::Ready,
            },
        );
        let ids = [id.to_string()];
        assert!(
            r.deliver("X", "S1", &ids, &mut no_store).is_err(),
            "wrong master"
        );
        assert!(
            r.deliver("M", "S3", &ids, &mut no_store).is_err(),
            "not a slave"
        );
        let (got, ch) = r.deliver("M", "S1", &ids, &mut no_store).unwrap();
        assert_eq!(&got[0].1[..], &[9; 4]);
        assert_eq!(ch.put.len(), 1, "S2 still pending");
        assert!(
            r.deliver("M", "S1", &ids, &mut no_store).is_err(),
            "second fetch"
        );
        assert_eq!(r.len(), 1);
        let (_, ch) = r.deliver("M", "S2", &ids, &mut no_store).unwrap();
        assert_eq!(ch.erased.len(), 1, "erased record is reported for wiping");
        assert!(r.is_empty(), "erased after the last slave");
        r.insert(
            id,
            KeyRecord {
                master: "M".into(),
                pending: vec!["S1".into()],
                bytes: KeyBytes::Held(SecretBuf::from(vec![1; 4])),
                created_unix: now_unix(),
                stream: StreamId::Local,
                offset: 4,
                readiness: Readiness::Ready,
            },
        );
        assert_eq!(r.expire(60, 100).0.erased.len(), 0);
        assert_eq!(r.expire(0, 100).0.erased.len(), 1, "unfetched keys expire");
        assert!(r.deliver("M", "S1", &ids, &mut no_store).is_err());
    }

    fn rec(master: &str, offset: u64, len: usize, created: u64) -> KeyRecord {
        KeyRecord {
            master: master.into(),
            pending: vec!["S".into()],
            bytes: KeyBytes::Held(SecretBuf::from(vec![7; len])),
            created_unix: created,
            stream: StreamId::Local,
            offset,
            readiness: Readiness::Ready,
        }
    }

    #[test]
    fn awaiting_keys_are_bounded_per_master_and_in_total() {
        let k = 32 + RECORD_BYTES;
        let mut r = Records::new(Bound {
            per_master: 4 * k,
            total: 6 * k,
        });
        assert_eq!(r.bound().charge(32), k, "a key counts its record too");
        assert!(r.check_room("M", 4, 32).is_ok());
        assert!(matches!(
            r.check_room("M", 5, 32),
            Err(RoomError::PerMaster { .. })
        ));
        let ids: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
        for (i, id) in ids.iter().enumerate() {
            r.insert(*id, rec("M", i as u64 * 32, 32, now_unix()));
        }
        assert_eq!(r.held("M"), (4 * k, 4 * k));
        assert!(r.check_room("M", 1, 8).is_err(), "M is full");
        assert!(r.check_room("N", 2, 32).is_ok(), "others are still served");
        assert!(matches!(
            r.check_room("N", 3, 32),
            Err(RoomError::Total { held, .. }) if held == 4 * k
        ));
        let one = [ids[0].to_string()];
        r.deliver("M", "S", &one, &mut no_store).unwrap();
        assert_eq!(r.held("M"), (3 * k, 3 * k), "a fetched key frees its room");
        r.remove_many(&ids[1..2]);
        let (ch, more) = r.expire(0, 10);
        assert_eq!((ch.erased.len(), more), (2, false));
        assert_eq!(r.held("M"), (0, 0));
    }

    #[test]
    fn stored_bytes_are_read_at_delivery_and_a_failed_read_changes_nothing() {
        let mut r = Records::default();
        let id = Uuid::new_v4();
        let mut k = rec("M", 64, 0, now_unix());
        k.bytes = KeyBytes::Stored { len: 3 };
        r.insert(id, k);
        let ids = [id.to_string()];
        let Err(err) = r.deliver("M", "S", &ids, &mut no_store) else {
            panic!("delivered without the bytes")
        };
        assert!(matches!(err[0], DeliverError::Unreadable(_)));
        assert!(r.contains(&id), "still there after a failed read");
        let mut disk = |s: &StreamId, off: u64, len: u64| {
            assert_eq!((s, off, len), (&StreamId::Local, 64, 3));
            Ok(SecretBuf::from(vec![1, 2, 3]))
        };
        let (got, ch) = r.deliver("M", "S", &ids, &mut disk).unwrap();
        assert_eq!(&got[0].1[..], &[1, 2, 3]);
        assert_eq!(ch.erased[0].3, 3, "its range is wiped");
    }

    #[test]
    fn expiry_takes_the_oldest_in_bounded_steps_and_the_low_water_follows() {
        let mut r = Records::default();
        let now = now_unix();
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
        for (i, id) in ids.iter().enumerate() {
            // Offsets fall as age falls: the oldest key sits highest.
            r.insert(*id, rec("M", 100 - i as u64 * 10, 4, now - 100 + i as u64));
        }
        r.insert(Uuid::new_v4(), rec("M", 0, 4, now));
        assert_eq!(r.low_water()[&StreamId::Local], 0);
        let (ch, more) = r.expire(50, 2);
        assert!(more, "more have expired than one step takes");
        let erased: Vec<Uuid> = ch.erased.iter().map(|e| e.0).collect();
        assert_eq!(erased, ids[..2].to_vec(), "oldest first");
        let (ch, more) = r.expire(50, 10);
        assert_eq!((ch.erased.len(), more), (3, false));
        assert_eq!(r.len(), 1, "the fresh key stays");
        assert_eq!(r.low_water()[&StreamId::Local], 0);
    }
}
