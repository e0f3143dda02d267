//! `backup-client`: store files as QKD-secured secret shares at several sites, restore them,
//! list and verify them; and `serve`, the site agent that keeps the shares.

#![forbid(unsafe_code)]

/// mimalloc: large, short-lived key and chunk buffers are reused instead of being mapped,
/// faulted in and zeroed by the kernel for every request (glibc malloc did that here).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use backup_client::config::ClientConfig;
use backup_client::transfer::{BackupClient, Progress, SiteCheck, StoreOptions};
use clap::{Parser, Subcommand};
use share_transfer::wire::SchemeName;
use site_agent::config::AgentConfig;
use uuid::Uuid;

/// Back up large files across sites as threshold secret shares, each share sent under a
/// one-time pad of QKD keys (ETSI GS QKD 014) with information-theoretic authentication.
///
/// A file is split into n shares (default 2-of-3, XOR scheme): any k restore it, fewer reveal
/// nothing. The share for this site goes to the local site agent; every other share is
/// padded with fresh QKD keys and tagged, chunk by chunk, and sent to its site's agent.
///
/// The client configuration (TOML; any key can be overridden with BACKUP_<KEY>, nested keys
/// with __, e.g. BACKUP_BACKUP__STREAMS=4):
///
///   site = "A"                       # this site
///   sae_id = "SAE_A1"                # this client's SAE ID (CN of tls.cert)
///   kme_url = "https://127.0.0.1:8443"
///   state_dir = "state"              # resume state of interrupted stores
///   [tls] ca = "ca.pem"  cert = "sae.pem"  key = "sae.key"
///   [[sites]] name = "A"  agent_url = "https://127.0.0.1:9001"  agent_sae_id = "AGENT_A"
///   [backup] k = 2  n = 3  scheme = "xor"  streams = cores (2..16)  batch_chunks = 4  rng = "chacha12"
///            placement = ["A", "B", "C"]  chunk_size = 0  key_wait_secs = 600  retries = 5
///            set_files_in_flight = 2   # files of a sample set stored at once
///            readers = [...]   # who else may read what you store; absent = your site's SAEs
///
/// The site agent's configuration (for `serve`):
///
///   sae_id = "AGENT_A"   listen = "127.0.0.1:9001"   kme_url = "https://127.0.0.1:8443"
///   store_dir = "shares"   direct_io = true   allowed_clients = []   # [] = any SAE of the CA
///   recovery_clients = []   # may read every backup here (disaster recovery at another site)
///   metrics_listen = "127.0.0.1:9201"   # operator's listener: Prometheus /metrics and the
///                                       # /jobs the dashboard shows (plain HTTP; unset: off)
///   [tls] ca = "ca.pem"  cert = "agent.pem"  key = "agent.key"
///   [s3]   # instead of store_dir: shares in a bucket of an S3-compatible object store
///          # (Garage, MinIO, Ceph RGW, AWS S3) that is this site's own, not another site's
///        endpoint = "http://127.0.0.1:3900"  region = "garage"  bucket = "shares"  prefix = ""
///        virtual_hosted_style = false        # default: path-style requests
///        credentials_file = "s3.toml"        # access_key_id = "..." secret_access_key = "...";
///                                            # unset: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY
///        max_retries = 10  retry_timeout_secs = 120  request_timeout_secs = 60   # back-off on
///                                            # 5xx and timeouts; nothing acknowledged before
///                                            # the store acknowledged it
///        multipart_part_bytes = 16777216     # larger chunks go up as multipart uploads
///        max_requests = 16                   # requests in flight to the store
///   [limits] max_uploads_per_client = 32  max_uploads = 128  max_downloads_per_client = 64
///            max_downloads = 256  idle_secs = 60  unfetched_key_ttl_secs = 3600
///            max_unfetched_key_bytes_per_client = 1073741824   # download keys not acknowledged
///            max_sets_per_client = 10000                        # sample-set manifests kept
///
/// Exit status: 0 success, 1 failure (the message says what to do), 2 bad usage or
/// configuration; `verify` exits 1 when a share is missing or damaged.
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Cli {
    /// Configuration file (client, or agent for `serve`).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Print results as JSON on stdout. Progress goes to stderr: a bar on a terminal (not
    /// with --json), otherwise a line every 10 s (bytes, rate, time spent waiting for key).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Store FILE at the sites; prints the backup ID. Re-running after an interruption resumes.
    ///
    /// Several files, or a folder, are stored as a sample set (--set NAME; a single folder
    /// names its set itself): each file its own backup, the set's manifest (path, size,
    /// time and backup of every file) kept at every site. Folders are walked recursively;
    /// symbolic links are not followed and, like sockets, FIFOs and devices, are listed as
    /// skipped. Running the same set again sends only files that are new or changed (size,
    /// modification time and content digest) and carries on an interrupted run; files of
    /// earlier runs not given again stay in the set.
    Store {
        /// The file, or the files and folders of a set.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
        /// Store FILEs as the sample set NAME (1 to 128 of A-Z a-z 0-9 . _ -).
        #[arg(long, value_name = "NAME")]
        set: Option<String>,
        /// Shares needed to restore (default from the configuration, else 2).
        #[arg(long)]
        k: Option<u8>,
        /// Shares made, one per site (default from the configuration, else 3).
        #[arg(long)]
        n: Option<u8>,
        /// Sharing scheme.
        #[arg(long, value_enum)]
        scheme: Option<SchemeName>,
        /// Chunk size in bytes (default about 1 MiB).
        #[arg(long)]
        chunk_size: Option<usize>,
        /// Store even if some sites are down, as long as at least k take their share.
        #[arg(long)]
        allow_degraded: bool,
    },
    /// Restore backup ID into OUT (written atomically; resumes an interrupted restore).
    ///
    /// `restore ID OUT`; `restore --set NAME DIR` restores every file of the set under DIR at
    /// its path in the set; `restore --set NAME --file PATH OUT` restores one file of it.
    Restore {
        /// ID OUT, or with --set: DIR (or OUT with --file).
        #[arg(required = true, num_args = 1..=2, value_name = "ID OUT")]
        args: Vec<String>,
        /// The sample set to restore from.
        #[arg(long, value_name = "NAME")]
        set: Option<String>,
        /// With --set: only this file (its path in the set).
        #[arg(long, requires = "set", value_name = "PATH")]
        file: Option<String>,
    },
    /// List the backups held at the sites.
    List,
    /// Check every share of backup ID at every site without reconstructing it (each agent
    /// re-reads its chunks against their digests; only the results cross the network).
    ///
    /// With --all, scrub everything: every backup the sites hold, a table of backups by
    /// site, and every damaged or missing chunk named by file, backup, site, share and
    /// chunk. Exits 1 if anything is damaged, missing, incomplete or unreachable.
    Verify {
        /// The backup to check (a UUID, as `store` and `list` print it).
        #[arg(required_unless_present_any = ["all", "set"], conflicts_with = "all")]
        id: Option<String>,
        /// Scrub every backup found at the sites.
        #[arg(long)]
        all: bool,
        /// Check every file of the sample set NAME (the same report as --all).
        #[arg(long, value_name = "NAME", conflicts_with_all = ["id", "all"])]
        set: Option<String>,
        /// With --all or --set: also write the report as JSON to FILE (replaced atomically).
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
    },
    /// Rebuild the share of backup ID that belongs at site SITE (lost there) from k healthy
    /// shares, and store it there again under one-time pad and tag; if SITE still holds it
    /// with damaged chunks (`verify` names them), rebuild only those, in place. Only this
    /// client, the data's owner, holds k shares while it runs; the sites see what they see
    /// in a store and a restore.
    ///
    /// With --to Y the share moves: it is rebuilt at site Y instead, every site is told the
    /// backup's new placement, and the old share at SITE is removed if SITE answers
    /// (re-running the same command finishes an interrupted move). With --set NAME, every
    /// file of the set whose share at SITE needs it.
    Repair {
        /// The backup, or a sample set's name (or --set).
        #[arg(required_unless_present = "set", conflicts_with = "set")]
        id: Option<String>,
        /// Repair every file of the sample set NAME.
        #[arg(long, value_name = "NAME")]
        set: Option<String>,
        /// The site whose share is rebuilt.
        #[arg(long, value_name = "SITE")]
        site: String,
        /// Move the share to this site instead of rebuilding it at SITE.
        #[arg(long, value_name = "SITE")]
        to: Option<String>,
    },
    /// Renew every share of backup ID (or of every file of --set NAME) without the file:
    /// the client deals a fresh sharing of zero and sends each site its part under one-time
    /// pad and tag; each site folds it into its share, staged and then committed only once
    /// every site staged it. Afterwards any k new shares restore the file and old shares
    /// stolen earlier combine with new ones into nothing. All n shares must be available
    /// (repair a lost one first). Sends n times the file's size and uses as much QKD key.
    /// Re-running after an interruption finishes or rolls back the interrupted renewal.
    Renew {
        /// The backup to renew, or a sample set's name (or --set).
        #[arg(required_unless_present = "set", conflicts_with = "set")]
        id: Option<String>,
        /// Renew every file of the sample set NAME.
        #[arg(long, value_name = "NAME")]
        set: Option<String>,
    },
    /// Run the site agent (needs an agent configuration).
    Serve,
}

/// What `renew` and `repair` work on: one backup, or every file of a sample set.
enum Target {
    Backup(Uuid),
    Set(String),
}

/// `ID`, `--set NAME`, or a set's name in place of the ID (`renew run42`).
fn target(id: Option<String>, set: Option<String>) -> Result<Target> {
    match (id, set) {
        (_, Some(name)) => Ok(Target::Set(name)),
        (Some(id), None) => match Uuid::try_parse(&id) {
            Ok(u) => Ok(Target::Backup(u)),
            Err(_) if share_transfer::wire::valid_set_name(&id) => Ok(Target::Set(id)),
            Err(_) => Ok(Target::Backup(parse_id(&id)?)),
        },
        (None, None) => Err(backup_client::transfer::TransferError::Usage(
            "name a backup ID or a sample set (--set NAME)".into(),
        )
        .into()),
    }
}

fn parse_id(s: &str) -> Result<Uuid> {
    Uuid::try_parse(s).map_err(|_| {
        anyhow::anyhow!("{s:?} is not a backup ID (a UUID as printed by `store` or `list`)")
    })
}

fn main() {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(if matches!(cli.cmd, Cmd::Serve) {
                    "info"
                } else {
                    "error"
                })
            }),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            let usage = e
                .downcast_ref::<backup_client::config::ConfigError>()
                .is_some()
                || matches!(
                    e.downcast_ref::<backup_client::transfer::TransferError>(),
                    Some(
                        backup_client::transfer::TransferError::Usage(_)
                            | backup_client::transfer::TransferError::NothingToRepair(_)
                    )
                );
            eprintln!("backup-client: {}", format!("{e:#}").replace('\n', " "));
            if usage {
                2
            } else {
                1
            }
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> Result<i32> {
    let Some(config) = cli.config.clone() else {
        bail!(backup_client::transfer::TransferError::Usage(
            "--config FILE is required (see --help)".into()
        ));
    };
    if let Cmd::Serve = cli.cmd {
        let cfg = AgentConfig::load(&config)?;
        actix_web::rt::System::new().block_on(site_agent::serve(cfg))?;
        return Ok(0);
    }
    let cfg = ClientConfig::load(&config)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(client(cli, cfg))
}

/// Shows progress until dropped: a bar on a terminal; otherwise (and with `--json`) a line
/// on stderr every [`LOG_EVERY`], so that a job run by a script or a service is never silent.
struct Bar {
    handle: Option<tokio::task::JoinHandle<()>>,
    bar: indicatif::ProgressBar,
}

/// How often progress is logged when stderr is not a terminal.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// How progress is shown.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Show {
    Bar,
    Log,
}

impl Bar {
    fn start(progress: Arc<Progress>, what: &str, show: Show) -> Self {
        let bar = if show == Show::Bar {
            indicatif::ProgressBar::new(0)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {msg} ETA {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(what.to_owned());
        let b = bar.clone();
        let what = what.to_owned();
        let handle = tokio::spawn(async move {
            let start = Instant::now();
            let mut logged = Instant::now();
            loop {
                tokio::time::sleep(Duration::from_millis(150)).await;
                let (done, total, line) = progress_now(&progress, start.elapsed());
                b.set_length(total);
                b.set_position(done);
                match progress.notice.get() {
                    Some(n) => b.set_message(format!("{line}, {n}")),
                    None => b.set_message(line.clone()),
                }
                if show == Show::Log && logged.elapsed() >= LOG_EVERY {
                    logged = Instant::now();
                    eprintln!(
                        "{what}: {} of {} ({:.0}%), {line}",
                        indicatif::HumanBytes(done),
                        indicatif::HumanBytes(total),
                        done as f64 * 100.0 / total.max(1) as f64
                    );
                }
            }
        });
        Bar {
            handle: Some(handle),
            bar,
        }
    }
}

/// Bytes done and in all, and a line: for a sample set, files done of all, then the rate
/// of the bytes sent and the time spent waiting for key.
fn progress_now(progress: &Progress, elapsed: Duration) -> (u64, u64, String) {
    let load = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
    let (done, total) = (load(&progress.done), load(&progress.total));
    let set = &progress.set;
    let files = load(&set.files);
    let waited = progress.notice.waited().as_secs_f64();
    if files == 0 {
        let line = format!(
            "{:.0} Mbps, waited for key {waited:.1} s",
            mbps(done, elapsed.as_secs_f64())
        );
        return (done, total, line);
    }
    let line = format!(
        "files {}/{files}, {:.0} Mbps, waited for key {waited:.1} s",
        load(&set.files_done),
        mbps(load(&set.bytes_sent) + done, elapsed.as_secs_f64())
    );
    (load(&set.bytes_done) + done, load(&set.bytes), line)
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
        self.bar.finish_and_clear();
    }
}

fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 * 8.0 / 1e6 / secs.max(1e-9)
}

async fn client(cli: Cli, cfg: ClientConfig) -> Result<i32> {
    let show = if !cli.json && std::io::stderr().is_terminal() {
        Show::Bar
    } else {
        Show::Log
    };
    let defaults = cfg.backup.clone();
    let bc = BackupClient::new(cfg)?;
    match cli.cmd {
        Cmd::Store {
            files,
            set,
            k,
            n,
            scheme,
            chunk_size,
            allow_degraded,
        } => {
            let opts = StoreOptions {
                k: k.unwrap_or(defaults.k),
                n: n.unwrap_or(defaults.n),
                scheme: scheme.unwrap_or(defaults.scheme),
                chunk_size: chunk_size.unwrap_or(defaults.chunk_size),
                allow_degraded,
            };
            match set_of(&files, set)? {
                Some(name) => store_set(&bc, &name, &files, &opts, cli.json, show).await,
                None => store(&bc, &files[0], &opts, cli.json, show).await,
            }
        }
        Cmd::Restore { args, set, file } => match (set, args.as_slice()) {
            (None, [id, out]) => restore(&bc, parse_id(id)?, Path::new(out), cli.json, show).await,
            (Some(name), [out]) => match file {
                Some(f) => {
                    let id = bc.set_member(&name, &f).await?;
                    restore(&bc, id, Path::new(out), cli.json, show).await
                }
                None => restore_set(&bc, &name, Path::new(out), cli.json).await,
            },
            (None, _) => bail!(backup_client::transfer::TransferError::Usage(
                "restore ID OUT: a backup ID and where to write it (or --set NAME DIR)".into()
            )),
            (Some(_), _) => bail!(backup_client::transfer::TransferError::Usage(
                "restore --set NAME DIR (the whole set) or restore --set NAME --file PATH OUT"
                    .into()
            )),
        },
        Cmd::List => list(&bc, cli.json).await,
        Cmd::Repair {
            id, set, site, to, ..
        } => match target(id, set)? {
            Target::Backup(id) => repair(&bc, id, &site, to.as_deref(), cli.json, show).await,
            Target::Set(name) => repair_set(&bc, &name, &site, to.as_deref(), cli.json, show).await,
        },
        Cmd::Renew { id, set } => match target(id, set)? {
            Target::Backup(id) => renew(&bc, id, cli.json, show).await,
            Target::Set(name) => renew_set(&bc, &name, cli.json, show).await,
        },
        Cmd::Verify {
            id: Some(id),
            all: false,
            set: None,
            ..
        } => verify(&bc, &id, cli.json).await,
        Cmd::Verify { report, set, .. } => {
            scrub(&bc, set.as_deref(), report.as_deref(), cli.json).await
        }
        Cmd::Serve => unreachable!("handled before"),
    }
}

async fn store(
    bc: &BackupClient,
    file: &Path,
    opts: &StoreOptions,
    json: bool,
    show: Show,
) -> Result<i32> {
    let bar = Bar::start(bc.progress.clone(), "store", show);
    let r = bc.store(file, opts).await;
    drop(bar);
    let r = r?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!("{}", r.backup_id);
        eprintln!(
            "stored {} ({} bytes) in {:.2} s, {:.0} Mbps{}; shares: {}",
            r.name,
            r.bytes,
            r.seconds,
            mbps(r.bytes, r.seconds),
            if r.resumed { " (resumed)" } else { "" },
            r.shares
                .iter()
                .map(|s| format!(
                    "{}@{}{}",
                    s.share_index,
                    s.site,
                    if s.stored {
                        String::new()
                    } else {
                        format!(" MISSING ({})", s.error.clone().unwrap_or_default())
                    }
                ))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(0)
}

/// The set the store's arguments make: `--set NAME`, or a single folder's own name; None
/// for a single file without --set.
fn set_of(files: &[PathBuf], set: Option<String>) -> Result<Option<String>> {
    if set.is_some() {
        return Ok(set);
    }
    match files {
        [one] if one.is_dir() => {
            let name = one
                .canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_default();
            Ok(Some(name))
        }
        [_] => Ok(None),
        _ => bail!(backup_client::transfer::TransferError::Usage(
            "several files make a sample set: name it with --set NAME".into()
        )),
    }
}

async fn store_set(
    bc: &BackupClient,
    name: &str,
    files: &[PathBuf],
    opts: &StoreOptions,
    json: bool,
    show: Show,
) -> Result<i32> {
    // The bar (or progress line) follows the file being stored.
    let bar = Bar::start(bc.progress.clone(), "store", show);
    let r = bc
        .store_set(name, files, opts, |i, n, path, send| {
            if !json {
                eprintln!(
                    "[{i}/{n}] {path}: {}",
                    if send { "storing" } else { "unchanged" }
                );
            }
        })
        .await;
    drop(bar);
    let r = r?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(0);
    }
    use backup_client::transfer::sets::Outcome;
    let count = |o: Outcome| r.files.iter().filter(|f| f.outcome == o).count();
    for s in &r.skipped {
        eprintln!("skipped {}: {}", s.path, s.why);
    }
    println!("{name}");
    eprintln!(
        "set {name}: {} file(s); stored {}, unchanged {}{}{}; {} bytes sent in {:.2} s; manifest at {}",
        r.files.len(),
        count(Outcome::Stored),
        count(Outcome::Unchanged) + count(Outcome::UnchangedBySizeAndTime),
        if count(Outcome::Kept) > 0 {
            format!(", kept from earlier runs {}", count(Outcome::Kept))
        } else {
            String::new()
        },
        if r.skipped.is_empty() {
            String::new()
        } else {
            format!(", skipped {}", r.skipped.len())
        },
        r.bytes_sent,
        r.seconds,
        r.manifest_sites.join(", ")
    );
    Ok(0)
}

async fn restore_set(bc: &BackupClient, name: &str, dir: &Path, json: bool) -> Result<i32> {
    let t = Instant::now();
    let files = bc
        .restore_set(name, dir, |i, n, path| {
            if !json {
                eprintln!("[{i}/{n}] {path}");
            }
        })
        .await?;
    let bytes: u64 = files.iter().map(|(_, b)| b).sum();
    if json {
        println!(
            "{}",
            serde_json::json!({ "set": name, "dir": dir, "files": files, "bytes": bytes })
        );
    } else {
        eprintln!(
            "restored set {name}: {} file(s), {bytes} bytes into {} in {:.2} s",
            files.len(),
            dir.display(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(0)
}

/// `repair ID --site SITE`.
async fn repair(
    bc: &BackupClient,
    id: Uuid,
    site: &str,
    to: Option<&str>,
    json: bool,
    show: Show,
) -> Result<i32> {
    let bar = Bar::start(bc.progress.clone(), "repair", show);
    let r = bc.repair(id, site, to).await;
    drop(bar);
    let r = r?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        eprintln!("{}", repair_line(&r));
    }
    Ok(moved_fully(&r))
}

async fn repair_set(
    bc: &BackupClient,
    name: &str,
    site: &str,
    to: Option<&str>,
    json: bool,
    show: Show,
) -> Result<i32> {
    let bar = Bar::start(bc.progress.clone(), "repair", show);
    let r = bc
        .repair_set(name, site, to, |i, n, path| {
            tracing::info!(file = path, "repairing {} of {n}", i + 1);
        })
        .await;
    drop(bar);
    let files = r?;
    let code = files
        .iter()
        .filter_map(|(_, r)| r.as_ref().map(moved_fully))
        .max()
        .unwrap_or(0);
    if json {
        let files: Vec<_> = files
            .iter()
            .map(|(path, r)| serde_json::json!({ "path": path, "repair": r }))
            .collect();
        println!("{}", serde_json::json!({ "set": name, "files": files }));
    } else {
        for (path, r) in &files {
            match r {
                Some(r) => eprintln!("{path}: {}", repair_line(r)),
                None => eprintln!("{path}: share at {site} intact, nothing to repair"),
            }
        }
    }
    Ok(code)
}

/// Exit status of a repair: 1 when a move left sites not told or the old share in place.
fn moved_fully(r: &backup_client::transfer::repair::RepairReport) -> i32 {
    match &r.moved_from {
        Some(m) if !m.not_updated.is_empty() || !m.old_share_removed => 1,
        _ => 0,
    }
}

/// What a repair did, in one line (and what a move left to do).
fn repair_line(r: &backup_client::transfer::repair::RepairReport) -> String {
    let what = if r.damaged_chunks.is_empty() {
        format!("{} chunks", r.chunks)
    } else {
        format!("damaged chunks {:?} rebuilt in place", r.damaged_chunks)
    };
    let from = r
        .from
        .iter()
        .map(|(s, i)| format!("{i}@{s}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut line = format!(
        "repaired share {} of backup {} at site {} ({what}) in {:.2} s from shares {from}",
        r.share_index, r.backup_id, r.site, r.seconds
    );
    if let Some(m) = &r.moved_from {
        line.push_str(&format!(
            "; moved from site {} (placement version {}), old share there {}",
            m.site,
            m.placement_version,
            if m.old_share_removed {
                "removed"
            } else {
                "NOT removed (site unreachable?): re-run to remove it"
            }
        ));
        if !m.not_updated.is_empty() {
            line.push_str(&format!(
                "; not yet told the new placement: {} (re-run to finish)",
                m.not_updated.join("; ")
            ));
        }
    }
    line
}

async fn renew(bc: &BackupClient, id: Uuid, json: bool, show: Show) -> Result<i32> {
    let bar = Bar::start(bc.progress.clone(), "renew", show);
    let r = bc.renew(id).await;
    drop(bar);
    let r = r?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        eprintln!("{}", renew_line(&r));
    }
    Ok(0)
}

async fn renew_set(bc: &BackupClient, name: &str, json: bool, show: Show) -> Result<i32> {
    let bar = Bar::start(bc.progress.clone(), "renew", show);
    let r = bc
        .renew_set(name, |i, n, path| {
            if !json {
                tracing::info!(file = path, "renewing {} of {n}", i + 1);
            }
        })
        .await;
    drop(bar);
    let files = r?;
    if json {
        let files: Vec<_> = files
            .iter()
            .map(|(path, r)| serde_json::json!({ "path": path, "renewal": r }))
            .collect();
        println!("{}", serde_json::json!({ "set": name, "files": files }));
    } else {
        for (path, r) in &files {
            eprintln!("{path}: {}", renew_line(r));
        }
        eprintln!("renewed set {name}: {} file(s)", files.len());
    }
    Ok(0)
}

/// What a renewal did, in one line.
fn renew_line(r: &backup_client::transfer::renew::RenewReport) -> String {
    let shares = r
        .shares
        .iter()
        .map(|(s, i)| format!("{i}@{s}"))
        .collect::<Vec<_>>()
        .join(", ");
    let rolled = if r.rolled_back.is_empty() {
        String::new()
    } else {
        format!(
            " (rolled back {} interrupted renewal(s) first)",
            r.rolled_back.len()
        )
    };
    if r.finished_interrupted {
        format!(
            "finished the interrupted renewal {} of backup {}: shares {shares} are at epoch {}",
            r.renewal, r.backup_id, r.epoch
        )
    } else {
        format!(
            "renewed backup {} ({}): shares {shares} now at epoch {}, {} chunks, {} delta bytes sent in {:.2} s{rolled}",
            r.backup_id, r.name, r.epoch, r.chunks, r.bytes_sent, r.seconds
        )
    }
}

/// The command that rebuilds the share of backup `id` lost or damaged at `site`.
fn repair_command(id: Uuid, site: &str) -> String {
    format!("backup-client repair {id} --site {site}")
}

async fn restore(bc: &BackupClient, id: Uuid, out: &Path, json: bool, show: Show) -> Result<i32> {
    let bar = Bar::start(bc.progress.clone(), "restore", show);
    let r = bc.restore(id, out).await;
    drop(bar);
    let r = r?;
    if json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        eprintln!(
            "restored {} bytes into {} in {:.2} s, {:.0} Mbps, from shares {}",
            r.bytes,
            r.output.display(),
            r.seconds,
            mbps(r.bytes, r.seconds),
            r.used
                .iter()
                .map(|(s, i)| format!("{i}@{s}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        for (s, i, why) in &r.rejected {
            eprintln!("  share {i} at site {s} was not used: {why}");
        }
    }
    Ok(0)
}

async fn list(bc: &BackupClient, json: bool) -> Result<i32> {
    let ((entries, errors), (sets, _)) = futures_util::join!(bc.list(), bc.sets());
    if json {
        println!(
            "{}",
            serde_json::json!({ "backups": entries, "sets": sets, "unreachable": errors })
        );
    } else {
        for m in &sets {
            let bytes: u64 = m.files.iter().map(|f| f.size).sum();
            println!(
                "set {} (of {}): {} file(s), {bytes} bytes",
                m.name,
                m.owner,
                m.files.len()
            );
            for f in &m.files {
                println!("  {}  {:>14} bytes  {}", f.backup_id, f.size, f.path);
            }
        }
        for e in &entries {
            println!(
                "{}  {:>14} bytes  {}  {:?}({},{})  shares: {}",
                e.backup_id,
                e.bytes,
                e.name,
                e.scheme.kind,
                e.scheme.k,
                e.scheme.n,
                e.shares
                    .iter()
                    .map(|(i, s, c)| format!("{i}@{s}{}", if *c { "" } else { "(incomplete)" }))
                    .collect::<Vec<_>>()
                    .join(" ")
            );
        }
        for (s, e) in &errors {
            eprintln!("site {s} not reachable: {e}");
        }
    }
    Ok(0)
}

async fn verify(bc: &BackupClient, id: &str, json: bool) -> Result<i32> {
    let id = parse_id(id)?;
    let checks = bc.verify(id).await;
    let found: usize = checks.iter().map(|c| c.shares.len()).sum();
    let good = checks
        .iter()
        .flat_map(|c| &c.shares)
        .filter(|s| s.complete && s.missing.is_empty() && s.damaged.is_empty())
        .count();
    let unreachable = checks.iter().filter(|c| c.error.is_some()).count();
    let lost: usize = checks.iter().map(|c| c.lost.len()).sum();
    if found == 0 && unreachable == 0 {
        bail!(backup_client::transfer::TransferError::Usage(format!(
            "unknown backup ID {id}: no site holds a share of it (see `backup-client list`)"
        )));
    }
    let ok = good == found && unreachable == 0 && lost == 0;
    if json {
        println!(
            "{}",
            serde_json::json!({ "backup_id": id, "ok": ok, "sites": checks })
        );
    } else {
        print_checks(&checks);
        for c in &checks {
            if c.shares.iter().any(|s| !s.damaged.is_empty()) {
                println!(
                    "site {}: damaged chunks: run `{}` to rebuild them in place",
                    c.site,
                    repair_command(id, &c.site)
                );
            }
            for i in &c.lost {
                println!(
                    "site {}: share {i}: LOST (not held there): run `{}`",
                    c.site,
                    repair_command(id, &c.site)
                );
            }
        }
        println!("{good} of {} shares intact", found + lost);
    }
    Ok(if ok { 0 } else { 1 })
}

/// `verify --all`: the table, the bad chunks, the summary (or the JSON report).
async fn scrub(
    bc: &BackupClient,
    set: Option<&str>,
    report: Option<&Path>,
    json: bool,
) -> Result<i32> {
    let only = match set {
        Some(name) => Some(bc.require_set(name).await?),
        None => None,
    };
    let r = bc.scrub(only.as_ref()).await;
    let text = serde_json::to_string_pretty(&r)?;
    if let Some(path) = report {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, &text).with_context(|| tmp.display().to_string())?;
        std::fs::rename(&tmp, path).with_context(|| path.display().to_string())?;
    }
    if json {
        println!("{text}");
    } else {
        let sites: Vec<&str> = bc.cfg.sites.iter().map(|s| s.name.as_str()).collect();
        print_scrub_table(&r, &sites);
        for b in &r.bad_chunks {
            println!(
                "{:?}: {} (backup {}) at site {}, share {}, chunk {}: run `{}`",
                b.fault,
                b.name,
                b.backup_id,
                b.site,
                b.share_index,
                b.chunk,
                repair_command(b.backup_id, &b.site)
            );
        }
        for (name, id, site, i) in &r.lost_shares {
            println!(
                "LOST: {name} (backup {id}) share {i} at site {site}: run `{}`",
                repair_command(*id, site)
            );
        }
        for (path, id) in &r.lost {
            println!("LOST: {path} (backup {id}): no reachable site holds a share");
        }
        for (site, e) in &r.unreachable {
            println!("site {site}: UNREACHABLE: {e}");
        }
        println!(
            "{} backup(s), {} share(s), {} chunk(s) checked in {:.1} s: {}",
            r.backups.len(),
            r.shares_checked,
            r.chunks_checked,
            r.seconds,
            if r.ok {
                "all intact".to_owned()
            } else {
                format!(
                    "{} bad chunk(s), {} backup(s) not intact, {} site(s) unreachable",
                    r.bad_chunks.len(),
                    r.backups.iter().filter(|b| !b.ok).count(),
                    r.unreachable.len()
                )
            }
        );
    }
    Ok(if r.ok { 0 } else { 1 })
}

/// One row per backup, one column per site: what its shares there look like.
fn print_scrub_table(r: &backup_client::transfer::scrub::ScrubReport, sites: &[&str]) {
    let name_w = r
        .backups
        .iter()
        .map(|b| b.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    print!("{:<8}  {:<name_w$}  {:>12}", "backup", "file", "bytes");
    for s in sites {
        print!("  {s:<12}");
    }
    println!();
    for b in &r.backups {
        let id = b.backup_id.to_string();
        print!("{:<8}  {:<name_w$}  {:>12}", &id[..8], b.name, b.bytes);
        for s in sites {
            let cell = match b.sites.iter().find(|c| c.site == *s) {
                Some(c) if c.error.is_some() => "unreachable".to_owned(),
                Some(c) if !c.lost.is_empty() => "LOST".to_owned(),
                Some(c) if c.shares.is_empty() => "-".to_owned(),
                Some(c) => share_cell(&c.shares),
                None => "-".to_owned(),
            };
            print!("  {cell:<12}");
        }
        println!();
    }
}

/// "ok", or what is wrong with the shares a site holds of one backup.
fn share_cell(shares: &[share_transfer::wire::ShareCheck]) -> String {
    let damaged: usize = shares.iter().map(|s| s.damaged.len()).sum();
    let missing: usize = shares.iter().map(|s| s.missing.len()).sum();
    if damaged > 0 {
        format!("DAMAGED {damaged}")
    } else if missing > 0 {
        format!("MISSING {missing}")
    } else if shares.iter().any(|s| !s.complete) {
        "INCOMPLETE".to_owned()
    } else {
        "ok".to_owned()
    }
}

/// One line per unreachable site and per share found.
fn print_checks(checks: &[SiteCheck]) {
    for c in checks {
        if let Some(e) = &c.error {
            println!("site {}: UNREACHABLE: {e}", c.site);
        }
        for s in &c.shares {
            let state = if !s.complete {
                "INCOMPLETE".to_owned()
            } else if s.missing.is_empty() && s.damaged.is_empty() {
                "ok".to_owned()
            } else {
                format!(
                    "DAMAGED: {} missing, {} damaged chunk(s) {:?}",
                    s.missing.len(),
                    s.damaged.len(),
                    s.damaged
                        .iter()
                        .chain(&s.missing)
                        .take(8)
                        .collect::<Vec<_>>()
                )
            };
            println!(
                "site {}: share {}: {}/{} chunks ok: {state}",
                c.site, s.share_index, s.chunks_ok, s.chunk_count
            );
        }
    }
}
