//! The KME-to-KME channel: routes, wire messages ([`messages`]), a client ([`client`]) and
//! the registration coalescer ([`registrar`]), over mutual TLS with KME certificates: each
//! end requires the other's certificate to carry `urn:qkd:kme:<its configured ID>`
//! ([`KME_URI`]).
//!
//! Messages that cross it:
//! - `POST /internal/v1/link/sync`: the producing end of a link reconciles both directions
//!   with the far end ([`SyncRequest`] / [`SyncReply`]) at start and after any failure;
//!   neither end serves the link's keys before.
//! - `POST /internal/v1/link/blocks`: the producing end announces one block of key material
//!   ([`BlockAnnounce`]); the far end obtains the same bytes from its side of the key source
//!   (see the `source` module) and acknowledges once they are durable.
//! - `POST /internal/v1/link/source`: protocol messages between the two ends of a key source
//!   (the faithful BB84 simulator).
//! - `POST /internal/v1/keys/register`: a KME that handed keys to a master registers their
//!   IDs and stream ranges at the slaves' KME. Only offsets cross the wire, never key bytes.
//! - `POST /internal/v1/keys/relay`: keys for slaves at a KME without a link to the master's
//!   travel hop by hop ([`Relay`] / [`RelayOutcome`]): the first hop names link ranges like
//!   a registration, every later hop carries the bytes one-time padded and Wegman–Carter
//!   tagged with that hop's link key (see `service::relay`).

pub mod client;
pub mod messages;
pub mod registrar;

pub use client::PeerClient;
pub use messages::{
    BlockAnnounce, BlockRef, Carrier, RegisterBatch, RegisterResults, RegisteredKey, Registration,
    Relay, RelayOutcome, RelayedKey, SyncReply, SyncRequest,
};
pub use registrar::Registrar;

/// Routes of the KME-to-KME channel (every message that crosses it is in [`messages`]).
pub const BLOCKS_PATH: &str = "/internal/v1/link/blocks";
pub const SYNC_PATH: &str = "/internal/v1/link/sync";
pub const SOURCE_PATH: &str = "/internal/v1/link/source";
pub const REGISTER_PATH: &str = "/internal/v1/keys/register";
pub const RELAY_PATH: &str = "/internal/v1/keys/relay";

/// URI SAN prefix that marks a KME's certificates; both ends of every call on this channel
/// require `urn:qkd:kme:<the peer's configured ID>` of the other.
pub const KME_URI: &str = "urn:qkd:kme:";
/// URI SAN prefix of an operator's certificate.
pub const OPERATOR_URI: &str = "urn:qkd:operator:";

/// Failure on the KME-to-KME channel.
#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("peer KME {kme}: {message}")]
    Transport { kme: String, message: String },
    #[error("peer KME {kme} refused: {status} {message}")]
    Refused {
        kme: String,
        status: u16,
        message: String,
    },
    #[error("peer channel configuration: {0}")]
    Config(String),
}
