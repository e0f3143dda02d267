//! Configuration of the backup client: TOML plus `BACKUP_`-prefixed environment overrides
//! (`__` between levels, e.g. `BACKUP_BACKUP__STREAMS=4`). Relative paths are resolved
//! against the folder of the configuration file.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use share_transfer::config::{load, resolve};
pub use share_transfer::config::{ConfigError, TlsFiles};
use share_transfer::wire::SchemeName;

/// One site of the backup network, as the client sees it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub name: String,
    /// `https://host:port` of the site agent.
    pub agent_url: String,
    /// SAE ID of the site agent (the slave named in enc_keys for shares sent there).
    pub agent_sae_id: String,
}

/// Defaults of `store`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackupDefaults {
    pub k: u8,
    pub n: u8,
    pub scheme: SchemeName,
    /// Chunk size in bytes (0 = about 1 MiB, aligned for direct I/O).
    pub chunk_size: usize,
    /// Concurrent streams per site: uploads of a store, and downloads of each share a
    /// restore reads (at most 8); default: the machine's cores (at least 2, at most 16), so
    /// that sealing, opening and sending use every core.
    pub streams: usize,
    /// Chunks per upload request.
    pub batch_chunks: usize,
    /// Site names in share order (share i goes to `placement[i]`); default: this site first,
    /// then the others in configuration order.
    pub placement: Vec<String>,
    /// SAEs besides this client that may read the backups it stores (restore, list,
    /// verify). Absent: the clients of this client's own site (SAEs of its KME); `[]`: this
    /// client alone. Each agent's operator may add readers for disaster recovery
    /// (`recovery_clients` in the agent's configuration).
    pub readers: Option<Vec<String>>,
    /// Randomness for the shares: `chacha12` (default), `chacha8`, `chacha20`, `os`, or a
    /// device path such as `/dev/hwrng`.
    pub rng: String,
    /// Longest wait for QKD key before giving up, seconds.
    pub key_wait_secs: u64,
    /// Attempts per chunk batch before a site counts as failed.
    pub retries: u32,
    /// A restore records its progress (after an fsync) every this many chunks, so that an
    /// interrupted restore resumes from there.
    pub checkpoint_chunks: u64,
    /// Files of a sample set stored at once (each with its own `streams` per site), so
    /// that one file's opening and finalisation overlap another's transfer.
    pub set_files_in_flight: usize,
}

/// Upload streams per site when not configured: one per core, within 2..=16.
fn default_streams() -> usize {
    std::thread::available_parallelism()
        .map_or(2, std::num::NonZeroUsize::get)
        .clamp(2, 16)
}

impl Default for BackupDefaults {
    fn default() -> Self {
        BackupDefaults {
            k: 2,
            n: 3,
            scheme: SchemeName::Xor,
            chunk_size: 0,
            streams: default_streams(),
            batch_chunks: 4,
            placement: Vec::new(),
            readers: None,
            rng: "chacha12".into(),
            key_wait_secs: 600,
            retries: 5,
            checkpoint_chunks: 256,
            set_files_in_flight: 2,
        }
    }
}

impl BackupDefaults {
    pub fn key_wait(&self) -> Duration {
        Duration::from_secs(self.key_wait_secs)
    }
}

/// The backup client's configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientConfig {
    /// The site this client runs at.
    pub site: String,
    /// This client's SAE ID (the CN of `tls.cert`).
    pub sae_id: String,
    /// `https://host:port` of this site's KME.
    pub kme_url: String,
    pub tls: TlsFiles,
    /// Folder for resume state of interrupted stores and restores.
    pub state_dir: PathBuf,
    pub sites: Vec<Site>,
    #[serde(default)]
    pub backup: BackupDefaults,
}

impl ClientConfig {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let mut c: ClientConfig = load(path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for p in [
            &mut c.tls.ca,
            &mut c.tls.cert,
            &mut c.tls.key,
            &mut c.state_dir,
        ] {
            resolve(base, p);
        }
        let err = |message: String| ConfigError {
            path: path.to_owned(),
            message,
        };
        if c.sites.is_empty() {
            return Err(err("sites: at least one site is needed".into()));
        }
        if !c.sites.iter().any(|s| s.name == c.site) {
            return Err(err(format!("site: {:?} is not among [[sites]]", c.site)));
        }
        for (i, p) in c.backup.placement.iter().enumerate() {
            if !c.sites.iter().any(|s| &s.name == p) {
                return Err(err(format!("backup.placement: unknown site {p:?}")));
            }
            if c.backup.placement[..i].contains(p) {
                return Err(err(format!(
                    "backup.placement: site {p:?} is listed twice; one site holding two shares could rebuild the file alone"
                )));
            }
        }
        if c.backup.streams == 0 || c.backup.batch_chunks == 0 || c.backup.checkpoint_chunks == 0 {
            return Err(err(
                "backup.streams, backup.batch_chunks and backup.checkpoint_chunks must be positive"
                    .into(),
            ));
        }
        Ok(c)
    }

    /// Sites in share order: the configured placement, else this site first.
    pub fn placement(&self) -> Vec<Site> {
        if !self.backup.placement.is_empty() {
            return self
                .backup
                .placement
                .iter()
                .filter_map(|n| self.sites.iter().find(|s| &s.name == n).cloned())
                .collect();
        }
        let mut v: Vec<Site> = self
            .sites
            .iter()
            .filter(|s| s.name == self.site)
            .cloned()
            .collect();
        v.extend(self.sites.iter().filter(|s| s.name != self.site).cloned());
        v
    }
}
