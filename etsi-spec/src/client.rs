//! A typed async client of the ETSI GS QKD 014 API over mutual TLS.
//!
//! One [`Client`] talks to one KME as one SAE: the SAE's certificate and key are the TLS
//! client identity, and the KME's certificate must chain to the given CA. Connections are
//! kept alive and reused; TCP_NODELAY is on.

use std::time::Duration;

use reqwest::StatusCode;
use serde::de::DeserializeOwned;

use crate::codec::{read_key_container, DecodedKey};
use crate::types::{Error as ApiError, KeyContainer, KeyIds, KeyRequest, Status};

/// What can go wrong in a call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The KME answered with an error status and the spec's Error body.
    #[error("KME answered {status}: {}", .error.message)]
    Api { status: StatusCode, error: ApiError },
    /// The KME answered with an unexpected status or a body that is not the spec's format.
    #[error("KME answered {status} with a body that is not the expected format: {reason}")]
    Protocol { status: StatusCode, reason: String },
    /// TLS, connection or timeout failure.
    #[error("request to KME failed: {0}")]
    Transport(#[from] reqwest::Error),
    /// The client could not be configured (bad certificate, key or URL).
    #[error("invalid client configuration: {0}")]
    Config(String),
}

impl ClientError {
    /// The HTTP status of an API error, if the KME answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } | ClientError::Protocol { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// PEM material that identifies an SAE (or a KME acting as a client) in mutual TLS.
#[derive(Clone)]
pub struct Identity {
    /// PEM of the certificate (optionally followed by intermediates).
    pub cert_pem: Vec<u8>,
    /// PEM of the PKCS#8 private key.
    pub key_pem: Vec<u8>,
}

impl Identity {
    /// Reads the certificate and key PEM files.
    pub fn from_files(cert: &std::path::Path, key: &std::path::Path) -> Result<Self, ClientError> {
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| ClientError::Config(format!("{}: {e}", p.display())))
        };
        Ok(Identity {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
        })
    }
}

/// A client of one KME's 014 interface.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    base: String,
}

impl Client {
    /// Builds a client for the KME at `kme_url` (e.g. `https://127.0.0.1:8443`).
    ///
    /// `ca_pem` is the CA that the KME's certificate must chain to; `identity` is presented
    /// as the client certificate (`None` connects without one, which a KME refuses).
    pub fn new(
        kme_url: &str,
        ca_pem: &[u8],
        identity: Option<&Identity>,
    ) -> Result<Self, ClientError> {
        let identity = identity.map(|id| mtls::client::ClientIdentity {
            cert_pem: &id.cert_pem,
            key_pem: &id.key_pem,
        });
        let http = mtls::client::builder(ca_pem, identity, Duration::from_secs(10))
            .map_err(|e| ClientError::Config(e.to_string()))?
            .pool_idle_timeout(Duration::from_secs(60))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| ClientError::Config(e.to_string()))?;
        Ok(Client {
            http,
            base: format!("{}/api/v1/keys", kme_url.trim_end_matches('/')),
        })
    }

    /// The underlying HTTP client, for callers that need a raw request (tests).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// `https://host:port/api/v1/keys`
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Get status: `GET /api/v1/keys/{slave_SAE_ID}/status`.
    pub async fn status(&self, slave_sae_id: &str) -> Result<Status, ClientError> {
        let url = format!("{}/{}/status", self.base, seg(slave_sae_id));
        decode(self.http.get(url).send().await?).await
    }

    /// Get key by GET: `GET /api/v1/keys/{slave_SAE_ID}/enc_keys?number=&size=`.
    pub async fn get_key(
        &self,
        slave_sae_id: &str,
        number: Option<u64>,
        size: Option<u64>,
    ) -> Result<KeyContainer, ClientError> {
        let url = format!("{}/{}/enc_keys", self.base, seg(slave_sae_id));
        let mut query = Vec::new();
        if let Some(n) = number {
            query.push(("number", n));
        }
        if let Some(s) = size {
            query.push(("size", s));
        }
        decode(self.http.get(url).query(&query).send().await?).await
    }

    /// Get key by POST: `POST /api/v1/keys/{slave_SAE_ID}/enc_keys` with a Key request body.
    pub async fn enc_keys(
        &self,
        slave_sae_id: &str,
        request: &KeyRequest,
    ) -> Result<KeyContainer, ClientError> {
        let url = format!("{}/{}/enc_keys", self.base, seg(slave_sae_id));
        decode(self.http.post(url).json(request).send().await?).await
    }

    /// Get key with key IDs by GET: `GET /api/v1/keys/{master_SAE_ID}/dec_keys?key_ID=`.
    pub async fn get_key_with_id(
        &self,
        master_sae_id: &str,
        key_id: &str,
    ) -> Result<KeyContainer, ClientError> {
        let url = format!("{}/{}/dec_keys", self.base, seg(master_sae_id));
        decode(
            self.http
                .get(url)
                .query(&[("key_ID", key_id)])
                .send()
                .await?,
        )
        .await
    }

    /// Get key with key IDs by POST: `POST /api/v1/keys/{master_SAE_ID}/dec_keys`.
    pub async fn dec_keys(
        &self,
        master_sae_id: &str,
        key_ids: &KeyIds,
    ) -> Result<KeyContainer, ClientError> {
        let url = format!("{}/{}/dec_keys", self.base, seg(master_sae_id));
        decode(self.http.post(url).json(key_ids).send().await?).await
    }
}

impl Client {
    /// Get key by POST, with the keys decoded (fast path for bulk key, see [`crate::codec`]).
    pub async fn enc_keys_decoded(
        &self,
        slave_sae_id: &str,
        request: &KeyRequest,
    ) -> Result<Vec<DecodedKey>, ClientError> {
        let body = self.enc_keys_body(slave_sae_id, request).await?;
        decoded(body)
    }

    /// Get key with key IDs by POST, with the keys decoded.
    pub async fn dec_keys_decoded(
        &self,
        master_sae_id: &str,
        key_ids: &KeyIds,
    ) -> Result<Vec<DecodedKey>, ClientError> {
        let body = self.dec_keys_body(master_sae_id, key_ids).await?;
        decoded(body)
    }

    /// Get key by POST; the reply's body, a Key container, undecoded (see
    /// [`crate::codec::borrow_key_container`]).
    pub async fn enc_keys_body(
        &self,
        slave_sae_id: &str,
        request: &KeyRequest,
    ) -> Result<bytes::Bytes, ClientError> {
        let url = format!("{}/{}/enc_keys", self.base, seg(slave_sae_id));
        reply(self.http.post(url).json(request).send().await?, |b| {
            Ok(b.clone())
        })
        .await
    }

    /// Get key with key IDs by POST; the reply's body, a Key container, undecoded.
    pub async fn dec_keys_body(
        &self,
        master_sae_id: &str,
        key_ids: &KeyIds,
    ) -> Result<bytes::Bytes, ClientError> {
        let url = format!("{}/{}/dec_keys", self.base, seg(master_sae_id));
        reply(self.http.post(url).json(key_ids).send().await?, |b| {
            Ok(b.clone())
        })
        .await
    }
}

/// The keys of a 200 reply's Key container, decoded.
fn decoded(body: bytes::Bytes) -> Result<Vec<DecodedKey>, ClientError> {
    read_key_container(&body).map_err(|e| ClientError::Protocol {
        status: StatusCode::OK,
        reason: e.to_string(),
    })
}

/// Percent-encodes an SAE ID for use as one path segment.
fn seg(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for b in id.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

async fn decode<T: DeserializeOwned>(resp: reqwest::Response) -> Result<T, ClientError> {
    reply(resp, |body| {
        serde_json::from_slice(body).map_err(|e| e.to_string())
    })
    .await
}

/// A 200 reply parsed by `parse`; any other status as the spec's Error.
async fn reply<T>(
    resp: reqwest::Response,
    parse: impl FnOnce(&bytes::Bytes) -> Result<T, String>,
) -> Result<T, ClientError> {
    let status = resp.status();
    let body = resp.bytes().await?;
    if status == StatusCode::OK {
        return parse(&body).map_err(|reason| ClientError::Protocol { status, reason });
    }
    match serde_json::from_slice::<ApiError>(&body) {
        Ok(error) => Err(ClientError::Api { status, error }),
        Err(e) => Err(ClientError::Protocol {
            status,
            reason: e.to_string(),
        }),
    }
}
