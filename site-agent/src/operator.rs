//! The operator's listener of the agent (`metrics_listen`): `GET /metrics` in the
//! Prometheus text format and `GET /jobs`, an [`AgentSample`] for the dashboard (files of
//! sample sets named `set/path`). Plain HTTP,
//! one worker, like the KME's metrics listener: it carries no key material and no share
//! bytes, and belongs on the operator's network.

use std::net::SocketAddr;
use std::sync::Arc;

use actix_web::{web, App, HttpResponse, HttpServer};
use dashboard_web::AgentSample;

use crate::Agent;

/// Serves the operator's routes on `addr` until the process ends.
pub fn serve(agent: Arc<Agent>, addr: SocketAddr) -> anyhow::Result<()> {
    let data = web::Data::new(agent);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/metrics", web::get().to(metrics))
            .route("/jobs", web::get().to(jobs))
    })
    .workers(1)
    .bind(addr)
    .map_err(|e| anyhow::anyhow!("metrics_listen {addr}: {e}"))?;
    tracing::info!(%addr, "operator listener: /metrics and /jobs");
    actix_web::rt::spawn(server.run());
    Ok(())
}

async fn metrics(a: web::Data<Arc<Agent>>) -> HttpResponse {
    let disk = a.storage.backend().space();
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4")
        .body(a.jobs.render(disk))
}

async fn jobs(a: web::Data<Arc<Agent>>) -> HttpResponse {
    let agent = a.get_ref().clone();
    // Files of sample sets by set and path (the share itself knows its file name only),
    // from the sets of the backup's own owner.
    let named = web::block(move || {
        let mut jobs = agent.jobs.snapshot();
        for j in &mut jobs {
            let id = uuid::Uuid::parse_str(&j.backup_id).ok();
            if let Some(n) =
                id.and_then(|id| agent.set_names.name(agent.storage.backend(), &j.owner, id))
            {
                j.name = Some(n);
            }
        }
        jobs
    })
    .await;
    HttpResponse::Ok().json(AgentSample {
        agent: a.cfg.sae_id.clone(),
        t_ms: dashboard_web::now_ms(),
        jobs: named.unwrap_or_else(|_| a.jobs.snapshot()),
    })
}
