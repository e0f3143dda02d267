//! End-to-end tests of the KME's defences against hostile callers: real `kms-server`
//! processes, real certificates, 127.0.0.1 only. Tolerant reading of unknown JSON members,
//! bounded request heads, prompt answers to malformed requests, a bound on keys awaiting
//! slaves (and a quick restart in that state), identities by role (KME and operator SANs),
//! revocation, and the modes of the files a KME creates.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{call, frozen_net, ids_of, raw, sae_files, start, DEC, ENC, STATUS};
use devnet::{DevnetInfo, Options};
use openssl::ssl::{SslAcceptor, SslConnector, SslFiletype, SslMethod, SslStream, SslVerifyMode};
use serde_json::{json, Value};

fn pki_dir(info: &DevnetInfo) -> &Path {
    info.ca_cert.parent().expect("pki folder")
}

/// A reqwest client presenting the certificate `stem.pem/.key` of the devnet's PKI.
fn client_with(info: &DevnetInfo, stem: &str, site: usize) -> reqwest::Client {
    let dir = pki_dir(info);
    let ca = std::fs::read(&info.ca_cert).unwrap();
    let ident = etsi_spec::Identity::from_files(
        &dir.join(format!("{stem}.pem")),
        &dir.join(format!("{stem}.key")),
    )
    .expect("identity");
    etsi_spec::Client::new(&info.sites[site].kme_url, &ca, Some(&ident))
        .expect("client")
        .http()
        .clone()
}

/// A TLS connection to site `site`'s KME with `sae`'s certificate.
fn tls(info: &DevnetInfo, sae: &str, site: usize) -> SslStream<TcpStream> {
    let (cert, key) = sae_files(info, sae);
    let mut b = SslConnector::builder(SslMethod::tls_client()).unwrap();
    b.set_ca_file(&info.ca_cert).unwrap();
    b.set_certificate_chain_file(&cert).unwrap();
    b.set_private_key_file(&key, SslFiletype::PEM).unwrap();
    let addr = info.sites[site].kme_url.trim_start_matches("https://");
    let tcp = TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    b.build().connect("127.0.0.1", tcp).expect("TLS handshake")
}

/// Reads until the server closes the connection (or 10 s pass); the text and how long it
/// took until the close.
fn read_to_close(s: &mut SslStream<TcpStream>) -> (String, Duration, bool) {
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    let closed = loop {
        match s.ssl_read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => {
                break e.code() == openssl::ssl::ErrorCode::ZERO_RETURN
                    || e.code() == openssl::ssl::ErrorCode::SYSCALL
            }
        }
    };
    (
        String::from_utf8_lossy(&out).into_owned(),
        start.elapsed(),
        closed,
    )
}

/// Sends `bytes` on a fresh connection; the reply up to the close and how long it took.
fn exchange(info: &DevnetInfo, bytes: &[u8]) -> (String, Duration, bool) {
    let mut s = tls(info, "SAE_A1", 0);
    // A large head may be refused before it is all sent: a failed write is fine.
    let _ = s.write_all(bytes);
    read_to_close(&mut s)
}

fn body_json(reply: &str) -> Value {
    let body = reply.split("\r\n\r\n").nth(1).unwrap_or("");
    serde_json::from_str(body).unwrap_or(Value::Null)
}

#[test]
fn hostile_heads_and_request_lines_are_answered_at_once() {
    let net = start(Options {
        rate_bytes_per_sec: 1,
        max_key_count: 2000,
        agents: false,
        extra_toml: "\n[http]\nhead_timeout_ms = 1500\nkeep_alive_secs = 2\n".into(),
        ..Options::default()
    });
    let info = &net.info;
    let path = "/api/v1/keys/SAE_B1/status";

    // A head over http.max_head_bytes (16 KiB): 431 in the spec's Error format.
    let pad = "x".repeat(20_000);
    let (r, took, _) = exchange(
        info,
        format!("GET {path} HTTP/1.1\r\nHost: kme\r\nX-Pad: {pad}\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    );
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    // Not a 014 reply (014 lists 400, 401, 503), but still in its Error format.
    common::spec_check("get", "/not-in-014", 431, &body_json(&r));
    assert!(body_json(&r)["message"]
        .as_str()
        .unwrap()
        .contains("max_head_bytes"));
    assert!(took < Duration::from_secs(2), "{took:?}");

    // More than http.max_headers (64) fields: 431 naming the limit.
    let many: String = (0..70).map(|i| format!("X-H{i}: v\r\n")).collect();
    let (r, _, _) = exchange(
        info,
        format!("GET {path} HTTP/1.1\r\nHost: kme\r\n{many}Connection: close\r\n\r\n").as_bytes(),
    );
    assert!(r.starts_with("HTTP/1.1 431"), "{r}");
    assert!(body_json(&r)["message"]
        .as_str()
        .unwrap()
        .contains("max_headers"));

    // A head past the HTTP layer's own bound (128 KiB): 431 and the connection closed.
    let huge = "x".repeat(140_000);
    let (r, took, closed) = exchange(
        info,
        format!("GET {path} HTTP/1.1\r\nHost: kme\r\nX-Pad: {huge}\r\n\r\n").as_bytes(),
    );
    assert!(r.is_empty() || r.starts_with("HTTP/1.1 431"), "{r}");
    assert!(closed && took < Duration::from_secs(2), "{took:?}");

    // Malformed request lines: 400 and closed at once.
    for bad in [
        "GARBAGE\r\n\r\n",
        "GET\r\n\r\n",
        "GET / HTTP/9.9\r\n\r\n",
        "GET /\x01 HTTP/1.1\r\n\r\n",
    ] {
        let (r, took, closed) = exchange(info, bad.as_bytes());
        assert!(r.starts_with("HTTP/1.1 400"), "{bad:?}: {r}");
        assert!(closed && took < Duration::from_secs(1), "{bad:?}: {took:?}");
    }

    // A head that never completes, and a connection that sends nothing: 408 / closed after
    // http.head_timeout_ms (1.5 s here), not held open.
    for partial in ["GET /api/v1/keys/SAE_B1/status HTTP/1.1\r\nHost", ""] {
        let (_, took, closed) = exchange(info, partial.as_bytes());
        assert!(
            closed && took < Duration::from_secs(4),
            "{partial:?}: {took:?}"
        );
    }

    // An idle keep-alive connection is closed after http.keep_alive_secs (2 s here).
    let mut s = tls(info, "SAE_A1", 0);
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: kme\r\n\r\n").as_bytes())
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.ssl_read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let (_, idle, closed) = read_to_close(&mut s);
    assert!(closed && idle < Duration::from_secs(5), "idle for {idle:?}");

    // Any method token a client sends is counted under a fixed label.
    let (r, _, _) = exchange(
        info,
        format!("FROBNICATE {path} HTTP/1.1\r\nHost: kme\r\nConnection: close\r\n\r\n").as_bytes(),
    );
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    let rt = tokio::runtime::Runtime::new().unwrap();
    let metrics = rt.block_on(async {
        reqwest::get(&info.sites[0].metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    assert!(!metrics.contains("FROBNICATE"), "{metrics}");
    assert!(metrics.contains("endpoint=\"OTHER /api/v1/keys/{slave}/status\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_members_are_ignored_so_a_qukaydee_client_gets_its_keys() {
    let net = frozen_net(2000);
    let info = &net.info;
    let (a1, base_a) = raw(info, Some("SAE_A1"), 0);
    let (b1, base_b) = raw(info, Some("SAE_B1"), 1);
    let got = call(
        &a1,
        "post",
        &format!("{base_a}/SAE_B1/enc_keys"),
        ENC,
        Some(r#"{"number":2,"size":256,"vendor_hint":{"x":1}}"#),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.body);
    let ids = ids_of(&got.body);
    assert_eq!(ids.len(), 2);
    // What the QURSA C client (QuKayDee build) sends: master_SAE_ID inside each reference.
    let body = json!({
        "key_IDs": ids.iter().map(|id| json!({"key_ID": id, "master_SAE_ID": "SAE_A1"})).collect::<Vec<_>>(),
        "client": "qukaydee",
    });
    let back = call(
        &b1,
        "post",
        &format!("{base_b}/SAE_A1/dec_keys"),
        DEC,
        Some(&body.to_string()),
    )
    .await;
    assert_eq!(back.status, 200, "{}", back.body);
    assert_eq!(back.body["keys"], got.body["keys"], "the master's keys");
    // Strict where 014 is strict: an unsupported mandatory extension is still refused, and a
    // body that is not an object too.
    let r = call(
        &a1,
        "post",
        &format!("{base_a}/SAE_B1/enc_keys"),
        ENC,
        Some(r#"{"extension_mandatory":[{"route_via":"KME_C"}],"x":1}"#),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.body.to_string().contains("route_via"));
    let r = call(
        &b1,
        "post",
        &format!("{base_b}/SAE_A1/dec_keys"),
        DEC,
        Some(&json!([{"key_IDs": [{"key_ID": ids[0]}]}]).to_string()),
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.body["message"].as_str().unwrap().contains("object"));
}

/// VmRSS of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sae_hoarding_unfetched_local_keys_hits_its_bound_and_the_kme_restarts_quickly() {
    let mut net = start(Options {
        rate_bytes_per_sec: 1,
        max_key_count: 20_000,
        agents: false,
        // 3000 and 5000 keys of 32 bytes, each with its 256-byte record.
        limits_toml: "max_awaiting_bytes_per_master = 864000\nmax_awaiting_bytes = 1440000".into(),
        ..Options::default()
    });
    let info = net.info.clone();
    let (a1, base_a) = raw(&info, Some("SAE_A1"), 0);
    let (a2, base_a2) = raw(&info, Some("SAE_A2"), 0);
    let (b1, base_b) = raw(&info, Some("SAE_B1"), 1);
    let hoard = format!("{base_a}/SAE_A2/enc_keys?number=1000");
    let mut taken = Vec::new();
    for _ in 0..3 {
        let r = call(&a1, "get", &hoard, ENC, None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        taken.push(r.body["keys"][0].clone());
    }
    let r = call(&a1, "get", &hoard, ENC, None).await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body["message"]
        .as_str()
        .unwrap()
        .contains("max_awaiting_bytes_per_master"));
    let st = call(&a1, "get", &format!("{base_a}/SAE_A2/status"), STATUS, None).await;
    assert_eq!(st.body["stored_key_count"], 0, "{}", st.body);
    assert_eq!(
        st.body["status_extension"]["awaiting_slaves"]["master_bytes"],
        864_000
    );
    // Nothing grows while it keeps trying.
    let rss = rss_kib(info.sites[0].kme_pid);
    for _ in 0..100 {
        assert_eq!(call(&a1, "get", &hoard, ENC, None).await.status, 503);
    }
    let grown = rss_kib(info.sites[0].kme_pid).saturating_sub(rss);
    eprintln!("KME RSS {rss} KiB at the bound; +{grown} KiB after 100 more refused requests");
    assert!(grown < 16 * 1024, "RSS grew by {grown} KiB");
    // Others are still served: another master here, and the hoarder towards another KME.
    let r = call(
        &a2,
        "get",
        &format!("{base_a2}/SAE_A1/enc_keys?number=1000"),
        ENC,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = call(
        &a1,
        "get",
        &format!("{base_a}/SAE_B1/enc_keys?number=10"),
        ENC,
        None,
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    // ... until the bound over all masters (5000 keys' worth) is reached.
    let r = call(
        &a2,
        "get",
        &format!("{base_a2}/SAE_A1/enc_keys?number=1001"),
        ENC,
        None,
    )
    .await;
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.body["message"]
        .as_str()
        .unwrap()
        .contains("max_awaiting_bytes"));
    drop(b1);
    let _ = base_b;

    // SIGKILL in that state; the KME is back and serving within seconds, and the hoarded keys
    // are still delivered (read from disk), once.
    net.kill_kme(0);
    let began = Instant::now();
    net.restart_kme(0).expect("restart");
    let status_url = format!("{base_a}/SAE_A2/status");
    let mut up = false;
    while began.elapsed() < Duration::from_secs(20) {
        let (c, _) = raw(&info, Some("SAE_A1"), 0);
        if let Ok(r) = c.get(&status_url).send().await {
            if r.status().as_u16() == 200 {
                up = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(up, "KME back within 20 s");
    eprintln!("KME serving again {:?} after SIGKILL", began.elapsed());
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "restart took {:?}",
        began.elapsed()
    );
    let (a2, _) = raw(&info, Some("SAE_A2"), 0);
    let id = taken[0]["key_ID"].as_str().unwrap();
    let url = format!("{base_a2}/SAE_A1/dec_keys?key_ID={id}");
    let back = call(&a2, "get", &url, DEC, None).await;
    assert_eq!(back.status, 200, "{}", back.body);
    assert_eq!(
        back.body["keys"][0], taken[0],
        "same bytes after the restart"
    );
    assert_eq!(call(&a2, "get", &url, DEC, None).await.status, 400, "once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kme_and_operator_roles_come_from_their_sans_not_from_a_name() {
    let mut net = frozen_net(2000);
    let info = &net.info.clone();
    let ca = certs::Ca::load(&info.ca_cert, &pki_dir(info).join("ca.key")).unwrap();
    // A certificate of the CA whose CN is a peer KME's ID, without the KME SAN.
    ca.issue_to(pki_dir(info), "KME_B", certs::Purpose::Sae)
        .unwrap();
    let fake = client_with(info, "sae-KME_B", 0);
    let url = format!("{}/internal/v1/link/sync", info.sites[0].kme_url);
    let r = fake.post(&url).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let body: Value = r.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("urn:qkd:kme:"));
    // The KME SAN of a KME that is not a peer (C is linked to A only).
    let c = client_with(info, "kme-KME_C-peer", 1);
    let url_b = format!("{}/internal/v1/link/sync", info.sites[1].kme_url);
    let r = c.post(&url_b).json(&json!({})).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 401);
    // A KME's or an operator's certificate never acts as an SAE, whatever its CN.
    for stem in ["kme-KME_B-peer", &format!("operator-{}", devnet::OPERATOR)] {
        let c = client_with(info, stem, 0);
        let r = call(
            &c,
            "get",
            &format!("{}/api/v1/keys/SAE_A2/status", info.sites[0].kme_url),
            STATUS,
            None,
        )
        .await;
        assert_eq!(r.status, 401, "{stem}: {}", r.body);
    }
    // The admin interface wants the operator SAN: a certificate with the operator's name as
    // its CN is not enough.
    ca.issue_to(pki_dir(info), devnet::OPERATOR, certs::Purpose::Sae)
        .unwrap();
    let pretender = client_with(info, &format!("sae-{}", devnet::OPERATOR), 0);
    let admin = format!(
        "{}/admin/v1/links/KME_B/eavesdropper",
        info.sites[0].kme_url
    );
    let r = pretender
        .post(&admin)
        .json(&json!({"fraction": 0.5}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
    let op = client_with(info, &format!("operator-{}", devnet::OPERATOR), 0);
    let r = op
        .post(&admin)
        .json(&json!({"fraction": 0.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    // An operator not named in `operators` is let in by its certificate's fingerprint (given
    // as `openssl x509 -fingerprint -sha256` prints it), once configured.
    let night = ca
        .issue_to(pki_dir(info), "night-shift", certs::Purpose::Operator)
        .unwrap();
    let fresh = |stem: &str| client_with(info, stem, 0);
    let set = |c: reqwest::Client| {
        let admin = admin.clone();
        async move {
            c.post(&admin)
                .json(&json!({"fraction": 0.0}))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    assert_eq!(set(fresh("operator-night-shift")).await, 401);
    let digest = certs::read_cert(&night.cert)
        .unwrap()
        .digest(openssl::hash::MessageDigest::sha256())
        .unwrap();
    let colons: Vec<String> = digest.iter().map(|b| format!("{b:02X}")).collect();
    let cfg = info.sites[0].kme_config.clone();
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        format!("operator_fingerprints = [\"{}\"]\n{text}", colons.join(":")),
    )
    .unwrap();
    net.restart_kme(0).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut code = 0;
    while Instant::now() < deadline {
        code = set(fresh("operator-night-shift")).await;
        if code != 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(code, 200);
}

/// A TLS server on 127.0.0.1 with the certificate `stem` of the PKI: counts handshakes that
/// were attempted and the bytes of HTTP it received after them.
struct FakePeer {
    port: u16,
    attempts: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    received: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl FakePeer {
    fn start(pki: &Path, stem: &str) -> Self {
        use std::sync::atomic::Ordering;
        let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server()).unwrap();
        b.set_certificate_chain_file(pki.join(format!("{stem}.pem")))
            .unwrap();
        b.set_private_key_file(pki.join(format!("{stem}.key")), SslFiletype::PEM)
            .unwrap();
        b.set_ca_file(pki.join("ca.pem")).unwrap();
        b.set_verify(SslVerifyMode::PEER);
        let acceptor = b.build();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let received = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (a, r) = (attempts.clone(), received.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                a.fetch_add(1, Ordering::SeqCst);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                if let Ok(mut s) = acceptor.accept(conn) {
                    let mut buf = [0u8; 4096];
                    if let Ok(n) = s.read(&mut buf) {
                        r.fetch_add(n, Ordering::SeqCst);
                    }
                }
            }
        });
        FakePeer {
            port,
            attempts,
            received,
        }
    }

    fn counts(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering;
        (
            self.attempts.load(Ordering::SeqCst),
            self.received.load(Ordering::SeqCst),
        )
    }
}

/// Points site 0's KME (configuration `original`) at `fake` instead of its peer B, restarts
/// it, and waits until it has tried to reach the fake at least twice; the fake's counts.
fn redirect_and_wait(net: &mut common::Net, original: &str, fake: &FakePeer) -> (usize, usize) {
    let cfg = net.info.sites[0].kme_config.clone();
    let b_url = net.info.sites[1].kme_url.clone();
    let text = original.replace(&b_url, &format!("https://127.0.0.1:{}", fake.port));
    std::fs::write(&cfg, text).unwrap();
    net.restart_kme(0).expect("restart");
    let deadline = Instant::now() + Duration::from_secs(30);
    while fake.counts().0 < 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    fake.counts()
}

#[test]
fn a_fake_peer_without_the_peers_kme_san_receives_nothing() {
    let mut net = start(Options {
        sites: 2,
        agents: false,
        rate_bytes_per_sec: 1,
        max_key_count: 2000,
        ..Options::default()
    });
    let pki = pki_dir(&net.info).to_owned();
    let ca = certs::Ca::load(&pki.join("ca.pem"), &pki.join("ca.key")).unwrap();
    // A site agent's server certificate (valid, 127.0.0.1, no KME SAN), then a KME server
    // certificate of another KME: KME_A (the link's producer) must send neither anything.
    ca.issue_to(&pki, "FAKE_AGENT", certs::Purpose::Agent)
        .unwrap();
    ca.issue_to(&pki, "KME_Z", certs::Purpose::KmeServer)
        .unwrap();
    let original = std::fs::read_to_string(&net.info.sites[0].kme_config).unwrap();
    for stem in ["sae-FAKE_AGENT", "kme-KME_Z"] {
        let fake = FakePeer::start(&pki, stem);
        let (attempts, received) = redirect_and_wait(&mut net, &original, &fake);
        assert!(attempts >= 2, "{stem}: KME_A tried to reach its peer");
        assert_eq!(received, 0, "{stem}: the fake peer got {received} bytes");
    }
    // Control: a server with KME_B's own certificate does receive the requests.
    let fake = FakePeer::start(&pki, "kme-KME_B");
    let (_, received) = redirect_and_wait(&mut net, &original, &fake);
    assert!(
        received > 0,
        "the fake with KME_B's certificate got a request"
    );
    let log = std::fs::read_to_string(&net.info.sites[0].kme_log).unwrap();
    assert!(log.contains("certificate verify failed"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_sae_is_refused_with_401_while_others_are_served() {
    let net = start(Options {
        sites: 2,
        agents: false,
        rate_bytes_per_sec: 1,
        max_key_count: 2000,
        crl: true,
        ..Options::default()
    });
    let info = &net.info;
    let status = |sae: &str| {
        let (c, base) = raw(info, Some(sae), 0);
        async move { call(&c, "get", &format!("{base}/SAE_B1/status"), STATUS, None).await }
    };
    assert_eq!(status("SAE_A2").await.status, 200);
    // A connection opened before the revocation, kept alive across it.
    let (open, base) = raw(info, Some("SAE_A2"), 0);
    let url = format!("{base}/SAE_B1/status");
    assert_eq!(call(&open, "get", &url, STATUS, None).await.status, 200);
    let (cert, _) = sae_files(info, "SAE_A2");
    let (_, serials) = certs::DevPki::revoke(pki_dir(info), &[cert]).unwrap();
    assert_eq!(serials.len(), 1);
    // The KME looks at the CRL file at most once a second.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let r = call(&open, "get", &url, STATUS, None).await;
    assert_eq!(r.status, 401, "on the open connection: {}", r.body);
    let r = status("SAE_A2").await;
    assert_eq!(r.status, 401, "{}", r.body);
    assert!(r.body["message"].as_str().unwrap().contains("revoked"));
    assert_eq!(status("SAE_A1").await.status, 200, "others are served");
}

#[test]
fn every_file_and_folder_of_a_kme_store_is_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let net = frozen_net(2000);
    let mut seen = 0;
    for name in ["A", "B", "C"] {
        let root = net.dir.join(format!("kme-store-{name}"));
        let mut stack = vec![root];
        while let Some(p) = stack.pop() {
            let meta = std::fs::symlink_metadata(&p).unwrap();
            let mode = meta.permissions().mode() & 0o777;
            if meta.is_dir() {
                assert_eq!(mode, 0o700, "{}", p.display());
                stack.extend(std::fs::read_dir(&p).unwrap().map(|e| e.unwrap().path()));
            } else {
                assert_eq!(mode, 0o600, "{}", p.display());
                seen += 1;
            }
        }
    }
    assert!(seen >= 6, "state databases and segment files: {seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_refused_at_the_slaves_kme_for_want_of_room_never_stall_the_link() {
    // Bulk link, 64 KB pools; at KME_B a master may leave at most 100 keys unfetched.
    let net = start(Options {
        sites: 2,
        agents: false,
        rate_bytes_per_sec: 0,
        max_key_count: 2000,
        limits_toml: "max_awaiting_bytes_per_master = 28800".into(),
        ..Options::default()
    });
    let info = &net.info;
    let (a1, base_a) = raw(info, Some("SAE_A1"), 0);
    let (a2, _) = raw(info, Some("SAE_A2"), 0);
    let (b1, base_b) = raw(info, Some("SAE_B1"), 1);
    let hoard = format!("{base_a}/SAE_B1/enc_keys?number=50");
    let mut refused = 0;
    // 100 x 1600 bytes: more than twice what B's copy of the link can hold.
    for _ in 0..100 {
        let r = call(&a1, "get", &hoard, ENC, None).await;
        match r.status {
            200 => {}
            503 => {
                refused += 1;
                assert!(r.body["message"].as_str().unwrap().contains("KME_B"));
            }
            s => panic!("{s}: {}", r.body),
        }
    }
    assert!(refused >= 90, "B refused the hoarder's keys: {refused}");
    // The link still runs: another master gets keys for the same slave, who fetches them.
    let got = call(
        &a2,
        "get",
        &format!("{base_a}/SAE_B1/enc_keys?number=50"),
        ENC,
        None,
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.body);
    let ids = ids_of(&got.body);
    let body = json!({"key_IDs": ids.iter().map(|i| json!({"key_ID": i})).collect::<Vec<_>>()});
    let back = call(
        &b1,
        "post",
        &format!("{base_b}/SAE_A2/dec_keys"),
        DEC,
        Some(&body.to_string()),
    )
    .await;
    assert_eq!(back.status, 200, "{}", back.body);
    assert_eq!(back.body["keys"], got.body["keys"]);
}
