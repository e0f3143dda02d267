//! `certs`: generate a development PKI for a QKD network.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::Parser;

/// Generate a development PKI: a CA, a TLS server and a KME-to-KME client certificate per KME,
/// and a client certificate per SAE (ECDSA P-256, CN = the ID).
///
/// Files written into --dir: ca.pem/ca.key, kme-ID.pem/.key, kme-ID-peer.pem/.key,
/// sae-ID.pem/.key. Keys are PKCS#8 PEM, mode 0600. For development and tests only:
/// never commit the keys.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// Output folder (created if missing).
    #[arg(long)]
    dir: PathBuf,
    /// KME IDs, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "KME_A,KME_B,KME_C")]
    kmes: Vec<String>,
    /// SAE IDs, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "SAE_A1,SAE_B1,SAE_C1")]
    saes: Vec<String>,
    /// Site agent IDs (SAEs that also serve HTTPS), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "AGENT_A,AGENT_B,AGENT_C")]
    agents: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let pki = certs::DevPki::generate_with_agents(&args.dir, &args.kmes, &args.saes, &args.agents)?;
    println!("CA:   {}", pki.ca.cert.display());
    for f in pki
        .kme_servers
        .iter()
        .chain(&pki.kme_peers)
        .chain(&pki.saes)
    {
        println!("{:<8} {}  {}", f.id, f.cert.display(), f.key.display());
    }
    Ok(())
}
