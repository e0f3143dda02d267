//! Configuration files shared by the backup client and the site agent: TOML plus
//! `BACKUP_`-prefixed environment overrides (`__` between levels, e.g.
//! `BACKUP_BACKUP__STREAMS=4`). Relative paths are resolved against the folder of the
//! configuration file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// A configuration error; the message names the file and the field.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    pub path: PathBuf,
    pub message: String,
}

/// Certificate and key of an SAE, and the CA of the network.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// Resolves relative paths against `base`.
    pub fn resolve(&mut self, base: &Path) {
        for p in [&mut self.ca, &mut self.cert, &mut self.key] {
            resolve(base, p);
        }
    }
}

/// Reads a TOML configuration with `BACKUP_*` environment overrides.
pub fn load<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, ConfigError> {
    let err = |message: String| ConfigError {
        path: path.to_owned(),
        message,
    };
    if !path.is_file() {
        return Err(err(
            "no such configuration file (give one with --config)".into()
        ));
    }
    config::Config::builder()
        .add_source(config::File::from(path).format(config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix("BACKUP")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true),
        )
        .build()
        .and_then(|c| c.try_deserialize())
        .map_err(|e| err(e.to_string()))
}

/// Makes `p` absolute against `base` when it is relative.
pub fn resolve(base: &Path, p: &mut PathBuf) {
    if p.is_relative() {
        *p = base.join(&*p);
    }
}
