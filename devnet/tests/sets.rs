//! Sample sets end to end on a 3-site devnet (real KMEs, agents, CLI and certificates on
//! 127.0.0.1): a folder of files of awkward sizes stored as one set, restored whole and
//! one file alone; a second run sends only what changed; a set killed mid-way carries on
//! without sending completed files again; another site's recovery client finds the set
//! from the sites' manifests alone.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{backup_net, client, client_with_config, random_file, slow_net};
use serde_json::Value;

const SMALL_CHUNKS: &[&str] = &["--chunk-size", "65536"];

/// `root/run42/...`: `count` files of awkward sizes (0, 1, chunk ± 1, several chunks) in
/// nested folders, each with distinct content; returns the folder.
fn sample_folder(root: &Path, count: usize) -> PathBuf {
    let run = root.join("run42");
    let sizes = [
        0,
        1,
        65_535,
        65_536,
        65_537,
        3 * 65_536 + 5,
        2 * 65_536 - 1,
        100,
        4096,
        5 * 65_536 + 77,
    ];
    for i in 0..count {
        let sub = run
            .join(format!("lane{}", i % 3))
            .join(format!("s{}", i % 2));
        std::fs::create_dir_all(&sub).unwrap();
        let len = sizes[i % sizes.len()] + i / sizes.len();
        let f = random_file(&sub, &format!("sample-{i:02}.fastq"), len);
        // Distinct content even for equal lengths.
        if len > 0 {
            let mut b = std::fs::read(&f).unwrap();
            b[0] = i as u8;
            std::fs::write(&f, b).unwrap();
        }
    }
    run
}

/// Every regular file under `root`, as (path relative to root, bytes).
fn tree(root: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = common::walk(root)
        .into_iter()
        .filter(|p| {
            std::fs::symlink_metadata(p)
                .map(|m| m.file_type().is_file())
                .unwrap_or(false)
        })
        .map(|p| {
            let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
            let bytes = std::fs::read(&p).unwrap();
            (rel, bytes)
        })
        .collect();
    out.sort();
    out
}

fn outcomes(report: &Value) -> Vec<(String, String)> {
    report["files"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["path"].as_str().unwrap().to_owned(),
                f["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Restores file `path` of set `set` at site A into `out`.
fn restore_one(info: &devnet::DevnetInfo, set: &str, path: &str, out: &Path) {
    let out = out.to_str().unwrap();
    let r = client(info, 0, &["restore", "--set", set, "--file", path, out]);
    assert_eq!(r.code, 0, "{}", r.stderr);
}

#[test]
fn a_folder_is_one_set_restored_whole_or_file_by_file_and_found_again_elsewhere() {
    let net = backup_net(None);
    let dir = tempfile::tempdir().unwrap();
    let run = sample_folder(dir.path(), 20);
    // Not stored: a link (not followed) and a FIFO.
    std::os::unix::fs::symlink("/etc/hostname", run.join("link-to-elsewhere")).unwrap();
    let fifo = run.join("a-fifo");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(status.success());

    let mut args = vec!["store", run.to_str().unwrap()];
    args.extend_from_slice(SMALL_CHUNKS);
    let r = client(&net.info, 0, &args);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report = r.json();
    assert_eq!(report["set"], "run42", "a folder names its set");
    let outs = outcomes(&report);
    assert_eq!(outs.len(), 20);
    assert!(outs
        .iter()
        .all(|(p, o)| o == "stored" && p.starts_with("run42/lane")));
    let skipped: Vec<&str> = report["skipped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["path"].as_str().unwrap())
        .collect();
    assert_eq!(skipped, ["run42/a-fifo", "run42/link-to-elsewhere"]);
    assert_eq!(report["manifest_sites"], serde_json::json!(["A", "B", "C"]));

    // list shows the set and its files.
    let l = client(&net.info, 0, &["list"]).json();
    let sets = l["sets"].as_array().unwrap();
    assert_eq!(sets.len(), 1);
    assert_eq!(sets[0]["name"], "run42");
    assert_eq!(sets[0]["owner"], "SAE_A1");
    assert_eq!(sets[0]["files"].as_array().unwrap().len(), 20);

    // Whole set, byte-identical tree (without the skipped entries).
    let out = dir.path().join("restored");
    let r = client(
        &net.info,
        0,
        &["restore", "--set", "run42", out.to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    std::fs::remove_file(run.join("link-to-elsewhere")).unwrap();
    std::fs::remove_file(&fifo).unwrap();
    assert_eq!(tree(&out.join("run42")), tree(&run));

    // One file alone.
    let one = dir.path().join("one.fastq");
    restore_one(&net.info, "run42", "run42/lane1/s1/sample-07.fastq", &one);
    assert_eq!(
        std::fs::read(&one).unwrap(),
        std::fs::read(run.join("lane1/s1/sample-07.fastq")).unwrap()
    );

    // verify --set checks every file's shares.
    let v = client(&net.info, 0, &["verify", "--set", "run42"]);
    assert_eq!(v.code, 0, "{}", v.stdout);
    assert_eq!(v.json()["shares_checked"], 60);

    // Disaster: site A's client state is gone; site B's recovery client (SAE_B1, listed
    // in every agent's recovery_clients) finds the set from the sites and restores it.
    let out_b = dir.path().join("at-b");
    let r = client(
        &net.info,
        1,
        &["restore", "--set", "run42", out_b.to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(tree(&out_b.join("run42")), tree(&run));

    // Names that cannot be a set are refused before anything is sent.
    let r = client(
        &net.info,
        0,
        &["store", "--set", "../up", run.to_str().unwrap()],
    );
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("set name"), "{}", r.stderr);
}

#[test]
fn running_a_set_again_sends_only_new_or_changed_files() {
    let net = backup_net(None);
    let dir = tempfile::tempdir().unwrap();
    let run = sample_folder(dir.path(), 6);
    let store_set = || {
        let mut args = vec!["store", "--set", "batch-7", run.to_str().unwrap()];
        args.extend_from_slice(SMALL_CHUNKS);
        let r = client(&net.info, 0, &args);
        assert_eq!(r.code, 0, "{}", r.stderr);
        r.json()
    };
    let first = store_set();
    assert!(first["bytes_sent"].as_u64().unwrap() > 0);

    let again = store_set();
    assert_eq!(again["bytes_sent"], 0, "nothing changed: {again}");
    assert!(outcomes(&again).iter().all(|(_, o)| o == "unchanged"));

    // One file changes, one is added, one is deleted from the folder.
    let changed = run.join("lane2/s0/sample-02.fastq");
    let mut b = std::fs::read(&changed).unwrap();
    b.push(7);
    std::fs::write(&changed, &b).unwrap();
    random_file(&run.join("lane0/s0"), "late.fastq", 12_345);
    std::fs::remove_file(run.join("lane1/s1/sample-01.fastq")).unwrap();
    let third = store_set();
    let outs = outcomes(&third);
    let by = |p: &str| outs.iter().find(|(q, _)| q == p).unwrap().1.clone();
    assert_eq!(by("run42/lane2/s0/sample-02.fastq"), "stored");
    assert_eq!(by("run42/lane0/s0/late.fastq"), "stored");
    assert_eq!(
        by("run42/lane1/s1/sample-01.fastq"),
        "kept",
        "nothing dropped silently"
    );
    assert_eq!(
        outs.iter().filter(|(_, o)| o == "unchanged").count(),
        4,
        "{third}"
    );
    assert_eq!(third["bytes_sent"], b.len() as u64 + 12_345);

    // The changed file restores as it is now.
    let out = dir.path().join("changed");
    restore_one(&net.info, "batch-7", "run42/lane2/s0/sample-02.fastq", &out);
    assert_eq!(std::fs::read(&out).unwrap(), b);
}

#[test]
fn a_set_killed_midway_carries_on_without_sending_completed_files_again() {
    let net = slow_net();
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("slow");
    std::fs::create_dir_all(&run).unwrap();
    for i in 0..6 {
        random_file(&run, &format!("part-{i}.fastq"), 1_500_000 + i);
    }
    let bin = devnet::sibling_binary("backup-client").unwrap();
    let mut child = std::process::Command::new(&bin)
        .arg("--config")
        .arg(&net.info.sites[0].client_config)
        .args(["--json", "store", run.to_str().unwrap()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the sites' manifest lists two files, then kill the client.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let l = client(&net.info, 0, &["list"]).json();
        let done = l["sets"]
            .as_array()
            .and_then(|s| s.first())
            .and_then(|s| s["files"].as_array().map(Vec::len))
            .unwrap_or(0);
        if done >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "the set never got going");
        assert!(
            child.try_wait().unwrap().is_none(),
            "finished before the kill"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();

    let r = client_with_config(
        &net.info.sites[0].client_config,
        &["store", run.to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report = r.json();
    let outs = outcomes(&report);
    let unchanged = outs.iter().filter(|(_, o)| o == "unchanged").count();
    assert!(
        unchanged >= 2,
        "completed files are not sent again: {report}"
    );
    let total: u64 = (0..6).map(|i| 1_500_000 + i).sum();
    assert!(report["bytes_sent"].as_u64().unwrap() < total, "{report}");

    let out = dir.path().join("back");
    let r = client(
        &net.info,
        0,
        &["restore", "--set", "slow", out.to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(tree(&out.join("slow")), tree(&run));
}

#[test]
fn an_agent_keeps_at_most_its_bound_of_sets_per_client() {
    let net = common::start(devnet::Options {
        rate_bytes_per_sec: 0,
        max_key_count: 200_000,
        agent_limits_toml: "max_sets_per_client = 2".into(),
        ..devnet::Options::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let f = random_file(dir.path(), "one.fastq", 1000);
    let store_as =
        |name: &str| client(&net.info, 0, &["store", "--set", name, f.to_str().unwrap()]);
    assert_eq!(store_as("first").code, 0);
    assert_eq!(store_as("second").code, 0);
    let r = store_as("third");
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("max_sets_per_client = 2"),
        "the bound is named: {}",
        r.stderr
    );
    // An existing set can still be run again.
    let again = store_as("second");
    assert_eq!(again.code, 0, "{}", again.stderr);
    let sets = client(&net.info, 0, &["list"]).json()["sets"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(sets, 2);
}
