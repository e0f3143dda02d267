//! Key relay through trusted nodes on real KMEs (certificates, durable pools, 127.0.0.1):
//! keys from A to a slave at D on a 4-site chain arrive byte-identical, each hop consumes
//! exactly the relayed key (plus its MAC key), no key ID is delivered twice; an alarmed link
//! on the path is routed around when the network has another path, and named in a 503 when
//! it has not; a transit KME killed during sustained relayed traffic never causes a
//! duplicate and every key a master received stays deliverable; the backup client stores
//! and restores across sites without a link between them, and says which path is missing
//! after a disaster.

mod common;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use common::{client, random_file, start, Net};
use devnet::{DevnetInfo, Options};
use etsi_spec::{KeyIds, KeyRequest};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A network with the given links (site letters), bulk key, relay on.
fn net_with(sites: usize, links: &str, length_km: Option<f64>) -> Net {
    start(Options {
        sites,
        links: Some(devnet::parse_links(links, sites).unwrap()),
        rate_bytes_per_sec: 0,
        max_key_count: 50_000,
        length_km,
        agents: false,
        ..Options::default()
    })
}

/// `qkd_key_consumed_bytes_total` per peer at site `i`'s KME.
fn consumed(info: &DevnetInfo, i: usize) -> HashMap<String, u64> {
    let text = rt().block_on(async {
        reqwest::get(&info.sites[i].metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    });
    text.lines()
        .filter_map(|l| l.strip_prefix("qkd_key_consumed_bytes_total{peer=\""))
        .filter_map(|l| {
            let (peer, rest) = l.split_once("\"}")?;
            Some((peer.to_owned(), rest.trim().parse().ok()?))
        })
        .collect()
}

fn delta(after: &HashMap<String, u64>, before: &HashMap<String, u64>, peer: &str) -> u64 {
    after.get(peer).copied().unwrap_or(0) - before.get(peer).copied().unwrap_or(0)
}

/// (key ID, key) of every key of a container.
fn pairs(c: &etsi_spec::KeyContainer) -> Vec<(String, String)> {
    c.keys
        .iter()
        .map(|k| (k.key_ID.clone(), k.key.clone()))
        .collect()
}

/// `number` keys of `bits` from `master` for `slave`: (IDs, bytes).
async fn enc(
    info: &DevnetInfo,
    master: &str,
    slave: &str,
    number: u64,
    bits: u64,
) -> Result<Vec<(String, String)>, String> {
    let req = KeyRequest {
        number: Some(number),
        size: Some(bits),
        ..Default::default()
    };
    info.client(master)
        .unwrap()
        .enc_keys(slave, &req)
        .await
        .map(|c| pairs(&c))
        .map_err(|e| e.to_string())
}

async fn dec(
    info: &DevnetInfo,
    slave: &str,
    master: &str,
    ids: &[String],
) -> Result<Vec<(String, String)>, String> {
    info.client(slave)
        .unwrap()
        .dec_keys(master, &KeyIds::from_ids(ids.iter().cloned()))
        .await
        .map(|c| pairs(&c))
        .map_err(|e| e.to_string())
}

#[test]
fn keys_cross_a_four_site_chain_byte_identical_and_each_hop_pays_its_share() {
    let net = net_with(4, "A-B,B-C,C-D", None);
    let info = &net.info;
    let rt = rt();
    let st = rt
        .block_on(info.client("SAE_A1").unwrap().status("SAE_D1"))
        .unwrap();
    assert_eq!(st.target_KME_ID, "KME_D");
    assert!(st.stored_key_count > 0, "{st:?}");
    let ext = serde_json::to_value(&st.status_extension).unwrap();
    assert_eq!(
        ext["relay"]["path"],
        serde_json::json!(["KME_A", "KME_B", "KME_C", "KME_D"])
    );

    let before: Vec<_> = (0..4).map(|i| consumed(info, i)).collect();
    let keys = rt.block_on(enc(info, "SAE_A1", "SAE_D1", 16, 256)).unwrap();
    assert_eq!(keys.len(), 16);
    let ids: Vec<String> = keys.iter().map(|k| k.0.clone()).collect();
    let got = rt.block_on(dec(info, "SAE_D1", "SAE_A1", &ids)).unwrap();
    assert_eq!(got, keys, "D's slave gets exactly the master's keys");
    // Delivered once: asked again, nothing.
    let again = rt.block_on(dec(info, "SAE_D1", "SAE_A1", &ids[..1]));
    assert!(again.is_err(), "a relayed key was delivered twice");
    // No one else may fetch them.
    assert!(rt
        .block_on(dec(info, "SAE_D2", "SAE_A1", &ids[1..2]))
        .is_err());

    // Hop consumption: the first hop the keys themselves (16 x 32 bytes), every later hop
    // the keys one-time padded plus 32 bytes of MAC key, at both ends of each link.
    let after: Vec<_> = (0..4).map(|i| consumed(info, i)).collect();
    let n = 16 * 32;
    assert_eq!(delta(&after[0], &before[0], "KME_B"), n, "A's end of A-B");
    assert_eq!(delta(&after[1], &before[1], "KME_A"), n, "B's end of A-B");
    assert_eq!(
        delta(&after[1], &before[1], "KME_C"),
        n + 32,
        "B's end of B-C"
    );
    assert_eq!(
        delta(&after[2], &before[2], "KME_B"),
        n + 32,
        "C's end of B-C"
    );
    assert_eq!(
        delta(&after[2], &before[2], "KME_D"),
        n + 32,
        "C's end of C-D"
    );
    assert_eq!(
        delta(&after[3], &before[3], "KME_C"),
        n + 32,
        "D's end of C-D"
    );

    // Trusted nodes say so; relay counters by role.
    let log_b = std::fs::read_to_string(&info.sites[1].kme_log).unwrap();
    assert!(log_b.contains("trusted node"), "B's log names its role");
    let metrics = |i: usize| {
        rt.block_on(async {
            reqwest::get(&info.sites[i].metrics_url)
                .await
                .unwrap()
                .text()
                .await
                .unwrap()
        })
    };
    assert!(metrics(0).contains("qkd_relay_keys_total{role=\"origin\"} 16"));
    assert!(metrics(1).contains("qkd_relay_keys_total{role=\"transit\"} 16"));
    assert!(metrics(3).contains("qkd_relay_keys_total{role=\"destination\"} 16"));

    // The other way, and from D's other SAE: the same.
    let keys = rt.block_on(enc(info, "SAE_D2", "SAE_A2", 3, 512)).unwrap();
    let ids: Vec<String> = keys.iter().map(|k| k.0.clone()).collect();
    assert_eq!(
        rt.block_on(dec(info, "SAE_A2", "SAE_D2", &ids)).unwrap(),
        keys
    );
}

#[test]
fn a_relay_beyond_max_hops_or_through_a_forbidden_node_is_refused_clearly() {
    let net = start(Options {
        sites: 4,
        links: Some(devnet::parse_links("A-B,B-C,C-D", 4).unwrap()),
        rate_bytes_per_sec: 0,
        agents: false,
        relay_toml: "max_hops = 2".into(),
        ..Options::default()
    });
    let info = &net.info;
    let rt = rt();
    let e = rt
        .block_on(enc(info, "SAE_A1", "SAE_D1", 1, 256))
        .unwrap_err();
    assert!(e.contains("503") && e.contains("within 2 hops"), "{e}");
    // Two hops are fine.
    let keys = rt.block_on(enc(info, "SAE_A1", "SAE_C1", 1, 256)).unwrap();
    let ids = vec![keys[0].0.clone()];
    assert_eq!(
        rt.block_on(dec(info, "SAE_C1", "SAE_A1", &ids)).unwrap(),
        keys
    );
    drop(net);

    // A node the operator does not trust with keys is never a relay.
    let net = start(Options {
        sites: 3,
        links: Some(devnet::parse_links("A-B,B-C", 3).unwrap()),
        rate_bytes_per_sec: 0,
        agents: false,
        relay_toml: "forbid = [\"KME_B\"]".into(),
        ..Options::default()
    });
    let e = rt
        .block_on(enc(&net.info, "SAE_A1", "SAE_C1", 1, 256))
        .unwrap_err();
    assert!(e.contains("503") && e.contains("avoiding KME_B"), "{e}");
}

/// Switches the eavesdropper of the link `site`–`peer` at site `site` (the producing end).
fn eavesdrop(info: &DevnetInfo, site: usize, peer: &str, fraction: f64) {
    let op = info.operator.clone().unwrap();
    let ca = std::fs::read(&info.ca_cert).unwrap();
    let ident = etsi_spec::Identity::from_files(&op.cert, &op.key).unwrap();
    let url = &info.sites[site].kme_url;
    let http = etsi_spec::Client::new(url, &ca, Some(&ident))
        .unwrap()
        .http()
        .clone();
    let code = rt().block_on(async {
        http.post(format!("{url}/admin/v1/links/{peer}/eavesdropper"))
            .header("content-type", "application/json")
            .body(format!("{{\"fraction\":{fraction}}}"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    assert_eq!(code, 200);
}

/// Waits until `master`'s KME reports the link to `peer` alarmed (in Status for `slave`).
fn await_alarm(info: &DevnetInfo, master: &str, slave: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let st = rt()
            .block_on(info.client(master).unwrap().status(slave))
            .unwrap();
        let ext = serde_json::to_value(&st.status_extension).unwrap();
        if ext["qkd_link"]["alarm"] == true {
            return;
        }
        assert!(Instant::now() < deadline, "no alarm: {ext}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn an_alarmed_link_is_routed_around_or_named_in_a_503() {
    // A square: A-B-D and A-C-D.
    let net = net_with(4, "A-B,B-D,A-C,C-D", Some(5.0));
    let info = &net.info;
    let rt = rt();
    let keys = rt.block_on(enc(info, "SAE_A1", "SAE_D1", 4, 256)).unwrap();
    let ids: Vec<String> = keys.iter().map(|k| k.0.clone()).collect();
    assert_eq!(
        rt.block_on(dec(info, "SAE_D1", "SAE_A1", &ids)).unwrap(),
        keys
    );
    let via = |info: &DevnetInfo, site: usize| {
        std::fs::read_to_string(&info.sites[site].kme_log)
            .unwrap()
            .matches("trusted node")
            .count()
    };
    // Both paths have two links; the first relay took one of them.
    let (first, other) = match (via(info, 1), via(info, 2)) {
        (1, 0) => (1, 2),
        (0, 1) => (2, 1),
        seen => panic!("one relay through B or C, not {seen:?}"),
    };
    let kme = |i: usize| format!("KME_{}", ["A", "B", "C", "D"][i]);
    let sae = |i: usize| format!("SAE_{}1", ["A", "B", "C", "D"][i]);

    // The eavesdropper on that path's second link (its producing end: the smaller ID).
    eavesdrop(info, first, "KME_D", 1.0);
    await_alarm(info, &sae(first), "SAE_D1");
    let keys = rt.block_on(enc(info, "SAE_A1", "SAE_D1", 4, 256)).unwrap();
    let ids: Vec<String> = keys.iter().map(|k| k.0.clone()).collect();
    assert_eq!(
        rt.block_on(dec(info, "SAE_D1", "SAE_A1", &ids)).unwrap(),
        keys
    );
    assert_eq!(
        via(info, other),
        1,
        "the alarmed {}-KME_D was routed around",
        kme(first)
    );

    // The other path's second link alarmed too: none is left; the 503 names both.
    eavesdrop(info, other, "KME_D", 1.0);
    await_alarm(info, &sae(other), "SAE_D1");
    let e = rt
        .block_on(enc(info, "SAE_A1", "SAE_D1", 1, 256))
        .unwrap_err();
    assert!(e.contains("503"), "{e}");
    assert!(
        e.contains("KME_B-KME_D") && e.contains("KME_C-KME_D"),
        "{e}"
    );
}

#[test]
fn a_transit_kme_killed_mid_traffic_never_duplicates_and_every_issued_key_is_deliverable() {
    let mut net = net_with(4, "A-B,B-C,C-D", None);
    let stop = Instant::now() + Duration::from_secs(6);
    let info = net.info.clone();
    // Sustained relayed traffic in the background; every key the master got is kept.
    let traffic = std::thread::spawn(move || {
        let rt = rt();
        let mut issued: Vec<(String, String)> = Vec::new();
        let mut failed = 0;
        while Instant::now() < stop {
            match rt.block_on(enc(&info, "SAE_A1", "SAE_D1", 8, 256)) {
                Ok(k) => issued.extend(k),
                Err(_) => {
                    failed += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
        (issued, failed)
    });
    std::thread::sleep(Duration::from_millis(1500));
    net.kill_kme(2); // C, in the middle
    std::thread::sleep(Duration::from_millis(1500));
    net.restart_kme(2).unwrap();
    let (issued, failed) = traffic.join().unwrap();
    assert!(failed > 0, "the kill interrupted some relays");
    assert!(
        issued.len() >= 16,
        "keys flowed before and after: {}",
        issued.len()
    );
    let ids: HashSet<&String> = issued.iter().map(|k| &k.0).collect();
    assert_eq!(ids.len(), issued.len(), "no key ID issued twice");
    // Every key the master received is delivered at D, once, byte-identical.
    let rt = rt();
    for chunk in issued.chunks(64) {
        let want: Vec<String> = chunk.iter().map(|k| k.0.clone()).collect();
        let got = rt
            .block_on(dec(&net.info, "SAE_D1", "SAE_A1", &want))
            .unwrap();
        assert_eq!(got, chunk.to_vec());
        assert!(rt
            .block_on(dec(&net.info, "SAE_D1", "SAE_A1", &want[..1]))
            .is_err());
    }
}

#[test]
fn the_backup_client_stores_across_sites_without_a_link_and_names_a_missing_path() {
    // The seed's star: A-B, A-C. B stores on A, B and C; B-C keys go through A.
    let mut net = start(Options {
        rate_bytes_per_sec: 0,
        max_key_count: 200_000,
        ..Options::default()
    });
    let dir = tempfile::tempdir().unwrap();
    let f = random_file(dir.path(), "in", 3 * 65_536 + 5);
    let r = client(
        &net.info,
        1,
        &["store", f.to_str().unwrap(), "--chunk-size", "65536"],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let id = r.json()["backup_id"].as_str().unwrap().to_owned();
    let out = dir.path().join("out");
    let r = client(&net.info, 2, &["restore", &id, out.to_str().unwrap()]);
    assert_eq!(
        r.code, 0,
        "C restores from B's and C's shares: {}",
        r.stderr
    );
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&f).unwrap());
    let log_a = std::fs::read_to_string(&net.info.sites[0].kme_log).unwrap();
    assert!(log_a.contains("trusted node"), "A relayed B's keys to C");

    // Disaster: site A is gone. B and C have no path left: a one-line error says so.
    net.kill_site(0);
    let out2 = dir.path().join("out2");
    let r = client(&net.info, 1, &["restore", &id, out2.to_str().unwrap()]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("no relay path"), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
}
