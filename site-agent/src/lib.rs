//! `site-agent`: the backup site agent (`backup-client serve`), which receives, keeps and
//! returns shares.
//!
//! Owns: the agent's HTTP server, its configuration ([`config`]) and its durable share store
//! ([`storage`], over a [`backend`]: a local folder or an S3-compatible bucket). Shares the frame format, sealing and key plans with the client through
//! `share-transfer`; takes its mTLS acceptor from `mtls`.
//!
//! Must never depend on: `kms-server` (the site's KME is any ETSI 014 KME, reached over
//! HTTPS), or the backup client's crate.
//!
//! Modules: this one (the JSON handlers and [`Agent`]), `upload` and `download` (the
//! chunk streams), [`admission`] and [`ledger`] (the bounds per client), [`config`] (`AgentConfig`),
//! [`storage`] (share files, chunk logs, O_DIRECT writes, finalisation and checks; its
//! doc has the on-disk layout), `sets` (sample-set manifests, kept by the backend),
//! [`jobs`] and `operator` (what the operator's listener shows: transfers and metrics),
//! and `aligned` ([`storage::AlignedBuf`], the direct-I/O
//! buffer: the crate's only `unsafe` code, allowed there alone under a crate-wide
//! `deny(unsafe_code)`).
//!
//! It is an SAE of its site's KME and serves HTTPS with mutual TLS; the calling client SAE
//! is the CN of its certificate. For a store, the client is the master: the agent fetches
//! the chunk keys with `dec_keys`, verifies each tag, removes the one-time pad and writes the
//! share durably before acknowledging. For a restore the agent is the master: it takes keys
//! with `enc_keys` for the requesting SAE, pads, tags and streams the share back. Transfers
//! within the agent's own site (client at the same KME) are tagged but not padded; transfers
//! from other sites without a pad are refused.
//!
//! HTTP API (all JSON except chunk bodies, which are frames, see [`share_transfer::wire`]):
//! - `PUT  /v1/backups/{id}/shares/{i}` — open a share ([`ShareOpen`]) → [`Manifest`]
//! - `GET  /v1/backups/{id}/shares/{i}/state` → [`ShareState`]
//! - `POST /v1/backups/{id}/shares/{i}/chunks` — frames → [`Stored`]
//! - `POST /v1/backups/{id}/shares/{i}/finalize` — [`Finalize`] → [`Manifest`]
//! - `PUT  /v1/backups/{id}/shares/{i}/placement` — [`PlacementUpdate`] → [`Manifest`] (a
//!   share of the backup moved); `DELETE /v1/backups/{id}/shares/{i}` removes a share the
//!   placement no longer gives to this site
//! - `GET  /v1/backups/{id}/shares/{i}/chunks?from=&to=` → frames (restore)
//! - `POST /v1/backups/{id}/shares/{i}/receipts` — [`Receipts`](share_transfer::wire::Receipts)
//!   → [`Acknowledged`](share_transfer::wire::Acknowledged)
//! - `GET  /v1/backups`, `GET /v1/backups/{id}` → [`Manifest`]s
//! - `PUT  /v1/sets/{name}` — [`SetManifest`](share_transfer::wire::SetManifest), the
//!   caller's sample set, replaced; `GET /v1/sets` → the sets the caller may read (`sets`)
//! - `POST /v1/backups/{id}/verify` → [`ShareCheck`](share_transfer::wire::ShareCheck)s
//! - `…/shares/{i}/renewal[/{renewal}[/chunks|/prepare|/commit]]` — share renewal, staged
//!   and committed in steps (`renewal`; the files in [`staging`])
//!
//! On the operator's plain-HTTP listener (`metrics_listen`, off unless set; see
//! [`jobs`]): `GET /metrics` (Prometheus) and `GET /jobs` (the transfers it sees, for the
//! dashboard).

#![deny(unsafe_code)]

pub mod admission;
#[allow(unsafe_code)] // the aligned direct-I/O buffer; every block carries its SAFETY argument
mod aligned;
pub mod backend;
pub mod config;
mod download;
pub mod jobs;
pub mod ledger;
mod operator;
mod renewal;
mod sets;
pub mod staging;
pub mod storage;
mod upload;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use uuid::Uuid;

use crate::admission::{Gate, Refused};
use crate::config::AgentConfig;
use crate::ledger::Ledger;
use mtls::server::PeerCert;
use share_transfer::keys::{KeyError, KeyFetcher, Notice};
use share_transfer::wire::{
    AgentError, Finalize, Manifest, PlacementUpdate, ShareOpen, ShareState,
};
use storage::{Storage, StoreError};

/// An error reply of the agent.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.0.as_u16(), self.1)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.0
    }
    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.0).json(AgentError {
            message: self.1.clone(),
        })
    }
}

fn bad(m: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, m.into())
}

impl ApiError {
    /// A request past an admission bound: 429, the bound named.
    fn refused(e: Refused) -> Self {
        ApiError(StatusCode::TOO_MANY_REQUESTS, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::NotFound { .. } | StoreError::Missing { .. } => StatusCode::NOT_FOUND,
            StoreError::Conflict { .. } | StoreError::Complete { .. } | StoreError::Renewal(_) => {
                StatusCode::CONFLICT
            }
            StoreError::NotOwner { .. } => StatusCode::FORBIDDEN,
            StoreError::Finalize(_) => StatusCode::BAD_REQUEST,
            StoreError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            StoreError::Damaged { .. } | StoreError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            // The object store is down or refusing: the client retries later.
            StoreError::Backend { .. } => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(code, e.to_string())
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> Self {
        let code = match e {
            // The frames named one key twice: the request is at fault, not the KME.
            KeyError::Duplicate { .. } => StatusCode::BAD_REQUEST,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError(code, e.to_string())
    }
}

/// Per-caller facts learnt from the KME: is the caller at this site, and the KME's limits.
#[derive(Clone)]
struct Peer {
    local: bool,
    status: etsi_spec::Status,
}

/// The agent's shared state.
pub struct Agent {
    cfg: AgentConfig,
    storage: Storage,
    keys: KeyFetcher,
    peers: Mutex<HashMap<String, Peer>>,
    uploads: Arc<Gate>,
    downloads: Arc<Gate>,
    ledger: Ledger,
    jobs: jobs::Jobs,
    set_names: sets::SetNames,
}

type Shared = web::Data<Arc<Agent>>;

impl Agent {
    pub fn new(cfg: AgentConfig) -> anyhow::Result<Self> {
        let ca = std::fs::read(&cfg.tls.ca)?;
        let ident = etsi_spec::Identity::from_files(&cfg.tls.cert, &cfg.tls.key)?;
        let client = etsi_spec::Client::new(&cfg.kme_url, &ca, Some(&ident))?;
        let keys = KeyFetcher::new(
            client,
            &cfg.kme_url,
            Duration::from_secs(cfg.key_wait_secs),
            Arc::new(Notice::default()),
        );
        if let Some(f) = cfg.failpoint {
            storage::arm_failpoint(f);
        }
        let l = &cfg.limits;
        let storage = match (&cfg.s3, &cfg.store_dir) {
            (Some(s3), _) => {
                let b = backend::s3::S3Backend::new(s3)?;
                b.check()?;
                Storage::with_backend(Box::new(b))
            }
            (None, Some(dir)) => Storage::new(dir, cfg.direct_io)?,
            (None, None) => anyhow::bail!("no store_dir and no [s3]: nowhere to keep shares"),
        };
        let finished = storage.recover_renewals()?;
        if finished > 0 {
            tracing::info!(
                shares = finished,
                "finished share renewals committed before a restart"
            );
        }
        Ok(Agent {
            storage,
            uploads: Gate::new("upload", l.max_uploads_per_client, l.max_uploads),
            downloads: Gate::new("download", l.max_downloads_per_client, l.max_downloads),
            ledger: Ledger::new(
                l.max_unfetched_key_bytes_per_client,
                Duration::from_secs(l.unfetched_key_ttl_secs),
            ),
            cfg,
            keys,
            peers: Mutex::new(HashMap::new()),
            jobs: jobs::Jobs::default(),
            set_names: sets::SetNames::default(),
        })
    }

    /// A request past an admission bound: counted, then 429 with the bound named.
    fn refused(&self, e: Refused) -> ApiError {
        self.jobs.failed(jobs::Failure::Refused);
        ApiError::refused(e)
    }

    fn caller(&self, req: &HttpRequest) -> Result<String, ApiError> {
        let cn = req
            .conn_data::<PeerCert>()
            .and_then(|c| c.cn.clone())
            .ok_or_else(|| {
                ApiError(
                    StatusCode::UNAUTHORIZED,
                    "a client certificate of the network's CA is required".into(),
                )
            })?;
        if !self.cfg.allowed_clients.is_empty() && !self.cfg.allowed_clients.contains(&cn) {
            return Err(ApiError(
                StatusCode::FORBIDDEN,
                format!("SAE {cn} may not use this agent"),
            ));
        }
        Ok(cn)
    }

    /// Whether `caller` may read a share: its owner; the readers the owner named (by
    /// default the clients of the owner's own site, i.e. SAEs of the owner's KME); and the
    /// operator's disaster-recovery clients (`recovery_clients`).
    async fn may_read(&self, caller: &str, m: &Manifest) -> bool {
        self.may_read_of(caller, &m.client_sae, m.open.readers.as_deref())
            .await
    }

    /// Whether `caller` may read what `owner` stored, naming `readers` (None: the owner's
    /// site's clients).
    async fn may_read_of(&self, caller: &str, owner: &str, readers: Option<&[String]>) -> bool {
        if owner == caller || self.cfg.recovery_clients.iter().any(|c| c == caller) {
            return true;
        }
        match readers {
            Some(readers) => readers.iter().any(|r| r == caller),
            None => self.same_site(caller, owner).await,
        }
    }

    /// Whether SAEs `a` and `b` are served by one KME (as this site's KME sees them).
    async fn same_site(&self, a: &str, b: &str) -> bool {
        match (self.peer(a).await, self.peer(b).await) {
            (Ok(pa), Ok(pb)) => pa.status.target_KME_ID == pb.status.target_KME_ID,
            _ => false,
        }
    }

    /// The manifests among `all` that `caller` may read.
    async fn readable<T>(&self, caller: &str, all: Vec<T>, m: impl Fn(&T) -> Manifest) -> Vec<T> {
        let mut out = Vec::new();
        for x in all {
            if self.may_read(caller, &m(&x)).await {
                out.push(x);
            }
        }
        out
    }

    /// Share `i` of backup `id`, if `caller` may read it (404 otherwise, as if absent).
    async fn readable_share(
        &self,
        caller: &str,
        id: Uuid,
        i: u8,
    ) -> Result<Arc<storage::ShareFiles>, ApiError> {
        let share = self.storage.get(id, i)?;
        match share {
            Some(s) if self.may_read(caller, &s.manifest()).await => Ok(s),
            _ => Err(StoreError::NotFound { id, index: i }.into()),
        }
    }

    /// Share `i` of backup `id`, if `caller` stored it (only the owner writes a share).
    fn owned_share(
        &self,
        caller: &str,
        id: Uuid,
        i: u8,
    ) -> Result<(Arc<storage::ShareFiles>, Manifest), ApiError> {
        let share = self
            .storage
            .get(id, i)?
            .ok_or(StoreError::NotFound { id, index: i })?;
        let m = share.manifest();
        if m.client_sae != caller {
            return Err(StoreError::NotOwner {
                id,
                index: i,
                owner: m.client_sae,
                caller: caller.to_owned(),
            }
            .into());
        }
        Ok((share, m))
    }

    /// Every share of backup `id` held here, read on a blocking thread (an object store
    /// is asked over the network).
    async fn shares_of(
        self: &Arc<Self>,
        id: Uuid,
    ) -> Result<Vec<Arc<storage::ShareFiles>>, ApiError> {
        let agent = self.clone();
        web::block(move || agent.storage.shares_of(id))
            .await
            .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
            .map_err(ApiError::from)
    }

    /// Whether `sae` is at this site, and the KME limits for the pair, from the KME.
    async fn peer(&self, sae: &str) -> Result<Peer, ApiError> {
        if let Some(p) = self.peers.lock().ok().and_then(|m| m.get(sae).cloned()) {
            return Ok(p);
        }
        let status = self.keys.status(sae).await.map_err(|e| {
            ApiError(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("no QKD keys between this site and {sae}: {e}"),
            )
        })?;
        let p = Peer {
            local: status.source_KME_ID == status.target_KME_ID,
            status,
        };
        if let Ok(mut m) = self.peers.lock() {
            m.insert(sae.to_owned(), p.clone());
        }
        Ok(p)
    }
}

/// Runs the agent until the process ends.
pub async fn serve(cfg: AgentConfig) -> anyhow::Result<()> {
    let acceptor = mtls::server::acceptor(&cfg.tls.ca, &cfg.tls.cert, &cfg.tls.key)?;
    let listen = cfg.listen;
    let workers = if cfg.workers == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        cfg.workers
    };
    let agent = Arc::new(Agent::new(cfg)?);
    if let Some(addr) = agent.cfg.metrics_listen {
        operator::serve(agent.clone(), addr)?;
    }
    let data = web::Data::new(agent.clone());
    tracing::info!(sae = %agent.cfg.sae_id, %listen, store = %agent.storage.backend().describe(), "site agent serving");
    actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(data.clone())
            // Chunk bodies are read as a stream, frame by frame (see `upload`); this bounds
            // the JSON bodies, which are small.
            .app_data(web::JsonConfig::default().limit(16 << 20))
            .configure(routes)
    })
    .workers(workers)
    .on_connect(mtls::server::on_connect)
    .bind_openssl(listen, acceptor)?
    .run()
    .await?;
    Ok(())
}

fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/sets", web::get().to(sets::list))
        .route("/v1/sets/{name}", web::put().to(sets::put))
        .route("/v1/backups", web::get().to(list))
        .route("/v1/backups/{id}", web::get().to(list_one))
        .route("/v1/backups/{id}/verify", web::post().to(verify))
        .route("/v1/backups/{id}/shares/{i}", web::put().to(open_share))
        .route("/v1/backups/{id}/shares/{i}/state", web::get().to(state))
        .route(
            "/v1/backups/{id}/shares/{i}/chunks",
            web::post().to(upload::upload),
        )
        .route(
            "/v1/backups/{id}/shares/{i}/chunks",
            web::get().to(download::download),
        )
        .route(
            "/v1/backups/{id}/shares/{i}/receipts",
            web::post().to(download::receipts),
        )
        .route(
            "/v1/backups/{id}/shares/{i}/finalize",
            web::post().to(finalize),
        )
        .route(
            "/v1/backups/{id}/shares/{i}/placement",
            web::put().to(set_placement),
        )
        .route(
            "/v1/backups/{id}/shares/{i}",
            web::delete().to(remove_share),
        )
        .route(
            "/v1/backups/{id}/shares/{i}/renewal",
            web::get().to(renewal::status),
        )
        .route(
            "/v1/backups/{id}/shares/{i}/renewal/{renewal}",
            web::put().to(renewal::begin),
        )
        .route(
            "/v1/backups/{id}/shares/{i}/renewal/{renewal}",
            web::delete().to(renewal::abort),
        )
        .route(
            "/v1/backups/{id}/shares/{i}/renewal/{renewal}/chunks",
            web::post().to(renewal::chunks),
        )
        .route(
            "/v1/backups/{id}/shares/{i}/renewal/{renewal}/prepare",
            web::post().to(renewal::prepare),
        )
        .route(
            "/v1/backups/{id}/shares/{i}/renewal/{renewal}/commit",
            web::post().to(renewal::commit),
        )
        .default_service(web::to(|req: HttpRequest| async move {
            Err::<HttpResponse, _>(ApiError(
                StatusCode::NOT_FOUND,
                format!("no such resource: {} {}", req.method(), req.path()),
            ))
        }));
}

fn backup_id(s: &str) -> Result<Uuid, ApiError> {
    Uuid::try_parse(s).map_err(|_| bad(format!("{s:?} is not a backup ID")))
}

fn ids(path: &(String, u8)) -> Result<(Uuid, u8), ApiError> {
    Ok((backup_id(&path.0)?, path.1))
}

async fn list(req: HttpRequest, a: Shared) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let agent = a.get_ref().clone();
    let all = web::block(move || agent.storage.list())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    let mine = a.readable(&caller, all, Manifest::clone).await;
    Ok(HttpResponse::Ok().json(mine))
}

async fn list_one(
    req: HttpRequest,
    a: Shared,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let id = backup_id(&path)?;
    let all = a
        .shares_of(id)
        .await?
        .iter()
        .map(|s| s.manifest())
        .collect();
    let m = a.readable(&caller, all, Manifest::clone).await;
    Ok(HttpResponse::Ok().json(m))
}

async fn verify(
    req: HttpRequest,
    a: Shared,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let id = backup_id(&path)?;
    let shares = a
        .readable(&caller, a.shares_of(id).await?, |s| s.manifest())
        .await;
    let checks = web::block(move || {
        shares
            .iter()
            .map(|s| s.check())
            .collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(HttpResponse::Ok().json(checks))
}

async fn open_share(
    req: HttpRequest,
    a: Shared,
    path: web::Path<(String, u8)>,
    body: web::Json<ShareOpen>,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let (id, i) = ids(&path)?;
    let scheme = body.scheme.scheme().map_err(|e| bad(e.to_string()))?;
    if i >= scheme.n() {
        return Err(bad(format!(
            "share index {i} out of range for n = {}",
            scheme.n()
        )));
    }
    scheme
        .check_chunk_size(body.chunk_size as usize)
        .map_err(|e| bad(e.to_string()))?;
    if body.original_len > 1 << 50 || body.chunk_count > 1 << 32 {
        return Err(bad(
            "original_len or chunk_count is beyond what this agent stores",
        ));
    }
    if body.original_len.div_ceil(u64::from(body.chunk_size)) != body.chunk_count {
        return Err(bad(
            "chunk_count does not match original_len and chunk_size",
        ));
    }
    let agent = a.get_ref().clone();
    let share = web::block(move || agent.storage.create(id, i, &body, &caller))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(HttpResponse::Ok().json(share.manifest()))
}

async fn state(
    req: HttpRequest,
    a: Shared,
    path: web::Path<(String, u8)>,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let (id, i) = ids(&path)?;
    let s = a.readable_share(&caller, id, i).await?;
    Ok(HttpResponse::Ok().json(ShareState {
        chunks: s.state(),
        complete: s.manifest().complete,
    }))
}

async fn set_placement(
    req: HttpRequest,
    a: Shared,
    path: web::Path<(String, u8)>,
    body: web::Json<PlacementUpdate>,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let (id, i) = ids(&path)?;
    let (s, _) = a.owned_share(&caller, id, i)?;
    let m = web::block(move || s.set_placement(&body.placement, body.placement_version))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    tracing::info!(backup = %id, share = i, version = m.open.placement_version, "placement updated");
    Ok(HttpResponse::Ok().json(m))
}

/// Removes a share the backup's placement no longer gives to this site (it moved).
async fn remove_share(
    req: HttpRequest,
    a: Shared,
    path: web::Path<(String, u8)>,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let (id, i) = ids(&path)?;
    let (_, m) = a.owned_share(&caller, id, i)?;
    if m.open.placement.get(usize::from(i)) == Some(&a.cfg.sae_id) || m.open.placement.is_empty() {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!(
                "share {i} of backup {id} belongs at this site by the backup's placement: it is                  removed only after it moved elsewhere"
            ),
        ));
    }
    let store = a.clone();
    web::block(move || store.storage.remove(id, i))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    tracing::info!(backup = %id, share = i, "share removed: it moved to another site");
    Ok(HttpResponse::Ok().json(m))
}

async fn finalize(
    req: HttpRequest,
    a: Shared,
    path: web::Path<(String, u8)>,
    body: web::Json<Finalize>,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let (id, i) = ids(&path)?;
    let (s, _) = a.owned_share(&caller, id, i)?;
    let h = hex::decode(&body.header_hex).map_err(|_| bad("header_hex is not hex"))?;
    let t = hex::decode(&body.trailer_hex).map_err(|_| bad("trailer_hex is not hex"))?;
    let splits = body.splits.clone();
    let m = web::block(move || s.finalize(&h, &t, &splits))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    tracing::info!(backup = %id, share = i, "share complete");
    Ok(HttpResponse::Ok().json(m))
}
