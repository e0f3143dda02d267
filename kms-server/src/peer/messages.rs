//! Every message of the KME-to-KME channel (JSON bodies; see the routes in [`super`]).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// How the far end obtains the bytes of a block from its own side of the source.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockRef {
    /// The kind of key source (`KeySource::kind`) that made the block; the far end refuses a
    /// block from another kind of source.
    pub source: String,
    /// Source-specific description, e.g. a file name or upstream key IDs. May be secret (the
    /// simulator's seed): wiped on drop and never logged.
    pub detail: String,
}

impl Drop for BlockRef {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.detail);
    }
}

impl std::fmt::Debug for BlockRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockRef")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

/// A block of link key: where it goes, and how the far end obtains its bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockAnnounce {
    /// KME that allocates from this block.
    pub owner: String,
    /// Offset of the block in the owner's direction of the stream.
    pub offset: u64,
    /// Bytes in the block; 0 for a heartbeat that only reports the link's state.
    pub len: u64,
    /// How the far end obtains the bytes (absent in heartbeats).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference: Option<BlockRef>,
    /// The link's modelled QBER and secure key rate, when it has a physical model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perf: Option<qkd_sim::physics::LinkPerformance>,
}

/// The producing end's view of the link, sent to reconcile.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncRequest {
    /// End of the direction the producing end owns.
    pub producer_end: u64,
    /// End of the direction the far end owns, as held at the producing end.
    pub far_end: u64,
}

/// Where both directions continue after a synchronisation. Both ends discard the free bytes
/// of the link (neither can know which of them the other still holds unused) and append the
/// next blocks at these offsets; keys already handed to masters are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncReply {
    pub producer_end: u64,
    pub far_end: u64,
}

/// One key registered at the slaves' KME: its ID and where its bytes sit in the stream
/// owned by the registering KME.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisteredKey {
    pub key_id: Uuid,
    pub offset: u64,
    pub len: u64,
}

/// Body of a registration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub master: String,
    /// Slaves attached to the receiving KME.
    pub slaves: Vec<String>,
    pub keys: Vec<RegisteredKey>,
}

/// Body of a registration request: registrations of several enc_keys calls, coalesced.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBatch {
    pub registrations: Vec<Registration>,
}

/// Reply to a [`RegisterBatch`]: per registration, `None` (registered) or why not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RegisterResults {
    pub results: Vec<Option<String>>,
}

/// One key relayed through trusted nodes: its ID and length in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayedKey {
    pub key_id: Uuid,
    pub len: u64,
}

/// How a hop of a relay carries the keys' bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum Carrier {
    /// First hop: the keys are these ranges (one per key, in order) of the sender's own
    /// direction of the link, as in a registration; only offsets cross the wire.
    Link { offsets: Vec<u64> },
    /// Later hops: the keys' bytes, concatenated, one-time padded with the first bytes of
    /// the range at `pad_offset` of the sender's own direction of the link (as long as the
    /// keys, plus 32 bytes of Wegman–Carter key for `tag`, over [`Relay::mac_input`]).
    Sealed {
        pad_offset: u64,
        /// Base64.
        ciphertext: String,
        /// Hex, 16 bytes.
        tag: String,
    },
}

/// Body of `POST /internal/v1/keys/relay`: keys a master at `path[0]` obtained for slaves
/// at the last KME of `path`, sent one hop further.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Relay {
    /// Names the relay in every node's log.
    pub relay_id: Uuid,
    pub master: String,
    /// Slaves attached to the last KME of `path`.
    pub slaves: Vec<String>,
    /// KME IDs from the master's KME to the slaves'.
    pub path: Vec<String>,
    pub keys: Vec<RelayedKey>,
    pub carrier: Carrier,
}

impl Relay {
    /// What a sealed hop's tag covers: every field but the ciphertext and tag, then the
    /// ciphertext (so the relay's route, owners and key IDs cannot be changed either).
    pub fn mac_input(&self, pad_offset: u64, ciphertext: &[u8]) -> Vec<u8> {
        let head = serde_json::to_vec(&(
            &self.relay_id,
            &self.master,
            &self.slaves,
            &self.path,
            &self.keys,
            pad_offset,
        ))
        .unwrap_or_default();
        let mut m = Vec::with_capacity(8 + head.len() + ciphertext.len());
        m.extend_from_slice(&(head.len() as u64).to_le_bytes());
        m.extend_from_slice(&head);
        m.extend_from_slice(ciphertext);
        m
    }
}

/// Reply to a [`Relay`]: delivered (registered durably for the slaves at the end of the
/// path), or why not and, when a link of the path could not carry it, which.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayOutcome {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The two KMEs of the link that could not carry the keys (alarm, not reconciled, no
    /// key), so the master's KME can route around it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broken_hop: Option<[String; 2]>,
}
