//! `qkd-dashboard`: one live web view of every KME and site agent of a QKD backup network.
//!
//! Owns: gathering (polling each KME's `/dashboard/api/sample` over mutual TLS with the
//! user's certificate, and each site agent's `/jobs` on its operator listener) and serving
//! the page of `dashboard-web` on a loopback address, with the eavesdropper switch passed
//! on to the link's KME under the same certificate.
//!
//! Must never depend on: `kms-server` or the backup crates; it reads what they publish.
//!
//! Why a command and not a KME page: the network view needs every KME and every agent, and
//! the KME must know nothing of backups; a browser would also need the user's certificate
//! for every KME. The command holds the certificate (like `kubectl proxy`), acts only as
//! it allows (the KMEs check it: an SAE's certificate reads, an operator's may also switch
//! the eavesdropper), listens on loopback only, and requires a random token on every
//! request, so another local user or a web page in the browser cannot use it.

#![forbid(unsafe_code)]

mod gather;
mod serve;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;

/// A live dashboard of a QKD network: per link, QBER and secure-key-rate charts with the
/// abort threshold, alarm state, pool fill per direction and key delivered per minute; per
/// KME, requests by status code; per site agent, running and recent backup jobs.
///
/// Prints its address (with the access token) on the first line of stdout and serves until
/// stopped. What the page may do is what CERT may do at the KMEs: an operator certificate
/// gets a working eavesdropper switch, any other certificate of the CA a read-only view.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// Base URL of a KME (https://host:port); repeat for every KME of the network.
    #[arg(long = "kme", required = true)]
    kmes: Vec<String>,
    /// Base URL of a site agent's operator listener (http://host:port, its
    /// `metrics_listen`); repeat for every agent.
    #[arg(long = "agent")]
    agents: Vec<String>,
    /// CA certificate (PEM) the KMEs' certificates are checked against.
    #[arg(long)]
    ca: PathBuf,
    /// The certificate to act with (PEM): an operator's, an SAE's, ...
    #[arg(long)]
    cert: PathBuf,
    /// Its PKCS#8 private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Where to serve the page; must be a loopback address (the page acts with CERT).
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Access token required on every request (default: 128 random bits). Also read from
    /// the environment variable QKD_DASHBOARD_TOKEN.
    #[arg(long, env = "QKD_DASHBOARD_TOKEN", hide_env_values = true)]
    token: Option<String>,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    if !cli.listen.ip().is_loopback() {
        bail!(
            "--listen {}: the dashboard acts with your certificate, so it serves on a loopback address only",
            cli.listen
        );
    }
    let token = match cli.token {
        Some(t)
            if t.len() >= 16
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
        {
            t
        }
        Some(_) => bail!("--token: at least 16 characters of A-Z, a-z, 0-9, '-' and '_'"),
        None => {
            let bytes: [u8; 16] = rand::random();
            bytes.iter().map(|b| format!("{b:02x}")).collect()
        }
    };
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| p.display().to_string());
    let sources = gather::Sources::new(
        &read(&cli.ca)?,
        &read(&cli.cert)?,
        &read(&cli.key)?,
        cli.kmes,
        cli.agents,
    )?;
    actix_web::rt::System::new().block_on(serve::run(sources, cli.listen, token))
}
