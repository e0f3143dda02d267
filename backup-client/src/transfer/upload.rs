//! The store's pipeline: one reader thread reads, hashes and splits the file
//! ([`read_and_split`], on `sharing`'s [`ChunkedSplit`]) and hands each share chunk to its
//! site's queue; `streams` [`Uploader`]s per site take chunks off the queue in batches,
//! seal them under fresh QKD keys and post them to the agent.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use uuid::Uuid;
use zeroize::Zeroize;

use super::{agent_message, io_err, Progress, TransferError};
use crate::config::Site;
use share_transfer::keys::{KeyError, KeyFetcher, KeyPlan};
use share_transfer::seal::seal_into;
use share_transfer::wire::{mac_context, Direction, FrameHeader, Stored};
use sharing::sharing::SharingError;
use sharing::{ChunkedSplit, RandomSource, Scheme};

/// A chunk of one share on its way to its site.
pub(super) struct Job {
    pub(super) chunk: u64,
    pub(super) nonce: u64,
    pub(super) data: Vec<u8>,
}

/// The reader thread's work: which file, how to split it, which chunks to skip, where the
/// share chunks go.
pub(super) struct ReadSplit {
    pub(super) path: PathBuf,
    pub(super) scheme: Scheme,
    pub(super) chunk_size: usize,
    pub(super) rng: Box<dyn RandomSource + Send>,
    /// Chunks already stored everywhere by an earlier run, with their split nonce.
    pub(super) done: HashMap<u64, u64>,
    /// `(share index, queue)` of every site stored on.
    pub(super) senders: Vec<(u8, async_channel::Sender<Job>)>,
    pub(super) abort: Arc<AtomicBool>,
    pub(super) progress: Arc<Progress>,
}

/// What the reader thread read.
pub(super) struct Split {
    /// BLAKE3 of the whole file.
    pub(super) digest: [u8; 32],
    /// Bytes read.
    pub(super) total: u64,
    /// The split nonce of every chunk, in order.
    pub(super) nonces: Vec<u64>,
}

/// Reads the file, hashes it, and splits the chunks not yet complete everywhere.
pub(super) fn read_and_split(r: ReadSplit) -> Result<Split, TransferError> {
    let f = File::open(&r.path).map_err(io_err(&r.path))?;
    let mut chunks = ChunkedSplit::new(r.scheme, r.chunk_size, r.rng, f)?;
    let n = r.scheme.n() as usize;
    let mut nonces = Vec::new();
    loop {
        if r.abort.load(Ordering::Relaxed) {
            return Err(TransferError::Failed("aborted".into()));
        }
        let Some(chunk) = chunks.next_chunk().map_err(|e| read_error(&r.path, e))? else {
            break;
        };
        if let Some(&nonce) = r.done.get(&chunk.index) {
            // Already stored everywhere by an earlier run.
            nonces.push(nonce);
            r.progress
                .done
                .fetch_add(chunk.len as u64, Ordering::Relaxed);
            continue;
        }
        let j = chunk.index;
        let mut shares: Vec<Vec<u8>> = (0..n).map(|_| vec![0u8; r.chunk_size]).collect();
        chunk.split_into(&mut shares)?;
        let nonce = split_nonce()?;
        nonces.push(nonce);
        dispatch(&r.senders, j, nonce, shares);
    }
    let d = chunks.finish();
    Ok(Split {
        digest: d.digest,
        total: d.original_len,
        nonces,
    })
}

/// A read failure names the file, as every other I/O error of the client does.
fn read_error(path: &Path, e: SharingError) -> TransferError {
    match e {
        SharingError::Io(source) => io_err(path)(source),
        other => TransferError::Sharing(other),
    }
}

/// A fresh random nonce naming one split of one chunk.
pub(super) fn split_nonce() -> Result<u64, TransferError> {
    let mut nonce_src = [0u8; 8];
    getrandom::fill(&mut nonce_src)
        .map_err(|e| TransferError::Failed(format!("OS random: {e}")))?;
    Ok(u64::from_le_bytes(nonce_src))
}

/// Queues share `i` of chunk `j` for share `i`'s site; shares of sites not stored on
/// (degraded) are wiped here.
pub(super) fn dispatch(
    senders: &[(u8, async_channel::Sender<Job>)],
    j: u64,
    nonce: u64,
    shares: Vec<Vec<u8>>,
) {
    for (i, mut data) in shares.into_iter().enumerate() {
        match senders.iter().find(|(s, _)| usize::from(*s) == i) {
            // A closed channel means that site failed; the store decides what that means.
            Some((_, tx)) => {
                let _ = tx.send_blocking(Job {
                    chunk: j,
                    nonce,
                    data,
                });
            }
            None => data.zeroize(),
        }
    }
}

/// What an uploader's chunks are: a store's share chunks, or the deltas of a renewal.
#[derive(Clone, Copy)]
pub(super) enum Route {
    Store,
    Renew(Uuid),
}

/// Sends one share's chunks to its site.
pub(super) struct Uploader {
    pub(super) route: Route,
    pub(super) http: reqwest::Client,
    pub(super) keys: Arc<KeyFetcher>,
    pub(super) site: Site,
    pub(super) share: u8,
    pub(super) backup: Uuid,
    pub(super) plan: KeyPlan,
    pub(super) batch: usize,
    pub(super) retries: u32,
    pub(super) progress: Arc<Progress>,
    pub(super) chunk_size: usize,
    pub(super) size: u64,
    pub(super) sent: Arc<AtomicU64>,
    /// Progress counts the original file's bytes once: by the first share's uploaders.
    pub(super) report_progress: bool,
}

impl Uploader {
    pub(super) async fn run(self, rx: async_channel::Receiver<Job>) -> Result<(), TransferError> {
        let base = format!(
            "{}/v1/backups/{}/shares/{}",
            self.site.agent_url.trim_end_matches('/'),
            self.backup,
            self.share
        );
        let (url, direction) = match self.route {
            Route::Store => (format!("{base}/chunks"), Direction::Store),
            Route::Renew(r) => (format!("{base}/renewal/{r}/chunks"), Direction::Renew),
        };
        let ctx = mac_context(self.backup, self.share, direction);
        let result = self.pump(&rx, &url, &ctx).await;
        if result.is_err() {
            rx.close();
        }
        result
    }

    async fn pump(
        &self,
        rx: &async_channel::Receiver<Job>,
        url: &str,
        ctx: &[u8],
    ) -> Result<(), TransferError> {
        while let Ok(first) = rx.recv().await {
            let mut jobs = vec![first];
            while jobs.len() < self.batch {
                match rx.try_recv() {
                    Ok(j) => jobs.push(j),
                    Err(_) => break,
                }
            }
            self.send_with_retries(&jobs, url, ctx).await?;
            let bytes: u64 = jobs
                .iter()
                .map(|j| {
                    (self.size - (j.chunk * self.chunk_size as u64)).min(self.chunk_size as u64)
                })
                .sum();
            self.sent.fetch_add(jobs.len() as u64, Ordering::Relaxed);
            if self.report_progress {
                self.progress.done.fetch_add(bytes, Ordering::Relaxed);
            }
            for j in &mut jobs {
                j.data.zeroize();
            }
        }
        Ok(())
    }

    /// Sends a batch, retrying with new keys up to `retries` times (not when the key pool
    /// is exhausted).
    async fn send_with_retries(
        &self,
        jobs: &[Job],
        url: &str,
        ctx: &[u8],
    ) -> Result<(), TransferError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.send(jobs, url, ctx).await {
                Ok(()) => return Ok(()),
                Err(e)
                    if attempt <= self.retries
                        && !matches!(e, TransferError::Keys(KeyError::Exhausted { .. })) =>
                {
                    tracing::warn!(site = %self.site.name, attempt, error = %e, "upload failed; retrying with new keys");
                    tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt))).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Seals a batch under fresh keys and posts it; succeeds when the agent acknowledged
    /// exactly these chunks.
    async fn send(&self, jobs: &[Job], url: &str, ctx: &[u8]) -> Result<(), TransferError> {
        let t0 = Instant::now();
        let keys = self
            .keys
            .take(&self.site.agent_sae_id, &self.plan, jobs.len())
            .await?;
        let t_keys = t0.elapsed();
        let mut body = Vec::with_capacity(jobs.len() * (self.chunk_size + 1024));
        for (job, ck) in jobs.iter().zip(&keys) {
            let header = FrameHeader {
                chunk: job.chunk,
                nonce: job.nonce,
                key_ids: ck.ids.clone(),
                pad: self.plan.pad_bytes > 0,
                len: job.data.len() as u32,
                error: None,
            };
            seal_into(&mut body, ctx, &header, &job.data, ck)
                .map_err(|e| TransferError::Failed(e.to_string()))?;
        }
        drop(keys); // wiped; never used again, whatever happens to the request
        let stored = self.post(url, body).await?;
        tracing::debug!(
            site = %self.site.name,
            chunks = jobs.len(),
            keys_ms = t_keys.as_millis() as u64,
            total_ms = t0.elapsed().as_millis() as u64,
            "batch stored"
        );
        let want: Vec<u64> = jobs.iter().map(|j| j.chunk).collect();
        if stored.stored != want {
            return Err(self.site_err("agent acknowledged other chunks than sent".into()));
        }
        Ok(())
    }

    /// Posts sealed frames to the agent; returns its acknowledgement.
    async fn post(&self, url: &str, body: Vec<u8>) -> Result<Stored, TransferError> {
        let resp = self
            .http
            .post(url)
            .header("content-type", "application/octet-stream")
            .header(
                share_transfer::wire::KEY_WAIT_HEADER,
                self.keys.waited().as_millis().to_string(),
            )
            .timeout(Duration::from_secs(300))
            .body(body)
            .send()
            .await
            .map_err(|e| self.site_err(format!("upload to {} failed: {e}", self.site.agent_url)))?;
        super::check_agent(&self.site, &resp).map_err(|m| self.site_err(m))?;
        let status = resp.status();
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| self.site_err(format!("reading reply: {e}")))?;
        if !status.is_success() {
            let msg = agent_message(&bytes);
            return Err(self.site_err(format!("agent refused chunks: {status} {msg}")));
        }
        serde_json::from_slice(&bytes).map_err(|e| self.site_err(format!("bad reply: {e}")))
    }

    fn site_err(&self, message: String) -> TransferError {
        TransferError::Site {
            site: self.site.name.clone(),
            message,
        }
    }
}
