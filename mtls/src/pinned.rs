//! A client for one named server: the server's certificate must chain to the CA, match the
//! URL's host, **and** carry a given URI SAN (for a peer KME, `urn:qkd:kme:<ID>`), checked
//! inside the TLS handshake, so not one byte of a request reaches a server that is not the
//! one meant, even one holding another valid certificate of the same CA.
//!
//! reqwest cannot do this: its OpenSSL backend (native-tls) exposes no verification
//! callback, and its `tls_info` shows the certificate only after the request has been sent.
//! So this client is hyper's, with `hyper-openssl` (by the author of the `openssl` crate)
//! as its TLS connector: one TLS implementation (OpenSSL) still serves every party.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_openssl::client::legacy::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
use openssl::x509::X509StoreContextRef;

use crate::TlsError;

/// Why a request of a [`PinnedClient`] failed before a reply came.
#[derive(Debug, thiserror::Error)]
pub enum PinnedError {
    #[error("{0}")]
    Request(String),
    #[error("no reply within {0:?}")]
    Timeout(Duration),
}

/// An HTTPS client (HTTP/1.1, mutual TLS) that talks only to servers whose certificate
/// carries the expected URI SAN.
#[derive(Clone)]
pub struct PinnedClient {
    http: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

/// Files and names for [`PinnedClient::new`].
pub struct Pin<'a> {
    /// CA certificate (PEM) the server's chain must end in.
    pub ca: &'a std::path::Path,
    /// This client's certificate chain and key (PEM).
    pub cert: &'a std::path::Path,
    pub key: &'a std::path::Path,
    /// The URI SAN the server's certificate must carry, e.g. `urn:qkd:kme:KME_B`.
    pub server_uri_san: String,
    /// The CA's revocation list: a server certificate it lists is refused in the handshake.
    pub crl: Option<std::sync::Arc<crate::crl::Revocations>>,
}

fn leaf_has_uri(ctx: &X509StoreContextRef, want: &str) -> bool {
    ctx.current_cert()
        .and_then(|c| c.subject_alt_names())
        .is_some_and(|names| names.iter().any(|n| n.uri() == Some(want)))
}

fn leaf_revoked(ctx: &X509StoreContextRef, crl: Option<&crate::crl::Revocations>) -> bool {
    match (crl, ctx.current_cert()) {
        (None, _) => false,
        (Some(crl), Some(cert)) => crl.revokes(cert),
        (Some(_), None) => true,
    }
}

impl PinnedClient {
    /// A client that fails a connection attempt after `connect_timeout` and a request (until
    /// the whole reply is read) after `timeout`.
    pub fn new(
        pin: Pin<'_>,
        connect_timeout: Duration,
        timeout: Duration,
    ) -> Result<Self, TlsError> {
        let file = |what: &str, p: &std::path::Path, e: openssl::error::ErrorStack| {
            TlsError(format!("{what} {}: {e}", p.display()))
        };
        let mut ssl = SslConnector::builder(SslMethod::tls_client())
            .map_err(|e| TlsError(format!("TLS: {e}")))?;
        ssl.set_ca_file(pin.ca).map_err(|e| file("CA", pin.ca, e))?;
        ssl.set_certificate_chain_file(pin.cert)
            .map_err(|e| file("certificate", pin.cert, e))?;
        ssl.set_private_key_file(pin.key, SslFiletype::PEM)
            .map_err(|e| file("key", pin.key, e))?;
        ssl.check_private_key()
            .map_err(|e| TlsError(format!("key does not match certificate: {e}")))?;
        ssl.set_alpn_protos(b"\x08http/1.1")
            .map_err(|e| TlsError(format!("TLS: {e}")))?;
        let want = pin.server_uri_san;
        let crl = pin.crl;
        ssl.set_verify_callback(SslVerifyMode::PEER, move |chain_ok, ctx| {
            // Depth 0 is the server's own certificate; the chain above it is OpenSSL's check.
            chain_ok
                && (ctx.error_depth() != 0
                    || (leaf_has_uri(ctx, &want) && !leaf_revoked(ctx, crl.as_deref())))
        });
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(connect_timeout));
        let https =
            HttpsConnector::with_connector(tcp, ssl).map_err(|e| TlsError(format!("TLS: {e}")))?;
        let http = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(10))
            .build(https);
        Ok(PinnedClient { http, timeout })
    }

    /// POSTs `body` (JSON) to `url` (`https://` only: the pin is a TLS check); the status
    /// code and the whole reply body.
    pub async fn post_json(&self, url: &str, body: Vec<u8>) -> Result<(u16, Bytes), PinnedError> {
        if !url.starts_with("https://") {
            return Err(PinnedError::Request(format!(
                "{url}: only https:// URLs (the server's identity is checked in TLS)"
            )));
        }
        let req = hyper::Request::post(url)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| PinnedError::Request(e.to_string()))?;
        let exchange = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| PinnedError::Request(describe(&e)))?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| PinnedError::Request(e.to_string()))?
                .to_bytes();
            Ok((status, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| PinnedError::Timeout(self.timeout))?
    }
}

/// The error with its causes (hyper's own message is only the outermost).
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
