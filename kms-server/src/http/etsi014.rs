//! Handlers of the ETSI GS QKD 014 interface: Get status, Get key and Get key with key IDs,
//! by GET and POST.

use actix_web::{web, HttpRequest, HttpResponse};
use etsi_spec::{KeyIds, KeyRequest};

use super::{
    caller_sae, key_container, log_ignored, parse_json, parse_u64, query_pairs, read_body, Shared,
};
use crate::service::KmeError;

pub(super) async fn status(
    req: HttpRequest,
    kme: Shared,
    path: web::Path<String>,
) -> Result<HttpResponse, KmeError> {
    let caller = caller_sae(&req, &kme)?;
    let st = kme.status(&caller, &path)?;
    Ok(HttpResponse::Ok().json(&st))
}

pub(super) async fn enc_keys_get(
    req: HttpRequest,
    kme: Shared,
    path: web::Path<String>,
) -> Result<HttpResponse, KmeError> {
    let caller = caller_sae(&req, &kme)?;
    let mut request = KeyRequest::default();
    for (k, v) in query_pairs(&req)? {
        let slot = match k.as_str() {
            "number" => &mut request.number,
            "size" => &mut request.size,
            _ => {
                return Err(KmeError::bad_request(format!(
                    "unknown query parameter {k:?}; Get key by GET takes number and size"
                )))
            }
        };
        if slot.is_some() {
            return Err(KmeError::bad_request(format!(
                "query parameter {k} given twice"
            )));
        }
        *slot = Some(parse_u64(&k, &v)?);
    }
    let keys = kme.enc_keys(&caller, &path, &request).await?;
    Ok(key_container(keys))
}

pub(super) async fn enc_keys_post(
    req: HttpRequest,
    kme: Shared,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, KmeError> {
    let caller = caller_sae(&req, &kme)?;
    let body = read_body(payload, kme.settings.limits.max_body_bytes, &kme).await?;
    let request: KeyRequest = if body.iter().all(u8::is_ascii_whitespace) {
        KeyRequest::default()
    } else {
        parse_json(&body, "Key request")?
    };
    let ignored: Vec<String> = request.unknown.keys().cloned().collect();
    log_ignored("Key request", &ignored);
    let keys = kme.enc_keys(&caller, &path, &request).await?;
    Ok(key_container(keys))
}

pub(super) async fn dec_keys_get(
    req: HttpRequest,
    kme: Shared,
    path: web::Path<String>,
) -> Result<HttpResponse, KmeError> {
    let caller = caller_sae(&req, &kme)?;
    let mut ids = Vec::new();
    for (k, v) in query_pairs(&req)? {
        if k != "key_ID" {
            return Err(KmeError::bad_request(format!(
                "unknown query parameter {k:?}; Get key with key IDs by GET takes key_ID"
            )));
        }
        ids.push(v);
    }
    if ids.len() != 1 {
        return Err(KmeError::bad_request(
            "Get key with key IDs by GET takes exactly one key_ID; use POST for several",
        ));
    }
    let keys = kme.dec_keys(&caller, &path, &ids).await?;
    Ok(key_container(keys))
}

pub(super) async fn dec_keys_post(
    req: HttpRequest,
    kme: Shared,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, KmeError> {
    let caller = caller_sae(&req, &kme)?;
    let body = read_body(payload, kme.settings.limits.max_body_bytes, &kme).await?;
    let request: KeyIds = parse_json(&body, "Key IDs")?;
    log_ignored("Key IDs", &request.unknown_members());
    let ids: Vec<String> = request.key_IDs.into_iter().map(|k| k.key_ID).collect();
    let keys = kme.dec_keys(&caller, &path, &ids).await?;
    Ok(key_container(keys))
}
