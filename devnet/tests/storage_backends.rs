//! The site agents' two storage backends held to one behaviour: every case runs on a devnet
//! whose agents keep shares in local folders and on one whose agents keep them in their
//! site's own real Garage node (S3, `devnet up --s3`; Garage 2.x from `scripts/setup`).
//! Cases only an object store has (the store going away mid-store) run on Garage alone.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{client, random_file, start, store, Net};
use devnet::Options;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

const CS: usize = 65_536;
const SMALL_CHUNKS: [&str; 2] = ["--chunk-size", "65536"];

#[derive(Clone, Copy, Debug)]
enum Backend {
    Local,
    S3,
}

/// A backup network (bulk key) on `backend`.
fn net(backend: Backend) -> Net {
    start(Options {
        rate_bytes_per_sec: 0,
        max_key_count: 200_000,
        s3: matches!(backend, Backend::S3),
        // Short retries, so that a store facing a stopped object store gives up in seconds;
        // 5 MiB parts, so that chunks of 12 MiB go up as multipart uploads.
        s3_toml: "max_retries = 3\nretry_timeout_secs = 4\nrequest_timeout_secs = 10\n\
                  multipart_part_bytes = 5242880"
            .into(),
        ..Options::default()
    })
}

/// A network with slow links (3 MB/s, small pools), so a store is still running when a
/// test interrupts it.
fn slow_net(backend: Backend) -> Net {
    start(Options {
        rate_bytes_per_sec: 3_000_000,
        max_key_count: 20_000,
        block_bytes: 64 * 1024,
        s3: matches!(backend, Backend::S3),
        s3_toml: "max_retries = 3\nretry_timeout_secs = 4\nrequest_timeout_secs = 10".into(),
        ..Options::default()
    })
}

fn same_files(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("read a") == std::fs::read(b).expect("read b")
}

fn restore_ok(net: &Net, id: &str, out: &Path) -> serde_json::Value {
    let r = client(&net.info, 0, &["restore", id, out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "restore {id}: {}", r.stderr);
    r.json()
}

/// Share bytes site `site`'s agent has received so far, from its operator's `/jobs`.
fn agent_bytes(net: &Net, site: usize) -> u64 {
    let addr = net.info.sites[site]
        .agent_metrics_url
        .trim_start_matches("http://")
        .to_owned();
    let Ok(mut s) = std::net::TcpStream::connect(&addr) else {
        return 0;
    };
    let _ = write!(s, "GET /jobs HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("{}");
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    v["jobs"]
        .as_array()
        .map(|jobs| jobs.iter().filter_map(|j| j["bytes"].as_u64()).sum())
        .unwrap_or(0)
}

/// Starts a store of `f` from site A in the background.
fn spawn_store(net: &Net, f: &Path) -> std::process::Child {
    std::process::Command::new(devnet::sibling_binary("backup-client").unwrap())
        .arg("--config")
        .arg(&net.info.sites[0].client_config)
        .args(["--json", "store", f.to_str().unwrap()])
        .args(SMALL_CHUNKS)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until site `site`'s agent holds more than `bytes` of the running store.
fn wait_for_progress(net: &Net, child: &mut std::process::Child, site: usize, bytes: u64) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent_bytes(net, site) <= bytes {
        assert!(Instant::now() < deadline, "store made no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "store finished too early for this test"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Site `site`'s bucket, as its operator (or an intruder with its key) sees it.
fn bucket(net: &Net, site: usize) -> Arc<dyn ObjectStore> {
    let s3 = net.info.sites[site].s3.as_ref().expect("an S3 site");
    let text = std::fs::read_to_string(&s3.credentials).unwrap();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.split('"').nth(1))
            .unwrap()
            .to_owned()
    };
    Arc::new(
        AmazonS3Builder::new()
            .with_endpoint(&s3.endpoint)
            .with_region(&s3.region)
            .with_bucket_name(&s3.bucket)
            .with_allow_http(true)
            .with_access_key_id(field("access_key_id"))
            .with_secret_access_key(field("secret_access_key"))
            .build()
            .unwrap(),
    )
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// The object of chunk `chunk` of share 0 of backup `id` (epoch 0) in site `site`'s bucket.
fn chunk_object(
    net: &Net,
    site: usize,
    id: &str,
    chunk: u64,
) -> (Arc<dyn ObjectStore>, ObjectPath) {
    let store = bucket(net, site);
    let prefix = ObjectPath::from(format!("{id}/share-{site}/e0"));
    let listed: Vec<_> = block_on(async {
        use futures_util::TryStreamExt;
        store.list(Some(&prefix)).try_collect::<Vec<_>>().await
    })
    .unwrap();
    let want = format!("{chunk:020}.");
    let at = listed
        .into_iter()
        .map(|o| o.location)
        .find(|p| p.filename().is_some_and(|n| n.starts_with(&want)))
        .expect("the chunk's object");
    (store, at)
}

/// Flips a byte of chunk `chunk` of site `site`'s share of `id`, behind its agent's back.
fn corrupt_chunk(net: &Net, backend: Backend, site: usize, id: &str, chunk: u64) {
    match backend {
        Backend::Local => {
            let data = net.info.sites[site]
                .store_dir
                .join(id)
                .join(format!("share-{site}"))
                .join("data");
            let mut bytes = std::fs::read(&data).unwrap();
            bytes[chunk as usize * CS + 100] ^= 0x40;
            std::fs::write(&data, bytes).unwrap();
        }
        Backend::S3 => {
            let (store, at) = chunk_object(net, site, id, chunk);
            block_on(async {
                let mut b = store.get(&at).await?.bytes().await?.to_vec();
                b[100] ^= 0x40;
                store.put(&at, PutPayload::from(b)).await.map(drop)
            })
            .unwrap();
        }
    }
}

/// Removes chunk `chunk` of site `site`'s share of `id` behind its agent's back: its object
/// deleted, or its bytes cut off the end of the local data file.
fn lose_chunk(net: &Net, backend: Backend, site: usize, id: &str, chunk: u64) {
    match backend {
        Backend::Local => {
            let data = net.info.sites[site]
                .store_dir
                .join(id)
                .join(format!("share-{site}"))
                .join("data");
            let f = std::fs::OpenOptions::new().write(true).open(&data).unwrap();
            f.set_len(chunk * CS as u64).unwrap();
        }
        Backend::S3 => {
            let (store, at) = chunk_object(net, site, id, chunk);
            block_on(store.delete(&at)).unwrap();
        }
    }
}

fn round_trip(backend: Backend) {
    let net = net(backend);
    let dir = tempfile::tempdir().unwrap();
    let mut ids = Vec::new();
    for (len, scheme) in [
        (0, "xor"),
        (1, "xor"),
        (CS + 1, "xor"),
        (3 * CS + 123, "xor"),
        (2 * CS + 7, "shamir"),
    ] {
        let f = random_file(dir.path(), &format!("in-{len}-{scheme}"), len);
        let id = store(
            &net.info,
            0,
            &f,
            &[SMALL_CHUNKS[0], SMALL_CHUNKS[1], "--scheme", scheme],
        );
        let out = dir.path().join(format!("out-{len}-{scheme}"));
        let rep = restore_ok(&net, &id, &out);
        assert!(
            same_files(&f, &out),
            "{backend:?}: {len} bytes ({scheme}) differ"
        );
        assert_eq!(rep["bytes"], len as u64);
        ids.push((id, f));
    }
    // Chunks larger than a multipart part (12 MiB, parts of 5 MiB on Garage).
    let f = random_file(dir.path(), "in-big", (24 << 20) + 5);
    let id = store(&net.info, 0, &f, &["--chunk-size", "12582912"]);
    let out = dir.path().join("out-big");
    restore_ok(&net, &id, &out);
    assert!(same_files(&f, &out), "{backend:?}: 12 MiB chunks differ");
    if let Backend::S3 = backend {
        // A multipart upload's ETag ends with its part count.
        let (store, at) = chunk_object(&net, 0, &id, 0);
        let etag = block_on(store.head(&at)).unwrap().e_tag.unwrap_or_default();
        assert!(etag.trim_matches('"').ends_with("-3"), "3 parts: {etag}");
    }
    let list = client(&net.info, 1, &["list"]).json();
    let backups = list["backups"].as_array().unwrap();
    assert_eq!(backups.len(), 6, "{backend:?}: {list}");
    for b in backups {
        assert_eq!(b["shares"].as_array().unwrap().len(), 3, "{b}");
    }
    // A renewed share set still restores, after the agents restart (an S3 agent keeps
    // nothing of its own: everything is read back from the bucket).
    let (id, f) = &ids[3];
    let r = client(&net.info, 0, &["renew", id]);
    assert_eq!(r.code, 0, "{backend:?} renew: {}", r.stderr);
    let mut net = net;
    for i in 0..3 {
        net.restart_agent(i).unwrap();
    }
    let v = client(&net.info, 0, &["verify", id]);
    assert_eq!(v.code, 0, "{backend:?} verify after renewal: {}", v.stdout);
    let out = dir.path().join("renewed");
    restore_ok(&net, id, &out);
    assert!(same_files(f, &out));
}

#[test]
fn round_trip_of_awkward_sizes_and_a_renewal_on_local_disk() {
    round_trip(Backend::Local);
}

#[test]
fn round_trip_of_awkward_sizes_and_a_renewal_on_garage() {
    round_trip(Backend::S3);
}

fn resume(backend: Backend) {
    let net = slow_net(backend);
    let dir = tempfile::tempdir().unwrap();
    let f = random_file(dir.path(), "in", 6 << 20);
    let mut child = spawn_store(&net, &f);
    wait_for_progress(&net, &mut child, 1, 1 << 20);
    child.kill().unwrap();
    child.wait().unwrap();

    let mut args = vec!["store", f.to_str().unwrap()];
    args.extend(SMALL_CHUNKS);
    let r = client(&net.info, 0, &args);
    assert_eq!(r.code, 0, "{backend:?}: {}", r.stderr);
    let rep = r.json();
    assert_eq!(rep["resumed"], true, "{backend:?}: {rep}");
    assert!(
        rep["chunks_sent"].as_u64().unwrap() < 3 * 96,
        "{backend:?}: only missing chunks are sent again: {rep}"
    );
    let out = dir.path().join("out");
    restore_ok(&net, rep["backup_id"].as_str().unwrap(), &out);
    assert!(same_files(&f, &out));
}

#[test]
fn a_killed_store_resumes_on_local_disk() {
    resume(Backend::Local);
}

#[test]
fn a_killed_store_resumes_on_garage() {
    resume(Backend::S3);
}

fn damage(backend: Backend) {
    let mut net = net(backend);
    let dir = tempfile::tempdir().unwrap();
    let f = random_file(dir.path(), "in", 6 * CS);
    let id = store(&net.info, 0, &f, &SMALL_CHUNKS);
    corrupt_chunk(&net, backend, 0, &id, 2);
    lose_chunk(&net, backend, 0, &id, 5);
    // After a restart too: the agent reads what it holds from its store, not its memory.
    net.restart_agent(0).unwrap();

    let v = client(&net.info, 0, &["verify", &id]);
    assert_eq!(
        v.code, 1,
        "{backend:?}: verify reports damage: {}",
        v.stdout
    );
    let report = v.json();
    assert_eq!(
        report["sites"][0]["shares"][0]["damaged"],
        serde_json::json!([2, 5]),
        "{backend:?}: {report}"
    );
    assert_eq!(
        report["sites"][1]["shares"][0]["damaged"],
        serde_json::json!([])
    );

    let out = dir.path().join("out");
    let rep = restore_ok(&net, &id, &out);
    assert!(same_files(&f, &out));
    let rejected = rep["rejected"].to_string();
    assert!(
        rejected.contains("\"A\"") && rejected.contains("chunk 2"),
        "{backend:?}: the bad share is named: {rejected}"
    );

    // Repaired in place from the other sites, it verifies clean and serves a restore.
    let r = client(&net.info, 0, &["repair", &id, "--site", "A"]);
    assert_eq!(r.code, 0, "{backend:?} repair: {}", r.stderr);
    let v = client(&net.info, 0, &["verify", &id]);
    assert_eq!(v.code, 0, "{backend:?}: clean after repair: {}", v.stdout);
    net.kill_site(2);
    let out = dir.path().join("out-ab");
    restore_ok(&net, &id, &out);
    assert!(same_files(&f, &out));
}

#[test]
fn a_damaged_and_a_lost_chunk_are_named_bypassed_and_repaired_on_local_disk() {
    damage(Backend::Local);
}

#[test]
fn a_corrupted_and_a_deleted_object_are_named_bypassed_and_repaired_on_garage() {
    damage(Backend::S3);
}

#[test]
fn garage_stopped_mid_store_fails_the_store_clearly_and_a_restart_resumes_it() {
    let mut net = slow_net(Backend::S3);
    let dir = tempfile::tempdir().unwrap();
    let f = random_file(dir.path(), "in", 6 << 20);
    let mut child = spawn_store(&net, &f);
    wait_for_progress(&net, &mut child, 1, 1 << 20);
    net.kill_garage(1);
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "the store fails: {stderr}");
    assert!(
        stderr.contains("site B") && stderr.contains("object store"),
        "the error names the site and its object store: {stderr}"
    );

    net.restart_garage(1).unwrap();
    let mut args = vec!["store", f.to_str().unwrap()];
    args.extend(SMALL_CHUNKS);
    let r = client(&net.info, 0, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let rep = r.json();
    assert_eq!(rep["resumed"], true, "{rep}");
    // Site B's share is whole: a restore from A and B alone gives the file.
    net.kill_site(2);
    let out = dir.path().join("out");
    let rep = restore_ok(&net, rep["backup_id"].as_str().unwrap(), &out);
    assert!(same_files(&f, &out));
    assert!(rep["used"].to_string().contains("\"B\""), "{rep}");
}

#[test]
fn an_agent_whose_object_store_is_down_refuses_to_start_and_says_why() {
    let mut net = net(Backend::S3);
    net.kill_garage(2);
    let err = net.restart_agent(2).expect_err("the agent does not serve");
    let log = std::fs::read_to_string(&net.info.sites[2].agent_log).unwrap();
    assert!(
        log.contains("object store")
            && log.contains(&net.info.sites[2].s3.as_ref().unwrap().endpoint),
        "the agent's log names its object store: {err:#}\n{log}"
    );
    // Stores that need site C now fail naming it; with C back they go through.
    let dir = tempfile::tempdir().unwrap();
    let f = random_file(dir.path(), "in", 3 * CS);
    let mut args = vec!["store", f.to_str().unwrap()];
    args.extend(SMALL_CHUNKS);
    let r = client(&net.info, 0, &args);
    assert_eq!(r.code, 1, "{}", r.stdout);
    assert!(r.stderr.contains("site C"), "{}", r.stderr);
    net.restart_garage(2).unwrap();
    net.restart_agent(2).unwrap();
    let r = client(&net.info, 0, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
}
