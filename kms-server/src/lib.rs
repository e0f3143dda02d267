//! `kms-server`: an ETSI GS QKD 014 v1.1.1 key management entity (KME).
//!
//! It serves the 014 REST interface (status, enc_keys, dec_keys; GET and POST) over HTTPS
//! with mutual TLS, identifies the calling SAE by its client certificate, and shares key
//! material with linked KMEs through a simulated QKD link. A key handed to a master SAE is
//! registered at the slave's KME before the reply, delivered at most once to each named
//! slave, then erased.
//!
//! Owns: the KME. Must never depend on: the backup crates (`sharing`, `share-transfer`,
//! `site-agent`, `backup-client`); the KME knows nothing of backups. The link physics and
//! the BB84 engine come from `qkd-sim`, TLS from `mtls`, the 014 types from `etsi-spec`.
//!
//! Modules, from the wire inwards; each uses only modules listed after it, so the module
//! graph has no cycle:
//! - [`http`] — the HTTP face: 014 handlers, the KME-to-KME and admin handlers, metrics, and
//!   the one mapping of the service's refusals to status codes.
//! - [`link`] — moving key from a source into both ends' pools: the producer's loop, the far
//!   end, synchronisation after restarts, pacing, the local pool.
//! - [`service`] — [`service::Kme`], the operations independent of HTTP (Get status, Get key
//!   in named steps, Get key with key IDs, registrations from peers, key relay through
//!   trusted nodes, admin), with its own error enum; key enters the pools only through
//!   [`service::Kme::append_durable`] (and relayed key through the destination's `relayed`
//!   stream, see [`service::relay`]).
//! - [`source`] — key sources behind a trait: simulator, faithful BB84, key files, upstream
//!   014; how to add a vendor driver.
//! - [`peer`] — the KME-to-KME channel: routes, every wire message, the client, the
//!   registration coalescer.
//! - [`config`] (TOML + env, every setting including key sources), [`pool`] (streams as typed
//!   [`pool::StreamId`]s, key records pending/ready, the state under one lock, the durable
//!   store behind them) and [`metrics`]: leaves.
//!
//! Dependencies: actix-web with OpenSSL for the mTLS server (OpenSSL exposes the verified
//! peer certificate per connection; through `mtls`); for the KME-to-KME client, hyper with
//! hyper-openssl (`mtls::pinned`: the same OpenSSL, with a verification callback that
//! requires the peer's `urn:qkd:kme:` SAN before anything is sent, which reqwest's
//! native-tls cannot offer); `config` for layered TOML/env settings; `zeroize` to
//! wipe key material; `wegman-carter` (the workspace's one MAC, shared with the backup's
//! transfers) to authenticate relayed keys on every hop; `hex` for its tags; `uuid` for key IDs; `tracing` for logs, which never contain key
//! material; `redb` for the durable pool's state (pure Rust, ACID, crash-safe with fsync on
//! commit, no server); `async-trait` so key sources can be chosen at run time
//! (`dyn KeySource`); `libc` for `O_NOFOLLOW` in the key-files source.

#![forbid(unsafe_code)]

pub mod config;
pub mod http;
pub mod link;
pub mod metrics;
pub mod peer;
pub mod pool;
pub mod service;
pub mod source;

use std::sync::Arc;

use actix_web::{web, App, HttpServer};

use service::Kme;

/// Runs a KME until the process is stopped.
pub async fn run(settings: config::Settings) -> anyhow::Result<()> {
    let t = &settings.tls;
    let acceptor = mtls::server::acceptor(&t.ca, &t.cert, &t.key)?;
    let kme = Arc::new(Kme::new(settings.clone())?);
    let listen = settings.listen;
    let workers = if settings.workers == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        settings.workers
    };
    start_links(&kme, &settings);
    if let Some(addr) = settings.metrics_listen {
        http::metrics::serve(kme.clone(), addr)?;
    }
    let data = web::Data::new(kme.clone());
    let feed = web::Data::new(http::dashboard::start(kme.clone()));
    let h = settings.http.clone();
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(feed.clone())
            .wrap_fn(http::limits::bound_head)
            .wrap_fn(http::metrics::count_request)
            .configure(http::routes)
    })
    .workers(workers)
    .client_request_timeout(std::time::Duration::from_millis(h.head_timeout_ms))
    .client_disconnect_timeout(std::time::Duration::from_secs(1))
    .keep_alive(std::time::Duration::from_secs(h.keep_alive_secs))
    .on_connect(mtls::server::on_connect)
    .bind_openssl(listen, acceptor)
    .map_err(|e| anyhow::anyhow!("listen {listen}: {e}"))?;
    tracing::info!(kme = %settings.kme_id, %listen, "KME serving ETSI GS QKD 014");
    server.run().await?;
    Ok(())
}

/// Starts the local pool, housekeeping, and the producer of every link this KME produces
/// (those to peers with a larger KME ID).
fn start_links(kme: &Arc<Kme>, settings: &config::Settings) {
    tokio::spawn(link::run_local(kme.clone(), settings.local.clone()));
    tokio::spawn(expire_unfetched(kme.clone()));
    for p in &settings.peers {
        if settings.kme_id < p.kme_id {
            tokio::spawn(link::run_producer(
                kme.clone(),
                p.kme_id.clone(),
                p.link.clone(),
            ));
        }
    }
}

/// Erases keys that no slave fetched within `limits.key_ttl_secs` and drops consumed
/// segments of the durable pool, every 10 s.
async fn expire_unfetched(kme: Arc<Kme>) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(10));
    loop {
        tick.tick().await;
        match kme.housekeeping().await {
            Ok(0) => {}
            Ok(n) => tracing::info!(keys = n, "erased keys that no slave fetched in time"),
            Err(e) => {
                tracing::error!(error = %e.body.message, "housekeeping failed");
                return;
            }
        }
    }
}
