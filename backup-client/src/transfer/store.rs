//! The store command, in its steps:
//!
//! 1. **plan** ([`plan_store`]) — scheme, chunk size, the file's size and time, placement;
//!    nothing is contacted yet;
//! 2. **open** ([`BackupClient::open_store`]) — take over or record the pending store, open
//!    the share at every site and learn which chunks each already holds;
//! 3. **upload** ([`BackupClient::upload`]) — the reader/splitter thread and the uploaders
//!    (see `upload`), until every chunk not yet stored everywhere is acknowledged;
//! 4. **finalize** ([`BackupClient::finalize`]) — header and trailer (length, digest) of
//!    every share.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, UNIX_EPOCH};

use futures_util::StreamExt;
use tokio::task::JoinHandle;
use uuid::Uuid;

use super::resume::{PendingStore, Start, StoreResume};
use super::upload::{read_and_split, Job, ReadSplit, Route, Uploader};
use super::{
    default_chunk_size, io_err, now_secs, BackupClient, ShareReport, StoreOptions, StoreReport,
    TransferError,
};
use crate::config::{ClientConfig, Site};
use share_transfer::keys::KeyPlan;
use share_transfer::wire::{Finalize, Manifest, SchemeInfo, ShareOpen, ShareState};
use sharing::format::{ShareHeader, ShareTrailer};
use sharing::{RandomSource, Scheme};

/// What a store will do, decided before any site is contacted.
struct StorePlan {
    scheme_info: SchemeInfo,
    scheme: Scheme,
    chunk_size: usize,
    /// The file, canonical.
    file: PathBuf,
    size: u64,
    mtime_ns: u128,
    /// The site of share `i`, for `i < n`.
    placement: Vec<Site>,
    /// Who besides this client may read the shares (`backup.readers`).
    readers: Option<Vec<String>>,
}

impl StorePlan {
    fn chunk_count(&self) -> u64 {
        self.size.div_ceil(self.chunk_size as u64)
    }

    /// What every site is told when its share is opened.
    fn share_open(&self, created: u64) -> ShareOpen {
        ShareOpen {
            scheme: self.scheme_info,
            chunk_size: self.chunk_size as u32,
            chunk_count: self.chunk_count(),
            original_len: self.size,
            name: self
                .file
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            created,
            placement: self
                .placement
                .iter()
                .map(|s| s.agent_sae_id.clone())
                .collect(),
            readers: self.readers.clone(),
            epoch: 0,
            placement_version: 0,
        }
    }
}

/// A site taking a share in this store, and what it already holds from an earlier run.
pub(super) struct Target {
    pub(super) share: u8,
    pub(super) site: Site,
    /// Chunk → split nonce of every chunk the site holds.
    pub(super) held: HashMap<u64, u64>,
    pub(super) plan: KeyPlan,
}

/// The store once every site was asked.
struct Opened {
    /// The pending-store record, locked until the store returns.
    resume: StoreResume,
    open: ShareOpen,
    reports: Vec<ShareReport>,
    targets: Vec<Target>,
    /// Chunks every target holds from the same split (with its nonce): not sent again.
    done: HashMap<u64, u64>,
}

/// What the upload step achieved.
struct Uploaded {
    digest: [u8; 32],
    /// Digest of every chunk's split nonce, recorded at finalisation.
    splits: String,
    /// Share index → why its site failed (only in a degraded store).
    failed: HashMap<u8, String>,
    chunks_sent: u64,
}

/// `(share index, site name, uploader task)`.
pub(super) type UploaderTask = (u8, String, JoinHandle<Result<(), TransferError>>);

impl BackupClient {
    /// Stores `file`; returns the backup ID and what happened at each site.
    pub async fn store(
        &self,
        file: &Path,
        opts: &StoreOptions,
    ) -> Result<StoreReport, TransferError> {
        let started = Instant::now();
        let plan = plan_store(&self.cfg, file, opts)?;
        let Opened {
            resume,
            open,
            mut reports,
            targets,
            done,
        } = self.open_store(&plan, opts).await?;
        let id = resume.state.backup_id;
        self.progress.total.store(plan.size, Ordering::Relaxed);
        self.progress.done.store(0, Ordering::Relaxed);
        let uploaded = self.upload(&plan, opts, id, &targets, done).await?;
        self.finalize(&plan, id, &targets, &mut reports, &uploaded)
            .await?;
        check_completed(opts, &reports)?;
        resume.remove();
        Ok(StoreReport {
            backup_id: id,
            name: open.name,
            bytes: plan.size,
            seconds: started.elapsed().as_secs_f64(),
            resumed: resume.start == Start::Resumed,
            chunks_sent: uploaded.chunks_sent,
            digest: uploaded.digest,
            shares: reports,
        })
    }

    /// Step 2: records the store (or takes over an interrupted one), opens the share at each
    /// site, checks that enough sites take one, and works out which chunks are done.
    async fn open_store(
        &self,
        plan: &StorePlan,
        opts: &StoreOptions,
    ) -> Result<Opened, TransferError> {
        let resume = StoreResume::begin(
            &self.cfg.state_dir,
            PendingStore {
                backup_id: Uuid::new_v4(),
                path: plan.file.clone(),
                size: plan.size,
                mtime_ns: plan.mtime_ns,
                scheme: plan.scheme_info,
                chunk_size: plan.chunk_size,
                created: now_secs(),
            },
        )?;
        let id = resume.state.backup_id;
        let chunk_count = plan.chunk_count();
        let open = plan.share_open(resume.state.created);
        let open_body = serde_json::to_vec(&open).unwrap_or_default();

        // Open the share at each site and learn what it already holds.
        let mut reports: Vec<ShareReport> = Vec::new();
        let mut targets: Vec<Target> = Vec::new();
        let mut completed_somewhere = false;
        for (i, site) in plan.placement.iter().enumerate() {
            let i = i as u8;
            let r = self
                .open_share(site, id, i, &open_body, plan.chunk_size)
                .await;
            reports.push(ShareReport {
                share_index: i,
                site: site.name.clone(),
                stored: false,
                error: r.as_ref().err().map(ToString::to_string),
            });
            if let Ok((target, complete)) = r {
                completed_somewhere |= complete;
                targets.push(target);
            }
        }
        check_sites(opts, &reports, targets.len())?;
        let done = done_chunks(&targets, chunk_count);
        // A share completed by an earlier run cannot take chunks of a new split: if the other
        // shares do not match it everywhere, this backup cannot be finished consistently.
        if completed_somewhere && (done.len() as u64) < chunk_count {
            resume.remove();
            return Err(TransferError::Restart(format!(
                "an earlier interrupted store of {} left shares of different splits; storing it again as a new backup",
                plan.file.display()
            )));
        }
        Ok(Opened {
            resume,
            open,
            reports,
            targets,
            done,
        })
    }

    /// Opens share `i` at `site`; returns the site as a target and whether the share is
    /// already complete there.
    pub(super) async fn open_share(
        &self,
        site: &Site,
        id: Uuid,
        i: u8,
        open_body: &[u8],
        chunk_size: usize,
    ) -> Result<(Target, bool), TransferError> {
        // The QKD route first: a site this site has no link to is named as such, and no
        // share is opened there in vain.
        let status = match self.keys.status(&site.agent_sae_id).await {
            Ok(st) => st,
            Err(e) => return Err(route_error(site, e)),
        };
        let _: Manifest = self
            .agent_call(
                site,
                reqwest::Method::PUT,
                &format!("/v1/backups/{id}/shares/{i}"),
                Some(open_body.to_vec()),
            )
            .await?;
        let st: ShareState = self
            .agent_call(
                site,
                reqwest::Method::GET,
                &format!("/v1/backups/{id}/shares/{i}/state"),
                None,
            )
            .await?;
        let plan = KeyPlan::new(
            &self.cfg.kme_url,
            chunk_size,
            site.name != self.cfg.site,
            &status,
        )?;
        let target = Target {
            share: i,
            site: site.clone(),
            held: st.chunks.into_iter().collect(),
            plan,
        };
        Ok((target, st.complete))
    }

    /// Step 3: reads, splits and uploads every chunk not done yet; succeeds when the whole
    /// file was read unchanged and every site still stored on acknowledged every chunk.
    async fn upload(
        &self,
        plan: &StorePlan,
        opts: &StoreOptions,
        id: Uuid,
        targets: &[Target],
        done: HashMap<u64, u64>,
    ) -> Result<Uploaded, TransferError> {
        let rng = self.share_rng()?;
        let abort = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (senders, uploaders) = self.spawn_uploaders(
            Route::Store,
            id,
            targets,
            (plan.chunk_size, plan.size),
            &sent,
        );
        // Reader/splitter thread → per-site channels → uploaders.
        let work = ReadSplit {
            path: plan.file.clone(),
            scheme: plan.scheme,
            chunk_size: plan.chunk_size,
            rng,
            done,
            senders,
            abort: abort.clone(),
            progress: self.progress.clone(),
        };
        let reader = tokio::task::spawn_blocking(move || read_and_split(work));
        let (failed, first_error) = collect_uploads(uploaders, targets.len(), opts, &abort).await;
        let split = reader
            .await
            .map_err(|e| TransferError::Failed(format!("reader crashed: {e}")))?;
        if let Some(e) = first_error {
            return Err(TransferError::Failed(format!(
                "store interrupted: {e}; re-run the same command to resume"
            )));
        }
        let split = split?;
        if split.total != plan.size {
            return Err(TransferError::Failed(format!(
                "{} changed while it was being stored ({} bytes before, {} read); run the store again",
                plan.file.display(),
                plan.size,
                split.total
            )));
        }
        let splits = share_transfer::wire::splits_digest(
            split
                .nonces
                .iter()
                .copied()
                .enumerate()
                .map(|(j, n)| (j as u64, n)),
        );
        Ok(Uploaded {
            digest: split.digest,
            splits,
            failed,
            chunks_sent: sent.load(Ordering::Relaxed),
        })
    }

    /// The randomness source for the shares (`backup.rng`).
    pub(super) fn share_rng(&self) -> Result<Box<dyn RandomSource + Send>, TransferError> {
        self.cfg
            .backup
            .rng
            .parse::<sharing::rng::RngChoice>()
            .map_err(|e| TransferError::Usage(format!("backup.rng: {e}")))?
            .open()
            .map_err(|e| TransferError::Usage(format!("backup.rng: {e}")))
    }

    /// Starts `streams` uploaders per target on one queue per target, sending `route`'s
    /// chunks of backup `id` (`size` file bytes in chunks of `chunk_size`); returns the
    /// queues' senders (for the reader or dealer) and the tasks.
    pub(super) fn spawn_uploaders(
        &self,
        route: Route,
        id: Uuid,
        targets: &[Target],
        (chunk_size, size): (usize, u64),
        sent: &Arc<AtomicU64>,
    ) -> (Vec<(u8, async_channel::Sender<Job>)>, Vec<UploaderTask>) {
        let streams = self.cfg.backup.streams;
        let batch = self.cfg.backup.batch_chunks;
        let mut senders = Vec::new();
        let mut uploaders = Vec::new();
        for t in targets {
            let (tx, rx) = async_channel::bounded::<Job>(streams * batch);
            senders.push((t.share, tx));
            for _ in 0..streams {
                let mut up =
                    self.uploader(t, id, (chunk_size, size), sent, t.share == targets[0].share);
                up.route = route;
                let rx = rx.clone();
                uploaders.push((
                    t.share,
                    t.site.name.clone(),
                    tokio::spawn(async move { up.run(rx).await }),
                ));
            }
        }
        (senders, uploaders)
    }

    /// Step 4: sends every share that was fully uploaded its header and trailer; records
    /// each share's fate in `reports`.
    async fn finalize(
        &self,
        plan: &StorePlan,
        id: Uuid,
        targets: &[Target],
        reports: &mut [ShareReport],
        up: &Uploaded,
    ) -> Result<(), TransferError> {
        let trailer = ShareTrailer {
            original_len: plan.size,
            chunk_count: plan.chunk_count(),
            digest: up.digest,
        };
        for t in targets {
            let i = t.share;
            let rep = reports.iter_mut().find(|r| r.share_index == i);
            if let Some(e) = up.failed.get(&i) {
                if let Some(r) = rep {
                    r.error = Some(e.clone());
                }
                continue;
            }
            let header = ShareHeader {
                scheme: plan.scheme,
                index: i,
                chunk_size: plan.chunk_size,
                set_id: *id.as_bytes(),
            };
            let r = self
                .finalize_share(&t.site, id, &header, &trailer, &up.splits)
                .await;
            if let Some(rep) = rep {
                match r {
                    Ok(_) => rep.stored = true,
                    Err(e) => rep.error = Some(e.to_string()),
                }
            }
        }
        Ok(())
    }

    /// Completes share `header.index` of backup `id` at `site` with its header, the
    /// trailer and the digest of its chunks' splits.
    pub(super) async fn finalize_share(
        &self,
        site: &Site,
        id: Uuid,
        header: &ShareHeader,
        trailer: &ShareTrailer,
        splits: &str,
    ) -> Result<Manifest, TransferError> {
        let i = header.index;
        let header = header
            .encode()
            .map_err(|e| TransferError::Failed(e.to_string()))?;
        let body = serde_json::to_vec(&Finalize {
            header_hex: hex::encode(header),
            trailer_hex: hex::encode(trailer.encode(&header)),
            splits: splits.to_owned(),
        })
        .map_err(|e| TransferError::Failed(e.to_string()))?;
        self.agent_call(
            site,
            reqwest::Method::POST,
            &format!("/v1/backups/{id}/shares/{i}/finalize"),
            Some(body),
        )
        .await
    }

    /// An uploader of target `t`'s share of backup `id` (`size` file bytes in chunks of
    /// `chunk_size`), counting acknowledged chunks in `sent`; `report_progress` for the one
    /// share whose progress stands for the file's.
    pub(super) fn uploader(
        &self,
        t: &Target,
        id: Uuid,
        (chunk_size, size): (usize, u64),
        sent: &Arc<AtomicU64>,
        report_progress: bool,
    ) -> Uploader {
        Uploader {
            route: super::upload::Route::Store,
            http: self.http.clone(),
            keys: self.keys.clone(),
            site: t.site.clone(),
            share: t.share,
            backup: id,
            plan: t.plan,
            batch: self
                .cfg
                .backup
                .batch_chunks
                .min(t.plan.chunks_per_request())
                .max(1),
            retries: self.cfg.backup.retries,
            progress: self.progress.clone(),
            chunk_size,
            size,
            sent: sent.clone(),
            report_progress,
        }
    }
}

/// Step 1: checks the options and the file, and picks the sites.
fn plan_store(
    cfg: &ClientConfig,
    file: &Path,
    opts: &StoreOptions,
) -> Result<StorePlan, TransferError> {
    let scheme_info = SchemeInfo {
        kind: opts.scheme,
        k: opts.k,
        n: opts.n,
    };
    let scheme = scheme_info
        .scheme()
        .map_err(|e| TransferError::Usage(format!("--k/--n/--scheme: {e}")))?;
    let chunk_size = chunk_size_for(&scheme, opts.chunk_size)?;
    let (file, size, mtime_ns) = regular_file(file)?;
    let placement: Vec<Site> = cfg.placement().into_iter().take(opts.n as usize).collect();
    if placement.len() < opts.n as usize {
        return Err(TransferError::Usage(format!(
            "n = {} shares need {} sites, the configuration names {}",
            opts.n,
            opts.n,
            placement.len()
        )));
    }
    Ok(StorePlan {
        scheme_info,
        scheme,
        chunk_size,
        file,
        size,
        mtime_ns,
        placement,
        readers: cfg.backup.readers.clone(),
    })
}

/// The chunk size asked for (0: the default for `scheme`), checked.
fn chunk_size_for(scheme: &Scheme, asked: usize) -> Result<usize, TransferError> {
    let chunk_size = if asked == 0 {
        default_chunk_size(scheme)
    } else {
        asked
    };
    scheme
        .check_chunk_size(chunk_size)
        .map_err(|e| TransferError::Usage(format!("chunk size: {e}")))?;
    if chunk_size < sharing::format::MIN_STREAM_CHUNK_SIZE {
        return Err(TransferError::Usage(format!(
            "chunk size must be at least {} bytes",
            sharing::format::MIN_STREAM_CHUNK_SIZE
        )));
    }
    Ok(chunk_size)
}

/// The canonical path, size and modification time (ns) of the regular file `file`.
fn regular_file(file: &Path) -> Result<(PathBuf, u64, u128), TransferError> {
    let file = fs::canonicalize(file).map_err(io_err(file))?;
    let meta = fs::metadata(&file).map_err(io_err(&file))?;
    if !meta.is_file() {
        return Err(TransferError::Usage(format!(
            "{} is not a regular file",
            file.display()
        )));
    }
    let mtime_ns = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_nanos());
    Ok((file, meta.len(), mtime_ns))
}

/// Why this site's KME cannot give keys for `site`'s agent, in the user's terms: no QKD link
/// to that site, an agent SAE the KME does not know, or the KME's own message.
fn route_error(site: &Site, e: share_transfer::keys::KeyError) -> TransferError {
    let text = e.to_string();
    let message = if text.contains("no QKD link") {
        format!(
            "{NO_LINK} between this site and site {} ({text})",
            site.name
        )
    } else if text.contains("unknown slave SAE ID") {
        // A KME knows the SAEs of the sites it is linked to: most likely no link, else a
        // wrong agent ID in the configuration.
        format!(
            "this site's KME does not know site {}'s agent {:?}: {NO_LINK} between this site and site {}, or sites.agent_sae_id is wrong ({text})",
            site.name, site.agent_sae_id, site.name
        )
    } else {
        text
    };
    TransferError::Site {
        site: site.name.clone(),
        message,
    }
}

/// How a missing QKD link is named (and recognised by [`check_sites`]).
const NO_LINK: &str = "no QKD link";

/// Fails unless at least `k` sites took their share, and all did unless degraded.
fn check_sites(
    opts: &StoreOptions,
    reports: &[ShareReport],
    alive: usize,
) -> Result<(), TransferError> {
    let down: Vec<String> = reports
        .iter()
        .filter_map(|r| {
            r.error
                .as_ref()
                .map(|e| format!("share {} at {}", r.share_index, e))
        })
        .collect();
    if alive < opts.k as usize {
        return Err(TransferError::Failed(format!(
            "only {} of the {} sites can take a share, at least k = {} are needed: {}",
            alive,
            opts.n,
            opts.k,
            down.join("; ")
        )));
    }
    if !down.is_empty() && !opts.allow_degraded {
        let what = if down.iter().all(|d| d.contains(NO_LINK)) {
            "a share goes only to a site this site's KME has a QKD link to: store from a site linked to the others, choose sites with backup.placement"
        } else {
            "re-run when the site is back"
        };
        return Err(TransferError::Failed(format!(
            "{}; {what}, or pass --allow-degraded to store on the {} usable sites (k = {})",
            down.join("; "),
            alive,
            opts.k
        )));
    }
    Ok(())
}

/// A chunk is done when every site we store on holds it from the same split.
fn done_chunks(targets: &[Target], chunk_count: u64) -> HashMap<u64, u64> {
    (0..chunk_count)
        .filter_map(|j| {
            let mut nonces = targets.iter().map(|t| t.held.get(&j));
            let first = nonces.next().flatten().copied()?;
            nonces.all(|n| n == Some(&first)).then_some((j, first))
        })
        .collect()
}

/// Collects the uploaders' outcomes in completion order, so that a failed site stops the
/// store at once: it aborts the store unless it is degraded and `k` sites remain. Returns
/// every failed share with why, and the error that aborted the store, if one did.
async fn collect_uploads(
    uploaders: Vec<UploaderTask>,
    alive: usize,
    opts: &StoreOptions,
    abort: &AtomicBool,
) -> (HashMap<u8, String>, Option<String>) {
    let mut failed: HashMap<u8, String> = HashMap::new();
    let mut first_error = None;
    let mut pending: futures_util::stream::FuturesUnordered<_> = uploaders
        .into_iter()
        .map(|(i, site_name, h)| async move { (i, site_name, h.await) })
        .collect();
    while let Some((i, site_name, outcome)) = pending.next().await {
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failed
                    .entry(i)
                    .or_insert_with(|| format!("{site_name}: {e}"));
            }
            Err(e) => {
                failed
                    .entry(i)
                    .or_insert_with(|| format!("{site_name}: uploader crashed: {e}"));
            }
        }
        if alive - failed.len() < opts.k as usize || (!failed.is_empty() && !opts.allow_degraded) {
            abort.store(true, Ordering::Relaxed);
            if first_error.is_none() {
                first_error = failed.values().next().cloned();
            }
        }
    }
    (failed, first_error)
}

/// Fails unless at least `k` shares, and all `n` unless degraded, were completed.
fn check_completed(opts: &StoreOptions, reports: &[ShareReport]) -> Result<(), TransferError> {
    let stored = reports.iter().filter(|r| r.stored).count();
    if stored < opts.k as usize || (stored < opts.n as usize && !opts.allow_degraded) {
        return Err(TransferError::Failed(format!(
            "only {stored} shares were completed: {}; re-run the same command to resume",
            reports
                .iter()
                .filter_map(|r| r.error.clone())
                .collect::<Vec<_>>()
                .join("; ")
        )));
    }
    Ok(())
}
