//! Share repair (`repair ID --site X`): the share that belongs at site X, lost there, is
//! rebuilt from k healthy shares and sent to X again; if X still holds it complete with
//! damaged chunks (its agent re-reads them against their records), only those chunks are
//! rebuilt, and X accepts each only if it is exactly the bytes its record describes (same
//! split nonce, same BLAKE3): a complete share can only get back what it held.
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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
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
use crate::config::Site;
use share_transfer::wire::ShareCheck;

/// Result of a repair.
#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    pub backup_id: Uuid,
    pub site: String,
    pub share_index: u8,
    /// Chunks rebuilt and sent.
    pub chunks: u64,
    /// When the share was complete there: the damaged chunks rebuilt in place.
    pub damaged_chunks: Vec<u64>,
    pub seconds: f64,
    /// `(site, share index)` of the shares it was rebuilt from.
    pub from: Vec<(String, u8)>,
}

fn usage(m: String) -> TransferError {
    TransferError::Usage(m)
}

impl BackupClient {
    /// Rebuilds the share of backup `id` that belongs at site `site_name` and stores it
    /// there, or only its damaged chunks when the site holds it complete. Refuses when
    /// there is nothing to repair.
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
        let holds_it = members
            .iter()
            .any(|(s, m)| m.share_index == target && s.name == site.name);
        // A complete share there: only its damaged chunks are rebuilt (in place).
        let damaged = if holds_it {
            Some(self.damaged_chunks(&site, id, target).await?)
        } else {
            None
        };
        let sources: Vec<_> = members
            .into_iter()
            .filter(|(_, m)| m.share_index != target)
            .collect();
        let usable = self.usable_shares(&mut found, sources).await;
        if usable.len() < k {
            return Err(found.too_few_error(id, k, usable.len()));
        }
        let cs = header.chunk_size;
        let count = trailer.chunk_count;
        let body = serde_json::to_vec(&open).map_err(|e| TransferError::Failed(e.to_string()))?;
        let (t, _) = self.open_share(&site, id, target, &body, cs).await?;
        // A chunk an interrupted rebuild already brought there is not sent again.
        let held = if damaged.is_some() {
            HashMap::new()
        } else {
            t.held.clone()
        };
        let (tx, rx) = async_channel::bounded::<Job>(8);
        let sent = Arc::new(AtomicU64::new(0));
        let up = self.uploader(&t, id, (cs, trailer.original_len), &sent, true);
        let uploading = tokio::spawn(async move { up.run(rx).await });
        let ranges = match &damaged {
            Some(chunks) => ranges_of(chunks),
            None => vec![(0, count)],
        };
        let bytes: u64 = ranges
            .iter()
            .map(|&(a, b)| (b - a) * cs as u64)
            .sum::<u64>()
            .min(trailer.original_len);
        self.progress.total.store(bytes, Ordering::Relaxed);
        self.progress.done.store(0, Ordering::Relaxed);
        let mut nonces = Vec::with_capacity(count as usize);
        let mut from = Vec::new();
        let mut out = Zeroizing::new(vec![0u8; cs]);
        'ranges: for (first, end) in ranges {
            let mut streams = ShareStreams::start(self, id, cs, end, usable.clone(), k, first);
            let mut combiner =
                Combiner::regenerating(header.scheme, cs, &streams.subset(), target)?;
            for j in first..end {
                let Received {
                    pieces,
                    nonce,
                    replaced,
                } = match streams.receive(j, k, &mut found.rejected).await {
                    Ok(r) => r,
                    Err(_) => return Err(no_spare_error(id, j, k, &found.rejected)),
                };
                if replaced {
                    combiner =
                        Combiner::regenerating(header.scheme, cs, &streams.subset(), target)?;
                }
                combiner.combine_chunk(&pieces, &mut out)?;
                nonces.push((j, nonce));
                if held.get(&j) == Some(&nonce) {
                    continue;
                }
                let job = Job {
                    chunk: j,
                    nonce,
                    data: out.to_vec(),
                };
                if tx.send(job).await.is_err() {
                    break 'ranges;
                }
            }
            for u in streams.used() {
                if !from.contains(&u) {
                    from.push(u);
                }
            }
        }
        drop(tx);
        uploading
            .await
            .map_err(|e| TransferError::Failed(e.to_string()))??;
        if damaged.is_none() {
            let header = ShareHeader {
                index: target,
                ..header
            };
            let splits = splits_digest(nonces.iter().copied());
            self.finalize_share(&site, id, &header, &trailer, &splits)
                .await?;
        }
        Ok(RepairReport {
            backup_id: id,
            site: site.name,
            share_index: target,
            chunks: damaged.as_ref().map_or(count, |d| d.len() as u64),
            damaged_chunks: damaged.unwrap_or_default(),
            seconds: started.elapsed().as_secs_f64(),
            from,
        })
    }

    /// The damaged chunks of share `target` of backup `id`, complete at `site` (its agent
    /// re-reads them); refuses when there are none, or when chunks have no record at all.
    async fn damaged_chunks(
        &self,
        site: &Site,
        id: Uuid,
        target: u8,
    ) -> Result<Vec<u64>, TransferError> {
        let checks: Vec<ShareCheck> = self
            .agent_call(
                site,
                reqwest::Method::POST,
                &format!("/v1/backups/{id}/verify"),
                None,
            )
            .await?;
        let check = checks
            .into_iter()
            .find(|c| c.share_index == target)
            .ok_or_else(|| usage(format!("site {} no longer lists share {target}", site.name)))?;
        if !check.missing.is_empty() {
            return Err(usage(format!(
                "share {target} of backup {id} at site {} has no record of chunks {:?}: it                  cannot be mended in place; remove the share there and run repair again to                  rebuild it whole",
                site.name, check.missing
            )));
        }
        if check.damaged.is_empty() {
            return Err(usage(format!(
                "site {} holds share {target} of backup {id} complete and every chunk reads                  back as recorded: nothing to repair",
                site.name
            )));
        }
        Ok(check.damaged)
    }
}

/// Sorted chunk indices as half-open ranges of consecutive chunks.
fn ranges_of(chunks: &[u64]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &j in chunks {
        match out.last_mut() {
            Some(r) if r.1 == j => r.1 = j + 1,
            _ => out.push((j, j + 1)),
        }
    }
    out
}
