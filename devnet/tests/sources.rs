//! The `upstream-014` key source against one of our own KMEs standing in for a vendor device
//! that exposes ETSI GS QKD 014: SAE A1 (at KME_A) produces, SAE B1 (at KME_B) is the far end.
//! 127.0.0.1 only; every wait is bounded.

mod common;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use devnet::{DevnetInfo, Options};
use kms_server::source::{build, BlockRef, KeySource, SourceConfig, SourceError};

/// Bounds one source call.
async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(30), f)
        .await
        .expect("source call finished within 30 s")
}

fn two_sites(max_key_count: u64) -> common::Net {
    common::start(Options {
        sites: 2,
        agents: false,
        rate_bytes_per_sec: 1,
        max_key_count,
        ..Options::default()
    })
}

/// An upstream source at `site` as SAE `sae`, whose link peer is `peer`.
fn config(
    info: &DevnetInfo,
    site: usize,
    sae: usize,
    peer: &str,
    keys_per_request: u64,
) -> SourceConfig {
    let s = &info.sites[site].saes[sae];
    config_with(
        info,
        site,
        s.cert.clone(),
        s.key.clone(),
        peer,
        keys_per_request,
    )
}

fn config_with(
    info: &DevnetInfo,
    site: usize,
    cert: PathBuf,
    key: PathBuf,
    peer: &str,
    keys_per_request: u64,
) -> SourceConfig {
    SourceConfig::Upstream014 {
        url: info.sites[site].kme_url.clone(),
        ca: info.ca_cert.clone(),
        cert,
        key,
        peer_sae_id: peer.into(),
        key_size: 256,
        keys_per_request,
    }
}

fn source(config: &SourceConfig) -> Arc<dyn KeySource> {
    match build(config) {
        Ok(s) => s,
        Err(e) => panic!("source builds: {e}"),
    }
}

fn failed_message<T>(r: Result<T, SourceError>) -> String {
    match r {
        Err(SourceError::Failed(m)) => m,
        Err(e) => panic!("expected Failed, got {e:?}"),
        Ok(_) => panic!("expected Failed, got Ok"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn far_end_gets_the_producers_bytes_once() {
    let net = two_sites(2000);
    let info = &net.info;
    assert_eq!(info.sites[0].saes[0].id, "SAE_A1");
    assert_eq!(info.sites[1].saes[0].id, "SAE_B1");
    let producer = source(&config(info, 0, 0, "SAE_B1", 8));
    let far = source(&config(info, 1, 0, "SAE_A1", 8));
    assert_eq!(producer.kind(), "upstream-014");
    assert!(!producer.modelled());

    // 8 keys of 256 bits fit in 1000 bytes (and 3 in 100).
    let block = within(producer.next_block(1000))
        .await
        .expect("next_block")
        .expect("the vendor has key");
    assert_eq!(block.data.len(), 8 * 32);
    assert_eq!(block.reference.source, "upstream-014");
    let small = within(producer.next_block(100)).await.unwrap().unwrap();
    assert_eq!(small.data.len(), 3 * 32);
    assert!(within(producer.next_block(31)).await.unwrap().is_none());
    assert_ne!(&block.data[..32], &small.data[..32]);

    // A wrong length is refused before asking the vendor (so the keys stay fetchable).
    assert!(matches!(
        within(far.fetch_block(&block.reference, 255)).await,
        Err(SourceError::BadReference(_))
    ));
    let got = within(far.fetch_block(&block.reference, block.data.len()))
        .await
        .expect("fetch_block");
    assert_eq!(
        &got[..],
        &block.data[..],
        "far end gets the producer's bytes"
    );
    // The vendor erased them on delivery: a second fetch is Gone, never the same bytes.
    match within(far.fetch_block(&block.reference, block.data.len())).await {
        Err(SourceError::Gone(m)) => assert!(m.contains("400"), "{m}"),
        other => panic!("expected Gone, got {:?}", other.map(|d| d.len())),
    }
    // Release is a no-op at both ends.
    within(far.release(&block.reference)).await.unwrap();
    within(producer.release(&block.reference)).await.unwrap();
    let got = within(far.fetch_block(&small.reference, small.data.len()))
        .await
        .unwrap();
    assert_eq!(&got[..], &small.data[..]);

    // Blocks of another kind of source, and malformed references.
    let simulated = source(&SourceConfig::Simulated);
    let other = within(simulated.next_block(64)).await.unwrap().unwrap();
    assert!(matches!(
        within(far.fetch_block(&other.reference, 64)).await,
        Err(SourceError::BadReference(_))
    ));
    let malformed = BlockRef {
        source: "upstream-014".into(),
        detail: "256:not-a-uuid".into(),
    };
    assert!(matches!(
        within(far.fetch_block(&malformed, 32)).await,
        Err(SourceError::BadReference(_))
    ));
    // Well-formed IDs the vendor never issued: Gone.
    let unknown = BlockRef {
        source: "upstream-014".into(),
        detail: format!("256:{}", uuid::Uuid::new_v4()),
    };
    assert!(matches!(
        within(far.fetch_block(&unknown, 32)).await,
        Err(SourceError::Gone(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_vendor_pool_is_nothing_yet_not_an_error() {
    // 16 keys of 256 bits per direction, produced at 1 byte/s after the prefill.
    let net = two_sites(16);
    let info = &net.info;
    let producer = source(&config(info, 0, 0, "SAE_B1", 4));
    let far = source(&config(info, 1, 0, "SAE_A1", 4));
    let mut blocks = Vec::new();
    let mut exhausted = false;
    for _ in 0..20 {
        match within(producer.next_block(4096)).await {
            Ok(Some(b)) => blocks.push(b),
            Ok(None) => {
                exhausted = true;
                break;
            }
            Err(e) => panic!("an empty pool must not be an error: {e}"),
        }
    }
    assert!(exhausted, "the pool of 16 keys ran dry");
    assert!(!blocks.is_empty() && blocks.len() <= 4, "{}", blocks.len());
    assert!(within(producer.next_block(4096)).await.unwrap().is_none());
    for b in &blocks {
        let got = within(far.fetch_block(&b.reference, b.data.len()))
            .await
            .unwrap();
        assert_eq!(&got[..], &b.data[..]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_certificates_fail_with_a_clear_message() {
    let net = two_sites(200);
    let info = &net.info;

    // A certificate of our CA, but of an SAE that is not attached to this KME.
    let b1 = &info.sites[1].saes[0];
    let wrong_sae = source(&config_with(
        info,
        0,
        b1.cert.clone(),
        b1.key.clone(),
        "SAE_B1",
        4,
    ));
    let m = failed_message(within(wrong_sae.next_block(1000)).await);
    eprintln!("SAE not attached here: {m}");
    assert!(m.contains(&info.sites[0].kme_url), "{m}");
    assert!(m.contains("401"), "{m}");

    // A certificate of another CA: the TLS handshake fails.
    let other = tempfile::tempdir().unwrap();
    let ca = certs::Ca::new("Some other CA").unwrap();
    let foreign = ca
        .issue_to(other.path(), "SAE_A1", certs::Purpose::Sae)
        .unwrap();
    let stranger = source(&config_with(
        info,
        0,
        foreign.cert.clone(),
        foreign.key.clone(),
        "SAE_B1",
        4,
    ));
    let m = failed_message(within(stranger.next_block(1000)).await);
    eprintln!("certificate of another CA: {m}");
    assert!(m.contains(&info.sites[0].kme_url), "{m}");
    assert!(m.contains("request to KME failed"), "{m}");
    let far_stranger = source(&config_with(
        info,
        1,
        foreign.cert,
        foreign.key,
        "SAE_A1",
        4,
    ));
    let reference = BlockRef {
        source: "upstream-014".into(),
        detail: format!("256:{}", uuid::Uuid::new_v4()),
    };
    let m = failed_message(within(far_stranger.fetch_block(&reference, 32)).await);
    assert!(m.contains("request to KME failed"), "{m}");

    // Missing files are reported when the source is built.
    let missing = config_with(
        info,
        0,
        other.path().join("nope.pem"),
        other.path().join("nope.key"),
        "SAE_B1",
        4,
    );
    match build(&missing) {
        Err(SourceError::Failed(m)) => assert!(m.contains("nope.pem"), "{m}"),
        Err(e) => panic!("expected Failed, got {e:?}"),
        Ok(_) => panic!("built with missing certificate files"),
    }
}

// ---------------------------------------------------------------------------------------
// Whole KMEs fed by the sources.

/// Polls `f` until it gives `Some`, for at most `secs` seconds.
async fn eventually<T, F, Fut>(secs: u64, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn random_bytes(n: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut v = vec![0u8; n];
    rand::rng().fill_bytes(&mut v);
    v
}

fn decode(b64: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64 key")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_file_directories_feed_a_link_while_the_kmes_serve() {
    let dir = tempfile::tempdir().unwrap();
    let (da, db) = (dir.path().join("keys-A"), dir.path().join("keys-B"));
    std::fs::create_dir_all(&da).unwrap();
    std::fs::create_dir_all(&db).unwrap();
    // The "device" drops the first file at both ends before the KMEs start.
    let first = random_bytes(24 * 1024);
    for d in [&da, &db] {
        std::fs::write(d.join("0001.key"), &first).unwrap();
    }
    // Planted links: one where a key file would be (sorted first), one where the producer
    // writes its progress marker. Neither target may be read, zeroed or removed.
    let target = dir.path().join("not-key-material.txt");
    let victim = dir.path().join("victim.txt");
    std::fs::write(&target, b"precious").unwrap();
    std::fs::write(&victim, b"precious too").unwrap();
    for d in [&da, &db] {
        std::os::unix::fs::symlink(&target, d.join("0000.key")).unwrap();
    }
    std::os::unix::fs::symlink(&victim, da.join(".0001.key.consumed.tmp")).unwrap();
    let source = |d: &str| format!("kind = \"key-files\"\ndir = \"{{dir}}/{d}\"\npoll_ms = 50");
    let net = devnet::Devnet::start(
        dir.path(),
        &Options {
            sites: 2,
            agents: false,
            max_key_count: 1000,
            block_bytes: 4096,
            link_sources: vec![(0, 1, source("keys-A")), (1, 0, source("keys-B"))],
            ..Options::default()
        },
    )
    .expect("devnet with key-file links starts");
    let info = net.info.clone();
    let a1 = info.client("SAE_A1").unwrap();
    let b1 = info.client("SAE_B1").unwrap();
    let round_trip = |n: u64| {
        let (a1, b1) = (a1.clone(), b1.clone());
        async move {
            let got = a1.get_key("SAE_B1", Some(n), None).await.ok()?;
            let ids = etsi_spec::KeyIds::from_ids(got.keys.iter().map(|k| k.key_ID.clone()));
            let back = b1
                .dec_keys("SAE_A1", &ids)
                .await
                .expect("slave gets the keys");
            for (x, y) in got.keys.iter().zip(&back.keys) {
                assert_eq!(x.key, y.key, "slave gets the master's bytes");
            }
            Some(got.keys.iter().map(|k| decode(&k.key)).collect::<Vec<_>>())
        }
    };
    let keys = round_trip(10).await.expect("keys from the first file");
    for k in &keys {
        assert!(
            first.windows(k.len()).any(|w| w == &k[..]),
            "every key is a piece of the device's file"
        );
    }
    // A second file arrives while the KMEs serve: first at the far end, later at the
    // producing end (the link picks it up when it appears at both).
    let second = random_bytes(24 * 1024);
    std::fs::write(db.join("0002.key"), &second).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    std::fs::write(da.join("0002.key"), &second).unwrap();
    // Drain the pool until keys from the second file come out.
    eventually(60, "keys from the file that arrived while serving", || {
        let rt = round_trip(50);
        let second = second.clone();
        async move {
            match rt.await {
                Some(keys) => keys
                    .iter()
                    .any(|k| second.windows(k.len()).any(|w| w == &k[..]))
                    .then_some(()),
                None => None,
            }
        }
    })
    .await;
    // The first file was consumed at both ends: overwritten and removed.
    for d in [&da, &db] {
        let d = d.clone();
        eventually(30, "the consumed key file is removed", || {
            let d = d.clone();
            async move { (!d.join("0001.key").exists()).then_some(()) }
        })
        .await;
    }
    // The links were ignored, never followed: targets intact, no key came from them.
    assert_eq!(std::fs::read(&target).unwrap(), b"precious");
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious too");
    for d in [&da, &db] {
        assert!(std::fs::symlink_metadata(d.join("0000.key"))
            .unwrap()
            .is_symlink());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_014_source_lets_our_kms_front_another_kme() {
    // Sites A and B are the "vendor" KMEs (simulated link A-B); sites C and D are our KMS,
    // linked C-D through the vendor: C is SAE A2 of KME_A, D is SAE B2 of KME_B.
    let upstream = |site: usize, me: &str, peer: &str| {
        format!(
            "kind = \"upstream-014\"\nurl = \"{{url_{site}}}\"\nca = \"{{dir}}/pki/ca.pem\"\n\
             cert = \"{{dir}}/pki/sae-{me}.pem\"\nkey = \"{{dir}}/pki/sae-{me}.key\"\n\
             peer_sae_id = \"{peer}\"\nkey_size = 256\nkeys_per_request = 32"
        )
    };
    let net = common::start(Options {
        sites: 4,
        links: Some(vec![(0, 1), (2, 3)]),
        agents: false,
        max_key_count: 2000,
        block_bytes: 1024,
        link_sources: vec![
            (2, 3, upstream(0, "SAE_A2", "SAE_B2")),
            (3, 2, upstream(1, "SAE_B2", "SAE_A2")),
        ],
        ..Options::default()
    });
    let info = net.info.clone();
    let c1 = info.client("SAE_C1").unwrap();
    let d1 = info.client("SAE_D1").unwrap();
    let got = c1
        .get_key("SAE_D1", Some(20), None)
        .await
        .expect("C hands out keys");
    let ids = etsi_spec::KeyIds::from_ids(got.keys.iter().map(|k| k.key_ID.clone()));
    let back = d1.dec_keys("SAE_C1", &ids).await.expect("D delivers them");
    assert_eq!(got.keys.len(), 20);
    for (x, y) in got.keys.iter().zip(&back.keys) {
        assert_eq!(x.key_ID, y.key_ID);
        assert_eq!(
            x.key, y.key,
            "the far end got the same bytes through the vendor"
        );
    }
    // The vendor link really was used: its KMEs handed keys to SAE A2 and B2.
    let metrics = reqwest::get(&info.sites[0].metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("qkd_key_consumed_bytes_total{peer=\"KME_B\"}"),
        "the vendor KME served its link's key: {metrics}"
    );
}
