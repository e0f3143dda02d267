//! A client of one peer KME, over mutual TLS with this KME's peer certificate.

use std::time::Duration;

use serde::Serialize;

use super::messages::{BlockAnnounce, RegisterBatch, RegisterResults, SyncReply, SyncRequest};
use super::{PeerError, BLOCKS_PATH, REGISTER_PATH, SOURCE_PATH, SYNC_PATH};
use crate::config::Settings;

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
