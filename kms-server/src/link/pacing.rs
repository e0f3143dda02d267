//! Pacing a link at its modelled rate, and when to top a pool up.

use std::time::Duration;

use crate::config::LinkParams;
use crate::service::Kme;

/// Paces a producer to `rate` bytes per second (0 = unlimited): a block becomes available
/// only after the time the link needs to produce it.
pub(super) struct Pacer {
    /// Bytes per second (0 = unlimited); the physical model updates it.
    pub(super) rate: u64,
    /// Bytes that may still be produced without waiting (the prefill).
    burst: u64,
    /// When the link finishes producing what was asked so far.
    next: tokio::time::Instant,
}

impl Pacer {
    pub(super) fn new(params: &LinkParams, prefill_bytes: u64) -> Self {
        Pacer {
            rate: params.rate_bytes_per_sec,
            burst: if params.prefill { prefill_bytes } else { 0 },
            next: tokio::time::Instant::now(),
        }
    }

    /// Waits until the link has produced `bytes` more. Returns true if they came out of
    /// the prefill (so a failed delivery can give them back with [`Pacer::refund`]).
    pub(super) async fn produce(&mut self, bytes: usize) -> bool {
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
    pub(super) fn refund(&mut self, bytes: usize) {
        self.burst += bytes as u64;
    }
}

/// Waits until key is consumed (or 200 ms pass).
pub(super) async fn wait_for_room(kme: &Kme) {
    let _ = tokio::time::timeout(Duration::from_millis(200), kme.consumed.notified()).await;
}

/// A pool is topped up once it has room for a whole block (or a quarter of its capacity, if
/// smaller): not for every key taken, which would move many tiny blocks.
pub(super) fn refill_threshold(cap: u64, block_bytes: usize) -> u64 {
    (block_bytes as u64).min(cap / 4).max(1)
}
