//! Sample-set manifests (`PUT /v1/sets/{name}`, `GET /v1/sets`): the list of a set's files
//! and their backups, kept at every site so that the catalogue survives the loss of the
//! client's own state.
//!
//! Kept by the backend (`sets/<owner in hex>/<name>.json`, in the store folder or the
//! bucket), one per set and owner, replaced atomically; at most `limits.max_sets_per_client` sets per client (429 past it;
//! concurrent first writes of new sets may pass it by a few). The name is checked
//! ([`valid_set_name`]) before it becomes a file name,
//! and the owner is hex-encoded, so neither can leave its folder or prefix.

use std::collections::HashMap;
use std::sync::Mutex;

use actix_web::{web, HttpRequest, HttpResponse};
use share_transfer::wire::{valid_set_name, SetManifest};
use uuid::Uuid;

use crate::backend::Backend;
use crate::{bad, ApiError, Shared};

fn internal(e: impl std::fmt::Display) -> ApiError {
    ApiError(
        actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
        format!("set store: {e}"),
    )
}

/// Writes `m` as its owner's set `m.name`, replacing the previous one atomically; a new
/// set past the owner's `max` sets is refused (429).
fn write(store: &dyn Backend, m: &SetManifest, max: usize) -> Result<(), ApiError> {
    let owner = hex::encode(m.owner.as_bytes());
    let held = store.set_names(&owner)?;
    if !held.contains(&m.name) && held.len() >= max {
        return Err(ApiError(
            actix_web::http::StatusCode::TOO_MANY_REQUESTS,
            format!(
                "client {} already keeps {} sample sets here (limits.max_sets_per_client = {max})",
                m.owner,
                held.len()
            ),
        ));
    }
    let text = serde_json::to_vec_pretty(m).map_err(internal)?;
    Ok(store.put_set(&owner, &m.name, &text)?)
}

/// `set/path` of every backup that is a file of a set kept here, by its owner and backup:
/// read from disk on first use, then kept current by every `PUT` (the operator's view asks
/// for names every second; the folder is not read each time).
#[derive(Default)]
pub(crate) struct SetNames(Mutex<Option<HashMap<(String, Uuid), String>>>);

impl SetNames {
    fn add(names: &mut HashMap<(String, Uuid), String>, m: &SetManifest) {
        for f in &m.files {
            names.insert(
                (m.owner.clone(), f.backup_id),
                format!("{}/{}", m.name, f.path),
            );
        }
    }

    /// The name of backup `id` stored by `owner`, if it is a file of one of its sets.
    /// Blocking: the first call reads every set manifest kept in `store`.
    pub(crate) fn name(&self, store: &dyn Backend, owner: &str, id: Uuid) -> Option<String> {
        let mut guard = self.0.lock().ok()?;
        let names = guard.get_or_insert_with(|| {
            let mut names = HashMap::new();
            for m in read_all(store) {
                Self::add(&mut names, &m);
            }
            names
        });
        names.get(&(owner.to_owned(), id)).cloned()
    }

    /// A set just written: its names, if the index is already built (else the first
    /// [`SetNames::name`] reads it from disk).
    fn written(&self, m: &SetManifest) {
        if let Ok(mut guard) = self.0.lock() {
            if let Some(names) = guard.as_mut() {
                Self::add(names, m);
            }
        }
    }
}

/// Every set kept here (unreadable ones are skipped with a warning).
fn read_all(store: &dyn Backend) -> Vec<SetManifest> {
    let all = match store.sets() {
        Ok(all) => all,
        Err(e) => {
            tracing::warn!(error = %e, "sample sets unreadable");
            return Vec::new();
        }
    };
    let mut out: Vec<SetManifest> = all
        .into_iter()
        .filter_map(|(at, b)| match serde_json::from_slice(&b) {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(set = %at, error = %e, "unreadable set manifest");
                None
            }
        })
        .collect();
    out.sort_by(|a, b| (&a.owner, &a.name).cmp(&(&b.owner, &b.name)));
    out
}

/// `PUT /v1/sets/{name}`: the caller's set, replaced.
pub(crate) async fn put(
    req: HttpRequest,
    a: Shared,
    name: web::Path<String>,
    body: web::Json<SetManifest>,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let mut m = body.into_inner();
    if !valid_set_name(&name) || m.name != *name {
        return Err(bad(format!(
            "set name {:?} in the path and {:?} in the body must agree and be 1 to 128 of A-Z a-z 0-9 . _ -",
            name.as_str(),
            m.name
        )));
    }
    if let Some(why) = m.problem() {
        return Err(bad(why));
    }
    m.owner = caller;
    let agent = a.get_ref().clone();
    let stored = m.clone();
    web::block(move || {
        write(
            agent.storage.backend(),
            &stored,
            agent.cfg.limits.max_sets_per_client,
        )?;
        // After the file: a first read of the folder racing this one sees it anyway.
        agent.set_names.written(&stored);
        Ok::<_, ApiError>(())
    })
    .await
    .map_err(internal)??;
    Ok(HttpResponse::Ok().json(m))
}

/// `GET /v1/sets`: the sets the caller may read.
pub(crate) async fn list(req: HttpRequest, a: Shared) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let agent = a.get_ref().clone();
    let all = web::block(move || read_all(agent.storage.backend()))
        .await
        .map_err(internal)?;
    let mut out = Vec::new();
    for m in all {
        if a.may_read_of(&caller, &m.owner, m.readers.as_deref()).await {
            out.push(m);
        }
    }
    Ok(HttpResponse::Ok().json(out))
}
