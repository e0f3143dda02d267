//! `devnet`: bring up, drive and stop a QKD network on loopback.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use devnet::{parse_links, Devnet, DevnetInfo, Options};

/// A multi-site QKD network on 127.0.0.1: a fresh development PKI, one ETSI GS QKD 014 KME
/// per site, simulated QKD links between linked sites, and DIR/devnet.json describing it all
/// (ca_cert, sites with kme_url and SAE certificate/key paths, links).
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
    /// Key rate of each link in bytes/s (0 = bulk, as fast as the machine goes).
    #[arg(long, default_value_t = 1_250_000)]
    rate: u64,
    /// Pool capacity per link direction, in keys of 256 bits.
    #[arg(long, default_value_t = 100_000)]
    max_key_count: u64,
}

impl NetArgs {
    fn options(&self) -> Result<Options> {
        Ok(Options {
            sites: self.sites,
            links: self
                .links
                .as_deref()
                .map(|l| parse_links(l, self.sites))
                .transpose()?,
            saes_per_site: self.saes_per_site.max(1),
            rate_bytes_per_sec: self.rate,
            max_key_count: self.max_key_count,
            ..Options::default()
        })
    }
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the network in DIR and return once every link delivers key; it keeps running.
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
    /// Start a network, run the whole 014 master → slave flow on it, print figures, stop it.
    Demo {
        /// Folder to use (default: a fresh folder under the system temp dir).
        #[arg(long)]
        dir: Option<PathBuf>,
        #[command(flatten)]
        net: NetArgs,
    },
}

fn main() -> Result<()> {
    match Cli::parse().cmd {
        Cmd::Up { dir, net } => {
            if dir.join("devnet.json").exists() && DevnetInfo::load(&dir).is_ok() {
                bail!(
                    "{} already holds a devnet; run `devnet down --dir {}` first",
                    dir.display(),
                    dir.display()
                );
            }
            let t = Instant::now();
            let d = Devnet::start(&dir, &net.options()?)?;
            println!(
                "devnet up in {:.1} s: {} sites, links {}",
                t.elapsed().as_secs_f64(),
                d.info.sites.len(),
                d.info
                    .links
                    .iter()
                    .map(|[a, b]| format!("{a}-{b}"))
                    .collect::<Vec<_>>()
                    .join(", ")
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
            }
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
        Cmd::Demo { dir, net } => {
            let tmp;
            let dir = match dir {
                Some(d) => d,
                None => {
                    tmp = std::env::temp_dir().join(format!("devnet-demo-{}", std::process::id()));
                    tmp
                }
            };
            let t = Instant::now();
            let d = Devnet::start(&dir, &net.options()?)?;
            println!(
                "devnet up in {:.1} s ({})",
                t.elapsed().as_secs_f64(),
                d.dir.display()
            );
            let rt = tokio::runtime::Runtime::new()?;
            let r = rt.block_on(demo(&d.info));
            drop(d);
            if r.is_ok() {
                std::fs::remove_dir_all(&dir).ok();
            }
            r
        }
    }
}

/// The whole 014 flow between the first SAEs of sites A and B.
async fn demo(info: &DevnetInfo) -> Result<()> {
    let (a, b) = (
        &info.sites[0],
        info.sites.get(1).context("demo needs 2 sites")?,
    );
    let (master, slave) = (&a.saes[0].id, &b.saes[0].id);
    let m = info.client(master)?;
    let s = info.client(slave)?;
    let st = m.status(slave).await?;
    println!(
        "status {master} -> {slave}: {} -> {}, stored_key_count {}, key_size {} bits",
        st.source_KME_ID, st.target_KME_ID, st.stored_key_count, st.key_size
    );
    let got = m.get_key(slave, Some(4), Some(256)).await?;
    let ids = etsi_spec::KeyIds::from_ids(got.keys.iter().map(|k| k.key_ID.clone()));
    let back = s.dec_keys(master, &ids).await?;
    let same = got
        .keys
        .iter()
        .zip(&back.keys)
        .all(|(x, y)| x.key_ID == y.key_ID && x.key == y.key);
    println!(
        "enc_keys at {} gave {} keys; dec_keys at {} returned the same bytes: {same}",
        a.kme_id,
        got.keys.len(),
        b.kme_id
    );
    if !same {
        bail!("slave received different key material");
    }
    let again = s.dec_keys(master, &ids).await;
    println!(
        "second dec_keys of the same IDs: {}",
        match &again {
            Err(e) => e.to_string(),
            Ok(_) => "delivered again (BUG)".into(),
        }
    );
    if again.is_ok() {
        bail!("a key was delivered twice");
    }
    // Throughput of complete exchanges, 1,024 keys of 256 bits per request.
    let t = Instant::now();
    let mut keys = 0usize;
    while t.elapsed().as_secs_f64() < 2.0 {
        let got = match m.get_key(slave, Some(1024), Some(256)).await {
            Ok(g) => g,
            Err(e) if e.status().is_some_and(|s| s.as_u16() == 503) => break,
            Err(e) => return Err(e.into()),
        };
        let ids = etsi_spec::KeyIds::from_ids(got.keys.iter().map(|k| k.key_ID.clone()));
        keys += s.dec_keys(master, &ids).await?.keys.len();
    }
    let secs = t.elapsed().as_secs_f64();
    println!(
        "batched exchange (1 client, 1,024 x 256-bit keys per request): {keys} keys in {secs:.2} s = {:.0} keys/s",
        keys as f64 / secs
    );
    Ok(())
}
