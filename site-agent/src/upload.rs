//! Receiving a share's chunks (`POST …/chunks`): frames are read from the body one at a
//! time, each opened (tag checked, pad removed) as soon as it is whole, and written in small
//! groups while the next frames arrive. Nothing unauthenticated is held beyond the frame
//! being read, so a body's size costs the agent no memory; a client that goes silent for
//! `limits.idle_secs` is dropped.
//!
//! A frame's keys are fetched as soon as its header is in, while its payload still arrives.
//! Chunks that verified are kept (written durably) even when a later frame of the same body
//! fails; the reply then is an error and the client sends the batch again.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;

use crate::jobs::{Begin, Failure, Handle};
use crate::staging::Staging;
use crate::storage::{AlignedBuf, ChunkWrite, ShareFiles, StoreError};
use crate::{bad, ids, Agent, ApiError, Shared};
use dashboard_web::JobKind;
use share_transfer::seal::open_into;
use share_transfer::wire::Manifest;
use share_transfer::wire::{frame_with, mac_context, parse_header, Direction, FrameHeader, Stored};

/// Bytes of verified chunks written to disk in one go (one `fdatasync` of data and log).
const WRITE_GROUP_BYTES: usize = 8 << 20;

pub(crate) async fn upload(
    req: HttpRequest,
    a: Shared,
    path: web::Path<(String, u8)>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let caller = a.caller(&req)?;
    let _pass = a.uploads.enter(&caller).map_err(|r| a.refused(r))?;
    let (id, i) = ids(&path)?;
    let (share, m) = a.owned_share(&caller, id, i)?;
    let mut job = a.jobs.begin(Begin::of(&m, JobKind::Store, &caller));
    if let Some(ms) = req
        .headers()
        .get(share_transfer::wire::KEY_WAIT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
    {
        job.client_key_wait(ms);
    }
    let r = receive(&a, &caller, (id, i), Sink::Share(share), &m, payload, &job).await;
    if let Err(e) = &r {
        job.fail(Failure::of_status(e.0.as_u16()), e.1.clone());
    }
    r
}

/// Where a body's verified chunks go: the share itself (a store), or the staging of a
/// renewal of it (the chunks are deltas; see `staging`).
#[derive(Clone)]
pub(crate) enum Sink {
    Share(Arc<ShareFiles>),
    Renewal(Arc<ShareFiles>, Arc<Staging>),
}

impl Sink {
    /// The MAC direction its frames are sealed for.
    fn direction(&self) -> Direction {
        match self {
            Sink::Share(_) => Direction::Store,
            Sink::Renewal(..) => Direction::Renew,
        }
    }

    fn write(&self, group: &mut [ChunkWrite]) -> Result<(), StoreError> {
        match self {
            Sink::Share(s) => s.write_chunks(group),
            Sink::Renewal(s, staging) => staging.stage(s, group),
        }
    }
}

/// Reads, verifies and writes the frames of one body.
pub(crate) async fn receive(
    a: &Agent,
    caller: &str,
    (id, i): (uuid::Uuid, u8),
    sink: Sink,
    m: &Manifest,
    payload: web::Payload,
    job: &Handle<'_>,
) -> Result<HttpResponse, ApiError> {
    let peer = a.peer(caller).await?;
    let cs = m.open.chunk_size as usize;
    let max_per_request = peer.status.max_key_per_request as usize;
    let idle = Duration::from_secs(a.cfg.limits.idle_secs);
    let mut body = FrameReader::new(payload, cs, idle);
    let ctx = mac_context(id, i, sink.direction());
    let mut writer = Writer::new(sink, cs);
    let mut seen = HashSet::new();
    while let Some((header, len)) = body.header().await? {
        if header.error.is_some()
            || header.len as usize != cs
            || header.chunk >= m.open.chunk_count
            || !seen.insert(header.chunk)
        {
            return Err(bad(format!(
                "chunk {}: bad frame for this share",
                header.chunk
            )));
        }
        let key_ids = [&header.key_ids[..]];
        let fetch = async {
            let t = Instant::now();
            a.keys
                .fetch_chunks(caller, &key_ids, max_per_request)
                .await
                .map(|k| (k, t.elapsed()))
                .map_err(ApiError::from)
        };
        let ((keys, key_wait), bytes) = futures_util::try_join!(fetch, body.frame(len))?;
        let frame = frame_with(&bytes, header).ok_or_else(|| bad("frame truncated"))?;
        let mut data = AlignedBuf::new(cs);
        open_into(&frame, &ctx, &keys[0], !peer.local, &mut data).map_err(|e| {
            tracing::warn!(backup = %id, share = i, chunk = frame.header.chunk, error = %e, "rejected a chunk");
            bad(e.to_string())
        })?;
        a.jobs.chunks_verified.fetch_add(1, Ordering::Relaxed);
        writer.push(frame.header, data).await?;
        job.progress(cs as u64, key_wait);
    }
    let stored = writer.finish().await?;
    a.jobs
        .stored_bytes
        .fetch_add(stored.len() as u64 * cs as u64, Ordering::Relaxed);
    Ok(HttpResponse::Ok().json(Stored { stored }))
}

/// A request body read frame by frame.
struct FrameReader {
    payload: web::Payload,
    buf: web::BytesMut,
    cs: usize,
    idle: Duration,
}

impl FrameReader {
    fn new(payload: web::Payload, cs: usize, idle: Duration) -> Self {
        FrameReader {
            payload,
            buf: web::BytesMut::new(),
            cs,
            idle,
        }
    }

    /// Reads the next piece of the body; `false` at its end.
    async fn fill(&mut self) -> Result<bool, ApiError> {
        let next = tokio::time::timeout(self.idle, self.payload.next())
            .await
            .map_err(|_| {
                ApiError(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "no data from the client for {} s (limits.idle_secs)",
                        self.idle.as_secs()
                    ),
                )
            })?;
        match next {
            None => Ok(false),
            Some(Err(e)) => Err(bad(format!("reading the body: {e}"))),
            Some(Ok(piece)) => {
                self.buf.extend_from_slice(&piece);
                Ok(true)
            }
        }
    }

    /// The next frame's header and the frame's whole length, or `None` at the body's end.
    async fn header(&mut self) -> Result<Option<(FrameHeader, usize)>, ApiError> {
        loop {
            if let Some((h, _, len)) =
                parse_header(&self.buf, self.cs).map_err(|e| bad(e.to_string()))?
            {
                return Ok(Some((h, len)));
            }
            if !self.fill().await? {
                return if self.buf.is_empty() {
                    Ok(None)
                } else {
                    Err(bad("the body ends inside a frame"))
                };
            }
        }
    }

    /// The frame of `len` bytes whose header [`FrameReader::header`] returned.
    async fn frame(&mut self, len: usize) -> Result<web::BytesMut, ApiError> {
        while self.buf.len() < len {
            if !self.fill().await? {
                return Err(bad("the body ends inside a frame"));
            }
        }
        Ok(self.buf.split_to(len))
    }
}

/// Writes verified chunks in groups, one group on the disk while the next is gathered.
struct Writer {
    sink: Sink,
    group: Vec<ChunkWrite>,
    group_len: usize,
    writing: Option<tokio::task::JoinHandle<Result<Vec<u64>, StoreError>>>,
    stored: Vec<u64>,
}

impl Writer {
    fn new(sink: Sink, cs: usize) -> Self {
        Writer {
            sink,
            group: Vec::new(),
            group_len: (WRITE_GROUP_BYTES / cs.max(1)).max(1),
            writing: None,
            stored: Vec::new(),
        }
    }

    async fn push(&mut self, h: FrameHeader, data: AlignedBuf) -> Result<(), ApiError> {
        self.group.push(ChunkWrite {
            chunk: h.chunk,
            nonce: h.nonce,
            data,
            key_ids: h.key_ids,
        });
        if self.group.len() >= self.group_len {
            self.flush().await?;
        }
        Ok(())
    }

    /// Waits for the group on the disk, then starts writing the gathered one.
    async fn flush(&mut self) -> Result<(), ApiError> {
        self.wait().await?;
        if self.group.is_empty() {
            return Ok(());
        }
        let mut group = std::mem::take(&mut self.group);
        let sink = self.sink.clone();
        self.writing = Some(tokio::task::spawn_blocking(move || {
            sink.write(&mut group)?;
            Ok(group.iter().map(|w| w.chunk).collect())
        }));
        Ok(())
    }

    async fn wait(&mut self) -> Result<(), ApiError> {
        if let Some(w) = self.writing.take() {
            let done = w
                .await
                .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))??;
            self.stored.extend(done);
        }
        Ok(())
    }

    /// Writes what is left; the chunks now durable, in the order received.
    async fn finish(mut self) -> Result<Vec<u64>, ApiError> {
        self.flush().await?;
        self.wait().await?;
        Ok(self.stored)
    }
}
