//! Reconciling a link's two ends: at start and after any failure, both directions continue
//! at the larger of the two ends' offsets and both ends discard the link's free bytes.

use crate::peer::{SyncReply, SyncRequest};
use crate::pool::store::Batch;
use crate::pool::{LinkPhase, StreamId, MAX_OFFSET};
use crate::service::{Kme, KmeError};

/// Marks the link to `peer` as needing a synchronisation (stops serving its keys).
pub(super) fn unsync(kme: &Kme, peer: &str) {
    if let Ok(mut st) = kme.lock() {
        if let Some(l) = st.links.get_mut(peer) {
            l.phase = LinkPhase::Unsynced;
        }
    }
}

/// Applies an agreed synchronisation at this end: both directions discard their free bytes
/// and continue at the agreed offsets. `producer_end` is the end of the producer's own
/// direction. Durable before it returns.
async fn apply_sync(kme: &Kme, peer: &str, own_end: u64, theirs_end: u64) -> Result<(), KmeError> {
    let (own, theirs) = (StreamId::own(peer), StreamId::theirs(peer));
    let durable = {
        let mut st = kme.lock()?;
        let link = st
            .links
            .get_mut(peer)
            .ok_or_else(|| KmeError::unauthorized(format!("no link with KME {peer}")))?;
        let mut batch = Batch::default();
        for (r0, r1) in link.own.discard_free_and_skip(own_end) {
            batch.wipes.push((own.name(), r0, r1 - r0));
        }
        for (r0, r1) in link.theirs.discard_free_and_skip(theirs_end) {
            batch.wipes.push((theirs.name(), r0, r1 - r0));
        }
        batch.streams.push((own.name(), link.own.meta()));
        batch.streams.push((theirs.name(), link.theirs.meta()));
        link.phase = LinkPhase::Synced;
        kme.persist(batch)
    };
    let r = durable.await;
    if r.is_err() {
        unsync(kme, peer);
    }
    r
}

/// Only a link's producing end (the smaller KME ID) announces blocks and synchronises.
pub(super) fn check_producer(kme: &Kme, from_kme: &str) -> Result<(), KmeError> {
    if from_kme < kme.kme_id() {
        Ok(())
    } else {
        Err(KmeError::bad_request(format!(
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
) -> Result<SyncReply, KmeError> {
    check_producer(kme, from_kme)?;
    if req.producer_end > MAX_OFFSET || req.far_end > MAX_OFFSET {
        return Err(KmeError::bad_request("stream offset out of range"));
    }
    let (mine, theirs) = {
        let st = kme.lock()?;
        let link = st
            .links
            .get(from_kme)
            .ok_or_else(|| KmeError::unauthorized(format!("no link with KME {from_kme}")))?;
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
pub(super) async fn sync_with(kme: &Kme, peer: &str) -> Result<(), String> {
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
