//! Watching a devnet: the Prometheus configuration `devnet up` writes for the network's
//! real ports (with the rules of `deploy/prometheus/`), and the `qkd-dashboard` process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

use crate::DevnetInfo;

/// The recording and alerting rules (`deploy/prometheus/rules.yml`).
pub const RULES: &str = include_str!("../../deploy/prometheus/rules.yml");
/// Their unit tests for `promtool test rules`.
pub const RULES_TEST: &str = include_str!("../../deploy/prometheus/rules_test.yml");

/// `host:port` of an `http://host:port/...` URL.
fn target(url: &str) -> Option<&str> {
    let rest = url.strip_prefix("http://")?;
    Some(rest.split('/').next().unwrap_or(rest))
}

/// The Prometheus configuration for `info`: every KME's and agent's metrics listener,
/// scraped every second (a devnet is small; use 15 s or more in production), labelled
/// with the KME ID and site.
pub fn prometheus_yml(info: &DevnetInfo) -> String {
    let mut kmes = String::new();
    let mut agents = String::new();
    for s in &info.sites {
        if let Some(t) = target(&s.metrics_url) {
            kmes.push_str(&format!(
                "      - targets: [\"{t}\"]\n        labels: {{kme: \"{}\", site: \"{}\"}}\n",
                s.kme_id, s.name
            ));
        }
        if let Some(t) = target(&s.agent_metrics_url) {
            agents.push_str(&format!(
                "      - targets: [\"{t}\"]\n        labels: {{agent: \"{}\", site: \"{}\"}}\n",
                s.agent_sae_id, s.name
            ));
        }
    }
    let mut y = String::from(
        "# Written by `devnet up` for this network's ports. Rules: rules.yml (from deploy/prometheus).\n\
         global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - rules.yml\n\
         scrape_configs:\n  - job_name: kme\n    static_configs:\n",
    );
    y.push_str(&kmes);
    if !agents.is_empty() {
        y.push_str("  - job_name: agent\n    static_configs:\n");
        y.push_str(&agents);
    }
    y
}

/// Writes `DIR/prometheus/prometheus.yml`, `rules.yml` and `rules_test.yml`; returns the
/// configuration's path.
pub fn write_prometheus(dir: &Path, info: &DevnetInfo) -> Result<PathBuf> {
    let p = dir.join("prometheus");
    std::fs::create_dir_all(&p)?;
    std::fs::write(p.join("rules.yml"), RULES)?;
    std::fs::write(p.join("rules_test.yml"), RULES_TEST)?;
    let cfg = p.join("prometheus.yml");
    std::fs::write(&cfg, prometheus_yml(info))?;
    Ok(cfg)
}

/// What a dashboard needs to start.
pub struct DashboardArgs<'a> {
    pub info: &'a DevnetInfo,
    /// Certificate and key to act with.
    pub cert: &'a Path,
    pub key: &'a Path,
    pub port: u16,
    pub token: &'a str,
    pub log: &'a Path,
}

/// Starts `qkd-dashboard` over every KME and agent of the network; its page is at
/// `http://127.0.0.1:PORT/?token=TOKEN`.
pub fn start_dashboard(a: &DashboardArgs<'_>) -> Result<Child> {
    use std::os::unix::process::CommandExt;
    let bin = crate::sibling_binary("qkd-dashboard")?;
    let mut cmd = Command::new(&bin);
    for s in &a.info.sites {
        cmd.arg("--kme").arg(&s.kme_url);
        if !s.agent_metrics_url.is_empty() {
            cmd.arg("--agent").arg(&s.agent_metrics_url);
        }
    }
    let out = std::fs::File::create(a.log)?;
    cmd.arg("--ca")
        .arg(&a.info.ca_cert)
        .arg("--cert")
        .arg(a.cert)
        .arg("--key")
        .arg(a.key)
        .arg("--listen")
        .arg(format!("127.0.0.1:{}", a.port))
        .env("QKD_DASHBOARD_TOKEN", a.token)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))
}

/// The page of a dashboard on `port` with `token`.
pub fn dashboard_url(port: u16, token: &str) -> String {
    format!("http://127.0.0.1:{port}/?token={token}")
}
