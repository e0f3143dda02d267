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
//!
//! **Moving a share** (`repair ID --site X --to Y`): the share is rebuilt as above and
//! stored at Y under the backup's new placement (share X's index at Y, the placement's
//! version one higher); then every other site holding a share is told the new placement,
//! and the old share at X, if X answers, is removed (its agent removes a share only once the
//! placement no longer gives it to X). Until every site knows, restores take the newest
//! placement that `k` sites agree on; re-running the same command finishes a move.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use secret_buf::SecretBuf;
use serde::Serialize;
use share_transfer::wire::splits_digest;
use sharing::format::ShareHeader;
use sharing::sharing::Combiner;
use uuid::Uuid;

use super::download::{Received, ShareStreams};
use super::restore::no_spare_error;
use super::upload::Job;
use super::{BackupClient, TransferError};
use crate::config::Site;
use share_transfer::wire::{Manifest, PlacementUpdate, ShareCheck, ShareOpen};

/// Result of a repair.
#[derive(Debug, Clone, Serialize)]
pub struct RepairReport {
    pub backup_id: Uuid,
    /// The site the share was rebuilt at (Y for a move).
    pub site: String,
    pub share_index: u8,
    /// Chunks rebuilt and sent.
    pub chunks: u64,
    /// When the share was complete there: the damaged chunks rebuilt in place.
    pub damaged_chunks: Vec<u64>,
    pub seconds: f64,
    /// `(site, share index)` of the shares it was rebuilt from.
    pub from: Vec<(String, u8)>,
    /// A move: the site the share left, whether its old copy there was removed, and the
    /// sites not yet told the new placement (re-run to finish).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub moved_from: Option<Moved>,
}

/// What a move left behind.
#[derive(Debug, Clone, Serialize)]
pub struct Moved {
    pub site: String,
    pub old_share_removed: bool,
    pub placement_version: u32,
    pub not_updated: Vec<String>,
}

fn usage(m: String) -> TransferError {
    TransferError::Usage(m)
}

/// Where a repair writes and from what.
struct Plan {
    /// The site receiving the share (X, or Y for a move).
    dest: Site,
    target: u8,
    /// The manifest the share is opened with at `dest`.
    open: ShareOpen,
    /// Only these chunks (damaged at X), or the whole share.
    damaged: Option<Vec<u64>>,
    /// The share is already complete at `dest` (a move being finished).
    done: bool,
}

impl BackupClient {
    fn site_named(&self, name: &str) -> Result<Site, TransferError> {
        self.cfg
            .sites
            .iter()
            .find(|s| s.name == name)
            .cloned()
            .ok_or_else(|| usage(format!("no site {name} in the configuration")))
    }

    /// Rebuilds the share of backup `id` that belongs at site `site_name` and stores it
    /// there (or at `to`, moving it), or only its damaged chunks when the site holds it
    /// complete. Refuses when there is nothing to repair.
    pub async fn repair(
        &self,
        id: Uuid,
        site_name: &str,
        to: Option<&str>,
    ) -> Result<RepairReport, TransferError> {
        let started = Instant::now();
        let site = self.site_named(site_name)?;
        let to = to.map(|t| self.site_named(t)).transpose()?;
        if to.as_ref().is_some_and(|t| t.name == site.name) {
            return Err(usage(format!(
                "--to {site_name}: the share is at {site_name} already"
            )));
        }
        let mut found = self.find_shares(id).await;
        if found.candidates.is_empty() {
            return Err(found.nothing_error(id));
        }
        let agreed = found.agree(id)?;
        let (header, trailer) = (agreed.header, agreed.trailer);
        let k = usize::from(header.scheme.k());
        let members = found.one_epoch(agreed.members, k);
        let plan = self.plan_repair(id, &site, to.as_ref(), &members).await?;
        let target = plan.target;
        let sources: Vec<_> = members
            .into_iter()
            .filter(|(_, m)| m.share_index != target)
            .collect();
        let mut report = RepairReport {
            backup_id: id,
            site: plan.dest.name.clone(),
            share_index: target,
            chunks: 0,
            damaged_chunks: plan.damaged.clone().unwrap_or_default(),
            seconds: 0.0,
            from: Vec::new(),
            moved_from: None,
        };
        if !plan.done {
            let usable = self.usable_shares(&mut found, sources).await;
            if usable.len() < k {
                return Err(found.too_few_error(id, k, usable.len()));
            }
            let cs = header.chunk_size;
            let count = trailer.chunk_count;
            let body =
                serde_json::to_vec(&plan.open).map_err(|e| TransferError::Failed(e.to_string()))?;
            let (t, _) = self.open_share(&plan.dest, id, target, &body, cs).await?;
            // A chunk an interrupted rebuild already brought there is not sent again.
            let held = if plan.damaged.is_some() {
                HashMap::new()
            } else {
                t.held.clone()
            };
            let (tx, rx) = async_channel::bounded::<Job>(8);
            let sent = Arc::new(AtomicU64::new(0));
            let up = self.uploader(&t, id, (cs, trailer.original_len), &sent, true);
            let uploading = tokio::spawn(async move { up.run(rx).await });
            let ranges = match &plan.damaged {
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
            let mut out = SecretBuf::zeroed(cs);
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
                    report.chunks += 1;
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
                    if !report.from.contains(&u) {
                        report.from.push(u);
                    }
                }
            }
            drop(tx);
            uploading
                .await
                .map_err(|e| TransferError::Failed(e.to_string()))??;
            if plan.damaged.is_none() {
                let header = ShareHeader {
                    index: target,
                    ..header
                };
                let splits = splits_digest(nonces.iter().copied());
                self.finalize_share(&plan.dest, id, &header, &trailer, &splits)
                    .await?;
            }
        }
        if to.is_some() {
            report.moved_from = Some(self.announce_move(id, &site, target, &plan.open).await);
        }
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Which share is rebuilt, where, and how much of it.
    async fn plan_repair(
        &self,
        id: Uuid,
        site: &Site,
        to: Option<&Site>,
        members: &[(Site, Manifest)],
    ) -> Result<Plan, TransferError> {
        let open = members
            .first()
            .map(|(_, m)| m.open.clone())
            .ok_or_else(|| usage(format!("backup {id}: no agreed share")))?;
        let index_of = |s: &Site| {
            open.placement
                .iter()
                .position(|a| *a == s.agent_sae_id)
                .and_then(|i| u8::try_from(i).ok())
        };
        let holds = |s: &Site, i: u8| {
            members
                .iter()
                .any(|(x, m)| m.share_index == i && x.name == s.name)
        };
        match (index_of(site), to) {
            (Some(target), None) => {
                // A complete share there: only its damaged chunks are rebuilt (in place).
                let damaged = if holds(site, target) {
                    Some(self.damaged_chunks(site, id, target).await?)
                } else {
                    None
                };
                Ok(Plan {
                    dest: site.clone(),
                    target,
                    open,
                    damaged,
                    done: false,
                })
            }
            (Some(target), Some(y)) => {
                if let Some(j) = index_of(y) {
                    return Err(usage(format!(
                        "site {} already holds share {j} of backup {id}: a site holds one share",
                        y.name
                    )));
                }
                let mut moved = open;
                moved.placement[usize::from(target)] = y.agent_sae_id.clone();
                moved.placement_version += 1;
                Ok(Plan {
                    dest: y.clone(),
                    target,
                    open: moved,
                    damaged: None,
                    done: false,
                })
            }
            // The placement already gives the share to Y: a move being finished.
            (None, Some(y)) if index_of(y).is_some() => {
                let target = index_of(y).unwrap_or_default();
                Ok(Plan {
                    dest: y.clone(),
                    target,
                    done: holds(y, target),
                    open,
                    damaged: None,
                })
            }
            _ => Err(usage(format!(
                "backup {id} keeps no share at site {}",
                site.name
            ))),
        }
    }

    /// After share `target` moved from `from` to the site `open` names: tells every site
    /// holding a share of the backup the new placement, then removes the old share at
    /// `from`. Sites that cannot be told are listed (a re-run tells them).
    async fn announce_move(&self, id: Uuid, from: &Site, target: u8, open: &ShareOpen) -> Moved {
        let update = PlacementUpdate {
            placement: open.placement.clone(),
            placement_version: open.placement_version,
        };
        let body = serde_json::to_vec(&update).unwrap_or_default();
        let found = self.find_shares(id).await;
        let mut not_updated = Vec::new();
        for (site, m) in &found.candidates {
            if m.open.placement_version >= open.placement_version {
                continue;
            }
            let path = format!("/v1/backups/{id}/shares/{}/placement", m.share_index);
            if let Err(e) = self
                .agent_call::<Manifest>(site, reqwest::Method::PUT, &path, Some(body.clone()))
                .await
            {
                not_updated.push(format!("{}: {e}", site.name));
            }
        }
        let old_share_removed = match self
            .agent_call::<Manifest>(
                from,
                reqwest::Method::DELETE,
                &format!("/v1/backups/{id}/shares/{target}"),
                None,
            )
            .await
        {
            Ok(_) => true,
            Err(e) => {
                // Gone already (a re-run) counts as removed.
                let gone = e.to_string().contains("404");
                if !gone {
                    tracing::warn!(site = %from.name, error = %e, "the old share could not be removed");
                }
                gone
            }
        };
        Moved {
            site: from.name.clone(),
            old_share_removed,
            placement_version: open.placement_version,
            not_updated,
        }
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
            return Err(TransferError::NothingToRepair(format!(
                "site {} holds share {target} of backup {id} complete and every chunk reads                  back as recorded: nothing to repair",
                site.name
            )));
        }
        Ok(check.damaged)
    }
}

impl BackupClient {
    /// Repairs (or moves, with `to`) the share at `site` of every file of sample set
    /// `name`; files with nothing to repair are reported as such. Stops at the first file
    /// that fails (the ones before it are done).
    pub async fn repair_set(
        &self,
        name: &str,
        site: &str,
        to: Option<&str>,
        mut each: impl FnMut(usize, usize, &str),
    ) -> Result<Vec<(String, Option<RepairReport>)>, TransferError> {
        let set = self.require_set(name).await?;
        let mut out = Vec::with_capacity(set.files.len());
        for (i, f) in set.files.iter().enumerate() {
            each(i, set.files.len(), &f.path);
            match self.repair(f.backup_id, site, to).await {
                Ok(r) => out.push((f.path.clone(), Some(r))),
                Err(TransferError::NothingToRepair(_)) => out.push((f.path.clone(), None)),
                Err(e) => {
                    return Err(TransferError::Failed(format!(
                        "set {name}: {}: {e} ({i} file(s) before it done; re-run to go on)",
                        f.path
                    )))
                }
            }
        }
        Ok(out)
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
