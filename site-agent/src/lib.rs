//! `site-agent`: the backup site agent (`backup-client serve`), which receives, keeps and
//! returns shares.
//!
//! Owns: the agent's HTTP server, its configuration ([`config`]) and its durable share store
//! ([`storage`]). Shares the frame format, sealing and key plans with the client through
//! `share-transfer`; takes its mTLS acceptor from `mtls`.
//!
//! Must never depend on: `kms-server` (the site's KME is any ETSI 014 KME, reached over
//! HTTPS), or the backup client's crate.
//!
//! Modules: this one (the HTTP handlers and [`Agent`]), [`config`] (`AgentConfig`),
//! [`storage`] (share files, chunk logs, O_DIRECT writes, finalisation and checks; its
//! doc has the on-disk layout) and `aligned` ([`storage::AlignedBuf`], the direct-I/O
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
//! - `GET  /v1/backups/{id}/shares/{i}/chunks?from=&to=` → frames (restore)
//! - `GET  /v1/backups`, `GET /v1/backups/{id}` → [`Manifest`]s
//! - `POST /v1/backups/{id}/verify` → [`ShareCheck`](share_transfer::wire::ShareCheck)s

#![deny(unsafe_code)]

#[allow(unsafe_code)] // the aligned direct-I/O buffer; every block carries its SAFETY argument
mod aligned;
pub mod config;
pub mod storage;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, ResponseError};
use futures_util::StreamExt;
use uuid::Uuid;

use crate::config::AgentConfig;
use mtls::server::PeerCert;
use share_transfer::keys::{KeyError, KeyFetcher, KeyPlan, Notice};
use share_transfer::seal::{open_into, seal_into};
use share_transfer::wire::{
    mac_context, parse_frame, AgentError, Direction, Finalize, FrameHeader, Manifest, ShareOpen,
    ShareState, Stored,
};
use storage::{AlignedBuf, ChunkWrite, Storage, StoreError};

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

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let code = match &e {
            StoreError::NotFound { .. } | StoreError::Missing { .. } => StatusCode::NOT_FOUND,
            StoreError::Conflict { .. } | StoreError::Complete { .. } => StatusCode::CONFLICT,
            StoreError::NotOwner { .. } => StatusCode::FORBIDDEN,
            StoreError::Finalize(_) => StatusCode::BAD_REQUEST,
            StoreError::Busy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            StoreError::Damaged { .. } | StoreError::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
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
        Ok(Agent {
            storage: Storage::new(&cfg.store_dir, cfg.direct_io)?,
            cfg,
            keys,
            peers: Mutex::new(HashMap::new()),
        })
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

    /// Whether `caller` may read a share: its owner always; other SAEs only when the
    /// configuration lists them (`allowed_clients`, checked in [`Agent::caller`]), e.g. for
    /// a restore at another site after a disaster.
    fn may_read(&self, caller: &str, m: &Manifest) -> bool {
        m.client_sae == caller || !self.cfg.allowed_clients.is_empty()
    }

    /// Share `i` of backup `id`, if `caller` may read it (404 otherwise, as if absent).
    fn readable_share(
        &self,
        caller: &str,
        id: Uuid,
        i: u8,
    ) -> Result<Arc<storage::ShareFiles>, ApiError> {
        Ok(self
            .storage
            .get(id, i)?
            .filter(|s| self.may_read(caller, &s.manifest()))
            .ok_or(StoreError::NotFound { id, index: i })?)
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
    let data = web::Data::new(agent.clone());
    tracing::info!(sae = %agent.cfg.sae_id, %listen, store = %agent.cfg.store_dir.display(), "site agent serving");
    actix_web::HttpServer::new(move || {
        actix_web::App::new()
            .app_data(data.clone())
            .app_data(web::PayloadConfig::new(1 << 30))
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
    cfg.route("/v1/backups", web::get().to(list))
        .route("/v1/backups/{id}", web::get().to(list_one))
        .route("/v1/backups/{id}/verify", web::post().to(verify))
        .route("/v1/backups/{id}/shares/{i}", web::put().to(open_share))
        .route("/v1/backups/{id}/shares/{i}/state", web::get().to(state))
        .route("/v1/backups/{id}/shares/{i}/chunks", web::post().to(upload))
        .route(
            "/v1/backups/{id}/shares/{i}/chunks",
            web::get().to(download),
        )
        .route(
            "/v1/backups/{id}/shares/{i}/finalize",
            web::post().to(finalize),
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

async fn read_all(mut payload: web::Payload, limit: usize) -> Result<web::BytesMut, ApiError> {
    let mut body = web::BytesMut::new();
    while let Some(c) = payload.next().await {
        let c = c.map_err(|e| bad(format!("reading the body: {e}")))?;
        if body.len() + c.len() > limit {
            return Err(bad(format!("body exceeds {limit} bytes")));
        }
        body.extend_from_slice(&c);
    }
    Ok(body)
}

async fn list(req: HttpRequest, a: Shared) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let mine: Vec<Manifest> = a
        .storage
        .list()?
        .into_iter()
        .filter(|m| a.may_read(&caller, m))
        .collect();
    Ok(HttpResponse::Ok().json(mine))
}

async fn list_one(
    req: HttpRequest,
    a: Shared,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let id = backup_id(&path)?;
    let m: Vec<Manifest> = a
        .storage
        .shares_of(id)?
        .iter()
        .map(|s| s.manifest())
        .filter(|m| a.may_read(&caller, m))
        .collect();
    Ok(HttpResponse::Ok().json(m))
}

async fn verify(
    req: HttpRequest,
    a: Shared,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let id = backup_id(&path)?;
    let shares: Vec<_> = a
        .storage
        .shares_of(id)?
        .into_iter()
        .filter(|s| a.may_read(&caller, &s.manifest()))
        .collect();
    let checks = web::block(move || shares.iter().map(|s| s.check()).collect::<Vec<_>>())
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
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
    let share = a.storage.create(id, i, &body, &caller)?;
    Ok(HttpResponse::Ok().json(share.manifest()))
}

async fn state(
    req: HttpRequest,
    a: Shared,
    path: web::Path<(String, u8)>,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let (id, i) = ids(&path)?;
    let s = a.readable_share(&caller, id, i)?;
    Ok(HttpResponse::Ok().json(ShareState {
        chunks: s.state(),
        complete: s.manifest().complete,
    }))
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

async fn upload(
    req: HttpRequest,
    a: Shared,
    path: web::Path<(String, u8)>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let (id, i) = ids(&path)?;
    let (share, m) = a.owned_share(&caller, id, i)?;
    let cs = m.open.chunk_size as usize;
    let body = read_all(payload, (64 * cs).min(256 << 20) + (1 << 20)).await?;
    // Parse every frame first: the whole request is accepted or refused.
    let mut frames = Vec::new();
    let mut pos = 0;
    while pos < body.len() {
        let (f, used) = parse_frame(&body[pos..], cs)
            .map_err(|e| bad(format!("frame at byte {pos}: {e}")))?
            .ok_or_else(|| bad(format!("frame at byte {pos} is truncated")))?;
        if f.header.error.is_some() || f.payload.len() != cs || f.header.chunk >= m.open.chunk_count
        {
            return Err(bad(format!(
                "chunk {}: bad frame for this share",
                f.header.chunk
            )));
        }
        frames.push(f);
        pos += used;
    }
    let peer = a.peer(&caller).await?;
    let key_ids: Vec<&[Uuid]> = frames.iter().map(|f| &f.header.key_ids[..]).collect();
    let keys = a
        .keys
        .fetch_chunks(&caller, &key_ids, peer.status.max_key_per_request as usize)
        .await?;
    let ctx = mac_context(id, i, Direction::Store);
    let mut writes = Vec::with_capacity(frames.len());
    for (f, ck) in frames.iter().zip(&keys) {
        let mut buf = AlignedBuf::new(cs);
        open_into(f, &ctx, ck, !peer.local, &mut buf).map_err(|e| {
            tracing::warn!(backup = %id, share = i, error = %e, "rejected a chunk");
            bad(e.to_string())
        })?;
        writes.push(ChunkWrite {
            chunk: f.header.chunk,
            nonce: f.header.nonce,
            data: buf,
            key_ids: f.header.key_ids.clone(),
        });
    }
    let stored: Vec<u64> = writes.iter().map(|w| w.chunk).collect();
    let s2 = share.clone();
    web::block(move || s2.write_chunks(&writes))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
    Ok(HttpResponse::Ok().json(Stored { stored }))
}

#[derive(serde::Deserialize)]
struct Range {
    from: Option<u64>,
    to: Option<u64>,
}

async fn download(
    req: HttpRequest,
    a: Shared,
    path: web::Path<(String, u8)>,
    range: web::Query<Range>,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let (id, i) = ids(&path)?;
    let share = a.readable_share(&caller, id, i)?;
    let m = share.manifest();
    if !m.complete {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("share {i} of backup {id} is incomplete"),
        ));
    }
    let peer = a.peer(&caller).await?;
    let cs = m.open.chunk_size as usize;
    let plan = KeyPlan::new(&a.cfg.kme_url, cs, !peer.local, &peer.status)?;
    let from = range.from.unwrap_or(0);
    let to = range
        .to
        .unwrap_or(m.open.chunk_count)
        .min(m.open.chunk_count);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<web::Bytes, std::io::Error>>(4);
    let served = ServedShare {
        agent: a.get_ref().clone(),
        share,
        caller,
        plan,
        id,
        i,
        cs,
    };
    actix_web::rt::spawn(served.stream(from, to, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .streaming(stream))
}

type FrameTx = tokio::sync::mpsc::Sender<Result<web::Bytes, std::io::Error>>;

/// One share being streamed back to a restoring client, sealed chunk by chunk.
struct ServedShare {
    agent: Arc<Agent>,
    share: Arc<storage::ShareFiles>,
    caller: String,
    plan: KeyPlan,
    id: Uuid,
    i: u8,
    cs: usize,
}

impl ServedShare {
    /// Sends chunks `from..to` as frames, in batches that share one key request; a chunk
    /// that cannot be served ends the stream with an error frame.
    async fn stream(self, from: u64, to: u64, tx: FrameTx) {
        let (id, i, cs) = (self.id, self.i, self.cs);
        let ctx = mac_context(id, i, Direction::Restore);
        let batch = self.plan.chunks_per_request().clamp(1, 4) as u64;
        let mut j = from;
        let mut buf = vec![0u8; cs];
        let nonce_of: HashMap<u64, u64> = self.share.state().into_iter().collect();
        while j < to {
            let n = batch.min(to - j);
            let keys = match self
                .agent
                .keys
                .take(&self.caller, &self.plan, n as usize)
                .await
            {
                Ok(k) => k,
                Err(e) => {
                    let _ = tx.send(Ok(error_frame(j, &e.to_string()))).await;
                    return;
                }
            };
            let mut out = Vec::with_capacity((cs + 512) * n as usize);
            for (ck, chunk) in keys.iter().zip(j..j + n) {
                if let Err(e) = self.read_chunk(chunk, &mut buf).await {
                    tracing::warn!(backup = %id, share = i, chunk, error = %e, "cannot serve chunk");
                    if !out.is_empty() {
                        let _ = tx.send(Ok(web::Bytes::from(out))).await;
                    }
                    let _ = tx.send(Ok(error_frame(chunk, &e))).await;
                    return;
                }
                let header = FrameHeader {
                    chunk,
                    nonce: nonce_of.get(&chunk).copied().unwrap_or(0),
                    key_ids: ck.ids.clone(),
                    pad: self.plan.pad_bytes > 0,
                    len: cs as u32,
                    error: None,
                };
                if let Err(e) = seal_into(&mut out, &ctx, &header, &buf, ck) {
                    let _ = tx.send(Ok(error_frame(chunk, &e.to_string()))).await;
                    return;
                }
            }
            if tx.send(Ok(web::Bytes::from(out))).await.is_err() {
                return; // client went away; the keys taken are dropped (wiped), never reused
            }
            j += n;
        }
    }

    /// Reads chunk `chunk` into `buf` on the blocking pool (`buf` is moved there and back).
    async fn read_chunk(&self, chunk: u64, buf: &mut Vec<u8>) -> Result<(), String> {
        let s2 = self.share.clone();
        let mut b = std::mem::take(buf);
        let r = web::block(move || s2.read_chunk(chunk, &mut b).map(|()| b)).await;
        match r {
            Ok(Ok(b)) => {
                *buf = b;
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn error_frame(chunk: u64, message: &str) -> web::Bytes {
    let header = FrameHeader {
        chunk,
        nonce: 0,
        key_ids: Vec::new(),
        pad: false,
        len: 0,
        error: Some(message.to_owned()),
    };
    let mut out = Vec::new();
    share_transfer::wire::begin_frame(&mut out, &header);
    web::Bytes::from(out)
}
