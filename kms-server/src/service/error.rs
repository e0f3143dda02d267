//! Why an operation of the KME was refused: a kind, and the spec's Error body (message and
//! details) that the HTTP layer sends with the status code it maps the kind to
//! (`http::error`, the one place that knows status codes).

/// What kind of refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request is malformed or asks for something this KME never serves (400).
    BadRequest,
    /// The caller is not who may do this (401).
    Unauthorized,
    /// No such resource (404).
    NotFound,
    /// A link's two ends disagree on where its streams stand: reconcile first (409).
    NotSynchronised,
    /// A key source can never provide the block asked for (410).
    Gone,
    /// Not now: no key, a store failure, a peer unreachable; retry later (503).
    Unavailable,
}

/// A refusal with the spec's Error body.
#[derive(Debug, Clone)]
pub struct KmeError {
    pub kind: ErrorKind,
    pub body: etsi_spec::Error,
}

impl KmeError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        KmeError {
            kind,
            body: etsi_spec::Error::new(message),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::BadRequest, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unauthorized, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn not_synchronised(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotSynchronised, message)
    }

    pub fn gone(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Gone, message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, message)
    }

    /// Adds a `{name: value}` entry to `details`.
    pub fn detail(mut self, name: &str, value: impl Into<serde_json::Value>) -> Self {
        self.body = self.body.with_detail(name, value);
        self
    }

    /// The message alone (for logs and peer replies).
    pub fn message(&self) -> &str {
        &self.body.message
    }
}

impl std::fmt::Display for KmeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.body.message)
    }
}

impl std::error::Error for KmeError {}
