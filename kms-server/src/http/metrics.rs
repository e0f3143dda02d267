//! Prometheus metrics: the `/metrics` listener, and the middleware that counts every
//! request of the main listener by endpoint (method from a fixed set, route pattern or
//! `unmatched`) and status code, so no caller can grow the label set.

use std::sync::Arc;

use actix_web::body::MessageBody;
use actix_web::dev::{Service, ServiceRequest, ServiceResponse};
use actix_web::{web, App, HttpResponse, HttpServer};

use crate::service::Kme;

/// Serves `/metrics` on `addr` (one worker) until the process ends.
pub fn serve(kme: Arc<Kme>, addr: std::net::SocketAddr) -> anyhow::Result<()> {
    let server = HttpServer::new(move || {
        let k = kme.clone();
        App::new().route(
            "/metrics",
            web::get().to(move || {
                let k = k.clone();
                async move {
                    HttpResponse::Ok()
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
    actix_web::rt::spawn(server.run());
    Ok(())
}

/// The method as a metrics label, from a fixed set: a client may send any token as its
/// method, and labels must not grow without bound.
fn method_label(m: &actix_web::http::Method) -> &'static str {
    use actix_web::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "OTHER",
    }
}

/// Middleware (for `App::wrap_fn`): records each request's endpoint (method and route
/// pattern), status code and duration.
pub fn count_request<S, B>(
    req: ServiceRequest,
    srv: &S,
) -> impl std::future::Future<Output = Result<ServiceResponse<B>, actix_web::Error>>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let start = std::time::Instant::now();
    let kme = req.app_data::<web::Data<Arc<Kme>>>().cloned();
    let fut = srv.call(req);
    async move {
        let res = fut.await?;
        if let Some(k) = kme {
            let ep = format!(
                "{} {}",
                method_label(res.request().method()),
                res.request()
                    .match_pattern()
                    .unwrap_or_else(|| "unmatched".into())
            );
            k.metrics
                .request(&ep, res.status().as_u16(), start.elapsed());
        }
        Ok(res)
    }
}
