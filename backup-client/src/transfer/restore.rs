//! The restore command, in its steps:
//!
//! 1. **find** ([`BackupClient::find_shares`]) — ask every site (this one first) for the
//!    backup's manifests;
//! 2. **choose** ([`BackupClient::usable_shares`]) — keep the shares of the same set as the
//!    first complete one, one per index, with QKD keys to their site;
//! 3. **resume** (`resume::PartialOutput`) — open `<out>.partial`, continuing after its last
//!    checkpoint if it is of this backup;
//! 4. **download and combine** ([`BackupClient::download_and_combine`]) — `k` share streams
//!    (see `download`), chunk by chunk, into the partial file;
//! 5. **verify and rename** — the whole-file digest must match before the partial file is
//!    renamed over the output.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use uuid::Uuid;
use zeroize::Zeroizing;

use super::download::{NoSpare, Received, ShareSource, ShareStreams};
use super::resume::PartialOutput;
use super::{BackupClient, RestoreReport, TransferError};
use crate::config::Site;
use share_transfer::wire::Manifest;
use sharing::format::{ShareHeader, ShareTrailer, HEADER_LEN, TRAILER_LEN};
use sharing::sharing::Combiner;

/// The shares of a backup as found at the sites.
struct Found {
    /// Complete shares, this site's first.
    candidates: Vec<(Site, Manifest)>,
    /// `(site, share index, why)` of every share that cannot be used.
    rejected: Vec<(String, u8, String)>,
    /// Sites that could not be asked, with why.
    unreachable: Vec<String>,
}

impl Found {
    /// Why nothing can be restored when no complete share was found.
    fn nothing_error(&self, id: Uuid) -> TransferError {
        TransferError::Usage(if self.rejected.is_empty() && self.unreachable.is_empty() {
            format!(
                "unknown backup ID {id}: no site holds a share of it (see `backup-client list`)"
            )
        } else {
            format!(
                "backup {id} cannot be restored: no complete share is reachable ({})",
                self.unreachable
                    .iter()
                    .cloned()
                    .chain(
                        self.rejected
                            .iter()
                            .map(|(s, i, r)| format!("share {i} at {s}: {r}"))
                    )
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        })
    }

    /// Why fewer than `k` shares are usable.
    fn too_few_error(&self, id: Uuid, k: usize, usable: usize) -> TransferError {
        TransferError::Failed(format!(
            "backup {id} needs {k} shares, only {usable} are usable: {}",
            self.rejected
                .iter()
                .map(|(s, i, r)| format!("share {i} at {s}: {r}"))
                .chain(self.unreachable.iter().cloned())
                .collect::<Vec<_>>()
                .join("; ")
        ))
    }
}

impl BackupClient {
    /// Restores backup `id` into `out` (atomically: temp file, digest check, rename).
    pub async fn restore(&self, id: Uuid, out: &Path) -> Result<RestoreReport, TransferError> {
        let started = Instant::now();
        let mut found = self.find_shares(id).await;
        let Some((_, first)) = found.candidates.first().cloned() else {
            return Err(found.nothing_error(id));
        };
        let (header, trailer) = decode_ends(&first)?;
        let k = header.scheme.k() as usize;
        let usable = self.usable_shares(&mut found, &header, &trailer).await;
        if usable.len() < k {
            return Err(found.too_few_error(id, k, usable.len()));
        }
        let cs = header.chunk_size;
        let mut output =
            PartialOutput::open(out, id, trailer.chunk_count, trailer.original_len, cs)?;
        let start_chunk = output.start_chunk;
        self.progress
            .total
            .store(trailer.original_len, Ordering::Relaxed);
        self.progress.done.store(
            (start_chunk * cs as u64).min(trailer.original_len),
            Ordering::Relaxed,
        );
        let used = self
            .download_and_combine(id, &header, &trailer, usable, &mut output, &mut found)
            .await?;
        let output = output.commit(id, &trailer.digest, out)?;
        Ok(RestoreReport {
            backup_id: id,
            output,
            bytes: trailer.original_len,
            seconds: started.elapsed().as_secs_f64(),
            resumed_at_chunk: start_chunk,
            used,
            rejected: found.rejected,
        })
    }

    /// Step 1: the manifests of backup `id` at every site, this site first.
    async fn find_shares(&self, id: Uuid) -> Found {
        let mut found = Found {
            candidates: Vec::new(),
            rejected: Vec::new(),
            unreachable: Vec::new(),
        };
        let mut sites = self.cfg.sites.clone();
        sites.sort_by_key(|s| s.name != self.cfg.site); // this site first
        for site in &sites {
            match self
                .agent_call::<Vec<Manifest>>(
                    site,
                    reqwest::Method::GET,
                    &format!("/v1/backups/{id}"),
                    None,
                )
                .await
            {
                Ok(ms) => {
                    for m in ms {
                        if m.complete {
                            found.candidates.push((site.clone(), m));
                        } else {
                            found.rejected.push((
                                site.name.clone(),
                                m.share_index,
                                "share is incomplete".into(),
                            ));
                        }
                    }
                }
                Err(e) => found.unreachable.push(e.to_string()),
            }
        }
        found
    }

    /// Step 2: the candidates consistent with the first share's header and trailer, one per
    /// share index, with QKD keys to their site; the others go to `found.rejected`.
    async fn usable_shares(
        &self,
        found: &mut Found,
        header: &ShareHeader,
        trailer: &ShareTrailer,
    ) -> Vec<ShareSource> {
        let mut usable: Vec<ShareSource> = Vec::new();
        for (site, m) in &found.candidates {
            let reject = match decode_ends(m) {
                Ok((h, t))
                    if h.set_id == header.set_id && h.scheme == header.scheme && t == *trailer =>
                {
                    None
                }
                Ok(_) => Some("belongs to another share set".to_owned()),
                Err(e) => Some(e.to_string()),
            };
            if let Some(why) = reject {
                found.rejected.push((site.name.clone(), m.share_index, why));
                continue;
            }
            if usable.iter().any(|u| u.share == m.share_index) {
                continue;
            }
            match self.keys.status(&site.agent_sae_id).await {
                Ok(st) => usable.push(ShareSource {
                    site: site.clone(),
                    share: m.share_index,
                    max_per_request: st.max_key_per_request as usize,
                }),
                Err(e) => found.rejected.push((
                    site.name.clone(),
                    m.share_index,
                    format!("no QKD keys between this site and site {}: {e}", site.name),
                )),
            }
        }
        usable
    }

    /// Step 4: rebuilds chunks `output.start_chunk..` from `k` of the `usable` shares into
    /// `output`; returns the `(site, share)` pairs that delivered the last chunk.
    async fn download_and_combine(
        &self,
        id: Uuid,
        header: &ShareHeader,
        trailer: &ShareTrailer,
        usable: Vec<ShareSource>,
        output: &mut PartialOutput,
        found: &mut Found,
    ) -> Result<Vec<(String, u8)>, TransferError> {
        let scheme = header.scheme;
        let k = scheme.k() as usize;
        let cs = header.chunk_size;
        let count = trailer.chunk_count;
        let from = output.start_chunk;
        // Streams from k shares; replace a failing one from the chunk where it failed.
        let mut streams = ShareStreams::start(self, id, cs, count, usable, k, from);
        let mut combiner = Combiner::new(scheme, cs, &streams.subset())?;
        let mut out_buf = Zeroizing::new(vec![0u8; cs]);
        for j in from..count {
            let Received { pieces, replaced } =
                match streams.receive(j, k, &mut found.rejected).await {
                    Ok(r) => r,
                    Err(NoSpare) => {
                        output.forget_checkpoint();
                        return Err(no_spare_error(id, j, k, &found.rejected));
                    }
                };
            if replaced {
                combiner = Combiner::new(scheme, cs, &streams.subset())?;
            }
            combiner.combine_chunk(&pieces, &mut out_buf)?;
            let len = if j + 1 == count {
                (trailer.original_len - j * cs as u64) as usize
            } else {
                cs
            };
            output.append(&out_buf[..len])?;
            self.progress.done.fetch_add(len as u64, Ordering::Relaxed);
            output.chunk_written(j + 1, self.cfg.backup.checkpoint_chunks)?;
        }
        Ok(streams.used())
        // `streams` is dropped here: the downloaders stop before the digest is checked.
    }
}

fn no_spare_error(id: Uuid, j: u64, k: usize, rejected: &[(String, u8, String)]) -> TransferError {
    TransferError::Failed(format!(
        "backup {id}: not enough good shares left at chunk {j} (need {k}): {}",
        rejected
            .iter()
            .map(|(s, i, r)| format!("share {i} at {s}: {r}"))
            .collect::<Vec<_>>()
            .join("; ")
    ))
}

/// The header and trailer a manifest records, checked against each other and the manifest.
fn decode_ends(m: &Manifest) -> Result<(ShareHeader, ShareTrailer), TransferError> {
    let bad = |w: &str| {
        TransferError::Failed(format!(
            "share {} of backup {}: {w}",
            m.share_index, m.backup_id
        ))
    };
    let h = hex::decode(m.header_hex.as_deref().unwrap_or("")).map_err(|_| bad("bad header"))?;
    let t = hex::decode(m.trailer_hex.as_deref().unwrap_or("")).map_err(|_| bad("bad trailer"))?;
    let h: [u8; HEADER_LEN] = h.try_into().map_err(|_| bad("bad header length"))?;
    let t: [u8; TRAILER_LEN] = t.try_into().map_err(|_| bad("bad trailer length"))?;
    let hd = ShareHeader::decode(&h).map_err(|e| bad(&e.to_string()))?;
    let tr = ShareTrailer::decode(&t, &h, hd.chunk_size).map_err(|e| bad(&e.to_string()))?;
    if hd.index != m.share_index || hd.set_id != *m.backup_id.as_bytes() {
        return Err(bad("header does not match the manifest"));
    }
    Ok((hd, tr))
}
