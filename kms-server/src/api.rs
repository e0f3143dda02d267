//! HTTP handlers: the 014 interface under `/api/v1/keys/` and the KME-to-KME channel under
//! `/internal/v1/`. Every error reply is the spec's Error JSON.

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use etsi_spec::{KeyIds, KeyRequest};
use futures_util::StreamExt;

use crate::error::ApiError;
use crate::kme::{IssuedKeys, Kme};
use crate::link;
use crate::peer::{BlockAnnounce, RegisterBatch, RegisterResults, SyncRequest};
use mtls::server::PeerCert;

type Shared = web::Data<Arc<Kme>>;

/// Registers all routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.service(
        web::resource("/api/v1/keys/{slave}/status")
            .route(web::get().to(status))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/v1/keys/{slave}/enc_keys")
            .route(web::get().to(enc_keys_get))
            .route(web::post().to(enc_keys_post))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/api/v1/keys/{master}/dec_keys")
            .route(web::get().to(dec_keys_get))
            .route(web::post().to(dec_keys_post))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(crate::peer::BLOCKS_PATH)
            .route(web::post().to(receive_block))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(crate::peer::SYNC_PATH)
            .route(web::post().to(receive_sync))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(crate::peer::SOURCE_PATH)
            .route(web::post().to(source_message))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource(crate::peer::REGISTER_PATH)
            .route(web::post().to(register))
            .default_service(web::to(method_not_allowed)),
    )
    .service(
        web::resource("/admin/v1/links/{peer}/eavesdropper")
            .route(web::post().to(set_eavesdropper))
            .default_service(web::to(method_not_allowed)),
    )
    .default_service(web::to(not_found));
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Eavesdropper {
    /// Fraction of pulses an intercept-resend attacker takes (0 = none, 1 = all).
    fraction: f64,
}

/// Operators only: put an intercept-resend attacker on a link (or remove it).
async fn set_eavesdropper(
    req: HttpRequest,
    kme: Shared,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let cn = peer_cert(&req)?.cn.clone().unwrap_or_default();
    if !kme.settings.operators.contains(&cn) {
        return Err(ApiError::unauthorized(
            "the admin interface needs an operator certificate",
        ));
    }
    let body = read_body(payload, 4096).await?;
    let e: Eavesdropper = parse_json(&body, "eavesdropper setting")?;
    let perf = kme.set_eavesdropper(&path, e.fraction)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "peer_KME_ID": path.as_str(),
        "fraction": e.fraction,
        "model": perf,
    })))
}

async fn not_found(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        format!("no such resource: {}", req.path()),
    ))
}

async fn method_not_allowed(req: HttpRequest) -> Result<HttpResponse, ApiError> {
    Err(ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method {} is not allowed on {}", req.method(), req.path()),
    ))
}

fn peer_cert(req: &HttpRequest) -> Result<&PeerCert, ApiError> {
    req.conn_data::<PeerCert>().ok_or_else(|| {
        ApiError::unauthorized("a client certificate issued by the KME's CA is required")
    })
}

/// The calling SAE, from its client certificate.
fn caller_sae(req: &HttpRequest, kme: &Kme) -> Result<String, ApiError> {
    let field = kme.settings.sae_id_field;
    peer_cert(req)?.sae_id(field).ok_or_else(|| {
        ApiError::unauthorized(format!(
            "the client certificate carries no SAE ID in its {field:?} field"
        ))
    })
}

/// The calling peer KME, from the CN of its certificate.
fn caller_kme(req: &HttpRequest, kme: &Kme) -> Result<String, ApiError> {
    let cn = peer_cert(req)?.cn.clone().unwrap_or_default();
    if kme.peer(&cn).is_some() {
        Ok(cn)
    } else {
        Err(ApiError::unauthorized(
            "only linked KMEs may use the KME-to-KME interface",
        ))
    }
}

/// Reads a request body, refusing more than `limit` bytes.
async fn read_body(mut payload: web::Payload, limit: usize) -> Result<web::BytesMut, ApiError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::bad_request(format!(
                "request body exceeds {limit} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn parse_json<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("malformed {what}: {e}")))
}

fn query_pairs(req: &HttpRequest) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str(req.query_string())
        .map_err(|e| ApiError::bad_request(format!("malformed query string: {e}")))
}

fn parse_u64(name: &str, value: &str) -> Result<u64, ApiError> {
    value.parse::<u64>().map_err(|_| {
        ApiError::bad_request(format!(
            "{name} must be a non-negative integer below 2^64, got {value:?}"
        ))
        .detail(name, value)
    })
}

fn key_container(keys: IssuedKeys) -> HttpResponse {
    // Written straight into one buffer with SIMD base64 (see etsi_spec::codec).
    let size: usize = keys.iter().map(|(_, k)| k.len().div_ceil(3) * 4 + 64).sum();
    let mut body = Vec::with_capacity(size + 16);
    etsi_spec::codec::write_key_container(keys.iter().map(|(id, k)| (*id, &k[..])), &mut body);
    HttpResponse::Ok()
        .content_type("application/json")
        .body(body)
}

async fn status(
    req: HttpRequest,
    kme: Shared,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let caller = caller_sae(&req, &kme)?;
    let st = kme.status(&caller, &path)?;
    Ok(HttpResponse::Ok().json(&st))
}

async fn enc_keys_get(
    req: HttpRequest,
    kme: Shared,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let caller = caller_sae(&req, &kme)?;
    let mut request = KeyRequest::default();
    for (k, v) in query_pairs(&req)? {
        let slot = match k.as_str() {
            "number" => &mut request.number,
            "size" => &mut request.size,
            _ => {
                return Err(ApiError::bad_request(format!(
                    "unknown query parameter {k:?}; Get key by GET takes number and size"
                )))
            }
        };
        if slot.is_some() {
            return Err(ApiError::bad_request(format!(
                "query parameter {k} given twice"
            )));
        }
        *slot = Some(parse_u64(&k, &v)?);
    }
    let keys = kme.enc_keys(&caller, &path, &request).await?;
    Ok(key_container(keys))
}

async fn enc_keys_post(
    req: HttpRequest,
    kme: Shared,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let caller = caller_sae(&req, &kme)?;
    let body = read_body(payload, kme.settings.limits.max_body_bytes).await?;
    let request: KeyRequest = if body.iter().all(u8::is_ascii_whitespace) {
        KeyRequest::default()
    } else {
        parse_json(&body, "Key request")?
    };
    let keys = kme.enc_keys(&caller, &path, &request).await?;
    Ok(key_container(keys))
}

async fn dec_keys_get(
    req: HttpRequest,
    kme: Shared,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let caller = caller_sae(&req, &kme)?;
    let mut ids = Vec::new();
    for (k, v) in query_pairs(&req)? {
        if k != "key_ID" {
            return Err(ApiError::bad_request(format!(
                "unknown query parameter {k:?}; Get key with key IDs by GET takes key_ID"
            )));
        }
        ids.push(v);
    }
    if ids.len() != 1 {
        return Err(ApiError::bad_request(
            "Get key with key IDs by GET takes exactly one key_ID; use POST for several",
        ));
    }
    let keys = kme.dec_keys(&caller, &path, &ids).await?;
    Ok(key_container(keys))
}

async fn dec_keys_post(
    req: HttpRequest,
    kme: Shared,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let caller = caller_sae(&req, &kme)?;
    let body = read_body(payload, kme.settings.limits.max_body_bytes).await?;
    let request: KeyIds = parse_json(&body, "Key IDs")?;
    let ids: Vec<String> = request.key_IDs.into_iter().map(|k| k.key_ID).collect();
    let keys = kme.dec_keys(&caller, &path, &ids).await?;
    Ok(key_container(keys))
}

async fn receive_block(
    req: HttpRequest,
    kme: Shared,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let from = caller_kme(&req, &kme)?;
    let mut body = read_body(payload, 64 * 1024).await?;
    let block: Result<BlockAnnounce, _> = parse_json(&body, "block announcement");
    zeroize::Zeroize::zeroize(&mut body[..]); // it may hold a simulator seed
    link::receive_block(&kme, &from, &block?).await?;
    Ok(HttpResponse::Ok().finish())
}

async fn receive_sync(
    req: HttpRequest,
    kme: Shared,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let from = caller_kme(&req, &kme)?;
    let body = read_body(payload, 4096).await?;
    let sync: SyncRequest = parse_json(&body, "link synchronisation")?;
    let reply = link::receive_sync(&kme, &from, &sync).await?;
    Ok(HttpResponse::Ok().json(reply))
}

async fn source_message(
    req: HttpRequest,
    kme: Shared,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let from = caller_kme(&req, &kme)?;
    let body = read_body(payload, 64 << 20).await?;
    let message: serde_json::Value = parse_json(&body, "key source message")?;
    let source = kme
        .source(&from)
        .ok_or_else(|| ApiError::unauthorized(format!("no link with KME {from}")))?;
    let reply = source
        .peer_message(message)
        .await
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(HttpResponse::Ok().json(reply))
}

async fn register(
    req: HttpRequest,
    kme: Shared,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let from = caller_kme(&req, &kme)?;
    let body = read_body(payload, 256 << 20).await?;
    let batch: RegisterBatch = parse_json(&body, "registration")?;
    let results = kme.register_many(&from, batch.registrations).await;
    Ok(HttpResponse::Ok().json(RegisterResults { results }))
}
