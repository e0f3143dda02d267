//! End-to-end tests of restores against a malicious site: real KMEs, agents and
//! `backup-client` runs on 127.0.0.1.
//!
//! The malicious site is this site's own agent (the one a restore asks first), turned
//! hostile the way a compromised agent would be: its store is doctored while it is stopped,
//! so that it then serves, over the real wire format and sealed with QKD keys it takes
//! itself, a share it altered, shares of other indices it claims, and a manifest it forged.
//! `restore` must never rename such bytes into place, must name the site, and must still
//! restore from the honest `k` sites.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};

use common::{backup_net, client, random_file, store};
use serde_json::Value;
use sharing::format::{ShareHeader, ShareTrailer, HEADER_LEN, TRAILER_LEN};

/// The folder of share `index` of backup `id` in `store_dir`.
fn share_dir(store_dir: &Path, id: &str, index: u8) -> PathBuf {
    store_dir.join(id).join(format!("share-{index}"))
}

fn read_manifest(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap()
}

fn write_manifest(dir: &Path, m: &Value) {
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_vec_pretty(m).unwrap(),
    )
    .unwrap();
}

/// The header and trailer a manifest records.
fn ends(m: &Value) -> (ShareHeader, ShareTrailer) {
    let h: [u8; HEADER_LEN] = hex::decode(m["header_hex"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let t: [u8; TRAILER_LEN] = hex::decode(m["trailer_hex"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let hd = ShareHeader::decode(&h).unwrap();
    let tr = ShareTrailer::decode(&t, &h, hd.chunk_size).unwrap();
    (hd, tr)
}

/// Re-encodes a manifest's header and trailer (so the doctored share is self-consistent).
fn set_ends(m: &mut Value, h: &ShareHeader, t: &ShareTrailer) {
    let hb = h.encode().unwrap();
    m["header_hex"] = Value::String(hex::encode(hb));
    m["trailer_hex"] = Value::String(hex::encode(t.encode(&hb)));
}

/// Flips a byte of chunk `j` of a share and records the new hash, so the agent itself takes
/// the altered chunk for sound and seals it for the client.
fn alter_chunk(dir: &Path, j: u64, chunk_size: usize) {
    let data = dir.join("data");
    let mut bytes = std::fs::read(&data).unwrap();
    let at = j as usize * chunk_size;
    bytes[at + 7] ^= 0x5a;
    std::fs::write(&data, &bytes).unwrap();
    let log = std::fs::read(dir.join("chunks.log")).unwrap();
    let nonce = log
        .chunks_exact(48)
        .rev()
        .find(|r| u64::from_le_bytes(r[0..8].try_into().unwrap()) == j)
        .map(|r| u64::from_le_bytes(r[8..16].try_into().unwrap()))
        .unwrap();
    let hash = blake3::hash(&bytes[at..at + chunk_size]);
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(dir.join("chunks.log"))
        .unwrap();
    f.write_all(&j.to_le_bytes()).unwrap();
    f.write_all(&nonce.to_le_bytes()).unwrap();
    f.write_all(hash.as_bytes()).unwrap();
}

/// Copies share `from` as a share `to` that the site claims, header and manifest rewritten.
fn claim_share(store_dir: &Path, id: &str, from: u8, to: u8) {
    let src = share_dir(store_dir, id, from);
    let dst = share_dir(store_dir, id, to);
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["data", "chunks.log", "keys.log"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let mut m = read_manifest(&src);
    let (mut h, t) = ends(&m);
    h.index = to;
    set_ends(&mut m, &h, &t);
    m["share_index"] = Value::from(to);
    write_manifest(&dst, &m);
}

/// Restores backup `id` at site A, which must succeed with the bytes of `original`.
fn restores_the_original(net: &common::Net, id: &str, original: &Path) -> common::Run {
    let out = net.dir.join("restored");
    let r = client(&net.info, 0, &["restore", id, out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(original).unwrap()
    );
    r
}

fn rejected_text(r: &common::Run) -> String {
    r.json()["rejected"].to_string()
}

#[test]
fn a_site_that_alters_its_share_and_claims_the_others_is_outvoted_and_named() {
    let mut net = backup_net(None);
    let f = random_file(&net.dir, "sample.fastq", 600_000);
    let id = store(&net.info, 0, &f, &["--chunk-size", "65536"]);
    // Site A's agent turns hostile: its own share altered (and resealed as sound), and it
    // claims shares 1 and 2 as well.
    net.kill_agent(0);
    let a_store = net.info.sites[0].store_dir.clone();
    alter_chunk(&share_dir(&a_store, &id, 0), 3, 65536);
    claim_share(&a_store, &id, 0, 1);
    claim_share(&a_store, &id, 0, 2);
    net.restart_agent(0).unwrap();
    let r = restores_the_original(&net, &id, &f);
    let rejected = rejected_text(&r);
    assert!(
        rejected.contains("claims share 1, which the backup's placement gives to AGENT_B"),
        "{rejected}"
    );
    assert!(rejected.contains("claims share 2"), "{rejected}");
    assert!(
        rejected.contains("inconsistent: files rebuilt with the share from site A"),
        "{rejected}"
    );
    let used = r.json()["used"].to_string();
    assert!(!used.contains("\"A\""), "{used}");
}

#[test]
fn a_site_that_forges_its_manifest_cannot_choose_the_digest() {
    let mut net = backup_net(None);
    let f = random_file(&net.dir, "sample.fastq", 300_000);
    let id = store(&net.info, 0, &f, &[]);
    net.kill_agent(0);
    let dir = share_dir(&net.info.sites[0].store_dir, &id, 0);
    let mut m = read_manifest(&dir);
    // A digest of its choosing, and a placement that gives it every share.
    let (h, mut t) = ends(&m);
    t.digest = *blake3::hash(b"the attacker's genome").as_bytes();
    set_ends(&mut m, &h, &t);
    m["placement"] = serde_json::json!(["AGENT_A", "AGENT_A", "AGENT_A"]);
    write_manifest(&dir, &m);
    net.restart_agent(0).unwrap();
    let r = restores_the_original(&net, &id, &f);
    let rejected = rejected_text(&r);
    assert!(
        rejected.contains("site A disagrees with the 2 sites that agree"),
        "{rejected}"
    );
    // With one honest site gone, the forger alone is not enough to restore anything.
    net.kill_agent(2);
    let out2 = net.dir.join("restored-2");
    let r = client(&net.info, 0, &["restore", &id, out2.to_str().unwrap()]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("fewer than k = 2 sites agree"),
        "{}",
        r.stderr
    );
    assert!(!out2.exists());
}
