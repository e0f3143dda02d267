//! Handlers of the KME-to-KME channel (routes and messages in [`crate::peer`]); callers
//! are linked KMEs, known by their certificates.

use actix_web::{web, HttpRequest, HttpResponse};

use super::{caller_kme, parse_json, read_body, Shared};
use crate::link;
use crate::peer::{BlockAnnounce, RegisterBatch, RegisterResults, Relay, SyncRequest};
use crate::service::KmeError;

pub(super) async fn receive_block(
    req: HttpRequest,
    kme: Shared,
    payload: web::Payload,
) -> Result<HttpResponse, KmeError> {
    let from = caller_kme(&req, &kme)?;
    let mut body = read_body(payload, 64 * 1024, &kme).await?;
    let block: Result<BlockAnnounce, _> = parse_json(&body, "block announcement");
    zeroize::Zeroize::zeroize(&mut body[..]); // it may hold a simulator seed
    link::receive_block(&kme, &from, &block?).await?;
    Ok(HttpResponse::Ok().finish())
}

pub(super) async fn receive_sync(
    req: HttpRequest,
    kme: Shared,
    payload: web::Payload,
) -> Result<HttpResponse, KmeError> {
    let from = caller_kme(&req, &kme)?;
    let body = read_body(payload, 4096, &kme).await?;
    let sync: SyncRequest = parse_json(&body, "link synchronisation")?;
    let reply = link::receive_sync(&kme, &from, &sync).await?;
    Ok(HttpResponse::Ok().json(reply))
}

pub(super) async fn source_message(
    req: HttpRequest,
    kme: Shared,
    payload: web::Payload,
) -> Result<HttpResponse, KmeError> {
    let from = caller_kme(&req, &kme)?;
    let body = read_body(payload, 64 << 20, &kme).await?;
    let message: serde_json::Value = parse_json(&body, "key source message")?;
    let source = kme
        .source(&from)
        .ok_or_else(|| KmeError::unauthorized(format!("no link with KME {from}")))?;
    let reply = source
        .peer_message(message)
        .await
        .map_err(|e| KmeError::bad_request(e.to_string()))?;
    Ok(HttpResponse::Ok().json(reply))
}

pub(super) async fn register(
    req: HttpRequest,
    kme: Shared,
    payload: web::Payload,
) -> Result<HttpResponse, KmeError> {
    let from = caller_kme(&req, &kme)?;
    let body = read_body(payload, 256 << 20, &kme).await?;
    let batch: RegisterBatch = parse_json(&body, "registration")?;
    let results = kme.register_many(&from, batch.registrations).await;
    Ok(HttpResponse::Ok().json(RegisterResults { results }))
}

pub(super) async fn relay(
    req: HttpRequest,
    kme: Shared,
    payload: web::Payload,
) -> Result<HttpResponse, KmeError> {
    let from = caller_kme(&req, &kme)?;
    // The largest relay a KME sends: max_key_per_request keys of max_key_size, in base64.
    let l = &kme.settings.limits;
    let limit = (l.max_key_per_request * (l.max_key_size / 8)).saturating_mul(4) / 3 + (1 << 20);
    let body = read_body(payload, usize::try_from(limit).unwrap_or(usize::MAX), &kme).await?;
    let relay: Relay = parse_json(&body, "key relay")?;
    Ok(HttpResponse::Ok().json(kme.relay_in(&from, relay).await))
}
