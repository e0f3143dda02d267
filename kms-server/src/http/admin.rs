//! The operators' interface: switching the modelled eavesdropper of a link.

use actix_web::{web, HttpRequest, HttpResponse};

use super::{caller_operator, parse_json, read_body, Shared};
use crate::service::KmeError;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Eavesdropper {
    /// Fraction of pulses an intercept-resend attacker takes (0 = none, 1 = all).
    fraction: f64,
}

/// Operators only: put an intercept-resend attacker on a link (or remove it).
pub(super) async fn set_eavesdropper(
    req: HttpRequest,
    kme: Shared,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, KmeError> {
    let operator = caller_operator(&req, &kme)?;
    tracing::info!(%operator, peer = %path.as_str(), "operator request");
    let body = read_body(payload, 4096, &kme).await?;
    let e: Eavesdropper = parse_json(&body, "eavesdropper setting")?;
    let perf = kme.set_eavesdropper(&path, e.fraction)?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "peer_KME_ID": path.as_str(),
        "fraction": e.fraction,
        "model": perf,
    })))
}
