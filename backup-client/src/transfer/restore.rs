//! The restore command, in its steps:
//!
//! 1. **find** ([`BackupClient::find_shares`]) — ask every site (this one first) for the
//!    backup's manifests;
//! 2. **agree** (`Found::agree`) — a share counts only from the site the backup's
//!    placement gives it to, and only if at least `k` sites agree on what the backup is
//!    (scheme, chunk size, length, whole-file digest, placement): so fewer than `k` sites,
//!    colluding or not, can neither choose the digest the file is checked against nor pass
//!    off a share that is not theirs; the others are named;
//! 3. **choose** ([`BackupClient::usable_shares`]) — one agreed share per index, with QKD
//!    keys to its site;
//! 4. **resume** (`resume::PartialOutput`) — open `<out>.partial`, continuing after its last
//!    checkpoint if it is of this backup;
//! 5. **download and combine** ([`BackupClient::download_and_combine`]) — `k` share streams
//!    (see `download`), chunk by chunk, into the partial file;
//! 6. **verify and rename** — the whole-file digest must match before the partial file is
//!    renamed over the output. If it does not (a site served a share it forged, sealed with
//!    keys it took itself), every other `k`-subset of the shares is tried, from the start;
//!    the shares only wrong subsets used are named as inconsistent. Nothing is ever renamed
//!    into place that does not match the agreed digest.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use secret_buf::SecretBuf;
use uuid::Uuid;

use super::download::{NoSpare, Received, ShareSource, ShareStreams};
use super::resume::PartialOutput;
use super::{BackupClient, RestoreReport, TransferError};
use crate::config::Site;
use share_transfer::wire::Manifest;
use sharing::format::{ShareHeader, ShareTrailer, HEADER_LEN, TRAILER_LEN};
use sharing::sharing::Combiner;

/// Shares that agree on what the backup is: (key, header, trailer, the shares).
type Group = (String, ShareHeader, ShareTrailer, Vec<(Site, Manifest)>);

/// The shares of a backup as found at the sites.
pub(super) struct Found {
    /// Complete shares, this site's first.
    pub(super) candidates: Vec<(Site, Manifest)>,
    /// `(site, share index, why)` of every share that cannot be used.
    pub(super) rejected: Vec<(String, u8, String)>,
    /// Sites that could not be asked, with why.
    unreachable: Vec<String>,
}

/// What at least `k` sites agree the backup is, and their shares (this site's first).
pub(super) struct Agreed {
    pub(super) header: ShareHeader,
    pub(super) trailer: ShareTrailer,
    pub(super) members: Vec<(Site, Manifest)>,
}

/// How one pass of downloads ended.
enum Run {
    /// Every chunk was combined: the shares of the last chunk, and every share that
    /// delivered one.
    Done {
        used: Vec<(String, u8)>,
        contributors: Vec<u8>,
    },
    /// Fewer than `k` shares could deliver some chunk.
    NoSpare(TransferError),
}

/// How many different sites (agents) hold the given shares.
fn distinct_sites<'a>(shares: impl IntoIterator<Item = &'a (Site, Manifest)>) -> usize {
    let mut v: Vec<&str> = shares
        .into_iter()
        .map(|(s, _)| s.agent_sae_id.as_str())
        .collect();
    v.sort_unstable();
    v.dedup();
    v.len()
}

impl Found {
    /// Step 2: the shares of the sites that agree on what the backup is. A share claimed by
    /// a site the placement does not give it to is refused; shares of sites that disagree
    /// with the agreeing `k` are named.
    pub(super) fn agree(&mut self, id: Uuid) -> Result<Agreed, TransferError> {
        let mut groups: Vec<Group> = Vec::new();
        for (site, m) in std::mem::take(&mut self.candidates) {
            let (h, t) = match decode_ends(&m) {
                Ok(ends) => ends,
                Err(e) => {
                    self.rejected
                        .push((site.name.clone(), m.share_index, e.to_string()));
                    continue;
                }
            };
            let place = &m.open.placement;
            let owner = place.get(m.share_index as usize);
            if !place.is_empty() && owner != Some(&site.agent_sae_id) {
                self.rejected.push((
                    site.name.clone(),
                    m.share_index,
                    format!(
                        "site {} ({}) claims share {}, which the backup's placement gives to {}",
                        site.name,
                        site.agent_sae_id,
                        m.share_index,
                        owner.map_or("no site", String::as_str)
                    ),
                ));
                continue;
            }
            let key = format!(
                "{:?}|{}|{}|{}|{}|{}|{:?}|{}",
                h.scheme,
                h.chunk_size,
                hex::encode(h.set_id),
                t.original_len,
                t.chunk_count,
                hex::encode(t.digest),
                place,
                m.open.placement_version
            );
            match groups.iter_mut().find(|g| g.0 == key) {
                Some(g) => g.3.push((site, m)),
                None => groups.push((key, h, t, vec![(site, m)])),
            }
        }
        // Sites, not shares, are counted: one site holding several shares is one voice.
        let sites_of = |g: &Group| distinct_sites(&g.3);
        groups.sort_by_key(|g| std::cmp::Reverse(sites_of(g)));
        let describe = |groups: &[Group]| {
            groups
                .iter()
                .map(|g| {
                    let sites: Vec<&str> = g.3.iter().map(|(s, _)| s.name.as_str()).collect();
                    format!("{{{}}}", sites.join(", "))
                })
                .collect::<Vec<_>>()
                .join(" vs ")
        };
        let Some(best) = groups.first() else {
            return Err(self.nothing_error(id));
        };
        let k = best.1.scheme.k() as usize;
        let answered = distinct_sites(groups.iter().flat_map(|g| &g.3));
        if answered < k {
            // Not a disagreement: too few sites answered with a share at all.
            return Err(self.too_few_error(id, k, answered));
        }
        if sites_of(best) < k {
            return Err(TransferError::Failed(format!(
                "backup {id}: fewer than k = {k} sites agree on what it is (size, digest, placement): {}; a restore needs {k} sites that agree",
                describe(&groups)
            )));
        }
        // Groups that differ only in placement: a share moved (`repair --to`) and not every
        // site was told yet; the newest placement that k sites hold is the backup's.
        let enough: Vec<usize> = (0..groups.len())
            .filter(|&g| sites_of(&groups[g]) >= groups[g].1.scheme.k() as usize)
            .collect();
        let content = |g: &Group| (g.1.scheme, g.1.chunk_size, g.1.set_id, g.2);
        let version = |g: &Group| g.3[0].1.open.placement_version;
        if enough.len() > 1
            && enough
                .iter()
                .all(|&g| content(&groups[g]) == content(&groups[enough[0]]))
        {
            if let Some(&newest) = enough.iter().max_by_key(|&&g| version(&groups[g])) {
                let top = version(&groups[newest]);
                if enough
                    .iter()
                    .filter(|&&g| version(&groups[g]) == top)
                    .count()
                    == 1
                {
                    let g = groups.remove(newest);
                    groups.insert(0, g);
                    return self.agreed_on(id, groups, k);
                }
            }
        }
        if groups
            .get(1)
            .is_some_and(|g| sites_of(g) >= g.1.scheme.k() as usize)
        {
            return Err(TransferError::Failed(format!(
                "backup {id}: sites disagree on what it is, each side with enough sites to restore: {}; restore from sites you trust (backup.placement)",
                describe(&groups)
            )));
        }
        self.agreed_on(id, groups, k)
    }

    /// The first group is the backup; the others' shares are named as not counted (those
    /// of the same file under an older placement: a share move in progress).
    fn agreed_on(
        &mut self,
        id: Uuid,
        groups: Vec<Group>,
        k: usize,
    ) -> Result<Agreed, TransferError> {
        let mut groups = groups.into_iter();
        let Some((_, header, trailer, members)) = groups.next() else {
            return Err(self.nothing_error(id));
        };
        let version = members.first().map_or(0, |(_, m)| m.open.placement_version);
        for (_, h, t, others) in groups {
            for (site, m) in others {
                let same_file = (h.scheme, h.chunk_size, h.set_id, t)
                    == (header.scheme, header.chunk_size, header.set_id, trailer);
                let moved = same_file && m.open.placement_version < version;
                let why = if moved {
                    format!(
                        "site {} holds an older placement of this backup (a share moved and not                          every site was told: re-run the `repair --to` that moved it)",
                        site.name
                    )
                } else {
                    format!(
                        "site {} disagrees with the {k} sites that agree on this backup's size, digest and placement",
                        site.name
                    )
                };
                self.rejected.push((site.name.clone(), m.share_index, why));
            }
        }
        Ok(Agreed {
            header,
            trailer,
            members,
        })
    }

    /// The members of one share epoch: the newest that `k` sites hold, else the one most
    /// sites hold. Shares of other epochs are named in `rejected` and never combined with
    /// them (a renewal changes every share; mixing epochs gives noise).
    pub(super) fn one_epoch(
        &mut self,
        members: Vec<(Site, Manifest)>,
        k: usize,
    ) -> Vec<(Site, Manifest)> {
        let mut epochs: Vec<u32> = members.iter().map(|(_, m)| m.open.epoch).collect();
        epochs.sort_unstable();
        epochs.dedup();
        let sites_at = |e: u32| distinct_sites(members.iter().filter(|(_, m)| m.open.epoch == e));
        let Some(chosen) = epochs
            .iter()
            .rev()
            .find(|&&e| sites_at(e) >= k)
            .or_else(|| epochs.iter().max_by_key(|&&e| (sites_at(e), e)))
            .copied()
        else {
            return members;
        };
        let (keep, other): (Vec<_>, Vec<_>) = members
            .into_iter()
            .partition(|(_, m)| m.open.epoch == chosen);
        for (site, m) in other {
            let why = if m.open.epoch > chosen {
                "a renewal of this backup is unfinished; `backup-client renew ID` finishes it"
            } else {
                "it missed a renewal; `backup-client repair ID --site SITE` rebuilds it"
            };
            self.rejected.push((
                site.name.clone(),
                m.share_index,
                format!(
                    "share at epoch {}, the others at {chosen}: {why}",
                    m.open.epoch
                ),
            ));
        }
        keep
    }

    /// Names the shares that only passes with a wrong result used.
    fn name_inconsistent(&mut self, usable: &[ShareSource], wrong: &[Vec<u8>], good: &[u8]) {
        let mut named: Vec<u8> = Vec::new();
        for share in wrong.iter().flatten() {
            if good.contains(share) || named.contains(share) {
                continue;
            }
            named.push(*share);
            if let Some(src) = usable.iter().find(|u| u.share == *share) {
                tracing::warn!(site = %src.site.name, share, "share inconsistent with the others; the file was restored without it");
                self.rejected.push((
                    src.site.name.clone(),
                    *share,
                    format!(
                        "inconsistent: files rebuilt with the share from site {} do not match the digest the sites agree on (tampered or forged there)",
                        src.site.name
                    ),
                ));
            }
        }
    }

    /// No `k` of the usable shares rebuild the agreed file.
    fn no_consistent_subset(
        &self,
        id: Uuid,
        k: usize,
        usable: &[ShareSource],
        wrong: &[Vec<u8>],
    ) -> TransferError {
        let shares: Vec<String> = usable
            .iter()
            .map(|u| format!("share {} at {}", u.share, u.site.name))
            .collect();
        TransferError::Failed(format!(
            "backup {id}: no {k} of the shares ({}) rebuild the file whose digest the sites agree on ({} wrong results); some site altered its share; nothing was written",
            shares.join(", "),
            wrong.len()
        ))
    }

    /// Why nothing can be restored when no complete share was found.
    pub(super) fn nothing_error(&self, id: Uuid) -> TransferError {
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
    pub(super) fn too_few_error(&self, id: Uuid, k: usize, usable: usize) -> TransferError {
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
        if found.candidates.is_empty() {
            return Err(found.nothing_error(id));
        }
        let Agreed {
            header,
            trailer,
            members,
        } = found.agree(id)?;
        let k = header.scheme.k() as usize;
        let members = found.one_epoch(members, k);
        let usable = self.usable_shares(&mut found, members).await;
        if usable.len() < k {
            return Err(found.too_few_error(id, k, usable.len()));
        }
        // First every usable share (a failing one is replaced by a spare); should the file
        // not match the digest the sites agree on, each k-subset in turn, from the start.
        // Lexicographic: this site's share (first) is tried first.
        let subsets = sharing::scheme::subsets(usable.len(), k);
        let mut wrong: Vec<Vec<u8>> = Vec::new();
        let mut next = 0;
        let mut sources = usable.clone();
        loop {
            let first = wrong.is_empty() && next == 0;
            let mut output = PartialOutput::open(
                out,
                id,
                trailer.chunk_count,
                trailer.original_len,
                header.chunk_size,
            )?;
            let start_chunk = output.start_chunk;
            self.progress
                .total
                .store(trailer.original_len, Ordering::Relaxed);
            self.progress.done.store(
                (start_chunk * header.chunk_size as u64).min(trailer.original_len),
                Ordering::Relaxed,
            );
            let run = self
                .download_and_combine(id, &header, &trailer, sources, &mut output, &mut found)
                .await?;
            match run {
                Run::Done { used, contributors } if output.matches(&trailer.digest) => {
                    let output = output.commit(id, &trailer.digest, out)?;
                    found.name_inconsistent(&usable, &wrong, &contributors);
                    return Ok(RestoreReport {
                        backup_id: id,
                        output,
                        bytes: trailer.original_len,
                        seconds: started.elapsed().as_secs_f64(),
                        resumed_at_chunk: start_chunk,
                        used,
                        rejected: found.rejected,
                    });
                }
                Run::Done { contributors, .. } => {
                    output.discard();
                    tracing::warn!(shares = ?contributors, "the rebuilt file does not match the digest the sites agree on; trying other shares");
                    let mut c = contributors;
                    c.sort_unstable();
                    wrong.push(c);
                }
                Run::NoSpare(e) if first => {
                    output.forget_checkpoint();
                    return Err(e);
                }
                Run::NoSpare(_) => output.discard(),
            }
            // The next k-subset not known to hold a share that gave a wrong file... or not
            // yet tried at all.
            let pick = loop {
                let Some(sub) = subsets.get(next) else {
                    return Err(found.no_consistent_subset(id, k, &usable, &wrong));
                };
                next += 1;
                let mut shares: Vec<u8> = sub.iter().map(|i| usable[*i].share).collect();
                shares.sort_unstable();
                if !wrong.contains(&shares) {
                    break sub;
                }
            };
            sources = pick.iter().map(|i| usable[*i].clone()).collect();
        }
    }

    /// Step 1: the manifests of backup `id` at every site, this site first.
    pub(super) async fn find_shares(&self, id: Uuid) -> Found {
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

    /// Step 3: the agreed shares, one per share index, with QKD keys to their site; the
    /// others go to `found.rejected`.
    pub(super) async fn usable_shares(
        &self,
        found: &mut Found,
        members: Vec<(Site, Manifest)>,
    ) -> Vec<ShareSource> {
        let mut usable: Vec<ShareSource> = Vec::new();
        for (site, m) in members {
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
    /// `output`; says which shares delivered (the last chunk, and any), or that fewer than
    /// `k` could.
    async fn download_and_combine(
        &self,
        id: Uuid,
        header: &ShareHeader,
        trailer: &ShareTrailer,
        usable: Vec<ShareSource>,
        output: &mut PartialOutput,
        found: &mut Found,
    ) -> Result<Run, TransferError> {
        let scheme = header.scheme;
        let k = scheme.k() as usize;
        let cs = header.chunk_size;
        let count = trailer.chunk_count;
        let from = output.start_chunk;
        // Streams from k shares; replace a failing one from the chunk where it failed.
        let mut streams = ShareStreams::start(self, id, cs, count, usable, k, from);
        let mut combiner = Combiner::new(scheme, cs, &streams.subset())?;
        let mut out_buf = SecretBuf::zeroed(cs);
        for j in from..count {
            let Received {
                pieces, replaced, ..
            } = match streams.receive(j, k, &mut found.rejected).await {
                Ok(r) => r,
                Err(NoSpare) => {
                    return Ok(Run::NoSpare(no_spare_error(id, j, k, &found.rejected)));
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
        Ok(Run::Done {
            used: streams.used(),
            contributors: streams.contributors(),
        })
        // `streams` is dropped here: the downloaders stop before the digest is checked.
    }
}

pub(super) fn no_spare_error(
    id: Uuid,
    j: u64,
    k: usize,
    rejected: &[(String, u8, String)],
) -> TransferError {
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
