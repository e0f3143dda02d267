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
    /// Where shares are kept.
    pub store_dir: PathBuf,
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
        for p in [
            &mut c.tls.ca,
            &mut c.tls.cert,
            &mut c.tls.key,
            &mut c.store_dir,
        ] {
            resolve(base, p);
        }
        Ok(c)
    }
}
