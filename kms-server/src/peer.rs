//! The KME-to-KME channel: wire types and a client, over mutual TLS with KME certificates.
//!
//! Messages that cross it:
//! - `POST /internal/v1/link/sync`: the producing end of a link reconciles both directions
//!   with the far end ([`SyncRequest`] / [`SyncReply`]) at start and after any failure;
//!   neither end serves the link's keys before.
//! - `POST /internal/v1/link/blocks`: the producing end announces one block of key material
//!   ([`BlockAnnounce`]); the far end obtains the same bytes from its side of the key source
//!   (see [`crate::source`]) and acknowledges once they are durable.
//! - `POST /internal/v1/link/source`: protocol messages between the two ends of a key source
//!   (the faithful BB84 simulator).
//! - `POST /internal/v1/keys/register`: a KME that handed keys to a master registers their
//!   IDs and stream ranges at the slaves' KME. Only offsets cross the wire, never key bytes.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::config::Settings;
use crate::source::BlockRef;

pub const BLOCKS_PATH: &str = "/internal/v1/link/blocks";
pub const SYNC_PATH: &str = "/internal/v1/link/sync";
pub const SOURCE_PATH: &str = "/internal/v1/link/source";
pub const REGISTER_PATH: &str = "/internal/v1/keys/register";

/// A block of link key: where it goes, and how the far end obtains its bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockAnnounce {
    /// KME that allocates from this block.
    pub owner: String,
    /// Offset of the block in the owner's direction of the stream.
    pub offset: u64,
    /// Bytes in the block; 0 for a heartbeat that only reports the link's state.
    pub len: u64,
    /// How the far end obtains the bytes (absent in heartbeats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<BlockRef>,
    /// The link's modelled QBER and secure key rate, when it has a physical model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perf: Option<qkd_sim::physics::LinkPerformance>,
}

/// The producing end's view of the link, sent to reconcile.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    /// End of the direction the producing end owns.
    pub producer_end: u64,
    /// End of the direction the far end owns, as held at the producing end.
    pub far_end: u64,
}

/// Where both directions continue after a synchronisation. Both ends discard the free bytes
/// of the link (neither can know which of them the other still holds unused) and append the
/// next blocks at these offsets; keys already handed to masters are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncReply {
    pub producer_end: u64,
    pub far_end: u64,
}

/// One key registered at the slaves' KME: its ID and where its bytes sit in the stream
/// owned by the registering KME.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisteredKey {
    pub key_id: Uuid,
    pub offset: u64,
    pub len: u64,
}

/// Body of a registration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub master: String,
    /// Slaves attached to the receiving KME.
    pub slaves: Vec<String>,
    pub keys: Vec<RegisteredKey>,
}

/// Body of a registration request: registrations of several enc_keys calls, coalesced.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBatch {
    pub registrations: Vec<Registration>,
}

/// Reply to a [`RegisterBatch`]: per registration, `None` (registered) or why not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterResults {
    pub results: Vec<Option<String>>,
}

type Pending = (
    Registration,
    tokio::sync::oneshot::Sender<Result<(), String>>,
);

/// Coalesces concurrent registrations towards one peer into few requests (at most
/// [`Registrar::WORKERS`] in flight, each carrying whatever queued meanwhile). Each
/// registration still succeeds or fails on its own, all or nothing.
#[derive(Clone)]
pub struct Registrar {
    tx: tokio::sync::mpsc::Sender<Pending>,
}

impl Registrar {
    const WORKERS: usize = 2;
    const MAX_BATCH: usize = 256;

    /// Starts the workers (needs a Tokio runtime).
    pub fn start(client: PeerClient) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel::<Pending>(4096);
        let rx = std::sync::Arc::new(tokio::sync::Mutex::new(rx));
        for _ in 0..Self::WORKERS {
            let rx = rx.clone();
            let client = client.clone();
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut rx = rx.lock().await;
                        let Some(first) = rx.recv().await else { return };
                        let mut batch = vec![first];
                        while batch.len() < Self::MAX_BATCH {
                            match rx.try_recv() {
                                Ok(p) => batch.push(p),
                                Err(_) => break,
                            }
                        }
                        batch
                    };
                    let (regs, waiters): (Vec<Registration>, Vec<_>) = batch.into_iter().unzip();
                    match client
                        .register_batch(&RegisterBatch {
                            registrations: regs,
                        })
                        .await
                    {
                        Ok(results) if results.len() == waiters.len() => {
                            for (w, r) in waiters.into_iter().zip(results) {
                                let _ = w.send(r.map_or(Ok(()), Err));
                            }
                        }
                        Ok(_) => {
                            for w in waiters {
                                let _ = w.send(Err(
                                    "peer answered a different number of results".into()
                                ));
                            }
                        }
                        Err(e) => {
                            let msg = e.to_string();
                            for w in waiters {
                                let _ = w.send(Err(msg.clone()));
                            }
                        }
                    }
                }
            });
        }
        Registrar { tx }
    }

    /// Registers keys at the peer; returns only once the peer holds them (or why not).
    pub async fn register(&self, reg: Registration) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send((reg, tx))
            .await
            .map_err(|_| "registration queue closed".to_owned())?;
        rx.await
            .unwrap_or_else(|_| Err("registration worker stopped".into()))
    }
}

/// Failure on the KME-to-KME channel.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer KME {kme}: {source}")]
    Transport { kme: String, source: reqwest::Error },
    #[error("peer KME {kme} refused: {status} {message}")]
    Refused {
        kme: String,
        status: u16,
        message: String,
    },
    #[error("peer channel configuration: {0}")]
    Config(String),
}

/// A client of one peer KME.
#[derive(Clone)]
pub struct PeerClient {
    pub kme_id: String,
    url: String,
    http: reqwest::Client,
}

impl PeerClient {
    pub fn new(settings: &Settings, kme_id: &str, url: &str) -> Result<Self, PeerError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| PeerError::Config(format!("{}: {e}", p.display())))
        };
        let (cert_pem, key_pem) = (
            read(&settings.tls.peer_cert)?,
            read(&settings.tls.peer_key)?,
        );
        let identity = mtls::client::ClientIdentity {
            cert_pem: &cert_pem,
            key_pem: &key_pem,
        };
        let http = mtls::client::builder(
            &read(&settings.tls.ca)?,
            Some(identity),
            Duration::from_secs(5),
        )
        .map_err(|e| PeerError::Config(format!("tls.ca, tls.peer_cert, tls.peer_key: {e}")))?
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| PeerError::Config(e.to_string()))?;
        Ok(PeerClient {
            kme_id: kme_id.to_owned(),
            url: url.trim_end_matches('/').to_owned(),
            http,
        })
    }

    fn transport(&self, source: reqwest::Error) -> PeerError {
        PeerError::Transport {
            kme: self.kme_id.clone(),
            source,
        }
    }

    async fn check(&self, resp: reqwest::Response) -> Result<(), PeerError> {
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(self.refusal(resp).await)
        }
    }

    /// The peer's refusal (a non-success reply) as an error, with its message.
    async fn refusal(&self, resp: reqwest::Response) -> PeerError {
        let status = resp.status();
        let body = resp.bytes().await.unwrap_or_default();
        let message = serde_json::from_slice::<etsi_spec::Error>(&body)
            .map(|e| e.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
        PeerError::Refused {
            kme: self.kme_id.clone(),
            status: status.as_u16(),
            message,
        }
    }

    /// Sends registrations; returns the peer's verdict on each.
    pub async fn register_batch(
        &self,
        batch: &RegisterBatch,
    ) -> Result<Vec<Option<String>>, PeerError> {
        self.post_json::<_, RegisterResults>(REGISTER_PATH, batch)
            .await
            .map(|r| r.results)
    }

    /// Announces one block of link key to the peer; returns once the peer holds it.
    pub async fn announce_block(&self, block: &BlockAnnounce) -> Result<(), PeerError> {
        let resp = self
            .http
            .post(format!("{}{BLOCKS_PATH}", self.url))
            .json(block)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        self.check(resp).await
    }

    async fn post_json<T: Serialize + ?Sized, R: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<R, PeerError> {
        let resp = self
            .http
            .post(format!("{}{path}", self.url))
            .json(body)
            .send()
            .await
            .map_err(|e| self.transport(e))?;
        if !resp.status().is_success() {
            return Err(self.refusal(resp).await);
        }
        let body = resp.bytes().await.map_err(|e| self.transport(e))?;
        serde_json::from_slice(&body).map_err(|e| PeerError::Refused {
            kme: self.kme_id.clone(),
            status: 200,
            message: format!("malformed reply on {path}: {e}"),
        })
    }

    /// Reconciles the link with the far end; returns where both directions continue.
    pub async fn sync(&self, req: &SyncRequest) -> Result<SyncReply, PeerError> {
        self.post_json(SYNC_PATH, req).await
    }

    /// Sends a key-source protocol message to the far end's source of this link.
    pub async fn source_message(
        &self,
        message: &serde_json::Value,
    ) -> Result<serde_json::Value, PeerError> {
        self.post_json(SOURCE_PATH, message).await
    }
}
