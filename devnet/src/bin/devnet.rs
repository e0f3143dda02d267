//! `devnet`: bring up, drive and stop a QKD network on loopback.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use devnet::fastq::{self, human_size, parse_size};
use devnet::{parse_links, Devnet, DevnetInfo, Options};

/// The seed system's store and restore throughput, Mbps.
const SEED_STORE_MBPS: f64 = 356.0;
const SEED_RESTORE_MBPS: f64 = 502.0;

/// A multi-site QKD network on 127.0.0.1: a fresh development PKI, one ETSI GS QKD 014 KME
/// and one backup site agent per site, simulated QKD links between linked sites, and
/// DIR/devnet.json describing it all (ca_cert, sites with kme_url, SAE certificate/key
/// paths, agent_url and client_config, links). `devnet demo` is the main job: a timed
/// backup and restore of a genome-sized file across the sites.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args)]
struct NetArgs {
    /// Number of sites (A, B, C, ...).
    #[arg(long, default_value_t = 3)]
    sites: usize,
    /// Links between sites, e.g. A-B,A-C,B-C. Default: the seed's star, A-B and A-C.
    #[arg(long)]
    links: Option<String>,
    /// SAE identities per site.
    #[arg(long, default_value_t = 2)]
    saes_per_site: usize,
    /// Key rate of each link in bytes/s, 0 = bulk (as fast as the machine goes).
    /// [default for `up`: the modelled rate of 10 km of fibre (see --length-km); for `demo`: 0]
    #[arg(long)]
    rate: Option<u64>,
    /// Pool capacity per link direction, in keys of 256 bits.
    /// [default: 100000 for `up`, 524288 (16 MiB) for `demo`]
    #[arg(long)]
    max_key_count: Option<u64>,
    /// Fibre length of every link, km: the link then runs the decoy-state BB84 model (rate
    /// and QBER from length and device parameters; --rate is ignored). The KME logs the
    /// modelled rate at start, and Status shows it in `status_extension.qkd_link`.
    /// [default for `up`: 10 km, unless --rate is given]
    #[arg(long)]
    length_km: Option<f64>,
    /// Keep the KMEs' key pools in memory only (no store_dir): faster in bulk mode, but a
    /// KME restart loses the keys awaiting slaves. Default: durable, crash-safe pools.
    #[arg(long)]
    volatile: bool,
    /// Do not relay keys through trusted nodes: SAEs reach only SAEs of linked KMEs.
    /// Default: every KME knows the whole network and relays keys to KMEs it has no link to
    /// (hop by hop, each hop one-time padded and authenticated with that link's key).
    #[arg(long)]
    no_relay: bool,
    /// Keep every site's shares in an S3 bucket of that site's own Garage node (Garage
    /// 2.x, installed by scripts/setup; `garage` on the PATH, in ~/.cargo/bin, or
    /// DEVNET_GARAGE_BIN) instead of a local folder.
    #[arg(long)]
    s3: bool,
}

impl NetArgs {
    /// The network options: `base` with what was given on the command line.
    fn options(&self, base: Options) -> Result<Options> {
        Ok(Options {
            sites: self.sites,
            links: self
                .links
                .as_deref()
                .map(|l| parse_links(l, self.sites))
                .transpose()?,
            saes_per_site: self.saes_per_site.max(1),
            rate_bytes_per_sec: self.rate.unwrap_or(base.rate_bytes_per_sec),
            max_key_count: self.max_key_count.unwrap_or(base.max_key_count),
            length_km: self.length_km.or(base.length_km),
            volatile_kmes: self.volatile || base.volatile_kmes,
            relay: base.relay && !self.no_relay,
            s3: self.s3 || base.s3,
            ..base
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the network in DIR and return once every link delivers key; it keeps running.
    ///
    /// Also starts the live network view (`qkd-dashboard`, acting with the devnet's operator
    /// certificate, on 127.0.0.1 with a random token: open the printed address in a
    /// browser) and writes DIR/prometheus/prometheus.yml for the network's real ports, with
    /// the recording and alerting rules of deploy/prometheus (run the printed `prometheus`
    /// command to scrape it).
    Up {
        /// Folder for the PKI, configs, logs and devnet.json.
        #[arg(long)]
        dir: PathBuf,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Stop the network described by DIR/devnet.json.
    Down {
        #[arg(long)]
        dir: PathBuf,
    },
    /// The main job: back up a genome-sized file across the 3 sites and restore it, timed.
    ///
    /// Starts the devnet (a KME and a backup site agent per site, bulk simulated QKD links,
    /// durable key pools sized to the job), checks one ETSI 014 key exchange, writes a
    /// synthetic FASTQ file DIR/sample.fastq (--size, default 1 GiB), times a plain copy with
    /// fsync (the disk baseline) and waits until every link direction holds the key the job
    /// needs (the seed's condition: key generated and stored in advance; the fill time is
    /// printed). Then runs the real CLI: `backup-client --config DIR/client-A.toml --json
    /// store DIR/sample.fastq` and `... restore ID DIR/restored.fastq`, and compares the two
    /// files byte for byte. Runs the same job again on a second devnet whose small pools
    /// (--max-key-count) the bulk link refills during the job ("key generated live"). Prints
    /// store and restore throughput beside the seed's 356 / 502 Mbps, and the CPU time per
    /// file byte of every process (from /proc). Exits non-zero if any step fails or the
    /// files differ. Stops the networks at the end and removes DIR unless --keep (after a
    /// failure the logs in DIR/logs are kept). The key stored in advance is held on disk by
    /// the KMEs (about 2 x --size per link at each of its ends; each KME keeps at most 16
    /// MiB of a pool in memory), or in their memory with --volatile.
    Demo {
        /// Folder to use; must be new or empty (default: a fresh folder under the system
        /// temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Size of the test file: 1GiB, 512MiB, 100MB, 4096, ...
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        size: u64,
        /// Seed of the synthetic FASTQ generator.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Keep DIR (files, shares, logs) and print its path instead of removing it.
        #[arg(long)]
        keep: bool,
        /// Run the job as a sample set instead: N synthetic samples (--size in all) stored
        /// as one set and restored as one, on key generated live; prints the set's rate and
        /// the projected time for the seed's unit of 100 samples of 80 GB.
        #[arg(long, value_name = "N")]
        set: Option<usize>,
        #[command(flatten)]
        net: NetArgs,
    },
    /// Benchmark every layer on a fresh devnet and print medians beside same-run baselines:
    /// KME exchanges/s (1, 8, 64 mTLS clients, beside GET status), batched keys/s, bulk key
    /// Gbps; store and restore Gbps of a synthetic FASTQ file on key stored in advance (a
    /// devnet per run whose pools are filled before the job; the fill rate is printed) and
    /// on key generated live (beside cp and the seed's 356 / 502 Mbps); CPU ns per file
    /// byte of every process (from /proc) beside a copy's, and a labelled projection for
    /// one 2-core machine per site; relayed exchanges/s and keys/s over 1, 2 and 3 links of
    /// a chain; the link model and fill rates; peak RSS of the client, agents and KMEs. Not
    /// part of the tests.
    Bench {
        /// Working folder (default: a fresh folder under the system temp dir; removed after).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Size of the pipeline's test file. The key stored in advance for it is held on
        /// disk by the KMEs (about 2 x SIZE per link at each end; in their memory with
        /// --volatile).
        #[arg(long, default_value = "1GiB", value_parser = parse_size)]
        size: u64,
        /// Runs per figure; the median is printed.
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// Seconds per KME measurement.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Only the KME part.
        #[arg(long)]
        kme_only: bool,
        /// Only the link part: modelled rate by length, bulk fill rate (durable vs memory).
        #[arg(long)]
        link_only: bool,
        /// KMEs without a durable store (pools in memory only), for comparison.
        #[arg(long)]
        volatile: bool,
        /// Only the relay part: exchanges/s and keys/s over 1, 2 and 3 links of a chain.
        #[arg(long)]
        relay_only: bool,
        /// Only the storage part: store and restore on key stored in advance with the
        /// agents' shares on local disk and in each site's Garage node (S3), alternating run
        /// by run; throughput, ratio, and CPU per byte of every process (Garage's too).
        #[arg(long)]
        storage_only: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Bench {
            dir,
            size,
            runs,
            seconds,
            kme_only,
            link_only,
            volatile,
            relay_only,
            storage_only,
        } => {
            let tmp = dir.is_none();
            let dir = dir.unwrap_or_else(|| {
                std::env::temp_dir().join(format!("devnet-bench-{}", std::process::id()))
            });
            let r = devnet::bench::run(&devnet::bench::BenchOptions {
                dir: dir.clone(),
                size,
                runs: runs.max(1),
                seconds,
                kme_only,
                link_only,
                relay_only,
                storage_only,
                volatile,
            });
            if tmp {
                std::fs::remove_dir_all(&dir).ok();
            }
            r
        }
        Cmd::Up { dir, net } => {
            if dir.join("devnet.json").exists() && DevnetInfo::load(&dir).is_ok() {
                bail!(
                    "{} already holds a devnet; run `devnet down --dir {}` first",
                    dir.display(),
                    dir.display()
                );
            }
            let t = Instant::now();
            // The links run the physical model (10 km of fibre) unless a fixed --rate is asked.
            let base = Options {
                length_km: net.rate.is_none().then_some(10.0),
                dashboard: true,
                ..Options::default()
            };
            let d = Devnet::start(&dir, &net.options(base)?)?;
            println!(
                "devnet up in {:.1} s: {} sites, links {}",
                t.elapsed().as_secs_f64(),
                d.info.sites.len(),
                d.info.links_text()
            );
            for s in &d.info.sites {
                let saes: Vec<&str> = s.saes.iter().map(|x| x.id.as_str()).collect();
                println!(
                    "  site {}: {} at {}  SAEs {}",
                    s.name,
                    s.kme_id,
                    s.kme_url,
                    saes.join(", ")
                );
                if let Some(s3) = &s.s3 {
                    println!(
                        "          shares in Garage at {} bucket {} (log {})",
                        s3.endpoint,
                        s3.bucket,
                        s3.garage_log.display()
                    );
                }
            }
            println!("dashboard:   {}", d.info.dashboard_url);
            println!(
                "prometheus:  prometheus --config.file={} --storage.tsdb.path={}",
                d.info.prometheus_config.display(),
                d.dir.join("prometheus").join("data").display()
            );
            println!("description: {}", d.dir.join("devnet.json").display());
            println!("stop with:   devnet down --dir {}", dir.display());
            d.detach();
            Ok(())
        }
        Cmd::Down { dir } => {
            let n = devnet::down(&dir)?;
            std::fs::remove_file(dir.join("devnet.json")).ok();
            println!("stopped {n} process(es)");
            Ok(())
        }
        Cmd::Demo {
            dir,
            size,
            seed,
            keep,
            set,
            net,
        } => {
            let opts = net.options(Options {
                rate_bytes_per_sec: 0,
                max_key_count: 524_288,
                agents: true,
                ..Options::default()
            })?;
            let job = match set {
                Some(0) => bail!("--set: at least 1 sample"),
                Some(n) => DemoJob::Set(n),
                None => DemoJob::File,
            };
            if let Err(e) = run_demo(dir, size, seed, keep, job, &opts) {
                if INTERRUPTED.load(Ordering::SeqCst) {
                    // The Ctrl-C handler is stopping the network; it exits the process.
                    loop {
                        std::thread::park();
                    }
                }
                eprintln!("devnet demo FAILED: {e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

/// One ETSI 014 exchange between the first SAEs of sites A and B: enc_keys at A, dec_keys at
/// B gives the same bytes, a second dec_keys is refused.
async fn key_check(info: &DevnetInfo) -> Result<()> {
    let (a, b) = (
        &info.sites[0],
        info.sites
            .get(1)
            .context("the demo needs at least 2 sites")?,
    );
    let (master, slave) = (&a.saes[0].id, &b.saes[0].id);
    let m = info.client(master)?;
    let s = info.client(slave)?;
    let got = m.get_key(slave, Some(4), Some(256)).await?;
    let ids = etsi_spec::KeyIds::from_ids(got.keys.iter().map(|k| k.key_ID.clone()));
    let back = s.dec_keys(master, &ids).await?;
    let same = got.keys.len() == back.keys.len()
        && got
            .keys
            .iter()
            .zip(&back.keys)
            .all(|(x, y)| x.key_ID == y.key_ID && x.key == y.key);
    if !same {
        bail!(
            "ETSI 014 check: {slave} at {} received different key material than {master} at {}",
            b.kme_id,
            a.kme_id
        );
    }
    if s.dec_keys(master, &ids).await.is_ok() {
        bail!("ETSI 014 check: a key was delivered twice");
    }
    println!(
        "ETSI 014 check: {} keys from {} (enc_keys) = {} (dec_keys), second dec_keys refused",
        got.keys.len(),
        a.kme_id,
        b.kme_id
    );
    Ok(())
}

/// `bytes` over `secs` in megabits per second (10^6 bit/s), as `backup-client` prints it.
fn mbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 * 8.0 / 1e6 / secs.max(1e-9)
}

/// Space available to unprivileged users on the file system holding `p`.
#[allow(clippy::unnecessary_cast)] // the statvfs field types differ between platforms
fn free_bytes(p: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs(3) fills the zeroed struct we own; `c` is a valid C string.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Fills `buf` from `r` as far as the stream goes; returns how much was read.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Compares two files in 4 MiB blocks; `Ok(None)` if identical, else a description of the
/// first difference.
fn compare_files(a: &Path, b: &Path) -> Result<Option<String>> {
    let (la, lb) = (std::fs::metadata(a)?.len(), std::fs::metadata(b)?.len());
    if la != lb {
        return Ok(Some(format!(
            "{} is {la} bytes, {} is {lb} bytes",
            a.display(),
            b.display()
        )));
    }
    let mut fa = std::fs::File::open(a).with_context(|| a.display().to_string())?;
    let mut fb = std::fs::File::open(b).with_context(|| b.display().to_string())?;
    let mut ba = vec![0u8; fastq::BUF_BYTES];
    let mut bb = vec![0u8; fastq::BUF_BYTES];
    let mut off = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb {
            return Ok(Some(format!(
                "the files changed length while being compared (at byte {})",
                off + na.min(nb) as u64
            )));
        }
        if ba[..na] != bb[..nb] {
            let i = ba[..na].iter().zip(&bb[..nb]).position(|(x, y)| x != y);
            return Ok(Some(format!(
                "first difference at byte {}",
                off + i.unwrap_or(0) as u64
            )));
        }
        if na == 0 {
            return Ok(None);
        }
        off += na as u64;
    }
}

/// Runs `backup-client --config CFG --json ARGS...`: its stderr goes straight to ours (errors,
/// warnings), its stdout is parsed as the JSON report. Returns the report and the wall time.
fn backup_client(
    bin: &Path,
    cfg: &Path,
    args: &[&std::ffi::OsStr],
) -> Result<(serde_json::Value, f64)> {
    let what = args
        .first()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let t = Instant::now();
    let out = Command::new(bin)
        .arg("--config")
        .arg(cfg)
        .arg("--json")
        .args(args)
        // `backup-client` reads BACKUP_* variables as configuration overrides; this one is
        // only for finding the binary.
        .env_remove("BACKUP_CLIENT_BIN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("starting {}", bin.display()))?;
    let wall = t.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "`backup-client {what}` failed ({}) after {wall:.1} s{}",
            out.status,
            if stdout.trim().is_empty() {
                String::new()
            } else {
                format!("; stdout: {}", stdout.trim())
            }
        );
    }
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "`backup-client {what}` printed no JSON report: {:?}",
            stdout.trim()
        )
    })?;
    Ok((v, wall))
}

fn json_u64(v: &serde_json::Value, k: &str) -> Result<u64> {
    v.get(k)
        .and_then(serde_json::Value::as_u64)
        .with_context(|| format!("no number {k:?} in the report {v}"))
}

fn json_f64(v: &serde_json::Value, k: &str) -> Result<f64> {
    v.get(k)
        .and_then(serde_json::Value::as_f64)
        .with_context(|| format!("no number {k:?} in the report {v}"))
}

/// Prints the last warning and error lines of every log in `dir` (after a failure).
fn show_log_problems(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    let mut logs: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
    logs.sort();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let bad: Vec<&str> = text
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .collect();
        if bad.is_empty() {
            continue;
        }
        eprintln!(
            "  {} ({} warning/error lines; last ones):",
            log.display(),
            bad.len()
        );
        for l in &bad[bad.len().saturating_sub(5)..] {
            eprintln!("    {l}");
        }
    }
}

/// Set when Ctrl-C stops the demo.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Big files the demo creates in its folder.
const BIG_FILES: [&str; 3] = ["sample.fastq", "restored.fastq", "copy.fastq"];

/// Removes the test files and the shares from a demo folder, keeping the configurations and
/// logs for a look after a failure.
fn remove_big_files(dir: &Path) {
    for f in BIG_FILES {
        std::fs::remove_file(dir.join(f)).ok();
    }
    // `--set`: the samples and their restored copies.
    std::fs::remove_dir_all(dir.join("samples")).ok();
    std::fs::remove_dir_all(dir.join("restored")).ok();
    remove_pools_and_shares(&dir.join("live"));
    remove_pools_and_shares(dir);
}

/// `devnet demo`: see the `Demo` subcommand.
/// What `devnet demo` runs.
#[derive(Clone, Copy)]
enum DemoJob {
    /// One file, on key stored in advance and on live key.
    File,
    /// A sample set of this many files, on live key.
    Set(usize),
}

fn run_demo(
    dir: Option<PathBuf>,
    size: u64,
    seed: u64,
    keep: bool,
    job: DemoJob,
    opts: &Options,
) -> Result<()> {
    if size == 0 {
        bail!("--size must be at least 1 byte");
    }
    let dir = match dir {
        Some(d) => {
            if std::fs::read_dir(&d).is_ok_and(|mut e| e.next().is_some()) {
                bail!(
                    "{} is not empty; give --dir a new or empty folder (the demo removes it at the end)",
                    d.display()
                );
            }
            d
        }
        None => std::env::temp_dir().join(format!("devnet-demo-{}", std::process::id())),
    };
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let dir = dir.canonicalize()?;

    // Source, restored file, plain copy, and a share per site (an XOR share is as big as
    // the file), the key stored in advance (both ends of every link direction hold it on
    // disk, and each KME a local pool of the same size), plus room for configurations and
    // logs.
    let need = match job {
        DemoJob::File => {
            size.saturating_mul(3 + opts.sites as u64)
                + devnet::fill::job_key_bytes(size).saturating_mul(devnet::fill::pools_held(opts))
        }
        // The samples, their restored copies, a share per site; live key only.
        DemoJob::Set(_) => size.saturating_mul(2 + opts.sites as u64),
    } + (256 << 20);
    if let Some(free) = free_bytes(&dir) {
        if free < need {
            std::fs::remove_dir(&dir).ok();
            bail!(
                "{} has {} free; a {} demo needs about {} (file, restored file, copy, a share per site); use a smaller --size or another --dir",
                dir.display(),
                human_size(free),
                human_size(size),
                human_size(need)
            );
        }
    }

    // Ctrl-C: stop the KMEs and agents (they run in process groups of their own, so the
    // terminal's SIGINT does not reach them) before leaving.
    {
        let dir = dir.clone();
        std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            if rt.block_on(tokio::signal::ctrl_c()).is_ok() {
                INTERRUPTED.store(true, Ordering::SeqCst);
                eprintln!("\ninterrupted: stopping the devnet");
                devnet::down(&dir).ok();
                if keep {
                    eprintln!("kept {}", dir.display());
                } else {
                    remove_big_files(&dir);
                    eprintln!("logs: {}", dir.join("logs").display());
                }
                std::process::exit(130);
            }
        });
    }

    let r = match job {
        DemoJob::File => demo_steps(&dir, size, seed, opts),
        DemoJob::Set(n) => demo_set_steps(&dir, size, n, seed, opts),
    };
    let logs = dir.join("logs");
    match (&r, keep) {
        (_, true) => println!("kept {} (logs in {})", dir.display(), logs.display()),
        (Ok(()), false) => {
            std::fs::remove_dir_all(&dir).ok();
        }
        (Err(_), false) => remove_big_files(&dir),
    }
    if r.is_err() {
        show_log_problems(&logs);
        eprintln!("logs: {}", logs.display());
    }
    r
}

fn demo_steps(dir: &Path, size: u64, seed: u64, opts: &Options) -> Result<()> {
    let client_bin = devnet::sibling_binary("backup-client")?;
    let sample = dir.join(BIG_FILES[0]);
    let restored = dir.join(BIG_FILES[1]);
    let copy = dir.join(BIG_FILES[2]);

    demo_generate(&sample, size, seed)?;
    let cp = demo_copy(&sample, &copy)?;

    // The seed's condition: the pools hold the job's key before the clock starts.
    let stored_opts = devnet::fill::stored_key_options(opts, size);
    check_memory_for_pools(&stored_opts)?;
    let d = demo_devnet(dir, &stored_opts)?;
    let fill = demo_fill(&d, &stored_opts)?;
    let stored = demo_job(&client_bin, &d, &sample, &restored, size)?;
    drop(d);
    remove_pools_and_shares(dir);

    // The same job with key generated during it: small pools, the bulk link refilling them.
    println!(
        "
the same job with key generated live (pools of {} keys):",
        opts.max_key_count
    );
    let d = demo_devnet(&dir.join("live"), opts)?;
    let live = demo_job(&client_bin, &d, &sample, &restored, size)?;
    drop(d);

    print_demo_table(size, opts.sites, &stored, &live, &cp, &fill);
    Ok(())
}

/// The seed's minimum backup unit: 100 samples of about 80 GB.
const SEED_UNIT_BYTES: f64 = 100.0 * 80e9;

/// `devnet demo --set N`: N synthetic samples stored as one set and restored as one, on
/// key generated live; the set's rate, and the time it projects for the seed's unit.
fn demo_set_steps(dir: &Path, size: u64, n: usize, seed: u64, opts: &Options) -> Result<()> {
    let client_bin = devnet::sibling_binary("backup-client")?;
    let samples = dir.join("samples");
    std::fs::create_dir_all(&samples)?;
    let each = (size / n as u64).max(1);
    let t = Instant::now();
    for i in 0..n {
        fastq::write_file(
            &samples.join(format!("sample-{i:03}.fastq")),
            each,
            seed + i as u64,
        )?;
    }
    println!(
        "generated {n} synthetic FASTQ samples of {} in {}, {:.1} s",
        human_size(each),
        samples.display(),
        t.elapsed().as_secs_f64()
    );
    let total = each * n as u64;
    let d = demo_devnet(&dir.join("live"), opts)?;
    let site = &d.info.sites[0];
    println!(
        "store:   backup-client --config {} --json store {}",
        site.client_config.display(),
        samples.display()
    );
    let (st, store_wall) = backup_client(
        &client_bin,
        &site.client_config,
        &["store".as_ref(), samples.as_os_str()],
    )?;
    let sent = json_u64(&st, "bytes_sent")?;
    if sent != total {
        bail!("the set sent {sent} bytes, its files hold {total}");
    }
    let out = dir.join("restored");
    println!(
        "restore: backup-client --config {} --json restore --set samples {}",
        site.client_config.display(),
        out.display()
    );
    let (_, restore_wall) = backup_client(
        &client_bin,
        &site.client_config,
        &[
            "restore".as_ref(),
            "--set".as_ref(),
            "samples".as_ref(),
            out.as_os_str(),
        ],
    )?;
    for i in 0..n {
        let name = format!("sample-{i:03}.fastq");
        if !devnet::files_equal(&samples.join(&name), &out.join("samples").join(&name))? {
            bail!("restored {name} differs from the original");
        }
    }
    let mbps = |secs: f64| total as f64 * 8.0 / secs.max(1e-9) / 1e6;
    let hours = |secs: f64| SEED_UNIT_BYTES / (total as f64 / secs.max(1e-9)) / 3600.0;
    println!(
        "\nsample set of {n} files, {} in all, byte-identical after restore (key generated live):",
        human_size(total)
    );
    println!(
        "  store   {:.1} s  {:>6.0} Mbps  ({:.2}x the seed's {SEED_STORE_MBPS} Mbps)",
        store_wall,
        mbps(store_wall),
        mbps(store_wall) / SEED_STORE_MBPS
    );
    println!(
        "  restore {:.1} s  {:>6.0} Mbps  ({:.2}x the seed's {SEED_RESTORE_MBPS} Mbps)",
        restore_wall,
        mbps(restore_wall),
        mbps(restore_wall) / SEED_RESTORE_MBPS
    );
    println!(
        "projection (not measured): the seed's unit of 100 samples x 80 GB at these rates: store {:.1} h, restore {:.1} h (the seed projected about 50 h to store it)",
        hours(store_wall),
        hours(restore_wall)
    );
    Ok(())
}

/// One timed store and restore at site A, with the CPU every process used.
struct Job {
    store: Timed,
    restore: Timed,
    store_cpu: devnet::cpu::JobCpu,
    restore_cpu: devnet::cpu::JobCpu,
}

fn demo_job(
    client_bin: &Path,
    d: &Devnet,
    sample: &Path,
    restored: &Path,
    size: u64,
) -> Result<Job> {
    let site = &d.info.sites[0];
    let procs = devnet::cpu::devnet_processes(&d.info);
    let before = devnet::cpu::before(&procs, &site.name);
    let (id, store) = demo_store(client_bin, site, sample, size)?;
    let store_cpu = before.after();
    let before = devnet::cpu::before(&procs, &site.name);
    let restore = demo_restore(client_bin, site, &id, restored)?;
    let restore_cpu = before.after();
    demo_compare(sample, restored, size)?;
    std::fs::remove_file(restored).ok();
    Ok(Job {
        store,
        restore,
        store_cpu,
        restore_cpu,
    })
}

/// KMEs without a store hold the pools of their links in memory (both directions of
/// each): refuses to start them when the machine cannot hold them. Durable KMEs keep at
/// most `memory_bytes_per_stream` of a pool in memory; their pools are on disk (counted by
/// the demo's free-space check).
fn check_memory_for_pools(opts: &Options) -> Result<()> {
    if !opts.volatile_kmes {
        return Ok(());
    }
    let pool = opts.max_key_count * devnet::fill::KEY_BYTES;
    let need = pool * devnet::fill::pools_held(opts) + (1 << 30);
    let avail = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024);
    if let Some(avail) = avail.filter(|a| *a < need) {
        bail!(
            "key stored in advance for this job needs about {} of memory in KMEs without a store ({} per link direction, both ends); {} available: use a smaller --size, or durable pools (no --volatile)",
            human_size(need),
            human_size(pool),
            human_size(avail)
        );
    }
    Ok(())
}

/// Waits until every link direction holds the job's key; prints how long the fill took.
fn demo_fill(d: &Devnet, opts: &Options) -> Result<devnet::fill::Fill> {
    let fill = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(devnet::fill::wait_full(
            &d.info,
            opts.block_bytes,
            std::time::Duration::from_secs(1800),
        ))?;
    println!(
        "key stored in advance: {} link directions hold {} each; filled {} more in {:.1} s after start-up ({:.0} MB/s, the links' prefill, durable pools); the links now run at {} B/s",
        fill.directions,
        human_size(fill.per_direction),
        human_size(fill.added),
        fill.secs,
        fill.bytes_per_sec() / 1e6,
        opts.rate_bytes_per_sec
    );
    Ok(fill)
}

/// After the stored-key run: its shares and its KMEs' pools, to free the disk.
fn remove_pools_and_shares(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with("site-") || name.starts_with("kme-store-") {
                std::fs::remove_dir_all(e.path()).ok();
            }
        }
    }
}

/// Starts the demo's devnet, checks that it has site agents and that key flows.
fn demo_devnet(dir: &Path, opts: &Options) -> Result<Devnet> {
    let t = Instant::now();
    let d = Devnet::start(dir, opts)?;
    println!(
        "devnet up in {:.1} s: {} sites{}, links {}, key rate {}, pools of {} keys per direction ({})",
        t.elapsed().as_secs_f64(),
        d.info.sites.len(),
        if opts.s3 {
            " (shares in each site's Garage, S3)"
        } else {
            ""
        },
        d.info.links_text(),
        if opts.rate_bytes_per_sec == 0 {
            "bulk".to_string()
        } else {
            format!("{} B/s", opts.rate_bytes_per_sec)
        },
        opts.max_key_count,
        d.dir.display()
    );
    if d.info.sites[0].client_config.as_os_str().is_empty() {
        bail!("the devnet has no site agents");
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(key_check(&d.info))?;
    Ok(d)
}

/// Writes the synthetic FASTQ test file.
fn demo_generate(sample: &Path, size: u64, seed: u64) -> Result<()> {
    let t = Instant::now();
    fastq::write_file(sample, size, seed)
        .with_context(|| format!("writing {}", sample.display()))?;
    let secs = t.elapsed().as_secs_f64();
    println!(
        "generated {} ({}, synthetic FASTQ, seed {seed}) in {secs:.2} s, {:.0} MB/s with fsync",
        sample.display(),
        human_size(size),
        size as f64 / 1e6 / secs.max(1e-9)
    );
    Ok(())
}

/// Disk baseline: a plain copy, synced. Returns its time in seconds.
/// Disk baseline: a plain copy, synced, removed after.
fn demo_copy(sample: &Path, copy: &Path) -> Result<devnet::cpu::CopyBaseline> {
    devnet::cpu::copy_baseline(sample, copy)
        .with_context(|| format!("copying to {}", copy.display()))
}

/// What a `backup-client` run reported: bytes and its own time, and the command's wall time.
struct Timed {
    bytes: u64,
    secs: f64,
    wall: f64,
}

/// Stores `sample` with `backup-client` at `site`; returns the backup ID and the timing.
fn demo_store(
    client_bin: &Path,
    site: &devnet::SiteInfo,
    sample: &Path,
    size: u64,
) -> Result<(String, Timed)> {
    println!(
        "store: backup-client --config {} --json store {}",
        site.client_config.display(),
        sample.display()
    );
    let (st, wall) = backup_client(
        client_bin,
        &site.client_config,
        &["store".as_ref(), sample.as_os_str()],
    )?;
    let id = st
        .get("backup_id")
        .and_then(serde_json::Value::as_str)
        .with_context(|| format!("no backup_id in the store report {st}"))?
        .to_string();
    let bytes = json_u64(&st, "bytes")?;
    let secs = json_f64(&st, "seconds")?;
    if bytes != size {
        bail!("store reported {bytes} bytes, the file has {size}");
    }
    println!("  backup {id}, shares {}", shares_text(&st));
    Ok((id, Timed { bytes, secs, wall }))
}

/// The shares of a store report as `1@A, 2@B MISSING, ...`.
fn shares_text(st: &serde_json::Value) -> String {
    st.get("shares")
        .and_then(serde_json::Value::as_array)
        .map(|a| {
            a.iter()
                .map(|s| {
                    format!(
                        "{}@{}{}",
                        s["share_index"],
                        s["site"].as_str().unwrap_or("?"),
                        if s["stored"].as_bool() == Some(true) {
                            ""
                        } else {
                            " MISSING"
                        }
                    )
                })
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default()
}

/// Restores backup `id` into `restored` with `backup-client` at `site`.
fn demo_restore(
    client_bin: &Path,
    site: &devnet::SiteInfo,
    id: &str,
    restored: &Path,
) -> Result<Timed> {
    println!(
        "restore: backup-client ... --json restore {id} {}",
        restored.display()
    );
    let (rs, wall) = backup_client(
        client_bin,
        &site.client_config,
        &["restore".as_ref(), id.as_ref(), restored.as_os_str()],
    )?;
    let bytes = json_u64(&rs, "bytes")?;
    let secs = json_f64(&rs, "seconds")?;
    let used = rs
        .get("used")
        .and_then(serde_json::Value::as_array)
        .map(|a| {
            a.iter()
                .map(|u| format!("{}@{}", u[1], u[0].as_str().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join(", ")
        })
        .unwrap_or_default();
    println!("  restored {} bytes from shares {used}", bytes);
    Ok(Timed { bytes, secs, wall })
}

/// Fails unless the restored file is identical to the original.
fn demo_compare(sample: &Path, restored: &Path, size: u64) -> Result<()> {
    let t = Instant::now();
    if let Some(diff) = compare_files(sample, restored)? {
        bail!(
            "the restored file differs from the original: {diff} ({} vs {})",
            sample.display(),
            restored.display()
        );
    }
    println!(
        "compared: identical ({} bytes, {:.2} s)",
        size,
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// One row of the demo's table: time, wall time, Mbps, and the seed's Mbps beside ours.
fn print_demo_row(name: &str, bytes: u64, secs: f64, wall: Option<f64>, seed: Option<f64>) {
    let m = mbps(bytes, secs);
    println!(
        "{name:<40} {:>8.2} s {:>8} {:>9.0} {:>9} {:>9}",
        secs,
        wall.map_or("-".into(), |w| format!("{w:.2} s")),
        m,
        seed.map_or("-".into(), |s| format!("{s:.0}")),
        seed.map_or("-".into(), |s| format!("{:.2}x", m / s)),
    );
}

/// The demo's tables: store, restore (key stored in advance, then generated live) and the
/// plain copy beside the seed's figures; CPU per file byte of every process.
fn print_demo_table(
    size: u64,
    sites: usize,
    stored: &Job,
    live: &Job,
    cp: &devnet::cpu::CopyBaseline,
    fill: &devnet::fill::Fill,
) {
    println!();
    println!(
        "{} ({size} bytes), {} sites, Mbps = 10^6 bit/s",
        human_size(size),
        sites
    );
    println!(
        "{:<40} {:>10} {:>8} {:>9} {:>9} {:>9}",
        "", "time", "wall", "Mbps", "seed Mbps", "ours/seed"
    );
    for (job, label) in [
        (stored, "key stored in advance"),
        (live, "key generated live"),
    ] {
        let st = &job.store;
        let rs = &job.restore;
        let (s, r) = (format!("store, {label}"), format!("restore, {label}"));
        print_demo_row(&s, st.bytes, st.secs, Some(st.wall), Some(SEED_STORE_MBPS));
        print_demo_row(
            &r,
            rs.bytes,
            rs.secs,
            Some(rs.wall),
            Some(SEED_RESTORE_MBPS),
        );
    }
    print_demo_row("cp + fsync (disk)", size, cp.secs, None, None);
    println!(
        "(time: as reported by backup-client; wall: the whole command, process start included;\n the stored key was filled in {:.1} s before the store, {:.0} MB/s over {} link directions)",
        fill.secs,
        fill.bytes_per_sec() / 1e6,
        fill.directions
    );
    println!();
    devnet::cpu::print_table(
        size,
        &[
            ("store", &stored.store_cpu),
            ("restore", &stored.restore_cpu),
            ("store live", &live.store_cpu),
            ("restore live", &live.restore_cpu),
        ],
        cp.cpu,
    );
}
