//! The share-renewal routes (only the share's owner may call them; the steps and their
//! guarantees are described at [`RenewBegin`], the files at [`crate::staging`]):
//!
//! - `GET    /v1/backups/{id}/shares/{i}/renewal` → [`RenewalStatus`]
//! - `PUT    /v1/backups/{id}/shares/{i}/renewal/{renewal}` — [`RenewBegin`] → status
//! - `POST   /v1/backups/{id}/shares/{i}/renewal/{renewal}/chunks` — frames of deltas →
//!   [`Stored`](share_transfer::wire::Stored)
//! - `POST   /v1/backups/{id}/shares/{i}/renewal/{renewal}/prepare` — [`RenewPrepare`] →
//!   status
//! - `POST   /v1/backups/{id}/shares/{i}/renewal/{renewal}/commit` → the share's new
//!   [`Manifest`](share_transfer::wire::Manifest)
//! - `DELETE /v1/backups/{id}/shares/{i}/renewal/{renewal}` → status (rolled back)

use std::sync::Arc;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use uuid::Uuid;

use crate::jobs::{Begin, Failure};
use crate::staging::Staging;
use crate::storage::{ShareFiles, StoreError};
use crate::upload::{receive, Sink};
use crate::{backup_id, bad, Agent, ApiError, Shared};
use dashboard_web::JobKind;
use share_transfer::wire::{RenewBegin, RenewPrepare, RenewalStatus};

/// `(backup, share, renewal)` of a renewal route.
type RenewalPath = web::Path<(String, u8, String)>;

fn renewal_id(s: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(s).map_err(|_| bad(format!("{s:?} is not a renewal ID")))
}

fn status_of(share: &ShareFiles) -> RenewalStatus {
    let m = share.manifest();
    RenewalStatus {
        epoch: m.open.epoch,
        renewal: m.renewal,
        pending: share.staging().map(|s| s.pending()),
    }
}

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
}

impl Agent {
    /// The share and its staged renewal `rid`, for its owner; 409 if another or none is
    /// staged.
    fn staged(
        &self,
        caller: &str,
        id: Uuid,
        i: u8,
        rid: Uuid,
    ) -> Result<(Arc<ShareFiles>, Arc<Staging>), ApiError> {
        let (share, _) = self.owned_share(caller, id, i)?;
        match share.staging() {
            Some(s) if s.renewal() == rid => Ok((share, s)),
            other => Err(StoreError::Renewal(match other {
                Some(s) => format!("renewal {} is pending here, not {rid}", s.renewal()),
                None => format!("no renewal {rid} is staged here"),
            })
            .into()),
        }
    }
}

pub(crate) async fn status(
    req: HttpRequest,
    a: Shared,
    path: web::Path<(String, u8)>,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let (share, _) = a.owned_share(&caller, backup_id(&path.0)?, path.1)?;
    Ok(HttpResponse::Ok().json(status_of(&share)))
}

pub(crate) async fn begin(
    req: HttpRequest,
    a: Shared,
    path: RenewalPath,
    body: web::Json<RenewBegin>,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let (id, i, rid) = (backup_id(&path.0)?, path.1, renewal_id(&path.2)?);
    let (share, _) = a.owned_share(&caller, id, i)?;
    let epoch = body.epoch;
    let s = share.clone();
    web::block(move || s.begin_renewal(rid, epoch))
        .await
        .map_err(internal)??;
    tracing::info!(backup = %id, share = i, renewal = %rid, epoch, "share renewal staging");
    Ok(HttpResponse::Ok().json(status_of(&share)))
}

pub(crate) async fn chunks(
    req: HttpRequest,
    a: Shared,
    path: RenewalPath,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let _pass = a.uploads.enter(&caller).map_err(|r| a.refused(r))?;
    let (id, i, rid) = (backup_id(&path.0)?, path.1, renewal_id(&path.2)?);
    let (share, staging) = a.staged(&caller, id, i, rid)?;
    let m = share.manifest();
    let mut job = a.jobs.begin(Begin::of(&m, JobKind::Renew, &caller));
    let sink = Sink::Renewal(share, staging);
    let r = receive(&a, &caller, (id, i), sink, &m, payload, &job).await;
    if let Err(e) = &r {
        job.fail(Failure::of_status(e.0.as_u16()), e.1.clone());
    }
    r
}

pub(crate) async fn prepare(
    req: HttpRequest,
    a: Shared,
    path: RenewalPath,
    body: web::Json<RenewPrepare>,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let (id, i, rid) = (backup_id(&path.0)?, path.1, renewal_id(&path.2)?);
    let (share, staging) = a.staged(&caller, id, i, rid)?;
    let splits = body.into_inner().splits;
    web::block(move || staging.prepare(&splits))
        .await
        .map_err(internal)??;
    Ok(HttpResponse::Ok().json(status_of(&share)))
}

pub(crate) async fn commit(
    req: HttpRequest,
    a: Shared,
    path: RenewalPath,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let (id, i, rid) = (backup_id(&path.0)?, path.1, renewal_id(&path.2)?);
    let (_, m) = a.owned_share(&caller, id, i)?;
    if m.renewal == Some(rid) {
        return Ok(HttpResponse::Ok().json(m)); // committed before: the same answer
    }
    let (share, staging) = a.staged(&caller, id, i, rid)?;
    web::block(move || staging.commit())
        .await
        .map_err(internal)??;
    share.end_renewal();
    let renewed = a
        .storage
        .reload(id, i)?
        .ok_or(StoreError::NotFound { id, index: i })?;
    let m = renewed.manifest();
    tracing::info!(backup = %id, share = i, renewal = %rid, epoch = m.open.epoch, "share renewed");
    Ok(HttpResponse::Ok().json(m))
}

pub(crate) async fn abort(
    req: HttpRequest,
    a: Shared,
    path: RenewalPath,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let (id, i, rid) = (backup_id(&path.0)?, path.1, renewal_id(&path.2)?);
    let (share, m) = a.owned_share(&caller, id, i)?;
    if m.renewal == Some(rid) {
        return Err(StoreError::Renewal(format!(
            "renewal {rid} is committed here: it cannot be rolled back"
        ))
        .into());
    }
    // Not staged here (never begun, or rolled back before): nothing to undo.
    if let Some(s) = share.staging().filter(|s| s.renewal() == rid) {
        web::block(move || s.abort()).await.map_err(internal)??;
        share.end_renewal();
        tracing::info!(backup = %id, share = i, renewal = %rid, "share renewal rolled back");
    }
    Ok(HttpResponse::Ok().json(status_of(&share)))
}
