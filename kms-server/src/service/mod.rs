//! The KME's operations, independent of HTTP: the service layer between the HTTP handlers
//! (`http`) and the key pool (`pool`), links (`link`) and peers (`peer`).
//!
//! * [`keys`] — the 014 operations: Get status, Get key (`enc_keys`), Get key with key IDs
//!   (`dec_keys`).
//! * [`registration`] — keys a peer KME registers here for slaves attached here.
//! * [`relay`] — keys for SAEs of KMEs without a link to this one, hop by hop through
//!   trusted nodes: routing, origin, transit, destination.
//! * [`admin`] — the eavesdropper switch, housekeeping, the pool gauges.
//! * [`error`] — [`KmeError`], every refusal, mapped to HTTP replies in one place.
//!
//! Key material comes from one stream per direction of each QKD link: the KME that *owns* a
//! direction allocates from it for its masters, and the far end takes the same ranges when
//! the owner registers the keys there. Exchanges between SAEs of the same KME draw on the
//! local pool. See [`crate::pool`].

pub mod admin;
pub mod error;
pub mod keys;
pub mod registration;
pub mod relay;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};

use secret_buf::SecretBuf;
use tokio::sync::Notify;

use crate::config::Settings;
use crate::peer::{PeerClient, Registrar};
use crate::pool::records::KeyBytes;
use crate::pool::store::{Batch, Loaded, Store, StoreError};
use crate::pool::{KeyRecord, LinkState, Readiness, State, Stream, StreamId};
use crate::source::KeySource;
pub use error::{ErrorKind, KmeError};

/// Keys handed to an SAE: ID and bytes (wiped on drop).
pub type IssuedKeys = crate::pool::records::Delivered;

/// A store write in progress; resolves once the change is durable.
pub type Durable = std::pin::Pin<Box<dyn Future<Output = Result<(), KmeError>> + Send>>;

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
    #[error(transparent)]
    Tls(#[from] mtls::TlsError),
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
    /// Signalled whenever a block is appended to a pool (registrations wait on it).
    appended: Notify,
    pub metrics: crate::metrics::Metrics,
    /// The CA's revocation list (`tls.crl`), checked for every request and every peer.
    pub revocations: Option<Arc<mtls::crl::Revocations>>,
}

/// The peers of a KME with their key sources and link states.
struct Links {
    peers: HashMap<String, PeerClient>,
    sources: HashMap<String, Arc<dyn KeySource>>,
    state: State,
}

impl Kme {
    /// Sets up the KME: peers, key sources, and the durable store (loading what it holds).
    pub fn new(settings: Settings) -> Result<Self, StartError> {
        let t = &settings.tls;
        let revocations = t
            .crl
            .as_deref()
            .map(|p| mtls::crl::Revocations::load(p, &t.ca))
            .transpose()?
            .map(Arc::new);
        let Links {
            peers,
            sources,
            mut state,
        } = Self::connect_links(&settings, revocations.as_ref())?;
        state.records = crate::pool::Records::new(settings.limits.awaiting_bound());
        let store = match &settings.store_dir {
            None => {
                tracing::warn!("no store_dir: the key pool lives in memory only; a restart loses keys awaiting slaves");
                None
            }
            Some(dir) => {
                let (store, loaded) = Store::open(dir)?;
                let budget = settings.limits.memory_bytes_per_stream;
                let (streams, records) = restore_state(&mut state, loaded, &store, budget);
                tracing::info!(dir = %dir.display(), streams, keys_awaiting_slaves = records, "durable key pool opened");
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
            appended: Notify::new(),
            metrics: crate::metrics::Metrics::default(),
            revocations,
        })
    }

    /// A client, a key source and an unsynchronised link state per configured peer.
    fn connect_links(
        settings: &Settings,
        crl: Option<&Arc<mtls::crl::Revocations>>,
    ) -> Result<Links, StartError> {
        let mut links = Links {
            peers: HashMap::new(),
            sources: HashMap::new(),
            state: State::default(),
        };
        for p in &settings.peers {
            let client = PeerClient::new(settings, &p.kme_id, &p.url, crl.cloned())?;
            let source = crate::source::build_for_link(&p.link, &client).map_err(|error| {
                StartError::Source {
                    peer: p.kme_id.clone(),
                    error,
                }
            })?;
            source.set_eavesdropper(p.link.eavesdropper);
            links.sources.insert(p.kme_id.clone(), source);
            links.peers.insert(p.kme_id.clone(), client);
            links
                .state
                .links
                .insert(p.kme_id.clone(), LinkState::new(p.link.eavesdropper));
        }
        Ok(links)
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
    ) -> impl Future<Output = Result<(), KmeError>> + Send + 'static {
        let fut = self.store.as_ref().map(|s| s.submit(batch));
        async move {
            match fut {
                None => Ok(()),
                Some(f) => f
                    .await
                    .map_err(|e| KmeError::unavailable(format!("key store: {e}"))),
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
    pub fn lock(&self) -> Result<MutexGuard<'_, State>, KmeError> {
        self.state
            .lock()
            .map_err(|_| KmeError::unavailable("internal key store is unusable; restart the KME"))
    }

    /// Appends `data` at `offset` of stream `id` (the one path by which key enters a pool:
    /// the local pool, a link's producer and its far end) and queues the durable write of the
    /// bytes and the stream's new state. Call with the state lock held (`st`), so writes reach
    /// the disk in the order of the changes; the returned future resolves once durable.
    pub fn append_durable(
        &self,
        st: &mut State,
        id: &StreamId,
        offset: u64,
        data: SecretBuf,
    ) -> Result<Durable, KmeError> {
        let copy = self.durable().then(|| SecretBuf::from(data.to_vec()));
        let stream = st
            .stream_mut(id)
            .ok_or_else(|| KmeError::unauthorized(format!("no stream {id}")))?;
        stream
            .append(offset, data)
            .map_err(|e| KmeError::not_synchronised(e.to_string()))?;
        let mut batch = Batch::default();
        if let Some(copy) = copy {
            batch.appends.push((id.name(), offset, copy));
            batch.streams.push((id.name(), stream.meta()));
        }
        self.appended.notify_waiters();
        Ok(Box::pin(self.persist(batch)))
    }

    /// Pool capacity of one stream, bytes.
    pub fn capacity_bytes(&self) -> u64 {
        let l = &self.settings.limits;
        l.max_key_count.saturating_mul(l.key_size / 8)
    }

    /// The caller must be an SAE attached to this KME.
    pub fn check_local_sae(&self, caller: &str) -> Result<(), KmeError> {
        if self.homes.get(caller).map(String::as_str) == Some(self.kme_id()) {
            Ok(())
        } else {
            Err(KmeError::unauthorized(format!(
                "SAE {caller:?} (from the client certificate) is not attached to KME {}",
                self.kme_id()
            )))
        }
    }

    /// The KME an SAE is attached to, or 400 for an unknown SAE.
    fn home_of(&self, sae: &str, role: &str) -> Result<&str, KmeError> {
        self.homes.get(sae).map(String::as_str).ok_or_else(|| {
            KmeError::bad_request(format!("unknown {role} SAE ID {sae:?}")).detail(role, sae)
        })
    }

    /// The KME whose link serves keys between this KME and `target` (None = local pool).
    fn route<'a>(&'a self, target_kme: &'a str) -> Result<Option<&'a str>, KmeError> {
        if target_kme == self.kme_id() {
            Ok(None)
        } else if self.peers.contains_key(target_kme) {
            Ok(Some(target_kme))
        } else {
            Err(KmeError::bad_request(format!(
                "no QKD link from KME {} to KME {target_kme}",
                self.kme_id()
            )))
        }
    }
}

/// Puts what the durable store held into the fresh state; returns how many streams and key
/// records were restored.
fn restore_state(state: &mut State, loaded: Loaded, store: &Store, budget: u64) -> (usize, usize) {
    // Every stream keeps at most `budget` bytes in memory; the store holds the rest.
    let ids: Vec<StreamId> = state.streams().map(|(id, _)| id).collect();
    for id in ids {
        if let Some(s) = state.stream_mut(&id) {
            s.set_spill(store.spill(&id.name()), budget);
        }
    }
    let mut n_streams = 0;
    for (name, meta) in loaded.streams {
        let slot = StreamId::parse(&name).and_then(|id| state.stream_mut(&id));
        match slot {
            Some(s) => {
                *s = Stream::restore_stored(&meta, store.spill(&name), budget);
                n_streams += 1;
            }
            None => {
                tracing::warn!(stream = %name, "stored key stream of a link no longer configured is left unused")
            }
        }
    }
    let mut n_records = 0;
    for (id, meta) in loaded.records {
        let Some(stream) = StreamId::parse(&meta.stream) else {
            tracing::warn!(stream = %meta.stream, "stored key of an unknown stream is left unused");
            continue;
        };
        n_records += 1;
        state.records.insert(
            id,
            KeyRecord {
                master: meta.master,
                pending: meta.pending,
                // Read from the store when a slave fetches it.
                bytes: KeyBytes::Stored { len: meta.len },
                created_unix: meta.created_unix,
                stream,
                offset: meta.offset,
                readiness: Readiness::from_ready(meta.ready),
            },
        );
    }
    (n_streams, n_records)
}
