//! The operator's dashboard in a real browser: headless Chromium (Debian's `chromium`,
//! installed by `scripts/setup`), driven over its DevTools protocol, opens the network view
//! of a running 3-site devnet (real KMEs and agents, links on the physical model), sees
//! the links and pools with non-zero values, switches the eavesdropper on with the
//! operator's certificate and sees the alarm within 10 s, then off and sees it clear; a
//! view started with an SAE's certificate has no working switch. Screenshots (desktop and
//! phone width) are saved under `target/dashboard-test/`.
//!
//! Also the KME's own page (`/dashboard/` on its mTLS listener) over HTTPS: who may read,
//! who gets the switch.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use devnet::monitor::{dashboard_url, start_dashboard, DashboardArgs};
use devnet::Options;
use serde_json::{json, Value};

/// Where the screenshots go (kept after the test, for people to look at).
fn artefacts() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("dashboard-test");
    std::fs::create_dir_all(&dir).expect("artefact folder");
    dir
}

/// Headless Chromium with one page, driven over the DevTools protocol.
struct Browser {
    child: Child,
    ws: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Self {
        let bin = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        assert!(
            Path::new(&bin).exists(),
            "{bin} not found: run scripts/setup (installs Debian's chromium), or set CHROMIUM"
        );
        let profile = tempfile::tempdir().expect("profile");
        let mut child = Command::new(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1280,800",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("chromium starts");
        // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID" on stderr.
        let stderr = child.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(at) = line.find("ws://") {
                    let _ = tx.send(line[at..].trim().to_owned());
                }
            }
        });
        let browser_ws = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("chromium's DevTools address within 30 s");
        let host = browser_ws["ws://".len()..]
            .split('/')
            .next()
            .expect("host")
            .to_owned();
        let page_ws = page_target(&host);
        let stream = TcpStream::connect(&host).expect("DevTools port");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let (ws, _) = tungstenite::client(page_ws.as_str(), stream).expect("WebSocket");
        Browser {
            child,
            ws,
            next_id: 0,
            _profile: profile,
        }
    }

    /// One DevTools command; its result.
    fn send(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws
            .send(tungstenite::Message::text(msg))
            .expect("send to chromium");
        loop {
            let m = self.ws.read().expect("reply from chromium");
            let Ok(text) = m.to_text() else { continue };
            let v: Value = serde_json::from_str(text).expect("JSON from chromium");
            if v["id"].as_u64() == Some(id) {
                assert!(v.get("error").is_none(), "{method}: {v}");
                return v["result"].clone();
            }
        }
    }

    /// Evaluates `expr` in the page; its value (promises awaited).
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.send(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        assert!(r.get("exceptionDetails").is_none(), "{expr}: {r}");
        r["result"]["value"].clone()
    }

    fn open(&mut self, url: &str, width: u32, height: u32, mobile: bool) {
        self.send(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile}),
        );
        self.send("Page.navigate", json!({ "url": url }));
    }

    /// Waits until `expr` is true in the page, at most `limit`; how long it took.
    fn wait_for(&mut self, expr: &str, limit: Duration) -> Duration {
        let t = Instant::now();
        loop {
            if self.eval(expr) == Value::Bool(true) {
                return t.elapsed();
            }
            assert!(
                t.elapsed() < limit,
                "not within {limit:?}: {expr}\npage text:\n{}",
                self.eval("document.body.innerText")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// A real mouse click in the middle of the element `selector`.
    fn click(&mut self, selector: &str) {
        let r = self.eval(&format!(
            "(() => {{ const e = document.querySelector('{selector}'); e.scrollIntoView(); \
             const r = e.getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }})()"
        ));
        let (x, y) = (r[0].as_f64().expect("x"), r[1].as_f64().expect("y"));
        for kind in ["mousePressed", "mouseReleased"] {
            self.send(
                "Input.dispatchMouseEvent",
                json!({"type": kind, "x": x, "y": y, "button": "left", "clickCount": 1}),
            );
        }
    }

    fn screenshot(&mut self, path: &Path) {
        use base64::Engine;
        let r = self.send("Page.captureScreenshot", json!({"format": "png"}));
        let png = base64::engine::general_purpose::STANDARD
            .decode(r["data"].as_str().expect("data"))
            .expect("base64");
        std::fs::write(path, png).expect("screenshot written");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The WebSocket address of a new page (`PUT /json/new`).
fn page_target(host: &str) -> String {
    let mut s = TcpStream::connect(host).expect("DevTools port");
    write!(
        s,
        "PUT /json/new?about:blank HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .expect("request");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    // Read until the whole JSON object is in (the server may keep the connection open).
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !text.trim_end().ends_with('}') {
        let n = s.read(&mut buf).expect("reply from DevTools");
        assert!(n > 0, "DevTools closed the connection: {text}");
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let body = &text[text.find('{').expect("JSON")..];
    let target: Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("new target: {e}: {text}"));
    target["webSocketDebuggerUrl"]
        .as_str()
        .unwrap_or_else(|| panic!("no page address: {text}"))
        .to_owned()
}

/// Whether the link card `key` shows the alarm.
fn alarm_shown(key: &str) -> String {
    format!("document.querySelector('[data-link=\"{key}\"]')?.dataset.alarm === 'true'")
}

/// Whether the link card `key` shows no alarm.
fn alarm_clear(key: &str) -> String {
    format!("document.querySelector('[data-link=\"{key}\"]')?.dataset.alarm === 'false'")
}

#[test]
fn the_network_view_shows_links_live_and_only_an_operator_switches_the_eavesdropper() {
    let net = common::start(Options {
        length_km: Some(10.0),
        dashboard: true,
        ..Options::default()
    });
    let info = common::info(&net).clone();
    let out = artefacts();
    let mut b = Browser::start();

    // The operator's view: both links, pools with key, a chart, the switch enabled.
    b.open(&info.dashboard_url, 1280, 800, false);
    b.wait_for(
        "document.querySelectorAll('[data-link]').length === 2 \
         && document.querySelectorAll('[data-kme]').length === 3 \
         && document.querySelectorAll('[data-agent]').length === 3",
        Duration::from_secs(20),
    );
    let link = "KME_A-KME_B";
    // The live figures arrive with the stream (the first samples may predate the links).
    b.wait_for(
        &format!(
            "(() => {{ const c = document.querySelector('[data-link=\"{link}\"]'); \
             return c.innerText.includes('QBER') \
             && [...c.querySelectorAll('[data-pool] > div')].every(d => parseFloat(d.style.width) > 0); }})()"
        ),
        Duration::from_secs(20),
    );
    let figures = b.eval(&format!(
        "(() => {{ const c = document.querySelector('[data-link=\"{link}\"]'); \
         return {{ text: c.innerText, pools: [...c.querySelectorAll('[data-pool] > div')].map(d => parseFloat(d.style.width)), \
         lines: c.querySelectorAll('svg polyline').length, \
         threshold: c.querySelectorAll('svg line.threshold').length, \
         button: !document.querySelector('[data-eavesdropper=\"{link}\"]').disabled }}; }})()"
    ));
    let text = figures["text"].as_str().expect("text");
    assert!(text.contains("QBER") && text.contains("OK"), "{text}");
    assert!(
        figures["pools"]
            .as_array()
            .expect("pools")
            .iter()
            .all(|w| w.as_f64().expect("width") > 0.0),
        "pools should hold key: {figures}"
    );
    assert!(
        figures["lines"].as_u64() >= Some(2),
        "QBER and key rate charts: {figures}"
    );
    assert_eq!(figures["threshold"], 1, "the abort threshold is drawn");
    assert_eq!(figures["button"], true, "the operator's switch works");
    assert!(
        b.eval("document.getElementById('status').textContent") == "live",
        "the page follows the event stream"
    );

    // Eavesdropper on: the alarm shows within 10 s, in colour.
    b.click(&format!("[data-eavesdropper=\"{link}\"]"));
    let took = b.wait_for(&alarm_shown(link), Duration::from_secs(10));
    eprintln!("alarm shown {took:?} after the click");
    assert_eq!(
        b.eval(&format!(
            "getComputedStyle(document.querySelector('[data-link=\"{link}\"] .badge')).backgroundColor"
        )),
        "rgb(198, 40, 40)",
        "the alarm badge is red"
    );
    assert!(
        b.eval(&alarm_clear("KME_A-KME_C")) == true,
        "the other link stays clear"
    );
    b.screenshot(&out.join("network-alarm.png"));

    // Off again: the alarm clears within 10 s.
    b.click(&format!("[data-eavesdropper=\"{link}\"]"));
    let took = b.wait_for(&alarm_clear(link), Duration::from_secs(10));
    eprintln!("alarm cleared {took:?} after the click");

    // A sample set from site A: its shares' jobs appear at the agents that received them,
    // named by set and file.
    let files = tempfile::tempdir().expect("tempdir");
    let file = common::random_file(files.path(), "sample-0001.fastq", 3 << 20);
    let r = common::client(
        &info,
        0,
        &["store", "--set", "lab-run", file.to_str().expect("path")],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    for agent in ["AGENT_A", "AGENT_B", "AGENT_C"] {
        b.wait_for(
            &format!(
                "[...document.querySelectorAll('[data-agent=\"{agent}\"] tbody tr')] \
                 .some(r => r.innerText.includes('lab-run/sample-0001.fastq') && r.innerText.includes('store') \
                 && r.innerText.includes('(100 %)') \
                 && /client \\d+\\.\\d s · agent \\d+\\.\\d s/.test(r.innerText))"
            ),
            Duration::from_secs(10),
        );
    }
    // The README's picture: the whole page, jobs included.
    b.send(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": 1280, "height": 1060, "deviceScaleFactor": 1, "mobile": false}),
    );
    b.eval("window.scrollTo(0, 0)");
    std::thread::sleep(Duration::from_millis(300));
    b.screenshot(&out.join("network.png"));

    // Phone width: one column, nothing wider than the screen.
    b.open(&info.dashboard_url, 390, 844, true);
    b.wait_for(
        "document.querySelectorAll('[data-link]').length === 2",
        Duration::from_secs(20),
    );
    assert_eq!(
        b.eval("document.documentElement.scrollWidth <= window.innerWidth"),
        true,
        "no horizontal scrolling at phone width"
    );
    b.screenshot(&out.join("network-phone.png"));

    // An SAE's view: read-only; the switch is disabled, and forcing the request gets the
    // KME's 401 and changes nothing.
    let sae = &info.sites[1].saes[0];
    let port = devnet::free_port().expect("port");
    let token = "sae-view-token-0123456789";
    let log = net.dir.join("logs").join("dashboard-sae.log");
    let mut view = start_dashboard(&DashboardArgs {
        info: &info,
        cert: &sae.cert,
        key: &sae.key,
        port,
        token,
        log: &log,
    })
    .expect("SAE dashboard");
    let url = dashboard_url(port, token);
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "SAE dashboard not listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    b.open(&url, 1280, 800, false);
    b.wait_for(
        "document.querySelectorAll('[data-link]').length === 2",
        Duration::from_secs(20),
    );
    assert_eq!(
        b.eval(&format!(
            "document.querySelector('[data-eavesdropper=\"{link}\"]').disabled"
        )),
        true
    );
    assert!(b
        .eval("document.getElementById('viewer').textContent")
        .as_str()
        .is_some_and(|v| v.contains(&sae.id) && v.contains("sae")));
    let forced = b.eval(&format!(
        "fetch('api/kmes/KME_A/links/KME_B/eavesdropper?token={token}', \
         {{method: 'POST', headers: {{'content-type': 'application/json'}}, body: '{{\"fraction\": 1}}'}}) \
         .then(async r => [r.status, (await r.json()).message])"
    ));
    assert_eq!(forced[0], 401, "{forced}");
    assert!(
        forced[1].as_str().is_some_and(|m| m.contains("operator")),
        "{forced}"
    );
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(b.eval(&alarm_clear(link)), true, "nothing switched");

    // Without the token: nothing.
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    write!(s, "GET /api/view HTTP/1.0\r\nHost: x\r\n\r\n").expect("request");
    let mut reply = String::new();
    s.read_to_string(&mut reply).expect("reply");
    assert!(
        reply.starts_with("HTTP/1.0 401") || reply.starts_with("HTTP/1.1 401"),
        "{reply}"
    );
    let _ = view.kill();
    let _ = view.wait();
}

/// GET `path` at site 0's KME with `cert`/`key`: status and body.
fn kme_get(info: &devnet::DevnetInfo, cert: &Path, key: &Path, path: &str) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ca = std::fs::read(&info.ca_cert).expect("ca");
    let ident = etsi_spec::Identity::from_files(cert, key).expect("identity");
    let url = &info.sites[0].kme_url;
    let http = etsi_spec::Client::new(url, &ca, Some(&ident))
        .expect("client")
        .http()
        .clone();
    rt.block_on(async {
        let r = http
            .get(format!("{url}{path}"))
            .send()
            .await
            .expect("reply");
        (r.status().as_u16(), r.text().await.expect("body"))
    })
}

#[test]
fn a_kme_serves_its_own_dashboard_to_every_certificate_and_the_switch_to_operators() {
    let net = common::start(Options {
        length_km: Some(10.0),
        agents: false,
        ..Options::default()
    });
    let info = common::info(&net);
    let op = info.operator.clone().expect("operator");
    let sae = &info.sites[1].saes[0];

    let (code, page) = kme_get(info, &sae.cert, &sae.key, "/dashboard/");
    assert_eq!(code, 200);
    assert!(page.contains("app.js"), "{page}");
    let (code, js) = kme_get(info, &sae.cert, &sae.key, "/dashboard/app.js");
    assert_eq!(code, 200);
    assert!(js.contains("EventSource"));
    let (code, body) = kme_get(info, &sae.cert, &sae.key, "/dashboard/nothing.js");
    assert_eq!(code, 404);
    assert!(body.contains("\"message\""), "spec's error format: {body}");

    // Let a sample or two accumulate.
    std::thread::sleep(Duration::from_millis(2500));
    let (code, view) = kme_get(info, &sae.cert, &sae.key, "/dashboard/api/view");
    assert_eq!(code, 200);
    let view: Value = serde_json::from_str(&view).expect("view");
    assert_eq!(view["viewer"]["role"], "sae");
    assert_eq!(view["eavesdropper_path"], Value::Null);
    let history = view["history"].as_array().expect("history");
    assert!(!history.is_empty());
    let links = &history[history.len() - 1]["kmes"][0]["links"];
    assert_eq!(links.as_array().map(Vec::len), Some(2), "{links}");
    assert!(links[0]["qber"]
        .as_f64()
        .is_some_and(|q| q > 0.0 && q < 0.11));
    assert!(links[0]["own_bytes"].as_u64() > Some(0));

    let (code, view) = kme_get(info, &op.cert, &op.key, "/dashboard/api/view");
    assert_eq!(code, 200);
    let view: Value = serde_json::from_str(&view).expect("view");
    assert_eq!(view["viewer"]["role"], "operator");
    assert!(view["eavesdropper_path"].is_string());

    // The live stream: an event within a few seconds.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let ca = std::fs::read(&info.ca_cert).expect("ca");
    let ident = etsi_spec::Identity::from_files(&sae.cert, &sae.key).expect("identity");
    let url = &info.sites[0].kme_url;
    let http = etsi_spec::Client::new(url, &ca, Some(&ident))
        .expect("client")
        .http()
        .clone();
    let first = rt.block_on(async {
        let mut r = http
            .get(format!("{url}/dashboard/api/events"))
            .send()
            .await
            .expect("events");
        assert_eq!(
            r.headers()["content-type"].to_str().ok(),
            Some("text/event-stream")
        );
        tokio::time::timeout(Duration::from_secs(5), r.chunk())
            .await
            .expect("an event within 5 s")
            .expect("chunk")
            .expect("not the end")
    });
    let text = String::from_utf8_lossy(&first);
    assert!(
        text.starts_with("data: {") && text.contains("KME_A"),
        "{text}"
    );
}
