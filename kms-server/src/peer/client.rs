//! A client of one peer KME, over mutual TLS with this KME's peer certificate, that talks
//! only to a server whose certificate carries that peer's KME SAN (`urn:qkd:kme:<ID>`),
//! checked in the handshake before anything is sent ([`mtls::pinned`]): a block
//! announcement (which, with the simulated source, carries the seed of the key stream) never
//! reaches another holder of a certificate of the CA.

use std::time::Duration;

use serde::Serialize;

use super::messages::{
    BlockAnnounce, RegisterBatch, RegisterResults, Relay, RelayOutcome, SyncReply, SyncRequest,
};
use super::{PeerError, BLOCKS_PATH, KME_URI, REGISTER_PATH, RELAY_PATH, SOURCE_PATH, SYNC_PATH};
use crate::config::Settings;

/// A client of one peer KME.
#[derive(Clone)]
pub struct PeerClient {
    pub kme_id: String,
    url: String,
    http: mtls::pinned::PinnedClient,
}

impl PeerClient {
    /// A client of peer `kme_id` at `url`; with `crl`, a revoked peer certificate is
    /// refused in the handshake.
    pub fn new(
        settings: &Settings,
        kme_id: &str,
        url: &str,
        crl: Option<std::sync::Arc<mtls::crl::Revocations>>,
    ) -> Result<Self, PeerError> {
        let t = &settings.tls;
        let http = mtls::pinned::PinnedClient::new(
            mtls::pinned::Pin {
                ca: &t.ca,
                cert: &t.peer_cert,
                key: &t.peer_key,
                server_uri_san: format!("{KME_URI}{kme_id}"),
                crl,
            },
            Duration::from_secs(5),
            Duration::from_secs(30),
        )
        .map_err(|e| PeerError::Config(format!("tls.ca, tls.peer_cert, tls.peer_key: {e}")))?;
        Ok(PeerClient {
            kme_id: kme_id.to_owned(),
            url: url.trim_end_matches('/').to_owned(),
            http,
        })
    }

    /// POSTs `body` as JSON to `path`; the reply body of a success, else the refusal.
    async fn post<T: Serialize + ?Sized>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<Vec<u8>, PeerError> {
        let json = serde_json::to_vec(body).map_err(|e| PeerError::Config(e.to_string()))?;
        let (status, reply) = self
            .http
            .post_json(&format!("{}{path}", self.url), json)
            .await
            .map_err(|e| PeerError::Transport {
                kme: self.kme_id.clone(),
                message: e.to_string(),
            })?;
        if (200..300).contains(&status) {
            return Ok(reply.to_vec());
        }
        let message = serde_json::from_slice::<etsi_spec::Error>(&reply)
            .map(|e| e.message)
            .unwrap_or_else(|_| String::from_utf8_lossy(&reply).into_owned());
        Err(PeerError::Refused {
            kme: self.kme_id.clone(),
            status,
            message,
        })
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

    /// Sends keys one hop further on their relay; returns what became of them downstream.
    pub async fn relay(&self, relay: &Relay) -> Result<RelayOutcome, PeerError> {
        self.post_json(RELAY_PATH, relay).await
    }

    /// Announces one block of link key to the peer; returns once the peer holds it.
    pub async fn announce_block(&self, block: &BlockAnnounce) -> Result<(), PeerError> {
        self.post(BLOCKS_PATH, block).await.map(drop)
    }

    async fn post_json<T: Serialize + ?Sized, R: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<R, PeerError> {
        let reply = self.post(path, body).await?;
        serde_json::from_slice(&reply).map_err(|e| PeerError::Refused {
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
