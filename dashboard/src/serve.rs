//! The page and its API on loopback: `/` (and its assets), `api/view`, `api/events`
//! (server-sent events, one [`Update`] per sample interval) and
//! `POST api/kmes/{kme}/links/{peer}/eavesdropper`. Every request carries the access token
//! as `?token=` (the page passes it on to its assets and API calls); without it: 401.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use dashboard_web::{Feed, Role, View, Viewer};

use crate::gather::Sources;

struct State {
    sources: Sources,
    token: String,
    viewer: Mutex<Option<Viewer>>,
    feed: Feed,
}

type Shared = web::Data<Arc<State>>;

/// Serves until the process ends; prints the page's address first.
pub async fn run(sources: Sources, listen: SocketAddr, token: String) -> anyhow::Result<()> {
    let state = Arc::new(State {
        sources,
        token,
        viewer: Mutex::new(None),
        feed: Feed::default(),
    });
    let data = web::Data::new(state.clone());
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .app_data(web::PayloadConfig::new(4096))
            .route("/api/view", web::get().to(view))
            .route("/api/events", web::get().to(events))
            .route(
                "/api/kmes/{kme}/links/{peer}/eavesdropper",
                web::post().to(eavesdropper),
            )
            .route("/{asset:.*}", web::get().to(asset))
    })
    .workers(1)
    .bind(listen)?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| anyhow::anyhow!("no address bound"))?;
    println!("dashboard at http://{addr}/?token={}", state.token);
    actix_web::rt::spawn(sample_forever(state));
    server.run().await?;
    Ok(())
}

/// Samples every source once per interval, keeps the history and feeds the streams.
async fn sample_forever(state: Arc<State>) {
    let mut tick = tokio::time::interval(Duration::from_millis(dashboard_web::SAMPLE_INTERVAL_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        if state.viewer.lock().is_ok_and(|v| v.is_none()) {
            match state.sources.viewer().await {
                Ok(v) => {
                    tracing::info!(name = %v.name, role = ?v.role, "the KMEs see this certificate as");
                    if let Ok(mut slot) = state.viewer.lock() {
                        *slot = Some(v);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "no KME told who this certificate is yet"),
            }
        }
        state.feed.push(state.sources.sample().await);
    }
}

/// The 401 reply to a request without the token in `?token=`; `None` when it has it.
fn refusal(req: &HttpRequest, state: &State) -> Option<HttpResponse> {
    let given =
        web::Query::<std::collections::HashMap<String, String>>::from_query(req.query_string())
            .ok()
            .and_then(|q| q.get("token").cloned())
            .unwrap_or_default();
    // Compared in time independent of where the strings differ.
    let same = given.len() == state.token.len()
        && given
            .bytes()
            .zip(state.token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0;
    (!same).then(|| {
        error(
            StatusCode::UNAUTHORIZED,
            "this dashboard needs the token printed when it started (?token=...)",
        )
    })
}

/// A reply in the ETSI 014 Error format: `{"message": ...}`.
fn error(code: StatusCode, message: &str) -> HttpResponse {
    HttpResponse::build(code).json(serde_json::json!({ "message": message }))
}

/// Headers of every reply (see [`dashboard_web::SECURITY_HEADERS`]).
fn secured(mut r: actix_web::HttpResponseBuilder) -> actix_web::HttpResponseBuilder {
    for h in dashboard_web::SECURITY_HEADERS {
        r.insert_header(h);
    }
    r
}

async fn asset(req: HttpRequest, state: Shared, name: web::Path<String>) -> HttpResponse {
    if let Some(r) = refusal(&req, &state) {
        return r;
    }
    match dashboard_web::asset(&name) {
        // The page names its assets with the token, so they load like the API does.
        Some((ctype, body)) if name.is_empty() || name.as_str() == "index.html" => {
            let t = &state.token;
            let page = body
                .replace("\"app.css\"", &format!("\"app.css?token={t}\""))
                .replace("\"app.js\"", &format!("\"app.js?token={t}\""));
            secured(HttpResponse::Ok()).content_type(ctype).body(page)
        }
        Some((ctype, body)) => secured(HttpResponse::Ok()).content_type(ctype).body(body),
        None => error(StatusCode::NOT_FOUND, &format!("no such resource: /{name}")),
    }
}

async fn view(req: HttpRequest, state: Shared) -> HttpResponse {
    if let Some(r) = refusal(&req, &state) {
        return r;
    }
    let viewer = state.viewer.lock().ok().and_then(|v| v.clone());
    let Some(viewer) = viewer else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "no KME has answered yet: is the network up, and is the certificate one of its CA?",
        );
    };
    let history = state.feed.history();
    secured(HttpResponse::Ok()).json(View {
        title: "network".to_owned(),
        eavesdropper_path: (viewer.role == Role::Operator)
            .then(|| "api/kmes/{kme}/links/{peer}/eavesdropper".to_owned()),
        viewer,
        history,
    })
}

async fn events(req: HttpRequest, state: Shared) -> HttpResponse {
    if let Some(r) = refusal(&req, &state) {
        return r;
    }
    secured(HttpResponse::Ok())
        .content_type("text/event-stream")
        .streaming(state.feed.follow::<actix_web::Error>())
}

/// Passes the switch on to the link's KME, which checks the certificate is an operator's.
async fn eavesdropper(
    req: HttpRequest,
    state: Shared,
    path: web::Path<(String, String)>,
    body: web::Bytes,
) -> HttpResponse {
    if let Some(r) = refusal(&req, &state) {
        return r;
    }
    let (kme, peer) = path.into_inner();
    match state
        .sources
        .switch_eavesdropper(&kme, &peer, body.to_vec())
        .await
    {
        Ok((status, body)) => {
            HttpResponse::build(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY))
                .content_type("application/json")
                .body(body)
        }
        Err(e) => error(StatusCode::BAD_GATEWAY, &e),
    }
}
