//! `kms-server`: an ETSI GS QKD 014 v1.1.1 key management entity (KME).
//!
//! It serves the 014 REST interface (status, enc_keys, dec_keys; GET and POST) over HTTPS
//! with mutual TLS, identifies the calling SAE by its client certificate, and shares key
//! material with linked KMEs through a simulated QKD link. A key handed to a master SAE is
//! registered at the slave's KME before the reply, delivered at most once to each named
//! slave, then erased.
//!
//! Modules: [`config`] (TOML + env), [`api`]
//! (HTTP handlers), [`kme`] (the operations), [`keystore`] (streams and key records in
//! memory), [`store`] (the durable pool behind them), [`link`] (moving key from a source into
//! both ends' pools, synchronisation after restarts, the local pool), [`source`] (key sources:
//! simulator, faithful BB84, key files, upstream 014; how to add a vendor driver), [`bb84`]
//! (the faithful protocol engine), [`physics`] (decoy-state BB84 rate model), [`metrics`],
//! [`peer`] (KME-to-KME channel).
//!
//! Dependencies: actix-web with OpenSSL for the mTLS server (OpenSSL exposes the verified
//! peer certificate per connection); reqwest (native-tls, i.e. the same OpenSSL) for the
//! KME-to-KME client; `config` for layered TOML/env settings; `zeroize` to wipe key material;
//! `uuid` for key IDs; `tracing` for logs, which never contain key material; `redb` for the
//! durable pool's state (pure Rust, ACID, crash-safe with fsync on commit, no server);
//! `async-trait` so key sources can be chosen at run time (`dyn KeySource`).

pub mod api;
pub mod config;
pub mod error;
pub mod keystore;
pub mod kme;
pub mod link;
pub mod metrics;
pub mod peer;
pub mod source;
pub mod store;

use std::sync::Arc;

use actix_web::{web, App, HttpServer};

/// Runs a KME until the process is stopped.
pub async fn run(settings: config::Settings) -> anyhow::Result<()> {
    let t = &settings.tls;
    let acceptor = mtls::server::acceptor(&t.ca, &t.cert, &t.key)?;
    let kme = Arc::new(kme::Kme::new(settings.clone())?);
    let listen = settings.listen;
    let workers = if settings.workers == 0 {
        std::thread::available_parallelism().map_or(2, |n| n.get())
    } else {
        settings.workers
    };
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
    if let Some(addr) = settings.metrics_listen {
        let k = kme.clone();
        let metrics = HttpServer::new(move || {
            let k = k.clone();
            App::new().route(
                "/metrics",
                web::get().to(move || {
                    let k = k.clone();
                    async move {
                        actix_web::HttpResponse::Ok()
                            .content_type("text/plain; version=0.0.4")
                            .body(k.metrics.render(&k.gauges()))
                    }
                }),
            )
        })
        .workers(1)
        .bind(addr)
        .map_err(|e| anyhow::anyhow!("metrics_listen {addr}: {e}"))?;
        tracing::info!(%addr, "Prometheus metrics at /metrics");
        actix_web::rt::spawn(metrics.run());
    }
    let data = web::Data::new(kme.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .wrap_fn(|req, srv| {
                use actix_web::dev::Service;
                let start = std::time::Instant::now();
                let kme = req.app_data::<web::Data<Arc<kme::Kme>>>().cloned();
                let fut = srv.call(req);
                async move {
                    let res = fut.await?;
                    if let Some(k) = kme {
                        let ep = format!(
                            "{} {}",
                            res.request().method(),
                            res.request()
                                .match_pattern()
                                .unwrap_or_else(|| "unmatched".into())
                        );
                        k.metrics
                            .request(&ep, res.status().as_u16(), start.elapsed());
                    }
                    Ok(res)
                }
            })
            .configure(api::routes)
    })
    .workers(workers)
    .on_connect(mtls::server::on_connect)
    .bind_openssl(listen, acceptor)
    .map_err(|e| anyhow::anyhow!("listen {listen}: {e}"))?;
    tracing::info!(kme = %settings.kme_id, %listen, "KME serving ETSI GS QKD 014");
    server.run().await?;
    Ok(())
}

/// Erases keys that no slave fetched within `limits.key_ttl_secs` and drops consumed
/// segments of the durable pool, every 10 s.
async fn expire_unfetched(kme: Arc<kme::Kme>) {
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
