//! The key pool: what key material this KME holds and in what state, in memory
//! ([`stream`], [`records`], [`state`]) and durably on disk ([`store`]).
//!
//! Every byte of key sits in one [`StreamId`]: the local pool (keys between SAEs of this
//! KME) or one direction of a QKD link. The direction [`Direction::Own`] of the link to a peer
//! is the one this KME allocates from for its masters; [`Direction::Theirs`] is the one the
//! peer allocates from, taken here when the peer registers keys for slaves attached here.
//! Directions are disjoint, so both KMEs can serve masters at once and never hand out the
//! same byte twice.

pub mod records;
pub mod state;
pub mod store;
pub mod stream;

pub use records::{KeyRecord, Readiness, Records};
pub use state::{LinkPhase, LinkState, State};
pub use stream::{Stream, MAX_OFFSET};

/// Which of a link's two directions of key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// This KME allocates from it for its masters.
    Own,
    /// The peer allocates from it; taken here when the peer registers keys.
    Theirs,
}

/// A stream of key material held by this KME.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StreamId {
    /// The local pool: keys between SAEs attached to this KME.
    Local,
    /// One direction of the QKD link to `peer`.
    Link { peer: String, direction: Direction },
    /// Keys relayed here through trusted nodes for slaves attached here (`service::relay`):
    /// appended as they arrive, taken at once by their key records.
    Relayed,
}

impl StreamId {
    /// The direction of the link to `peer` that this KME allocates from.
    pub fn own(peer: &str) -> Self {
        StreamId::Link {
            peer: peer.to_owned(),
            direction: Direction::Own,
        }
    }

    /// The direction of the link to `peer` that the peer allocates from.
    pub fn theirs(peer: &str) -> Self {
        StreamId::Link {
            peer: peer.to_owned(),
            direction: Direction::Theirs,
        }
    }

    /// One direction of the link to `peer`.
    pub fn link(peer: &str, direction: Direction) -> Self {
        StreamId::Link {
            peer: peer.to_owned(),
            direction,
        }
    }

    /// The stream's name in the durable store (`local`, `own:PEER`, `theirs:PEER`,
    /// `relayed`): part of the on-disk format, see [`store`].
    pub fn name(&self) -> String {
        match self {
            StreamId::Local => "local".to_owned(),
            StreamId::Relayed => "relayed".to_owned(),
            StreamId::Link {
                peer,
                direction: Direction::Own,
            } => format!("own:{peer}"),
            StreamId::Link {
                peer,
                direction: Direction::Theirs,
            } => format!("theirs:{peer}"),
        }
    }

    /// The stream a store name stands for; `None` for a name this version never writes.
    pub fn parse(name: &str) -> Option<Self> {
        if name == "local" {
            Some(StreamId::Local)
        } else if name == "relayed" {
            Some(StreamId::Relayed)
        } else if let Some(peer) = name.strip_prefix("own:") {
            Some(StreamId::own(peer))
        } else {
            name.strip_prefix("theirs:").map(StreamId::theirs)
        }
    }

    /// The peer whose link this stream belongs to (`None` for the local pool and relayed
    /// keys); also the label of its metrics.
    pub fn peer(&self) -> Option<&str> {
        match self {
            StreamId::Local | StreamId::Relayed => None,
            StreamId::Link { peer, .. } => Some(peer),
        }
    }
}

impl std::fmt::Display for StreamId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_names_round_trip() {
        for id in [
            StreamId::Local,
            StreamId::Relayed,
            StreamId::own("KME_B"),
            StreamId::theirs("KME:x"),
        ] {
            assert_eq!(StreamId::parse(&id.name()), Some(id));
        }
        assert_eq!(StreamId::own("B").name(), "own:B");
        assert_eq!(StreamId::parse("other"), None);
    }
}
