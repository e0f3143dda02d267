//! The faithful simulator (kind `bb84`): both ends run BB84 on simulated photons
//! ([`qkd_sim::bb84`]) and the keys that reach the pools are the protocol's output.
//!
//! The producing end plays Alice: for each frame it drives the protocol through the
//! KME-to-KME channel (`POST /internal/v1/link/source`, one request per round trip) to the
//! far end's Bob; both ends end the frame holding the same privacy-amplified key, because
//! Cascade, the verification hash and the Toeplitz hash made them agree. A frame's key is
//! handed to the link in blocks of at most the size the link asks for; a block reference is
//! `<frame>:<offset>:<len>` and the far end serves each range of a frame's key once, in
//! order.
//!
//! The link's physical model still paces the source and raises the alarm (the modelled
//! QBER and the protocol's agree, see the `bb84` tests); a frame that the protocol itself
//! aborts (QBER above `abort_qber`, verification failure, no key left after privacy
//! amplification) produces nothing and the link tries again. The protocol's CPU work runs
//! on blocking threads, not on the server's event loops.

use std::sync::{Arc, Mutex};

use secret_buf::SecretBuf;
use uuid::Uuid;

use super::{BlockRef, KeySource, Produced, SourceError};
use crate::peer::PeerClient;
use qkd_sim::bb84::{Alice, Bb84Error, Bb84Params, Bob, Channel, FromBob, ToBob};

pub const KIND: &str = "bb84";

/// A frame's key being handed out in blocks.
struct FrameKey {
    frame: Uuid,
    key: SecretBuf,
    /// Bytes handed out (producer) or served (far end) so far.
    done: usize,
}

/// One end of a faithful link.
pub struct Faithful {
    params: Mutex<Bb84Params>,
    peer: PeerClient,
    /// Producer: the current frame's key.
    current: Mutex<Option<FrameKey>>,
    /// Far end: the protocol engine.
    bob: Arc<Mutex<Bob>>,
    /// Far end: the frame whose key is being served (frames are served one after the other;
    /// a newer frame abandons, and wipes, what is left of the older).
    held: Mutex<Option<FrameKey>>,
    frames: std::sync::atomic::AtomicU64,
}

impl Faithful {
    pub fn new(params: Bb84Params, peer: PeerClient) -> Result<Self, SourceError> {
        params
            .validate()
            .map_err(|e| SourceError::Failed(format!("bb84 parameters: {e}")))?;
        let bob = Bob::new(params).map_err(|e| SourceError::Failed(e.to_string()))?;
        Ok(Faithful {
            params: Mutex::new(params),
            peer,
            current: Mutex::new(None),
            bob: Arc::new(Mutex::new(bob)),
            held: Mutex::new(None),
            frames: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn failed<T>(_: T) -> SourceError {
        SourceError::Failed("bb84 source state is unusable after a panic".into())
    }

    /// Runs one frame as Alice; returns its key (possibly empty if nothing survived).
    async fn run_frame(&self) -> Result<FrameKey, SourceError> {
        let params = *self.params.lock().map_err(Self::failed)?;
        let peer = self.peer.clone();
        // The protocol's CPU work (photons, Cascade, Toeplitz) on a blocking thread, with its
        // own small runtime for the round trips to the far end.
        let handle = tokio::runtime::Handle::current();
        let outcome = tokio::task::spawn_blocking(move || {
            let mut alice = Alice::new(params)?;
            let mut ch = PeerChannel { peer };
            handle.block_on(alice.run_frame(&mut ch))
        })
        .await
        .map_err(|e| SourceError::Failed(format!("bb84 frame task: {e}")))?;
        match outcome {
            Ok(out) => {
                let n = self
                    .frames
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let s = &out.stats;
                let log = n == 0 || n.is_multiple_of(100);
                if log {
                    tracing::info!(
                        frames = n + 1,
                        detections = s.detections,
                        sifted_bits = s.sifted_bits,
                        qber_percent = format!("{:.2}", s.qber * 100.0),
                        leaked_ec_bits = s.leaked_ec_bits,
                        final_bits = s.final_bits,
                        round_trips = s.round_trips,
                        "bb84 frame done"
                    );
                } else {
                    tracing::debug!(stats = ?s, "bb84 frame done");
                }
                Ok(FrameKey {
                    frame: out.frame,
                    key: out.key.into(),
                    done: 0,
                })
            }
            Err(Bb84Error::Aborted { qber }) => Err(SourceError::Failed(format!(
                "bb84 frame aborted: QBER {:.1} % above the threshold",
                qber * 100.0
            ))),
            Err(e) => Err(SourceError::Failed(format!("bb84 frame: {e}"))),
        }
    }
}

/// Alice's side of the classical channel: one HTTPS request per round trip.
struct PeerChannel {
    peer: PeerClient,
}

impl Channel for PeerChannel {
    fn exchange(
        &mut self,
        msg: ToBob,
    ) -> impl std::future::Future<Output = Result<FromBob, Bb84Error>> + Send {
        let peer = self.peer.clone();
        async move {
            let v = serde_json::to_value(&msg).map_err(|e| Bb84Error::Channel(e.to_string()))?;
            drop(msg);
            let reply = peer
                .source_message(&v)
                .await
                .map_err(|e| Bb84Error::Channel(e.to_string()))?;
            serde_json::from_value(reply).map_err(|e| Bb84Error::Channel(e.to_string()))
        }
    }
}

fn encode(frame: Uuid, offset: usize, len: usize) -> String {
    format!("{frame}:{offset}:{len}")
}

fn decode(detail: &str) -> Option<(Uuid, usize, usize)> {
    let mut p = detail.split(':');
    let frame = Uuid::try_parse(p.next()?).ok()?;
    let offset = p.next()?.parse().ok()?;
    let len = p.next()?.parse().ok()?;
    p.next().is_none().then_some((frame, offset, len))
}

#[async_trait::async_trait]
impl KeySource for Faithful {
    fn kind(&self) -> &'static str {
        KIND
    }

    fn modelled(&self) -> bool {
        true
    }

    async fn next_block(&self, max_len: usize) -> Result<Option<Produced>, SourceError> {
        if max_len == 0 {
            return Ok(None);
        }
        let have = self
            .current
            .lock()
            .map_err(Self::failed)?
            .as_ref()
            .is_some_and(|f| f.done < f.key.len());
        if !have {
            let fresh = self.run_frame().await?;
            if fresh.key.is_empty() {
                return Ok(None);
            }
            *self.current.lock().map_err(Self::failed)? = Some(fresh);
        }
        let mut cur = self.current.lock().map_err(Self::failed)?;
        let Some(f) = cur.as_mut() else {
            return Ok(None);
        };
        let len = max_len.min(f.key.len() - f.done);
        let data = SecretBuf::from(f.key[f.done..f.done + len].to_vec());
        let reference = BlockRef {
            source: KIND.into(),
            detail: encode(f.frame, f.done, len),
        };
        f.done += len;
        if f.done == f.key.len() {
            *cur = None; // wipes the frame's key
        }
        Ok(Some(Produced { reference, data }))
    }

    async fn fetch_block(
        &self,
        reference: &BlockRef,
        len: usize,
    ) -> Result<SecretBuf, SourceError> {
        let (frame, offset, n) = decode(&reference.detail)
            .ok_or_else(|| SourceError::BadReference("malformed bb84 block".into()))?;
        if n != len || len == 0 {
            return Err(SourceError::BadReference(format!(
                "block length {len} does not match its reference ({n})"
            )));
        }
        let mut held = self.held.lock().map_err(Self::failed)?;
        if held.as_ref().is_none_or(|f| f.frame != frame) {
            let key = self
                .bob
                .lock()
                .map_err(Self::failed)?
                .take_key(frame)
                .ok_or_else(|| SourceError::Gone(format!("no finished bb84 frame {frame}")))?;
            *held = Some(FrameKey {
                frame,
                key: key.into(),
                done: 0,
            });
        }
        let Some(f) = held.as_mut() else {
            return Err(SourceError::Gone(format!("no finished bb84 frame {frame}")));
        };
        if offset < f.done {
            return Err(SourceError::Gone(format!(
                "range {offset}+{len} of frame {frame} was already served"
            )));
        }
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= f.key.len())
            .ok_or_else(|| SourceError::BadReference("range beyond the frame's key".into()))?;
        let data = SecretBuf::from(f.key[offset..end].to_vec());
        f.done = end;
        if f.done == f.key.len() {
            *held = None;
        }
        Ok(data)
    }

    async fn peer_message(
        &self,
        message: serde_json::Value,
    ) -> Result<serde_json::Value, SourceError> {
        let msg: ToBob = serde_json::from_value(message)
            .map_err(|e| SourceError::BadReference(format!("bb84 message: {e}")))?;
        let bob = self.bob.clone();
        let reply = tokio::task::spawn_blocking(move || {
            let mut bob = bob
                .lock()
                .map_err(|_| Bb84Error::Protocol("bb84 state unusable after a panic".into()))?;
            bob.handle(msg)
        })
        .await
        .map_err(|e| SourceError::Failed(format!("bb84 task: {e}")))?
        .map_err(|e| SourceError::Failed(e.to_string()))?;
        serde_json::to_value(&reply).map_err(|e| SourceError::Failed(e.to_string()))
    }

    fn set_eavesdropper(&self, fraction: f64) {
        if let Ok(mut p) = self.params.lock() {
            p.eavesdropper = fraction;
        }
    }
}
