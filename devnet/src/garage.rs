//! Garage object storage for `devnet up --s3`: every site's agent keeps its shares in a
//! bucket of that site's own single-node Garage (2.x), on loopback.
//!
//! One node per site, not one 3-node cluster for all: a site's shares must stay in that
//! site's storage. A cluster spanning the sites would put every share in one storage
//! system with one administrator and one set of keys, and k shares together are the file:
//! the secret sharing would be undone by the storage layer. Each site may of course run a
//! replicated cluster of its own; on one loopback machine a single node per site
//! (`replication_factor = 1`, `metadata_fsync` and `data_fsync` on, so an acknowledged PUT
//! is on disk) keeps the devnet's footprint small.
//!
//! The node is provisioned through Garage's own CLI: layout (one zone per site), an access
//! key imported with an ID and secret generated here (written 0600 as the agent's
//! credentials file), and a bucket the key owns.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// The bucket every site's agent uses (in its own Garage).
pub const BUCKET: &str = "shares";
/// The region the nodes sign with.
pub const REGION: &str = "garage";

/// One site's Garage node: its files and addresses.
#[derive(Debug, Clone)]
pub struct Node {
    pub config: PathBuf,
    pub log: PathBuf,
    /// `http://127.0.0.1:port` of its S3 API.
    pub endpoint: String,
    /// The agent's credentials file (TOML: access_key_id, secret_access_key).
    pub credentials: PathBuf,
    s3_port: u16,
    key_id: String,
    secret: String,
    zone: String,
}

/// The `garage` binary: `DEVNET_GARAGE_BIN`, else `garage` on the PATH, else cargo's bin
/// folder (where `scripts/setup` installs it).
pub fn binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("DEVNET_GARAGE_BIN") {
        return Ok(PathBuf::from(p));
    }
    let mut places: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        places.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        places.push(PathBuf::from(home).join(".cargo").join("bin"));
    }
    places
        .into_iter()
        .map(|d| d.join("garage"))
        .find(|p| p.is_file())
        .context("no `garage` binary (Garage 2.x) found on the PATH or in ~/.cargo/bin: run scripts/setup (it runs `cargo install --locked garage`) or set DEVNET_GARAGE_BIN")
}

/// The version of the `garage` binary `bin` (e.g. `2.5.0`), if it says.
pub fn version(bin: &Path) -> Option<String> {
    let out = Command::new(bin).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let v = text.split_whitespace().nth(1)?;
    Some(v.trim_start_matches("cargo:").to_owned())
}

fn hex_random(bytes: usize) -> Result<String> {
    use std::io::Read;
    let mut b = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

impl Node {
    /// Writes the node's configuration and the agent's credentials for site `site` in
    /// `site_dir`, with ports `rpc_port` and `s3_port`.
    pub fn plan(
        site: &str,
        site_dir: &Path,
        log: PathBuf,
        rpc_port: u16,
        s3_port: u16,
    ) -> Result<Self> {
        let root = site_dir.join("garage");
        std::fs::create_dir_all(root.join("meta"))?;
        std::fs::create_dir_all(root.join("data"))?;
        let config = root.join("garage.toml");
        std::fs::write(
            &config,
            format!(
                "# Garage node of site {site} (written by devnet)\n\
                 metadata_dir = \"{meta}\"\n\
                 data_dir = \"{data}\"\n\
                 db_engine = \"lmdb\"\n\
                 metadata_fsync = true\n\
                 data_fsync = true\n\
                 replication_factor = 1\n\
                 # shares are uniformly random bytes: compressing them only costs CPU\n\
                 compression_level = \"none\"\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc_port}\"\n\
                 rpc_secret = \"{secret}\"\n\n\
                 [s3_api]\n\
                 s3_region = \"{REGION}\"\n\
                 api_bind_addr = \"127.0.0.1:{s3_port}\"\n\
                 root_domain = \".s3.garage.localhost\"\n",
                meta = root.join("meta").display(),
                data = root.join("data").display(),
                secret = hex_random(32)?,
            ),
        )?;
        let key_id = format!("GK{}", hex_random(12)?);
        let secret = hex_random(32)?;
        let credentials = site_dir.join("s3-credentials.toml");
        std::fs::write(
            &credentials,
            format!("access_key_id = \"{key_id}\"\nsecret_access_key = \"{secret}\"\n"),
        )?;
        Ok(Node {
            config,
            log,
            endpoint: format!("http://127.0.0.1:{s3_port}"),
            credentials,
            s3_port,
            key_id,
            secret,
            zone: site.to_owned(),
        })
    }

    /// Starts the node (its log appended to when `append`).
    pub fn spawn(&self, bin: &Path, append: bool) -> Result<Child> {
        use std::os::unix::process::CommandExt;
        let out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .append(append)
            .truncate(!append)
            .open(&self.log)?;
        let err = out.try_clone()?;
        Command::new(bin)
            .arg("-c")
            .arg(&self.config)
            .arg("server")
            .env("RUST_LOG", "garage=warn")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))
    }

    /// `garage -c CONFIG ARGS...`, its output; an error carries what it printed.
    fn cli(&self, bin: &Path, args: &[&str]) -> Result<String> {
        let out = Command::new(bin)
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", bin.display()))?;
        if !out.status.success() {
            bail!(
                "garage {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until the node answers its CLI; returns its node ID.
    fn wait_up(&self, bin: &Path, child: &mut Child, timeout: Duration) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!("garage exited ({status}); see {}", self.log.display());
            }
            // `node id` reads the node's key from disk; `status` needs the server.
            match self
                .cli(bin, &["status"])
                .and_then(|_| self.cli(bin, &["node", "id", "-q"]))
            {
                Ok(out) => {
                    let id = out.trim().split('@').next().unwrap_or("").to_owned();
                    if !id.is_empty() {
                        return Ok(id);
                    }
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!(
                        "garage not up after {timeout:?}; see {}",
                        self.log.display()
                    )))
                }
                Err(_) => {}
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// First start of a fresh node: layout, access key, bucket.
    pub fn provision(&self, bin: &Path, child: &mut Child) -> Result<()> {
        let id = self.wait_up(bin, child, Duration::from_secs(30))?;
        self.cli(
            bin,
            &["layout", "assign", "-z", &self.zone, "-c", "100GB", &id],
        )?;
        self.cli(bin, &["layout", "apply", "--version", "1"])?;
        self.cli(
            bin,
            &[
                "key",
                "import",
                "--yes",
                "-n",
                "agent",
                &self.key_id,
                &self.secret,
            ],
        )?;
        self.cli(bin, &["bucket", "create", BUCKET])?;
        self.cli(
            bin,
            &[
                "bucket", "allow", "--read", "--write", "--owner", BUCKET, "--key", "agent",
            ],
        )?;
        self.wait_s3(Duration::from_secs(30))
    }

    /// Waits until the S3 API accepts connections.
    pub fn wait_s3(&self, timeout: Duration) -> Result<()> {
        if !crate::listening(&format!("127.0.0.1:{}", self.s3_port), timeout) {
            bail!(
                "garage S3 API not listening on port {} after {timeout:?}; see {}",
                self.s3_port,
                self.log.display()
            );
        }
        Ok(())
    }

    /// The agent's `[s3]` table for this node, with `extra` lines.
    pub fn agent_toml(&self, extra: &str) -> String {
        format!(
            "\n[s3]\nendpoint = \"{}\"\nregion = \"{REGION}\"\nbucket = \"{BUCKET}\"\ncredentials_file = \"{}\"\n{extra}\n",
            self.endpoint,
            self.credentials.display()
        )
    }
}
