//! The 014 operations: Get status, Get key (`enc_keys`) and Get key with key IDs
//! (`dec_keys`).
//!
//! Get key runs in four steps: `Kme::validate_order` checks the request and resolves where
//! the slaves sit; `Kme::allocate` takes the bytes from the stream and queues the durable
//! allocation (and the records for local slaves); `Kme::register_remote` registers the keys
//! at the slaves' KME while the allocation is written; the keys are returned only once both
//! are done.

use etsi_spec::{KeyRequest, Status};
use secret_buf::SecretBuf;
use uuid::Uuid;

use super::{IssuedKeys, Kme, KmeError};
use crate::peer::{RegisteredKey, Registration};
use crate::pool::records::{now_unix, DeliverError, KeyBytes};
use crate::pool::store::{Batch, RecordOp};
use crate::pool::{KeyRecord, Readiness, State, StreamId};

/// A validated Get key request.
#[derive(Clone)]
pub(super) struct KeyOrder<'a> {
    pub(super) master: &'a str,
    pub(super) number: u64,
    pub(super) size: u64,
    /// Slaves attached to this KME.
    pub(super) local_slaves: Vec<String>,
    /// The linked KME of the other slaves (None: all slaves are local) and those slaves.
    pub(super) remote: Option<&'a str>,
    pub(super) remote_slaves: Vec<String>,
    /// The slaves' KME when it has no link to this one (keys relayed; `remote` is None).
    pub(super) relay_to: Option<String>,
}

impl KeyOrder<'_> {
    pub(super) fn key_bytes(&self) -> u64 {
        self.size / 8
    }

    fn stream(&self) -> StreamId {
        self.remote.map_or(StreamId::Local, StreamId::own)
    }
}

/// Keys allocated for an order, their durable write under way.
pub(super) struct Allocation {
    pub(super) keys: IssuedKeys,
    pub(super) registered: Vec<RegisteredKey>,
    pub(super) durable: super::Durable,
}

impl Kme {
    /// Get status for master `caller` and `slave`.
    pub fn status(&self, caller: &str, slave: &str) -> Result<Status, KmeError> {
        self.check_local_sae(caller)?;
        if slave == caller {
            return Err(KmeError::bad_request(format!(
                "SAE {caller:?} cannot be a slave of itself"
            ))
            .detail("slave", slave));
        }
        let target = self.home_of(slave, "slave")?.to_owned();
        // A slave at a KME without a link to this one: keys are relayed along a path, and
        // its first link is the one whose pool limits them.
        let (first_hop, relay_path) = match self.route(&target) {
            Ok(r) => (r.map(str::to_owned), None),
            Err(_) if self.relays() => {
                let path = self.relay_path(&target, &[])?;
                (path.get(1).cloned(), Some(path))
            }
            Err(e) => return Err(e),
        };
        let route = first_hop.as_deref();
        let l = &self.settings.limits;
        let (available, perf, (mine, total), bound) = {
            let st = self.lock()?;
            let waiting = (st.records.held(caller), st.records.bound());
            let (available, perf) = match route {
                None => (st.local.available(), None),
                Some(peer) => st.links.get(peer).map_or((0, None), |link| {
                    // Not served before the link is reconciled.
                    let held = if link.synced() {
                        link.own.available()
                    } else {
                        0
                    };
                    (held, link.perf)
                }),
            };
            (available, perf, waiting.0, waiting.1)
        };
        let mut stored = (available / (l.key_size / 8)).min(l.max_key_count);
        if route.is_none() {
            // A slave here: keys the master may still take before the bound on keys
            // awaiting slaves stops it.
            let room = bound
                .per_master
                .saturating_sub(mine)
                .min(bound.total.saturating_sub(total));
            stored = stored.min(room / bound.charge(l.key_size / 8));
        }
        let mut status_extension = serde_json::Map::new();
        let mut waiting = serde_json::Map::new();
        waiting.insert("master_bytes".into(), mine.into());
        waiting.insert("max_bytes_per_master".into(), bound.per_master.into());
        waiting.insert("total_bytes".into(), total.into());
        waiting.insert("max_bytes".into(), bound.total.into());
        status_extension.insert("awaiting_slaves".into(), serde_json::Value::Object(waiting));
        if let Some(path) = relay_path {
            let mut relay = serde_json::Map::new();
            relay.insert("path".into(), path.into());
            status_extension.insert("relay".into(), serde_json::Value::Object(relay));
        }
        if let Some((peer, p)) = route.zip(perf) {
            let length = self
                .settings
                .peers
                .iter()
                .find(|x| x.kme_id == peer)
                .and_then(|x| x.link.length_km);
            let mut link = serde_json::Map::new();
            link.insert("peer_KME_ID".into(), peer.into());
            if let Some(l) = length {
                link.insert("length_km".into(), l.into());
            }
            link.insert("qber".into(), p.qber.into());
            link.insert("secure_key_rate_bps".into(), p.secure_key_rate_bps.into());
            link.insert("alarm".into(), p.aborted.into());
            status_extension.insert("qkd_link".into(), serde_json::Value::Object(link));
        }
        Ok(Status {
            source_KME_ID: self.kme_id().to_owned(),
            target_KME_ID: target,
            master_SAE_ID: caller.to_owned(),
            slave_SAE_ID: slave.to_owned(),
            key_size: l.key_size,
            stored_key_count: stored,
            max_key_count: l.max_key_count,
            max_key_per_request: l.max_key_per_request,
            max_key_size: l.max_key_size,
            min_key_size: l.min_key_size,
            max_SAE_ID_count: l.max_sae_id_count,
            status_extension: Some(status_extension),
        })
    }

    /// Get key: master `caller` asks for keys shared with `slave` (and additional slaves).
    ///
    /// When a slave is attached to a peer KME, the keys are registered there before this
    /// returns; if that fails, the allocated bytes are wiped, never reused, and 503 returned.
    pub async fn enc_keys(
        &self,
        caller: &str,
        slave: &str,
        req: &KeyRequest,
    ) -> Result<IssuedKeys, KmeError> {
        let order = self.validate_order(caller, slave, req)?;
        if let Some(target) = order.relay_to.clone() {
            return self.relay_keys(&order, &target).await;
        }
        let Allocation {
            keys,
            registered,
            durable,
        } = {
            let mut st = self.lock()?;
            self.allocate(&mut st, &order)?
        };
        self.consumed.notify_waiters();
        self.metrics.consumed(
            order.remote.unwrap_or("local"),
            order.number * order.key_bytes(),
        );
        match order.remote {
            None => durable.await?,
            Some(peer) => {
                let ids: Vec<Uuid> = keys.iter().map(|(id, _)| *id).collect();
                self.register_remote(&order, peer, registered, &ids, durable)
                    .await?;
            }
        }
        Ok(keys)
    }

    /// Checks a Get key request against the limits and resolves where its slaves sit: at
    /// this KME and/or at one linked KME.
    fn validate_order<'a>(
        &'a self,
        caller: &'a str,
        slave: &'a str,
        req: &'a KeyRequest,
    ) -> Result<KeyOrder<'a>, KmeError> {
        self.check_local_sae(caller)?;
        let l = &self.settings.limits;
        if let Some(ext) = req.extension_mandatory.as_ref().filter(|e| !e.is_empty()) {
            let names: Vec<String> = ext.iter().flat_map(|m| m.keys().cloned()).collect();
            let mut e = KmeError::bad_request(format!(
                "unsupported mandatory extension(s): {}",
                names.join(", ")
            ));
            for n in &names {
                e = e.detail("unsupported_extension", n.as_str());
            }
            return Err(e);
        }
        let number = req.number.unwrap_or(1);
        if number == 0 || number > l.max_key_per_request {
            return Err(KmeError::bad_request(format!(
                "number must be within 1..={} (max_key_per_request), got {number}",
                l.max_key_per_request
            ))
            .detail("number", number));
        }
        let size = req.size.unwrap_or(l.key_size);
        if !size.is_multiple_of(8) || size < l.min_key_size || size > l.max_key_size {
            return Err(KmeError::bad_request(format!(
                "size must be a multiple of 8 bits within {}..={}, got {size}",
                l.min_key_size, l.max_key_size
            ))
            .detail("size", size));
        }
        self.check_pool_can_hold(number, size)?;
        let slaves = self.named_slaves(caller, slave, req)?;
        let mut order = KeyOrder {
            master: caller,
            number,
            size,
            local_slaves: Vec::new(),
            remote: None,
            remote_slaves: Vec::new(),
            relay_to: None,
        };
        let one_kme =
            || KmeError::bad_request("all slaves must be attached to this KME or to one other KME");
        for s in slaves {
            let home = self.home_of(s, "slave")?;
            match self.route(home) {
                Ok(None) => order.local_slaves.push(s.to_owned()),
                Ok(Some(peer)) => {
                    if order.remote.is_some_and(|r| r != peer) || order.relay_to.is_some() {
                        return Err(one_kme());
                    }
                    order.remote = Some(peer);
                    order.remote_slaves.push(s.to_owned());
                }
                // No link to the slave's KME: relayed through trusted nodes, if configured.
                Err(_) if self.relays() => {
                    if order.remote.is_some()
                        || order.relay_to.as_deref().is_some_and(|r| r != home)
                    {
                        return Err(one_kme());
                    }
                    order.relay_to = Some(home.to_owned());
                    order.remote_slaves.push(s.to_owned());
                }
                Err(e) => return Err(e),
            }
        }
        if order.relay_to.is_some() && !order.local_slaves.is_empty() {
            return Err(one_kme());
        }
        Ok(order)
    }

    /// A request for more bytes than a pool can ever hold would wait forever: refused now.
    fn check_pool_can_hold(&self, number: u64, size: u64) -> Result<(), KmeError> {
        let l = &self.settings.limits;
        let asked = number.saturating_mul(size / 8);
        let cap = self.capacity_bytes();
        if asked <= cap {
            return Ok(());
        }
        Err(KmeError::bad_request(format!(
            "{number} keys of {size} bits ({asked} bytes) exceed what a key pool can ever hold: \
             {cap} bytes (max_key_count {} x key_size {} bits); ask for fewer or smaller keys",
            l.max_key_count, l.key_size
        ))
        .detail("max_key_count", l.max_key_count)
        .detail("key_size", l.key_size))
    }

    /// The slave and the additional slaves, each once, none the master itself.
    fn named_slaves<'a>(
        &self,
        caller: &str,
        slave: &'a str,
        req: &'a KeyRequest,
    ) -> Result<Vec<&'a str>, KmeError> {
        let l = &self.settings.limits;
        let extra = req.additional_slave_SAE_IDs.as_deref().unwrap_or(&[]);
        if extra.len() as u64 > l.max_sae_id_count {
            return Err(KmeError::bad_request(format!(
                "additional_slave_SAE_IDs names {} SAEs; at most {} (max_SAE_ID_count)",
                extra.len(),
                l.max_sae_id_count
            )));
        }
        let mut slaves: Vec<&str> = Vec::with_capacity(1 + extra.len());
        for s in std::iter::once(slave).chain(extra.iter().map(String::as_str)) {
            if s == caller {
                return Err(KmeError::bad_request(format!(
                    "SAE {s:?} cannot be a slave of itself"
                )));
            }
            if slaves.contains(&s) {
                return Err(KmeError::bad_request(format!(
                    "slave SAE {s:?} named twice"
                )));
            }
            slaves.push(s);
        }
        Ok(slaves)
    }

    /// Takes the order's bytes from its stream and queues the durable allocation. Bytes no
    /// local slave needs are overwritten on disk now; keys for local slaves are recorded in
    /// the same batch (not deliverable until a remote registration succeeded), so their
    /// bytes are never unaccounted for on disk. Nobody learns of the keys before the batch
    /// is durable.
    pub(super) fn allocate(
        &self,
        st: &mut State,
        order: &KeyOrder<'_>,
    ) -> Result<Allocation, KmeError> {
        let (number, size, key_bytes) = (order.number, order.size, order.key_bytes());
        let stream_id = order.stream();
        let State {
            local,
            links,
            records,
            ..
        } = st;
        let stream = match order.remote {
            None => local,
            Some(peer) => {
                let Some(link) = links.get_mut(peer) else {
                    return Err(KmeError::unavailable("link state missing"));
                };
                if !link.synced() {
                    return Err(KmeError::unavailable(format!(
                        "the QKD link to KME {peer} is reconciling with its peer (after a start or a failure); retry later"
                    ))
                    .detail("stored_key_count", 0u64));
                }
                &mut link.own
            }
        };
        if !order.local_slaves.is_empty() {
            records
                .check_room(order.master, number, key_bytes)
                .map_err(awaiting_full)?;
        }
        let have = stream.available() / key_bytes;
        let lens = vec![key_bytes; number as usize];
        let Some(allocated) = stream.allocate(&lens) else {
            return Err(KmeError::unavailable(format!(
                "not enough key material: {number} keys of {size} bits asked, {have} available; retry later"
            ))
            .detail("stored_key_count", have));
        };
        let durable = self.durable();
        let mut batch = Batch::default();
        if durable {
            batch.streams.push((stream_id.name(), stream.meta()));
        }
        let readiness = if order.remote.is_none() {
            Readiness::Ready
        } else {
            Readiness::AwaitingRegistration
        };
        let mut keys: IssuedKeys = Vec::with_capacity(allocated.len());
        let mut registered = Vec::with_capacity(allocated.len());
        let now = now_unix();
        for (offset, bytes) in allocated {
            let key_id = Uuid::new_v4();
            let len = bytes.len() as u64;
            registered.push(RegisteredKey {
                key_id,
                offset,
                len,
            });
            if order.local_slaves.is_empty() {
                if durable {
                    batch.wipes.push((stream_id.name(), offset, len));
                }
            } else {
                let meta = records.insert(
                    key_id,
                    KeyRecord {
                        master: order.master.to_owned(),
                        pending: order.local_slaves.clone(),
                        bytes: KeyBytes::Held(SecretBuf::from(bytes.to_vec())),
                        created_unix: now,
                        stream: stream_id.clone(),
                        offset,
                        readiness,
                    },
                );
                batch.records.extend(meta.map(|m| RecordOp::Put(key_id, m)));
            }
            keys.push((key_id, bytes));
        }
        Ok(Allocation {
            keys,
            registered,
            durable: Box::pin(self.persist(batch)),
        })
    }

    /// Registers the keys at the slaves' KME `peer` while the allocation is written, then
    /// makes the records of local slaves deliverable. On failure the records are erased and
    /// 503 returned (the caller drops the keys, which wipes them).
    ///
    /// Should this KME crash before the allocation is durable, it restarts behind the peer,
    /// which refuses those ranges as taken (and the synchronisation after the restart skips
    /// past them anyway).
    async fn register_remote(
        &self,
        order: &KeyOrder<'_>,
        peer: &str,
        registered: Vec<RegisteredKey>,
        ids: &[Uuid],
        durable: super::Durable,
    ) -> Result<(), KmeError> {
        let registrar = self
            .registrars
            .get(peer)
            .ok_or_else(|| KmeError::unavailable("peer client missing"))?;
        let reg = Registration {
            master: order.master.to_owned(),
            slaves: order.remote_slaves.clone(),
            keys: registered,
        };
        let (durable, registration) = futures_util::join!(durable, registrar.register(reg));
        let has_local = !order.local_slaves.is_empty();
        if let Err(e) = durable
            .as_ref()
            .map_err(|e| e.body.message.clone())
            .and(registration)
        {
            tracing::warn!(peer, error = %e, "key registration failed; allocated key material discarded");
            if has_local {
                if let Ok(mut st) = self.lock() {
                    let mut batch = Batch::default();
                    st.records.remove_many(ids).into_batch(&mut batch);
                    self.persist_nowait(batch);
                }
            }
            durable?;
            return Err(KmeError::unavailable(format!(
                "the slave's KME {peer} could not register the keys ({e}); retry later"
            )));
        }
        if has_local {
            let durable = {
                let mut st = self.lock()?;
                let mut batch = Batch::default();
                st.records.mark_ready(ids).into_batch(&mut batch);
                self.persist(batch)
            };
            durable.await?;
        }
        Ok(())
    }

    /// Get key with key IDs: slave `caller` fetches keys that `master` obtained for it.
    pub async fn dec_keys(
        &self,
        caller: &str,
        master: &str,
        ids: &[String],
    ) -> Result<IssuedKeys, KmeError> {
        self.check_local_sae(caller)?;
        self.home_of(master, "master")?;
        let max = self.settings.limits.max_key_per_request;
        if ids.len() as u64 > max {
            return Err(KmeError::bad_request(format!(
                "{} key IDs named; at most {max} (max_key_per_request)",
                ids.len()
            )));
        }
        let (delivered, durable) = {
            let mut st = self.lock()?;
            let mut reader = self.store.as_ref().map(|s| s.reader());
            let mut read = |s: &StreamId, off: u64, len: u64| match reader.as_mut() {
                Some(r) => r.read(&s.name(), off, len).map_err(|e| e.to_string()),
                None => Err("no durable store holds this key".to_owned()),
            };
            let (delivered, changes) = st
                .records
                .deliver(master, caller, ids, &mut read)
                .map_err(|errors| {
                    if let Some(DeliverError::Unreadable(why)) = errors.first() {
                        tracing::error!(error = %why, "a key awaiting its slave cannot be read back");
                        return KmeError::unavailable(format!(
                            "the key store cannot give back these keys now ({why}); nothing was delivered"
                        ));
                    }
                    let first = errors.first().map(ToString::to_string).unwrap_or_default();
                    let mut e = KmeError::bad_request(format!(
                        "{first}{}; nothing was delivered",
                        if errors.len() > 1 {
                            format!(" (and {} more)", errors.len() - 1)
                        } else {
                            String::new()
                        }
                    ));
                    for err in &errors {
                        let id = match err {
                            DeliverError::NotDeliverable(id)
                            | DeliverError::Malformed(id)
                            | DeliverError::Duplicate(id) => id.as_str(),
                            DeliverError::Empty | DeliverError::Unreadable(_) => "",
                        };
                        e = e.detail("key_ID", id).detail("reason", err.to_string());
                    }
                    e
                })?;
            let mut batch = Batch::default();
            changes.into_batch(&mut batch);
            (delivered, self.persist(batch))
        };
        // Delivered only once the store no longer holds them for this slave.
        durable.await?;
        Ok(delivered)
    }
}

/// The refusal when keys awaiting slaves have reached their bound: 503 (slaves fetching, or
/// expiry, make room), with the figures in `details`.
pub(super) fn awaiting_full(e: crate::pool::records::RoomError) -> KmeError {
    use crate::pool::records::RoomError;
    let (held, max) = match &e {
        RoomError::PerMaster { held, max, .. } | RoomError::Total { held, max, .. } => {
            (*held, *max)
        }
    };
    KmeError::unavailable(e.to_string())
        .detail("awaiting_bytes", held)
        .detail("max_awaiting_bytes", max)
}
