//! The client's side of a backup: store, restore, list and verify across the sites.
//!
//! Store ([`store`](BackupClient::store)): the file is read chunk by chunk, hashed and split
//! into `n` share chunks; each share goes to its site through `streams` concurrent uploaders
//! per site, which take fresh QKD keys for every chunk (as master, naming the site's agent
//! as slave), pad and tag it, and send batches of frames. A chunk counts only when the agent
//! has acknowledged it (durably stored). Finally every site gets the share's header and
//! trailer (length, digest).
//!
//! Resume: an interrupted store is recorded under `state_dir`; re-running the same command
//! with the same file reuses the backup ID, asks each site which chunks it holds (and from
//! which split), and re-splits and sends only the chunks that are not complete everywhere,
//! with fresh randomness and fresh keys (a key is never used for two chunks).
//!
//! Restore ([`restore`](BackupClient::restore)): any `k` reachable shares are streamed back
//! in parallel (this site's own share first), each chunk verified and unpadded, combined and
//! written to a temporary file that is renamed over the output only after the whole-file
//! digest matched. A share that fails (site down, damaged chunk, bad tag) is replaced by
//! another from the chunk where it failed.
//!
//! Modules, by what they hold:
//!
//! * this one — [`BackupClient`] (HTTP and key clients, agent calls), errors, options,
//!   progress and the reports the CLI prints;
//! * `store` — the store command in its steps: plan, open, upload, finalize;
//! * `upload` — the store's pipeline: the reader/splitter thread and the per-site uploaders;
//! * `restore` — the restore command in its steps: find shares, choose, resume the output,
//!   download and combine, verify and rename into place;
//! * `download` — the per-share downloaders and the set of `k` share streams with spares;
//! * `resume` — what survives an interruption: the pending-store record and its lock, the
//!   partial restore output and its checkpoint, atomic small-file writes;
//! * `catalogue` — `list` and `verify`;
//! * `renew` — proactive share renewal (zero sharings, staged and committed in two phases);
//! * `repair`, `scrub`, `sets` — share repair, scrubbing, sample sets.

mod catalogue;
mod download;
pub mod renew;
pub mod repair;
mod restore;
mod resume;
pub mod scrub;
pub mod sets;
mod store;
mod upload;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use uuid::Uuid;

use crate::config::{ClientConfig, Site};
use share_transfer::keys::{KeyError, KeyFetcher, Notice};
use share_transfer::wire::{AgentError, SchemeInfo, SchemeName, ShareCheck};
use sharing::sharing::SharingError;
use sharing::Scheme;

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
    /// `repair` found the share whole where it belongs (said where).
    #[error("{0}")]
    NothingToRepair(String),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TransferError + '_ {
    move |source| TransferError::Io {
        path: path.to_owned(),
        source,
    }
}

/// URI SAN prefix of an SAE's certificate (a site agent is an SAE of its KME).
const SAE_URI: &str = "urn:qkd:sae:";

/// Whether the reply came from `site`'s own agent (`urn:qkd:sae:<agent_sae_id>` in its
/// certificate), not merely from a holder of some certificate of the CA.
fn check_agent(site: &Site, resp: &reqwest::Response) -> Result<(), String> {
    mtls::client::check_server_uri(resp, &format!("{SAE_URI}{}", site.agent_sae_id)).map_err(|e| {
        format!(
            "the server at {} is not site {}'s agent {}: {e}",
            site.agent_url, site.name, site.agent_sae_id
        )
    })
}

/// The message of an agent's error reply, or the reply itself if it is not one.
fn agent_message(body: &[u8]) -> String {
    serde_json::from_slice::<AgentError>(body)
        .map(|e| e.message)
        .unwrap_or_else(|_| String::from_utf8_lossy(body).into_owned())
}

/// Progress of a long transfer; drawn by the CLI.
#[derive(Default)]
pub struct Progress {
    pub total: AtomicU64,
    pub done: AtomicU64,
    pub notice: Arc<Notice>,
    /// Of a sample set, while one is stored (all zero otherwise).
    pub set: SetProgress,
}

/// Where a sample set stands; `total` and `done` above follow the file being stored.
#[derive(Debug, Default)]
pub struct SetProgress {
    pub files: AtomicU64,
    pub files_done: AtomicU64,
    /// Bytes of all the set's files given this run.
    pub bytes: AtomicU64,
    /// Bytes of the files done (sent or found unchanged).
    pub bytes_done: AtomicU64,
    /// Bytes of the files sent this run, done.
    pub bytes_sent: AtomicU64,
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
    /// BLAKE3 of the file as it was read for the split (the digest the sites' trailers
    /// carry).
    #[serde(skip)]
    pub digest: [u8; 32],
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
    /// The agent SAE of each share index's site, as the backup was opened.
    #[serde(skip)]
    pub placement: Vec<String>,
    /// Its version (raised by each share move).
    #[serde(skip)]
    pub placement_version: u32,
}

/// Result of `verify` for one site.
#[derive(Debug, Clone, Serialize)]
pub struct SiteCheck {
    pub site: String,
    pub shares: Vec<ShareCheck>,
    /// Shares the backup places at this site that the site does not hold at all (lost:
    /// `repair ID --site SITE` rebuilds them).
    pub lost: Vec<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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
            // Each agent reply's certificate is checked for the agent's own SAE URI.
            .tls_info(true)
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

    /// The same client (connections, key fetcher, configuration) reporting progress into
    /// `progress`: for files of a set stored at once.
    fn with_progress(&self, progress: Arc<Progress>) -> BackupClient {
        BackupClient {
            cfg: self.cfg.clone(),
            http: self.http.clone(),
            keys: self.keys.clone(),
            progress,
        }
    }

    fn site_err(site: &Site, message: impl Into<String>) -> TransferError {
        TransferError::Site {
            site: site.name.clone(),
            message: message.into(),
        }
    }

    /// The same call to every configured site's agent at once: each site with its reply,
    /// in the configuration's order.
    async fn ask_sites<T: serde::de::DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Vec<(&Site, Result<T, TransferError>)> {
        let calls = self.cfg.sites.iter().map(|site| {
            let (method, body) = (method.clone(), body.clone());
            async move { (site, self.agent_call(site, method, path, body).await) }
        });
        futures_util::future::join_all(calls).await
    }

    /// One JSON call of a site agent's API; a non-2xx reply becomes the agent's message.
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
        check_agent(site, &resp).map_err(|m| Self::site_err(site, m))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| Self::site_err(site, format!("reading reply: {e}")))?;
        if !status.is_success() {
            let msg = agent_message(&bytes);
            return Err(Self::site_err(
                site,
                format!("agent answered {status}: {msg}"),
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| Self::site_err(site, format!("bad reply: {e}")))
    }
}
