//! The far end of a link: receiving a block the producer announced, obtaining the same
//! bytes from this end's side of the key source, and making them durable.

use super::sync::check_producer;
use crate::peer::BlockAnnounce;
use crate::pool::{Direction, State, StreamId, MAX_OFFSET};
use crate::service::{Kme, KmeError};
use crate::source::SourceError;

fn source_error(e: SourceError) -> KmeError {
    match e {
        SourceError::NotYet(m) => KmeError::unavailable(format!("key not available here yet: {m}")),
        SourceError::Gone(m) => KmeError::gone(format!("key gone: {m}")),
        SourceError::BadReference(m) => KmeError::bad_request(format!("bad block reference: {m}")),
        SourceError::Failed(m) => KmeError::unavailable(format!("key source: {m}")),
    }
}

/// The far end receives one block announcement of the link to `from_kme`; returns once the
/// block is durable here.
pub async fn receive_block(
    kme: &Kme,
    from_kme: &str,
    block: &BlockAnnounce,
) -> Result<(), KmeError> {
    let me = kme.kme_id().to_owned();
    check_producer(kme, from_kme)?;
    if block
        .offset
        .checked_add(block.len)
        .is_none_or(|e| e > MAX_OFFSET)
    {
        return Err(KmeError::bad_request("block offset out of range"));
    }
    {
        let mut st = kme.lock()?;
        let link = st
            .links
            .get_mut(from_kme)
            .ok_or_else(|| KmeError::unauthorized(format!("no link with KME {from_kme}")))?;
        if block.perf.is_some() {
            link.perf = block.perf;
        }
        if !link.synced() {
            return Err(KmeError::not_synchronised(
                "link not synchronised since this KME started; synchronise first",
            ));
        }
    }
    if block.len == 0 {
        // A heartbeat: only the link's state (e.g. an alarm) is reported.
        tracing::debug!(peer = from_kme, perf = ?block.perf, "link heartbeat");
        return Ok(());
    }
    let direction = if block.owner == from_kme {
        Direction::Theirs
    } else if block.owner == me {
        Direction::Own
    } else {
        return Err(KmeError::bad_request(format!(
            "unknown block owner {:?}",
            block.owner
        )));
    };
    let len = usize::try_from(block.len)
        .ok()
        .filter(|&l| l > 0 && l <= 16 << 20)
        .ok_or_else(|| KmeError::bad_request("block length out of range"))?;
    let reference = block
        .reference
        .as_ref()
        .ok_or_else(|| KmeError::bad_request("block without a reference"))?;
    let source = kme
        .source(from_kme)
        .ok_or_else(|| KmeError::unauthorized(format!("no link with KME {from_kme}")))?;
    if reference.source != source.kind() {
        return Err(KmeError::bad_request(format!(
            "block from a {:?} source; this end of the link uses {:?}",
            reference.source,
            source.kind()
        )));
    }
    // Check the position and the room before asking the source (which may consume device
    // key): a block that cannot be appended is refused without touching the source.
    let cap = kme.capacity_bytes();
    let check = |st: &State| -> Result<(), KmeError> {
        let link = st
            .links
            .get(from_kme)
            .ok_or_else(|| KmeError::unauthorized(format!("no link with KME {from_kme}")))?;
        let stream = link.stream(direction);
        if !link.synced() || stream.end() != block.offset {
            return Err(KmeError::not_synchronised(format!(
                "block at offset {} does not follow the stream end {}; synchronise",
                block.offset,
                stream.end()
            )));
        }
        if stream.unconsumed() + block.len > 2 * cap {
            return Err(KmeError::unavailable("pool full"));
        }
        Ok(())
    };
    check(&*kme.lock()?)?;
    let data = source
        .fetch_block(reference, len)
        .await
        .map_err(source_error)?;
    if data.len() != len {
        return Err(KmeError::bad_request(
            "key source returned a block of the wrong length",
        ));
    }
    let appended = {
        let mut st = kme.lock()?;
        // Moved meanwhile (a synchronisation): the fetched bytes are dropped (wiped).
        check(&st).and_then(|()| {
            let id = StreamId::link(from_kme, direction);
            kme.append_durable(&mut st, &id, block.offset, data)
        })
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
