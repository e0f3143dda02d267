//! `dashboard-web`: the operator's dashboard page and the JSON documents it reads.
//!
//! Owns: the static assets of the page (HTML, JavaScript, CSS, embedded in the binaries
//! that serve them: no CDN, nothing fetched from the internet), the types of the documents
//! behind it, and the [`Feed`] of samples both servers keep (history and live stream). Two servers use it: the KME, which serves its own view at
//! `/dashboard/` on its mTLS listener, and the `qkd-dashboard` command, which gathers every
//! KME and site agent of a network into one view.
//!
//! Must never depend on: anything else of the workspace. The KME and the backup side both
//! link this crate, so it knows neither; it only describes what they report.
//!
//! The page asks `api/view` once (who is looking, what they may do, the history so far),
//! then follows `api/events`, a server-sent event stream of [`Update`]s, one every
//! [`SAMPLE_INTERVAL_MS`]. Paths are relative, so the same page works under `/dashboard/`
//! at a KME and at the root of `qkd-dashboard`; a `token` query parameter in the page's
//! address is passed on to every request.
//!
//! Charts are drawn by the page itself as SVG polylines (about a hundred lines of
//! JavaScript): a charting library would be the larger part of the page, and a few series
//! of at most [`HISTORY_SAMPLES`] points need none of its features.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How often the servers sample their state, milliseconds.
pub const SAMPLE_INTERVAL_MS: u64 = 1000;

/// Samples of history kept and sent to a page when it opens (10 minutes).
pub const HISTORY_SAMPLES: usize = 600;

/// The page.
pub const INDEX_HTML: &str = include_str!("../assets/index.html");
/// Its script.
pub const APP_JS: &str = include_str!("../assets/app.js");
/// Its style sheet.
pub const APP_CSS: &str = include_str!("../assets/app.css");

/// An embedded asset by the file name the page uses: `(content type, body)`.
pub fn asset(name: &str) -> Option<(&'static str, &'static str)> {
    match name {
        "" | "index.html" => Some(("text/html; charset=utf-8", INDEX_HTML)),
        "app.js" => Some(("text/javascript; charset=utf-8", APP_JS)),
        "app.css" => Some(("text/css; charset=utf-8", APP_CSS)),
        _ => None,
    }
}

/// What the viewer's certificate makes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// An operator (may switch the eavesdropper).
    Operator,
    /// An SAE: reads only.
    Sae,
    /// A KME (a peer): reads only.
    Kme,
}

/// Who is looking.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Viewer {
    /// The certificate's identity (operator name, SAE ID, KME ID).
    pub name: String,
    pub role: Role,
}

/// One link as one of its KMEs sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkSample {
    /// The KME at the other end.
    pub peer: String,
    /// Whether this KME models the link (its producing end: QBER, rate, eavesdropper).
    pub producer: bool,
    /// Quantum bit error rate, 0..1, where the link runs a physical model.
    pub qber: Option<f64>,
    /// Modelled secure key rate, bits per second.
    pub secure_key_rate_bps: Option<f64>,
    /// The QBER above which the link aborts.
    pub abort_qber: Option<f64>,
    /// The link is aborted (QBER over the threshold): no key flows.
    pub alarm: bool,
    /// Fraction of pulses the modelled eavesdropper takes (0 = none).
    pub eavesdropper: f64,
    /// Key held for masters at this KME, bytes.
    pub own_bytes: u64,
    /// Key held for masters at the peer, bytes.
    pub theirs_bytes: u64,
    /// Capacity of each direction's pool, bytes.
    pub capacity_bytes: u64,
    /// Key handed out or registered on this link since start, bytes.
    pub consumed_bytes_total: u64,
}

/// One KME at one instant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct KmeSample {
    pub kme_id: String,
    /// Milliseconds since the Unix epoch.
    pub t_ms: u64,
    pub links: Vec<LinkSample>,
    /// HTTP requests since start by status code.
    pub requests_total: BTreeMap<u16, u64>,
    /// Keys held for slaves not yet fetched.
    pub keys_awaiting_slaves: u64,
}

/// Whether a job stores shares at the agent, serves them back, or renews them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Store,
    Restore,
    /// A share renewal's deltas arriving (see the agent's `renewal`).
    Renew,
}

/// One share transfer a site agent sees: a client storing a share there, or restoring one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub backup_id: String,
    /// File name the client gave, if any.
    pub name: Option<String>,
    pub share: u32,
    pub kind: JobKind,
    /// The client SAE.
    pub client: String,
    /// The SAE that stored the backup (the client, for stores).
    #[serde(default)]
    pub owner: String,
    /// Share bytes moved so far.
    pub bytes: u64,
    /// The share's length, when known.
    pub total_bytes: Option<u64>,
    pub started_ms: u64,
    pub updated_ms: u64,
    /// Bytes per second over the last few seconds (0 when idle).
    pub rate_bps: f64,
    /// Time the agent waited for QKD key for this job, milliseconds.
    pub key_wait_ms: u64,
    /// Time the client reports it waited for QKD key in this backup, milliseconds (stores).
    #[serde(default)]
    pub client_key_wait_ms: Option<u64>,
    /// Requests of this job running now.
    pub running: bool,
    /// The last failure, if the job's last request failed.
    pub error: Option<String>,
}

/// One site agent at one instant.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentSample {
    /// The agent's SAE ID.
    pub agent: String,
    pub t_ms: u64,
    /// Running jobs first, then the most recent finished ones.
    pub jobs: Vec<Job>,
}

/// A source that could not be read this time (KME or agent unreachable).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Unreachable {
    /// KME ID or agent ID.
    pub name: String,
    pub error: String,
}

/// One sample of everything the page shows: a server-sent event.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Update {
    pub t_ms: u64,
    pub kmes: Vec<KmeSample>,
    pub agents: Vec<AgentSample>,
    pub unreachable: Vec<Unreachable>,
}

/// What the page reads once when it opens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct View {
    /// "KME_A" for a KME's own page, "network" for `qkd-dashboard`.
    pub title: String,
    pub viewer: Viewer,
    /// The eavesdropper switch, relative to the page, with `{kme}` and `{peer}` to fill in;
    /// absent for viewers who may not use it. A POST of `{"fraction": f}` switches it.
    pub eavesdropper_path: Option<String>,
    /// Samples so far, oldest first.
    pub history: Vec<Update>,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// A bounded history of updates, oldest first.
#[derive(Debug, Default)]
pub struct History {
    samples: std::collections::VecDeque<Update>,
}

impl History {
    /// Adds a sample, dropping the oldest past [`HISTORY_SAMPLES`].
    pub fn push(&mut self, u: Update) {
        if self.samples.len() == HISTORY_SAMPLES {
            self.samples.pop_front();
        }
        self.samples.push_back(u);
    }

    /// All samples, oldest first.
    pub fn to_vec(&self) -> Vec<Update> {
        self.samples.iter().cloned().collect()
    }
}

/// One server-sent event carrying `u`: a `data:` line (JSON has no raw newlines) and the
/// blank line that ends the event.
pub fn sse_frame(u: &Update) -> String {
    let json = serde_json::to_string(u).unwrap_or_else(|_| "{}".to_owned());
    format!("data: {json}\n\n")
}

/// Headers of every reply of a dashboard: nothing loaded from elsewhere, no framing, no
/// sniffing, no referrer, nothing cached.
pub const SECURITY_HEADERS: [(&str, &str); 4] = [
    (
        "content-security-policy",
        "default-src 'self'; frame-ancestors 'none'",
    ),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("cache-control", "no-store"),
];

/// The samples of a dashboard server: the history a page gets when it opens, and the live
/// event stream of every page that follows.
pub struct Feed {
    history: std::sync::Mutex<History>,
    live: tokio::sync::broadcast::Sender<std::sync::Arc<str>>,
}

impl Default for Feed {
    fn default() -> Self {
        Feed {
            history: std::sync::Mutex::new(History::default()),
            live: tokio::sync::broadcast::channel(16).0,
        }
    }
}

impl Feed {
    /// A new sample: kept, and sent to every stream.
    pub fn push(&self, u: Update) {
        let frame: std::sync::Arc<str> = sse_frame(&u).into();
        if let Ok(mut h) = self.history.lock() {
            h.push(u);
        }
        // No page following is not an error.
        let _ = self.live.send(frame);
    }

    /// The samples so far, oldest first.
    pub fn history(&self) -> Vec<Update> {
        self.history.lock().map(|h| h.to_vec()).unwrap_or_default()
    }

    /// The event stream of the samples from now on (a page too slow to keep up skips
    /// samples rather than holding them).
    pub fn follow<E>(&self) -> impl futures_core::Stream<Item = Result<bytes::Bytes, E>> + 'static {
        use tokio::sync::broadcast::error::RecvError;
        futures_util::stream::unfold(self.live.subscribe(), |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(frame) => {
                        let b = bytes::Bytes::copy_from_slice(frame.as_bytes());
                        return Some((Ok(b), rx));
                    }
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return None,
                }
            }
        })
    }
}

/// A comment line that keeps an idle event stream (and the proxies on its way) open.
pub const SSE_KEEPALIVE: &str = ": keep-alive\n\n";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_keeps_the_newest_samples() {
        let mut h = History::default();
        for t in 0..(HISTORY_SAMPLES as u64 + 5) {
            h.push(Update {
                t_ms: t,
                ..Update::default()
            });
        }
        let v = h.to_vec();
        assert_eq!(v.len(), HISTORY_SAMPLES);
        assert_eq!(v[0].t_ms, 5);
    }

    #[test]
    fn an_event_is_one_data_line() {
        let u = Update {
            t_ms: 7,
            unreachable: vec![Unreachable {
                name: "KME_B".into(),
                error: "line one\nline two".into(),
            }],
            ..Update::default()
        };
        let f = sse_frame(&u);
        assert!(f.starts_with("data: {"));
        assert!(f.ends_with("}\n\n"));
        assert_eq!(f.matches('\n').count(), 2);
        let back: Update = serde_json::from_str(&f[6..f.len() - 2]).unwrap();
        assert_eq!(back, u);
    }

    #[test]
    fn every_asset_the_page_names_is_embedded() {
        for name in ["app.js", "app.css"] {
            assert!(INDEX_HTML.contains(name), "{name}");
            assert!(asset(name).is_some());
        }
        assert!(asset("../secret").is_none());
    }
}
