//! End-to-end tests of the backup client and site agents on a 3-site devnet: real KMEs,
//! real agents, the real `backup-client` CLI, real certificates, 127.0.0.1 only. The round
//! trip of awkward sizes, resume and damaged chunks run on both storage backends (local disk
//! and Garage) in `storage_backends.rs`.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{backup_net, client, client_with_config, random_file, start, store, used_key_ids};

const SMALL_CHUNKS: &[&str] = &["--chunk-size", "65536"];

fn same_files(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("read a") == std::fs::read(b).expect("read b")
}

#[test]
fn restore_uses_the_other_sites_when_one_is_lost_and_fails_clearly_without_two() {
    let mut net = backup_net(None);
    let dir = tempfile::tempdir().unwrap();
    let f = random_file(dir.path(), "in", 300_000);
    let id = store(&net.info, 0, &f, SMALL_CHUNKS);
    net.kill_site(1); // site B: agent and KME
    let out = dir.path().join("out");
    let r = client(&net.info, 0, &["restore", &id, out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(same_files(&f, &out));
    let used: Vec<String> = r.json()["used"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u[0].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(used, ["A", "C"]);

    net.kill_site(2);
    let out2 = dir.path().join("out2");
    let r = client(&net.info, 0, &["restore", &id, out2.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("needs 2 shares"), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {}", r.stderr);
    assert!(!out2.exists(), "no output on failure");
}

#[test]
fn scrubbing_names_every_damaged_chunk_by_file_site_share_and_chunk() {
    let net = backup_net(None);
    let dir = tempfile::tempdir().unwrap();
    let files: Vec<_> = ["one.fastq", "two.fastq", "three.fastq"]
        .iter()
        .map(|n| random_file(dir.path(), n, 5 * 65_536 + 17))
        .collect();
    let ids: Vec<String> = files
        .iter()
        .map(|f| store(&net.info, 0, f, SMALL_CHUNKS))
        .collect();

    // All intact: exit 0, every share of every backup checked.
    let v = client(&net.info, 0, &["verify", "--all"]);
    assert_eq!(v.code, 0, "{}{}", v.stdout, v.stderr);
    let r = v.json();
    assert_eq!(r["ok"], true);
    assert_eq!(r["backups"].as_array().unwrap().len(), 3);
    assert_eq!(r["shares_checked"], 9);
    assert_eq!(r["chunks_checked"], 9 * 6);

    // Flip one byte of chunk 3 of two.fastq's share at site B (share 1).
    let data = net.info.sites[1]
        .store_dir
        .join(&ids[1])
        .join("share-1")
        .join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    bytes[3 * 65_536 + 5] ^= 0x01;
    std::fs::write(&data, bytes).unwrap();

    let report = dir.path().join("scrub.json");
    let v = client(
        &net.info,
        0,
        &["verify", "--all", "--report", report.to_str().unwrap()],
    );
    assert_eq!(v.code, 1, "damage makes the scrub fail: {}", v.stdout);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    assert_eq!(r, v.json(), "the report file is what --json prints");
    assert_eq!(r["ok"], false);
    assert_eq!(
        r["bad_chunks"],
        serde_json::json!([{
            "name": "two.fastq",
            "backup_id": ids[1],
            "site": "B",
            "share_index": 1,
            "chunk": 3,
            "fault": "damaged",
        }])
    );
    let not_ok: Vec<&str> = r["backups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["ok"] == false)
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(not_ok, ["two.fastq"]);

    // The people's view: a table row per backup, the bad chunk named, a summary.
    let bin = devnet::sibling_binary("backup-client").unwrap();
    let out = std::process::Command::new(bin)
        .arg("--config")
        .arg(&net.info.sites[0].client_config)
        .args(["verify", "--all"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    let row = text
        .lines()
        .find(|l| l.contains("two.fastq") && !l.starts_with("Damaged"))
        .unwrap_or_else(|| panic!("{text}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &cells[cells.len() - 4..],
        ["ok", "DAMAGED", "1", "ok"],
        "sites A, B, C: {text}"
    );
    assert!(
        text.contains(&format!(
            "Damaged: two.fastq (backup {}) at site B, share 1, chunk 3",
            ids[1]
        )),
        "{text}"
    );
    assert!(
        text.contains("1 bad chunk(s), 1 backup(s) not intact"),
        "{text}"
    );

    // Restores still work from the other shares.
    let restored = dir.path().join("two.out");
    let r = client(
        &net.info,
        0,
        &["restore", &ids[1], restored.to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(same_files(&files[1], &restored));

    // The scrub names the command; `repair` rebuilds only the damaged chunk, in place.
    assert!(
        text.contains(&format!("run `backup-client repair {} --site B`", ids[1])),
        "{text}"
    );
    let before = std::fs::metadata(&data).unwrap().len();
    let r = client(&net.info, 0, &["repair", &ids[1], "--site", "B"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["damaged_chunks"], serde_json::json!([3]));
    assert_eq!(r.json()["chunks"], 1);
    assert_eq!(std::fs::metadata(&data).unwrap().len(), before);
    let v = client(&net.info, 0, &["verify", "--all"]);
    assert_eq!(v.code, 0, "intact again: {}", v.stdout);
    let again = client(&net.info, 0, &["repair", &ids[1], "--site", "B"]);
    assert_eq!(again.code, 2, "{}", again.stderr);
    assert!(
        again.stderr.contains("nothing to repair"),
        "{}",
        again.stderr
    );
    // B's mended share restores with C's while A is down.
    let mut net = net;
    net.kill_agent(0);
    let restored = dir.path().join("two.mended");
    let r = client(
        &net.info,
        0,
        &["restore", &ids[1], restored.to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(same_files(&files[1], &restored));
}

#[test]
fn a_lost_share_is_repaired_from_k_others_and_then_restores() {
    let mut net = backup_net(None);
    let dir = tempfile::tempdir().unwrap();
    for scheme in ["xor", "shamir"] {
        let f = random_file(dir.path(), &format!("in-{scheme}"), 7 * 65_536 + 999);
        let id = store(
            &net.info,
            0,
            &f,
            &[SMALL_CHUNKS[0], SMALL_CHUNKS[1], "--scheme", scheme],
        );
        // Site B loses its share (disk replaced), and its agent restarts.
        std::fs::remove_dir_all(net.info.sites[1].store_dir.join(&id).join("share-1")).unwrap();
        net.restart_agent(1).unwrap();
        let v = client(&net.info, 0, &["verify", &id]);
        assert_eq!(v.code, 1, "the loss shows: {}", v.stdout);
        assert_eq!(v.json()["sites"][1]["lost"], serde_json::json!([1]));
        let all = client(&net.info, 0, &["verify", "--all"]);
        assert_eq!(all.code, 1);
        let lost = all.json()["lost_shares"].to_string();
        assert!(
            lost.contains(&format!("\"{id}\",\"B\",1")),
            "scrubbing names what repair should fix: {lost}"
        );

        let r = client(&net.info, 0, &["repair", &id, "--site", "B"]);
        assert_eq!(r.code, 0, "{scheme}: {}", r.stderr);
        let rep = r.json();
        assert_eq!(rep["share_index"], 1);
        assert_eq!(rep["chunks"], 8);
        let v = client(&net.info, 0, &["verify", &id]);
        assert_eq!(v.code, 0, "{scheme}: all shares intact again: {}", v.stdout);

        // Nothing left to repair: refused, nothing changed.
        let again = client(&net.info, 0, &["repair", &id, "--site", "B"]);
        assert_eq!(again.code, 2, "{}", again.stderr);
        assert!(
            again.stderr.contains("nothing to repair"),
            "{}",
            again.stderr
        );

        // The repaired share restores with A's while C is down.
        net.kill_agent(2);
        let out = dir.path().join(format!("out-{scheme}"));
        let r = client(&net.info, 0, &["restore", &id, out.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{scheme}: {}", r.stderr);
        assert!(same_files(&f, &out), "{scheme}");
        let used = r.json()["used"].to_string();
        assert!(
            used.contains("\"B\""),
            "{scheme}: B's repaired share used: {used}"
        );
        net.restart_agent(2).unwrap();
    }
}

#[test]
fn a_site_down_at_store_time_needs_allow_degraded() {
    let mut net = backup_net(None);
    let dir = tempfile::tempdir().unwrap();
    let f = random_file(dir.path(), "in", 100_000);
    net.kill_agent(2);
    let r = client(&net.info, 0, &["store", f.to_str().unwrap()]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("--allow-degraded"), "{}", r.stderr);
    assert!(r.stderr.contains("share 2 at site C"), "{}", r.stderr);
    let id = store(&net.info, 0, &f, &["--allow-degraded"]);
    let out = dir.path().join("out");
    let r = client(&net.info, 0, &["restore", &id, out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(same_files(&f, &out));
}

#[test]
fn disaster_recovery_restores_at_b_from_b_and_c_after_losing_site_a() {
    let mut net = backup_net(Some(vec![(0, 1), (0, 2), (1, 2)]));
    let dir = tempfile::tempdir().unwrap();
    let f = random_file(dir.path(), "in", 400_000);
    let id = store(&net.info, 0, &f, SMALL_CHUNKS);
    net.kill_site(0);
    std::fs::remove_dir_all(&net.info.sites[0].store_dir).unwrap();
    let out = dir.path().join("out");
    let r = client(&net.info, 1, &["restore", &id, out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(same_files(&f, &out));
    let used = r.json()["used"].to_string();
    assert!(used.contains("\"B\"") && used.contains("\"C\""), "{used}");
}

#[test]
fn bad_input_gets_a_one_line_error_that_says_what_to_do() {
    let net = backup_net(None);
    let dir = tempfile::tempdir().unwrap();
    let unknown = uuid::Uuid::new_v4().to_string();
    let out = dir.path().join("o");
    let cases: Vec<(Vec<&str>, i32, &str)> = vec![
        (
            vec!["restore", &unknown, out.to_str().unwrap()],
            2,
            "unknown backup ID",
        ),
        (vec!["verify", &unknown], 2, "unknown backup ID"),
        (
            vec!["restore", "not-an-id", out.to_str().unwrap()],
            1,
            "not a backup ID",
        ),
        (vec!["store", "/nonexistent/file"], 1, "/nonexistent/file"),
        (vec!["store", "/tmp", "--k", "4", "--n", "3"], 2, "--k/--n"),
    ];
    for (args, code, needle) in cases {
        let r = client(&net.info, 0, &args);
        assert_eq!(r.code, code, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(needle), "{args:?}: {}", r.stderr);
        assert_eq!(r.stderr.trim().lines().count(), 1, "{args:?}: {}", r.stderr);
    }
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "site = \"A\"\nsae_id = 5\n").unwrap();
    let r = client_with_config(&bad, &["list"]);
    assert_eq!(r.code, 2);
    assert!(r.stderr.contains("bad.toml"), "{}", r.stderr);
}

#[test]
fn a_store_killed_halfway_resumes_and_never_uses_a_key_twice() {
    let net = common::slow_net();
    let dir = tempfile::tempdir().unwrap();
    let f = random_file(dir.path(), "in", 6 << 20);
    let bin = devnet::sibling_binary("backup-client").unwrap();
    let mut child = std::process::Command::new(&bin)
        .arg("--config")
        .arg(&net.info.sites[0].client_config)
        .args([
            "--json",
            "store",
            f.to_str().unwrap(),
            "--chunk-size",
            "65536",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until site B acknowledged some chunks, then SIGKILL the client.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let acked: u64 = common::used_key_ids(&net.info).len() as u64;
        if acked > 20 {
            break;
        }
        assert!(Instant::now() < deadline, "store made no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "store finished too early for this test"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = used_key_ids(&net.info).len();

    let r = client(
        &net.info,
        0,
        &["store", f.to_str().unwrap(), "--chunk-size", "65536"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep = r.json();
    assert_eq!(rep["resumed"], true, "the same backup is resumed");
    assert!(
        rep["chunks_sent"].as_u64().unwrap() < 3 * 96,
        "only missing chunks are sent again: {rep}"
    );
    let id = rep["backup_id"].as_str().unwrap().to_owned();

    let ids = used_key_ids(&net.info);
    assert!(ids.len() > before);
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "no key ID carried two chunks");

    let out = dir.path().join("out");
    let r = client(&net.info, 0, &["restore", &id, out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(same_files(&f, &out));
}

/// An in-path attacker between the client and site B's agent: plain HTTP towards the client,
/// mutual TLS (with the client's own certificate) towards the agent. It flips one byte in
/// the body of the first `flips` chunk uploads it forwards.
fn start_tampering_proxy(
    info: &devnet::DevnetInfo,
    agent_url: String,
    flips: usize,
) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let sae = &info.sites[0].saes[0];
    let ca = std::fs::read(&info.ca_cert).unwrap();
    let ident = etsi_spec::Identity::from_files(&sae.cert, &sae.key).unwrap();
    let upstream = etsi_spec::Client::new(&agent_url, &ca, Some(&ident))
        .unwrap()
        .http()
        .clone();
    let tampered = Arc::new(AtomicUsize::new(0));
    let t2 = tampered.clone();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    // The attacker holds agent B's certificate and key (the client checks whose certificate
    // answers, so a tamperer in the path needs them): what it alters must still be caught.
    let pki = info.ca_cert.parent().unwrap().to_owned();
    let acceptor = mtls::server::acceptor(
        &info.ca_cert,
        &pki.join("sae-AGENT_B.pem"),
        &pki.join("sae-AGENT_B.key"),
    )
    .unwrap();
    std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            actix_web::HttpServer::new(move || {
                let upstream = upstream.clone();
                let agent_url = agent_url.clone();
                let t2 = t2.clone();
                actix_web::App::new()
                    .app_data(actix_web::web::PayloadConfig::new(1 << 30))
                    .default_service(actix_web::web::to(
                        move |req: actix_web::HttpRequest, body: actix_web::web::Bytes| {
                            let upstream = upstream.clone();
                            let url = format!("{agent_url}{}", req.uri());
                            let t2 = t2.clone();
                            async move {
                                let mut body = body.to_vec();
                                if req.method() == "POST"
                                    && req.path().ends_with("/chunks")
                                    && t2.load(Ordering::SeqCst) < flips
                                {
                                    // Inside the last frame's payload, just before its
                                    // 16-byte tag (a body holds one or more frames, so the
                                    // middle may be a frame header).
                                    let pos = body.len().saturating_sub(20);
                                    body[pos] ^= 0x01;
                                    t2.fetch_add(1, Ordering::SeqCst);
                                }
                                let method =
                                    reqwest::Method::from_bytes(req.method().as_str().as_bytes())
                                        .unwrap();
                                let mut rb = upstream.request(method, &url).body(body);
                                if let Some(ct) = req.headers().get("content-type") {
                                    rb = rb.header("content-type", ct.to_str().unwrap_or(""));
                                }
                                let resp = rb.send().await.unwrap();
                                let status = resp.status().as_u16();
                                let bytes = resp.bytes().await.unwrap_or_default();
                                actix_web::HttpResponse::build(
                                    actix_web::http::StatusCode::from_u16(status).unwrap(),
                                )
                                .content_type("application/json")
                                .body(bytes)
                            }
                        },
                    ))
            })
            .workers(1)
            .listen_openssl(listener, acceptor)
            .unwrap()
            .run()
            .await
            .unwrap();
        });
    });
    (format!("https://127.0.0.1:{port}"), tampered)
}

#[test]
fn a_chunk_tampered_in_flight_is_rejected_and_sent_again_with_new_keys() {
    let net = backup_net(None);
    let dir = tempfile::tempdir().unwrap();
    let f = random_file(dir.path(), "in", 4 * 65_536 + 5);
    let b_url = net.info.sites[1].agent_url.clone();

    // One tampered upload: the agent refuses it, the client retries and the store succeeds.
    let (proxy, tampered) = start_tampering_proxy(&net.info, b_url.clone(), 1);
    let cfg_text = std::fs::read_to_string(&net.info.sites[0].client_config).unwrap();
    let cfg = dir.path().join("via-proxy.toml");
    std::fs::write(&cfg, cfg_text.replace(&b_url, &proxy)).unwrap();
    let before = used_key_ids(&net.info).len();
    let r = client_with_config(
        &cfg,
        &["store", f.to_str().unwrap(), "--chunk-size", "65536"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(tampered.load(std::sync::atomic::Ordering::SeqCst), 1);
    let log = std::fs::read_to_string(&net.info.sites[1].agent_log).unwrap();
    assert!(
        log.contains("authentication failed"),
        "agent logged the rejection"
    );
    let id = r.json()["backup_id"].as_str().unwrap().to_owned();
    let out = dir.path().join("out");
    let r = client(&net.info, 0, &["restore", &id, out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(same_files(&f, &out));
    let ids = used_key_ids(&net.info);
    assert!(ids.len() > before);
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), ids.len());

    // An attacker who tampers with everything: the store fails, clearly.
    let (proxy, _) = start_tampering_proxy(&net.info, b_url.clone(), usize::MAX);
    std::fs::write(&cfg, cfg_text.replace(&b_url, &proxy)).unwrap();
    let f2 = random_file(dir.path(), "in2", 70_000);
    let r = client_with_config(
        &cfg,
        &["store", f2.to_str().unwrap(), "--chunk-size", "65536"],
    );
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("authentication failed"), "{}", r.stderr);
}

#[test]
fn only_backup_clients_may_read_shares_not_other_agents() {
    let net = backup_net(None);
    let dir = tempfile::tempdir().unwrap();
    let f = random_file(dir.path(), "in", 70_000);
    let id = store(&net.info, 0, &f, SMALL_CHUNKS);
    // Site B's agent (a certificate of the same CA) asks site C's agent for share 2.
    let pki = net.info.ca_cert.parent().unwrap();
    let out = std::process::Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&net.info.ca_cert)
        .arg("--cert")
        .arg(pki.join("sae-AGENT_B.pem"))
        .arg("--key")
        .arg(pki.join("sae-AGENT_B.key"))
        .arg(format!(
            "{}/v1/backups/{id}/shares/2/chunks",
            net.info.sites[2].agent_url
        ))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "403");
}

#[test]
fn a_restore_killed_halfway_resumes_from_its_checkpoint() {
    let net = common::slow_net();
    let dir = tempfile::tempdir().unwrap();
    let f = random_file(dir.path(), "in", 6 << 20);
    let id = store(&net.info, 0, &f, SMALL_CHUNKS);
    let out = dir.path().join("out");
    let partial = dir.path().join("out.partial");
    let bin = devnet::sibling_binary("backup-client").unwrap();
    let mut child = std::process::Command::new(&bin)
        .env("BACKUP_BACKUP__CHECKPOINT_CHUNKS", "8")
        .arg("--config")
        .arg(&net.info.sites[0].client_config)
        .args(["--json", "restore", &id, out.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::fs::metadata(&partial).map_or(0, |m| m.len()) < 2 << 20 {
        assert!(Instant::now() < deadline, "restore made no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "restore finished too early for this test"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !out.exists(),
        "nothing at the output path before the digest is checked"
    );

    let bin_cfg = &net.info.sites[0].client_config;
    let r = client_with_config(bin_cfg, &["restore", &id, out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.json()["resumed_at_chunk"].as_u64().unwrap() > 0,
        "resumed: {}",
        r.stdout
    );
    assert!(same_files(&f, &out));
    assert!(!partial.exists());
}

/// The default devnet's link (10 km, 1.25 MB/s) and pools (100,000 keys of 256 bit, 3.2 MB
/// per direction) are far smaller than the key a 32 MiB store needs (32 MiB of pad per
/// remote site: an XOR share is as big as the file): the client and the agents size every key request to the pool, so store and
/// restore run at the link's rate, and say so every 10 s without a terminal.
#[test]
fn store_and_restore_larger_than_the_pools_run_at_the_links_rate() {
    const RATE: f64 = 1_250_000.0;
    let net = common::start(devnet::Options::default());
    let dir = tempfile::tempdir().unwrap();
    let len = 32 << 20;
    let f = random_file(dir.path(), "in", len);
    // Pad for one remote share (as big as the file), from one link.
    let key_bound = len as f64 / RATE;

    let t = Instant::now();
    let r = client(&net.info, 0, &["store", f.to_str().unwrap()]);
    let store_secs = t.elapsed().as_secs_f64();
    assert_eq!(r.code, 0, "{}", r.stderr);
    let id = r.json()["backup_id"].as_str().unwrap().to_owned();
    assert!(
        store_secs < 2.0 * key_bound + 20.0,
        "store took {store_secs:.1} s; the link allows it in {key_bound:.1} s"
    );
    assert!(
        r.stderr.contains("store: ") && r.stderr.contains("waited for key"),
        "a progress line every 10 s on stderr: {}",
        r.stderr
    );

    let out = dir.path().join("out");
    let t = Instant::now();
    let r = client(&net.info, 0, &["restore", &id, out.to_str().unwrap()]);
    let restore_secs = t.elapsed().as_secs_f64();
    eprintln!("store {store_secs:.1} s, restore {restore_secs:.1} s, key-bound {key_bound:.1} s");
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(same_files(&f, &out), "restored bytes differ");
    assert!(
        restore_secs < 2.0 * key_bound + 20.0,
        "restore took {restore_secs:.1} s; the link allows it in {key_bound:.1} s"
    );
    assert!(
        r.stderr.contains("restore: "),
        "a progress line every 10 s on stderr: {}",
        r.stderr
    );
}

#[test]
fn a_share_moves_to_a_new_site_and_an_interrupted_move_is_finished() {
    // Four sites, star around A: the backup's shares at A, B, C; D is new.
    let mut net = start(devnet::Options {
        sites: 4,
        rate_bytes_per_sec: 0,
        max_key_count: 200_000,
        ..devnet::Options::default()
    });
    let dir = tempfile::tempdir().unwrap();
    for (round, scheme) in ["xor", "shamir"].into_iter().enumerate() {
        let f = random_file(dir.path(), &format!("in-{scheme}"), 5 * 65_536 + 3);
        let id = store(
            &net.info,
            0,
            &f,
            &[SMALL_CHUNKS[0], SMALL_CHUNKS[1], "--scheme", scheme],
        );
        let stores: Vec<_> = net.info.sites.iter().map(|s| s.store_dir.clone()).collect();
        let share_dir = |site: usize, i: usize| stores[site].join(&id).join(format!("share-{i}"));
        assert!(share_dir(1, 1).exists());
        if round == 1 {
            // B is down (the usual reason to move its share): D gets the share from A's and
            // C's, every reachable site is told; B's old copy stays until B is back.
            net.kill_agent(1);
        }
        let r = client(&net.info, 0, &["repair", &id, "--site", "B", "--to", "D"]);
        let rep = r.json();
        assert_eq!(rep["site"], "D", "{}", r.stderr);
        assert_eq!(rep["share_index"], 1);
        assert_eq!(
            rep["moved_from"]["not_updated"],
            serde_json::json!([]),
            "{rep}"
        );
        assert!(share_dir(3, 1).exists(), "D holds share 1");
        if round == 1 {
            assert_eq!(r.code, 1, "an unfinished move says so: {}", r.stderr);
            assert_eq!(rep["moved_from"]["old_share_removed"], false, "{rep}");
            assert!(share_dir(1, 1).exists());
            net.restart_agent(1).unwrap();
            // Restorable meanwhile: B's copy, under the old placement, is not counted.
            let out = dir.path().join(format!("between-{scheme}"));
            let r = client(&net.info, 0, &["restore", &id, out.to_str().unwrap()]);
            assert_eq!(r.code, 0, "{}", r.stderr);
            assert!(same_files(&f, &out));
            let rejected = r.json()["rejected"].to_string();
            assert!(rejected.contains("older placement"), "{rejected}");
            // The same command finishes the move: B learns the placement, drops its copy.
            let r = client(&net.info, 0, &["repair", &id, "--site", "B", "--to", "D"]);
            assert_eq!(r.code, 0, "{}", r.stderr);
            assert_eq!(r.json()["chunks"], 0, "nothing rebuilt again");
            assert_eq!(r.json()["moved_from"]["old_share_removed"], true);
        } else {
            assert_eq!(r.code, 0, "{}", r.stderr);
            assert_eq!(rep["moved_from"]["old_share_removed"], true, "{rep}");
        }
        assert!(!share_dir(1, 1).exists(), "B's old share is gone");
        let v = client(&net.info, 0, &["verify", &id]);
        assert_eq!(v.code, 0, "{scheme}: {}", v.stdout);
        // B is gone for good: C and D restore it (A's agent down too).
        net.kill_agent(0);
        net.kill_agent(1);
        let out = dir.path().join(format!("out-{scheme}"));
        let r = client(&net.info, 0, &["restore", &id, out.to_str().unwrap()]);
        assert_eq!(r.code, 0, "{scheme}: {}", r.stderr);
        assert!(same_files(&f, &out), "{scheme}");
        let used = r.json()["used"].to_string();
        assert!(used.contains("\"D\"") && used.contains("\"C\""), "{used}");
        net.restart_agent(0).unwrap();
        net.restart_agent(1).unwrap();
    }
}
