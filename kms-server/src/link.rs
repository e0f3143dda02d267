//! The simulated QKD link and the local key pool.
//!
//! Each link has a *producer*, the end with the smaller KME ID. For every session it draws a
//! fresh 256-bit seed from the operating system; block `seq` of the session is the ChaCha8
//! stream `seq` under that seed. The producer announces each block to the far end over the
//! mutually authenticated KME-to-KME channel, both ends derive the same bytes (standing in
//! for the quantum channel and post-processing, which make both ends hold identical key),
//! and the producer adds the block to its own copy only once the far end has acknowledged
//! it. So every usable byte is held at both ends. Simulator key is therefore only
//! computationally secret (ChaCha8, TLS); a real QKD device replaces this module.
//!
//! Blocks are assigned to one of the two directions (which KME allocates from them), the
//! emptier one first; a direction whose pool reaches `max_key_count` keys gets no more until
//! keys are consumed. Any delivery failure starts a new session: both ends wipe what they hold
//! of the link and start again from offset 0, so a half-delivered block can never be used.

use std::sync::Arc;
use std::time::Duration;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::config::LinkParams;
use crate::error::ApiError;
use crate::kme::Kme;
use crate::peer::BlockAnnounce;

/// The bytes of block `seq` of a session: ChaCha8 under the session seed, stream `seq`.
fn derive_block(seed: &[u8; 32], seq: u64, len: usize) -> Zeroizing<Vec<u8>> {
    let mut rng = ChaCha8Rng::from_seed(*seed);
    rng.set_stream(seq);
    let mut data = Zeroizing::new(vec![0u8; len]);
    rng.fill_bytes(&mut data);
    data
}

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
        if room == 0 {
            wait_for_room(&kme).await;
            continue;
        }
        let len = params.block_bytes.min(room as usize);
        let _ = pacer.produce(len).await;
        let mut block = Zeroizing::new(vec![0u8; len]);
        rng.fill_bytes(&mut block);
        let Ok(mut st) = kme.lock() else { return };
        let end = st.local.end();
        if st.local.append(end, block).is_ok() {
            kme.metrics.generated("local", len as u64);
        }
    }
}

/// Produces key material for the link to `peer` forever (run at the producing end only).
pub async fn run_producer(kme: Arc<Kme>, peer: String, params: LinkParams) {
    let Some(client) = kme.peer(&peer).cloned() else {
        return;
    };
    let cap = kme.capacity_bytes();
    let me = kme.kme_id().to_owned();
    let mut pacer = Pacer::new(&params, 2 * cap);
    let Some((mut session, mut seed)) = new_session(&kme, &peer) else {
        return;
    };
    let mut seq = 0u64;
    let mut announced = false;
    let mut alarmed = false;
    if let Some(l) = params.length_km {
        let p = params
            .device
            .evaluate(l, params.eavesdropper, params.abort_qber);
        tracing::info!(
            peer = %peer,
            length_km = l,
            qber_percent = format!("{:.2}", p.qber * 100.0),
            secure_key_rate_kbps = format!("{:.1}", p.secure_key_rate_bps / 1e3),
            "QKD link model (decoy-state BB84)"
        );
    }
    loop {
        // The physical model sets the rate; above the abort threshold no key is produced.
        let mut perf = None;
        if let Some(l) = params.length_km {
            let eve = kme
                .lock()
                .ok()
                .and_then(|st| st.links.get(&peer).map(|x| x.eavesdropper))
                .unwrap_or(0.0);
            let p = params.device.evaluate(l, eve, params.abort_qber);
            if let Ok(mut st) = kme.lock() {
                if let Some(link) = st.links.get_mut(&peer) {
                    link.perf = Some(p);
                }
            }
            pacer.rate = (p.secure_key_rate_bps / 8.0) as u64;
            perf = Some(p);
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
                let _ = client.announce_block(&heartbeat(session, &me, perf)).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
            if alarmed {
                tracing::warn!(peer = %peer, qber_percent = format!("{:.1}", p.qber * 100.0), "QKD link recovered; producing key again");
                alarmed = false;
                // Tell the far end at once (the pool may be full, so no block may follow).
                if let Err(e) = client.announce_block(&heartbeat(session, &me, perf)).await {
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
                (room > 0).then_some((mine, off, room))
            }),
            Err(_) => return,
        };
        let Some((mine, offset, room)) = pick else {
            wait_for_room(&kme).await;
            continue;
        };
        let len = params.block_bytes.min(room as usize);
        let prefill = pacer.produce(len).await;
        let owner = if mine { me.as_str() } else { peer.as_str() };
        let announce = BlockAnnounce {
            session,
            seed: hex_seed(&seed),
            seq,
            owner: owner.to_owned(),
            offset,
            len: len as u64,
            perf,
        };
        let block = derive_block(&seed, seq, len);
        seq += 1;
        let sent = client.announce_block(&announce).await;
        match sent {
            Ok(()) => {
                if !announced {
                    tracing::info!(peer = %peer, %session, "QKD link up");
                    announced = true;
                }
                let appended = {
                    let Ok(mut st) = kme.lock() else { return };
                    match st.links.get_mut(&peer) {
                        Some(link) if link.session == session => {
                            let stream = if mine {
                                &mut link.own
                            } else {
                                &mut link.theirs
                            };
                            stream.append(offset, block).is_ok()
                        }
                        _ => false,
                    }
                };
                if appended {
                    kme.metrics.generated(&peer, len as u64);
                } else {
                    let Some(s) = new_session(&kme, &peer) else {
                        return;
                    };
                    (session, seed) = s;
                    seq = 0;
                }
            }
            Err(e) => {
                if announced {
                    tracing::warn!(peer = %peer, error = %e, "QKD link down; restarting its session");
                } else {
                    tracing::debug!(peer = %peer, error = %e, "QKD link not up yet");
                }
                announced = false;
                drop(block);
                if prefill {
                    pacer.refund(len);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
                let Some(s) = new_session(&kme, &peer) else {
                    return;
                };
                (session, seed) = s;
                seq = 0;
            }
        }
    }
}

/// An announcement without key: it only reports the link's modelled state to the far end.
fn heartbeat(
    session: Uuid,
    me: &str,
    perf: Option<crate::physics::LinkPerformance>,
) -> BlockAnnounce {
    BlockAnnounce {
        session,
        seed: String::new(),
        seq: 0,
        owner: me.to_owned(),
        offset: 0,
        len: 0,
        perf,
    }
}

/// Starts a new session of the link at this end, wiping what it held; returns its ID and
/// seed.
fn new_session(kme: &Kme, peer: &str) -> Option<(Uuid, Zeroizing<[u8; 32]>)> {
    let mut seed = Zeroizing::new([0u8; 32]);
    if let Err(e) = getrandom::fill(&mut seed[..]) {
        tracing::error!(error = %e, "cannot draw a link seed from the OS");
        return None;
    }
    let session = Uuid::new_v4();
    let Ok(mut st) = kme.lock() else { return None };
    if let Some(link) = st.links.get_mut(peer) {
        link.reset(session);
    }
    Some((session, seed))
}

fn hex_seed(seed: &[u8; 32]) -> String {
    // Sized up front so no partial copies of the seed are left behind while it grows.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in seed {
        s.push(HEX[usize::from(b >> 4)] as char);
        s.push(HEX[usize::from(b & 15)] as char);
    }
    s
}

fn parse_seed(hex: &str) -> Option<Zeroizing<[u8; 32]>> {
    let mut seed = Zeroizing::new([0u8; 32]);
    if hex.len() != 64 {
        return None;
    }
    for (i, out) in seed.iter_mut().enumerate() {
        *out = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(seed)
}

/// The far end receives one block announcement of the link to `from_kme`.
pub fn receive_block(kme: &Kme, from_kme: &str, block: &BlockAnnounce) -> Result<(), ApiError> {
    let me = kme.kme_id().to_owned();
    if block.len == 0 {
        // A heartbeat: only the link's state (e.g. an alarm) is reported.
        let mut st = kme.lock()?;
        let link = st
            .links
            .get_mut(from_kme)
            .ok_or_else(|| ApiError::unauthorized(format!("no link with KME {from_kme}")))?;
        if block.perf.is_some() {
            link.perf = block.perf;
        }
        tracing::debug!(peer = from_kme, perf = ?block.perf, "link heartbeat");
        return Ok(());
    }
    let seed = parse_seed(&block.seed).ok_or_else(|| ApiError::bad_request("bad link seed"))?;
    let len = usize::try_from(block.len)
        .ok()
        .filter(|&l| l > 0 && l <= 16 << 20)
        .ok_or_else(|| ApiError::bad_request("block length out of range"))?;
    let data = derive_block(&seed, block.seq, len);
    let mut st = kme.lock()?;
    let link = st
        .links
        .get_mut(from_kme)
        .ok_or_else(|| ApiError::unauthorized(format!("no link with KME {from_kme}")))?;
    if block.perf.is_some() {
        link.perf = block.perf;
    }
    if link.session != block.session {
        tracing::info!(peer = from_kme, session = %block.session, "QKD link session started by peer");
        link.reset(block.session);
    }
    let stream = if block.owner == from_kme {
        &mut link.theirs
    } else if block.owner == me {
        &mut link.own
    } else {
        return Err(ApiError::bad_request(format!(
            "unknown block owner {:?}",
            block.owner
        )));
    };
    stream
        .append(block.offset, data)
        .map_err(|e| ApiError::new(actix_web::http::StatusCode::CONFLICT, e.to_string()))?;
    drop(st);
    kme.metrics.generated(from_kme, len as u64);
    Ok(())
}
