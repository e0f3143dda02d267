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
