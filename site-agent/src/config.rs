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
    /// SAEs allowed to store, restore, list and verify (empty = any SAE of the CA).
    #[serde(default)]
    pub allowed_clients: Vec<String>,
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
