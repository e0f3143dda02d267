//! The local pool: keys between SAEs attached to this KME, from ChaCha8 seeded by the OS.

use std::sync::Arc;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use secret_buf::SecretBuf;

use super::pacing::{refill_threshold, wait_for_room, Pacer};
use crate::config::LinkParams;
use crate::pool::StreamId;
use crate::service::Kme;

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
        let mut block = SecretBuf::zeroed(len);
        rng.fill_bytes(&mut block);
        let durable = {
            let Ok(mut st) = kme.lock() else { return };
            let end = st.local.end();
            match kme.append_durable(&mut st, &StreamId::Local, end, block) {
                Ok(d) => d,
                Err(_) => continue,
            }
        };
        if let Err(e) = durable.await {
            tracing::error!(error = %e.body.message, "local key pool: store failed");
            return;
        }
        kme.metrics.generated("local", len as u64);
    }
}
