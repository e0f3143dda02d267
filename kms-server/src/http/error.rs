//! The one place where the service's refusals become HTTP replies (status code and the
//! spec's Error body).

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};

use crate::service::{ErrorKind, KmeError};

/// The status code of a kind of refusal.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::NotSynchronised => StatusCode::CONFLICT,
        ErrorKind::Gone => StatusCode::GONE,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
    }
}

impl ResponseError for KmeError {
    fn status_code(&self) -> StatusCode {
        status_of(self.kind)
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).json(&self.body)
    }
}

/// A reply in the spec's Error format for conditions of HTTP itself (no such resource,
/// method not allowed).
pub fn reply(status: StatusCode, message: String) -> HttpResponse {
    HttpResponse::build(status).json(etsi_spec::Error::new(message))
}
