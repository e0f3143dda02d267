//! What the agent is doing, for operators: one [`Job`] per share transfer (a client storing
//! a share here, or restoring one), kept while it runs and for a while after, plus the
//! agent's Prometheus counters. Read on the operator's listener (`metrics_listen`): no key
//! material, no share bytes; backup IDs, file names, clients and byte counts.
//!
//! Bounded: at most [`KEEP_FINISHED`] finished jobs are kept (the oldest go first); running
//! jobs are bounded by the admission gates.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dashboard_web::{now_ms, Job, JobKind};
use share_transfer::wire::Manifest;
use uuid::Uuid;

/// Finished jobs kept for the dashboard.
pub const KEEP_FINISHED: usize = 32;

/// Window over which a job's rate is measured.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// Why a request of a job failed, as a bounded metrics label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Failure {
    /// A chunk's tag did not verify, or its frame was malformed (400).
    Rejected,
    /// Refused by a bound: too many requests or unfetched keys (429).
    Refused,
    /// The client went silent (408), or stopped reading a download.
    Idle,
    /// The KME could not supply key.
    Key,
    /// Reading or writing the share store.
    Storage,
    /// Anything else (not found, not allowed, conflicts).
    Other,
}

impl Failure {
    pub const ALL: [Failure; 6] = [
        Failure::Rejected,
        Failure::Refused,
        Failure::Idle,
        Failure::Key,
        Failure::Storage,
        Failure::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Failure::Rejected => "rejected",
            Failure::Refused => "refused",
            Failure::Idle => "idle",
            Failure::Key => "key",
            Failure::Storage => "storage",
            Failure::Other => "other",
        }
    }

    /// The kind of a failure by its HTTP status.
    pub fn of_status(code: u16) -> Self {
        match code {
            400 => Failure::Rejected,
            429 => Failure::Refused,
            408 => Failure::Idle,
            502..=504 => Failure::Key,
            500 | 507 => Failure::Storage,
            _ => Failure::Other,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    id: Uuid,
    share: u8,
    kind: JobKind,
    client: String,
}

struct Entry {
    job: Job,
    running: usize,
    /// (when, bytes so far) over the last [`RATE_WINDOW`].
    marks: VecDeque<(Instant, u64)>,
}

/// The agent's jobs and counters.
#[derive(Default)]
pub struct Jobs {
    live: Mutex<HashMap<Key, Entry>>,
    finished: Mutex<VecDeque<Job>>,
    pub stored_bytes: AtomicU64,
    pub served_bytes: AtomicU64,
    pub chunks_verified: AtomicU64,
    pub chunks_served: AtomicU64,
    key_wait_ns: AtomicU64,
    failures: Mutex<HashMap<Failure, u64>>,
}

/// What a job is about when it starts.
pub struct Begin<'a> {
    pub id: Uuid,
    pub share: u8,
    pub kind: JobKind,
    pub client: &'a str,
    /// The SAE that stored the backup.
    pub owner: &'a str,
    pub name: &'a str,
    pub total_bytes: u64,
}

impl<'a> Begin<'a> {
    /// A transfer of the share `m` describes, by `client`.
    pub fn of(m: &'a Manifest, kind: JobKind, client: &'a str) -> Self {
        Begin {
            id: m.backup_id,
            share: m.share_index,
            kind,
            client,
            owner: &m.client_sae,
            name: &m.open.name,
            total_bytes: m.open.chunk_count * u64::from(m.open.chunk_size),
        }
    }
}

impl Jobs {
    /// A request of a job starts (a job is all requests of one client for one share and
    /// direction); the returned handle counts its progress and ends it when dropped.
    pub fn begin(&self, b: Begin<'_>) -> Handle<'_> {
        let key = Key {
            id: b.id,
            share: b.share,
            kind: b.kind,
            client: b.client.to_owned(),
        };
        if let Ok(mut live) = self.live.lock() {
            let revived = self.take_finished(&key);
            let e = live.entry(key.clone()).or_insert_with(|| Entry {
                job: revived.unwrap_or_else(|| Job {
                    backup_id: b.id.to_string(),
                    name: (!b.name.is_empty()).then(|| b.name.to_owned()),
                    share: u32::from(b.share),
                    kind: b.kind,
                    client: b.client.to_owned(),
                    owner: b.owner.to_owned(),
                    bytes: 0,
                    total_bytes: Some(b.total_bytes),
                    started_ms: now_ms(),
                    updated_ms: now_ms(),
                    rate_bps: 0.0,
                    key_wait_ms: 0,
                    client_key_wait_ms: None,
                    running: true,
                    error: None,
                }),
                running: 0,
                marks: VecDeque::new(),
            });
            e.running += 1;
            e.job.running = true;
            e.job.error = None;
        }
        Handle {
            jobs: self,
            key,
            failed: None,
        }
    }

    /// A finished job of `key`, taken back when the client carries on with it.
    fn take_finished(&self, key: &Key) -> Option<Job> {
        let mut f = self.finished.lock().ok()?;
        let at = f.iter().position(|j| {
            j.backup_id == key.id.to_string()
                && j.share == u32::from(key.share)
                && j.kind == key.kind
                && j.client == key.client
        })?;
        f.remove(at)
    }

    fn progress(&self, key: &Key, bytes: u64, key_wait: Duration) {
        let kw = u64::try_from(key_wait.as_nanos()).unwrap_or(u64::MAX);
        self.key_wait_ns.fetch_add(kw, Ordering::Relaxed);
        let Ok(mut live) = self.live.lock() else {
            return;
        };
        let Some(e) = live.get_mut(key) else { return };
        let now = Instant::now();
        e.job.bytes += bytes;
        e.job.key_wait_ms += kw / 1_000_000;
        e.job.updated_ms = now_ms();
        e.marks.push_back((now, e.job.bytes));
        while e
            .marks
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > RATE_WINDOW)
        {
            e.marks.pop_front();
        }
    }

    fn end(&self, key: &Key, failed: Option<(Failure, String)>) {
        if let Some((kind, _)) = &failed {
            if let Ok(mut f) = self.failures.lock() {
                *f.entry(*kind).or_default() += 1;
            }
        }
        let Ok(mut live) = self.live.lock() else {
            return;
        };
        let Some(e) = live.get_mut(key) else { return };
        if let Some((_, why)) = failed {
            e.job.error = Some(why);
        }
        e.running -= 1;
        if e.running > 0 {
            return;
        }
        if let Some(mut e) = live.remove(key) {
            e.job.running = false;
            e.job.rate_bps = 0.0;
            e.job.updated_ms = now_ms();
            if let Ok(mut f) = self.finished.lock() {
                if f.len() == KEEP_FINISHED {
                    f.pop_front();
                }
                f.push_back(e.job);
            }
        }
    }

    /// A request that failed before it became part of a job (refused at admission).
    pub fn failed(&self, kind: Failure) {
        if let Ok(mut f) = self.failures.lock() {
            *f.entry(kind).or_default() += 1;
        }
    }

    /// Running jobs (with their current rate), then the finished ones, newest first.
    pub fn snapshot(&self) -> Vec<Job> {
        let now = Instant::now();
        let mut out: Vec<Job> = Vec::new();
        if let Ok(live) = self.live.lock() {
            for e in live.values() {
                let mut j = e.job.clone();
                j.rate_bps = rate(&e.marks, now);
                out.push(j);
            }
        }
        out.sort_by_key(|j| std::cmp::Reverse(j.started_ms));
        if let Ok(f) = self.finished.lock() {
            out.extend(f.iter().rev().cloned());
        }
        out
    }

    /// Jobs with a request running now.
    pub fn running(&self) -> usize {
        self.live.lock().map_or(0, |l| l.len())
    }

    /// The counters in the Prometheus text format (`disk` = free and total bytes of the
    /// share store's file system, when known).
    pub fn render(&self, disk: Option<(u64, u64)>) -> String {
        let mut out = String::new();
        let c = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        c(
            &mut out,
            "agent_stored_bytes_total",
            "Share bytes received, verified and written durably.",
            self.stored_bytes.load(Ordering::Relaxed),
        );
        c(
            &mut out,
            "agent_served_bytes_total",
            "Share bytes sent back to restoring clients.",
            self.served_bytes.load(Ordering::Relaxed),
        );
        c(
            &mut out,
            "agent_chunks_verified_total",
            "Chunks whose Wegman-Carter tag verified on receipt.",
            self.chunks_verified.load(Ordering::Relaxed),
        );
        c(
            &mut out,
            "agent_chunks_served_total",
            "Chunks sealed and sent to restoring clients.",
            self.chunks_served.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP agent_key_wait_seconds_total Time spent getting QKD key from the KME.\n# TYPE agent_key_wait_seconds_total counter\nagent_key_wait_seconds_total {}",
            self.key_wait_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        out.push_str("# HELP agent_failures_total Failed transfer requests by kind.\n# TYPE agent_failures_total counter\n");
        let f = self.failures.lock().map(|f| f.clone()).unwrap_or_default();
        for kind in Failure::ALL {
            let _ = writeln!(
                out,
                "agent_failures_total{{kind=\"{}\"}} {}",
                kind.label(),
                f.get(&kind).copied().unwrap_or(0)
            );
        }
        let _ = writeln!(
            out,
            "# HELP agent_jobs_running Share transfers with a request running now.\n# TYPE agent_jobs_running gauge\nagent_jobs_running {}",
            self.running()
        );
        if let Some((free, size)) = disk {
            let _ = writeln!(
                out,
                "# HELP agent_disk_free_bytes Free bytes on the share store's file system.\n# TYPE agent_disk_free_bytes gauge\nagent_disk_free_bytes {free}\n\
                 # HELP agent_disk_size_bytes Size of the share store's file system.\n# TYPE agent_disk_size_bytes gauge\nagent_disk_size_bytes {size}"
            );
        }
        out
    }
}

/// Bytes per second over the marks' window.
fn rate(marks: &VecDeque<(Instant, u64)>, now: Instant) -> f64 {
    match (marks.front(), marks.back()) {
        (Some((t0, b0)), Some((_, b1))) if now.duration_since(*t0) > Duration::ZERO => {
            (b1 - b0) as f64 / now.duration_since(*t0).as_secs_f64().max(0.5)
        }
        _ => 0.0,
    }
}

/// One running request of a job.
pub struct Handle<'a> {
    jobs: &'a Jobs,
    key: Key,
    failed: Option<(Failure, String)>,
}

impl Handle<'_> {
    /// `bytes` more moved, after `key_wait` spent getting their key.
    pub fn progress(&self, bytes: u64, key_wait: Duration) {
        self.jobs.progress(&self.key, bytes, key_wait);
    }

    /// The client says it has waited `ms` for key in this backup so far.
    pub fn client_key_wait(&self, ms: u64) {
        if let Ok(mut live) = self.jobs.live.lock() {
            if let Some(e) = live.get_mut(&self.key) {
                e.job.client_key_wait_ms = Some(e.job.client_key_wait_ms.unwrap_or(0).max(ms));
            }
        }
    }

    /// The request failed (recorded when the handle is dropped).
    pub fn fail(&mut self, kind: Failure, why: impl Into<String>) {
        self.failed = Some((kind, why.into()));
    }
}

impl Drop for Handle<'_> {
    fn drop(&mut self) {
        self.jobs.end(&self.key, self.failed.take());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin<'a>(jobs: &'a Jobs, id: Uuid, kind: JobKind) -> Handle<'a> {
        jobs.begin(Begin {
            id,
            share: 1,
            kind,
            client: "SAE_A1",
            owner: "SAE_A1",
            name: "sample.fastq",
            total_bytes: 100,
        })
    }

    #[test]
    fn a_job_runs_while_a_request_does_and_keeps_its_bytes_after() {
        let jobs = Jobs::default();
        let id = Uuid::new_v4();
        let a = begin(&jobs, id, JobKind::Store);
        let b = begin(&jobs, id, JobKind::Store);
        a.progress(30, Duration::from_millis(5));
        b.progress(20, Duration::ZERO);
        drop(a);
        assert_eq!(jobs.running(), 1);
        let j = &jobs.snapshot()[0];
        assert!(j.running);
        assert_eq!(j.bytes, 50);
        assert_eq!(j.key_wait_ms, 5);
        drop(b);
        let j = &jobs.snapshot()[0];
        assert!(!j.running);
        assert_eq!(j.bytes, 50);
        // The client carries on: the same job, its bytes kept.
        let c = begin(&jobs, id, JobKind::Store);
        c.progress(50, Duration::ZERO);
        drop(c);
        let all = jobs.snapshot();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].bytes, 100);
    }

    #[test]
    fn failures_are_counted_by_kind_and_named_on_the_job() {
        let jobs = Jobs::default();
        let mut h = begin(&jobs, Uuid::new_v4(), JobKind::Restore);
        h.fail(Failure::of_status(400), "chunk 3: tag mismatch");
        drop(h);
        assert_eq!(
            jobs.snapshot()[0].error.as_deref(),
            Some("chunk 3: tag mismatch")
        );
        let text = jobs.render(Some((10, 20)));
        assert!(text.contains("agent_failures_total{kind=\"rejected\"} 1"));
        assert!(text.contains("agent_failures_total{kind=\"key\"} 0"));
        assert!(text.contains("agent_disk_free_bytes 10"));
    }

    #[test]
    fn finished_jobs_are_bounded() {
        let jobs = Jobs::default();
        for _ in 0..KEEP_FINISHED + 5 {
            drop(begin(&jobs, Uuid::new_v4(), JobKind::Store));
        }
        assert_eq!(jobs.snapshot().len(), KEEP_FINISHED);
    }
}
