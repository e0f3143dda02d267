//! A client that turns hostile against a site agent (real processes, real certificates,
//! 127.0.0.1): it floods the agent with large and silent uploads, drains the site's QKD key
//! by restarting downloads, or reads backups it was not given; and a crash in the middle of
//! a chunk rewrite. The agent stays small, the pool is not drained past the bound, honest
//! clients carry on, and no share is damaged.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use devnet::{DevnetInfo, Options};
use futures_util::StreamExt;

const SMALL_CHUNKS: &[&str] = &["--chunk-size", "65536"];

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Peak resident memory of process `pid`, bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmHWM");
    kb * 1024
}

fn same_files(a: &Path, b: &Path) -> bool {
    std::fs::read(a).unwrap() == std::fs::read(b).unwrap()
}

/// A client configuration for SAE `sae` of site `site` (state under `dir`), with `extra`
/// TOML appended.
fn client_as(info: &DevnetInfo, site: usize, sae: &str, dir: &Path, extra: &str) -> PathBuf {
    let text = std::fs::read_to_string(&info.sites[site].client_config).unwrap();
    let (cert, key) = sae_files(info, sae);
    let (old_cert, old_key) = sae_files(info, &info.sites[site].saes[0].id);
    let text = text
        .replace(
            &format!("sae_id = \"{}\"", info.sites[site].saes[0].id),
            &format!("sae_id = \"{sae}\""),
        )
        .replace(old_cert.to_str().unwrap(), cert.to_str().unwrap())
        .replace(old_key.to_str().unwrap(), key.to_str().unwrap());
    let state = dir.join(format!("state-{sae}"));
    let text = text
        .lines()
        .map(|l| {
            if l.starts_with("state_dir") {
                format!("state_dir = \"{}\"", state.display())
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let p = dir.join(format!("{sae}{}.toml", extra.len()));
    std::fs::write(&p, format!("{text}\n{extra}\n")).unwrap();
    p
}

/// Opens share 0 of a fresh backup at site `site`'s agent as `sae`; returns the share URL.
async fn open_share(http: &reqwest::Client, info: &DevnetInfo, site: usize) -> String {
    let url = format!(
        "{}/v1/backups/{}/shares/0",
        info.sites[site].agent_url,
        uuid::Uuid::new_v4()
    );
    let open = serde_json::json!({
        "scheme": {"kind": "xor", "k": 2, "n": 3},
        "chunk_size": CHUNK, "chunk_count": 64, "original_len": CHUNK as u64 * 64,
        "name": "flood", "created": 1
    });
    let r = http.put(&url).json(&open).send().await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    url
}

/// Chunk size of the flooder's share: large, so that the old agent, which read a body of up
/// to 64 chunks whole, would have held every flood body in memory.
const CHUNK: usize = 4 << 20;

/// The start of a frame: a well-formed header for a chunk, keys that do not exist.
fn frame_start() -> Vec<u8> {
    let header = serde_json::json!({
        "chunk": 0, "nonce": 1, "key_ids": [uuid::Uuid::new_v4()], "pad": true, "len": CHUNK
    })
    .to_string();
    let mut out = b"BKF1".to_vec();
    out.extend_from_slice(&(header.len() as u32).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out
}

#[test]
fn a_flooding_uploader_leaves_the_agent_small_and_honest_stores_finish() {
    let net = start(Options {
        rate_bytes_per_sec: 0,
        max_key_count: 200_000,
        agent_limits_toml: "max_uploads_per_client = 4\nidle_secs = 2\n".into(),
        ..Options::default()
    });
    let info = &net.info;
    let dir = tempfile::tempdir().unwrap();
    let f = random_file(dir.path(), "in", 8 << 20);
    let b_pid = info.sites[1].agent_pid;
    let before = peak_rss(b_pid);
    let rt = runtime();
    let (http, _) = raw(info, Some("SAE_A2"), 0);
    let url = rt.block_on(open_share(&http, info, 1));
    let chunks = format!("{url}/chunks");

    // 24 bodies of 64 MiB at once, each a frame header and then junk: the old agent read
    // every body whole before looking at it. An honest store runs meanwhile.
    let honest = {
        let f = f.clone();
        let info = info.clone();
        std::thread::spawn(move || client(&info, 0, &["store", f.to_str().unwrap()]))
    };
    let (codes, busy, silent) = rt.block_on(async {
        let mut floods = Vec::new();
        for _ in 0..24 {
            let (http, chunks) = (http.clone(), chunks.clone());
            floods.push(tokio::spawn(async move {
                let body =
                    futures_util::stream::once(async { Ok::<_, std::io::Error>(frame_start()) })
                        .chain(futures_util::stream::iter(
                            (0..64).map(|_| Ok(vec![0x5a_u8; 1 << 20])),
                        ));
                let r = http
                    .post(&chunks)
                    .body(reqwest::Body::wrap_stream(body))
                    .send()
                    .await;
                // None: the agent answered and closed the connection mid-body.
                r.ok().map(|r| r.status().as_u16())
            }));
        }
        let mut codes = Vec::new();
        for h in floods {
            codes.push(h.await.unwrap());
        }
        // Four uploads that send half a frame header and fall silent hold all of this
        // client's places; a fifth is refused at once; the four are dropped after idle_secs.
        let mut silent = Vec::new();
        for _ in 0..4 {
            let (http, chunks) = (http.clone(), chunks.clone());
            silent.push(tokio::spawn(async move {
                let start = futures_util::stream::once(async {
                    Ok::<_, std::io::Error>(frame_start()[..6].to_vec())
                });
                let body = reqwest::Body::wrap_stream(start.chain(futures_util::stream::pending()));
                let t0 = Instant::now();
                let r = http.post(&chunks).body(body).send().await;
                (t0.elapsed(), r.map(|r| r.status().as_u16()).ok())
            }));
        }
        tokio::time::sleep(Duration::from_millis(700)).await;
        let r = http.post(&chunks).body(frame_start()).send().await.unwrap();
        let busy = (r.status().as_u16(), r.text().await.unwrap_or_default());
        let mut quiet = Vec::new();
        for h in silent {
            quiet.push(h.await.unwrap());
        }
        (codes, busy, quiet)
    });
    let after = peak_rss(b_pid);
    let r = honest.join().unwrap();
    assert_eq!(r.code, 0, "the honest store failed: {}", r.stderr);

    assert!(
        codes.iter().flatten().all(|c| *c != 200),
        "a flood body was accepted: {codes:?}"
    );
    assert_eq!(busy.0, 429, "{busy:?}");
    assert!(busy.1.contains("limits.max_uploads_per_client"), "{busy:?}");
    assert!(
        after < before + (160 << 20),
        "agent B grew from {} MiB to {} MiB under 24 × 64 MiB bodies",
        before >> 20,
        after >> 20
    );
    for (took, code) in &silent {
        assert_eq!(
            *code,
            Some(408),
            "a silent upload was not dropped for idleness"
        );
        assert!(
            *took < Duration::from_secs(30),
            "a silent upload held {took:?}"
        );
    }
    let out = dir.path().join("out");
    let id = r.json()["backup_id"].as_str().unwrap().to_owned();
    let r = client(info, 0, &["restore", &id, out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(same_files(&f, &out));
}

/// `qkd_key_consumed_bytes_total` of site `site`'s KME towards `peer`.
fn consumed(info: &DevnetInfo, site: usize, peer: &str) -> u64 {
    let rt = runtime();
    let text = rt.block_on(async {
        reqwest::get(&info.sites[site].metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    let needle = format!("qkd_key_consumed_bytes_total{{peer=\"{peer}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {needle} in the metrics"))
}

#[test]
fn a_reader_restarting_downloads_cannot_drain_the_pool_past_its_bound() {
    const BOUND: u64 = 6 << 20;
    let net = start(Options {
        rate_bytes_per_sec: 0,
        max_key_count: 200_000,
        agent_limits_toml: format!("max_unfetched_key_bytes_per_client = {BOUND}\n"),
        ..Options::default()
    });
    let info = &net.info;
    let dir = tempfile::tempdir().unwrap();
    let f = random_file(dir.path(), "in", 16 << 20);
    let id = store(info, 0, &f, SMALL_CHUNKS);

    // An honest restore at B reads share 0 from A under 16 MiB of A→B key, well past the
    // bound: its receipts keep it within.
    let out = dir.path().join("out-b");
    let r = client(info, 1, &["restore", &id, out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(same_files(&f, &out));

    // SAE_B1 (a recovery reader at A) now starts downloads of share 0 and drops them.
    let b_kme = info.sites[1].kme_id.clone();
    let c0 = consumed(info, 0, &b_kme);
    let rt = runtime();
    let (http, _) = raw(info, Some("SAE_B1"), 1);
    let url = format!(
        "{}/v1/backups/{id}/shares/0/chunks?from=0&to=256",
        info.sites[0].agent_url
    );
    let refused = rt.block_on(async {
        let mut refused = Vec::new();
        for _ in 0..60 {
            let r = http.get(&url).send().await.unwrap();
            if r.status() == 429 {
                refused.push(r.text().await.unwrap());
            }
            // dropped unread; a moment for the agent to notice
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        refused
    });
    let taken = consumed(info, 0, &b_kme) - c0;
    assert!(
        !refused.is_empty() && refused[0].contains("not yet acknowledged"),
        "the drain was never refused: {refused:?}"
    );
    // The bound, plus at most the batches of one download already under way.
    assert!(
        taken <= BOUND + (2 << 20),
        "the drainer took {taken} bytes of A→B key (bound {BOUND})"
    );

    // Others are not affected: the owner still restores (reading A and B).
    let out = dir.path().join("out-a");
    let r = client(info, 0, &["restore", &id, out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(same_files(&f, &out));
}

#[test]
fn a_share_is_readable_only_by_the_readers_its_owner_named() {
    let net = backup_net(None);
    let info = &net.info;
    let dir = tempfile::tempdir().unwrap();
    let x = random_file(dir.path(), "x", 200_000);
    let y = random_file(dir.path(), "y", 300_000);
    let id_x = store(info, 0, &x, &[]);
    let only_me = client_as(info, 0, "SAE_A1", dir.path(), "[backup]\nreaders = []");
    let r = client_with_config(&only_me, &["store", y.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let id_y = r.json()["backup_id"].as_str().unwrap().to_owned();

    let sees = |cfg: &Path| {
        let r = client_with_config(cfg, &["list"]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        let out = r.stdout;
        (out.contains(&id_x), out.contains(&id_y))
    };
    // Another client of the owner's site reads X (default readers), not Y (readers = []).
    let a2 = client_as(info, 0, "SAE_A2", dir.path(), "");
    assert_eq!(sees(&a2), (true, false));
    // A client of another site that the operators did not list reads neither.
    let b2 = client_as(info, 1, "SAE_B2", dir.path(), "");
    assert_eq!(sees(&b2), (false, false));
    let out = dir.path().join("out");
    let r = client_with_config(&b2, &["restore", &id_x, out.to_str().unwrap()]);
    assert_ne!(r.code, 0, "SAE_B2 restored a backup it was not given");
    assert!(!out.exists());
    // The operators' disaster-recovery client of site B reads both, and restores Y.
    let b1 = &info.sites[1].client_config;
    assert_eq!(sees(b1), (true, true));
    let r = client_with_config(b1, &["restore", &id_y, out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(same_files(&y, &out));
}

#[test]
fn a_crash_in_the_middle_of_a_chunk_rewrite_leaves_every_share_correct() {
    let mut net = backup_net(None);
    let dir = tempfile::tempdir().unwrap();
    let f = random_file(dir.path(), "in", 4 << 20);
    let path = f.to_str().unwrap();
    let store_in = |net: &Net| {
        client(
            &net.info,
            0,
            &["store", path, SMALL_CHUNKS[0], SMALL_CHUNKS[1]],
        )
    };
    // C crashes at its first chunk write: the store fails with chunks at B that C lacks.
    restart_with_failpoint(&mut net, 2, Some("write"));
    let r = store_in(&net);
    assert_ne!(r.code, 0, "the store went through a crashing site");
    assert!(aborted(&net, 2), "C did not reach its failpoint");
    // Resumed, the store re-splits those chunks and sends them to every site again; B
    // crashes in the middle of rewriting them (tombstones written, new data written, the
    // new records not).
    restart_with_failpoint(&mut net, 2, None);
    restart_with_failpoint(&mut net, 1, Some("rewrite"));
    let r = store_in(&net);
    assert_ne!(r.code, 0, "the store went through a crashing site");
    assert!(aborted(&net, 1), "B did not reach its rewrite failpoint");
    // Back up normally: the store completes, and every share checks out and restores.
    restart_with_failpoint(&mut net, 1, None);
    let r = store_in(&net);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let id = r.json()["backup_id"].as_str().unwrap().to_owned();
    let v = client(&net.info, 0, &["verify", &id]);
    assert_eq!(v.code, 0, "{}\n{}", v.stdout, v.stderr);
    for (a, b) in [(0usize, 1usize), (1, 2), (0, 2)] {
        net.kill_agent(3 - a - b);
        let out = dir.path().join(format!("out-{a}{b}"));
        let r = client(&net.info, 0, &["restore", &id, out.to_str().unwrap()]);
        assert_eq!(r.code, 0, "restore from sites {a} and {b}: {}", r.stderr);
        assert!(same_files(&f, &out));
        net.restart_agent(3 - a - b).unwrap();
    }
}
