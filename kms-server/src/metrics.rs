//! Prometheus metrics, served in the text exposition format on a separate plain-HTTP
//! listener (`metrics_listen`, for a scraper on the operator's network; no key material).
//!
//! - `qkd_pool_bytes{peer,direction}`: key held per link direction (`own` = allocated here
//!   for local masters, `theirs` = by the peer); `qkd_local_pool_bytes`.
//! - `qkd_key_generated_bytes_total{peer}`, `qkd_key_consumed_bytes_total{peer}`: counters;
//!   rates are `rate()` of them.
//!   `qkd_pool_capacity_bytes` (each direction's).
//! - `qkd_link_qber_ratio{peer}`, `qkd_link_qber_abort_threshold_ratio{peer}`,
//!   `qkd_link_secure_key_rate_bytes_per_second{peer}`, `qkd_link_alarm{peer}` (1 while
//!   aborted) for links with a physical model, and `qkd_link_eavesdropper_ratio{peer}`: all
//!   at the link's producing end only (the smaller KME ID, which models it), so each link
//!   has one series and raises one alert. Names follow Prometheus conventions: base units, `_total` counters,
//!   labels from a bounded set (configured peers, fixed endpoints and codes).
//! - `qkd_relay_keys_total{role}`: keys relayed through trusted nodes, by this KME's role
//!   (`origin`: the master's KME, `transit`: a trusted node on the way, `destination`: the
//!   slaves' KME); the key each hop consumed is in `qkd_key_consumed_bytes_total{peer}`.
//! - `kme_requests_total{endpoint,code}` and `kme_request_duration_seconds{endpoint}`
//!   (histogram) for every HTTP request.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds of the latency histogram, seconds.
const BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 5.0,
];

#[derive(Default)]
struct Histogram {
    count: u64,
    sum: f64,
    buckets: [u64; BUCKETS.len()],
}

/// Counters kept by the KME.
#[derive(Default)]
pub struct Metrics {
    requests: Mutex<HashMap<(String, u16), u64>>,
    latency: Mutex<HashMap<String, Histogram>>,
    generated: Mutex<HashMap<String, u64>>,
    consumed: Mutex<HashMap<String, u64>>,
    relayed: Mutex<HashMap<String, u64>>,
}

fn bump(map: &Mutex<HashMap<String, u64>>, key: &str, by: u64) {
    if let Ok(mut m) = map.lock() {
        *m.entry(key.to_owned()).or_default() += by;
    }
}

impl Metrics {
    /// Records one HTTP request.
    pub fn request(&self, endpoint: &str, code: u16, took: Duration) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((endpoint.to_owned(), code)).or_default() += 1;
        }
        if let Ok(mut m) = self.latency.lock() {
            let h = m.entry(endpoint.to_owned()).or_default();
            let s = took.as_secs_f64();
            h.count += 1;
            h.sum += s;
            for (b, le) in h.buckets.iter_mut().zip(BUCKETS) {
                if s <= le {
                    *b += 1;
                }
            }
        }
    }

    /// Key material that arrived for the link to `peer` (or `local`).
    pub fn generated(&self, peer: &str, bytes: u64) {
        bump(&self.generated, peer, bytes);
    }

    /// Keys relayed, by this KME's role on the path (`origin`, `transit`, `destination`).
    pub fn relayed(&self, role: &str, keys: u64) {
        bump(&self.relayed, role, keys);
    }

    /// Key material handed out or registered on the link to `peer` (or `local`).
    pub fn consumed(&self, peer: &str, bytes: u64) {
        bump(&self.consumed, peer, bytes);
    }

    /// Key material handed out or registered on the link to `peer` since start, bytes.
    pub fn consumed_total(&self, peer: &str) -> u64 {
        self.consumed
            .lock()
            .map_or(0, |m| m.get(peer).copied().unwrap_or(0))
    }

    /// HTTP requests since start by status code, over all endpoints.
    pub fn requests_by_code(&self) -> std::collections::BTreeMap<u16, u64> {
        let mut out = std::collections::BTreeMap::new();
        if let Ok(m) = self.requests.lock() {
            for ((_, code), n) in m.iter() {
                *out.entry(*code).or_default() += n;
            }
        }
        out
    }

    /// The exposition text; `gauges` adds the live pool and link figures.
    pub fn render(&self, gauges: &str) -> String {
        let mut out = String::new();
        out.push_str(gauges);
        out.push_str("# HELP qkd_key_generated_bytes_total Key material received from the link.\n# TYPE qkd_key_generated_bytes_total counter\n");
        if let Ok(m) = self.generated.lock() {
            for (peer, v) in m.iter() {
                let _ = writeln!(out, "qkd_key_generated_bytes_total{{peer=\"{peer}\"}} {v}");
            }
        }
        out.push_str("# HELP qkd_key_consumed_bytes_total Key material handed out or registered.\n# TYPE qkd_key_consumed_bytes_total counter\n");
        if let Ok(m) = self.consumed.lock() {
            for (peer, v) in m.iter() {
                let _ = writeln!(out, "qkd_key_consumed_bytes_total{{peer=\"{peer}\"}} {v}");
            }
        }
        out.push_str("# HELP qkd_relay_keys_total Keys relayed through trusted nodes, by this KME's role.\n# TYPE qkd_relay_keys_total counter\n");
        if let Ok(m) = self.relayed.lock() {
            for (role, v) in m.iter() {
                let _ = writeln!(out, "qkd_relay_keys_total{{role=\"{role}\"}} {v}");
            }
        }
        out.push_str("# HELP kme_requests_total HTTP requests by endpoint and status code.\n# TYPE kme_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((ep, code), v) in m.iter() {
                let _ = writeln!(
                    out,
                    "kme_requests_total{{endpoint=\"{ep}\",code=\"{code}\"}} {v}"
                );
            }
        }
        out.push_str("# HELP kme_request_duration_seconds HTTP request latency.\n# TYPE kme_request_duration_seconds histogram\n");
        if let Ok(m) = self.latency.lock() {
            for (ep, h) in m.iter() {
                for (b, le) in h.buckets.iter().zip(BUCKETS) {
                    let _ = writeln!(
                        out,
                        "kme_request_duration_seconds_bucket{{endpoint=\"{ep}\",le=\"{le}\"}} {b}"
                    );
                }
                let _ = writeln!(
                    out,
                    "kme_request_duration_seconds_bucket{{endpoint=\"{ep}\",le=\"+Inf\"}} {}",
                    h.count
                );
                let _ = writeln!(
                    out,
                    "kme_request_duration_seconds_sum{{endpoint=\"{ep}\"}} {}",
                    h.sum
                );
                let _ = writeln!(
                    out,
                    "kme_request_duration_seconds_count{{endpoint=\"{ep}\"}} {}",
                    h.count
                );
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let m = Metrics::default();
        m.request("GET /x", 200, Duration::from_millis(3));
        m.request("GET /x", 400, Duration::from_millis(300));
        m.generated("KME_B", 10);
        m.consumed("KME_B", 4);
        let t = m.render("");
        assert!(t.contains("kme_requests_total{endpoint=\"GET /x\",code=\"200\"} 1"));
        assert!(
            t.contains("kme_request_duration_seconds_bucket{endpoint=\"GET /x\",le=\"0.005\"} 1")
        );
        assert!(t.contains("kme_request_duration_seconds_bucket{endpoint=\"GET /x\",le=\"0.5\"} 2"));
        assert!(t.contains("kme_request_duration_seconds_count{endpoint=\"GET /x\"} 2"));
        assert!(t.contains("qkd_key_generated_bytes_total{peer=\"KME_B\"} 10"));
        assert!(t.contains("qkd_key_consumed_bytes_total{peer=\"KME_B\"} 4"));
    }
}
