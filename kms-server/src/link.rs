//! The simulated QKD link and the local key pool.
//!
//! Each link has a *producer*, the end with the smaller KME ID. It draws fresh random blocks
//! from the operating system's generator, delivers each to the far end over the KME-to-KME
//! channel (standing in for the quantum channel and post-processing, which make both ends hold
//! identical key), and only once the far end has acknowledged it does it add the block to its
//! own copy. So every usable byte is held at both ends.
//!
//! Blocks are assigned to one of the two directions (which KME allocates from them), the
//! emptier one first; a direction whose pool reaches `max_key_count` keys gets no more until
//! keys are consumed. Any delivery failure starts a new session: both ends wipe what they hold
//! of the link and start again from offset 0, so a half-delivered block can never be used.

use std::sync::Arc;
use std::time::Duration;

use rand::TryRngCore;
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::config::LinkParams;
use crate::error::ApiError;
use crate::kme::Kme;

fn random_block(len: usize) -> Result<Zeroizing<Vec<u8>>, rand::rand_core::OsError> {
    let mut data = Zeroizing::new(vec![0u8; len]);
    rand::rngs::OsRng.try_fill_bytes(&mut data)?;
    Ok(data)
}

/// Paces a producer to `rate` bytes per second (0 = unlimited): a block becomes available
/// only after the time the link needs to produce it.
struct Pacer {
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
        let block = match random_block(len) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "random generator failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Ok(mut st) = kme.lock() else { return };
        let end = st.local.end();
        let _ = st.local.append(end, block);
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
    let mut session = new_session(&kme, &peer);
    let mut announced = false;
    loop {
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
        let block = match random_block(len) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "random generator failed");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let owner = if mine { me.as_str() } else { peer.as_str() };
        match client.push_block(session, owner, offset, &block).await {
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
                if !appended {
                    session = new_session(&kme, &peer);
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
                session = new_session(&kme, &peer);
            }
        }
    }
}

/// Starts a new session of the link at this end, wiping what it held.
fn new_session(kme: &Kme, peer: &str) -> Uuid {
    let session = Uuid::new_v4();
    if let Ok(mut st) = kme.lock() {
        if let Some(link) = st.links.get_mut(peer) {
            link.reset(session);
        }
    }
    session
}

/// The far end receives one block of the link to `from_kme`.
pub fn receive_block(
    kme: &Kme,
    from_kme: &str,
    session: Uuid,
    owner: &str,
    offset: u64,
    data: Zeroizing<Vec<u8>>,
) -> Result<(), ApiError> {
    let me = kme.kme_id().to_owned();
    let mut st = kme.lock()?;
    let link = st
        .links
        .get_mut(from_kme)
        .ok_or_else(|| ApiError::unauthorized(format!("no link with KME {from_kme}")))?;
    if link.session != session {
        tracing::info!(peer = from_kme, %session, "QKD link session started by peer");
        link.reset(session);
    }
    let stream = if owner == from_kme {
        &mut link.theirs
    } else if owner == me {
        &mut link.own
    } else {
        return Err(ApiError::bad_request(format!(
            "unknown block owner {owner:?}"
        )));
    };
    stream
        .append(offset, data)
        .map_err(|e| ApiError::new(actix_web::http::StatusCode::CONFLICT, e.to_string()))
}
