//! Configuration of the site agent: TOML plus `BACKUP_`-prefixed environment overrides.
//! Relative paths are resolved against the folder of the configuration file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use share_transfer::config::{load, resolve};
pub use share_transfer::config::{ConfigError, TlsFiles};

/// The site agent's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The agent's SAE ID (the CN of `tls.cert`).
    pub sae_id: String,
    pub listen: SocketAddr,
    /// `https://host:port` of this site's KME.
    pub kme_url: String,
    /// Server certificate and KME client identity (one certificate for both).
    pub tls: TlsFiles,
    /// Where shares are kept: a folder of this machine (the local backend). Leave it out
    /// and set `[s3]` to keep them in an S3-compatible bucket instead; one of the two.
    #[serde(default)]
    pub store_dir: Option<PathBuf>,
    /// Keep shares in a bucket of an S3-compatible object store (see [`S3Config`]).
    #[serde(default)]
    pub s3: Option<S3Config>,
    /// The operator's listener: Prometheus `/metrics` and the `/jobs` the dashboard shows,
    /// plain HTTP for a scraper on the operator's network (no key material, no share bytes;
    /// backup IDs, file names and clients). Unset: off.
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    /// SAEs allowed to use the agent at all (empty = any SAE of the CA). Which backups a
    /// client may read is narrower: see `recovery_clients`.
    #[serde(default)]
    pub allowed_clients: Vec<String>,
    /// SAEs the operator allows to read every backup here, for a restore at another site
    /// after a disaster. Anyone else reads only the backups whose owner named it (by
    /// default the owner's own site's clients: SAEs of the owner's KME).
    #[serde(default)]
    pub recovery_clients: Vec<String>,
    /// Bounds on what one client, and all together, may hold of the agent.
    #[serde(default)]
    pub limits: Limits,
    /// For crash tests only: abort the process at this point (see
    /// [`crate::storage::Failpoint`]). Never set in production.
    #[serde(default)]
    pub failpoint: Option<crate::storage::Failpoint>,
    /// Write share chunks with O_DIRECT where the filesystem allows it.
    #[serde(default = "yes")]
    pub direct_io: bool,
    /// HTTP worker threads (0 = one per core).
    #[serde(default)]
    pub workers: usize,
    /// Longest wait for QKD key before a restore stream gives up, seconds.
    #[serde(default = "default_key_wait")]
    pub key_wait_secs: u64,
}

/// `[s3]`: shares kept in a bucket of an S3-compatible object store (Garage, MinIO, Ceph
/// RGW, AWS S3, ...). The bucket holds what the local folder would: this site's own share
/// bytes after the one-time pad is removed, their records, manifests and sample sets. It
/// must be this site's own storage, not shared with another site's agent: k sites' shares
/// together give the file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// `http(s)://host:port` of the S3 API.
    pub endpoint: String,
    /// The region the store expects in signatures (Garage: its `s3_region`).
    #[serde(default = "default_region")]
    pub region: String,
    pub bucket: String,
    /// Key prefix of every object this agent writes ("" = the bucket's root).
    #[serde(default)]
    pub prefix: String,
    /// `bucket.host` addressing instead of `host/bucket` (path style, the default).
    #[serde(default)]
    pub virtual_hosted_style: bool,
    /// A TOML file with `access_key_id` and `secret_access_key` (keep it 0600). Unset: the
    /// environment's `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// Retries of a failed request (5xx, timeouts, connection errors), with exponential
    /// back-off; nothing is acknowledged to a client until the store acknowledged it.
    #[serde(default = "default_s3_retries")]
    pub max_retries: usize,
    /// Longest time, seconds, spent retrying one request before the agent gives up and the
    /// client is told the object store failed.
    #[serde(default = "default_s3_retry_timeout")]
    pub retry_timeout_secs: u64,
    /// Longest time, seconds, for one request.
    #[serde(default = "default_s3_timeout")]
    pub request_timeout_secs: u64,
    /// Chunks larger than this go up as multipart uploads in parts of this size (S3 allows
    /// parts from 5 MiB).
    #[serde(default = "default_part_bytes")]
    pub multipart_part_bytes: usize,
    /// Sign each request's body (SigV4 payload SHA-256) instead of sending it as
    /// `UNSIGNED-PAYLOAD`. Off by default: every chunk's BLAKE3 is checked when it is read
    /// back (at finalisation and on every read), so the signature's SHA-256 over every byte,
    /// at the agent and again at the store, buys nothing the agent relies on; use https
    /// endpoints where the path to the store is not trusted.
    #[serde(default)]
    pub sign_payload: bool,
    /// Requests in flight at once to the store (0 = 16).
    #[serde(default)]
    pub max_requests: usize,
}

fn default_region() -> String {
    "us-east-1".into()
}

fn default_s3_retries() -> usize {
    10
}

fn default_s3_retry_timeout() -> u64 {
    120
}

fn default_s3_timeout() -> u64 {
    60
}

fn default_part_bytes() -> usize {
    16 << 20
}

/// `[limits]`: what keeps one client from wearing the agent down for everyone.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Uploads (chunk POSTs) one client may have running at once.
    pub max_uploads_per_client: usize,
    /// Uploads running at once in all.
    pub max_uploads: usize,
    /// Downloads (chunk GETs) one client may have running at once.
    pub max_downloads_per_client: usize,
    /// Downloads running at once in all.
    pub max_downloads: usize,
    /// Longest silence, seconds, of a client sending a body or of one being sent a
    /// download, before the agent drops the request.
    pub idle_secs: u64,
    /// Bytes of QKD key the agent may have issued to one client for downloads that the
    /// client has not yet shown it fetched (with receipts); past it, downloads are refused
    /// until receipts arrive or the issued keys age out.
    pub max_unfetched_key_bytes_per_client: u64,
    /// After how long, seconds, issued keys no client acknowledged stop counting (match the
    /// KME's key TTL, after which it discards keys no one fetched).
    pub unfetched_key_ttl_secs: u64,
    /// Sample sets one client may keep here (each manifest is at most 16 MiB).
    pub max_sets_per_client: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_uploads_per_client: 32,
            max_uploads: 128,
            max_downloads_per_client: 64,
            max_downloads: 256,
            idle_secs: 60,
            max_unfetched_key_bytes_per_client: 1 << 30,
            unfetched_key_ttl_secs: 3600,
            max_sets_per_client: 10_000,
        }
    }
}

fn yes() -> bool {
    true
}

fn default_key_wait() -> u64 {
    600
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut c: AgentConfig = load(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [&mut c.tls.ca, &mut c.tls.cert, &mut c.tls.key] {
            resolve(base, p);
        }
        let extra = [
            c.store_dir.as_mut(),
            c.s3.as_mut().and_then(|s| s.credentials_file.as_mut()),
        ];
        for p in extra.into_iter().flatten() {
            resolve(base, p);
        }
        match (&c.store_dir, &c.s3) {
            (Some(_), None) | (None, Some(_)) => Ok(c),
            _ => Err(ConfigError {
                path: path.to_owned(),
                message: "set exactly one of store_dir (shares in a local folder) and [s3] \
                          (shares in an object store)"
                    .into(),
            }),
        }
    }
}
