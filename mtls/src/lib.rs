//! `mtls`: mutual TLS for every HTTPS party of the QKD network.
//!
//! Owns: the OpenSSL acceptor that servers (the KME, the backup site agent) listen with, the
//! identity fields of the verified client certificate of each connection ([`server`]), and
//! the one reqwest client builder that every HTTPS client uses: the 014 client, the KME's
//! peer channel and the backup client ([`client`]).
//!
//! Must never depend on: the KME, the backup crates or the 014 types. It knows certificates,
//! not what their names mean; each server maps a [`server::PeerCert`] to its own roles.
//!
//! Features: `server` (actix-web + actix-tls), `client` (reqwest) and `pinned` (a hyper +
//! hyper-openssl client that checks the server's URI SAN inside the handshake: [`pinned`]),
//! all on by default, so a pure client (`etsi-spec`) links only what it uses.
//!
//! Dependencies: `openssl` (servers need the verified peer certificate per connection, which
//! OpenSSL exposes through actix-tls; clients use reqwest's native-tls, i.e. the same
//! OpenSSL, so one TLS implementation and one set of CA semantics serves both sides).

#![forbid(unsafe_code)]

#[cfg(feature = "client")]
pub mod client;
pub mod crl;
#[cfg(feature = "pinned")]
pub mod pinned;
#[cfg(feature = "server")]
pub mod server;

/// A TLS set-up error; the message names the file or the setting.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct TlsError(pub String);
