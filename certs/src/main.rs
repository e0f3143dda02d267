//! `certs`: generate a development PKI for a QKD network.

#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::Parser;

/// Generate a development PKI: a CA, a TLS server and a KME-to-KME client certificate per KME,
/// and a client certificate per SAE (ECDSA P-256, CN = the ID).
///
/// Files written into --dir: ca.pem/ca.key, kme-ID.pem/.key, kme-ID-peer.pem/.key,
/// sae-ID.pem/.key, operator-NAME.pem/.key. Keys are PKCS#8 PEM, mode 0600. For development
/// and tests only: never commit the keys.
///
/// Roles are URI SANs: urn:qkd:kme:ID on both certificates of a KME, urn:qkd:operator:NAME,
/// urn:qkd:sae:ID.
///
/// With --revoke CERT.pem[,...] nothing is generated: the CA in --dir signs --dir/crl.pem
/// listing those certificates, plus every serial the existing crl.pem already lists (give it
/// to a KME as tls.crl; it is read again when it changes).
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
    /// Operator names, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "operator")]
    operators: Vec<String>,
    /// Revoke these certificates (PEM files, comma-separated) instead of generating: writes
    /// --dir/crl.pem signed by --dir/ca.pem and ca.key.
    #[arg(long, value_delimiter = ',')]
    revoke: Vec<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if !args.revoke.is_empty() {
        let (crl, serials) = certs::DevPki::revoke(&args.dir, &args.revoke)?;
        println!("CRL:  {} revokes {}", crl.display(), serials.join(", "));
        return Ok(());
    }
    let pki = certs::DevPki::generate_with_agents(&args.dir, &args.kmes, &args.saes, &args.agents)?;
    let ca = certs::Ca::load(&pki.ca.cert, &pki.ca.key)?;
    for name in &args.operators {
        let f = ca.issue_to(&args.dir, name, certs::Purpose::Operator)?;
        println!("{:<8} {}  {}", f.id, f.cert.display(), f.key.display());
    }
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
