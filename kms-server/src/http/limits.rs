//! Bounds on what one request may make the KME hold: the size of its head and the number of
//! its header fields (431 in the spec's Error format), and how long its body may take
//! ([`super::read_body`]). The HTTP layer beneath (actix-http) has fixed outer bounds of its
//! own: a head over 128 KiB or with more than 96 fields gets an empty 431 and a request line
//! it cannot parse an empty 400, the connection closed at once in both cases; a head that
//! does not arrive within `http.head_timeout_ms` gets 408 and the connection is closed; an
//! idle keep-alive connection is closed after `http.keep_alive_secs`.

use std::sync::Arc;

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Service, ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::web;
use futures_util::future::{Either, FutureExt};

use crate::service::Kme;

/// Bytes a request head occupies: request line and every field, as sent.
fn head_bytes(req: &ServiceRequest) -> usize {
    // Origin-form target as sent (no allocation on this per-request path).
    let target = req
        .uri()
        .path_and_query()
        .map_or(req.uri().path().len(), |pq| pq.as_str().len());
    let line = req.method().as_str().len() + target + 12;
    req.headers()
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum::<usize>()
        + line
}

/// Middleware (for `App::wrap_fn`): refuses heads larger than `http.max_head_bytes` or with
/// more than `http.max_headers` fields with 431, before any handler runs.
pub fn bound_head<S, B>(
    req: ServiceRequest,
    srv: &S,
) -> impl std::future::Future<Output = Result<ServiceResponse<EitherBody<B>>, actix_web::Error>>
where
    S: Service<ServiceRequest, Response = ServiceResponse<B>, Error = actix_web::Error>,
    B: MessageBody,
{
    let refusal = req.app_data::<web::Data<Arc<Kme>>>().and_then(|k| {
        let h = &k.settings.http;
        let fields = req.headers().len();
        let size = head_bytes(&req);
        if fields > h.max_headers {
            Some(format!(
                "the request has {fields} header fields; at most {} (http.max_headers)",
                h.max_headers
            ))
        } else if size > h.max_head_bytes {
            Some(format!(
                "the request head is {size} bytes; at most {} (http.max_head_bytes)",
                h.max_head_bytes
            ))
        } else {
            None
        }
    });
    match refusal {
        None => Either::Left(
            srv.call(req)
                .map(|r| r.map(ServiceResponse::map_into_left_body)),
        ),
        Some(message) => {
            let reply = super::error::reply(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE, message);
            let (http_req, _) = req.into_parts();
            Either::Right(std::future::ready(Ok(ServiceResponse::new(
                http_req, reply,
            )
            .map_into_right_body())))
        }
    }
}
