//! Share repair (`repair ID --site X`): the share that belongs at site X, lost there, is
//! rebuilt from k healthy shares and sent to X again.
//!
//! Who sees what:
//! - **This client (the data's owner)** downloads k shares, each one-time-padded and tagged
//!   by its site's agent for this client, and computes share X from them
//!   ([`sharing::sharing::Combiner::regenerating`]: XOR of share pieces for the XOR scheme,
//!   Lagrange interpolation at X's coordinate for Shamir). It holds k shares, as it does in
//!   every restore; it never writes the file.
//! - **Each source site** sends its own share, as for a restore: it learns that a repair or
//!   a restore happened, nothing else.
//! - **Site X** receives share X chunk by chunk under one-time pad and Wegman–Carter tag,
//!   exactly as at store time, with the same split nonces, and checks it like any upload;
//!   it never sees another share.
//! - **The KMEs** deliver keys, as for any store and restore.
//!
//! The share is reopened at X with the manifest the other shares agree on, so a repaired
//! share is indistinguishable from the original one.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use share_transfer::wire::splits_digest;
use sharing::format::ShareHeader;
use sharing::sharing::Combiner;
use uuid::Uuid;
use zeroize::Zeroizing;

use super::download::{Received, ShareStreams};
use super::restore::no_spare_error;
use super::upload::Job;
use super::{BackupClient, TransferError};

/// Result of a repair.
#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    pub backup_id: Uuid,
    pub site: String,
    pub share_index: u8,
    pub chunks: u64,
    pub seconds: f64,
    /// `(site, share index)` of the shares it was rebuilt from.
    pub from: Vec<(String, u8)>,
}

fn usage(m: String) -> TransferError {
    TransferError::Usage(m)
}

impl BackupClient {
    /// Rebuilds the share of backup `id` that belongs at site `site_name` and stores it
    /// there. Refuses when that site still holds it complete (see `verify`).
    pub async fn repair(&self, id: Uuid, site_name: &str) -> Result<RepairReport, TransferError> {
        let started = Instant::now();
        let site = self
            .cfg
            .sites
            .iter()
            .find(|s| s.name == site_name)
            .cloned()
            .ok_or_else(|| usage(format!("no site {site_name} in the configuration")))?;
        let mut found = self.find_shares(id).await;
        if found.candidates.is_empty() {
            return Err(found.nothing_error(id));
        }
        let agreed = found.agree(id)?;
        let (header, trailer) = (agreed.header, agreed.trailer);
        let k = usize::from(header.scheme.k());
        let members = found.one_epoch(agreed.members, k);
        let open = members
            .first()
            .map(|(_, m)| m.open.clone())
            .ok_or_else(|| found.nothing_error(id))?;
        let target = open
            .placement
            .iter()
            .position(|a| *a == site.agent_sae_id)
            .and_then(|i| u8::try_from(i).ok())
            .ok_or_else(|| usage(format!("backup {id} keeps no share at site {site_name}")))?;
        if members
            .iter()
            .any(|(s, m)| m.share_index == target && s.name == site.name)
        {
            return Err(usage(format!(
                "site {site_name} holds share {target} of backup {id} complete: nothing to repair \
                 (`verify {id}` checks its chunks; a damaged complete share cannot be repaired in place yet)"
            )));
        }
        let sources: Vec<_> = members
            .into_iter()
            .filter(|(_, m)| m.share_index != target)
            .collect();
        let usable = self.usable_shares(&mut found, sources).await;
        if usable.len() < k {
            return Err(found.too_few_error(id, k, usable.len()));
        }
        let cs = header.chunk_size;
        let body = serde_json::to_vec(&open).map_err(|e| TransferError::Failed(e.to_string()))?;
        let (t, _) = self.open_share(&site, id, target, &body, cs).await?;
        let held = t.held.clone();
        let (tx, rx) = async_channel::bounded::<Job>(8);
        let sent = Arc::new(AtomicU64::new(0));
        let up = self.uploader(&t, id, (cs, trailer.original_len), &sent, true);
        let uploading = tokio::spawn(async move { up.run(rx).await });
        let count = trailer.chunk_count;
        self.progress
            .total
            .store(trailer.original_len, std::sync::atomic::Ordering::Relaxed);
        self.progress
            .done
            .store(0, std::sync::atomic::Ordering::Relaxed);
        let mut streams = ShareStreams::start(self, id, cs, count, usable, k, 0);
        let mut combiner = Combiner::regenerating(header.scheme, cs, &streams.subset(), target)?;
        let mut nonces = Vec::with_capacity(count as usize);
        let mut out = Zeroizing::new(vec![0u8; cs]);
        for j in 0..count {
            let Received {
                pieces,
                nonce,
                replaced,
            } = match streams.receive(j, k, &mut found.rejected).await {
                Ok(r) => r,
                Err(_) => return Err(no_spare_error(id, j, k, &found.rejected)),
            };
            if replaced {
                combiner = Combiner::regenerating(header.scheme, cs, &streams.subset(), target)?;
            }
            combiner.combine_chunk(&pieces, &mut out)?;
            nonces.push((j, nonce));
            // A chunk an interrupted repair already brought there is not sent again.
            if held.get(&j) == Some(&nonce) {
                continue;
            }
            let job = Job {
                chunk: j,
                nonce,
                data: out.to_vec(),
            };
            if tx.send(job).await.is_err() {
                break;
            }
        }
        let from: Vec<(String, u8)> = streams.used();
        drop(streams);
        drop(tx);
        uploading
            .await
            .map_err(|e| TransferError::Failed(e.to_string()))??;
        let header = ShareHeader {
            index: target,
            ..header
        };
        let splits = splits_digest(nonces.iter().copied());
        self.finalize_share(&site, id, &header, &trailer, &splits)
            .await?;
        Ok(RepairReport {
            backup_id: id,
            site: site.name,
            share_index: target,
            chunks: count,
            seconds: started.elapsed().as_secs_f64(),
            from,
        })
    }
}
