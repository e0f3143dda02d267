//! The KME's state and the operations of the 014 interface, independent of HTTP.
//!
//! Key material comes from one [`Stream`] per direction of each QKD link: the KME that
//! *owns* a direction allocates from it for its masters, and the far end takes the same
//! ranges when the owner registers the keys there. Directions are disjoint, so both KMEs can
//! serve masters at once without coordination and never hand out the same byte twice.
//! Exchanges between SAEs of the same KME draw on a local pool.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use etsi_spec::{KeyRequest, Status};
use tokio::sync::Notify;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::config::Settings;
use crate::error::ApiError;
use crate::keystore::{now_unix, DeliverError, KeyRecord, Records, Stream};
use crate::peer::{PeerClient, RegisteredKey, Registrar, Registration};
use crate::source::KeySource;
use crate::store::{Batch, RecordOp, Store, StoreError};

/// Name of the local pool's stream in the store.
pub const LOCAL: &str = "local";

/// Name in the store of the direction of the link to `peer` that this KME allocates from.
pub fn own_stream(peer: &str) -> String {
    format!("own:{peer}")
}

/// Name in the store of the direction of the link to `peer` that the peer allocates from.
pub fn theirs_stream(peer: &str) -> String {
    format!("theirs:{peer}")
}

/// One QKD link as seen from this KME.
pub struct LinkState {
    /// Both ends have reconciled since this KME started (or since the last failure); until
    /// then the link's keys are not served.
    pub synced: bool,
    /// The direction this KME allocates from (for its masters).
    pub own: Stream,
    /// The direction the peer allocates from (taken here when the peer registers keys).
    pub theirs: Stream,
    /// Fraction of pulses an intercept-resend attacker takes (producing end only).
    pub eavesdropper: f64,
    /// What the physical model last said about the link (producer: computed; far end: as
    /// announced by the producer).
    pub perf: Option<qkd_sim::physics::LinkPerformance>,
}

/// Mutable state under one lock; critical sections never await.
#[derive(Default)]
pub struct State {
    pub local: Stream,
    pub links: HashMap<String, LinkState>,
    pub records: Records,
}

/// Keys handed to an SAE: ID and bytes (wiped on drop).
pub type IssuedKeys = crate::keystore::Delivered;

/// Why a KME could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Peer(#[from] crate::peer::PeerError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("key source of the link to {peer}: {error}")]
    Source {
        peer: String,
        error: crate::source::SourceError,
    },
}

/// One KME.
pub struct Kme {
    pub settings: Settings,
    /// SAE ID → KME ID it is attached to.
    homes: HashMap<String, String>,
    peers: HashMap<String, PeerClient>,
    registrars: HashMap<String, Registrar>,
    sources: HashMap<String, Arc<dyn KeySource>>,
    state: Mutex<State>,
    store: Option<Store>,
    /// Signalled whenever key material is consumed, so link producers refill promptly.
    pub consumed: Notify,
    pub metrics: crate::metrics::Metrics,
}

impl Kme {
    /// Sets up the KME: peers, key sources, and the durable store (loading what it holds).
    pub fn new(settings: Settings) -> Result<Self, StartError> {
        let mut peers = HashMap::new();
        let mut sources = HashMap::new();
        let mut state = State::default();
        for p in &settings.peers {
            let client = PeerClient::new(&settings, &p.kme_id, &p.url)?;
            let source = crate::source::build_for_link(&p.link, &client).map_err(|error| {
                StartError::Source {
                    peer: p.kme_id.clone(),
                    error,
                }
            })?;
            source.set_eavesdropper(p.link.eavesdropper);
            sources.insert(p.kme_id.clone(), source);
            peers.insert(p.kme_id.clone(), client);
            state.links.insert(
                p.kme_id.clone(),
                LinkState {
                    synced: false,
                    own: Stream::default(),
                    theirs: Stream::default(),
                    eavesdropper: p.link.eavesdropper,
                    perf: None,
                },
            );
        }
        let store = match &settings.store_dir {
            None => {
                tracing::warn!("no store_dir: the key pool lives in memory only; a restart loses keys awaiting slaves");
                None
            }
            Some(dir) => {
                let (store, loaded) = Store::open(dir)?;
                let (mut n_streams, mut n_records) = (0, 0);
                for (name, (meta, free)) in loaded.streams {
                    let stream = Stream::restore(&meta, free);
                    let slot = if name == LOCAL {
                        Some(&mut state.local)
                    } else if let Some(peer) = name.strip_prefix("own:") {
                        state.links.get_mut(peer).map(|l| &mut l.own)
                    } else if let Some(peer) = name.strip_prefix("theirs:") {
                        state.links.get_mut(peer).map(|l| &mut l.theirs)
                    } else {
                        None
                    };
                    match slot {
                        Some(s) => {
                            *s = stream;
                            n_streams += 1;
                        }
                        None => {
                            tracing::warn!(stream = %name, "stored key stream of a link no longer configured is left unused")
                        }
                    }
                }
                for (id, meta, bytes) in loaded.records {
                    n_records += 1;
                    state.records.insert(
                        id,
                        KeyRecord {
                            master: meta.master,
                            pending: meta.pending,
                            bytes,
                            created_unix: meta.created_unix,
                            stream: meta.stream,
                            offset: meta.offset,
                            ready: meta.ready,
                        },
                    );
                }
                tracing::info!(dir = %dir.display(), streams = n_streams, keys_awaiting_slaves = n_records, "durable key pool opened");
                Some(store)
            }
        };
        let registrars = peers
            .iter()
            .map(|(id, c)| (id.clone(), Registrar::start(c.clone())))
            .collect();
        Ok(Kme {
            registrars,
            homes: settings.sae_homes(),
            settings,
            peers,
            sources,
            state: Mutex::new(state),
            store,
            consumed: Notify::new(),
            metrics: crate::metrics::Metrics::default(),
        })
    }

    /// The key source of the link to `peer`.
    pub fn source(&self, peer: &str) -> Option<&Arc<dyn KeySource>> {
        self.sources.get(peer)
    }

    /// Queues `batch` for the durable store (call with the state lock held, so batches reach
    /// the disk in the order of the changes); the returned future resolves once it is
    /// durable. Without a store it resolves at once.
    pub fn persist(
        &self,
        batch: Batch,
    ) -> impl Future<Output = Result<(), ApiError>> + Send + 'static {
        let fut = self.store.as_ref().map(|s| s.submit(batch));
        async move {
            match fut {
                None => Ok(()),
                Some(f) => f
                    .await
                    .map_err(|e| ApiError::unavailable(format!("key store: {e}"))),
            }
        }
    }

    /// Whether changes go to a durable store (if not, batches need not be built at all).
    pub fn durable(&self) -> bool {
        self.store.is_some()
    }

    /// Queues housekeeping (wipes) without waiting.
    pub fn persist_nowait(&self, batch: Batch) {
        if let Some(s) = &self.store {
            s.submit_nowait(batch);
        }
    }

    pub fn kme_id(&self) -> &str {
        &self.settings.kme_id
    }

    pub fn peer(&self, kme_id: &str) -> Option<&PeerClient> {
        self.peers.get(kme_id)
    }

    /// Locks the state. A poisoned lock means a panic interrupted a mutation, so the state
    /// can no longer be trusted: refuse service rather than risk handing out a byte twice.
    pub fn lock(&self) -> Result<MutexGuard<'_, State>, ApiError> {
        self.state
            .lock()
            .map_err(|_| ApiError::unavailable("internal key store is unusable; restart the KME"))
    }

    /// Pool capacity of one stream, bytes.
    pub fn capacity_bytes(&self) -> u64 {
        let l = &self.settings.limits;
        l.max_key_count.saturating_mul(l.key_size / 8)
    }

    /// The caller must be an SAE attached to this KME.
    pub fn check_local_sae(&self, caller: &str) -> Result<(), ApiError> {
        if self.homes.get(caller).map(String::as_str) == Some(self.kme_id()) {
            Ok(())
        } else {
            Err(ApiError::unauthorized(format!(
                "SAE {caller:?} (from the client certificate) is not attached to KME {}",
                self.kme_id()
            )))
        }
    }

    /// The KME an SAE is attached to, or 400 for an unknown SAE.
    fn home_of(&self, sae: &str, role: &str) -> Result<&str, ApiError> {
        self.homes.get(sae).map(String::as_str).ok_or_else(|| {
            ApiError::bad_request(format!("unknown {role} SAE ID {sae:?}")).detail(role, sae)
        })
    }

    /// The KME whose link serves keys between this KME and `target` (None = local pool).
    fn route<'a>(&'a self, target_kme: &'a str) -> Result<Option<&'a str>, ApiError> {
        if target_kme == self.kme_id() {
            Ok(None)
        } else if self.peers.contains_key(target_kme) {
            Ok(Some(target_kme))
        } else {
            Err(ApiError::bad_request(format!(
                "no QKD link from KME {} to KME {target_kme}",
                self.kme_id()
            )))
        }
    }

    /// Get status for master `caller` and `slave`.
    pub fn status(&self, caller: &str, slave: &str) -> Result<Status, ApiError> {
        self.check_local_sae(caller)?;
        let target = self.home_of(slave, "slave")?.to_owned();
        let route = self.route(&target)?;
        let l = &self.settings.limits;
        let (available, perf) = {
            let st = self.lock()?;
            match route {
                None => (st.local.available(), None),
                Some(peer) => st.links.get(peer).map_or((0, None), |link| {
                    // Not served before the link is reconciled.
                    let held = if link.synced { link.own.available() } else { 0 };
                    (held, link.perf)
                }),
            }
        };
        let status_extension = route.zip(perf).map(|(peer, p)| {
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
            let mut ext = serde_json::Map::new();
            ext.insert("qkd_link".into(), serde_json::Value::Object(link));
            ext
        });
        Ok(Status {
            source_KME_ID: self.kme_id().to_owned(),
            target_KME_ID: target,
            master_SAE_ID: caller.to_owned(),
            slave_SAE_ID: slave.to_owned(),
            key_size: l.key_size,
            stored_key_count: (available / (l.key_size / 8)).min(l.max_key_count),
            max_key_count: l.max_key_count,
            max_key_per_request: l.max_key_per_request,
            max_key_size: l.max_key_size,
            min_key_size: l.min_key_size,
            max_SAE_ID_count: l.max_sae_id_count,
            status_extension,
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
    ) -> Result<IssuedKeys, ApiError> {
        self.check_local_sae(caller)?;
        let l = &self.settings.limits;
        if let Some(ext) = req.extension_mandatory.as_ref().filter(|e| !e.is_empty()) {
            let names: Vec<String> = ext.iter().flat_map(|m| m.keys().cloned()).collect();
            let mut e = ApiError::bad_request(format!(
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
            return Err(ApiError::bad_request(format!(
                "number must be within 1..={} (max_key_per_request), got {number}",
                l.max_key_per_request
            ))
            .detail("number", number));
        }
        let size = req.size.unwrap_or(l.key_size);
        if !size.is_multiple_of(8) || size < l.min_key_size || size > l.max_key_size {
            return Err(ApiError::bad_request(format!(
                "size must be a multiple of 8 bits within {}..={}, got {size}",
                l.min_key_size, l.max_key_size
            ))
            .detail("size", size));
        }
        let extra = req.additional_slave_SAE_IDs.as_deref().unwrap_or(&[]);
        if extra.len() as u64 > l.max_sae_id_count {
            return Err(ApiError::bad_request(format!(
                "additional_slave_SAE_IDs names {} SAEs; at most {} (max_SAE_ID_count)",
                extra.len(),
                l.max_sae_id_count
            )));
        }
        let mut slaves: Vec<&str> = Vec::with_capacity(1 + extra.len());
        for s in std::iter::once(slave).chain(extra.iter().map(String::as_str)) {
            if s == caller {
                return Err(ApiError::bad_request(format!(
                    "SAE {s:?} cannot be a slave of itself"
                )));
            }
            if slaves.contains(&s) {
                return Err(ApiError::bad_request(format!(
                    "slave SAE {s:?} named twice"
                )));
            }
            slaves.push(s);
        }
        // Slaves may sit at this KME and/or at one linked KME.
        let mut remote: Option<&str> = None;
        let mut local_slaves = Vec::new();
        let mut remote_slaves = Vec::new();
        for s in &slaves {
            let home = self.home_of(s, "slave")?;
            match self.route(home)? {
                None => local_slaves.push((*s).to_owned()),
                Some(peer) => {
                    if remote.is_some_and(|r| r != peer) {
                        return Err(ApiError::bad_request(
                            "all slaves must be attached to this KME or to one linked KME",
                        ));
                    }
                    remote = Some(peer);
                    remote_slaves.push((*s).to_owned());
                }
            }
        }
        let key_bytes = size / 8;
        let lens = vec![key_bytes; number as usize];
        let stream_name = remote.map_or_else(|| LOCAL.to_owned(), own_stream);
        let (keys, registered, durable) = {
            let mut st = self.lock()?;
            let State {
                local,
                links,
                records,
            } = &mut *st;
            let stream = match remote {
                None => local,
                Some(peer) => {
                    let Some(link) = links.get_mut(peer) else {
                        return Err(ApiError::unavailable("link state missing"));
                    };
                    if !link.synced {
                        return Err(ApiError::unavailable(format!(
                            "the QKD link to KME {peer} is reconciling with its peer (after a start or a failure); retry later"
                        ))
                        .detail("stored_key_count", 0u64));
                    }
                    &mut link.own
                }
            };
            let have = stream.available() / key_bytes;
            let Some(allocated) = stream.allocate(&lens) else {
                return Err(ApiError::unavailable(format!(
                    "not enough key material: {number} keys of {size} bits asked, {have} available; retry later"
                ))
                .detail("stored_key_count", have));
            };
            // The allocation is durable before anyone learns of the keys. Bytes no local
            // slave needs are overwritten on disk now; keys for local slaves are recorded in
            // the same batch (not deliverable until a remote registration succeeded), so their
            // bytes are never unaccounted for on disk.
            let durable = self.durable();
            let mut batch = Batch::default();
            if durable {
                batch.streams.push((stream_name.clone(), stream.meta()));
            }
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
                if local_slaves.is_empty() {
                    if durable {
                        batch.wipes.push((stream_name.clone(), offset, len));
                    }
                } else {
                    let meta = records.insert(
                        key_id,
                        KeyRecord {
                            master: caller.to_owned(),
                            pending: local_slaves.clone(),
                            bytes: Zeroizing::new(bytes.to_vec()),
                            created_unix: now,
                            stream: stream_name.clone(),
                            offset,
                            ready: remote.is_none(),
                        },
                    );
                    batch.records.extend(meta.map(|m| RecordOp::Put(key_id, m)));
                }
                keys.push((key_id, bytes));
            }
            (keys, registered, self.persist(batch))
        };
        self.consumed.notify_waiters();
        self.metrics
            .consumed(remote.unwrap_or("local"), number * key_bytes);
        let Some(peer) = remote else {
            durable.await?;
            return Ok(keys);
        };
        let registrar = self
            .registrars
            .get(peer)
            .ok_or_else(|| ApiError::unavailable("peer client missing"))?;
        let reg = Registration {
            master: caller.to_owned(),
            slaves: remote_slaves,
            keys: registered,
        };
        // Registration runs while the allocation is written: should this KME crash before
        // the write, it restarts behind the peer, which refuses those ranges as taken (and
        // the synchronisation after the restart skips past them anyway). The master hears of
        // the keys only once both are done.
        let (durable, registration) = futures_util::join!(durable, registrar.register(reg));
        let ids: Vec<Uuid> = keys.iter().map(|(id, _)| *id).collect();
        if let Err(e) = durable
            .as_ref()
            .map_err(|e| e.body.message.clone())
            .and(registration)
        {
            // `keys` is dropped here: the bytes are wiped and never handed out.
            tracing::warn!(peer, error = %e, "key registration failed; allocated key material discarded");
            if !local_slaves.is_empty() {
                if let Ok(mut st) = self.lock() {
                    let mut batch = Batch::default();
                    st.records.remove_many(&ids).into_batch(&mut batch);
                    self.persist_nowait(batch);
                }
            }
            durable?;
            return Err(ApiError::unavailable(format!(
                "the slave's KME {peer} could not register the keys ({e}); retry later"
            )));
        }
        if !local_slaves.is_empty() {
            let durable = {
                let mut st = self.lock()?;
                let mut batch = Batch::default();
                st.records.mark_ready(&ids).into_batch(&mut batch);
                self.persist(batch)
            };
            durable.await?;
        }
        Ok(keys)
    }

    /// Get key with key IDs: slave `caller` fetches keys that `master` obtained for it.
    pub async fn dec_keys(
        &self,
        caller: &str,
        master: &str,
        ids: &[String],
    ) -> Result<IssuedKeys, ApiError> {
        self.check_local_sae(caller)?;
        self.home_of(master, "master")?;
        let max = self.settings.limits.max_key_per_request;
        if ids.len() as u64 > max {
            return Err(ApiError::bad_request(format!(
                "{} key IDs named; at most {max} (max_key_per_request)",
                ids.len()
            )));
        }
        let (delivered, durable) = {
            let mut st = self.lock()?;
            let (delivered, changes) =
                st.records.deliver(master, caller, ids).map_err(|errors| {
                    let first = errors.first().map(ToString::to_string).unwrap_or_default();
                    let mut e = ApiError::bad_request(format!(
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
                            DeliverError::Empty => "",
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

    /// A peer registers keys it handed to one of its masters, for slaves attached here.
    /// An operator puts an intercept-resend attacker on the link to `peer` (fraction of
    /// pulses, 0 = none). Only the link's producing end models the link.
    pub fn set_eavesdropper(
        &self,
        peer: &str,
        fraction: f64,
    ) -> Result<Option<qkd_sim::physics::LinkPerformance>, ApiError> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(ApiError::bad_request("fraction must be within 0..=1"));
        }
        let Some(cfg) = self.settings.peers.iter().find(|p| p.kme_id == peer) else {
            return Err(ApiError::bad_request(format!("no QKD link to KME {peer}")));
        };
        if self.kme_id() > peer {
            return Err(ApiError::bad_request(format!(
                "the link is modelled at its producing end: switch the eavesdropper at KME {peer}"
            )));
        }
        let mut st = self.lock()?;
        let link = st
            .links
            .get_mut(peer)
            .ok_or_else(|| ApiError::unavailable("link state missing"))?;
        link.eavesdropper = fraction;
        if let Some(src) = self.sources.get(peer) {
            src.set_eavesdropper(fraction);
        }
        let perf = cfg
            .link
            .length_km
            .map(|l| cfg.link.device.evaluate(l, fraction, cfg.link.abort_qber));
        link.perf = perf.or(link.perf);
        tracing::warn!(
            peer,
            fraction,
            "operator set the eavesdropper on the QKD link"
        );
        Ok(perf)
    }

    /// Registers keys a peer handed to its masters, for slaves attached here; per
    /// registration `None` (registered, durably) or why not. Each is all or nothing.
    pub async fn register_many(
        &self,
        from_kme: &str,
        regs: Vec<Registration>,
    ) -> Vec<Option<String>> {
        let (results, durable) = {
            let mut st = match self.lock() {
                Ok(st) => st,
                Err(e) => return vec![Some(e.body.message); regs.len()],
            };
            let mut batch = Batch::default();
            let mut results = Vec::with_capacity(regs.len());
            let mut any = false;
            for reg in regs {
                let r = self.register_locked(&mut st, from_kme, reg, &mut batch);
                any |= r.is_ok();
                results.push(r.err().map(|e| e.body.message));
            }
            if any && self.durable() {
                if let Some(link) = st.links.get(from_kme) {
                    batch
                        .streams
                        .push((theirs_stream(from_kme), link.theirs.meta()));
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

    fn register_locked(
        &self,
        st: &mut State,
        from_kme: &str,
        reg: Registration,
        batch: &mut Batch,
    ) -> Result<(), ApiError> {
        if self.homes.get(&reg.master).map(String::as_str) != Some(from_kme) {
            return Err(ApiError::bad_request(format!(
                "master SAE {:?} is not attached to KME {from_kme}",
                reg.master
            )));
        }
        if reg.slaves.is_empty() {
            return Err(ApiError::bad_request("registration names no slave"));
        }
        for s in &reg.slaves {
            if self.homes.get(s).map(String::as_str) != Some(self.kme_id()) {
                return Err(ApiError::bad_request(format!(
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
            return Err(ApiError::bad_request(
                "a registered key ID already exists or is named twice",
            ));
        }
        let link = st
            .links
            .get_mut(from_kme)
            .ok_or_else(|| ApiError::unauthorized(format!("no link with KME {from_kme}")))?;
        let ranges: Vec<(u64, u64)> = reg.keys.iter().map(|k| (k.offset, k.len)).collect();
        let taken = link
            .theirs
            .take_many(&ranges)
            .map_err(|e| ApiError::bad_request(e.to_string()))?;
        let stream = theirs_stream(from_kme);
        let now = now_unix();
        for (k, bytes) in reg.keys.iter().zip(taken) {
            let meta = st.records.insert(
                k.key_id,
                KeyRecord {
                    master: reg.master.clone(),
                    pending: reg.slaves.clone(),
                    bytes,
                    created_unix: now,
                    stream: stream.clone(),
                    offset: k.offset,
                    ready: true,
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

    /// Erases keys no slave fetched within `limits.key_ttl_secs`, and lets the store drop
    /// segment files that hold nothing live any more. Returns how many keys were erased.
    pub async fn housekeeping(&self) -> Result<usize, ApiError> {
        let (n, durable) = {
            let mut st = self.lock()?;
            let changes = st.records.expire(self.settings.limits.key_ttl_secs);
            let n = changes.erased.len();
            let mut batch = Batch::default();
            changes.into_batch(&mut batch);
            let rec_low = st.records.low_water();
            let low = |name: String, s: &Stream| {
                let l = s
                    .low_water()
                    .min(rec_low.get(&name).copied().unwrap_or(u64::MAX));
                (name, l)
            };
            batch.low_water.push(low(LOCAL.to_owned(), &st.local));
            for (peer, l) in &st.links {
                batch.low_water.push(low(own_stream(peer), &l.own));
                batch.low_water.push(low(theirs_stream(peer), &l.theirs));
            }
            (n, self.persist(batch))
        };
        durable.await?;
        Ok(n)
    }

    /// The live pool and link gauges, in the Prometheus text format.
    pub fn gauges(&self) -> String {
        use std::fmt::Write;
        let mut out = String::from(
            "# HELP qkd_pool_bytes Key held per link direction (own: for masters here).\n# TYPE qkd_pool_bytes gauge\n",
        );
        let Ok(st) = self.lock() else { return out };
        for (peer, l) in &st.links {
            let _ = writeln!(
                out,
                "qkd_pool_bytes{{peer=\"{peer}\",direction=\"own\"}} {}",
                l.own.unconsumed()
            );
            let _ = writeln!(
                out,
                "qkd_pool_bytes{{peer=\"{peer}\",direction=\"theirs\"}} {}",
                l.theirs.unconsumed()
            );
        }
        let _ = writeln!(
            out,
            "# TYPE qkd_local_pool_bytes gauge\nqkd_local_pool_bytes {}",
            st.local.unconsumed()
        );
        let _ = writeln!(
            out,
            "# TYPE qkd_keys_awaiting_slaves gauge\nqkd_keys_awaiting_slaves {}",
            st.records.len()
        );
        out.push_str("# TYPE qkd_link_qber gauge\n# TYPE qkd_link_secure_key_rate_bps gauge\n# TYPE qkd_link_alarm gauge\n");
        for (peer, l) in &st.links {
            if let Some(p) = l.perf {
                let _ = writeln!(out, "qkd_link_qber{{peer=\"{peer}\"}} {}", p.qber);
                let _ = writeln!(
                    out,
                    "qkd_link_secure_key_rate_bps{{peer=\"{peer}\"}} {}",
                    p.secure_key_rate_bps
                );
                let _ = writeln!(
                    out,
                    "qkd_link_alarm{{peer=\"{peer}\"}} {}",
                    u8::from(p.aborted)
                );
            }
        }
        out
    }
}
