//! Sample-set manifests (`PUT /v1/sets/{name}`, `GET /v1/sets`): the list of a set's files
//! and their backups, kept at every site so that the catalogue survives the loss of the
//! client's own state.
//!
//! On disk: `store_dir/sets/<owner in hex>/<name>.json`, one file per set and owner,
//! replaced atomically (written to `.tmp`, `fsync`ed, renamed, folder `fsync`ed); folders
//! 0700, files 0600; at most `limits.max_sets_per_client` sets per client (429 past it;
//! concurrent first writes of new sets may pass it by a few). The name is checked
//! ([`valid_set_name`]) before it becomes a file name,
//! and the owner is hex-encoded, so neither can leave the folder.

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use actix_web::{web, HttpRequest, HttpResponse};
use share_transfer::wire::{valid_set_name, SetManifest};
use uuid::Uuid;

use crate::{bad, ApiError, Shared};

fn owner_dir(root: &Path, owner: &str) -> PathBuf {
    root.join("sets").join(hex::encode(owner.as_bytes()))
}

fn internal(what: &Path, e: impl std::fmt::Display) -> ApiError {
    ApiError(
        actix_web::http::StatusCode::INTERNAL_SERVER_ERROR,
        format!("set store {}: {e}", what.display()),
    )
}

/// Writes `m` as its owner's set `m.name`, replacing the previous one atomically; a new
/// set past the owner's `max` sets is refused (429).
fn write(root: &Path, m: &SetManifest, max: usize) -> Result<(), ApiError> {
    let dir = owner_dir(root, &m.owner);
    let fin = dir.join(format!("{}.json", m.name));
    if !fin.exists() {
        let held = fs::read_dir(&dir).map_or(0, |d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .count()
        });
        if held >= max {
            return Err(ApiError(
                actix_web::http::StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "client {} already keeps {held} sample sets here (limits.max_sets_per_client = {max})",
                    m.owner
                ),
            ));
        }
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| internal(&dir, e))?;
    let tmp = dir.join(format!("{}.json.tmp", m.name));
    let text = serde_json::to_vec_pretty(m).map_err(|e| internal(&fin, e))?;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| internal(&tmp, e))?;
    f.write_all(&text).map_err(|e| internal(&tmp, e))?;
    f.sync_all().map_err(|e| internal(&tmp, e))?;
    fs::rename(&tmp, &fin).map_err(|e| internal(&fin, e))?;
    fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| internal(&dir, e))
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
    /// Blocking: the first call reads every set manifest under `root`.
    pub(crate) fn name(&self, root: &Path, owner: &str, id: Uuid) -> Option<String> {
        let mut guard = self.0.lock().ok()?;
        let names = guard.get_or_insert_with(|| {
            let mut names = HashMap::new();
            for m in read_all(root) {
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

/// Every set kept here (unreadable files are skipped with a warning).
fn read_all(root: &Path) -> Vec<SetManifest> {
    let mut out = Vec::new();
    let Ok(owners) = fs::read_dir(root.join("sets")) else {
        return out;
    };
    for owner in owners.flatten() {
        let Ok(files) = fs::read_dir(owner.path()) else {
            continue;
        };
        for f in files.flatten() {
            let p = f.path();
            if p.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let read = fs::read(&p)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<SetManifest>(&b).map_err(|e| e.to_string()));
            match read {
                Ok(m) => out.push(m),
                Err(e) => {
                    tracing::warn!(file = %p.display(), error = %e, "unreadable set manifest")
                }
            }
        }
    }
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
            &agent.cfg.store_dir,
            &stored,
            agent.cfg.limits.max_sets_per_client,
        )?;
        // After the file: a first read of the folder racing this one sees it anyway.
        agent.set_names.written(&stored);
        Ok::<_, ApiError>(())
    })
    .await
    .map_err(|e| internal(&a.cfg.store_dir, e))??;
    Ok(HttpResponse::Ok().json(m))
}

/// `GET /v1/sets`: the sets the caller may read.
pub(crate) async fn list(req: HttpRequest, a: Shared) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let root = a.cfg.store_dir.clone();
    let all = web::block(move || read_all(&root))
        .await
        .map_err(|e| internal(&a.cfg.store_dir, e))?;
    let mut out = Vec::new();
    for m in all {
        if a.may_read_of(&caller, &m.owner, m.readers.as_deref()).await {
            out.push(m);
        }
    }
    Ok(HttpResponse::Ok().json(out))
}
