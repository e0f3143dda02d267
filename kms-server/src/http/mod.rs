//! The HTTP face of the KME: the 014 interface under `/api/v1/keys/` ([`etsi014`]), the
//! KME-to-KME channel under `/internal/v1/` ([`internal`]), the operators' interface under
//! `/admin/v1/` ([`admin`]), the dashboard under `/dashboard/` ([`dashboard`]) and Prometheus metrics on their own listener ([`metrics`]).
//! Every error reply is the spec's Error JSON; [`error`] is the one place that maps the
//! service's refusals to status codes.

pub mod admin;
pub mod dashboard;
pub mod error;
pub mod etsi014;
pub mod internal;
pub mod limits;
pub mod metrics;

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use mtls::server::PeerCert;

use crate::peer;
use crate::service::{IssuedKeys, Kme, KmeError};

type Shared = web::Data<Arc<Kme>>;

/// Registers all routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/keys/{slave}/status")
            .route(web::get().to(etsi014::status))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/v1/keys/{slave}/enc_keys")
            .route(web::get().to(etsi014::enc_keys_get))
            .route(web::post().to(etsi014::enc_keys_post))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/v1/keys/{master}/dec_keys")
            .route(web::get().to(etsi014::dec_keys_get))
            .route(web::post().to(etsi014::dec_keys_post))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(peer::BLOCKS_PATH)
            .route(web::post().to(internal::receive_block))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(peer::SYNC_PATH)
            .route(web::post().to(internal::receive_sync))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(peer::SOURCE_PATH)
            .route(web::post().to(internal::source_message))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(peer::REGISTER_PATH)
            .route(web::post().to(internal::register))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(peer::RELAY_PATH)
            .route(web::post().to(internal::relay))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/admin/v1/links/{peer}/eavesdropper")
            .route(web::post().to(admin::set_eavesdropper))
            .default_service(web::to(method_not_allowed)),
    )
    .configure(dashboard::routes)
    .default_service(web::to(not_found));
}

async fn not_found(req: HttpRequest) -> HttpResponse {
    error::reply(
        StatusCode::NOT_FOUND,
        format!("no such resource: {}", req.path()),
    )
}

async fn method_not_allowed(req: HttpRequest) -> HttpResponse {
    error::reply(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {} is not allowed on {}", req.method(), req.path()),
    )
}

/// The verified client certificate of the connection: 401 without one, or when the CA's CRL
/// revokes it.
pub(super) fn peer_cert<'a>(req: &'a HttpRequest, kme: &Kme) -> Result<&'a PeerCert, KmeError> {
    let cert = req.conn_data::<PeerCert>().ok_or_else(|| {
        KmeError::unauthorized("a client certificate issued by the KME's CA is required")
    })?;
    // Per request, not per connection: a keep-alive connection opened before a revocation
    // is refused from the next request on.
    let revoked = kme
        .revocations
        .as_ref()
        .is_some_and(|crl| crl.revokes_serial(&cert.serial_hex));
    if revoked {
        tracing::warn!(serial = %cert.serial_hex, cn = ?cert.cn, "request with a revoked certificate refused");
        return Err(KmeError::unauthorized(format!(
            "the client certificate (serial {}) is revoked by the CA's CRL",
            cert.serial_hex
        )));
    }
    Ok(cert)
}

/// The calling SAE, from its client certificate. A certificate that names a KME or an
/// operator in its URI SAN, or that is an operator's by fingerprint, never acts as an SAE,
/// whatever its other fields say.
pub(super) fn caller_sae(req: &HttpRequest, kme: &Kme) -> Result<String, KmeError> {
    let cert = peer_cert(req, kme)?;
    if cert.uri_names(peer::KME_URI).next().is_some()
        || cert.uri_names(peer::OPERATOR_URI).next().is_some()
        || operator_by_fingerprint(cert, kme)
    {
        return Err(KmeError::unauthorized(
            "a KME or operator certificate cannot act as an SAE",
        ));
    }
    let field = kme.settings.sae_id_field;
    cert.sae_id(field).ok_or_else(|| {
        KmeError::unauthorized(format!(
            "the client certificate carries no SAE ID in its {field:?} field"
        ))
    })
}

/// The calling peer KME: its certificate must carry exactly one KME SAN
/// (`urn:qkd:kme:<ID>`), naming a configured peer. The CN alone proves nothing.
pub(super) fn caller_kme(req: &HttpRequest, kme: &Kme) -> Result<String, KmeError> {
    let cert = peer_cert(req, kme)?;
    let mut ids = cert.uri_names(peer::KME_URI);
    match (ids.next(), ids.next()) {
        (Some(id), None) if kme.peer(id).is_some() => Ok(id.to_owned()),
        _ => Err(KmeError::unauthorized(
            "only linked KMEs may use the KME-to-KME interface (a certificate with the SAN urn:qkd:kme:<a configured peer ID>)",
        )),
    }
}

/// The calling operator: a certificate with an operator SAN (`urn:qkd:operator:<NAME>`)
/// whose name is in `operators`, or whose SHA-256 fingerprint is in
/// `operator_fingerprints`.
pub(super) fn caller_operator(req: &HttpRequest, kme: &Kme) -> Result<String, KmeError> {
    let cert = peer_cert(req, kme)?;
    if let Some(name) = cert
        .uri_names(peer::OPERATOR_URI)
        .find(|n| kme.settings.operators.iter().any(|o| o == n))
    {
        return Ok(name.to_owned());
    }
    if operator_by_fingerprint(cert, kme) {
        return Ok(format!("sha256:{}", cert.fingerprint_sha256));
    }
    Err(KmeError::unauthorized(
        "the admin interface needs an operator certificate",
    ))
}

/// Whether the certificate's fingerprint is in `operator_fingerprints`.
fn operator_by_fingerprint(cert: &PeerCert, kme: &Kme) -> bool {
    kme.settings
        .operator_fingerprints
        .iter()
        .any(|f| crate::config::normalise_fingerprint(f) == cert.fingerprint_sha256)
}

/// Reads a request body, refusing more than `limit` bytes or one that takes longer than
/// `http.body_timeout_secs` to arrive.
pub(super) async fn read_body(
    payload: web::Payload,
    limit: usize,
    kme: &Kme,
) -> Result<web::BytesMut, KmeError> {
    let secs = kme.settings.http.body_timeout_secs;
    tokio::time::timeout(
        std::time::Duration::from_secs(secs),
        read_body_unbounded(payload, limit),
    )
    .await
    .map_err(|_| {
        KmeError::bad_request(format!(
            "the request body did not arrive within {secs} s (http.body_timeout_secs)"
        ))
    })?
}

async fn read_body_unbounded(
    mut payload: web::Payload,
    limit: usize,
) -> Result<web::BytesMut, KmeError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| KmeError::bad_request(format!("reading the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(KmeError::bad_request(format!(
                "request body exceeds {limit} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Parses a request body that must be one JSON object (every body of 014 and of the
/// KME-to-KME channel is). Anything else, valid JSON or not (`[]`, `42`, `"number"`), is a
/// 400: serde would otherwise read a struct from a JSON array by position.
pub(super) fn parse_json<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> Result<T, KmeError> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        return Err(KmeError::bad_request(format!(
            "malformed {what}: the body must be a JSON object"
        )));
    }
    serde_json::from_slice(body)
        .map_err(|e| KmeError::bad_request(format!("malformed {what}: {e}")))
}

/// Logs, at debug level, members of a request that 014 does not define and that are
/// therefore ignored.
pub(super) fn log_ignored(what: &str, names: &[String]) {
    if !names.is_empty() {
        tracing::debug!(request = what, members = ?names, "ignored members 014 does not define");
    }
}

pub(super) fn query_pairs(req: &HttpRequest) -> Result<Vec<(String, String)>, KmeError> {
    serde_urlencoded::from_str(req.query_string())
        .map_err(|e| KmeError::bad_request(format!("malformed query string: {e}")))
}

pub(super) fn parse_u64(name: &str, value: &str) -> Result<u64, KmeError> {
    value.parse::<u64>().map_err(|_| {
        KmeError::bad_request(format!(
            "{name} must be a non-negative integer below 2^64, got {value:?}"
        ))
        .detail(name, value)
    })
}

pub(super) fn key_container(keys: IssuedKeys) -> HttpResponse {
    // Written straight into one buffer with SIMD base64 (see etsi_spec::codec).
    let size: usize = keys.iter().map(|(_, k)| k.len().div_ceil(3) * 4 + 64).sum();
    let mut body = Vec::with_capacity(size + 16);
    etsi_spec::codec::write_key_container(keys.iter().map(|(id, k)| (*id, &k[..])), &mut body);
    HttpResponse::Ok()
        .content_type("application/json")
        .body(body)
}
