//! Key sources: where a link's shared key material comes from.
//!
//! Everything above the pool (the 014 interface, registration, delivery) is the same whatever
//! produces the key; a link only needs a [`KeySource`] at each end. The two ends of a link
//! play different parts:
//!
//! - The **producing end** (the KME with the smaller ID) calls [`KeySource::next_block`]. It
//!   gets a block of key bytes and a [`BlockRef`] that tells the far end how to obtain the
//!   *same* bytes from its own side of the source (a file name, key IDs of an upstream
//!   device, a protocol frame ID...). The reference crosses the mutually authenticated
//!   KME-to-KME channel inside the block announcement; key bytes never do.
//! - The **far end** calls [`KeySource::fetch_block`] with that reference when the
//!   announcement arrives. [`SourceError::NotYet`] means "I do not have it yet" (e.g. the
//!   device has not written its file here yet): the producer keeps the block and announces it
//!   again later.
//! - Once a block is durably in the pool at an end (or the link discarded it), that end calls
//!   [`KeySource::release`] so the source erases its own copy (a key file is overwritten and
//!   removed).
//!
//! Sources that run a protocol between the two ends (the faithful BB84 simulator) exchange
//! their messages through [`KeySource::peer_message`], which the KME routes from
//! `POST /internal/v1/link/source` to the far end's source of the same link.
//!
//! ## Built-in sources
//! - `simulated` ([`simulated`]): blocks derived from a secret seed at both ends.
//! - `key-files` ([`key_files`]): files of final key that a device drops with identical
//!   names at both ends; references are `<offset>:<len>:<file name>`, progress survives
//!   restarts in `.NAME.consumed` markers.
//! - `upstream-014` ([`upstream`]): a vendor KME with an ETSI GS QKD 014 interface, of which
//!   this KME is an SAE; references are `<key size in bits>:<key ID>,<key ID>,...`.
//!
//! ## Adding a vendor driver
//! 1. Write a type implementing [`KeySource`] in a module of its own under `source/`:
//!    `next_block` asks the device for final (privacy-amplified) key and returns it with a
//!    reference the far end's device understands; `fetch_block` asks the far end's device for
//!    the key so referenced; `release` tells the device the key is consumed (or erases it).
//!    Never log key bytes; keep them in `SecretBuf` (or `Zeroizing`) buffers. Return `NotYet` while the far
//!    device lags, `Gone` for a reference that can never be served (the producer then drops
//!    the block), `Failed` for anything else (the link retries after a pause).
//! 2. Add a variant to [`SourceConfig`] with the driver's settings (paths, URLs,
//!    credentials) and build it in [`build`].
//! 3. Configure it per link: `[peers.link.source] kind = "your-driver"` at both KMEs.
//!
//! The pool, its durability, the link synchronisation after restarts and the capacity bound
//! (`max_key_count`, which stops pulling from the source when reached) are the link's job, not
//! the driver's.

pub mod faithful;
pub mod key_files;
pub mod simulated;
pub mod upstream;

use secret_buf::SecretBuf;

pub use crate::config::SourceConfig;
pub use crate::peer::BlockRef;

/// A block obtained at the producing end.
pub struct Produced {
    pub reference: BlockRef,
    /// The key bytes (at most the `max_len` asked for, never empty).
    pub data: SecretBuf,
}

/// Why a source could not deliver.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The far end's side does not hold the block yet; announce it again later.
    #[error("key not available here yet: {0}")]
    NotYet(String),
    /// The block can never be obtained here; the producer discards it.
    #[error("key gone: {0}")]
    Gone(String),
    /// The block reference is malformed or from another kind of source.
    #[error("bad block reference: {0}")]
    BadReference(String),
    /// The source cannot serve right now (device unreachable, I/O error, protocol abort).
    #[error("{0}")]
    Failed(String),
}

/// Where one end of a link gets its key material. See the module docs for the roles.
#[async_trait::async_trait]
pub trait KeySource: Send + Sync {
    /// Short name, also the [`BlockRef::source`] of its blocks (e.g. `"key-files"`).
    fn kind(&self) -> &'static str;

    /// Whether the link's physical model paces this source (the simulators). Hardware sources
    /// deliver at the device's own rate.
    fn modelled(&self) -> bool {
        false
    }

    /// How long the link waits before asking again after [`KeySource::next_block`] had
    /// nothing.
    fn poll_interval(&self) -> std::time::Duration {
        std::time::Duration::from_millis(100)
    }

    /// Producing end: the next block of at most `max_len` bytes, or `None` when the source
    /// has nothing right now (the link waits a little and asks again).
    async fn next_block(&self, max_len: usize) -> Result<Option<Produced>, SourceError>;

    /// Far end: the bytes of the block the producer described, exactly `len` of them.
    async fn fetch_block(&self, reference: &BlockRef, len: usize)
        -> Result<SecretBuf, SourceError>;

    /// Either end: the block is durably in the pool here, or the link discarded it; erase the
    /// source's own copy.
    async fn release(&self, reference: &BlockRef) -> Result<(), SourceError> {
        let _ = reference;
        Ok(())
    }

    /// Far end: a protocol message from the producer's source (JSON in, JSON out).
    async fn peer_message(
        &self,
        message: serde_json::Value,
    ) -> Result<serde_json::Value, SourceError> {
        let _ = message;
        Err(SourceError::Failed(format!(
            "the {} source takes no messages from the peer",
            self.kind()
        )))
    }

    /// Operator switch for sources that simulate a quantum channel: the fraction of pulses an
    /// intercept-resend attacker takes. Others ignore it.
    fn set_eavesdropper(&self, fraction: f64) {
        let _ = fraction;
    }
}

/// Builds the source of one end of a link.
///
/// The faithful simulator needs the link (its model parameters and the channel to the far
/// end): build it with [`build_for_link`].
pub fn build(config: &SourceConfig) -> Result<std::sync::Arc<dyn KeySource>, SourceError> {
    match config {
        SourceConfig::Simulated => Ok(std::sync::Arc::new(simulated::Simulated::new()?)),
        SourceConfig::Bb84 { .. } => Err(SourceError::Failed(
            "the bb84 source is built with its link (build_for_link)".into(),
        )),
        SourceConfig::KeyFiles { dir, poll_ms } => Ok(std::sync::Arc::new(
            key_files::KeyFiles::new(dir, *poll_ms)?,
        )),
        SourceConfig::Upstream014 {
            url,
            ca,
            cert,
            key,
            peer_sae_id,
            key_size,
            keys_per_request,
        } => Ok(std::sync::Arc::new(upstream::Upstream014::new(
            url,
            ca,
            cert,
            key,
            peer_sae_id,
            *key_size,
            *keys_per_request,
        )?)),
    }
}

/// Builds the source of one end of the link configured by `link`, whose far end `peer` is.
pub fn build_for_link(
    link: &crate::config::LinkParams,
    peer: &crate::peer::PeerClient,
) -> Result<std::sync::Arc<dyn KeySource>, SourceError> {
    match &link.source {
        SourceConfig::Bb84 { pulses_per_frame } => {
            let params = qkd_sim::bb84::Bb84Params {
                device: link.device,
                length_km: link.length_km.unwrap_or(10.0),
                eavesdropper: link.eavesdropper,
                abort_qber: link.abort_qber,
                pulses_per_frame: *pulses_per_frame,
                ..qkd_sim::bb84::Bb84Params::default()
            };
            Ok(std::sync::Arc::new(faithful::Faithful::new(
                params,
                peer.clone(),
            )?))
        }
        other => build(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_spelled_as_documented() {
        let parse = |s: &str| serde_json::from_str::<SourceConfig>(s);
        assert!(matches!(
            parse(r#"{"kind":"simulated"}"#).unwrap(),
            SourceConfig::Simulated
        ));
        assert!(matches!(
            parse(r#"{"kind":"key-files","dir":"k"}"#).unwrap(),
            SourceConfig::KeyFiles { poll_ms: 200, .. }
        ));
        assert!(matches!(
            parse(r#"{"kind":"upstream-014","url":"https://x","ca":"a","cert":"b","key":"c","peer_sae_id":"S"}"#).unwrap(),
            SourceConfig::Upstream014 { key_size: 256, .. }
        ));
        assert!(parse(r#"{"kind":"upstream014"}"#).is_err());
        assert!(parse(r#"{"kind":"key-files","dir":"k","typo":1}"#).is_err());
    }
}
