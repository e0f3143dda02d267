//! Serving a share back (`GET …/chunks?from=&to=`) and taking the client's receipts for it
//! (`POST …/receipts`).
//!
//! The agent is the master: it takes keys with `enc_keys` for the reading client, a batch
//! at a time, pads and tags each chunk, and streams the frames. Key use is bounded per client
//! by the [`ledger`](crate::ledger): before each batch the agent checks that the keys it
//! issued to this client and saw no receipt for, plus the batch, stay within
//! `limits.max_unfetched_key_bytes_per_client`. At most one sealed batch waits for the
//! client's socket, so a client that stops reading holds no more keys than that; one silent
//! for `limits.idle_secs` is dropped.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use uuid::Uuid;

use crate::admission::Pass;
use crate::aligned::AlignedBuf;
use crate::jobs::{Begin, Failure};
use crate::ledger::{Reservation, ENTRY_COST};
use crate::storage::ShareFiles;
use crate::{bad, ids, Agent, ApiError, Shared};
use dashboard_web::JobKind;
use share_transfer::keys::KeyPlan;
use share_transfer::receipt::{receipt, RECEIPT_LEN};
use share_transfer::seal::seal_into;
use share_transfer::wire::{mac_context, Acknowledged, Direction, FrameHeader, Receipts};

/// Most receipts one request may carry.
const MAX_RECEIPTS: usize = 65_536;

#[derive(serde::Deserialize)]
pub(crate) struct Range {
    from: Option<u64>,
    to: Option<u64>,
}

pub(crate) async fn download(
    req: HttpRequest,
    a: Shared,
    path: web::Path<(String, u8)>,
    range: web::Query<Range>,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let pass = a.downloads.enter(&caller).map_err(|r| a.refused(r))?;
    let (id, i) = ids(&path)?;
    let share = a.readable_share(&caller, id, i).await?;
    let m = share.manifest();
    if !m.complete {
        return Err(ApiError(
            StatusCode::CONFLICT,
            format!("share {i} of backup {id} is incomplete"),
        ));
    }
    let peer = a.peer(&caller).await?;
    let cs = m.open.chunk_size as usize;
    let plan = KeyPlan::new(&a.cfg.kme_url, cs, !peer.local, &peer.status)?;
    let from = range.from.unwrap_or(0);
    let to = range
        .to
        .unwrap_or(m.open.chunk_count)
        .min(m.open.chunk_count);
    let served = ServedShare {
        agent: a.get_ref().clone(),
        share,
        caller,
        plan,
        id,
        i,
        cs,
        _pass: pass,
    };
    // Refused before the reply starts when the client already holds its bound of keys.
    if let Err(e) = served.reserve(served.batch().min(to.saturating_sub(from))) {
        a.jobs.failed(Failure::Refused);
        return Err(e);
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<web::Bytes, std::io::Error>>(1);
    actix_web::rt::spawn(served.stream(from, to, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    Ok(HttpResponse::Ok()
        .content_type("application/octet-stream")
        .streaming(stream))
}

pub(crate) async fn receipts(
    req: HttpRequest,
    a: Shared,
    path: web::Path<(String, u8)>,
    body: web::Json<Receipts>,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let (id, i) = ids(&path)?;
    if body.chunks.len() > MAX_RECEIPTS {
        return Err(bad(format!(
            "more than {MAX_RECEIPTS} receipts in one request"
        )));
    }
    let mut parsed = Vec::with_capacity(body.chunks.len());
    for (chunk, text) in &body.chunks {
        let mut r = [0u8; RECEIPT_LEN];
        hex::decode_to_slice(text, &mut r).map_err(|_| {
            bad(format!(
                "receipt of chunk {chunk} is not {RECEIPT_LEN} bytes of hex"
            ))
        })?;
        parsed.push((*chunk, r));
    }
    let matched = a.ledger.acknowledge(&caller, id, i, &parsed);
    Ok(HttpResponse::Ok().json(Acknowledged { matched }))
}

/// Why a batch could not be sealed: the frames sealed so far, the chunk that failed, why,
/// and the kind of failure.
type SealFailure = (Vec<u8>, u64, String, Failure);

type FrameTx = tokio::sync::mpsc::Sender<Result<web::Bytes, std::io::Error>>;

/// One share being streamed back to a restoring client, sealed chunk by chunk.
struct ServedShare {
    agent: Arc<Agent>,
    share: Arc<ShareFiles>,
    caller: String,
    plan: KeyPlan,
    id: Uuid,
    i: u8,
    cs: usize,
    /// The download's place among those running (freed when the stream ends).
    _pass: Pass,
}

impl ServedShare {
    /// Chunks per key request.
    fn batch(&self) -> u64 {
        self.plan.chunks_per_request().clamp(1, 4) as u64
    }

    /// Reserves, in the ledger, keys for `n` more chunks for the client, or says why not.
    fn reserve(&self, n: u64) -> Result<Reservation<'_>, ApiError> {
        let per_chunk = (self.plan.keys * self.plan.key_bytes) as u64 + ENTRY_COST;
        self.agent
            .ledger
            .reserve(&self.caller, n * per_chunk)
            .map_err(|e| ApiError(StatusCode::TOO_MANY_REQUESTS, e.to_string()))
    }

    /// Sends chunks `from..to` as frames, in batches that share one key request; a chunk
    /// that cannot be served ends the stream with an error frame.
    async fn stream(self, from: u64, to: u64, tx: FrameTx) {
        let m = self.share.manifest();
        let agent = self.agent.clone();
        let mut job = agent
            .jobs
            .begin(Begin::of(&m, JobKind::Restore, &self.caller));
        let idle = Duration::from_secs(self.agent.cfg.limits.idle_secs);
        let mut j = from;
        let mut buf = AlignedBuf::new(self.cs);
        let nonce_of: HashMap<u64, u64> = self.share.state().into_iter().collect();
        while j < to {
            let n = self.batch().min(to - j);
            let (out, key_wait) = match self.seal_batch(j, n, &nonce_of, &mut buf).await {
                Ok(out) => out,
                Err((sealed, chunk, why, kind)) => {
                    job.fail(kind, format!("chunk {chunk}: {why}"));
                    if !sealed.is_empty() {
                        let _ = tx.send(Ok(web::Bytes::from(sealed))).await;
                    }
                    let _ = tx.send(Ok(error_frame(chunk, &why))).await;
                    return;
                }
            };
            match tokio::time::timeout(idle, tx.send(Ok(web::Bytes::from(out)))).await {
                Ok(Ok(())) => {}
                // The client went away or stopped reading: the keys of this batch are
                // dropped (wiped), never reused, and stay in the ledger until acknowledged
                // or aged out.
                Ok(Err(_)) | Err(_) => {
                    tracing::info!(backup = %self.id, share = self.i, client = %self.caller, chunk = j, "download ended before its end");
                    job.fail(
                        Failure::Idle,
                        format!("the client stopped reading at chunk {j}"),
                    );
                    return;
                }
            }
            let bytes = n * self.cs as u64;
            agent.jobs.served_bytes.fetch_add(bytes, Ordering::Relaxed);
            agent.jobs.chunks_served.fetch_add(n, Ordering::Relaxed);
            job.progress(bytes, key_wait);
            j += n;
        }
    }

    /// Takes keys for chunks `j..j + n` and seals them into frames; on failure, the frames
    /// sealed so far, the chunk that failed and why.
    async fn seal_batch(
        &self,
        j: u64,
        n: u64,
        nonce_of: &HashMap<u64, u64>,
        buf: &mut AlignedBuf,
    ) -> Result<(Vec<u8>, Duration), SealFailure> {
        let (id, i, cs) = (self.id, self.i, self.cs);
        let mut reserved = self
            .reserve(n)
            .map_err(|e| (Vec::new(), j, e.1, Failure::Refused))?;
        let t = Instant::now();
        let keys = self
            .agent
            .keys
            .take(&self.caller, &self.plan, n as usize)
            .await
            .map_err(|e| (Vec::new(), j, e.to_string(), Failure::Key))?;
        let key_wait = t.elapsed();
        let ctx = mac_context(id, i, Direction::Restore);
        let key_bytes = (self.plan.keys * self.plan.key_bytes) as u64;
        let mut out = Vec::with_capacity((cs + 512) * n as usize);
        for (ck, chunk) in keys.iter().zip(j..j + n) {
            if let Some(r) = receipt(ck, self.plan.pad_bytes, id, i, chunk) {
                reserved.issue((id, i, chunk), key_bytes, r);
            }
            if let Err(e) = self.read_chunk(chunk, buf).await {
                tracing::warn!(backup = %id, share = i, chunk, error = %e, "cannot serve chunk");
                return Err((out, chunk, e, Failure::Storage));
            }
            let header = FrameHeader {
                chunk,
                nonce: nonce_of.get(&chunk).copied().unwrap_or(0),
                key_ids: ck.ids.clone(),
                pad: self.plan.pad_bytes > 0,
                len: cs as u32,
                error: None,
            };
            if let Err(e) = seal_into(&mut out, &ctx, &header, buf, ck) {
                return Err((out, chunk, e.to_string(), Failure::Other));
            }
        }
        Ok((out, key_wait))
    }

    /// Reads chunk `chunk` into `buf` on the blocking pool (`buf` is moved there and back;
    /// aligned, so that the local backend reads it with direct I/O).
    async fn read_chunk(&self, chunk: u64, buf: &mut AlignedBuf) -> Result<(), String> {
        let s2 = self.share.clone();
        let mut b = std::mem::replace(buf, AlignedBuf::new(0));
        let r = web::block(move || s2.read_chunk(chunk, &mut b).map(|()| b)).await;
        match r {
            Ok(Ok(b)) => {
                *buf = b;
                Ok(())
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    }
}

fn error_frame(chunk: u64, message: &str) -> web::Bytes {
    let header = FrameHeader {
        chunk,
        nonce: 0,
        key_ids: Vec::new(),
        pad: false,
        len: 0,
        error: Some(message.to_owned()),
    };
    let mut out = Vec::new();
    share_transfer::wire::begin_frame(&mut out, &header);
    web::Bytes::from(out)
}
