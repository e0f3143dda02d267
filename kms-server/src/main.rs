//! `kms-server` binary: load the configuration and serve.

#![forbid(unsafe_code)]

/// mimalloc: large, short-lived key and chunk buffers are reused instead of being mapped,
/// faulted in and zeroed by the kernel for every request (glibc malloc did that here).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use clap::Parser;

/// ETSI GS QKD 014 v1.1.1 key management entity (KME) over HTTPS with mutual TLS.
///
/// Serves /api/v1/keys/{SAE}/status, enc_keys and dec_keys (GET and POST) to SAEs whose
/// client certificates chain to the configured CA, and shares key material with the peer
/// KMEs listed in the configuration over QKD links fed by a key source (simulated, key
/// files of a device, or a vendor's own 014 interface).
///
/// Its dashboard is at /dashboard/ on the same listener: links (QBER and key-rate charts
/// with the abort threshold, alarm, pool fill per direction, key delivered), requests by
/// status code, live by server-sent events; readable with any certificate of the CA, and
/// with the eavesdropper switch for operator certificates only. `qkd-dashboard` shows a
/// whole network at once.
///
/// Configuration (TOML):
///
///   kme_id = "KME_A"                 # this KME (CN of its certificates)
///   listen = "127.0.0.1:8443"
///   sae_id_field = "cn"              # cn | san-dns | san-uri | serial
///   saes = ["SAE_A1"]                # SAEs attached here
///   operators = ["operator"]         # names in operator SANs (urn:qkd:operator:NAME) allowed on /admin/v1/
///   operator_fingerprints = ["ab:cd:.."]  # or SHA-256 fingerprints of operator certificates
///   store_dir = "kme-store"          # durable, crash-safe key pool (unset: memory only)
///   metrics_listen = "127.0.0.1:9100" # Prometheus /metrics (plain HTTP; unset: off)
///   [tls]   ca, cert, key, peer_cert, peer_key  (PEM paths, relative to the file)
///           crl = "crl.pem"          # optional CRL of the CA: listed certificates get 401
///   [limits] key_size=256 min_key_size=64 max_key_size=65536 max_key_per_request=1024
///            max_key_count=100000 max_sae_id_count=2 max_body_bytes=262144  (sizes in bits)
///            key_ttl_secs=3600       # unfetched keys are erased after this
///            max_awaiting_bytes_per_master=268435456 max_awaiting_bytes=1073741824
///                                    # memory keys awaiting slaves here may take (each key
///                                    # counts its bytes + 256); beyond: 503 until fetched
///            memory_bytes_per_stream=16777216   # with store_dir: bytes of each pool kept in
///                                    # memory; the rest is read back from disk when taken
///   [http]  max_head_bytes=16384 max_headers=64   # larger heads: 431
///           head_timeout_ms=5000 body_timeout_secs=30 keep_alive_secs=15
///   [local]  rate_bytes_per_sec=1250000 block_bytes=65536 prefill=true  (rate 0 = bulk)
///   [[peers]] kme_id="KME_B" url="https://127.0.0.1:9443" saes=["SAE_B1"]
///   [peers.link] rate_bytes_per_sec=1250000 block_bytes=65536 prefill=true
///                length_km=50            # physical model: rate and QBER from the length
///                eavesdropper=0.0 abort_qber=0.11
///   [peers.link.device] fibre_loss_db_per_km=0.2 bob_efficiency=0.5 detector_efficiency=0.2
///                dark_count_probability=1e-5 misalignment=0.02 mean_photon_number=0.5
///                error_correction_efficiency=1.16 repetition_rate_hz=1e9 sifting=0.9
///   [peers.link.source]              # where the link's key comes from (same kind at both ends)
///                kind = "simulated"      # default: derived from a per-run seed, paced by the model
///                kind = "bb84"           # faithful: BB84 on simulated photons, Cascade, Toeplitz PA
///                kind = "key-files"  dir = "keys"  poll_ms = 200
///                                        # a device drops identically named files of final key
///                kind = "upstream-014"  url = "https://vendor-kme"  ca = "vendor-ca.pem"
///                       cert = "me-at-vendor.pem"  key = "me-at-vendor.key"
///                       peer_sae_id = "OTHER_END_AT_VENDOR"  key_size = 256  keys_per_request = 64
///   [relay]  links = [["KME_B","KME_C"], ...]   # the network's other links (own: [[peers]])
///            max_hops = 4  forbid = ["KME_X"]   # never relay through these KMEs
///   [[relay.kmes]] kme_id="KME_C" saes=["SAE_C1"]   # KMEs without a link to this one
///                                    # with [relay], keys for their SAEs travel hop by hop,
///                                    # each hop one-time padded and authenticated with that
///                                    # link's key; the KMEs in between see them (trusted nodes)
///
/// With store_dir, key bytes and the state of every key survive kill -9: after a restart no
/// key awaiting a slave is lost and none is delivered twice; the two ends of each link
/// reconcile before its keys are served again (both discard the link's unallocated pool).
///
/// Identities: peer KMEs by the SAN urn:qkd:kme:<configured ID> (checked by both ends of
/// every internal call; this KME sends nothing to a server without it), operators by their
/// operator SAN or fingerprint, SAEs by sae_id_field; a KME or operator certificate never
/// acts as an SAE. Files the KME creates are 0600 in 0700 folders.
///
/// Admin (operator certificate): POST /admin/v1/links/{peer}/eavesdropper {"fraction": 0..1}
/// puts an intercept-resend attacker on a link (at its producing end, the smaller KME ID).
///
/// Every key can be overridden from the environment with the KMS_ prefix and __ between
/// levels, e.g. KMS_LISTEN=127.0.0.1:9000 or KMS_LIMITS__MAX_KEY_COUNT=5000.
/// Logging: RUST_LOG (default info). Key material is never logged.
#[derive(Parser)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short)]
    config: PathBuf,
}

fn main() {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let settings = match kms_server::config::Settings::load(&args.config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("kms-server: {}: {e}", args.config.display());
            std::process::exit(2);
        }
    };
    let rt = actix_web::rt::System::new();
    if let Err(e) = rt.block_on(kms_server::run(settings)) {
        eprintln!("kms-server: {e:#}");
        std::process::exit(1);
    }
}
