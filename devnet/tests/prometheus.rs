//! Prometheus, for real (Debian's `prometheus` package, installed by `scripts/setup`):
//! `promtool` checks the configuration `devnet up` writes, lints what a KME and an agent
//! serve at `/metrics` (names, types, help texts) and runs the rules' unit tests, and a real
//! Prometheus server scrapes a running devnet (KMEs and site agents) until its
//! query API shows the link's QBER series and a firing `QkdLinkAlarm` while an eavesdropper
//! is on. Bounded: the server runs at most 45 s and is stopped at the end.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use devnet::Options;
use serde_json::Value;

fn tool(name: &str) -> String {
    let bin = format!("/usr/bin/{name}");
    assert!(
        Path::new(&bin).exists(),
        "{bin} not found: run scripts/setup (installs Debian's prometheus)"
    );
    bin
}

fn run(bin: &str, args: &[&str], cwd: &Path) -> String {
    let out = Command::new(bin)
        .args(args)
        .current_dir(cwd)
        .output()
        .expect("promtool runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{bin} {args:?} failed:\n{text}");
    text
}

#[test]
fn prometheus_rules_pass_promtool() {
    let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/prometheus");
    let promtool = tool("promtool");
    let text = run(&promtool, &["check", "rules", "rules.yml"], &deploy);
    assert!(text.contains("SUCCESS"), "{text}");
    let text = run(&promtool, &["test", "rules", "rules_test.yml"], &deploy);
    assert!(text.contains("SUCCESS"), "{text}");
}

/// `promtool check metrics` on what `url` serves (plain HTTP, read with reqwest).
fn lint_metrics(url: &str) {
    use std::io::Write;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let text = rt
        .block_on(async { reqwest::get(url).await?.text().await })
        .expect("metrics");
    let mut child = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics {url}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One instant query; the result vector.
async fn query(http: &reqwest::Client, base: &str, q: &str) -> Vec<Value> {
    let Ok(r) = http
        .get(format!("{base}/api/v1/query"))
        .query(&[("query", q)])
        .send()
        .await
    else {
        return Vec::new();
    };
    let v: Value = r.json().await.unwrap_or_default();
    v["data"]["result"].as_array().cloned().unwrap_or_default()
}

#[test]
fn a_real_prometheus_scrapes_the_devnet_and_fires_the_link_alarm() {
    let net = common::start(Options {
        length_km: Some(10.0),
        ..Options::default()
    });
    let info = common::info(&net).clone();
    let cfg = info.prometheus_config.clone();
    let prom_dir = cfg.parent().expect("folder").to_owned();
    let text = run(
        &tool("promtool"),
        &["check", "config", cfg.to_str().expect("path")],
        &prom_dir,
    );
    assert!(text.contains("SUCCESS"), "{text}");

    // Both kinds of target pass promtool's lint of names, types and help texts.
    for url in [
        info.sites[0].metrics_url.clone(),
        format!("{}/metrics", info.sites[0].agent_metrics_url),
    ] {
        lint_metrics(&url);
    }

    let port = devnet::free_port().expect("port");
    let data = tempfile::tempdir().expect("tsdb");
    let log = std::fs::File::create(net.dir.join("logs").join("prometheus.log")).expect("log");
    let mut server = Command::new(tool("prometheus"))
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.tsdb.path={}", data.path().display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("prometheus starts");

    let op = info.operator.clone().expect("operator");
    let (code, body) = common::operator_post(&info, 0, &op.cert, &op.key, 1.0);
    assert_eq!(code, 200, "{body}");

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(45);
    let (mut qber, mut alerts, mut up) = (Vec::new(), Vec::new(), Vec::new());
    while Instant::now() < deadline {
        (qber, alerts, up) = rt.block_on(async {
            (
                query(
                    &http,
                    &base,
                    "qkd_link_qber_ratio{job=\"kme\",kme=\"KME_A\",peer=\"KME_B\"}",
                )
                .await,
                query(
                    &http,
                    &base,
                    "ALERTS{alertname=\"QkdLinkAlarm\",alertstate=\"firing\"}",
                )
                .await,
                query(&http, &base, "up == 1").await,
            )
        });
        if !alerts.is_empty() && up.len() == 6 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = server.kill();
    let _ = server.wait();

    let q = qber
        .first()
        .and_then(|s| s["value"][1].as_str())
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no QBER series: {qber:?}"));
    assert!(q > 0.11, "QBER {q} should be over the abort threshold");
    assert_eq!(up.len(), 6, "3 KMEs and 3 agents scraped: {up:?}");
    assert_eq!(alerts.len(), 1, "exactly the one link alarmed: {alerts:?}");
    let labels = &alerts[0]["metric"];
    assert_eq!(labels["kme"], "KME_A", "{labels}");
    assert_eq!(labels["peer"], "KME_B", "{labels}");
    assert_eq!(labels["severity"], "critical", "{labels}");
}
