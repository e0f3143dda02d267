//! The restore's downloads: a [`Downloader`] streams chunks of one share back from its site,
//! checks and opens every frame; [`parallel_download`] reads one share with several of them
//! at once (one per core, `backup.streams`) and passes its chunks on in order;
//! [`ShareStreams`] keeps `k` shares running and replaces a failing share by the next usable
//! one, from the chunk where it failed.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use secret_buf::SecretBuf;
use uuid::Uuid;

use super::{agent_message, BackupClient};
use crate::config::Site;
use share_transfer::keys::KeyFetcher;
use share_transfer::receipt::receipt;
use share_transfer::seal::{open_into, SealError};
use share_transfer::wire::{mac_context, parse_frame, Direction, Frame, Receipts};

/// A share that can be read: where, which, and the KME's key limit for that site.
#[derive(Clone)]
pub(super) struct ShareSource {
    pub(super) site: Site,
    pub(super) share: u8,
    pub(super) max_per_request: usize,
}

/// Chunks of one share on their way to the combiner: `(chunk, split nonce, plaintext)` or
/// why the share failed.
type ChunkMsg = Result<(u64, u64, SecretBuf), String>;
type ChunkTx = tokio::sync::mpsc::Sender<ChunkMsg>;
type ChunkRx = tokio::sync::mpsc::Receiver<ChunkMsg>;

/// Every usable share has been tried; chunk `j` cannot be gathered from `k` shares.
pub(super) struct NoSpare;

/// Chunk `j` from each active share, in slot order.
pub(super) struct Received {
    pub(super) pieces: Vec<SecretBuf>,
    /// The split nonce the pieces share.
    pub(super) nonce: u64,
    /// Some share was replaced: the combiner must be rebuilt for the new subset.
    pub(super) replaced: bool,
}

/// The `k` shares a restore reads at a time, and the spares that replace a failing one.
pub(super) struct ShareStreams<'a> {
    client: &'a BackupClient,
    backup: Uuid,
    chunk_size: usize,
    chunk_count: u64,
    sources: Vec<ShareSource>,
    /// `(index into sources, its chunk stream)`.
    active: Vec<(usize, ChunkRx)>,
    next_spare: usize,
    /// Every source that delivered a chunk, in the order they started.
    contributed: Vec<usize>,
}

impl<'a> ShareStreams<'a> {
    /// Starts the first `k` usable shares at chunk `from`.
    pub(super) fn start(
        client: &'a BackupClient,
        backup: Uuid,
        chunk_size: usize,
        chunk_count: u64,
        sources: Vec<ShareSource>,
        k: usize,
        from: u64,
    ) -> Self {
        let mut s = ShareStreams {
            client,
            backup,
            chunk_size,
            chunk_count,
            sources,
            active: Vec::new(),
            next_spare: 0,
            contributed: Vec::new(),
        };
        while s.active.len() < k && s.next_spare < s.sources.len() {
            let rx = s.spawn(s.next_spare, from);
            s.active.push((s.next_spare, rx));
            s.next_spare += 1;
        }
        s
    }

    fn spawn(&self, idx: usize, from: u64) -> ChunkRx {
        let ShareSource {
            site,
            share,
            max_per_request,
        } = self.sources[idx].clone();
        let require_pad = site.name != self.client.cfg.site;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let dl = Downloader {
            http: self.client.http.clone(),
            keys: self.client.keys.clone(),
            site,
            share,
            backup: self.backup,
            chunk_size: self.chunk_size,
            max_per_request,
            require_pad,
            idle: self.client.cfg.backup.key_wait() + Duration::from_secs(60),
        };
        let to = self.chunk_count;
        let parallel = self.client.cfg.backup.streams.clamp(1, MAX_PARALLEL);
        tokio::spawn(parallel_download(Arc::new(dl), from, to, parallel, tx));
        rx
    }

    /// Share indices of the active shares, in slot order (the combiner's subset).
    pub(super) fn subset(&self) -> Vec<u8> {
        self.active
            .iter()
            .map(|(i, _)| self.sources[*i].share)
            .collect()
    }

    /// Share indices of every share that delivered a chunk to the combiner.
    pub(super) fn contributors(&self) -> Vec<u8> {
        self.contributed
            .iter()
            .map(|i| self.sources[*i].share)
            .collect()
    }

    /// `(site, share index)` of the active shares.
    pub(super) fn used(&self) -> Vec<(String, u8)> {
        self.active
            .iter()
            .map(|(i, _)| (self.sources[*i].site.name.clone(), self.sources[*i].share))
            .collect()
    }

    /// Receives chunk `j` from every active share. A share that fails, sends another chunk
    /// or holds the chunk from another split than the shares before it is recorded in
    /// `rejected` and replaced by the next spare, which starts at `j`.
    pub(super) async fn receive(
        &mut self,
        j: u64,
        k: usize,
        rejected: &mut Vec<(String, u8, String)>,
    ) -> Result<Received, NoSpare> {
        let mut pieces: Vec<SecretBuf> = Vec::with_capacity(k);
        let mut split_nonce = None;
        let mut replaced = false;
        let mut slot = 0;
        while slot < self.active.len() {
            match self.active[slot].1.recv().await {
                Some(Ok((c, nonce, data))) if c == j && split_nonce.is_none_or(|n| n == nonce) => {
                    split_nonce = Some(nonce);
                    pieces.push(data);
                    let source = self.active[slot].0;
                    if !self.contributed.contains(&source) {
                        self.contributed.push(source);
                    }
                    slot += 1;
                }
                other => {
                    let why = match other {
                        Some(Err(e)) => e,
                        Some(Ok((c, _, _))) if c != j => {
                            format!("sent chunk {c} where {j} was expected")
                        }
                        Some(Ok(_)) => {
                            "holds this chunk from another split than the other shares".into()
                        }
                        None => "stream ended early".into(),
                    };
                    self.replace(slot, j, why, rejected)?;
                    replaced = true;
                    // retry this slot with the new share (earlier slots already delivered)
                }
            }
        }
        Ok(Received {
            pieces,
            nonce: split_nonce.unwrap_or(0),
            replaced,
        })
    }

    /// Rejects the share in `slot` and starts the next spare there, from chunk `j`.
    fn replace(
        &mut self,
        slot: usize,
        j: u64,
        why: String,
        rejected: &mut Vec<(String, u8, String)>,
    ) -> Result<(), NoSpare> {
        let ShareSource { site, share, .. } = &self.sources[self.active[slot].0];
        tracing::warn!(site = %site.name, share, chunk = j, reason = %why, "share rejected; trying another");
        rejected.push((site.name.clone(), *share, format!("at chunk {j}: {why}")));
        if self.next_spare >= self.sources.len() {
            return Err(NoSpare);
        }
        self.active[slot] = (self.next_spare, self.spawn(self.next_spare, j));
        self.next_spare += 1;
        Ok(())
    }
}

/// Chunks one of a share's parallel downloads asks for in one request.
const SEGMENT_CHUNKS: u64 = 8;

/// Most parallel downloads per share (each buffers up to a segment ahead).
const MAX_PARALLEL: usize = 8;

/// Reads chunks `from..to` of one share with `parallel` downloads at once, each asking for
/// every `parallel`-th segment of [`SEGMENT_CHUNKS`] chunks, so that the agent seals and
/// the client opens several segments on several cores; passes the chunks on in order.
/// Stops the downloads when the restore no longer listens.
async fn parallel_download(dl: Arc<Downloader>, from: u64, to: u64, parallel: usize, tx: ChunkTx) {
    let segments = to.saturating_sub(from).div_ceil(SEGMENT_CHUNKS);
    let p = (parallel as u64).clamp(1, segments.max(1));
    let segment = move |g: u64| {
        let a = from + g * SEGMENT_CHUNKS;
        (a, (a + SEGMENT_CHUNKS).min(to))
    };
    let mut inputs = Vec::new();
    for i in 0..p {
        let (stx, srx) = tokio::sync::mpsc::channel(SEGMENT_CHUNKS as usize);
        let dl = dl.clone();
        tokio::spawn(async move {
            for g in (i..segments).step_by(p as usize) {
                let (a, b) = segment(g);
                if let Err(e) = dl.pump(a, b, &stx).await {
                    let _ = stx.send(Err(e)).await;
                    return;
                }
                if stx.is_closed() {
                    return;
                }
            }
        });
        inputs.push(srx);
    }
    for g in 0..segments {
        let (a, b) = segment(g);
        let input = &mut inputs[(g % p) as usize];
        for _ in a..b {
            let msg = input
                .recv()
                .await
                .unwrap_or_else(|| Err("download stopped".into()));
            let failed = msg.is_err();
            // The restore stopped listening: dropping `inputs` stops the downloads.
            if tx.send(msg).await.is_err() || failed {
                return;
            }
        }
    }
}

/// Streams one share back from its site.
struct Downloader {
    http: reqwest::Client,
    keys: Arc<KeyFetcher>,
    site: Site,
    share: u8,
    backup: Uuid,
    chunk_size: usize,
    max_per_request: usize,
    /// The share comes from another site: it must arrive one-time-padded.
    require_pad: bool,
    /// Longest silence of the site before the share is given up (the agent may be waiting
    /// for QKD key itself).
    idle: Duration,
}

impl Downloader {
    /// `…/v1/backups/{backup}/shares/{share}/{tail}` at the share's site.
    fn share_url(&self, tail: &str) -> String {
        format!(
            "{}/v1/backups/{}/shares/{}/{tail}",
            self.site.agent_url.trim_end_matches('/'),
            self.backup,
            self.share
        )
    }

    /// Asks the site for chunks `from..to`; the reply is a stream of frames.
    async fn request(&self, from: u64, to: u64) -> Result<reqwest::Response, String> {
        let url = self.share_url(&format!("chunks?from={from}&to={to}"));
        let resp = self
            .http
            .get(&url)
            .send()
            .await
            .map_err(|e| format!("agent at {} unreachable: {e}", self.site.agent_url))?;
        super::check_agent(&self.site, &resp)?;
        let status = resp.status();
        if !status.is_success() {
            let bytes = resp.bytes().await.unwrap_or_default();
            let msg = agent_message(&bytes);
            return Err(format!("agent answered {status}: {msg}"));
        }
        Ok(resp)
    }

    /// Streams chunks `from..to` into `tx`, then sends the site the receipts of the chunks
    /// received (whatever the outcome), so that it stops counting their keys as unfetched.
    async fn pump(&self, from: u64, to: u64, tx: &ChunkTx) -> Result<(), String> {
        let mut receipts = Vec::new();
        let r = self.pump_frames(from, to, tx, &mut receipts).await;
        self.send_receipts(receipts).await;
        r
    }

    /// Posts receipts (before the restore can end, so none is lost at exit); a failure only
    /// leaves keys counted at the site until they age out, so it is logged, not fatal.
    async fn send_receipts(&self, chunks: Vec<(u64, String)>) {
        if chunks.is_empty() {
            return;
        }
        let url = self.share_url("receipts");
        let req = self
            .http
            .post(url)
            .timeout(Duration::from_secs(10))
            .json(&Receipts { chunks });
        match req.send().await {
            Ok(r) if r.status().is_success() => {}
            Ok(r) => {
                tracing::warn!(site = %self.site.name, status = %r.status(), "the site refused download receipts")
            }
            Err(e) => {
                tracing::warn!(site = %self.site.name, error = %e, "download receipts not sent")
            }
        }
    }

    async fn pump_frames(
        &self,
        from: u64,
        to: u64,
        tx: &ChunkTx,
        receipts: &mut Vec<(u64, String)>,
    ) -> Result<(), String> {
        if from >= to {
            return Ok(());
        }
        let resp = self.request(from, to).await?;
        let ctx = mac_context(self.backup, self.share, Direction::Restore);
        let mut stream = resp.bytes_stream();
        let mut buf: Vec<u8> = Vec::with_capacity(4 * (self.chunk_size + 1024));
        let mut expect = from;
        loop {
            // Parse every complete frame in the buffer, then fetch their keys in one call.
            let (delivered, used) = {
                let (frames, used) = self.complete_frames(&buf)?;
                if frames.is_empty() {
                    (true, 0)
                } else {
                    (
                        self.deliver(&frames, &mut expect, to, &ctx, tx, receipts)
                            .await?,
                        used,
                    )
                }
            };
            if !delivered {
                return Ok(()); // restore no longer needs this share
            }
            buf.drain(..used);
            if expect >= to {
                return Ok(());
            }
            let next = tokio::time::timeout(self.idle, stream.next())
                .await
                .map_err(|_| format!("no data from the site for {:?}", self.idle))?;
            match next {
                Some(Ok(bytes)) => buf.extend_from_slice(&bytes),
                Some(Err(e)) => return Err(format!("connection lost: {e}")),
                None => return Err(format!("stream ended at chunk {expect} of {to}")),
            }
        }
    }

    /// Every complete frame at the start of `buf`, and the bytes they take; a frame that
    /// carries the site's error ends the share.
    fn complete_frames<'b>(&self, buf: &'b [u8]) -> Result<(Vec<Frame<'b>>, usize), String> {
        let mut pos = 0;
        let mut frames = Vec::new();
        while let Some((f, used)) =
            parse_frame(&buf[pos..], self.chunk_size).map_err(|e| e.to_string())?
        {
            if let Some(err) = &f.header.error {
                return Err(format!("site reports chunk {}: {err}", f.header.chunk));
            }
            frames.push(f);
            pos += used;
        }
        Ok((frames, pos))
    }

    /// Fetches the keys of `frames` in one call, opens them in order (from chunk `expect`)
    /// and passes the plaintexts on; `false` when the restore no longer listens. Frames
    /// other than the chunks still wanted, `expect..to` (in order, full size), are refused before any
    /// key is fetched.
    async fn deliver(
        &self,
        frames: &[Frame<'_>],
        expect: &mut u64,
        to: u64,
        ctx: &[u8],
        tx: &ChunkTx,
        receipts: &mut Vec<(u64, String)>,
    ) -> Result<bool, String> {
        if tx.is_closed() {
            return Ok(false); // no key is taken for chunks nobody waits for
        }
        for (f, j) in frames.iter().zip(*expect..to) {
            if f.header.chunk != j || f.payload.len() != self.chunk_size {
                return Err(format!("unexpected chunk {} (wanted {j})", f.header.chunk));
            }
        }
        if frames.len() as u64 > to - *expect {
            return Err(format!(
                "the site sent chunks beyond {} (asked up to {to})",
                to - 1
            ));
        }
        let ids: Vec<&[Uuid]> = frames.iter().map(|f| &f.header.key_ids[..]).collect();
        let keys = self
            .keys
            .fetch_chunks(&self.site.agent_sae_id, &ids, self.max_per_request)
            .await
            .map_err(|e| e.to_string())?;
        for (f, ck) in frames.iter().zip(&keys) {
            let mut plain = SecretBuf::zeroed(self.chunk_size);
            open_into(f, ctx, ck, self.require_pad, &mut plain)
                .map_err(|e: SealError| e.to_string())?;
            let pad = if f.header.pad { self.chunk_size } else { 0 };
            if let Some(r) = receipt(ck, pad, self.backup, self.share, f.header.chunk) {
                receipts.push((f.header.chunk, hex::encode(r)));
            }
            if tx.send(Ok((*expect, f.header.nonce, plain))).await.is_err() {
                return Ok(false);
            }
            *expect += 1;
        }
        Ok(true)
    }
}
