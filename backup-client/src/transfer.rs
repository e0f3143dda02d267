//! The client's side of a backup: store, restore, list and verify across the sites.
//!
//! Store: the file is read chunk by chunk, hashed and split into `n` share chunks; each share
//! goes to its site through `streams` concurrent uploaders per site, which take fresh QKD
//! keys for every chunk (as master, naming the site's agent as slave), pad and tag it, and
//! send batches of frames. A chunk counts only when the agent has acknowledged it (durably
//! stored). Finally every site gets the share's header and trailer (length, digest).
//!
//! Resume: an interrupted store is recorded under `state_dir`; re-running the same command
//! with the same file reuses the backup ID, asks each site which chunks it holds (and from
//! which split), and re-splits and sends only the chunks that are not complete everywhere,
//! with fresh randomness and fresh keys (a key is never used for two chunks).
//!
//! Restore: any `k` reachable shares are streamed back in parallel (this site's own share
//! first), each chunk verified and unpadded, combined and written to a temporary file that is
//! renamed over the output only after the whole-file digest matched. A share that fails
//! (site down, damaged chunk, bad tag) is replaced by another from the chunk where it failed.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::config::{ClientConfig, Site};
use share_transfer::keys::{assemble, KeyError, KeyFetcher, KeyPlan, Notice};
use share_transfer::seal::{open_into, seal_into, SealError};
use share_transfer::wire::{
    mac_context, parse_frame, AgentError, Direction, Finalize, FrameHeader, Manifest, SchemeInfo,
    SchemeName, ShareCheck, ShareOpen, ShareState, Stored,
};
use sharing::format::{ShareHeader, ShareTrailer, HEADER_LEN, TRAILER_LEN};
use sharing::sharing::{Combiner, SharingError, Splitter};
use sharing::{RandomSource, Scheme};

/// What can go wrong in a client command. Messages say what to do.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("{0}")]
    Usage(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("site {site}: {message}")]
    Site { site: String, message: String },
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Sharing(#[from] SharingError),
    #[error("{0}")]
    Failed(String),
    /// The store must start again as a new backup (said why).
    #[error("{0}")]
    Restart(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TransferError + '_ {
    move |source| TransferError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Progress of a long transfer; drawn by the CLI.
#[derive(Default)]
pub struct Progress {
    pub total: AtomicU64,
    pub done: AtomicU64,
    pub notice: Arc<Notice>,
}

/// Options of `store`.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub k: u8,
    pub n: u8,
    pub scheme: SchemeName,
    pub chunk_size: usize,
    pub allow_degraded: bool,
}

/// One share's fate in a store.
#[derive(Debug, Clone, Serialize)]
pub struct ShareReport {
    pub share_index: u8,
    pub site: String,
    pub stored: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Result of `store`.
#[derive(Debug, Clone, Serialize)]
pub struct StoreReport {
    pub backup_id: Uuid,
    pub name: String,
    pub bytes: u64,
    pub seconds: f64,
    pub resumed: bool,
    pub chunks_sent: u64,
    pub shares: Vec<ShareReport>,
}

/// Result of `restore`.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub backup_id: Uuid,
    pub output: PathBuf,
    pub bytes: u64,
    pub seconds: f64,
    pub resumed_at_chunk: u64,
    /// `(site, share index)` of the shares used.
    pub used: Vec<(String, u8)>,
    /// Shares that could not be used, and why.
    pub rejected: Vec<(String, u8, String)>,
}

/// One backup as found at the sites.
#[derive(Debug, Clone, Serialize)]
pub struct BackupEntry {
    pub backup_id: Uuid,
    pub name: String,
    pub bytes: u64,
    pub created: u64,
    pub scheme: SchemeInfo,
    /// `(share index, site, complete)`.
    pub shares: Vec<(u8, String, bool)>,
}

/// Result of `verify` for one site.
#[derive(Debug, Clone, Serialize)]
pub struct SiteCheck {
    pub site: String,
    pub shares: Vec<ShareCheck>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// State of an interrupted store, kept under `state_dir`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
struct PendingStore {
    backup_id: Uuid,
    path: PathBuf,
    size: u64,
    mtime_ns: u128,
    scheme: SchemeInfo,
    chunk_size: usize,
    created: u64,
}

/// A chunk of one share on its way to its site.
struct Job {
    chunk: u64,
    nonce: u64,
    data: Vec<u8>,
}

/// The backup client.
pub struct BackupClient {
    pub cfg: ClientConfig,
    http: reqwest::Client,
    keys: Arc<KeyFetcher>,
    pub progress: Arc<Progress>,
}

/// A chunk size near 1 MiB valid for `scheme` and aligned for direct I/O.
pub fn default_chunk_size(scheme: &Scheme) -> usize {
    let p = scheme.pieces_per_chunk();
    let unit = lcm(4096, p);
    ((1 << 20) / unit).max(1) * unit
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

fn lcm(a: usize, b: usize) -> usize {
    a / gcd(a, b) * b
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl BackupClient {
    pub fn new(cfg: ClientConfig) -> Result<Self, TransferError> {
        let read = |p: &Path| fs::read(p).map_err(io_err(p));
        let ca_pem = read(&cfg.tls.ca)?;
        let ident = etsi_spec::Identity {
            cert_pem: read(&cfg.tls.cert)?,
            key_pem: read(&cfg.tls.key)?,
        };
        let kme = etsi_spec::Client::new(&cfg.kme_url, &ca_pem, Some(&ident))
            .map_err(|e| TransferError::Usage(format!("KME client: {e}")))?;
        let id = mtls::client::ClientIdentity {
            cert_pem: &ident.cert_pem,
            key_pem: &ident.key_pem,
        };
        let http = mtls::client::builder(&ca_pem, Some(id), Duration::from_secs(5))
            .map_err(|e| TransferError::Usage(format!("tls.ca, tls.cert, tls.key: {e}")))?
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| TransferError::Usage(e.to_string()))?;
        let progress = Arc::new(Progress::default());
        let keys = Arc::new(KeyFetcher::new(
            kme,
            &cfg.kme_url,
            cfg.backup.key_wait(),
            progress.notice.clone(),
        ));
        Ok(BackupClient {
            cfg,
            http,
            keys,
            progress,
        })
    }

    fn site_err(site: &Site, message: impl Into<String>) -> TransferError {
        TransferError::Site {
            site: site.name.clone(),
            message: message.into(),
        }
    }

    async fn agent_call<T: serde::de::DeserializeOwned>(
        &self,
        site: &Site,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<T, TransferError> {
        let url = format!("{}{path}", site.agent_url.trim_end_matches('/'));
        let mut rb = self
            .http
            .request(method, &url)
            .timeout(Duration::from_secs(600));
        if let Some(b) = body {
            rb = rb.header("content-type", "application/json").body(b);
        }
        let resp = rb.send().await.map_err(|e| {
            Self::site_err(
                site,
                format!("agent at {} unreachable: {e}", site.agent_url),
            )
        })?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Self::site_err(site, format!("reading reply: {e}")))?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<AgentError>(&bytes)
                .map(|e| e.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(Self::site_err(
                site,
                format!("agent answered {status}: {msg}"),
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| Self::site_err(site, format!("bad reply: {e}")))
    }

    fn pending_path(&self, file: &Path) -> PathBuf {
        let key = blake3::hash(file.as_os_str().as_encoded_bytes()).to_hex();
        self.cfg
            .state_dir
            .join("pending-stores")
            .join(format!("{}.json", &key[..32]))
    }

    /// Stores `file`; returns the backup ID and what happened at each site.
    pub async fn store(
        &self,
        file: &Path,
        opts: &StoreOptions,
    ) -> Result<StoreReport, TransferError> {
        let started = Instant::now();
        let scheme_info = SchemeInfo {
            kind: opts.scheme,
            k: opts.k,
            n: opts.n,
        };
        let scheme = scheme_info
            .scheme()
            .map_err(|e| TransferError::Usage(format!("--k/--n/--scheme: {e}")))?;
        let chunk_size = if opts.chunk_size == 0 {
            default_chunk_size(&scheme)
        } else {
            opts.chunk_size
        };
        scheme
            .check_chunk_size(chunk_size)
            .map_err(|e| TransferError::Usage(format!("chunk size: {e}")))?;
        if chunk_size < sharing::format::MIN_STREAM_CHUNK_SIZE {
            return Err(TransferError::Usage(format!(
                "chunk size must be at least {} bytes",
                sharing::format::MIN_STREAM_CHUNK_SIZE
            )));
        }
        let file = fs::canonicalize(file).map_err(io_err(file))?;
        let meta = fs::metadata(&file).map_err(io_err(&file))?;
        if !meta.is_file() {
            return Err(TransferError::Usage(format!(
                "{} is not a regular file",
                file.display()
            )));
        }
        let size = meta.len();
        let mtime_ns = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        let placement: Vec<Site> = self
            .cfg
            .placement()
            .into_iter()
            .take(opts.n as usize)
            .collect();
        if placement.len() < opts.n as usize {
            return Err(TransferError::Usage(format!(
                "n = {} shares need {} sites, the configuration names {}",
                opts.n,
                opts.n,
                placement.len()
            )));
        }
        // Resume an interrupted store of the same file with the same parameters.
        let pending_path = self.pending_path(&file);
        let mut pending = PendingStore {
            backup_id: Uuid::new_v4(),
            path: file.clone(),
            size,
            mtime_ns,
            scheme: scheme_info,
            chunk_size,
            created: now_secs(),
        };
        let mut resumed = false;
        if let Ok(text) = fs::read(&pending_path) {
            if let Ok(old) = serde_json::from_slice::<PendingStore>(&text) {
                if old.path == pending.path
                    && old.size == size
                    && old.mtime_ns == mtime_ns
                    && old.scheme == scheme_info
                    && old.chunk_size == chunk_size
                {
                    pending = old;
                    resumed = true;
                }
            }
        }
        let id = pending.backup_id;
        if let Some(dir) = pending_path.parent() {
            fs::create_dir_all(dir).map_err(io_err(dir))?;
        }
        // One store of a file at a time: two would interleave different splits.
        let _lock = lock_exclusive(&with_suffix(&pending_path, ".lock")).map_err(|_| {
            TransferError::Usage(format!(
                "another store of {} is running; wait for it to finish",
                file.display()
            ))
        })?;
        write_atomic(
            &pending_path,
            &serde_json::to_vec_pretty(&pending).unwrap_or_default(),
        )?;

        let chunk_count = size.div_ceil(chunk_size as u64);
        let open = ShareOpen {
            scheme: scheme_info,
            chunk_size: chunk_size as u32,
            chunk_count,
            original_len: size,
            name: file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            created: pending.created,
        };
        let open_body = serde_json::to_vec(&open).unwrap_or_default();

        // Open the share at each site and learn what it already holds.
        let mut reports: Vec<ShareReport> = Vec::new();
        let mut alive: Vec<(u8, Site, HashMap<u64, u64>, KeyPlan)> = Vec::new();
        let mut completed_somewhere = false;
        for (i, site) in placement.iter().enumerate() {
            let i = i as u8;
            let r: Result<_, TransferError> = async {
                let _: Manifest = self
                    .agent_call(
                        site,
                        reqwest::Method::PUT,
                        &format!("/v1/backups/{id}/shares/{i}"),
                        Some(open_body.clone()),
                    )
                    .await?;
                let st: ShareState = self
                    .agent_call(
                        site,
                        reqwest::Method::GET,
                        &format!("/v1/backups/{id}/shares/{i}/state"),
                        None,
                    )
                    .await?;
                let status = self.keys.status(&site.agent_sae_id).await?;
                let plan = KeyPlan::new(
                    &self.cfg.kme_url,
                    chunk_size,
                    site.name != self.cfg.site,
                    &status,
                )?;
                Ok((
                    st.chunks.into_iter().collect::<HashMap<u64, u64>>(),
                    plan,
                    st.complete,
                ))
            }
            .await;
            match r {
                Ok((held, plan, complete)) => {
                    completed_somewhere |= complete;
                    reports.push(ShareReport {
                        share_index: i,
                        site: site.name.clone(),
                        stored: false,
                        error: None,
                    });
                    alive.push((i, site.clone(), held, plan));
                }
                Err(e) => reports.push(ShareReport {
                    share_index: i,
                    site: site.name.clone(),
                    stored: false,
                    error: Some(e.to_string()),
                }),
            }
        }
        let down: Vec<String> = reports
            .iter()
            .filter_map(|r| {
                r.error
                    .as_ref()
                    .map(|e| format!("share {} at {}", r.share_index, e))
            })
            .collect();
        if alive.len() < opts.k as usize {
            return Err(TransferError::Failed(format!(
                "only {} of the {} sites can take a share, at least k = {} are needed: {}",
                alive.len(),
                opts.n,
                opts.k,
                down.join("; ")
            )));
        }
        if !down.is_empty() && !opts.allow_degraded {
            return Err(TransferError::Failed(format!(
                "{}; re-run when the site is back, or pass --allow-degraded to store on the {} reachable sites (k = {})",
                down.join("; "),
                alive.len(),
                opts.k
            )));
        }

        // A chunk is done when every site we store on holds it from the same split.
        let done_chunks: HashMap<u64, u64> = (0..chunk_count)
            .filter_map(|j| {
                let mut nonces = alive.iter().map(|(_, _, held, _)| held.get(&j));
                let first = nonces.next().flatten().copied()?;
                nonces.all(|n| n == Some(&first)).then_some((j, first))
            })
            .collect();
        // A share completed by an earlier run cannot take chunks of a new split: if the other
        // shares do not match it everywhere, this backup cannot be finished consistently.
        if completed_somewhere && (done_chunks.len() as u64) < chunk_count {
            let _ = fs::remove_file(&pending_path);
            return Err(TransferError::Restart(format!(
                "an earlier interrupted store of {} left shares of different splits; storing it again as a new backup",
                file.display()
            )));
        }
        self.progress.total.store(size, Ordering::Relaxed);
        self.progress.done.store(0, Ordering::Relaxed);

        // Reader/splitter thread → per-site channels → uploaders.
        let streams = self.cfg.backup.streams;
        let batch = self.cfg.backup.batch_chunks;
        let abort = Arc::new(AtomicBool::new(false));
        let mut senders = Vec::new();
        let mut uploaders = Vec::new();
        let sent = Arc::new(AtomicU64::new(0));
        for (i, site, _, plan) in &alive {
            let (tx, rx) = async_channel::bounded::<Job>(streams * batch);
            senders.push((*i, tx));
            for _ in 0..streams {
                let up = Uploader {
                    http: self.http.clone(),
                    keys: self.keys.clone(),
                    site: site.clone(),
                    share: *i,
                    backup: id,
                    plan: *plan,
                    batch: batch.min(plan.chunks_per_request()).max(1),
                    retries: self.cfg.backup.retries,
                    progress: self.progress.clone(),
                    chunk_size,
                    size,
                    sent: sent.clone(),
                    report_progress: *i == alive[0].0,
                };
                let rx = rx.clone();
                uploaders.push((
                    *i,
                    site.name.clone(),
                    tokio::spawn(async move { up.run(rx).await }),
                ));
            }
        }
        let rng = self
            .cfg
            .backup
            .rng
            .parse::<sharing::rng::RngChoice>()
            .map_err(|e| TransferError::Usage(format!("backup.rng: {e}")))?
            .open()
            .map_err(|e| TransferError::Usage(format!("backup.rng: {e}")))?;
        let reader_abort = abort.clone();
        let reader_file = file.clone();
        let progress = self.progress.clone();
        let reader = tokio::task::spawn_blocking(move || {
            read_and_split(
                &reader_file,
                scheme,
                chunk_size,
                rng,
                &done_chunks,
                senders,
                &reader_abort,
                &progress,
            )
        });
        // Collect uploader outcomes; a failed site either aborts the store or, degraded, is dropped.
        let mut failed: HashMap<u8, String> = HashMap::new();
        let mut first_error = None;
        // In completion order, so that a failed site stops the store at once.
        let mut pending_uploads: futures_util::stream::FuturesUnordered<_> = uploaders
            .into_iter()
            .map(|(i, site_name, h)| async move { (i, site_name, h.await) })
            .collect();
        while let Some((i, site_name, outcome)) = pending_uploads.next().await {
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    failed
                        .entry(i)
                        .or_insert_with(|| format!("{site_name}: {e}"));
                }
                Err(e) => {
                    failed
                        .entry(i)
                        .or_insert_with(|| format!("{site_name}: uploader crashed: {e}"));
                }
            }
            if alive.len() - failed.len() < opts.k as usize
                || (!failed.is_empty() && !opts.allow_degraded)
            {
                abort.store(true, Ordering::Relaxed);
                if first_error.is_none() {
                    first_error = failed.values().next().cloned();
                }
            }
        }
        let split = reader
            .await
            .map_err(|e| TransferError::Failed(format!("reader crashed: {e}")))?;
        if let Some(e) = first_error {
            return Err(TransferError::Failed(format!(
                "store interrupted: {e}; re-run the same command to resume"
            )));
        }
        let (digest, total, nonces) = split?;
        let splits = share_transfer::wire::splits_digest(
            nonces
                .iter()
                .copied()
                .enumerate()
                .map(|(j, n)| (j as u64, n)),
        );
        if total != size {
            return Err(TransferError::Failed(format!(
                "{} changed while it was being stored ({size} bytes before, {total} read); run the store again",
                file.display()
            )));
        }
        // Finalise: header and trailer of every share.
        let trailer = ShareTrailer {
            original_len: size,
            chunk_count,
            digest,
        };
        for (i, site, _, _) in &alive {
            let rep = reports.iter_mut().find(|r| r.share_index == *i);
            if let Some(e) = failed.get(i) {
                if let Some(r) = rep {
                    r.error = Some(e.clone());
                }
                continue;
            }
            let header = ShareHeader {
                scheme,
                index: *i,
                chunk_size,
                set_id: *id.as_bytes(),
            }
            .encode()
            .map_err(|e| TransferError::Failed(e.to_string()))?;
            let body = serde_json::to_vec(&Finalize {
                header_hex: hex::encode(header),
                trailer_hex: hex::encode(trailer.encode(&header)),
                splits: splits.clone(),
            })
            .unwrap_or_default();
            let r: Result<Manifest, _> = self
                .agent_call(
                    site,
                    reqwest::Method::POST,
                    &format!("/v1/backups/{id}/shares/{i}/finalize"),
                    Some(body),
                )
                .await;
            if let Some(rep) = rep {
                match r {
                    Ok(_) => rep.stored = true,
                    Err(e) => rep.error = Some(e.to_string()),
                }
            }
        }
        let stored = reports.iter().filter(|r| r.stored).count();
        if stored < opts.k as usize || (stored < opts.n as usize && !opts.allow_degraded) {
            return Err(TransferError::Failed(format!(
                "only {stored} shares were completed: {}; re-run the same command to resume",
                reports
                    .iter()
                    .filter_map(|r| r.error.clone())
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }
        let _ = fs::remove_file(&pending_path);
        Ok(StoreReport {
            backup_id: id,
            name: open.name,
            bytes: size,
            seconds: started.elapsed().as_secs_f64(),
            resumed,
            chunks_sent: sent.load(Ordering::Relaxed),
            shares: reports,
        })
    }

    /// Every backup found at the reachable sites, and the sites that could not be asked.
    pub async fn list(&self) -> (Vec<BackupEntry>, Vec<(String, String)>) {
        let mut by_id: HashMap<Uuid, BackupEntry> = HashMap::new();
        let mut errors = Vec::new();
        for site in &self.cfg.sites {
            match self
                .agent_call::<Vec<Manifest>>(site, reqwest::Method::GET, "/v1/backups", None)
                .await
            {
                Ok(ms) => {
                    for m in ms {
                        let e = by_id.entry(m.backup_id).or_insert_with(|| BackupEntry {
                            backup_id: m.backup_id,
                            name: m.open.name.clone(),
                            bytes: m.open.original_len,
                            created: m.open.created,
                            scheme: m.open.scheme,
                            shares: Vec::new(),
                        });
                        e.shares
                            .push((m.share_index, site.name.clone(), m.complete));
                    }
                }
                Err(e) => errors.push((site.name.clone(), e.to_string())),
            }
        }
        let mut v: Vec<BackupEntry> = by_id.into_values().collect();
        for e in &mut v {
            e.shares.sort();
        }
        v.sort_by_key(|e| (e.created, e.backup_id));
        (v, errors)
    }

    /// Checks every share of backup `id` at every site, without reconstructing.
    pub async fn verify(&self, id: Uuid) -> Vec<SiteCheck> {
        let mut out = Vec::new();
        for site in &self.cfg.sites {
            let r = self
                .agent_call::<Vec<ShareCheck>>(
                    site,
                    reqwest::Method::POST,
                    &format!("/v1/backups/{id}/verify"),
                    None,
                )
                .await;
            out.push(match r {
                Ok(shares) => SiteCheck {
                    site: site.name.clone(),
                    shares,
                    error: None,
                },
                Err(e) => SiteCheck {
                    site: site.name.clone(),
                    shares: Vec::new(),
                    error: Some(e.to_string()),
                },
            });
        }
        out
    }

    /// Restores backup `id` into `out` (atomically: temp file, digest check, rename).
    pub async fn restore(&self, id: Uuid, out: &Path) -> Result<RestoreReport, TransferError> {
        let started = Instant::now();
        // Find the shares.
        let mut candidates: Vec<(Site, Manifest)> = Vec::new();
        let mut rejected: Vec<(String, u8, String)> = Vec::new();
        let mut unreachable = Vec::new();
        let mut sites = self.cfg.sites.clone();
        sites.sort_by_key(|s| s.name != self.cfg.site); // this site first
        for site in &sites {
            match self
                .agent_call::<Vec<Manifest>>(
                    site,
                    reqwest::Method::GET,
                    &format!("/v1/backups/{id}"),
                    None,
                )
                .await
            {
                Ok(ms) => {
                    for m in ms {
                        if m.complete {
                            candidates.push((site.clone(), m));
                        } else {
                            rejected.push((
                                site.name.clone(),
                                m.share_index,
                                "share is incomplete".into(),
                            ));
                        }
                    }
                }
                Err(e) => unreachable.push(e.to_string()),
            }
        }
        let Some((_, first)) = candidates.first().cloned() else {
            return Err(TransferError::Usage(
                if rejected.is_empty() && unreachable.is_empty() {
                    format!("unknown backup ID {id}: no site holds a share of it (see `backup-client list`)")
                } else {
                    format!(
                        "backup {id} cannot be restored: no complete share is reachable ({})",
                        unreachable
                            .iter()
                            .cloned()
                            .chain(
                                rejected
                                    .iter()
                                    .map(|(s, i, r)| format!("share {i} at {s}: {r}"))
                            )
                            .collect::<Vec<_>>()
                            .join("; ")
                    )
                },
            ));
        };
        let (header, trailer) = decode_ends(&first)?;
        let scheme = header.scheme;
        let k = scheme.k() as usize;
        let cs = header.chunk_size;
        // Keep shares consistent with the first; check key availability for remote ones.
        let mut usable: Vec<(Site, u8, KeyPlanInfo)> = Vec::new();
        for (site, m) in &candidates {
            match decode_ends(m) {
                Ok((h, t)) if h.set_id == header.set_id && h.scheme == scheme && t == trailer => {}
                Ok(_) => {
                    rejected.push((
                        site.name.clone(),
                        m.share_index,
                        "belongs to another share set".into(),
                    ));
                    continue;
                }
                Err(e) => {
                    rejected.push((site.name.clone(), m.share_index, e.to_string()));
                    continue;
                }
            }
            if usable.iter().any(|(_, i, _)| *i == m.share_index) {
                continue;
            }
            match self.keys.status(&site.agent_sae_id).await {
                Ok(st) => usable.push((
                    site.clone(),
                    m.share_index,
                    KeyPlanInfo {
                        max_per_request: st.max_key_per_request as usize,
                    },
                )),
                Err(e) => rejected.push((
                    site.name.clone(),
                    m.share_index,
                    format!("no QKD keys between this site and site {}: {e}", site.name),
                )),
            }
        }
        if usable.len() < k {
            return Err(TransferError::Failed(format!(
                "backup {id} needs {k} shares, only {} are usable: {}",
                usable.len(),
                rejected
                    .iter()
                    .map(|(s, i, r)| format!("share {i} at {s}: {r}"))
                    .chain(unreachable.iter().cloned())
                    .collect::<Vec<_>>()
                    .join("; ")
            )));
        }

        // Output: resume a partial restore of the same backup if there is one.
        let out_abs = absolute(out)?;
        let partial = with_suffix(&out_abs, ".partial");
        let state_path = with_suffix(&out_abs, ".partial.json");
        let count = trailer.chunk_count;
        let mut start_chunk = 0u64;
        let mut hasher = blake3::Hasher::new();
        if let (Ok(text), Ok(meta)) = (fs::read(&state_path), fs::metadata(&partial)) {
            if let Ok(st) = serde_json::from_slice::<RestoreState>(&text) {
                // Resume only if the partial file really holds what the state says.
                let prefix = (st.chunks_done * cs as u64).min(trailer.original_len);
                if st.backup_id == id && st.chunks_done <= count && meta.len() >= prefix {
                    start_chunk = st.chunks_done;
                }
            }
        }
        let mut f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(start_chunk == 0)
            .open(&partial)
            .map_err(io_err(&partial))?;
        if start_chunk > 0 {
            // Re-hash what is already written (the last chunk is shorter than a chunk).
            let prefix = (start_chunk * cs as u64).min(trailer.original_len);
            let mut r = (&f).take(prefix);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = r.read(&mut buf).map_err(io_err(&partial))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
            }
            f.set_len(prefix).map_err(io_err(&partial))?;
            f.seek(SeekFrom::Start(prefix)).map_err(io_err(&partial))?;
        }
        write_atomic(
            &state_path,
            &serde_json::to_vec(&RestoreState {
                backup_id: id,
                chunks_done: start_chunk,
            })
            .unwrap_or_default(),
        )?;
        self.progress
            .total
            .store(trailer.original_len, Ordering::Relaxed);
        self.progress.done.store(
            (start_chunk * cs as u64).min(trailer.original_len),
            Ordering::Relaxed,
        );

        // Streams from k shares; replace a failing one from the chunk where it failed.
        let mut next_candidate = 0usize;
        let mut active: Vec<(usize, ChunkRx)> = Vec::new();
        let spawn = |idx: usize, from: u64| {
            let (site, share, info) = usable[idx].clone();
            let require_pad = site.name != self.cfg.site;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            let dl = Downloader {
                http: self.http.clone(),
                keys: self.keys.clone(),
                site,
                share,
                backup: id,
                chunk_size: cs,
                max_per_request: info.max_per_request,
                require_pad,
                idle: self.cfg.backup.key_wait() + Duration::from_secs(60),
            };
            tokio::spawn(async move { dl.run(from, count, tx).await });
            rx
        };
        while active.len() < k && next_candidate < usable.len() {
            active.push((next_candidate, spawn(next_candidate, start_chunk)));
            next_candidate += 1;
        }
        let mut combiner = make_combiner(&scheme, cs, &usable, &active)?;
        let mut out_buf = Zeroizing::new(vec![0u8; cs]);
        let mut since_sync = 0u64;
        for j in start_chunk..count {
            let mut pieces: Vec<Zeroizing<Vec<u8>>> = Vec::with_capacity(k);
            let mut split_nonce = None;
            let mut slot = 0;
            while slot < active.len() {
                let got = active[slot].1.recv().await;
                match got {
                    Some(Ok((c, nonce, data)))
                        if c == j && split_nonce.is_none_or(|n| n == nonce) =>
                    {
                        split_nonce = Some(nonce);
                        pieces.push(data);
                        slot += 1;
                    }
                    other => {
                        let (idx, _) = &active[slot];
                        let (site, share, _) = &usable[*idx];
                        let why = match other {
                            Some(Err(e)) => e,
                            Some(Ok((c, _, _))) if c != j => {
                                format!("sent chunk {c} where {j} was expected")
                            }
                            Some(Ok(_)) => {
                                "holds this chunk from another split than the other shares".into()
                            }
                            None => "stream ended early".into(),
                        };
                        tracing::warn!(site = %site.name, share, chunk = j, reason = %why, "share rejected; trying another");
                        rejected.push((site.name.clone(), *share, format!("at chunk {j}: {why}")));
                        if next_candidate >= usable.len() {
                            let _ = fs::remove_file(&state_path);
                            return Err(TransferError::Failed(format!(
                                "backup {id}: not enough good shares left at chunk {j} (need {k}): {}",
                                rejected
                                    .iter()
                                    .map(|(s, i, r)| format!("share {i} at {s}: {r}"))
                                    .collect::<Vec<_>>()
                                    .join("; ")
                            )));
                        }
                        active[slot] = (next_candidate, spawn(next_candidate, j));
                        next_candidate += 1;
                        combiner = make_combiner(&scheme, cs, &usable, &active)?;
                        // retry this slot with the new share (earlier slots already delivered)
                    }
                }
            }
            combiner.combine_chunk(&pieces, &mut out_buf)?;
            let len = if j + 1 == count {
                (trailer.original_len - j * cs as u64) as usize
            } else {
                cs
            };
            hasher.update(&out_buf[..len]);
            f.write_all(&out_buf[..len]).map_err(io_err(&partial))?;
            self.progress.done.fetch_add(len as u64, Ordering::Relaxed);
            since_sync += 1;
            if since_sync >= self.cfg.backup.checkpoint_chunks {
                since_sync = 0;
                f.sync_data().map_err(io_err(&partial))?;
                write_atomic(
                    &state_path,
                    &serde_json::to_vec(&RestoreState {
                        backup_id: id,
                        chunks_done: j + 1,
                    })
                    .unwrap_or_default(),
                )?;
            }
        }
        let used: Vec<(String, u8)> = active
            .iter()
            .map(|(idx, _)| (usable[*idx].0.name.clone(), usable[*idx].1))
            .collect();
        drop(active);
        if *hasher.finalize().as_bytes() != trailer.digest {
            let _ = fs::remove_file(&partial);
            let _ = fs::remove_file(&state_path);
            return Err(TransferError::Failed(format!(
                "backup {id}: the restored data does not match the recorded digest; nothing was written to {}",
                out.display()
            )));
        }
        f.sync_all().map_err(io_err(&partial))?;
        drop(f);
        fs::rename(&partial, &out_abs).map_err(io_err(&out_abs))?;
        if let Some(dir) = out_abs.parent() {
            let _ = File::open(dir).and_then(|d| d.sync_all());
        }
        let _ = fs::remove_file(&state_path);
        Ok(RestoreReport {
            backup_id: id,
            output: out_abs,
            bytes: trailer.original_len,
            seconds: started.elapsed().as_secs_f64(),
            resumed_at_chunk: start_chunk,
            used,
            rejected,
        })
    }
}

#[derive(Clone)]
struct KeyPlanInfo {
    max_per_request: usize,
}

#[derive(Serialize, Deserialize)]
struct RestoreState {
    backup_id: Uuid,
    chunks_done: u64,
}

fn make_combiner(
    scheme: &Scheme,
    cs: usize,
    usable: &[(Site, u8, KeyPlanInfo)],
    active: &[(usize, ChunkRx)],
) -> Result<Combiner, TransferError> {
    let idx: Vec<u8> = active.iter().map(|(i, _)| usable[*i].1).collect();
    Ok(Combiner::new(*scheme, cs, &idx)?)
}

fn decode_ends(m: &Manifest) -> Result<(ShareHeader, ShareTrailer), TransferError> {
    let bad = |w: &str| {
        TransferError::Failed(format!(
            "share {} of backup {}: {w}",
            m.share_index, m.backup_id
        ))
    };
    let h = hex::decode(m.header_hex.as_deref().unwrap_or("")).map_err(|_| bad("bad header"))?;
    let t = hex::decode(m.trailer_hex.as_deref().unwrap_or("")).map_err(|_| bad("bad trailer"))?;
    let h: [u8; HEADER_LEN] = h.try_into().map_err(|_| bad("bad header length"))?;
    let t: [u8; TRAILER_LEN] = t.try_into().map_err(|_| bad("bad trailer length"))?;
    let hd = ShareHeader::decode(&h).map_err(|e| bad(&e.to_string()))?;
    let tr = ShareTrailer::decode(&t, &h, hd.chunk_size).map_err(|e| bad(&e.to_string()))?;
    if hd.index != m.share_index || hd.set_id != *m.backup_id.as_bytes() {
        return Err(bad("header does not match the manifest"));
    }
    Ok((hd, tr))
}

fn absolute(p: &Path) -> Result<PathBuf, TransferError> {
    if p.is_absolute() {
        Ok(p.to_owned())
    } else {
        Ok(std::env::current_dir().map_err(io_err(p))?.join(p))
    }
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// An exclusive advisory lock on `path`, held while the returned file is open.
fn lock_exclusive(path: &Path) -> std::io::Result<File> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    f.try_lock().map_err(std::io::Error::from)?;
    Ok(f)
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), TransferError> {
    let tmp = with_suffix(path, ".tmp");
    let mut f = File::create(&tmp).map_err(io_err(&tmp))?;
    f.write_all(data).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// Reads the file, hashes it, and splits the chunks not yet complete everywhere.
#[allow(clippy::too_many_arguments)]
fn read_and_split(
    path: &Path,
    scheme: Scheme,
    chunk_size: usize,
    rng: Box<dyn RandomSource + Send>,
    done: &HashMap<u64, u64>,
    senders: Vec<(u8, async_channel::Sender<Job>)>,
    abort: &AtomicBool,
    progress: &Progress,
) -> Result<([u8; 32], u64, Vec<u64>), TransferError> {
    let mut nonces = Vec::new();
    let mut f = File::open(path).map_err(io_err(path))?;
    let mut splitter = Splitter::new(scheme, chunk_size, rng)?;
    let n = scheme.n() as usize;
    let mut secret = Zeroizing::new(vec![0u8; chunk_size]);
    let mut hasher = blake3::Hasher::new();
    let mut total = 0u64;
    let mut j = 0u64;
    let mut nonce_src = [0u8; 8];
    loop {
        if abort.load(Ordering::Relaxed) {
            return Err(TransferError::Failed("aborted".into()));
        }
        let got = read_full(&mut f, &mut secret).map_err(io_err(path))?;
        if got == 0 {
            break;
        }
        hasher.update(&secret[..got]);
        total += got as u64;
        if let Some(&n) = done.get(&j) {
            // Already stored everywhere by an earlier run.
            nonces.push(n);
            progress.done.fetch_add(got as u64, Ordering::Relaxed);
        } else {
            secret[got..].fill(0);
            let mut shares: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; chunk_size]).collect();
            splitter.split_chunk(&secret, &mut shares)?;
            getrandom::fill(&mut nonce_src)
                .map_err(|e| TransferError::Failed(format!("OS random: {e}")))?;
            let nonce = u64::from_le_bytes(nonce_src);
            nonces.push(nonce);
            let mut shares: Vec<Option<Vec<u8>>> = shares.into_iter().map(Some).collect();
            for (i, tx) in &senders {
                let Some(data) = shares[*i as usize].take() else {
                    continue;
                };
                // A closed channel means that site failed; the store decides what that means.
                let _ = tx.send_blocking(Job {
                    chunk: j,
                    nonce,
                    data,
                });
            }
            // Shares for sites not stored on (degraded) are dropped here.
            for s in shares.iter_mut().flatten() {
                zeroize::Zeroize::zeroize(s);
            }
        }
        j += 1;
        if got < chunk_size {
            break;
        }
    }
    Ok((*hasher.finalize().as_bytes(), total, nonces))
}

fn read_full(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

/// Sends one share's chunks to its site.
struct Uploader {
    http: reqwest::Client,
    keys: Arc<KeyFetcher>,
    site: Site,
    share: u8,
    backup: Uuid,
    plan: KeyPlan,
    batch: usize,
    retries: u32,
    progress: Arc<Progress>,
    chunk_size: usize,
    size: u64,
    sent: Arc<AtomicU64>,
    report_progress: bool,
}

impl Uploader {
    async fn run(self, rx: async_channel::Receiver<Job>) -> Result<(), TransferError> {
        let url = format!(
            "{}/v1/backups/{}/shares/{}/chunks",
            self.site.agent_url.trim_end_matches('/'),
            self.backup,
            self.share
        );
        let ctx = mac_context(self.backup, self.share, Direction::Store);
        let result = self.pump(&rx, &url, &ctx).await;
        if result.is_err() {
            rx.close();
        }
        result
    }

    async fn pump(
        &self,
        rx: &async_channel::Receiver<Job>,
        url: &str,
        ctx: &[u8],
    ) -> Result<(), TransferError> {
        while let Ok(first) = rx.recv().await {
            let mut jobs = vec![first];
            while jobs.len() < self.batch {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            let mut attempt = 0;
            loop {
                attempt += 1;
                match self.send(&jobs, url, ctx).await {
                    Ok(()) => break,
                    Err(e)
                        if attempt <= self.retries
                            && !matches!(e, TransferError::Keys(KeyError::Exhausted { .. })) =>
                    {
                        tracing::warn!(site = %self.site.name, attempt, error = %e, "upload failed; retrying with new keys");
                        tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                    }
                    Err(e) => return Err(e),
                }
            }
            let bytes: u64 = jobs
                .iter()
                .map(|j| {
                    (self.size - (j.chunk * self.chunk_size as u64)).min(self.chunk_size as u64)
                })
                .sum();
            self.sent.fetch_add(jobs.len() as u64, Ordering::Relaxed);
            // Progress counts the original file's bytes once: by the first share's uploaders.
            if self.report_progress {
                self.progress.done.fetch_add(bytes, Ordering::Relaxed);
            }
            for j in &mut jobs {
                zeroize::Zeroize::zeroize(&mut j.data);
            }
        }
        Ok(())
    }

    async fn send(&self, jobs: &[Job], url: &str, ctx: &[u8]) -> Result<(), TransferError> {
        let t0 = Instant::now();
        let keys = self
            .keys
            .take(&self.site.agent_sae_id, &self.plan, jobs.len())
            .await?;
        let t_keys = t0.elapsed();
        let mut body = Vec::with_capacity(jobs.len() * (self.chunk_size + 1024));
        for (job, ck) in jobs.iter().zip(&keys) {
            let header = FrameHeader {
                chunk: job.chunk,
                nonce: job.nonce,
                key_ids: ck.ids.clone(),
                pad: self.plan.pad_bytes > 0,
                len: job.data.len() as u32,
                error: None,
            };
            seal_into(&mut body, ctx, &header, &job.data, ck)
                .map_err(|e| TransferError::Failed(e.to_string()))?;
        }
        drop(keys); // wiped; never used again, whatever happens to the request
        let site_err = |m: String| TransferError::Site {
            site: self.site.name.clone(),
            message: m,
        };
        let resp = self
            .http
            .post(url)
            .header("content-type", "application/octet-stream")
            .timeout(Duration::from_secs(300))
            .body(body)
            .send()
            .await
            .map_err(|e| site_err(format!("upload to {} failed: {e}", self.site.agent_url)))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| site_err(format!("reading reply: {e}")))?;
        if !status.is_success() {
            let msg = serde_json::from_slice::<AgentError>(&bytes)
                .map(|e| e.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(site_err(format!("agent refused chunks: {status} {msg}")));
        }
        let stored: Stored =
            serde_json::from_slice(&bytes).map_err(|e| site_err(format!("bad reply: {e}")))?;
        tracing::debug!(
            site = %self.site.name,
            chunks = jobs.len(),
            keys_ms = t_keys.as_millis() as u64,
            total_ms = t0.elapsed().as_millis() as u64,
            "batch stored"
        );
        let want: Vec<u64> = jobs.iter().map(|j| j.chunk).collect();
        if stored.stored != want {
            return Err(site_err("agent acknowledged other chunks than sent".into()));
        }
        Ok(())
    }
}

/// Streams one share back from its site.
struct Downloader {
    http: reqwest::Client,
    keys: Arc<KeyFetcher>,
    site: Site,
    share: u8,
    backup: Uuid,
    chunk_size: usize,
    max_per_request: usize,
    /// The share comes from another site: it must arrive one-time-padded.
    require_pad: bool,
    /// Longest silence of the site before the share is given up (the agent may be waiting
    /// for QKD key itself).
    idle: Duration,
}

/// Chunks of one share on their way to the combiner: `(chunk, plaintext)` or why it failed.
type ChunkMsg = Result<(u64, u64, Zeroizing<Vec<u8>>), String>;
type ChunkTx = tokio::sync::mpsc::Sender<ChunkMsg>;
type ChunkRx = tokio::sync::mpsc::Receiver<ChunkMsg>;

impl Downloader {
    async fn run(self, from: u64, to: u64, tx: ChunkTx) {
        if let Err(e) = self.pump(from, to, &tx).await {
            let _ = tx.send(Err(e)).await;
        }
    }

    async fn pump(&self, from: u64, to: u64, tx: &ChunkTx) -> Result<(), String> {
        if from >= to {
            return Ok(());
        }
        let url = format!(
            "{}/v1/backups/{}/shares/{}/chunks?from={from}&to={to}",
            self.site.agent_url.trim_end_matches('/'),
            self.backup,
            self.share
        );
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("agent at {} unreachable: {e}", self.site.agent_url))?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp.bytes().await.unwrap_or_default();
            let msg = serde_json::from_slice::<AgentError>(&bytes)
                .map(|e| e.message)
                .unwrap_or_else(|_| String::from_utf8_lossy(&bytes).into_owned());
            return Err(format!("agent answered {status}: {msg}"));
        }
        let ctx = mac_context(self.backup, self.share, Direction::Restore);
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::with_capacity(4 * (self.chunk_size + 1024));
        let mut expect = from;
        loop {
            // Parse every complete frame in the buffer, then fetch their keys in one call.
            let mut pos = 0;
            let mut frames = Vec::new();
            while let Some((f, used)) =
                parse_frame(&buf[pos..], self.chunk_size).map_err(|e| e.to_string())?
            {
                if let Some(err) = &f.header.error {
                    return Err(format!("site reports chunk {}: {err}", f.header.chunk));
                }
                frames.push((pos, used));
                pos += used;
            }
            if !frames.is_empty() {
                let parsed: Vec<_> = frames
                    .iter()
                    .filter_map(|&(p, u)| {
                        parse_frame(&buf[p..p + u], self.chunk_size)
                            .ok()
                            .flatten()
                            .map(|(f, _)| f)
                    })
                    .collect();
                let ids: Vec<Uuid> = parsed
                    .iter()
                    .flat_map(|f| f.header.key_ids.iter().copied())
                    .collect();
                let mut keys = self
                    .keys
                    .fetch(&self.site.agent_sae_id, &ids, self.max_per_request)
                    .await
                    .map_err(|e| e.to_string())?;
                for f in &parsed {
                    if f.header.chunk != expect || f.payload.len() != self.chunk_size {
                        return Err(format!(
                            "unexpected chunk {} (wanted {expect})",
                            f.header.chunk
                        ));
                    }
                    let ck = assemble(&f.header, &mut keys).ok_or("keys missing")?;
                    let mut plain = Zeroizing::new(vec![0u8; self.chunk_size]);
                    open_into(f, &ctx, &ck, self.require_pad, &mut plain)
                        .map_err(|e: SealError| e.to_string())?;
                    if tx.send(Ok((expect, f.header.nonce, plain))).await.is_err() {
                        return Ok(()); // restore no longer needs this share
                    }
                    expect += 1;
                }
                buf.drain(..pos);
            }
            if expect >= to {
                return Ok(());
            }
            let next = tokio::time::timeout(self.idle, stream.next())
                .await
                .map_err(|_| format!("no data from the site for {:?}", self.idle))?;
            match next {
                Some(Ok(bytes)) => buf.extend_from_slice(&bytes),
                Some(Err(e)) => return Err(format!("connection lost: {e}")),
                None => return Err(format!("stream ended at chunk {expect} of {to}")),
            }
        }
    }
}
