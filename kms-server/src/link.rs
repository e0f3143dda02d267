//! The QKD links and the local key pool: moving key material from a [`KeySource`] into the
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
//! ends reconcile ([`SyncRequest`]): both directions continue at the larger of the two ends'
//! offsets, and both ends discard the free bytes they hold of the link (a block announced
//! just before a crash may be held at one end only, and neither end can tell which free
//! bytes the other still holds). Keys already handed to masters and awaiting slaves are kept.
//! Offsets only grow, so a byte is never appended twice under the same offset.
//!
//! The physical model ([`qkd_sim::physics`]) paces modelled sources (the simulators) at the
//! secure key rate of the link's length and raises an alarm when the QBER is above the abort
//! threshold.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use zeroize::Zeroizing;

use crate::config::LinkParams;
use crate::error::ApiError;
use crate::keystore::MAX_OFFSET;
use crate::kme::{own_stream, theirs_stream, Kme, LOCAL};
use crate::peer::{BlockAnnounce, PeerError, SyncReply, SyncRequest};
use crate::source::{Produced, SourceError};
use crate::store::Batch;

/// Random bytes for the local pool: ChaCha8 seeded from the OS.
fn new_rng() -> Option<ChaCha8Rng> {
    match ChaCha8Rng::try_from_os_rng() {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::error!(error = %e, "cannot seed the key generator from the OS");
            None
        }
    }
}

/// Paces a producer to `rate` bytes per second (0 = unlimited): a block becomes available
/// only after the time the link needs to produce it.
struct Pacer {
    /// Bytes per second (0 = unlimited); the physical model updates it.
    rate: u64,
    /// Bytes that may still be produced without waiting (the prefill).
    burst: u64,
    /// When the link finishes producing what was asked so far.
    next: tokio::time::Instant,
}

impl Pacer {
    fn new(params: &LinkParams, prefill_bytes: u64) -> Self {
        Pacer {
            rate: params.rate_bytes_per_sec,
            burst: if params.prefill { prefill_bytes } else { 0 },
            next: tokio::time::Instant::now(),
        }
    }

    /// Waits until the link has produced `bytes` more. Returns true if they came out of
    /// the prefill (so a failed delivery can give them back with [`Pacer::refund`]).
    async fn produce(&mut self, bytes: usize) -> bool {
        let bytes = bytes as u64;
        if self.burst >= bytes {
            self.burst -= bytes;
            return true;
        }
        self.burst = 0;
        if self.rate == 0 {
            return false;
        }
        let now = tokio::time::Instant::now();
        // Production does not accumulate while the pool is full.
        self.next = self.next.max(now) + Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        tokio::time::sleep_until(self.next).await;
        false
    }

    /// Returns prefill bytes whose block could not be delivered.
    fn refund(&mut self, bytes: usize) {
        self.burst += bytes as u64;
    }
}

async fn wait_for_room(kme: &Kme) {
    let _ = tokio::time::timeout(Duration::from_millis(200), kme.consumed.notified()).await;
}

/// A pool is topped up once it has room for a whole block (or a quarter of its capacity, if
/// smaller): not for every key taken, which would move many tiny blocks.
fn refill_threshold(cap: u64, block_bytes: usize) -> u64 {
    (block_bytes as u64).min(cap / 4).max(1)
}

/// Fills the local pool (keys between SAEs of this KME) forever.
pub async fn run_local(kme: Arc<Kme>, params: LinkParams) {
    let cap = kme.capacity_bytes();
    let mut pacer = Pacer::new(&params, cap);
    let Some(mut rng) = new_rng() else { return };
    loop {
        let room = match kme.lock() {
            Ok(st) => cap.saturating_sub(st.local.unconsumed()),
            Err(_) => return,
        };
        if room < refill_threshold(cap, params.block_bytes) {
            wait_for_room(&kme).await;
            continue;
        }
        let len = params.block_bytes.min(room as usize);
        let _ = pacer.produce(len).await;
        let mut block = Zeroizing::new(vec![0u8; len]);
        rng.fill_bytes(&mut block);
        let durable = {
            let Ok(mut st) = kme.lock() else { return };
            let end = st.local.end();
            let copy = kme.durable().then(|| Zeroizing::new(block.to_vec()));
            if st.local.append(end, block).is_err() {
                continue;
            }
            let mut batch = Batch::default();
            if let Some(copy) = copy {
                batch.appends.push((LOCAL.to_owned(), end, copy));
                batch.streams.push((LOCAL.to_owned(), st.local.meta()));
            }
            kme.persist(batch)
        };
        if let Err(e) = durable.await {
            tracing::error!(error = %e.body.message, "local key pool: store failed");
            return;
        }
        kme.metrics.generated("local", len as u64);
    }
}

/// A store write in progress.
type Durable = std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), ApiError>> + Send>>;

/// Marks the link to `peer` as needing a synchronisation (stops serving its keys).
fn unsync(kme: &Kme, peer: &str) {
    if let Ok(mut st) = kme.lock() {
        if let Some(l) = st.links.get_mut(peer) {
            l.synced = false;
        }
    }
}

/// Applies an agreed synchronisation at this end: both directions discard their free bytes
/// and continue at the agreed offsets. `producer_end` is the end of the producer's own
/// direction. Durable before it returns.
async fn apply_sync(kme: &Kme, peer: &str, own_end: u64, theirs_end: u64) -> Result<(), ApiError> {
    let durable = {
        let mut st = kme.lock()?;
        let link = st
            .links
            .get_mut(peer)
            .ok_or_else(|| ApiError::unauthorized(format!("no link with KME {peer}")))?;
        let mut batch = Batch::default();
        for (r0, r1) in link.own.discard_free_and_skip(own_end) {
            batch.wipes.push((own_stream(peer), r0, r1 - r0));
        }
        for (r0, r1) in link.theirs.discard_free_and_skip(theirs_end) {
            batch.wipes.push((theirs_stream(peer), r0, r1 - r0));
        }
        batch.streams.push((own_stream(peer), link.own.meta()));
        batch
            .streams
            .push((theirs_stream(peer), link.theirs.meta()));
        link.synced = true;
        kme.persist(batch)
    };
    let r = durable.await;
    if r.is_err() {
        unsync(kme, peer);
    }
    r
}

/// Only a link's producing end (the smaller KME ID) announces blocks and synchronises.
fn check_producer(kme: &Kme, from_kme: &str) -> Result<(), ApiError> {
    if from_kme < kme.kme_id() {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "KME {from_kme} is not the producing end of its link with KME {}",
            kme.kme_id()
        )))
    }
}

/// Far end: the producer asks to reconcile. Both directions continue at the larger of the
/// two ends' offsets.
pub async fn receive_sync(
    kme: &Kme,
    from_kme: &str,
    req: &SyncRequest,
) -> Result<SyncReply, ApiError> {
    check_producer(kme, from_kme)?;
    if req.producer_end > MAX_OFFSET || req.far_end > MAX_OFFSET {
        return Err(ApiError::bad_request("stream offset out of range"));
    }
    let (mine, theirs) = {
        let st = kme.lock()?;
        let link = st
            .links
            .get(from_kme)
            .ok_or_else(|| ApiError::unauthorized(format!("no link with KME {from_kme}")))?;
        (link.own.end(), link.theirs.end())
    };
    let reply = SyncReply {
        producer_end: req.producer_end.max(theirs),
        far_end: req.far_end.max(mine),
    };
    apply_sync(kme, from_kme, reply.far_end, reply.producer_end).await?;
    tracing::info!(
        peer = from_kme,
        producer_end = reply.producer_end,
        far_end = reply.far_end,
        "QKD link synchronised with its producing end"
    );
    Ok(reply)
}

/// Producer: reconciles with the far end.
async fn sync_with(kme: &Kme, peer: &str) -> Result<(), String> {
    let client = kme.peer(peer).ok_or("peer client missing")?;
    let req = {
        let st = kme.lock().map_err(|e| e.body.message)?;
        let link = st.links.get(peer).ok_or("link state missing")?;
        SyncRequest {
            producer_end: link.own.end(),
            far_end: link.theirs.end(),
        }
    };
    let reply = client.sync(&req).await.map_err(|e| e.to_string())?;
    if reply.producer_end < req.producer_end
        || reply.far_end < req.far_end
        || reply.producer_end > MAX_OFFSET
        || reply.far_end > MAX_OFFSET
    {
        return Err("peer answered a synchronisation that moves offsets back".into());
    }
    apply_sync(kme, peer, reply.producer_end, reply.far_end)
        .await
        .map_err(|e| e.body.message)?;
    tracing::info!(
        peer,
        producer_end = reply.producer_end,
        far_end = reply.far_end,
        "QKD link synchronised"
    );
    Ok(())
}

/// Updates the physical model of a modelled link; returns the performance and whether the
/// link may produce key now.
fn model(kme: &Kme, peer: &str, params: &LinkParams) -> Option<qkd_sim::physics::LinkPerformance> {
    let l = params.length_km?;
    let eve = kme
        .lock()
        .ok()
        .and_then(|st| st.links.get(peer).map(|x| x.eavesdropper))
        .unwrap_or(0.0);
    let p = params.device.evaluate(l, eve, params.abort_qber);
    if let Ok(mut st) = kme.lock() {
        if let Some(link) = st.links.get_mut(peer) {
            link.perf = Some(p);
        }
    }
    Some(p)
}

/// Produces key material for the link to `peer` forever (run at the producing end only).
pub async fn run_producer(kme: Arc<Kme>, peer: String, params: LinkParams) {
    let Some(client) = kme.peer(&peer).cloned() else {
        return;
    };
    let Some(source) = kme.source(&peer).cloned() else {
        return;
    };
    let cap = kme.capacity_bytes();
    let refill_at = refill_threshold(cap, params.block_bytes);
    let me = kme.kme_id().to_owned();
    let mut pacer = Pacer::new(&params, 2 * cap);
    let modelled = source.modelled();
    let mut alarmed = false;
    let mut up = false;
    let mut last_beat = tokio::time::Instant::now();
    // The block obtained from the source and not yet held at both ends: it is announced
    // again (after a synchronisation if need be) until the far end has it or says it never
    // will.
    let mut pending: Option<Produced> = None;
    // The store write of the last block appended here, awaited before the next one.
    let mut inflight: Option<Durable> = None;
    if let (true, Some(p)) = (modelled, model(&kme, &peer, &params)) {
        tracing::info!(
            peer = %peer,
            length_km = params.length_km.unwrap_or(0.0),
            qber_percent = format!("{:.2}", p.qber * 100.0),
            secure_key_rate_kbps = format!("{:.1}", p.secure_key_rate_bps / 1e3),
            source = source.kind(),
            "QKD link model (decoy-state BB84)"
        );
    }
    loop {
        let synced = match kme.lock() {
            Ok(st) => st.links.get(&peer).is_some_and(|l| l.synced),
            Err(_) => return,
        };
        if !synced {
            if let Err(e) = sync_with(&kme, &peer).await {
                if up {
                    tracing::warn!(peer = %peer, error = %e, "QKD link down; retrying");
                } else {
                    tracing::debug!(peer = %peer, error = %e, "QKD link not up yet");
                }
                up = false;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        }
        // The physical model sets the rate; above the abort threshold no key is produced.
        let perf = if modelled {
            model(&kme, &peer, &params)
        } else {
            None
        };
        if let Some(p) = perf {
            pacer.rate = (p.secure_key_rate_bps / 8.0) as u64;
            if p.aborted || pacer.rate == 0 {
                if p.aborted && !alarmed {
                    tracing::error!(
                        peer = %peer,
                        qber_percent = format!("{:.1}", p.qber * 100.0),
                        threshold_percent = format!("{:.1}", params.abort_qber * 100.0),
                        "ALARM: QBER above the abort threshold (eavesdropping?); the QKD link produces no key"
                    );
                    alarmed = true;
                }
                // Tell the far end (a heartbeat without key), then wait for the attacker to go.
                if let Err(e) = client.announce_block(&heartbeat(&me, perf)).await {
                    on_failure(&kme, &peer, &e);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            if alarmed {
                tracing::warn!(peer = %peer, qber_percent = format!("{:.1}", p.qber * 100.0), "QKD link recovered; producing key again");
                alarmed = false;
                // Tell the far end at once (the pool may be full, so no block may follow).
                if let Err(e) = client.announce_block(&heartbeat(&me, perf)).await {
                    tracing::warn!(peer = %peer, error = %e, "could not report the recovery to the peer");
                }
            }
        }
        // Pick the direction with less key held; none if both are full.
        let pick = match kme.lock() {
            Ok(st) => st.links.get(&peer).and_then(|l| {
                let (own, theirs) = (l.own.unconsumed(), l.theirs.unconsumed());
                let (mine, off) = if own <= theirs {
                    (true, l.own.end())
                } else {
                    (false, l.theirs.end())
                };
                let room = cap.saturating_sub(own.min(theirs));
                (room >= refill_at).then_some((mine, off, room))
            }),
            Err(_) => return,
        };
        let Some((mine, offset, room)) = pick else {
            // Full: keep the far end informed (and learn early if it restarted).
            if beat_if_due(&kme, &peer, &client, &mut last_beat, perf).await {
                wait_for_room(&kme).await;
            }
            continue;
        };
        if pending.is_none() {
            let len = params.block_bytes.min(room as usize);
            let prefill = if modelled {
                pacer.produce(len).await
            } else {
                false
            };
            match source.next_block(len).await {
                Ok(Some(b)) if !b.data.is_empty() && b.data.len() <= len => pending = Some(b),
                Ok(Some(_)) => {
                    tracing::error!(peer = %peer, source = source.kind(), "key source returned a block of the wrong size; discarded");
                    continue;
                }
                Ok(None) => {
                    if prefill {
                        pacer.refund(len);
                    }
                    // The device has nothing yet; heartbeat now and then, look again shortly.
                    beat_if_due(&kme, &peer, &client, &mut last_beat, perf).await;
                    tokio::time::sleep(source.poll_interval()).await;
                    continue;
                }
                Err(e) => {
                    if prefill {
                        pacer.refund(len);
                    }
                    tracing::warn!(peer = %peer, source = source.kind(), error = %e, "key source failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        let Some(block) = pending.as_ref() else {
            continue;
        };
        let owner = if mine { me.as_str() } else { peer.as_str() };
        let announce = BlockAnnounce {
            owner: owner.to_owned(),
            offset,
            len: block.data.len() as u64,
            reference: Some(block.reference.clone()),
            perf,
        };
        last_beat = tokio::time::Instant::now();
        match client.announce_block(&announce).await {
            Ok(()) => {
                if !up {
                    tracing::info!(peer = %peer, source = source.kind(), "QKD link up");
                    up = true;
                }
                let Some(block) = pending.take() else {
                    continue;
                };
                // Release first: a crash from here on can only lose the block, never
                // announce it twice.
                if let Err(e) = source.release(&block.reference).await {
                    tracing::warn!(peer = %peer, error = %e, "key source could not release a block; the block is discarded");
                    unsync(&kme, &peer);
                    continue;
                }
                let len = block.data.len() as u64;
                let name = if mine {
                    own_stream(&peer)
                } else {
                    theirs_stream(&peer)
                };
                let durable = {
                    let Ok(mut st) = kme.lock() else { return };
                    let Some(link) = st.links.get_mut(&peer) else {
                        return;
                    };
                    let stream = if mine {
                        &mut link.own
                    } else {
                        &mut link.theirs
                    };
                    let copy = kme.durable().then(|| Zeroizing::new(block.data.to_vec()));
                    if stream.append(offset, block.data.clone()).is_err() {
                        // A synchronisation moved the stream meanwhile: the far end has the
                        // block at an offset this end no longer has; reconcile again.
                        link.synced = false;
                        continue;
                    }
                    let mut batch = Batch::default();
                    if let Some(copy) = copy {
                        batch.appends.push((name.clone(), offset, copy));
                        batch.streams.push((name, stream.meta()));
                    }
                    kme.persist(batch)
                };
                // This end's copy becomes durable while the next block is announced: the
                // store commits in order, so anything that later refers to these bytes (an
                // allocation, a record) is durable only after them, and a crash before then
                // leaves this end shorter, which the next synchronisation handles.
                if let Some(prev) = inflight.replace(Box::pin(durable)) {
                    if let Err(e) = prev.await {
                        tracing::error!(peer = %peer, error = %e.body.message, "key store failed; the link stops");
                        return;
                    }
                }
                kme.metrics.generated(&peer, len);
            }
            Err(PeerError::Refused {
                status, message, ..
            }) if status == StatusCode::SERVICE_UNAVAILABLE.as_u16() => {
                // The far end does not have the block yet (or is full): keep it, retry.
                tracing::debug!(peer = %peer, %message, "far end cannot take the block yet");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(PeerError::Refused {
                status, message, ..
            }) if status == StatusCode::GONE.as_u16()
                || status == StatusCode::BAD_REQUEST.as_u16() =>
            {
                tracing::warn!(peer = %peer, %message, "far end can never obtain this block; discarded");
                if let Some(block) = pending.take() {
                    if let Err(e) = source.release(&block.reference).await {
                        tracing::warn!(peer = %peer, error = %e, "key source could not release a discarded block");
                    }
                }
            }
            Err(e) => {
                on_failure(&kme, &peer, &e);
                if up {
                    tracing::warn!(peer = %peer, error = %e, "QKD link interrupted; reconciling");
                }
                up = false;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Sends a heartbeat if none went out for a second. Returns false if it failed (the link
/// then reconciles before the next block).
async fn beat_if_due(
    kme: &Kme,
    peer: &str,
    client: &crate::peer::PeerClient,
    last: &mut tokio::time::Instant,
    perf: Option<qkd_sim::physics::LinkPerformance>,
) -> bool {
    if last.elapsed() <= Duration::from_secs(1) {
        return true;
    }
    *last = tokio::time::Instant::now();
    match client.announce_block(&heartbeat(kme.kme_id(), perf)).await {
        Ok(()) => true,
        Err(e) => {
            on_failure(kme, peer, &e);
            false
        }
    }
}

/// A failed exchange with the far end: reconcile before the next block.
fn on_failure(kme: &Kme, peer: &str, e: &PeerError) {
    tracing::debug!(peer, error = %e, "link exchange failed; will reconcile");
    unsync(kme, peer);
}

/// An announcement without key: it only reports the link's modelled state to the far end.
fn heartbeat(me: &str, perf: Option<qkd_sim::physics::LinkPerformance>) -> BlockAnnounce {
    BlockAnnounce {
        owner: me.to_owned(),
        offset: 0,
        len: 0,
        reference: None,
        perf,
    }
}

fn source_error(e: SourceError) -> ApiError {
    match e {
        SourceError::NotYet(m) => ApiError::unavailable(format!("key not available here yet: {m}")),
        SourceError::Gone(m) => ApiError::new(StatusCode::GONE, format!("key gone: {m}")),
        SourceError::BadReference(m) => ApiError::bad_request(format!("bad block reference: {m}")),
        SourceError::Failed(m) => ApiError::unavailable(format!("key source: {m}")),
    }
}

/// The far end receives one block announcement of the link to `from_kme`; returns once the
/// block is durable here.
pub async fn receive_block(
    kme: &Kme,
    from_kme: &str,
    block: &BlockAnnounce,
) -> Result<(), ApiError> {
    let me = kme.kme_id().to_owned();
    check_producer(kme, from_kme)?;
    if block
        .offset
        .checked_add(block.len)
        .is_none_or(|e| e > MAX_OFFSET)
    {
        return Err(ApiError::bad_request("block offset out of range"));
    }
    {
        let mut st = kme.lock()?;
        let link = st
            .links
            .get_mut(from_kme)
            .ok_or_else(|| ApiError::unauthorized(format!("no link with KME {from_kme}")))?;
        if block.perf.is_some() {
            link.perf = block.perf;
        }
        if !link.synced {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "link not synchronised since this KME started; synchronise first",
            ));
        }
    }
    if block.len == 0 {
        // A heartbeat: only the link's state (e.g. an alarm) is reported.
        tracing::debug!(peer = from_kme, perf = ?block.perf, "link heartbeat");
        return Ok(());
    }
    let mine = if block.owner == from_kme {
        false
    } else if block.owner == me {
        true
    } else {
        return Err(ApiError::bad_request(format!(
            "unknown block owner {:?}",
            block.owner
        )));
    };
    let len = usize::try_from(block.len)
        .ok()
        .filter(|&l| l > 0 && l <= 16 << 20)
        .ok_or_else(|| ApiError::bad_request("block length out of range"))?;
    let reference = block
        .reference
        .as_ref()
        .ok_or_else(|| ApiError::bad_request("block without a reference"))?;
    let source = kme
        .source(from_kme)
        .ok_or_else(|| ApiError::unauthorized(format!("no link with KME {from_kme}")))?;
    if reference.source != source.kind() {
        return Err(ApiError::bad_request(format!(
            "block from a {:?} source; this end of the link uses {:?}",
            reference.source,
            source.kind()
        )));
    }
    // Check the position and the room before asking the source (which may consume device
    // key): a block that cannot be appended is refused without touching the source.
    let cap = kme.capacity_bytes();
    let check = |st: &crate::kme::State| -> Result<(), ApiError> {
        let link = st
            .links
            .get(from_kme)
            .ok_or_else(|| ApiError::unauthorized(format!("no link with KME {from_kme}")))?;
        let stream = if mine { &link.own } else { &link.theirs };
        if !link.synced || stream.end() != block.offset {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                format!(
                    "block at offset {} does not follow the stream end {}; synchronise",
                    block.offset,
                    stream.end()
                ),
            ));
        }
        if stream.unconsumed() + block.len > 2 * cap {
            return Err(ApiError::unavailable("pool full"));
        }
        Ok(())
    };
    check(&*kme.lock()?)?;
    let data = source
        .fetch_block(reference, len)
        .await
        .map_err(source_error)?;
    if data.len() != len {
        return Err(ApiError::bad_request(
            "key source returned a block of the wrong length",
        ));
    }
    let name = if mine {
        own_stream(from_kme)
    } else {
        theirs_stream(from_kme)
    };
    let appended = {
        let mut st = kme.lock()?;
        match check(&st) {
            // Moved meanwhile (a synchronisation): the fetched bytes are dropped (wiped).
            Err(e) => Err(e),
            Ok(()) => {
                let Some(link) = st.links.get_mut(from_kme) else {
                    return Err(ApiError::unauthorized(format!(
                        "no link with KME {from_kme}"
                    )));
                };
                let stream = if mine {
                    &mut link.own
                } else {
                    &mut link.theirs
                };
                let copy = kme.durable().then(|| Zeroizing::new(data.to_vec()));
                stream
                    .append(block.offset, data)
                    .map_err(|e| ApiError::new(StatusCode::CONFLICT, e.to_string()))?;
                let mut batch = Batch::default();
                if let Some(copy) = copy {
                    batch.appends.push((name.clone(), block.offset, copy));
                    batch.streams.push((name, stream.meta()));
                }
                Ok(kme.persist(batch))
            }
        }
    };
    let durable = match appended {
        Ok(d) => d,
        Err(e) => {
            let _ = source.release(reference).await;
            return Err(e);
        }
    };
    // Acknowledged once queued, not once durable: the store commits in order, so whatever
    // later refers to these bytes (an allocation here, a registration from the peer) becomes
    // durable only after them; a crash before that leaves this end shorter, which the next
    // synchronisation discards. The source's copy is released only once the block is durable.
    let source = source.clone();
    let reference = reference.clone();
    let peer = from_kme.to_owned();
    tokio::spawn(async move {
        match durable.await {
            Ok(()) => {
                if let Err(e) = source.release(&reference).await {
                    tracing::warn!(peer, error = %e, "key source could not release a block held here");
                }
            }
            Err(e) => tracing::error!(peer, error = %e.body.message, "a block could not be stored"),
        }
    });
    kme.metrics.generated(from_kme, len as u64);
    Ok(())
}
