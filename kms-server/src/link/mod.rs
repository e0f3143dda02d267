//! The QKD links and the local key pool: moving key material from a key source into the
//! pools at both ends of each link.
//!
//! Each link has a *producer*, the end with the smaller KME ID. It takes blocks from its key
//! source, assigns each to one of the two directions (which KME allocates from it; the
//! emptier first; none while both hold `max_key_count` keys, so a full pool stops the link
//! and no key is dropped), and announces it to the far end over the mutually authenticated
//! KME-to-KME channel. The far end obtains the same bytes from its side of the source, makes
//! them durable and acknowledges; only then does the producer add its own copy. So every
//! usable byte is held at both ends.
//!
//! **Synchronisation.** Before serving a link's keys, and after any failure on it, the two
//! ends reconcile ([`SyncRequest`](crate::peer::SyncRequest)): both directions continue at the larger of the two ends'
//! offsets, and both ends discard the free bytes they hold of the link (a block announced
//! just before a crash may be held at one end only, and neither end can tell which free
//! bytes the other still holds). Keys already handed to masters and awaiting slaves are kept.
//! Offsets only grow, so a byte is never appended twice under the same offset.
//!
//! The physical model ([`qkd_sim::physics`]) paces modelled sources (the simulators) at the
//! secure key rate of the link's length and raises an alarm when the QBER is above the abort
//! threshold.

//!
//! Modules: [`producer`] (the producing end's loop), [`far_end`] (receiving a block),
//! [`sync`] (reconciling both ends), [`pacing`] (the modelled rate, refill thresholds),
//! [`local`] (the local pool). Key enters every pool through one path,
//! [`Kme::append_durable`](crate::service::Kme::append_durable).

pub mod far_end;
pub mod local;
pub mod pacing;
pub mod producer;
pub mod sync;

pub use far_end::receive_block;
pub use local::run_local;
pub use producer::run_producer;
pub use sync::receive_sync;
