//! The far end of a link: receiving a block the producer announced, obtaining the same
//! bytes from this end's side of the key source, and making them durable.

use std::sync::Arc;

use secret_buf::SecretBuf;

use super::sync::check_producer;
use crate::peer::{BlockAnnounce, BlockRef};
use crate::pool::{Direction, State, StreamId, MAX_OFFSET};
use crate::service::{Durable, Kme, KmeError};
use crate::source::{KeySource, SourceError};

fn source_error(e: SourceError) -> KmeError {
    match e {
        SourceError::NotYet(m) => KmeError::unavailable(format!("key not available here yet: {m}")),
        SourceError::Gone(m) => KmeError::gone(format!("key gone: {m}")),
        SourceError::BadReference(m) => KmeError::bad_request(format!("bad block reference: {m}")),
        SourceError::Failed(m) => KmeError::unavailable(format!("key source: {m}")),
    }
}

/// The far end receives one block announcement of the link to `from_kme`: a heartbeat
/// updates the link's modelled state; a block is checked (`place_block`), its bytes
/// fetched from this end's source, appended (`append_fetched`) and acknowledged once the
/// durable write is queued (`release_when_durable`).
pub async fn receive_block(
    kme: &Kme,
    from_kme: &str,
    block: &BlockAnnounce,
) -> Result<(), KmeError> {
    check_producer(kme, from_kme)?;
    if block
        .offset
        .checked_add(block.len)
        .is_none_or(|e| e > MAX_OFFSET)
    {
        return Err(KmeError::bad_request("block offset out of range"));
    }
    note_link_state(kme, from_kme, block)?;
    if block.len == 0 {
        // A heartbeat: only the link's state (e.g. an alarm) is reported.
        tracing::debug!(peer = from_kme, perf = ?block.perf, "link heartbeat");
        return Ok(());
    }
    let placed = place_block(kme, from_kme, block)?;
    // Check the position and the room before asking the source (which may consume device
    // key): a block that cannot be appended is refused without touching the source.
    placed.check(kme, &*kme.lock()?)?;
    let data = placed
        .source
        .fetch_block(placed.reference, placed.len)
        .await
        .map_err(source_error)?;
    if data.len() != placed.len {
        return Err(KmeError::bad_request(
            "key source returned a block of the wrong length",
        ));
    }
    let durable = match append_fetched(kme, &placed, data) {
        Ok(d) => d,
        Err(e) => {
            let _ = placed.source.release(placed.reference).await;
            return Err(e);
        }
    };
    release_when_durable(&placed, durable);
    kme.metrics.generated(from_kme, placed.len as u64);
    Ok(())
}

/// Records the link's modelled state the producer reports; refuses anything but a
/// reconciled link.
fn note_link_state(kme: &Kme, from_kme: &str, block: &BlockAnnounce) -> Result<(), KmeError> {
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
    Ok(())
}

/// A block announcement checked for its owner, length, reference and source kind.
struct Placed<'a> {
    peer: &'a str,
    direction: Direction,
    offset: u64,
    len: usize,
    reference: &'a BlockRef,
    source: &'a Arc<dyn KeySource>,
}

/// Where the announced block goes here, and how to obtain its bytes.
fn place_block<'a>(
    kme: &'a Kme,
    from_kme: &'a str,
    block: &'a BlockAnnounce,
) -> Result<Placed<'a>, KmeError> {
    let direction = if block.owner == from_kme {
        Direction::Theirs
    } else if block.owner == kme.kme_id() {
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
    Ok(Placed {
        peer: from_kme,
        direction,
        offset: block.offset,
        len,
        reference,
        source,
    })
}

impl Placed<'_> {
    /// The block follows the end of its stream on a reconciled link, and fits.
    fn check(&self, kme: &Kme, st: &State) -> Result<(), KmeError> {
        let link = st
            .links
            .get(self.peer)
            .ok_or_else(|| KmeError::unauthorized(format!("no link with KME {}", self.peer)))?;
        let stream = link.stream(self.direction);
        if !link.synced() || stream.end() != self.offset {
            return Err(KmeError::not_synchronised(format!(
                "block at offset {} does not follow the stream end {}; synchronise",
                self.offset,
                stream.end()
            )));
        }
        if stream.unconsumed() + self.len as u64 > 2 * kme.capacity_bytes() {
            return Err(KmeError::unavailable("pool full"));
        }
        Ok(())
    }
}

/// Appends the fetched bytes if the stream has not moved meanwhile (a synchronisation);
/// otherwise they are dropped (wiped).
fn append_fetched(kme: &Kme, placed: &Placed<'_>, data: SecretBuf) -> Result<Durable, KmeError> {
    let mut st = kme.lock()?;
    placed.check(kme, &st)?;
    let id = StreamId::link(placed.peer, placed.direction);
    kme.append_durable(&mut st, &id, placed.offset, data)
}

/// Acknowledged once queued, not once durable: the store commits in order, so whatever
/// later refers to these bytes (an allocation here, a registration from the peer) becomes
/// durable only after them; a crash before that leaves this end shorter, which the next
/// synchronisation discards. The source's copy is released only once the block is durable.
fn release_when_durable(placed: &Placed<'_>, durable: Durable) {
    let source = placed.source.clone();
    let reference = placed.reference.clone();
    let peer = placed.peer.to_owned();
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
}
