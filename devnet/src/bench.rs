//! `devnet bench`: throughput of every layer on a devnet, each figure beside a baseline
//! measured in the same run, medians of several runs.
//!
//! - KME: complete master → slave exchanges (enc_keys at KME A, dec_keys at KME B) at
//!   number = 1, 256-bit keys, with 1, 8 and 64 concurrent mTLS clients over keep-alive
//!   connections, beside `GET status` at the same concurrency (the transport ceiling of the
//!   same server); batched exchanges (1,024 keys of 256 bit per request); bulk key delivery
//!   with the key size the backup client uses.
//! - Pipeline: store and restore of a synthetic FASTQ file through the real CLI, with key
//!   stored in advance (a devnet whose pools are sized to the job and filled before each
//!   run, the fill rate printed) and with key generated live (small pools the bulk link
//!   refills), beside a plain copy of the same file (the disk baseline) and the seed's
//!   356 / 502 Mbps; CPU ns per file byte of every process (from /proc) and a projection
//!   for one 2-core machine per site.
//! - Peak RSS (VmHWM) of the client, each site agent and each KME.
//! - Link: the modelled secure key rate and QBER by fibre length; the bulk fill rate of a
//!   simulated link into the durable pool, beside the same link with an in-memory pool.
//! - Relay: on a 4-site chain A-B-C-D, exchanges/s and batched keys/s from A to a slave 1,
//!   2 and 3 links away (B directly; C and D through trusted nodes).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{cpu, fastq, Devnet, DevnetInfo, Options};

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub dir: PathBuf,
    /// Size of the pipeline's test file.
    pub size: u64,
    /// Runs per figure (the median is printed).
    pub runs: usize,
    /// Seconds per KME measurement.
    pub seconds: f64,
    /// Skip the pipeline part.
    pub kme_only: bool,
    /// Only the link part.
    pub link_only: bool,
    /// KMEs keep their pools in memory only (no durable store), for comparison.
    pub volatile: bool,
    /// Only the relay part.
    pub relay_only: bool,
    /// Only the storage part: the pipeline with shares on local disk and in Garage (S3).
    pub storage_only: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return 0.0;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Peak resident set of a process, bytes (VmHWM).
fn peak_rss(pid: u32) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = text.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs `f` with `conc` concurrent tasks for `secs` seconds; returns operations per second.
async fn rate<F, Fut>(conc: usize, secs: f64, f: F) -> Result<f64>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<u64>> + Send,
{
    let f = Arc::new(f);
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..conc {
        let f = f.clone();
        tasks.push(tokio::spawn(async move {
            let mut ops = 0u64;
            while Instant::now() < deadline {
                ops += f(i).await?;
            }
            anyhow::Ok(ops)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total as f64 / start.elapsed().as_secs_f64())
}

/// A 503 (pool momentarily empty: the link refills it) is waited out, not counted.
async fn pool_wait<T>(r: Result<T, etsi_spec::ClientError>) -> Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.status().is_some_and(|s| s.as_u16() == 503) => {
            tokio::time::sleep(Duration::from_millis(2)).await;
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// One enc_keys of `number` keys of `bits` at KME A and the matching dec_keys at KME B by
/// client pair `i`; returns (keys, key bytes) delivered, (0, 0) while the pool refills.
async fn batch_exchange(c: &Clients, i: usize, number: u64, bits: u64) -> Result<(u64, u64)> {
    let req = etsi_spec::KeyRequest {
        number: Some(number),
        size: Some(bits),
        ..Default::default()
    };
    let Some(got) = pool_wait(c.master[i].enc_keys_decoded("SAE_B1", &req).await).await? else {
        return Ok((0, 0));
    };
    let ids = etsi_spec::KeyIds::from_ids(got.iter().map(|(id, _)| id.to_string()));
    let back = c.slave[i].dec_keys_decoded("SAE_A1", &ids).await?;
    if back.len() != got.len() {
        bail!("slave received {} of {} keys", back.len(), got.len());
    }
    Ok((
        back.len() as u64,
        back.iter().map(|(_, k)| k.len() as u64).sum(),
    ))
}

struct Clients {
    master: Vec<etsi_spec::Client>,
    slave: Vec<etsi_spec::Client>,
}

fn clients(info: &DevnetInfo, n: usize) -> Result<Arc<Clients>> {
    // One client (one keep-alive connection pool) per concurrent task.
    let mut master = Vec::new();
    let mut slave = Vec::new();
    for _ in 0..n {
        master.push(info.client("SAE_A1")?);
        slave.push(info.client("SAE_B1")?);
    }
    Ok(Arc::new(Clients { master, slave }))
}

async fn kme_part(info: &DevnetInfo, o: &BenchOptions) -> Result<()> {
    println!(
        "\nKME (ETSI 014 over mTLS, keep-alive; master SAE_A1 at KME_A, slave SAE_B1 at KME_B)"
    );
    println!(
        "{:<52} {:>14} {:>20}",
        "measurement", "median", "baseline (same run)"
    );
    for conc in [1usize, 8, 64] {
        let cl = clients(info, conc)?;
        let mut ex = Vec::new();
        let mut base = Vec::new();
        for _ in 0..o.runs {
            let c = cl.clone();
            base.push(
                rate(conc, o.seconds, move |i| {
                    let c = c.clone();
                    async move {
                        c.master[i].status("SAE_B1").await?;
                        Ok(1)
                    }
                })
                .await?,
            );
            let c = cl.clone();
            ex.push(
                rate(conc, o.seconds, move |i| {
                    let c = c.clone();
                    async move {
                        let got = c.master[i].get_key("SAE_B1", Some(1), Some(256)).await?;
                        let id = &got.keys[0].key_ID;
                        let back = c.slave[i].get_key_with_id("SAE_A1", id).await?;
                        if back.keys[0].key != got.keys[0].key {
                            bail!("slave received other bytes");
                        }
                        Ok(1)
                    }
                })
                .await?,
            );
        }
        println!(
            "{:<52} {:>10.0} /s {:>14.0} req/s",
            format!("exchanges, number=1, 256 bit, {conc} client(s)"),
            median(ex),
            median(base)
        );
    }
    let conc = 8;
    let cl = clients(info, conc)?;
    let mut batched = Vec::new();
    let mut bulk = Vec::new();
    for _ in 0..o.runs {
        let c = cl.clone();
        batched.push(
            rate(conc, o.seconds, move |i| {
                let c = c.clone();
                async move { Ok(batch_exchange(&c, i, 1024, 256).await?.0) }
            })
            .await?,
        );
        let c = cl.clone();
        bulk.push(
            rate(conc, o.seconds, move |i| {
                let c = c.clone();
                async move { Ok(batch_exchange(&c, i, 32, 1_048_576).await?.1) }
            })
            .await?,
        );
    }
    println!(
        "{:<52} {:>10.0} /s {:>20}",
        "keys, batched 1,024 x 256 bit, 8 clients",
        median(batched),
        "-"
    );
    println!(
        "{:<52} {:>9.2} Gbps {:>20}",
        "bulk key, 32 x 128 KiB keys per request, 8 clients",
        median(bulk) * 8.0 / 1e9,
        "(each byte to master and slave)"
    );
    Ok(())
}

/// Relayed key: a 4-site chain, a master at A and slaves 1, 2 and 3 links away.
fn relay_part(o: &BenchOptions) -> Result<()> {
    let net = Devnet::start(
        &o.dir.join("relay"),
        &Options {
            sites: 4,
            links: Some(crate::parse_links("A-B,B-C,C-D", 4)?),
            rate_bytes_per_sec: 0,
            max_key_count: 1 << 19,
            agents: false,
            volatile_kmes: o.volatile,
            ..Options::default()
        },
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    println!(
        "\nRelay (4-site chain A-B-C-D; master SAE_A1; each hop one-time padded and authenticated)"
    );
    println!(
        "{:<52} {:>14} {:>20}",
        "measurement", "median", "vs 1 link (same run)"
    );
    let conc = 8;
    let mut one = (0.0, 0.0);
    for (hops, slave) in [(1, "SAE_B1"), (2, "SAE_C1"), (3, "SAE_D1")] {
        let master: Vec<_> = (0..conc)
            .map(|_| net.info.client("SAE_A1"))
            .collect::<Result<_>>()?;
        let slaves: Vec<_> = (0..conc)
            .map(|_| net.info.client(slave))
            .collect::<Result<_>>()?;
        let cl = Arc::new((master, slaves));
        let (mut ex, mut keys) = (Vec::new(), Vec::new());
        for _ in 0..o.runs {
            for (number, out) in [(1u64, &mut ex), (1024, &mut keys)] {
                let c = cl.clone();
                out.push(rt.block_on(rate(conc, o.seconds, move |i| {
                    let c = c.clone();
                    async move { relay_exchange(&c.0[i], &c.1[i], slave, number).await }
                }))?);
            }
        }
        let (e, k) = (median(ex), median(keys));
        if hops == 1 {
            one = (e, k);
        }
        println!(
            "{:<52} {:>10.0} /s {:>19.2}x",
            format!("exchanges, number=1, 256 bit, {hops} link(s), {conc} clients"),
            e,
            e / one.0.max(1e-9)
        );
        println!(
            "{:<52} {:>10.0} /s {:>19.2}x",
            format!("keys, batched 1,024 x 256 bit, {hops} link(s), {conc} clients"),
            k,
            k / one.1.max(1e-9)
        );
    }
    Ok(())
}

/// One enc_keys of `number` 256-bit keys for `slave` and its dec_keys; returns the keys.
async fn relay_exchange(
    master: &etsi_spec::Client,
    slave: &etsi_spec::Client,
    slave_id: &str,
    number: u64,
) -> Result<u64> {
    let req = etsi_spec::KeyRequest {
        number: Some(number),
        size: Some(256),
        ..Default::default()
    };
    let Some(got) = pool_wait(master.enc_keys_decoded(slave_id, &req).await).await? else {
        return Ok(0);
    };
    let ids = etsi_spec::KeyIds::from_ids(got.iter().map(|(id, _)| id.to_string()));
    let back = slave.dec_keys_decoded("SAE_A1", &ids).await?;
    if back != got {
        bail!("the slave received other keys than the master");
    }
    Ok(back.len() as u64)
}

/// Runs the CLI, sampling its peak RSS; returns its JSON reply.
fn cli(config: &Path, args: &[&str], peak: &mut u64) -> Result<serde_json::Value> {
    let bin = crate::sibling_binary("backup-client")?;
    let mut child = Command::new(bin)
        .arg("--config")
        .arg(config)
        .arg("--json")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let pid = child.id();
    let mut out = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut out, &mut s);
        s
    });
    loop {
        if let Some(r) = peak_rss(pid) {
            *peak = (*peak).max(r);
        }
        if let Some(status) = child.try_wait()? {
            let text = reader.join().unwrap_or_default();
            if !status.success() {
                bail!("backup-client {args:?} failed ({status})");
            }
            return Ok(serde_json::from_str(text.trim())?);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One store and restore at site A through the CLI, with every process's CPU time.
struct Job {
    store_gbps: f64,
    restore_gbps: f64,
    store_cpu: cpu::JobCpu,
    restore_cpu: cpu::JobCpu,
}

fn run_job(net: &Devnet, file: &Path, out: &Path, size: u64, peak: &mut u64) -> Result<Job> {
    let site = &net.info.sites[0];
    let procs = cpu::devnet_processes(&net.info);
    let before = cpu::before(&procs, &site.name);
    let s = cli(
        &site.client_config,
        &["store", file.to_str().context("path")?],
        peak,
    )?;
    let store_cpu = before.after();
    let id = s["backup_id"].as_str().context("backup_id")?.to_owned();
    let before = cpu::before(&procs, &site.name);
    let r = cli(
        &site.client_config,
        &["restore", &id, out.to_str().context("path")?],
        peak,
    )?;
    let restore_cpu = before.after();
    if !crate::files_equal(file, out)? {
        bail!("the restored file differs from the original");
    }
    std::fs::remove_file(out)?;
    for s in net.info.sites.iter().filter(|s| s.s3.is_none()) {
        let _ = std::fs::remove_dir_all(s.store_dir.join(&id));
    }
    let gbps =
        |v: &serde_json::Value| size as f64 * 8.0 / v["seconds"].as_f64().unwrap_or(f64::NAN) / 1e9;
    Ok(Job {
        store_gbps: gbps(&s),
        restore_gbps: gbps(&r),
        store_cpu,
        restore_cpu,
    })
}

/// The job of the median run (by store throughput).
fn median_job(jobs: &[Job]) -> Option<&Job> {
    let mut order: Vec<&Job> = jobs.iter().collect();
    order.sort_by(|a, b| a.store_gbps.total_cmp(&b.store_gbps));
    order.get(order.len() / 2).copied()
}

fn print_gbps(name: &str, v: f64, seed: f64, cp: f64) {
    println!(
        "{name:<52} {v:>9.2} Gbps   {:>5.1}x seed ({seed})   {:.2}x cp",
        v / seed,
        v / cp
    );
}

/// Store and restore with key stored in advance (a devnet of its own per run, its pools
/// sized to the job and filled by the links' prefill before the job) and with key
/// generated live (the bench's small pools, refilled by the bulk link during the job),
/// beside a plain copy; CPU per byte of every process.
fn pipeline_part(net: &Devnet, o: &BenchOptions) -> Result<u64> {
    let file = o.dir.join("bench.fastq");
    let out = o.dir.join("bench.restored");
    let copy = o.dir.join("bench.copy");
    println!(
        "\nPipeline: {} synthetic FASTQ, 3 sites on this machine, k=2 n=3, store at A, restore at A",
        fastq::human_size(o.size)
    );
    fastq::write_file(&file, o.size, 2021)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut peak = 0u64;
    let (mut stored, mut live, mut cp, mut cp_cpu, mut fills) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for run in 0..o.runs {
        let c = cpu::copy_baseline(&file, &copy)?;
        cp.push(o.size as f64 * 8.0 / c.secs / 1e9);
        cp_cpu.push(c.cpu);
        let dir = o.dir.join(format!("stored-{run}"));
        let stored_opts = stored_key_options(o);
        let stored_net = Devnet::start(&dir, &stored_opts)?;
        let fill = rt.block_on(crate::fill::wait_full(
            &stored_net.info,
            stored_opts.block_bytes,
            Duration::from_secs(1800),
        ))?;
        fills.push(fill.bytes_per_sec());
        stored.push(run_job(&stored_net, &file, &out, o.size, &mut peak)?);
        if run + 1 == o.runs {
            print_rss(
                "the stored-key devnet (its pools hold the job's key in memory)",
                &stored_net.info,
                None,
            );
        }
        drop(stored_net);
        std::fs::remove_dir_all(&dir).ok();
        live.push(run_job(net, &file, &out, o.size, &mut peak)?);
    }
    std::fs::remove_file(&file)?;
    let cp = median(cp);
    let m = |v: &[Job], f: fn(&Job) -> f64| median(v.iter().map(f).collect());
    println!();
    print_gbps(
        "store, key stored in advance",
        m(&stored, |j| j.store_gbps),
        0.356,
        cp,
    );
    print_gbps(
        "restore, key stored in advance",
        m(&stored, |j| j.restore_gbps),
        0.502,
        cp,
    );
    print_gbps(
        "store, key generated live (16 MiB pools)",
        m(&live, |j| j.store_gbps),
        0.356,
        cp,
    );
    print_gbps(
        "restore, key generated live",
        m(&live, |j| j.restore_gbps),
        0.502,
        cp,
    );
    println!(
        "{:<52} {:>9.2} Gbps",
        "cp + fsync of the same file (disk baseline)", cp
    );
    println!(
        "{:<52} {:>9.0} MB/s",
        "fill of the stored key before each job (all directions)",
        median(fills) / 1e6
    );
    if let (Some(s), Some(l)) = (median_job(&stored), median_job(&live)) {
        println!("\n(the median run's CPU, by store throughput)");
        cp_cpu.sort();
        cpu::print_table(
            o.size,
            &[
                ("store", &s.store_cpu),
                ("restore", &s.restore_cpu),
                ("store live", &l.store_cpu),
                ("restore live", &l.restore_cpu),
            ],
            cp_cpu.get(cp_cpu.len() / 2).copied().unwrap_or_default(),
        );
    }
    Ok(peak)
}

/// The pipeline on key stored in advance with the agents' shares on local disk and in
/// each site's Garage node (S3), run after run on the same file, alternating, so that both
/// see the same machine; throughput, ratio, and CPU per byte of every process (the Garage
/// nodes' too).
fn storage_part(o: &BenchOptions) -> Result<()> {
    let file = o.dir.join("storage.fastq");
    let out = o.dir.join("storage.restored");
    println!(
        "\nStorage backends: {} synthetic FASTQ on key stored in advance, shares on local disk vs in Garage {} (one node per site, S3 on loopback, fsync on)",
        fastq::human_size(o.size),
        crate::garage::binary()
            .ok()
            .and_then(|b| crate::garage::version(&b))
            .unwrap_or_default()
    );
    fastq::write_file(&file, o.size, 2021)?;
    let copy = cpu::copy_baseline(&file, &o.dir.join("storage.copy"))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (mut local, mut s3) = (Vec::new(), Vec::new());
    let mut peak = 0u64;
    for run in 0..o.runs {
        for (jobs, on_s3) in [(&mut local, false), (&mut s3, true)] {
            let dir = o.dir.join(format!(
                "storage-{run}-{}",
                if on_s3 { "s3" } else { "local" }
            ));
            let opts = Options {
                s3: on_s3,
                ..stored_key_options(o)
            };
            let net = Devnet::start(&dir, &opts)?;
            rt.block_on(crate::fill::wait_full(
                &net.info,
                opts.block_bytes,
                Duration::from_secs(1800),
            ))?;
            jobs.push(run_job(&net, &file, &out, o.size, &mut peak)?);
            drop(net);
            std::fs::remove_dir_all(&dir).ok();
        }
    }
    std::fs::remove_file(&file)?;
    let m = |v: &[Job], f: fn(&Job) -> f64| median(v.iter().map(f).collect());
    let (ls, lr) = (m(&local, |j| j.store_gbps), m(&local, |j| j.restore_gbps));
    let (ss, sr) = (m(&s3, |j| j.store_gbps), m(&s3, |j| j.restore_gbps));
    println!();
    println!("{:<52} {:>9.2} Gbps", "store, shares on local disk", ls);
    println!(
        "{:<52} {:>9.2} Gbps   {:.2}x local",
        "store, shares in Garage (S3)",
        ss,
        ss / ls
    );
    println!("{:<52} {:>9.2} Gbps", "restore, shares on local disk", lr);
    println!(
        "{:<52} {:>9.2} Gbps   {:.2}x local",
        "restore, shares in Garage (S3)",
        sr,
        sr / lr
    );
    if let (Some(l), Some(s)) = (median_job(&local), median_job(&s3)) {
        println!("\n(the median runs' CPU, by store throughput)");
        cpu::print_table(
            o.size,
            &[
                ("store local", &l.store_cpu),
                ("restore local", &l.restore_cpu),
                ("store S3", &s.store_cpu),
                ("restore S3", &s.restore_cpu),
            ],
            copy.cpu,
        );
    }
    Ok(())
}

/// A network whose pools hold the key of one job (see [`crate::fill::stored_key_options`]).
fn stored_key_options(o: &BenchOptions) -> Options {
    let base = Options {
        volatile_kmes: o.volatile,
        ..Options::default()
    };
    crate::fill::stored_key_options(&base, o.size)
}

/// Peak RSS (VmHWM) of every KME and agent of a network.
fn print_rss(what: &str, info: &DevnetInfo, client_peak: Option<u64>) {
    println!("Peak RSS (VmHWM) of {what}");
    if let Some(p) = client_peak {
        println!("  {:<20} {:>8.1} MiB", "client", p as f64 / 1048576.0);
    }
    for s in &info.sites {
        for (p, pid) in [("KME", s.kme_pid), ("agent", s.agent_pid)] {
            if let Some(r) = peak_rss(pid) {
                println!(
                    "  {:<20} {:>8.1} MiB",
                    format!("{p} {}", s.name),
                    r as f64 / 1048576.0
                );
            }
        }
    }
}

/// A counter reading: when, and its value.
type Sample = (Instant, f64);

/// Bytes per second at which a bulk (rate 0) simulated link fills the pools of both
/// directions, measured at the producing end from its `generated` counter. The pools are
/// emptied by restarting the far end: the synchronisation after a restart discards the
/// link's unallocated pool at both ends, so the link then refills from empty.
fn fill_rate(dir: &Path, volatile: bool) -> Result<f64> {
    let mut net = Devnet::start(
        dir,
        &Options {
            sites: 2,
            agents: false,
            rate_bytes_per_sec: 0,
            // 2^22 keys of 256 bit: 128 MiB per direction, 256 MiB in all (held in memory and,
            // when durable, on disk at both KMEs).
            max_key_count: 1 << 22,
            block_bytes: 1 << 20,
            volatile_kmes: volatile,
            // The local pools stay small and slow, so that only the link works.
            local_toml: Some(
                "rate_bytes_per_sec = 4096\nblock_bytes = 1024\nprefill = false".into(),
            ),
            ..Options::default()
        },
    )?;
    let url = net.info.sites[0].metrics_url.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let sample = || -> Result<f64> {
        let text = rt.block_on(async { reqwest::get(&url).await?.text().await })?;
        Ok(text
            .lines()
            .find_map(|l| l.strip_prefix("qkd_key_generated_bytes_total{peer=\"KME_B\"} "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .unwrap_or(0.0))
    };
    // Waits until the counter has not moved for a second; returns (first growth, last growth).
    let settle = |from: f64| -> Result<Option<(Sample, Sample)>> {
        let start = Instant::now();
        let mut first = None;
        let mut last = (Instant::now(), from);
        while start.elapsed() < Duration::from_secs(120)
            && last.0.elapsed() < Duration::from_secs(2)
        {
            std::thread::sleep(Duration::from_millis(20));
            let b = sample()?;
            if b > last.1 {
                last = (Instant::now(), b);
                first.get_or_insert(last);
            }
        }
        Ok(first.map(|f| (f, last)))
    };
    settle(sample()?)?; // the initial fill
    let before = sample()?;
    net.kill_kme(1);
    net.restart_kme(1)?;
    let Some(((t0, b0), (t1, b1))) = settle(before)? else {
        bail!("the link did not refill after the restart");
    };
    let secs = t1.duration_since(t0).as_secs_f64();
    if secs <= 0.0 {
        bail!("the refill was too short to time");
    }
    Ok((b1 - b0) / secs)
}

/// The link part: modelled rates, and the bulk fill rate durable vs in memory.
fn link_part(o: &BenchOptions) -> Result<()> {
    println!(
        "\nQKD link model (decoy-state BB84, default device: 1 GHz, mu 0.5, eta_D 0.2, 0.2 dB/km)"
    );
    println!(
        "{:>10} {:>10} {:>22}",
        "length km", "QBER %", "secure key rate"
    );
    let device = qkd_sim::physics::DeviceParams::default();
    for l in [10.0, 25.0, 50.0, 75.0, 100.0, 125.0, 150.0] {
        let p = device.evaluate(l, 0.0, 0.11);
        println!(
            "{:>10} {:>10.2} {:>17.3} Mbps",
            l,
            p.qber * 100.0,
            p.secure_key_rate_bps / 1e6
        );
    }
    let mut durable = Vec::new();
    let mut memory = Vec::new();
    for r in 0..o.runs {
        for (volatile, out) in [(false, &mut durable), (true, &mut memory)] {
            let dir = o.dir.join(format!("fill-{r}-{volatile}"));
            out.push(fill_rate(&dir, volatile)?);
            std::fs::remove_dir_all(&dir).ok();
        }
    }
    println!(
        "{:<52} {:>9.0} MB/s {:>14.0} MB/s",
        "bulk link fill, both directions, durable pool",
        median(durable) / 1e6,
        median(memory) / 1e6
    );
    println!("{:<52} {:>14} {:>19}", "", "", "(in-memory pool)");
    Ok(())
}

/// Runs the whole benchmark and prints the tables.
pub fn run(o: &BenchOptions) -> Result<()> {
    std::fs::create_dir_all(&o.dir)?;
    if o.relay_only {
        println!(
            "devnet bench (relay), {} (2 cores shared by every process), medians of {} run(s)",
            chrono_free_date(),
            o.runs
        );
        return relay_part(o);
    }
    if o.storage_only {
        println!(
            "devnet bench (storage), {} (2 cores shared by every process), medians of {} run(s)",
            chrono_free_date(),
            o.runs
        );
        return storage_part(o);
    }
    if o.link_only {
        println!(
            "devnet bench (link), {} (2 cores shared by every process), medians of {} run(s)",
            chrono_free_date(),
            o.runs
        );
        return link_part(o);
    }
    let net = Devnet::start(
        &o.dir.join("net"),
        &Options {
            rate_bytes_per_sec: 0,
            max_key_count: 1 << 19,
            volatile_kmes: o.volatile,
            ..Options::default()
        },
    )?;
    println!(
        "devnet bench, {} (2 cores shared by every process), medians of {} run(s), {} key pools",
        chrono_free_date(),
        o.runs,
        if o.volatile { "in-memory" } else { "durable" }
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(kme_part(&net.info, o))?;
    let client_peak = if o.kme_only {
        None
    } else {
        Some(pipeline_part(&net, o)?)
    };
    drop(rt);
    println!();
    print_rss("the client and the bench's devnet", &net.info, client_peak);
    drop(net);
    relay_part(o)?;
    link_part(o)?;
    if !o.kme_only {
        storage_part(o)?;
    }
    Ok(())
}

fn chrono_free_date() -> String {
    Command::new("date")
        .arg("-u")
        .arg("+%Y-%m-%d %H:%M UTC")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}
