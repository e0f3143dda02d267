//! The producing end of a link (the end with the smaller KME ID): takes blocks from its key
//! source, assigns each to one of the two directions (the emptier first; none while both
//! hold `max_key_count` keys, so a full pool stops the link and no key is dropped), announces
//! it to the far end, and adds its own copy only once the far end holds the block.
//!
//! One turn of the loop (`Producer::turn`): reconcile if needed
//! (`Producer::ensure_synced`), consult the physical model and raise or clear the alarm
//! (`Producer::check_model`), pick a direction with room (`Producer::pick_direction`),
//! obtain a block from the source unless one is still pending (`Producer::obtain_block`),
//! announce it and, once the far end has it, append it here (`Producer::deliver`).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::pacing::{refill_threshold, wait_for_room, Pacer};
use super::sync::{sync_with, unsync};
use crate::config::LinkParams;
use crate::peer::{BlockAnnounce, PeerClient, PeerError};
use crate::pool::{Direction, StreamId};
use crate::service::{Durable, Kme};
use crate::source::{KeySource, Produced};
use qkd_sim::physics::LinkPerformance;

/// Whether the far end answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Health {
    /// Not tried yet since start.
    Starting,
    /// Not reached since start or since the last failure.
    Down,
    /// Blocks or heartbeats get through.
    Up,
}

/// Whether the modelled QBER is above the abort threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alarm {
    Clear,
    /// No key is produced until the attacker goes.
    Raised,
}

/// What the loop does after a step.
enum Flow {
    /// Go on with the next step of this turn.
    Proceed,
    /// Start the next turn (after any wait the step did itself).
    NextTurn,
    /// The KME's state or store is unusable: the link stops.
    Stop,
}

/// Where the next block goes.
struct Slot {
    direction: Direction,
    offset: u64,
    room: u64,
}

/// The producer loop of the link to one peer and its state.
struct Producer {
    kme: Arc<Kme>,
    peer: String,
    me: String,
    params: LinkParams,
    client: PeerClient,
    source: Arc<dyn KeySource>,
    cap: u64,
    refill_at: u64,
    pacer: Pacer,
    modelled: bool,
    health: Health,
    alarm: Alarm,
    last_beat: Instant,
    /// The block obtained from the source and not yet held at both ends: it is announced
    /// again (after a synchronisation if need be) until the far end has it or says it never
    /// will.
    pending: Option<Produced>,
    /// The store write of the last block appended here, awaited before the next one.
    inflight: Option<Durable>,
}

/// Produces key material for the link to `peer` forever (run at the producing end only).
pub async fn run_producer(kme: Arc<Kme>, peer: String, params: LinkParams) {
    let Some(mut p) = Producer::new(kme, peer, params) else {
        return;
    };
    p.log_model();
    while !matches!(p.turn().await, Flow::Stop) {}
}

/// Continues with `x` or ends the turn with `flow`.
macro_rules! step {
    ($e:expr) => {
        match $e {
            Flow::Proceed => {}
            other => return other,
        }
    };
}

impl Producer {
    fn new(kme: Arc<Kme>, peer: String, params: LinkParams) -> Option<Self> {
        let client = kme.peer(&peer).cloned()?;
        let source = kme.source(&peer).cloned()?;
        let cap = kme.capacity_bytes();
        Some(Producer {
            me: kme.kme_id().to_owned(),
            refill_at: refill_threshold(cap, params.block_bytes),
            pacer: Pacer::new(&params, 2 * cap),
            modelled: source.modelled(),
            health: Health::Starting,
            alarm: Alarm::Clear,
            last_beat: Instant::now(),
            pending: None,
            inflight: None,
            kme,
            peer,
            params,
            client,
            source,
            cap,
        })
    }

    fn log_model(&self) {
        // The model runs (and records the link's performance) even for sources it does not
        // pace; only modelled sources log it.
        let perf = self.model();
        if let (true, Some(p)) = (self.modelled, perf) {
            tracing::info!(
                peer = %self.peer,
                length_km = self.params.length_km.unwrap_or(0.0),
                qber_percent = format!("{:.2}", p.qber * 100.0),
                secure_key_rate_kbps = format!("{:.1}", p.secure_key_rate_bps / 1e3),
                source = self.source.kind(),
                "QKD link model (decoy-state BB84)"
            );
        }
    }

    async fn turn(&mut self) -> Flow {
        step!(self.ensure_synced().await);
        let perf = if self.modelled { self.model() } else { None };
        step!(self.check_model(perf).await);
        let slot = match self.pick_direction() {
            Ok(Some(slot)) => slot,
            Ok(None) => {
                // Full: keep the far end informed (and learn early if it restarted).
                if self.beat_if_due(perf).await {
                    wait_for_room(&self.kme).await;
                }
                return Flow::NextTurn;
            }
            Err(flow) => return flow,
        };
        if self.pending.is_none() {
            step!(self.obtain_block(slot.room, perf).await);
        }
        self.deliver(&slot, perf).await
    }

    /// Reconciles with the far end if the link is not synchronised.
    async fn ensure_synced(&mut self) -> Flow {
        let synced = match self.kme.lock() {
            Ok(st) => st.links.get(&self.peer).is_some_and(|l| l.synced()),
            Err(_) => return Flow::Stop,
        };
        if synced {
            return Flow::Proceed;
        }
        let Err(e) = sync_with(&self.kme, &self.peer).await else {
            return Flow::Proceed;
        };
        match self.health {
            Health::Up => tracing::warn!(peer = %self.peer, error = %e, "QKD link down; retrying"),
            // The first failure is worth a warning (a peer that is not there yet, or one whose
            // certificate is not the peer's); repeats are not.
            Health::Down => tracing::debug!(peer = %self.peer, error = %e, "QKD link not up yet"),
            Health::Starting => {
                tracing::warn!(peer = %self.peer, error = %e, "QKD link not up yet; retrying")
            }
        }
        self.health = Health::Down;
        tokio::time::sleep(Duration::from_millis(500)).await;
        Flow::NextTurn
    }

    /// Updates the physical model of a modelled link and returns the performance.
    fn model(&self) -> Option<LinkPerformance> {
        let l = self.params.length_km?;
        let eve = self
            .kme
            .lock()
            .ok()
            .and_then(|st| st.links.get(&self.peer).map(|x| x.eavesdropper))
            .unwrap_or(0.0);
        let p = self.params.device.evaluate(l, eve, self.params.abort_qber);
        if let Ok(mut st) = self.kme.lock() {
            if let Some(link) = st.links.get_mut(&self.peer) {
                link.perf = Some(p);
            }
        }
        Some(p)
    }

    /// The physical model sets the rate; above the abort threshold no key is produced, the
    /// alarm is raised and the far end told (a heartbeat without key).
    async fn check_model(&mut self, perf: Option<LinkPerformance>) -> Flow {
        let Some(p) = perf else {
            return Flow::Proceed;
        };
        self.pacer.rate = (p.secure_key_rate_bps / 8.0) as u64;
        if p.aborted || self.pacer.rate == 0 {
            if p.aborted && self.alarm == Alarm::Clear {
                tracing::error!(
                    peer = %self.peer,
                    qber_percent = format!("{:.1}", p.qber * 100.0),
                    threshold_percent = format!("{:.1}", self.params.abort_qber * 100.0),
                    "ALARM: QBER above the abort threshold (eavesdropping?); the QKD link produces no key"
                );
                self.alarm = Alarm::Raised;
            }
            // Tell the far end, then wait for the attacker to go.
            if let Err(e) = self.client.announce_block(&heartbeat(&self.me, perf)).await {
                on_failure(&self.kme, &self.peer, &e);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            return Flow::NextTurn;
        }
        if self.alarm == Alarm::Raised {
            tracing::warn!(peer = %self.peer, qber_percent = format!("{:.1}", p.qber * 100.0), "QKD link recovered; producing key again");
            self.alarm = Alarm::Clear;
            // Tell the far end at once (the pool may be full, so no block may follow).
            if let Err(e) = self.client.announce_block(&heartbeat(&self.me, perf)).await {
                tracing::warn!(peer = %self.peer, error = %e, "could not report the recovery to the peer");
            }
        }
        Flow::Proceed
    }

    /// The direction with less key held, if it has room for a refill.
    fn pick_direction(&self) -> Result<Option<Slot>, Flow> {
        let st = self.kme.lock().map_err(|_| Flow::Stop)?;
        Ok(st.links.get(&self.peer).and_then(|l| {
            let (own, theirs) = (l.own.unconsumed(), l.theirs.unconsumed());
            let direction = if own <= theirs {
                Direction::Own
            } else {
                Direction::Theirs
            };
            let room = self.cap.saturating_sub(own.min(theirs));
            (room >= self.refill_at).then(|| Slot {
                direction,
                offset: l.stream(direction).end(),
                room,
            })
        }))
    }

    /// Takes the next block (at most `room` bytes) from the key source, paced by the model.
    async fn obtain_block(&mut self, room: u64, perf: Option<LinkPerformance>) -> Flow {
        let len = self.params.block_bytes.min(room as usize);
        let prefill = if self.modelled {
            self.pacer.produce(len).await
        } else {
            false
        };
        let source = self.source.kind();
        match self.source.next_block(len).await {
            Ok(Some(b)) if !b.data.is_empty() && b.data.len() <= len => {
                self.pending = Some(b);
                return Flow::Proceed;
            }
            Ok(Some(_)) => {
                tracing::error!(peer = %self.peer, source, "key source returned a block of the wrong size; discarded");
                return Flow::NextTurn;
            }
            Ok(None) => {
                if prefill {
                    self.pacer.refund(len);
                }
                // The device has nothing yet; heartbeat now and then, look again shortly.
                self.beat_if_due(perf).await;
                tokio::time::sleep(self.source.poll_interval()).await;
            }
            Err(e) => {
                if prefill {
                    self.pacer.refund(len);
                }
                tracing::warn!(peer = %self.peer, source, error = %e, "key source failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
        Flow::NextTurn
    }

    /// Announces the pending block for `slot` and handles the far end's answer.
    async fn deliver(&mut self, slot: &Slot, perf: Option<LinkPerformance>) -> Flow {
        let Some(block) = self.pending.as_ref() else {
            return Flow::NextTurn;
        };
        let owner = match slot.direction {
            Direction::Own => self.me.clone(),
            Direction::Theirs => self.peer.clone(),
        };
        let announce = BlockAnnounce {
            owner,
            offset: slot.offset,
            len: block.data.len() as u64,
            reference: Some(block.reference.clone()),
            perf,
        };
        self.last_beat = Instant::now();
        match self.client.announce_block(&announce).await {
            Ok(()) => self.held_at_far_end(slot).await,
            // 503: the far end does not hold the block yet.
            Err(PeerError::Refused {
                status: 503,
                message,
                ..
            }) => {
                // The far end does not have the block yet (or is full): keep it, retry.
                tracing::debug!(peer = %self.peer, %message, "far end cannot take the block yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
                Flow::NextTurn
            }
            // 410 (gone) or 400: the far end can never obtain it.
            Err(PeerError::Refused {
                status: 410 | 400,
                message,
                ..
            }) => {
                tracing::warn!(peer = %self.peer, %message, "far end can never obtain this block; discarded");
                if let Some(block) = self.pending.take() {
                    if let Err(e) = self.source.release(&block.reference).await {
                        tracing::warn!(peer = %self.peer, error = %e, "key source could not release a discarded block");
                    }
                }
                Flow::NextTurn
            }
            Err(e) => {
                on_failure(&self.kme, &self.peer, &e);
                if self.health == Health::Up {
                    tracing::warn!(peer = %self.peer, error = %e, "QKD link interrupted; reconciling");
                }
                self.health = Health::Down;
                tokio::time::sleep(Duration::from_millis(200)).await;
                Flow::NextTurn
            }
        }
    }

    /// The far end holds the pending block: release it at the source, then append this
    /// end's copy.
    async fn held_at_far_end(&mut self, slot: &Slot) -> Flow {
        if self.health != Health::Up {
            tracing::info!(peer = %self.peer, source = self.source.kind(), "QKD link up");
            self.health = Health::Up;
        }
        let Some(block) = self.pending.take() else {
            return Flow::NextTurn;
        };
        // Release first: a crash from here on can only lose the block, never announce it
        // twice.
        if let Err(e) = self.source.release(&block.reference).await {
            tracing::warn!(peer = %self.peer, error = %e, "key source could not release a block; the block is discarded");
            unsync(&self.kme, &self.peer);
            return Flow::NextTurn;
        }
        let len = block.data.len() as u64;
        let id = StreamId::link(&self.peer, slot.direction);
        let durable = {
            let Ok(mut st) = self.kme.lock() else {
                return Flow::Stop;
            };
            if !st.links.contains_key(&self.peer) {
                return Flow::Stop;
            }
            match self
                .kme
                .append_durable(&mut st, &id, slot.offset, block.data)
            {
                Ok(d) => d,
                Err(_) => {
                    // A synchronisation moved the stream meanwhile: the far end has the
                    // block at an offset this end no longer has; reconcile again.
                    if let Some(link) = st.links.get_mut(&self.peer) {
                        link.phase = crate::pool::LinkPhase::Unsynced;
                    }
                    return Flow::NextTurn;
                }
            }
        };
        // This end's copy becomes durable while the next block is announced: the store
        // commits in order, so anything that later refers to these bytes (an allocation, a
        // record) is durable only after them, and a crash before then leaves this end
        // shorter, which the next synchronisation handles.
        if let Some(prev) = self.inflight.replace(durable) {
            if let Err(e) = prev.await {
                tracing::error!(peer = %self.peer, error = %e.body.message, "key store failed; the link stops");
                return Flow::Stop;
            }
        }
        self.kme.metrics.generated(&self.peer, len);
        Flow::NextTurn
    }

    /// Sends a heartbeat if none went out for a second. Returns false if it failed (the link
    /// then reconciles before the next block).
    async fn beat_if_due(&mut self, perf: Option<LinkPerformance>) -> bool {
        if self.last_beat.elapsed() <= Duration::from_secs(1) {
            return true;
        }
        self.last_beat = Instant::now();
        match self.client.announce_block(&heartbeat(&self.me, perf)).await {
            Ok(()) => true,
            Err(e) => {
                on_failure(&self.kme, &self.peer, &e);
                false
            }
        }
    }
}

/// A failed exchange with the far end: reconcile before the next block.
fn on_failure(kme: &Kme, peer: &str, e: &PeerError) {
    tracing::debug!(peer, error = %e, "link exchange failed; will reconcile");
    unsync(kme, peer);
}

/// An announcement without key: it only reports the link's modelled state to the far end.
fn heartbeat(me: &str, perf: Option<LinkPerformance>) -> BlockAnnounce {
    BlockAnnounce {
        owner: me.to_owned(),
        offset: 0,
        len: 0,
        reference: None,
        perf,
    }
}
