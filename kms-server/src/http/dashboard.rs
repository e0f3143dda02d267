//! The operator's dashboard of this KME, on its mTLS listener under `/dashboard/`: the page
//! (embedded, from `dashboard-web`), `api/view`, the live `api/events` stream, and
//! `api/sample` (this KME now, which `qkd-dashboard` polls).
//!
//! Everyone with a valid certificate of the CA (an SAE, an operator, a peer KME) may read
//! it: it shows link and pool figures, never key material. Only an operator's view carries
//! the eavesdropper switch, and the switch itself (`/admin/v1/links/{peer}/eavesdropper`)
//! checks the operator certificate again.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use dashboard_web::{Feed, Role, Update, View, Viewer};

use super::{caller_kme, caller_operator, caller_sae, peer_cert, Shared};
use crate::service::{Kme, KmeError};

/// Where the page lives.
pub const PREFIX: &str = "/dashboard";

/// Samples this KME every [`dashboard_web::SAMPLE_INTERVAL_MS`] until the process ends,
/// into the feed the dashboard routes serve.
pub fn start(kme: Arc<Kme>) -> Arc<Feed> {
    let feed = Arc::new(Feed::default());
    let f = feed.clone();
    tokio::spawn(async move {
        let mut tick =
            tokio::time::interval(Duration::from_millis(dashboard_web::SAMPLE_INTERVAL_MS));
        loop {
            tick.tick().await;
            f.push(Update {
                t_ms: dashboard_web::now_ms(),
                kmes: vec![kme.sample()],
                ..Update::default()
            });
        }
    });
    feed
}

type SharedFeed = web::Data<Arc<Feed>>;

/// Registers the dashboard's routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route(PREFIX, web::get().to(to_page))
        .route("/dashboard/api/view", web::get().to(view))
        .route("/dashboard/api/events", web::get().to(events))
        .route("/dashboard/api/sample", web::get().to(sample))
        .route("/dashboard/{asset:.*}", web::get().to(asset));
}

/// The viewer: any valid certificate, by what it is.
fn viewer(req: &HttpRequest, kme: &Kme) -> Result<Viewer, KmeError> {
    peer_cert(req, kme)?;
    if let Ok(name) = caller_operator(req, kme) {
        return Ok(Viewer {
            name,
            role: Role::Operator,
        });
    }
    if let Ok(name) = caller_kme(req, kme) {
        return Ok(Viewer {
            name,
            role: Role::Kme,
        });
    }
    let name = caller_sae(req, kme)?;
    Ok(Viewer {
        name,
        role: Role::Sae,
    })
}

/// Headers of every dashboard reply (see [`dashboard_web::SECURITY_HEADERS`]).
fn secured(mut r: actix_web::HttpResponseBuilder) -> actix_web::HttpResponseBuilder {
    for h in dashboard_web::SECURITY_HEADERS {
        r.insert_header(h);
    }
    r
}

async fn to_page(req: HttpRequest, kme: Shared) -> Result<HttpResponse, KmeError> {
    viewer(&req, &kme)?;
    Ok(HttpResponse::PermanentRedirect()
        .insert_header((header::LOCATION, "/dashboard/"))
        .finish())
}

async fn asset(
    req: HttpRequest,
    kme: Shared,
    name: web::Path<String>,
) -> Result<HttpResponse, KmeError> {
    viewer(&req, &kme)?;
    let (ctype, body) = dashboard_web::asset(&name)
        .ok_or_else(|| KmeError::not_found(format!("no such resource: {}", req.path())))?;
    Ok(secured(HttpResponse::Ok()).content_type(ctype).body(body))
}

async fn view(req: HttpRequest, kme: Shared, feed: SharedFeed) -> Result<HttpResponse, KmeError> {
    let viewer = viewer(&req, &kme)?;
    let history = feed.history();
    let v = View {
        title: kme.kme_id().to_owned(),
        eavesdropper_path: (viewer.role == Role::Operator)
            .then(|| "../admin/v1/links/{peer}/eavesdropper".to_owned()),
        viewer,
        history,
    };
    Ok(secured(HttpResponse::Ok()).json(v))
}

/// This KME now (for `qkd-dashboard`, which gathers every KME of a network).
async fn sample(req: HttpRequest, kme: Shared) -> Result<HttpResponse, KmeError> {
    viewer(&req, &kme)?;
    Ok(secured(HttpResponse::Ok()).json(kme.sample()))
}

async fn events(req: HttpRequest, kme: Shared, feed: SharedFeed) -> Result<HttpResponse, KmeError> {
    viewer(&req, &kme)?;
    Ok(secured(HttpResponse::Ok())
        .content_type("text/event-stream")
        .streaming(feed.follow::<actix_web::Error>()))
}
