//! The KME's key state in memory: the local pool, both directions of every link, and the
//! keys awaiting slaves, under one lock whose critical sections never await.

use std::collections::HashMap;

use super::{Direction, Records, Stream, StreamId};

/// Whether a link's two ends have reconciled their streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkPhase {
    /// Not reconciled since this KME started or since the last failure on the link: its keys
    /// are not served, its blocks not accepted.
    Unsynced,
    /// Both ends agree on where both directions continue: keys are served.
    Synced,
}

/// One QKD link as seen from this KME.
pub struct LinkState {
    pub phase: LinkPhase,
    /// The direction this KME allocates from (for its masters).
    pub own: Stream,
    /// The direction the peer allocates from (taken here when the peer registers keys).
    pub theirs: Stream,
    /// Fraction of pulses an intercept-resend attacker takes (producing end only).
    pub eavesdropper: f64,
    /// What the physical model last said about the link (producer: computed; far end: as
    /// announced by the producer).
    pub perf: Option<qkd_sim::physics::LinkPerformance>,
}

impl LinkState {
    /// A link not yet reconciled, with empty streams.
    pub fn new(eavesdropper: f64) -> Self {
        LinkState {
            phase: LinkPhase::Unsynced,
            own: Stream::default(),
            theirs: Stream::default(),
            eavesdropper,
            perf: None,
        }
    }

    pub fn synced(&self) -> bool {
        self.phase == LinkPhase::Synced
    }

    pub fn stream(&self, direction: Direction) -> &Stream {
        match direction {
            Direction::Own => &self.own,
            Direction::Theirs => &self.theirs,
        }
    }

    pub fn stream_mut(&mut self, direction: Direction) -> &mut Stream {
        match direction {
            Direction::Own => &mut self.own,
            Direction::Theirs => &mut self.theirs,
        }
    }
}

/// Mutable state under one lock; critical sections never await.
#[derive(Default)]
pub struct State {
    pub local: Stream,
    /// Keys relayed here for slaves attached here.
    pub relayed: Stream,
    pub links: HashMap<String, LinkState>,
    pub records: Records,
}

impl State {
    /// The stream `id` names, if its link is configured.
    pub fn stream_mut(&mut self, id: &StreamId) -> Option<&mut Stream> {
        match id {
            StreamId::Local => Some(&mut self.local),
            StreamId::Relayed => Some(&mut self.relayed),
            StreamId::Link { peer, direction } => {
                self.links.get_mut(peer).map(|l| l.stream_mut(*direction))
            }
        }
    }

    /// Every stream with its ID.
    pub fn streams(&self) -> impl Iterator<Item = (StreamId, &Stream)> {
        [
            (StreamId::Local, &self.local),
            (StreamId::Relayed, &self.relayed),
        ]
        .into_iter()
        .chain(self.links.iter().flat_map(|(peer, l)| {
            [
                (StreamId::own(peer), &l.own),
                (StreamId::theirs(peer), &l.theirs),
            ]
        }))
    }
}
