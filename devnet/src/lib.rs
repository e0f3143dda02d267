//! A QKD network on loopback: PKI, one KME process per site, links, and `devnet.json`.
//!
//! Used by the `devnet` command and by the end-to-end tests, which start real `kms-server`
//! processes with real certificates on 127.0.0.1.
//!
//! Sites are named `A`, `B`, `C`, ...; site `X` runs KME `KME_X` with SAEs `SAE_X1`,
//! `SAE_X2`, ... The default topology is the seed's: A linked to B and to C.

pub mod bench;
pub mod cpu;
pub mod fastq;
pub mod fill;
pub mod garage;
pub mod monitor;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// How to build the network.
#[derive(Debug, Clone)]
pub struct Options {
    pub sites: usize,
    /// Links as pairs of site indices; `None` = the seed's star around site 0.
    pub links: Option<Vec<(usize, usize)>>,
    pub saes_per_site: usize,
    /// Link key rate, bytes/s (0 = bulk).
    pub rate_bytes_per_sec: u64,
    pub max_key_count: u64,
    pub max_key_per_request: u64,
    /// Largest key a KME hands out, bits.
    pub max_key_size: u64,
    /// Size of the blocks the links move, bytes.
    pub block_bytes: usize,
    /// Start a backup site agent per site (and write client configurations).
    pub agents: bool,
    /// TOML appended to every KME config (after the `[[peers]]` tables).
    pub extra_toml: String,
    /// Fibre length of every link; the rate then comes from the physical model.
    pub length_km: Option<f64>,
    /// Keep the KMEs' key pools in memory only (no `store_dir`; not crash-safe).
    pub volatile_kmes: bool,
    /// Key source of a link end: `(site, peer site, TOML body of [peers.link.source])`.
    /// `{dir}` in the body stands for the devnet folder, `{url_N}` for site N's KME URL.
    /// Links not listed use the simulator.
    pub link_sources: Vec<(usize, usize, String)>,
    /// Body of every KME's `[local]` table instead of the link rate and block size.
    pub local_toml: Option<String>,
    /// Lines added to every KME's `[limits]` table.
    pub limits_toml: String,
    /// Write an empty CRL (`pki/crl.pem`, signed by the CA) and give it to every KME as
    /// `tls.crl`; `certs --dir DIR/pki --revoke CERT.pem` then revokes a certificate live.
    pub crl: bool,
    /// Lines of every backup agent's `[limits]` table.
    pub agent_limits_toml: String,
    /// Start `qkd-dashboard` with the operator's certificate (`devnet up` does).
    pub dashboard: bool,
    /// Give every KME the rest of the network (`[relay]`: the other links, the other KMEs'
    /// SAEs), so that keys reach SAEs of KMEs it has no link to, relayed through trusted
    /// nodes. Off: only linked KMEs are reachable.
    pub relay: bool,
    /// Lines added to every KME's `[relay]` table (e.g. `max_hops = 2`).
    pub relay_toml: String,
    /// Keep every site's shares in its own Garage node (S3) instead of a local folder.
    pub s3: bool,
    /// Lines added to every agent's `[s3]` table (e.g. `retry_timeout_secs = 5`).
    pub s3_toml: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            sites: 3,
            links: None,
            saes_per_site: 2,
            rate_bytes_per_sec: 1_250_000,
            max_key_count: 100_000,
            max_key_per_request: 1024,
            max_key_size: 1_048_576,
            block_bytes: 256 * 1024,
            agents: true,
            extra_toml: String::new(),
            length_km: None,
            volatile_kmes: false,
            link_sources: Vec::new(),
            local_toml: None,
            limits_toml: String::new(),
            crl: false,
            agent_limits_toml: String::new(),
            dashboard: false,
            relay: true,
            relay_toml: String::new(),
            s3: false,
            s3_toml: String::new(),
        }
    }
}

/// One SAE identity in `devnet.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SaeInfo {
    pub id: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// One site in `devnet.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SiteInfo {
    pub name: String,
    pub kme_id: String,
    pub kme_url: String,
    pub saes: Vec<SaeInfo>,
    pub kme_config: PathBuf,
    pub kme_log: PathBuf,
    pub kme_pid: u32,
    /// Prometheus metrics of the KME (plain HTTP).
    #[serde(default)]
    pub metrics_url: String,
    /// `https://127.0.0.1:port` of the backup site agent.
    #[serde(default)]
    pub agent_url: String,
    #[serde(default)]
    pub agent_sae_id: String,
    /// A ready configuration for `backup-client --config PATH store|restore|list|verify`
    /// run at this site.
    #[serde(default)]
    pub client_config: PathBuf,
    #[serde(default)]
    pub agent_config: PathBuf,
    #[serde(default)]
    pub agent_log: PathBuf,
    #[serde(default)]
    pub agent_pid: u32,
    /// Where the agent keeps its shares.
    #[serde(default)]
    pub store_dir: PathBuf,
    /// `http://127.0.0.1:port` of the agent's operator listener (`/metrics`, `/jobs`).
    #[serde(default)]
    pub agent_metrics_url: String,
    /// With `--s3`: the site's Garage node (S3 API address, bucket, the agent's
    /// credentials file, configuration, log, pid); the agent keeps its shares there and
    /// `store_dir` is empty.
    #[serde(default)]
    pub s3: Option<S3Info>,
}

/// A site's object store in `devnet.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct S3Info {
    pub endpoint: String,
    pub region: String,
    pub bucket: String,
    pub credentials: PathBuf,
    pub garage_config: PathBuf,
    pub garage_log: PathBuf,
    pub garage_pid: u32,
}

/// The contents of `devnet.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DevnetInfo {
    pub ca_cert: PathBuf,
    pub sites: Vec<SiteInfo>,
    pub links: Vec<[String; 2]>,
    /// The operator identity (for the KMEs' admin interface, e.g. the eavesdropper switch).
    #[serde(default)]
    pub operator: Option<SaeInfo>,
    /// The network view (`qkd-dashboard` with the operator's certificate), with its token.
    #[serde(default)]
    pub dashboard_url: String,
    #[serde(default)]
    pub dashboard_pid: u32,
    /// A Prometheus configuration for this network (`prometheus --config.file=...`).
    #[serde(default)]
    pub prometheus_config: PathBuf,
}

impl DevnetInfo {
    pub fn load(dir: &Path) -> Result<Self> {
        let p = dir.join("devnet.json");
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("{}: no devnet here (run `devnet up` first)", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a devnet.json", p.display()))
    }

    /// The links as `KME_A-KME_B, KME_A-KME_C`.
    pub fn links_text(&self) -> String {
        self.links
            .iter()
            .map(|[a, b]| format!("{a}-{b}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// A 014 client for SAE `sae` at its site's KME.
    pub fn client(&self, sae: &str) -> Result<etsi_spec::Client> {
        let site = self
            .sites
            .iter()
            .find(|s| s.saes.iter().any(|x| x.id == sae))
            .with_context(|| format!("no SAE {sae} in the devnet"))?;
        let id = site.saes.iter().find(|x| x.id == sae).context("SAE")?;
        let ca = std::fs::read(&self.ca_cert)?;
        let ident = etsi_spec::Identity::from_files(&id.cert, &id.key)?;
        Ok(etsi_spec::Client::new(&site.kme_url, &ca, Some(&ident))?)
    }
}

/// A running network. Dropping it stops the KMEs unless [`Devnet::detach`] was called.
pub struct Devnet {
    pub dir: PathBuf,
    pub info: DevnetInfo,
    children: Vec<Option<Child>>,
    agents: Vec<Option<Child>>,
    /// Garage nodes (with `s3`), by site.
    garages: Vec<Option<Child>>,
    garage_nodes: Vec<Option<garage::Node>>,
    /// The dashboard.
    others: Vec<Child>,
    detached: bool,
}

/// CN of the devnet's operator certificate (allowed on the KMEs' admin interface).
pub const OPERATOR: &str = "OPERATOR";

/// Letter name of site `i`.
pub fn site_name(i: usize) -> String {
    ((b'A' + (i % 26) as u8) as char).to_string()
}

/// Parses a topology like `A-B,A-C,B-C` into site index pairs.
pub fn parse_links(spec: &str, sites: usize) -> Result<Vec<(usize, usize)>> {
    let mut out = Vec::new();
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((a, b)) = part.split_once('-') else {
            bail!("link {part:?}: expected two site names joined by '-', e.g. A-B");
        };
        let idx = |n: &str| -> Result<usize> {
            let n = n.trim();
            (0..sites)
                .find(|&i| site_name(i).eq_ignore_ascii_case(n))
                .with_context(|| format!("link {part:?}: no site {n:?} among {sites} sites"))
        };
        let (a, b) = (idx(a)?, idx(b)?);
        if a == b {
            bail!("link {part:?}: a site cannot link to itself");
        }
        if !out.contains(&(a.min(b), a.max(b))) {
            out.push((a.min(b), a.max(b)));
        }
    }
    Ok(out)
}

/// A free TCP port on 127.0.0.1 (bound then released), chosen below the kernel's ephemeral
/// range (32768 and up) so that outgoing connections of parallel tests cannot take it
/// before the server binds it.
static USED_PORTS: std::sync::Mutex<std::collections::BTreeSet<u16>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ (u64::from(std::process::id()) << 32);
    for _ in 0..1000 {
        let mut x = seed ^ NEXT.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed);
        x ^= x >> 31;
        x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x ^= x >> 29;
        let port = 20_000 + (x % 12_000) as u16;
        // Never hand out a port twice in this process: parallel tests pick theirs before
        // their servers bind them.
        let mut used = USED_PORTS
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if used.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            used.insert(port);
            return Ok(port);
        }
    }
    bail!("no free TCP port found in 20000..32000 on 127.0.0.1")
}

/// Finds a workspace binary next to the running executable (or in its parent, for tests).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    // DEVNET_ prefix: `backup-client` reads every BACKUP_* variable as a setting.
    let env = format!("DEVNET_{}_BIN", name.to_uppercase().replace('-', "_"));
    if let Some(p) = std::env::var_os(&env) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent().map(Path::to_path_buf);
    while let Some(d) = dir {
        let cand = d.join(name);
        if cand.is_file() {
            return Ok(cand);
        }
        if d.file_name().is_some_and(|n| n == "target") {
            break;
        }
        dir = d.parent().map(Path::to_path_buf);
    }
    bail!("cannot find the `{name}` binary next to {}; build the workspace first (`cargo build --release`) or set {env}", exe.display())
}

/// 128 bits from the OS's random source (a dashboard token).
fn rand_u128() -> Result<u128> {
    use std::io::Read;
    let mut b = [0u8; 16];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom for the dashboard's token")?;
    Ok(u128::from_le_bytes(b))
}

/// SAE IDs of the site named `site`: `SAE_<site>1`, `SAE_<site>2`, ...
fn site_sae_ids(site: &str, count: usize) -> Vec<String> {
    (1..=count).map(|j| format!("SAE_{site}{j}")).collect()
}

/// SAE ID of the backup agent of the site named `site`.
fn site_agent_id(site: &str) -> String {
    format!("AGENT_{site}")
}

/// `n` free ports (see [`free_port`]).
fn free_ports(n: usize) -> Result<Vec<u16>> {
    (0..n).map(|_| free_port()).collect()
}

/// Everything about a network that is fixed before any process starts: the sites' names,
/// KME and SAE identities, links, PKI and ports.
struct Plan<'a> {
    opts: &'a Options,
    dir: PathBuf,
    links: Vec<(usize, usize)>,
    names: Vec<String>,
    kme_ids: Vec<String>,
    pki: certs::DevPki,
    operator: certs::IdentityFiles,
    ports: Vec<u16>,
    metrics_ports: Vec<u16>,
    agent_ports: Vec<u16>,
    agent_metrics_ports: Vec<u16>,
    /// (RPC, S3) ports of the sites' Garage nodes, with `s3`.
    garage_ports: Vec<(u16, u16)>,
}

/// The files of one site in the devnet folder.
struct SiteFiles {
    kme_config: PathBuf,
    kme_log: PathBuf,
    site_dir: PathBuf,
    /// Where the agent keeps its shares.
    store_dir: PathBuf,
    agent_config: PathBuf,
    client_config: PathBuf,
    agent_log: PathBuf,
}

impl<'a> Plan<'a> {
    /// Checks the options, creates `dir`, generates the PKI and picks the ports.
    fn new(dir: &Path, opts: &'a Options) -> Result<Self> {
        if opts.sites == 0 || opts.sites > 26 {
            bail!("--sites must be within 1..=26");
        }
        // Keys, shares, genomes, logs: everything this process and the KMEs, agents and clients
        // it starts create is for this user alone (process-wide, inherited by children).
        rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let links = match &opts.links {
            Some(l) => l.clone(),
            None => (1..opts.sites).map(|i| (0, i)).collect(),
        };
        let names: Vec<String> = (0..opts.sites).map(site_name).collect();
        let kme_ids: Vec<String> = names.iter().map(|n| format!("KME_{n}")).collect();
        let all_saes: Vec<String> = names
            .iter()
            .flat_map(|n| site_sae_ids(n, opts.saes_per_site))
            .collect();
        let all_agents: Vec<String> = if opts.agents {
            names.iter().map(|n| site_agent_id(n)).collect()
        } else {
            Vec::new()
        };
        let pki_dir = dir.join("pki");
        let pki = certs::DevPki::generate_with_agents(&pki_dir, &kme_ids, &all_saes, &all_agents)?;
        let ca = certs::Ca::load(&pki.ca.cert, &pki.ca.key)?;
        let operator = ca.issue_to(&pki_dir, OPERATOR, certs::Purpose::Operator)?;
        if opts.crl {
            ca.write_crl(&pki_dir, &[])?;
        }
        let ports = free_ports(opts.sites)?;
        let metrics_ports = free_ports(opts.sites)?;
        let agent_ports = free_ports(opts.sites)?;
        let agent_metrics_ports = free_ports(opts.sites)?;
        let garage_ports = if opts.s3 && opts.agents {
            (0..opts.sites)
                .map(|_| Ok((free_port()?, free_port()?)))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        Ok(Plan {
            opts,
            dir,
            links,
            names,
            kme_ids,
            pki,
            operator,
            ports,
            metrics_ports,
            agent_ports,
            agent_metrics_ports,
            garage_ports,
        })
    }

    /// The user SAEs of site `i`.
    fn sae_ids(&self, i: usize) -> Vec<String> {
        site_sae_ids(&self.names[i], self.opts.saes_per_site)
    }

    /// The SAE ID of site `i`'s backup agent.
    fn agent_id(&self, i: usize) -> String {
        site_agent_id(&self.names[i])
    }

    /// SAEs attached to site i's KME: its users, then its agent.
    fn attached(&self, i: usize) -> Vec<String> {
        let mut v = self.sae_ids(i);
        if self.opts.agents {
            v.push(self.agent_id(i));
        }
        v
    }

    /// The KME URL of site `i`.
    fn url(&self, i: usize) -> String {
        format!("https://127.0.0.1:{}", self.ports[i])
    }

    /// The backup agent URL of site `i`.
    fn agent_url(&self, i: usize) -> String {
        format!("https://127.0.0.1:{}", self.agent_ports[i])
    }

    /// The sites linked to site `i`, in the order of the links.
    fn peers(&self, i: usize) -> impl Iterator<Item = usize> + '_ {
        self.links.iter().filter_map(move |&(a, b)| {
            if a == i {
                Some(b)
            } else if b == i {
                Some(a)
            } else {
                None
            }
        })
    }

    fn files(&self, i: usize) -> SiteFiles {
        let name = &self.names[i];
        let site_dir = self.dir.join(format!("site-{name}"));
        SiteFiles {
            kme_config: self.dir.join(format!("kme-{name}.toml")),
            kme_log: self.dir.join("logs").join(format!("kme-{name}.log")),
            store_dir: site_dir.join("shares"),
            site_dir,
            agent_config: self.dir.join(format!("agent-{name}.toml")),
            client_config: self.dir.join(format!("client-{name}.toml")),
            agent_log: self.dir.join("logs").join(format!("agent-{name}.log")),
        }
    }

    /// The configuration of site `i`'s KME.
    fn kme_toml(&self, i: usize) -> String {
        let mut toml = self.kme_tables_toml(i);
        for j in self.peers(i) {
            toml.push_str(&self.peer_toml(i, j));
        }
        if self.opts.relay {
            toml.push_str(&self.relay_toml(i));
        }
        if !self.opts.volatile_kmes {
            // Top-level key, so it goes before the first table.
            let store = self.dir.join(format!("kme-store-{}", self.names[i]));
            toml.insert_str(0, &format!("store_dir = \"{}\"\n", store.display()));
        }
        toml.push_str(&self.opts.extra_toml);
        toml
    }

    /// Site `i`'s KME configuration up to the `[[peers]]` tables.
    fn kme_tables_toml(&self, i: usize) -> String {
        let opts = self.opts;
        let pki = &self.pki;
        format!(
            "kme_id = \"{kme}\"\nlisten = \"127.0.0.1:{port}\"\nsaes = {saes:?}\noperators = [\"{OPERATOR}\"]\nmetrics_listen = \"127.0.0.1:{mport}\"\n\n\
             [tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\npeer_cert = \"{pc}\"\npeer_key = \"{pk}\"\n{crl}\n\
             [limits]\nmax_key_count = {mkc}\nmax_key_per_request = {mkr}\nmax_key_size = {mks}\n{extra_limits}\n\
             [local]\n{local}\n",
            kme = self.kme_ids[i],
            port = self.ports[i],
            mport = self.metrics_ports[i],
            saes = self.attached(i),
            ca = pki.ca.cert.display(),
            cert = pki.kme_servers[i].cert.display(),
            key = pki.kme_servers[i].key.display(),
            pc = pki.kme_peers[i].cert.display(),
            pk = pki.kme_peers[i].key.display(),
            mkc = opts.max_key_count,
            mkr = opts.max_key_per_request,
            mks = opts.max_key_size,
            crl = if opts.crl {
                format!("crl = \"{}\"\n", pki.dir.join("crl.pem").display())
            } else {
                String::new()
            },
            extra_limits = opts.limits_toml,
            local = opts.local_toml.clone().unwrap_or_else(|| format!(
                "rate_bytes_per_sec = {}\nblock_bytes = {}",
                opts.rate_bytes_per_sec, opts.block_bytes
            )),
        )
    }

    /// The `[relay]` table of site `i`'s KME: the links it is not part of, and the KMEs it
    /// has no link to, with their SAEs.
    fn relay_toml(&self, i: usize) -> String {
        let links: Vec<[String; 2]> = self
            .links
            .iter()
            .filter(|&&(a, b)| a != i && b != i)
            .map(|&(a, b)| [self.kme_ids[a].clone(), self.kme_ids[b].clone()])
            .collect();
        let mut toml = format!("\n[relay]\nlinks = {links:?}\n{}\n", self.opts.relay_toml);
        let linked: Vec<usize> = self.peers(i).collect();
        for j in (0..self.opts.sites).filter(|j| *j != i && !linked.contains(j)) {
            toml.push_str(&format!(
                "[[relay.kmes]]\nkme_id = \"{}\"\nsaes = {:?}\n",
                self.kme_ids[j],
                self.attached(j)
            ));
        }
        toml
    }

    /// The `[[peers]]` table of site `i`'s KME for its link to site `j`.
    fn peer_toml(&self, i: usize, j: usize) -> String {
        let opts = self.opts;
        let length = opts
            .length_km
            .map(|l| format!("length_km = {l:?}\n"))
            .unwrap_or_default();
        let mut toml = format!(
            "\n[[peers]]\nkme_id = \"{}\"\nurl = \"{}\"\nsaes = {:?}\n[peers.link]\nrate_bytes_per_sec = {}\nblock_bytes = {}\n{length}",
            self.kme_ids[j],
            self.url(j),
            self.attached(j),
            opts.rate_bytes_per_sec,
            opts.block_bytes
        );
        if let Some((_, _, body)) = opts
            .link_sources
            .iter()
            .find(|(a, b, _)| *a == i && *b == j)
        {
            let mut body = body.replace("{dir}", &self.dir.display().to_string());
            for k in 0..opts.sites {
                body = body.replace(&format!("{{url_{k}}}"), &self.url(k));
            }
            toml.push_str(&format!("[peers.link.source]\n{body}\n"));
        }
        toml
    }

    /// The configuration of site `i`'s backup agent.
    fn agent_toml(
        &self,
        i: usize,
        agent: &certs::IdentityFiles,
        store_dir: &Path,
        s3: Option<&garage::Node>,
    ) -> String {
        let mut toml = format!(
            "sae_id = \"{}\"\nlisten = \"127.0.0.1:{}\"\nmetrics_listen = \"127.0.0.1:{}\"\nkme_url = \"{}\"\n{}\
             # every SAE of the network may use the agent\n\
             allowed_clients = {:?}\n\
             # the first client of every site may read every backup (restore anywhere after a \
             disaster); others read what the owner allowed\n\
             recovery_clients = {:?}\n\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n\n[limits]\n{}\n",
            self.agent_id(i),
            self.agent_ports[i],
            self.agent_metrics_ports[i],
            self.url(i),
            match s3 {
                Some(_) => String::new(),
                None => format!("store_dir = \"{}\"\n", store_dir.display()),
            },
            (0..self.opts.sites)
                .flat_map(|j| self.sae_ids(j))
                .collect::<Vec<_>>(),
            (0..self.opts.sites)
                .map(|j| self.sae_ids(j)[0].clone())
                .collect::<Vec<_>>(),
            self.pki.ca.cert.display(),
            agent.cert.display(),
            agent.key.display(),
            self.opts.agent_limits_toml,
        );
        if let Some(node) = s3 {
            toml.push_str(&node.agent_toml(&self.opts.s3_toml));
        }
        toml
    }

    /// The `backup-client` configuration for site `i` (its first SAE, every site's agent).
    fn client_toml(&self, i: usize, site_dir: &Path) -> Result<String> {
        let client_sae = &self.sae_ids(i)[0];
        let client_files = self
            .pki
            .saes
            .iter()
            .find(|s| &s.id == client_sae)
            .context("client certificate")?;
        let mut client = format!(
            "site = \"{}\"\nsae_id = \"{}\"\nkme_url = \"{}\"\nstate_dir = \"{}\"\n\n\
             [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            self.names[i],
            client_sae,
            self.url(i),
            site_dir.join("client-state").display(),
            self.pki.ca.cert.display(),
            client_files.cert.display(),
            client_files.key.display(),
        );
        for (j, name) in self.names.iter().enumerate() {
            client.push_str(&format!(
                "\n[[sites]]\nname = \"{}\"\nagent_url = \"{}\"\nagent_sae_id = \"{}\"\n",
                name,
                self.agent_url(j),
                self.agent_id(j)
            ));
        }
        Ok(client)
    }

    /// Writes site `i`'s configurations and starts its KME, then (with `agent_bin`) its
    /// agent; the processes go into `guard`.
    fn start_site(
        &self,
        i: usize,
        kme_bin: &Path,
        agent_bin: Option<&Path>,
        guard: &mut Devnet,
    ) -> Result<SiteInfo> {
        let files = self.files(i);
        std::fs::write(&files.kme_config, self.kme_toml(i))?;
        let child = spawn(kme_bin, &["--config"], &files.kme_config, &files.kme_log)?;
        let kme_pid = child.id();
        guard.children.push(Some(child));
        let mut agent_pid = 0;
        if let Some(bin) = agent_bin {
            agent_pid = self.start_agent(i, bin, &files, guard)?;
        }
        let s3 = guard.s3_info(i);
        Ok(self.site_info(i, files, kme_pid, agent_pid, s3))
    }

    /// Writes site `i`'s agent and client configurations and starts its agent; returns its
    /// pid.
    fn start_agent(
        &self,
        i: usize,
        bin: &Path,
        files: &SiteFiles,
        guard: &mut Devnet,
    ) -> Result<u32> {
        let agent_files = self
            .pki
            .agents
            .iter()
            .find(|a| a.id == self.agent_id(i))
            .context("agent certificate")?;
        let node = self.start_garage(i, files, guard)?;
        if node.is_none() {
            std::fs::create_dir_all(&files.store_dir)?;
        }
        std::fs::write(
            &files.agent_config,
            self.agent_toml(i, agent_files, &files.store_dir, node.as_ref()),
        )?;
        std::fs::write(&files.client_config, self.client_toml(i, &files.site_dir)?)?;
        let agent = spawn(
            bin,
            &["serve", "--config"],
            &files.agent_config,
            &files.agent_log,
        )?;
        let agent_pid = agent.id();
        guard.agents.push(Some(agent));
        Ok(agent_pid)
    }

    /// With `s3`: plans, starts and provisions site `i`'s Garage node (into `guard`).
    fn start_garage(
        &self,
        i: usize,
        files: &SiteFiles,
        guard: &mut Devnet,
    ) -> Result<Option<garage::Node>> {
        let Some(&(rpc, s3)) = self.garage_ports.get(i) else {
            guard.garages.push(None);
            guard.garage_nodes.push(None);
            return Ok(None);
        };
        let bin = garage::binary()?;
        std::fs::create_dir_all(&files.site_dir)?;
        let log = self
            .dir
            .join("logs")
            .join(format!("garage-{}.log", self.names[i]));
        let node = garage::Node::plan(&self.names[i], &files.site_dir, log, rpc, s3)?;
        let mut child = node.spawn(&bin, false)?;
        let provisioned = node.provision(&bin, &mut child);
        guard.garages.push(Some(child));
        guard.garage_nodes.push(Some(node.clone()));
        provisioned.with_context(|| format!("Garage node of site {}", self.names[i]))?;
        Ok(Some(node))
    }

    /// Site `i` in `devnet.json`; the agent fields stay empty without agents.
    fn site_info(
        &self,
        i: usize,
        files: SiteFiles,
        kme_pid: u32,
        agent_pid: u32,
        s3: Option<S3Info>,
    ) -> SiteInfo {
        let agents = self.opts.agents;
        let path = |p: PathBuf| if agents { p } else { PathBuf::new() };
        let text = |s: String| if agents { s } else { String::new() };
        let store_dir = if s3.is_some() {
            PathBuf::new()
        } else {
            path(files.store_dir.clone())
        };
        SiteInfo {
            name: self.names[i].clone(),
            kme_id: self.kme_ids[i].clone(),
            kme_url: self.url(i),
            saes: self
                .sae_ids(i)
                .into_iter()
                .map(|id| {
                    let f = self.pki.saes.iter().find(|s| s.id == id);
                    SaeInfo {
                        cert: f.map(|f| f.cert.clone()).unwrap_or_default(),
                        key: f.map(|f| f.key.clone()).unwrap_or_default(),
                        id,
                    }
                })
                .collect(),
            kme_config: files.kme_config,
            kme_log: files.kme_log,
            kme_pid,
            metrics_url: format!("http://127.0.0.1:{}/metrics", self.metrics_ports[i]),
            agent_url: text(self.agent_url(i)),
            agent_sae_id: text(self.agent_id(i)),
            client_config: path(files.client_config),
            agent_config: path(files.agent_config),
            agent_log: path(files.agent_log),
            agent_pid,
            store_dir,
            agent_metrics_url: text(format!("http://127.0.0.1:{}", self.agent_metrics_ports[i])),
            s3,
        }
    }

    /// Starts the network view with the operator's certificate; records its address.
    fn start_dashboard(&self, info: &mut DevnetInfo, guard: &mut Devnet) -> Result<()> {
        let port = free_port()?;
        let token = format!("{:032x}", rand_u128()?);
        let child = monitor::start_dashboard(&monitor::DashboardArgs {
            info,
            cert: &self.operator.cert,
            key: &self.operator.key,
            port,
            token: &token,
            log: &self.dir.join("logs").join("dashboard.log"),
        })?;
        info.dashboard_pid = child.id();
        info.dashboard_url = monitor::dashboard_url(port, &token);
        guard.others.push(child);
        if !listening(&format!("127.0.0.1:{port}"), Duration::from_secs(20)) {
            bail!(
                "qkd-dashboard not listening after 20 s; see {}",
                self.dir.join("logs").join("dashboard.log").display()
            );
        }
        Ok(())
    }

    /// The contents of `devnet.json`.
    fn info(&self, sites: Vec<SiteInfo>) -> DevnetInfo {
        DevnetInfo {
            ca_cert: self.pki.ca.cert.clone(),
            operator: Some(SaeInfo {
                id: OPERATOR.to_owned(),
                cert: self.operator.cert.clone(),
                key: self.operator.key.clone(),
            }),
            sites,
            dashboard_url: String::new(),
            dashboard_pid: 0,
            prometheus_config: PathBuf::new(),
            links: self
                .links
                .iter()
                .map(|&(a, b)| [self.kme_ids[a].clone(), self.kme_ids[b].clone()])
                .collect(),
        }
    }
}

impl Devnet {
    /// Generates a PKI and configs in `dir`, starts one KME per site, and waits until every
    /// link delivers key.
    pub fn start(dir: &Path, opts: &Options) -> Result<Self> {
        let plan = Plan::new(dir, opts)?;
        let kme_bin = sibling_binary("kms-server")?;
        let agent_bin = if opts.agents {
            Some(sibling_binary("backup-client")?)
        } else {
            None
        };
        std::fs::create_dir_all(plan.dir.join("logs"))?;

        let mut sites = Vec::new();
        // Until the network is up, a failure stops whatever was started (Drop of `guard`).
        let mut guard = Devnet::empty(plan.dir.clone());
        for i in 0..opts.sites {
            sites.push(plan.start_site(i, &kme_bin, agent_bin.as_deref(), &mut guard)?);
        }
        let mut info = plan.info(sites);
        info.prometheus_config = monitor::write_prometheus(&plan.dir, &info)?;
        if opts.dashboard {
            plan.start_dashboard(&mut info, &mut guard)?;
        }
        std::fs::write(
            plan.dir.join("devnet.json"),
            serde_json::to_string_pretty(&info)?,
        )?;
        guard.info = info;
        let mut net = guard;
        net.wait_ready(Duration::from_secs(60))?;
        Ok(net)
    }

    /// A network in `dir` with no processes yet and an empty description.
    fn empty(dir: PathBuf) -> Self {
        Devnet {
            dir,
            info: DevnetInfo {
                ca_cert: PathBuf::new(),
                operator: None,
                sites: Vec::new(),
                links: Vec::new(),
                dashboard_url: String::new(),
                dashboard_pid: 0,
                prometheus_config: PathBuf::new(),
            },
            children: Vec::new(),
            agents: Vec::new(),
            garages: Vec::new(),
            garage_nodes: Vec::new(),
            others: Vec::new(),
            detached: false,
        }
    }

    /// Waits until every KME answers and every link (and local pool) holds key.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        // Polls from a thread of its own, so callers may be inside an async runtime.
        std::thread::scope(|scope| {
            scope
                .spawn(|| self.wait_ready_blocking(timeout))
                .join()
                .unwrap_or_else(|_| bail!("readiness check panicked"))
        })
    }

    fn wait_ready_blocking(&mut self, timeout: Duration) -> Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let deadline = Instant::now() + timeout;
        let mut pairs = Vec::new();
        for s in &self.info.sites {
            pairs.push((
                s.saes[0].id.clone(),
                s.saes.get(1).unwrap_or(&s.saes[0]).id.clone(),
            ));
        }
        for [a, b] in &self.info.links {
            let sa = self.site_by_kme(a)?;
            let sb = self.site_by_kme(b)?;
            pairs.push((sa.saes[0].id.clone(), sb.saes[0].id.clone()));
            pairs.push((sb.saes[0].id.clone(), sa.saes[0].id.clone()));
        }
        for (master, slave) in pairs {
            if master == slave {
                continue;
            }
            let client = self.info.client(&master)?;
            loop {
                for (i, c) in self.children.iter_mut().enumerate() {
                    if let Some(c) = c {
                        if let Some(status) = c.try_wait()? {
                            bail!(
                                "KME of site {} exited ({status}); see {}:\n{}",
                                self.info.sites[i].name,
                                self.info.sites[i].kme_log.display(),
                                log_tail(&self.info.sites[i].kme_log)
                            );
                        }
                    }
                }
                let ready = rt
                    .block_on(client.status(&slave))
                    .map(|s| s.stored_key_count > 0)
                    .unwrap_or(false);
                if ready {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("devnet not ready after {timeout:?}: no key between {master} and {slave}; logs in {}", self.dir.join("logs").display());
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        // Agents: listening.
        for (i, site) in self.info.sites.iter().enumerate() {
            let Some(addr) = site.agent_url.strip_prefix("https://") else {
                continue;
            };
            loop {
                if let Some(Some(c)) = self.agents.get_mut(i) {
                    if let Some(status) = c.try_wait()? {
                        bail!(
                            "agent of site {} exited ({status}); see {}",
                            site.name,
                            site.agent_log.display()
                        );
                    }
                }
                if std::net::TcpStream::connect(addr).is_ok() {
                    break;
                }
                if Instant::now() > deadline {
                    bail!(
                        "agent of site {} not listening after {timeout:?}; see {}",
                        site.name,
                        site.agent_log.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    pub fn site_by_kme(&self, kme: &str) -> Result<&SiteInfo> {
        self.info
            .sites
            .iter()
            .find(|s| s.kme_id == kme)
            .with_context(|| format!("no KME {kme}"))
    }

    /// Leaves the KMEs running when this value is dropped (for `devnet up`).
    pub fn detach(mut self) {
        self.detached = true;
    }

    /// Kills the KME and the agent of site `i` with SIGKILL.
    pub fn kill_site(&mut self, i: usize) {
        self.kill_agent(i);
        if let Some(mut c) = self.children.get_mut(i).and_then(Option::take) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills only the KME of site `i` with SIGKILL (a crash).
    pub fn kill_kme(&mut self, i: usize) {
        if let Some(mut c) = self.children.get_mut(i).and_then(Option::take) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the KME of site `i` again with its configuration (its log is appended to).
    pub fn restart_kme(&mut self, i: usize) -> Result<()> {
        self.kill_kme(i);
        let site = self.info.sites.get_mut(i).context("no such site")?;
        let bin = sibling_binary("kms-server")?;
        let child = spawn_logging(&bin, &["--config"], &site.kme_config, &site.kme_log, true)
            .context("restarting kms-server")?;
        site.kme_pid = child.id();
        if let Some(slot) = self.children.get_mut(i) {
            *slot = Some(child);
        }
        Ok(())
    }

    /// Starts the backup agent of site `i` again with its configuration (its log is appended
    /// to) and waits until it answers on its port.
    pub fn restart_agent(&mut self, i: usize) -> Result<()> {
        self.kill_agent(i);
        let site = self.info.sites.get_mut(i).context("no such site")?;
        let bin = sibling_binary("backup-client")?;
        let child = spawn_logging(
            &bin,
            &["serve", "--config"],
            &site.agent_config,
            &site.agent_log,
            true,
        )
        .context("restarting the site agent")?;
        site.agent_pid = child.id();
        let addr = site
            .agent_url
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_owned();
        if let Some(slot) = self.agents.get_mut(i) {
            *slot = Some(child);
        }
        if !listening(&addr, Duration::from_secs(20)) {
            bail!("site agent {i} did not come back on {addr}");
        }
        Ok(())
    }

    /// Site `i`'s object store as `devnet.json` describes it.
    fn s3_info(&self, i: usize) -> Option<S3Info> {
        let node = self.garage_nodes.get(i)?.as_ref()?;
        Some(S3Info {
            endpoint: node.endpoint.clone(),
            region: garage::REGION.to_owned(),
            bucket: garage::BUCKET.to_owned(),
            credentials: node.credentials.clone(),
            garage_config: node.config.clone(),
            garage_log: node.log.clone(),
            garage_pid: self
                .garages
                .get(i)
                .and_then(|c| c.as_ref())
                .map_or(0, Child::id),
        })
    }

    /// Kills site `i`'s Garage node with SIGKILL (the object store goes away mid-job).
    pub fn kill_garage(&mut self, i: usize) {
        if let Some(mut c) = self.garages.get_mut(i).and_then(Option::take) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts site `i`'s Garage node again with its data (its log is appended to) and
    /// waits until its S3 API listens.
    pub fn restart_garage(&mut self, i: usize) -> Result<()> {
        self.kill_garage(i);
        let node = self
            .garage_nodes
            .get(i)
            .and_then(Option::as_ref)
            .context("site has no Garage node (start the devnet with s3)")?
            .clone();
        let child = node.spawn(&garage::binary()?, true)?;
        if let Some(s3) = self.info.sites.get_mut(i).and_then(|s| s.s3.as_mut()) {
            s3.garage_pid = child.id();
        }
        self.garages[i] = Some(child);
        node.wait_s3(Duration::from_secs(30))
    }

    /// Kills the backup agent of site `i` with SIGKILL.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.agents.get_mut(i).and_then(Option::take) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Devnet {
    fn drop(&mut self) {
        if self.detached {
            return;
        }
        for c in self
            .agents
            .iter_mut()
            .chain(self.children.iter_mut())
            .chain(self.garages.iter_mut())
            .filter_map(Option::take)
            .chain(self.others.drain(..))
        {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Whether something accepts TCP connections on `addr` within `timeout` (polled).
pub(crate) fn listening(addr: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while std::net::TcpStream::connect(addr).is_err() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// The last lines of a log, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(8)..].join("\n")
}

fn spawn(bin: &Path, args: &[&str], cfg: &Path, log: &Path) -> Result<Child> {
    spawn_logging(bin, args, cfg, log, false)
}

/// Starts `bin ARGS CFG` in its own process group, stdout and stderr into `log` (appended to
/// when `append`, else truncated: a restart keeps the log of the first run).
fn spawn_logging(bin: &Path, args: &[&str], cfg: &Path, log: &Path, append: bool) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .append(append)
        .truncate(!append)
        .open(log)?;
    let err = out.try_clone()?;
    Command::new(bin)
        .args(args)
        .arg(cfg)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

/// Stops the KMEs listed in `DIR/devnet.json` (SIGTERM, then SIGKILL after 5 s).
pub fn down(dir: &Path) -> Result<usize> {
    let info = DevnetInfo::load(dir)?;
    let mut stopped = 0;
    let procs = info
        .sites
        .iter()
        .flat_map(|s| {
            [
                (s.agent_pid, "backup-client"),
                (s.kme_pid, "kms-server"),
                (s.s3.as_ref().map_or(0, |g| g.garage_pid), "garage"),
            ]
        })
        .chain([(info.dashboard_pid, "qkd-dashboard")]);
    for (pid, name) in procs {
        // Only signal a process that is still one of ours (pids get reused).
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if pid == 0 || !String::from_utf8_lossy(&cmdline).contains(name) {
            continue;
        }
        let pid = pid as libc::pid_t;
        // SAFETY: kill(2) with a pid read from our own devnet.json; no memory is touched.
        if unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
            stopped += 1;
            let deadline = Instant::now() + Duration::from_secs(5);
            // SAFETY: as above; signal 0 only checks that the process exists.
            while unsafe { libc::kill(pid, 0) } == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            // SAFETY: as above.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    Ok(stopped)
}

/// Whether two files have the same contents (streamed, 4 MiB at a time).
pub fn files_equal(a: &Path, b: &Path) -> Result<bool> {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    if fa.metadata()?.len() != fb.metadata()?.len() {
        return Ok(false);
    }
    let (mut ba, mut bb) = (vec![0u8; 4 << 20], vec![0u8; 4 << 20]);
    loop {
        let n = fa.read(&mut ba)?;
        if n == 0 {
            return Ok(true);
        }
        fb.read_exact(&mut bb[..n])?;
        if ba[..n] != bb[..n] {
            return Ok(false);
        }
    }
}
