//! KME configuration: a TOML file plus `KMS_`-prefixed environment overrides.
//!
//! Nested keys use `__` in the environment: `KMS_LIMITS__KEY_SIZE=512` overrides
//! `[limits] key_size`, `KMS_LISTEN=127.0.0.1:9443` overrides `listen`. Relative file paths
//! in `[tls]` are resolved against the folder of the configuration file.
//!
//! Every limit of the 014 Status format is configurable under `[limits]`.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use qkd_sim::physics::DeviceParams;

/// A configuration error; the message names the offending field.
#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(pub String);

/// Which certificate field carries the SAE ID (`cn`, `san-dns`, `san-uri`, `serial`).
pub use mtls::server::IdField as SaeIdField;

/// TLS material of the KME.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// CA certificate (PEM) that SAE and peer KME certificates must chain to.
    pub ca: PathBuf,
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// Client certificate used towards peer KMEs (PEM).
    pub peer_cert: PathBuf,
    /// Client key used towards peer KMEs (PEM).
    pub peer_key: PathBuf,
    /// Certificate revocation list of the CA (PEM), read again whenever the file changes: a
    /// client certificate it lists gets 401 (SAE, peer KME and operator alike). A CRL that
    /// cannot be read, is not signed by the CA or is past its nextUpdate refuses everyone.
    #[serde(default)]
    pub crl: Option<PathBuf>,
}

/// The limits reported in Status. Sizes in bits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub key_size: u64,
    pub min_key_size: u64,
    pub max_key_size: u64,
    pub max_key_per_request: u64,
    /// Capacity of each pool, in keys of `key_size` bits.
    pub max_key_count: u64,
    /// Additional slave SAEs allowed in one request (0 = no multicast).
    pub max_sae_id_count: u64,
    /// Largest accepted request body, bytes.
    pub max_body_bytes: usize,
    /// Seconds a key waits for its slaves before it is erased unfetched.
    pub key_ttl_secs: u64,
    /// Bytes of memory that keys awaiting slaves attached here may take for one master SAE
    /// (each key counts its length plus 256 bytes for its record); beyond it Get key answers
    /// 503 until slaves fetch or keys expire. The default, 256 MiB, leaves room for the keys
    /// that clients in flight (or killed, until `key_ttl_secs`) leave unfetched.
    pub max_awaiting_bytes_per_master: u64,
    /// The same bound over all masters: the most memory keys awaiting slaves can take.
    pub max_awaiting_bytes: u64,
    /// With a durable store: bytes of each pool (stream) kept in memory at most; the rest
    /// is read back from the store's segment files when taken, so memory does not grow with
    /// the pools (16 MiB by default). Without a store, pools live in memory whole.
    pub memory_bytes_per_stream: u64,
}

impl Limits {
    /// The bound on keys awaiting slaves.
    pub fn awaiting_bound(&self) -> crate::pool::records::Bound {
        crate::pool::records::Bound {
            per_master: self.max_awaiting_bytes_per_master,
            total: self.max_awaiting_bytes,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            key_size: 256,
            min_key_size: 64,
            max_key_size: 65_536,
            max_key_per_request: 1024,
            max_key_count: 100_000,
            max_sae_id_count: 2,
            max_body_bytes: 256 * 1024,
            key_ttl_secs: 3600,
            max_awaiting_bytes_per_master: 256 << 20,
            max_awaiting_bytes: 1 << 30,
            memory_bytes_per_stream: 16 << 20,
        }
    }
}

/// Bounds of the HTTPS listener against slow, idle or oversized requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpLimits {
    /// Largest request head (request line and header fields), bytes; larger gets 431.
    pub max_head_bytes: usize,
    /// Most header fields in one request; more gets 431.
    pub max_headers: usize,
    /// Time from the connection (or the end of the previous request) until the whole head of
    /// a request has arrived, milliseconds; then 408 and the connection is closed.
    pub head_timeout_ms: u64,
    /// Time a request body may take to arrive, seconds; then 400 and nothing is done.
    pub body_timeout_secs: u64,
    /// An idle keep-alive connection is closed after this many seconds.
    pub keep_alive_secs: u64,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            max_head_bytes: 16 * 1024,
            max_headers: 64,
            head_timeout_ms: 5000,
            body_timeout_secs: 30,
            keep_alive_secs: 15,
        }
    }
}

/// How a link (or the local pool) produces key material.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkParams {
    /// Secure key rate in bytes per second; 0 = bulk (as fast as the machine goes).
    /// Ignored when `length_km` is set (the physical model gives the rate).
    pub rate_bytes_per_sec: u64,
    /// Size of one block of key material moved at a time.
    pub block_bytes: usize,
    /// Start with full pools (as if the link had been running), then produce at the rate.
    pub prefill: bool,
    /// Fibre length; when set, the rate and QBER come from the decoy-state BB84 model
    /// ([`qkd_sim::physics`]) with the `device` parameters.
    pub length_km: Option<f64>,
    /// Device and fibre parameters of the model.
    pub device: DeviceParams,
    /// Fraction of pulses an intercept-resend eavesdropper attacks (0 = none); an operator
    /// can change it at run time (`POST /admin/v1/links/{peer}/eavesdropper`).
    pub eavesdropper: f64,
    /// QBER above which the link aborts and produces no key.
    pub abort_qber: f64,
    /// Where the link's key comes from (`[peers.link.source]`, `kind = "simulated"` by
    /// default); see the `source` module for the drivers.
    pub source: SourceConfig,
}

impl Default for LinkParams {
    fn default() -> Self {
        LinkParams {
            // 10 Mbit/s: the order of a commercial link at ~10 km.
            rate_bytes_per_sec: 1_250_000,
            block_bytes: 64 * 1024,
            prefill: true,
            length_km: None,
            device: DeviceParams::default(),
            eavesdropper: 0.0,
            abort_qber: 0.11,
            source: SourceConfig::default(),
        }
    }
}

impl LinkParams {
    /// Checks the link's parameters; the message names the field under `prefix`.
    fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        if self.block_bytes == 0 || self.block_bytes > 16 << 20 {
            return Err(ConfigError(format!(
                "{prefix}.block_bytes: must be within 1..=16777216"
            )));
        }
        if let Some(l) = self.length_km {
            if !(0.0..=1000.0).contains(&l) {
                return Err(ConfigError(format!(
                    "{prefix}.length_km: must be within 0..=1000"
                )));
            }
        }
        self.device
            .validate()
            .map_err(|e| ConfigError(format!("{prefix}.device.{e}")))?;
        if !(0.0..=1.0).contains(&self.eavesdropper) {
            return Err(ConfigError(format!(
                "{prefix}.eavesdropper: must be within 0..=1"
            )));
        }
        if !(0.0..=0.5).contains(&self.abort_qber) {
            return Err(ConfigError(format!(
                "{prefix}.abort_qber: must be within 0..=0.5"
            )));
        }
        Ok(())
    }
}

/// A peer KME with which this KME shares a QKD link.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub kme_id: String,
    /// Base URL of the peer, e.g. `https://127.0.0.1:9443`.
    pub url: String,
    /// SAEs attached to the peer.
    #[serde(default)]
    pub saes: Vec<String>,
    #[serde(default)]
    pub link: LinkParams,
}

/// The whole configuration of one KME.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// This KME's ID (also the CN of its certificates).
    pub kme_id: String,
    /// Listen address of the 014 HTTPS interface.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// HTTP worker threads (0 = one per core).
    #[serde(default)]
    pub workers: usize,
    /// Plain-HTTP listener for Prometheus `/metrics` (none if unset).
    #[serde(default)]
    pub metrics_listen: Option<SocketAddr>,
    #[serde(default)]
    pub sae_id_field: SaeIdField,
    pub tls: Tls,
    #[serde(default)]
    pub limits: Limits,
    /// Bounds of the HTTPS listener (`[http]`).
    #[serde(default)]
    pub http: HttpLimits,
    /// SAEs attached to this KME.
    #[serde(default)]
    pub saes: Vec<String>,
    /// Key source for exchanges between SAEs of this KME.
    #[serde(default)]
    pub local: LinkParams,
    #[serde(default)]
    pub peers: Vec<Peer>,
    /// Operators allowed to use the admin interface, by the name in their certificate's
    /// operator SAN (`URI:urn:qkd:operator:<NAME>`; `certs` issues `operator-NAME.pem`).
    #[serde(default)]
    pub operators: Vec<String>,
    /// Operators allowed by certificate instead: SHA-256 fingerprints of their certificates
    /// (hex, `:` separators and case ignored, as `openssl x509 -fingerprint -sha256` prints).
    #[serde(default)]
    pub operator_fingerprints: Vec<String>,
    /// Folder of the durable key pool (the `pool::store` module): key bytes, key states, link
    /// positions, all crash-safe. Without it the pool lives in memory only: a restart then
    /// loses the keys awaiting slaves (it never hands a byte out twice either way).
    #[serde(default)]
    pub store_dir: Option<PathBuf>,
    /// Key relay through trusted nodes (`[relay]`): the network beyond this KME's own links.
    /// Absent: only SAEs of linked KMEs are reachable.
    #[serde(default)]
    pub relay: Option<RelaySettings>,
}

/// `[relay]`: how keys reach SAEs of KMEs this one has no QKD link to, hop by hop through
/// trusted nodes (see `service::relay`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelaySettings {
    /// The network's other QKD links, as pairs of KME IDs (this KME's own links are its
    /// `[[peers]]`).
    #[serde(default)]
    pub links: Vec<[String; 2]>,
    /// KMEs without a link to this one, and their SAEs.
    #[serde(default)]
    pub kmes: Vec<RemoteKme>,
    /// Most links a relayed key may cross.
    #[serde(default = "default_max_hops")]
    pub max_hops: usize,
    /// KMEs that keys must never be relayed through (they would see them).
    #[serde(default)]
    pub forbid: Vec<String>,
}

/// A KME of the network not linked to this one.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteKme {
    pub kme_id: String,
    #[serde(default)]
    pub saes: Vec<String>,
}

fn default_max_hops() -> usize {
    4
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8443))
}

impl Settings {
    /// Loads `path` (TOML) and applies `KMS_*` environment overrides, then validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let raw = config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Toml))
            .add_source(
                config::Environment::with_prefix("KMS")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true)
                    .list_separator(",")
                    .with_list_parse_key("saes"),
            )
            .build()
            .map_err(|e| ConfigError(e.to_string()))?;
        let mut s: Settings = raw
            .try_deserialize()
            .map_err(|e| ConfigError(e.to_string()))?;
        if let Some(base) = path.parent() {
            for p in [
                &mut s.tls.ca,
                &mut s.tls.cert,
                &mut s.tls.key,
                &mut s.tls.peer_cert,
                &mut s.tls.peer_key,
            ] {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
            if let Some(p) = s.tls.crl.as_mut().filter(|p| p.is_relative()) {
                *p = base.join(&*p);
            }
        }
        if let Some(base) = path.parent() {
            if let Some(d) = s.store_dir.as_mut().filter(|d| d.is_relative()) {
                *d = base.join(&*d);
            }
            s.local.source.resolve_paths(base);
            for p in &mut s.peers {
                p.link.source.resolve_paths(base);
            }
        }
        s.validate()?;
        Ok(s)
    }

    /// Checks the cross-field rules; the error names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let l = &self.limits;
        let err = |m: String| Err(ConfigError(m));
        if self.kme_id.is_empty() {
            return err("kme_id: must not be empty".into());
        }
        if l.min_key_size == 0 || !l.min_key_size.is_multiple_of(8) {
            return err("limits.min_key_size: must be a positive multiple of 8".into());
        }
        if !l.max_key_size.is_multiple_of(8) || l.max_key_size < l.min_key_size {
            return err("limits.max_key_size: must be a multiple of 8 and >= min_key_size".into());
        }
        if !l.key_size.is_multiple_of(8)
            || l.key_size < l.min_key_size
            || l.key_size > l.max_key_size
        {
            return err(
                "limits.key_size: must be a multiple of 8 within min_key_size..=max_key_size"
                    .into(),
            );
        }
        if l.max_key_per_request == 0 || l.max_key_per_request > 1_000_000 {
            return err("limits.max_key_per_request: must be within 1..=1000000".into());
        }
        if l.key_ttl_secs == 0 {
            return err("limits.key_ttl_secs: must be positive".into());
        }
        if l.max_key_count == 0 {
            return err("limits.max_key_count: must be positive".into());
        }
        let b = l.awaiting_bound();
        if b.per_master == 0 || b.total == 0 || b.per_master > b.total {
            return err(
                "limits.max_awaiting_bytes_per_master, limits.max_awaiting_bytes: must be positive, per master at most the total"
                    .into(),
            );
        }
        if l.max_key_size / 8 * l.max_key_per_request > 1 << 30 {
            return err(
                "limits.max_key_per_request: with max_key_size, one reply would exceed 1 GiB"
                    .into(),
            );
        }
        let h = &self.http;
        if h.max_head_bytes < 1024 || h.max_head_bytes > 128 * 1024 {
            return err("http.max_head_bytes: must be within 1024..=131072".into());
        }
        if h.max_headers == 0 || h.max_headers > 96 {
            return err("http.max_headers: must be within 1..=96".into());
        }
        if h.head_timeout_ms == 0 || h.body_timeout_secs == 0 || h.keep_alive_secs == 0 {
            return err(
                "http.head_timeout_ms, http.body_timeout_secs, http.keep_alive_secs: must be positive"
                    .into(),
            );
        }
        let mut seen = HashSet::new();
        let mut kmes = HashSet::new();
        kmes.insert(self.kme_id.as_str());
        for (i, p) in self.peers.iter().enumerate() {
            if !kmes.insert(p.kme_id.as_str()) {
                return err(format!(
                    "peers[{i}].kme_id: duplicate KME ID {:?}",
                    p.kme_id
                ));
            }
            if !(p.url.starts_with("https://")) {
                return err(format!("peers[{i}].url: must be an https:// URL"));
            }
            p.link.validate(&format!("peers[{i}].link"))?;
        }
        self.local.validate("local")?;
        let all = self.saes.iter().map(|s| ("saes", s)).chain(
            self.peers
                .iter()
                .flat_map(|p| p.saes.iter().map(|s| ("peers.saes", s))),
        );
        for (i, f) in self.operator_fingerprints.iter().enumerate() {
            let n = normalise_fingerprint(f);
            if n.len() != 64 || !n.bytes().all(|b| b.is_ascii_hexdigit()) {
                return err(format!(
                    "operator_fingerprints[{i}]: not a SHA-256 fingerprint (64 hex digits)"
                ));
            }
        }
        for (i, o) in self.operators.iter().enumerate() {
            if o.is_empty() || kmes.contains(o.as_str()) {
                return err(format!("operators[{i}]: {o:?} is empty or also a KME ID"));
            }
        }
        for (field, sae) in all {
            if sae.is_empty() {
                return err(format!("{field}: empty SAE ID"));
            }
            if kmes.contains(sae.as_str()) {
                return err(format!("{field}: SAE ID {sae:?} is also a KME ID"));
            }
            if self.operators.contains(sae) {
                return err(format!("{field}: SAE ID {sae:?} is also an operator name"));
            }
            if !seen.insert(sae.as_str()) {
                return err(format!("{field}: SAE ID {sae:?} is listed twice"));
            }
        }
        Ok(())
    }

    /// Map from every known SAE ID to the KME it is attached to.
    pub fn sae_homes(&self) -> HashMap<String, String> {
        let mut m = HashMap::new();
        for s in &self.saes {
            m.insert(s.clone(), self.kme_id.clone());
        }
        for p in &self.peers {
            for s in &p.saes {
                m.insert(s.clone(), p.kme_id.clone());
            }
        }
        for k in self.relay.iter().flat_map(|r| &r.kmes) {
            for s in &k.saes {
                m.entry(s.clone()).or_insert_with(|| k.kme_id.clone());
            }
        }
        m
    }
}

/// A SHA-256 fingerprint in the form [`mtls::server::PeerCert`] gives it: lower-case hex,
/// no separators (`sha256:` prefix, `:` and case ignored).
pub fn normalise_fingerprint(f: &str) -> String {
    let f = f.trim();
    let f = f
        .strip_prefix("sha256:")
        .or_else(|| f.strip_prefix("SHA256:"))
        .unwrap_or(f);
    f.chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect()
}

/// Which source feeds a link, per link in the KME configuration (`[peers.link.source]`).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SourceConfig {
    /// Simulated link: the producer draws a seed per run and both ends derive blocks from it
    /// (stands in for a device; computationally secret only). The physical model sets the
    /// rate.
    #[default]
    Simulated,
    /// Faithful simulator: both ends run BB84 on simulated photons (sifting, parameter
    /// estimation, Cascade, verification, Toeplitz privacy amplification) over the
    /// KME-to-KME channel; see [`qkd_sim::bb84`] and the `source` module. Uses the link's
    /// `length_km` (10 km if unset),
    /// `device`, `eavesdropper` and `abort_qber`.
    Bb84 {
        /// Pulses per protocol frame (default 12,000,000: about 86 kbit of final key per frame
        /// at 10 km).
        #[serde(default = "default_pulses")]
        pulses_per_frame: u64,
    },
    /// A directory where a QKD device drops files of final key, identically named at both
    /// ends.
    KeyFiles {
        /// The directory (relative paths are resolved against the configuration file's
        /// folder).
        dir: PathBuf,
        /// How often to look for new files, milliseconds.
        #[serde(default = "default_poll_ms")]
        poll_ms: u64,
    },
    /// A vendor KME that exposes ETSI GS QKD 014: this KME is an SAE of it.
    #[serde(rename = "upstream-014")]
    Upstream014 {
        /// Base URL of the vendor KME, e.g. `https://10.0.0.1:443`.
        url: String,
        /// CA certificate of the vendor KME (PEM).
        ca: PathBuf,
        /// This KME's SAE certificate and key at the vendor KME (PEM).
        cert: PathBuf,
        key: PathBuf,
        /// SAE ID under which the *other* end of the link is known to its vendor KME
        /// (slave ID for enc_keys at the producer, master ID for dec_keys at the far end).
        peer_sae_id: String,
        /// Key size asked for, bits.
        #[serde(default = "default_upstream_key_size")]
        key_size: u64,
        /// Keys asked for per request.
        #[serde(default = "default_upstream_keys")]
        keys_per_request: u64,
    },
}

fn default_pulses() -> u64 {
    12_000_000
}
fn default_poll_ms() -> u64 {
    200
}
fn default_upstream_key_size() -> u64 {
    256
}
fn default_upstream_keys() -> u64 {
    64
}

impl SourceConfig {
    /// Resolves relative paths against `base` (the configuration file's folder).
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        match self {
            SourceConfig::Simulated | SourceConfig::Bb84 { .. } => {}
            SourceConfig::KeyFiles { dir, .. } => fix(dir),
            SourceConfig::Upstream014 { ca, cert, key, .. } => {
                fix(ca);
                fix(cert);
                fix(key);
            }
        }
    }
}
