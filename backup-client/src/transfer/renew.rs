//! Proactive share renewal (`renew ID`, `renew --set NAME`): every share of a backup is
//! replaced by a fresh share of the same file, without the file and without gathering `k`
//! shares anywhere, so shares stolen in different years never add up to `k`.
//!
//! The client deals, chunk by chunk, a sharing of zero with the backup's scheme
//! ([`sharing::Refresher`]) and sends each site its part, one-time-padded and tagged under
//! fresh QKD keys like a store (MAC direction `Renew`); each site XORs it into its share.
//! The sites stage, then commit in two phases (the agent's `staging` has the on-disk
//! protocol):
//!
//! 1. **leftovers** — a renewal interrupted after some site committed is finished (every
//!    other site has it prepared, or none would have committed); one interrupted before any
//!    commit is rolled back everywhere;
//! 2. **begin** at every site, with a new renewal ID and the next epoch;
//! 3. **deltas** — the dealer thread and `streams` uploaders per site, as in a store;
//! 4. **prepare** at every site: all chunks staged, from the splits dealt;
//! 5. **commit** at every site, only once all prepared.
//!
//! A crash or failure at any moment leaves every site able to finish (after 4) or roll
//! back (before), and the backup restorable throughout: until a site commits it serves its
//! old share; restores use one epoch, and each chunk's split nonce changes with the
//! renewal, so shares of two epochs are never combined.
//!
//! Who sees what: each site sees only its own delta, which is uniformly random on its own
//! (a share of zero, `k ≥ 2`); the KMEs deliver keys as for a store; no one but the owner's
//! client deals, and it never holds a share.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;
use uuid::Uuid;

use super::store::Target;
use super::upload::{dispatch, split_nonce, Route};
use super::{BackupClient, TransferError};
use crate::config::Site;
use share_transfer::keys::KeyPlan;
use share_transfer::wire::{
    splits_digest, Manifest, RenewBegin, RenewPrepare, RenewalStatus, SchemeInfo,
};
use sharing::{Refresher, Scheme};

/// Result of a renewal of one backup.
#[derive(Debug, Clone, Serialize)]
pub struct RenewReport {
    pub backup_id: Uuid,
    pub name: String,
    /// The epoch every share is at now.
    pub epoch: u32,
    pub renewal: Uuid,
    /// `(site, share index)` of every share renewed.
    pub shares: Vec<(String, u8)>,
    pub chunks: u64,
    /// Delta bytes sent to all sites together.
    pub bytes_sent: u64,
    pub seconds: f64,
    /// This run finished a renewal an earlier run left committed at some sites, instead of
    /// starting a new one.
    pub finished_interrupted: bool,
    /// Renewals found staged and not committed anywhere, rolled back before this one.
    pub rolled_back: Vec<Uuid>,
}

/// One share of the backup, at its placement site, and where its renewal stands.
struct Holder {
    site: Site,
    manifest: Manifest,
    status: RenewalStatus,
}

impl Holder {
    fn share(&self) -> u8 {
        self.manifest.share_index
    }

    fn path(&self, rest: &str) -> String {
        format!(
            "/v1/backups/{}/shares/{}/renewal{rest}",
            self.manifest.backup_id,
            self.share()
        )
    }
}

fn failed(m: String) -> TransferError {
    TransferError::Failed(m)
}

impl BackupClient {
    /// Renews every share of backup `id` (see the module doc).
    pub async fn renew(&self, id: Uuid) -> Result<RenewReport, TransferError> {
        let started = Instant::now();
        let holders = self.holders(id).await?;
        let name = holders[0].manifest.open.name.clone();
        if let Some(report) = self.finish_interrupted(id, &holders, &name).await? {
            return Ok(RenewReport {
                seconds: started.elapsed().as_secs_f64(),
                ..report
            });
        }
        let rolled_back = self.roll_back_pending(&holders).await?;
        let epoch = holders[0].status.epoch + 1;
        let renewal = Uuid::new_v4();
        let begin = serde_json::to_vec(&RenewBegin { epoch }).map_err(|e| failed(e.to_string()))?;
        if let Err(e) = self
            .on_all(
                &holders,
                reqwest::Method::PUT,
                &format!("/{renewal}"),
                &begin,
            )
            .await
        {
            self.abort_quietly(&holders, renewal).await;
            return Err(e);
        }
        let dealt = match self.send_deltas(id, renewal, &holders).await {
            Ok(d) => d,
            Err(e) => {
                self.abort_quietly(&holders, renewal).await;
                return Err(failed(format!(
                    "renewal of backup {id} stopped before any site committed, nothing changed \
                     (the staged parts were rolled back): {e}"
                )));
            }
        };
        let prepare = serde_json::to_vec(&RenewPrepare {
            splits: dealt.splits,
        })
        .map_err(|e| failed(e.to_string()))?;
        if let Err(e) = self
            .on_all(
                &holders,
                reqwest::Method::POST,
                &format!("/{renewal}/prepare"),
                &prepare,
            )
            .await
        {
            self.abort_quietly(&holders, renewal).await;
            return Err(failed(format!(
                "renewal of backup {id}: a site could not prepare, nothing changed (rolled back): {e}"
            )));
        }
        self.commit_all(id, renewal, &holders).await?;
        Ok(RenewReport {
            backup_id: id,
            name,
            epoch,
            renewal,
            shares: holders
                .iter()
                .map(|h| (h.site.name.clone(), h.share()))
                .collect(),
            chunks: dealt.chunks,
            bytes_sent: dealt.bytes,
            seconds: started.elapsed().as_secs_f64(),
            finished_interrupted: false,
            rolled_back,
        })
    }

    /// Every share of backup `id`, complete at the site its placement names, with its
    /// renewal status; all `n` are needed.
    async fn holders(&self, id: Uuid) -> Result<Vec<Holder>, TransferError> {
        let mut found = self.find_shares(id).await;
        if found.candidates.is_empty() {
            return Err(found.nothing_error(id));
        }
        let agreed = found.agree(id)?;
        let n = agreed.header.scheme.n();
        let mut by_share: HashMap<u8, (Site, Manifest)> = HashMap::new();
        for (site, m) in agreed.members {
            by_share.entry(m.share_index).or_insert((site, m));
        }
        let placement = by_share
            .values()
            .next()
            .map(|(_, m)| m.open.placement.clone())
            .unwrap_or_default();
        let mut holders = Vec::with_capacity(usize::from(n));
        for i in 0..n {
            let Some((site, manifest)) = by_share.remove(&i) else {
                let site = self.site_named_by(placement.get(usize::from(i)));
                let why: Vec<String> = found
                    .rejected
                    .iter()
                    .filter(|(_, s, _)| *s == i)
                    .map(|(s, _, r)| format!("{s}: {r}"))
                    .collect();
                return Err(failed(format!(
                    "backup {id}: share {i} (site {site}) is not available{}; a renewal changes \
                     every share, so all {n} must be there: repair it first \
                     (`backup-client repair {id} --site {site}`) or re-run when the site is back",
                    if why.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", why.join("; "))
                    }
                )));
            };
            let status: RenewalStatus = self
                .agent_call(
                    &site,
                    reqwest::Method::GET,
                    &format!("/v1/backups/{id}/shares/{i}/renewal"),
                    None,
                )
                .await?;
            holders.push(Holder {
                site,
                manifest,
                status,
            });
        }
        Ok(holders)
    }

    /// The configured site name of agent SAE `agent`, or the SAE itself.
    fn site_named_by(&self, agent: Option<&String>) -> String {
        match agent {
            Some(a) => self
                .cfg
                .sites
                .iter()
                .find(|s| &s.agent_sae_id == a)
                .map_or_else(|| a.clone(), |s| s.name.clone()),
            None => "?".into(),
        }
    }

    /// Finishes a renewal that some site committed: commits it at every site still behind
    /// (each has it prepared: no site commits before all prepared). `None` when every share
    /// is at the same epoch.
    async fn finish_interrupted(
        &self,
        id: Uuid,
        holders: &[Holder],
        name: &str,
    ) -> Result<Option<RenewReport>, TransferError> {
        let newest = holders.iter().map(|h| h.status.epoch).max().unwrap_or(0);
        if holders.iter().all(|h| h.status.epoch == newest) {
            return Ok(None);
        }
        // (A share repaired at the newest epoch names no renewal: another one does.)
        let Some(renewal) = holders
            .iter()
            .filter(|h| h.status.epoch == newest)
            .find_map(|h| h.status.renewal)
        else {
            return Err(failed(format!(
                "backup {id}: shares are at different epochs without a renewal that explains it"
            )));
        };
        for h in holders.iter().filter(|h| h.status.epoch != newest) {
            let ready = h
                .status
                .pending
                .as_ref()
                .is_some_and(|p| p.renewal == renewal && p.epoch == newest && p.prepared);
            if !ready {
                return Err(failed(format!(
                    "backup {id}: share {} at site {} is at epoch {} without renewal {renewal} \
                     staged, the others at {newest}: it cannot catch up; rebuild it with \
                     `backup-client repair {id} --site {}` once it is removed there",
                    h.share(),
                    h.site.name,
                    h.status.epoch,
                    h.site.name
                )));
            }
        }
        tracing::info!(backup = %id, %renewal, epoch = newest, "finishing an interrupted renewal");
        self.commit_all(id, renewal, holders).await?;
        Ok(Some(RenewReport {
            backup_id: id,
            name: name.to_owned(),
            epoch: newest,
            renewal,
            shares: holders
                .iter()
                .map(|h| (h.site.name.clone(), h.share()))
                .collect(),
            chunks: 0,
            bytes_sent: 0,
            seconds: 0.0,
            finished_interrupted: true,
            rolled_back: Vec::new(),
        }))
    }

    /// Rolls back every renewal staged and committed nowhere (all shares are at one epoch).
    async fn roll_back_pending(&self, holders: &[Holder]) -> Result<Vec<Uuid>, TransferError> {
        let mut rolled = Vec::new();
        for h in holders {
            if let Some(p) = &h.status.pending {
                self.abort_at(h, p.renewal).await?;
                if !rolled.contains(&p.renewal) {
                    rolled.push(p.renewal);
                }
            }
        }
        Ok(rolled)
    }

    /// The same JSON call on every share's renewal route, all at once; the first error.
    async fn on_all(
        &self,
        holders: &[Holder],
        method: reqwest::Method,
        rest: &str,
        body: &[u8],
    ) -> Result<(), TransferError> {
        let calls = holders.iter().map(|h| {
            let (method, path) = (method.clone(), h.path(rest));
            async move {
                self.agent_call::<serde_json::Value>(&h.site, method, &path, Some(body.to_vec()))
                    .await
            }
        });
        for r in futures_util::future::join_all(calls).await {
            r?;
        }
        Ok(())
    }

    /// Commits `renewal` at every share's site; says which sites are left if one fails.
    async fn commit_all(
        &self,
        id: Uuid,
        renewal: Uuid,
        holders: &[Holder],
    ) -> Result<(), TransferError> {
        let mut left = Vec::new();
        for h in holders {
            if let Err(e) = self
                .agent_call::<Manifest>(
                    &h.site,
                    reqwest::Method::POST,
                    &h.path(&format!("/{renewal}/commit")),
                    Some(Vec::new()),
                )
                .await
            {
                left.push(format!("share {} at {}: {e}", h.share(), h.site.name));
            }
        }
        if left.is_empty() {
            return Ok(());
        }
        Err(failed(format!(
            "renewal {renewal} of backup {id} is decided (every site prepared it) but not yet \
             committed at: {}; the backup stays restorable; re-run `backup-client renew {id}` \
             to finish it",
            left.join("; ")
        )))
    }

    /// Rolls back `renewal` wherever it is staged; failures are only logged (a later run
    /// rolls back what is left).
    async fn abort_quietly(&self, holders: &[Holder], renewal: Uuid) {
        for h in holders {
            if let Err(e) = self.abort_at(h, renewal).await {
                tracing::warn!(site = %h.site.name, error = %e, "could not roll back a staged renewal; the next renew does");
            }
        }
    }

    /// Rolls back `renewal` at `h`'s site (nothing happens where it is not staged).
    async fn abort_at(&self, h: &Holder, renewal: Uuid) -> Result<RenewalStatus, TransferError> {
        self.agent_call(
            &h.site,
            reqwest::Method::DELETE,
            &h.path(&format!("/{renewal}")),
            None,
        )
        .await
    }

    /// Deals the zero sharings and sends every site its deltas; the digest of the new
    /// splits when every site acknowledged every chunk.
    async fn send_deltas(
        &self,
        id: Uuid,
        renewal: Uuid,
        holders: &[Holder],
    ) -> Result<Dealt, TransferError> {
        let open = &holders[0].manifest.open;
        let scheme = scheme_of(open.scheme)?;
        let (cs, count, size) = (
            open.chunk_size as usize,
            open.chunk_count,
            open.original_len,
        );
        let mut targets = Vec::with_capacity(holders.len());
        for h in holders {
            let status = self.keys.status(&h.site.agent_sae_id).await?;
            targets.push(Target {
                share: h.share(),
                site: h.site.clone(),
                held: HashMap::new(),
                plan: KeyPlan::new(&self.cfg.kme_url, cs, h.site.name != self.cfg.site, &status)?,
            });
        }
        self.progress.total.store(size, Ordering::Relaxed);
        self.progress.done.store(0, Ordering::Relaxed);
        let sent = Arc::new(AtomicU64::new(0));
        let (senders, tasks) =
            self.spawn_uploaders(Route::Renew(renewal), id, &targets, (cs, size), &sent);
        let abort = Arc::new(AtomicBool::new(false));
        let stop = abort.clone();
        let rng = self.share_rng()?;
        let n = usize::from(scheme.n());
        let dealer = tokio::task::spawn_blocking(move || -> Result<Vec<u64>, TransferError> {
            let mut refresher = Refresher::new(scheme, cs, rng)?;
            let mut nonces = Vec::with_capacity(count as usize);
            for j in 0..count {
                if stop.load(Ordering::Relaxed) {
                    return Err(failed("stopped".into()));
                }
                let mut deltas: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; cs]).collect();
                refresher.deal_chunk(&mut deltas)?;
                let nonce = split_nonce()?;
                nonces.push(nonce);
                dispatch(&senders, j, nonce, deltas);
            }
            Ok(nonces)
        });
        let mut first_error = None;
        let mut pending: futures_util::stream::FuturesUnordered<_> =
            tasks.into_iter().map(|(_, _, task)| task).collect();
        use futures_util::StreamExt;
        while let Some(r) = pending.next().await {
            let r = r
                .map_err(|e| failed(format!("uploader crashed: {e}")))
                .and_then(|r| r);
            if let Err(e) = r {
                abort.store(true, Ordering::Relaxed);
                first_error.get_or_insert(e);
            }
        }
        let nonces = dealer
            .await
            .map_err(|e| failed(format!("dealer crashed: {e}")))?;
        if let Some(e) = first_error {
            return Err(e);
        }
        let nonces = nonces?;
        Ok(Dealt {
            splits: splits_digest(
                nonces
                    .iter()
                    .copied()
                    .enumerate()
                    .map(|(j, n)| (j as u64, n)),
            ),
            chunks: count,
            bytes: sent.load(Ordering::Relaxed) * cs as u64,
        })
    }
}

impl BackupClient {
    /// Renews every file of sample set `name` in turn; `each(i, n, path)` before file `i`
    /// of `n`. Stops at the first file that fails (the ones before it are renewed).
    pub async fn renew_set(
        &self,
        name: &str,
        mut each: impl FnMut(usize, usize, &str),
    ) -> Result<Vec<(String, RenewReport)>, TransferError> {
        let set = self.require_set(name).await?;
        let mut out = Vec::with_capacity(set.files.len());
        for (i, f) in set.files.iter().enumerate() {
            each(i, set.files.len(), &f.path);
            let r = self.renew(f.backup_id).await.map_err(|e| {
                failed(format!(
                    "set {name}: {}: {e} ({i} file(s) before it were renewed; re-run to renew the set)",
                    f.path
                ))
            })?;
            out.push((f.path.clone(), r));
        }
        Ok(out)
    }
}

/// What the dealing sent.
struct Dealt {
    splits: String,
    chunks: u64,
    bytes: u64,
}

fn scheme_of(info: SchemeInfo) -> Result<Scheme, TransferError> {
    info.scheme()
        .map_err(|e| failed(format!("the backup's scheme: {e}")))
}
