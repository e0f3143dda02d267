//! The physically modelled link on a running devnet: modelled rate and QBER in Status, and
//! an operator's eavesdropper switch that raises the QBER, stops the link and raises an alarm.

mod common;

use std::time::{Duration, Instant};

use serde_json::Value;

fn link_ext(info: &devnet::DevnetInfo, master: &str, slave: &str) -> Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let st = rt
        .block_on(info.client(master).unwrap().status(slave))
        .unwrap();
    serde_json::to_value(st.status_extension).unwrap()["qkd_link"].clone()
}

#[test]
fn a_modelled_link_reports_its_rate_and_an_eavesdropper_stops_it_with_an_alarm() {
    let net = common::start(devnet::Options {
        length_km: Some(10.0),
        max_key_count: 20_000,
        agents: false,
        ..devnet::Options::default()
    });
    let info = &net.info;
    let ext = link_ext(info, "SAE_A1", "SAE_B1");
    let rate = ext["secure_key_rate_bps"].as_f64().unwrap();
    let qber = ext["qber"].as_f64().unwrap();
    assert!(
        (5e6..20e6).contains(&rate),
        "about 10 Mbit/s at 10 km: {ext}"
    );
    assert!((0.01..0.03).contains(&qber), "{ext}");
    assert_eq!(ext["alarm"], false);
    let log = std::fs::read_to_string(&info.sites[0].kme_log).unwrap();
    assert!(
        log.contains("QKD link model"),
        "the modelled rate is logged at start"
    );

    // Prometheus metrics: pool levels, key counters, QBER, request counts and latencies.
    let text = std::process::Command::new("curl")
        .args(["-s", &info.sites[0].metrics_url])
        .output()
        .expect("curl")
        .stdout;
    let text = String::from_utf8_lossy(&text);
    for needle in [
        "qkd_pool_bytes{peer=\"KME_B\",direction=\"own\"}",
        "qkd_key_generated_bytes_total{peer=\"KME_B\"}",
        "qkd_link_qber_ratio{peer=\"KME_B\"} 0.0",
        "kme_requests_total{endpoint=\"GET /api/v1/keys/{slave}/status\",code=\"200\"}",
        "kme_request_duration_seconds_bucket{endpoint=\"GET /api/v1/keys/{slave}/status\",le=\"+Inf\"}",
    ] {
        assert!(text.contains(needle), "metrics lack {needle}:\n{text}");
    }

    // Only an operator may switch the eavesdropper on.
    let sae = &info.sites[0].saes[0];
    let (code, body) = common::operator_post(info, 0, &sae.cert, &sae.key, 1.0);
    assert_eq!(code, 401, "{body}");
    let op = info.operator.clone().unwrap();
    let (code, body) = common::operator_post(info, 0, &op.cert, &op.key, 1.0);
    assert_eq!(code, 200, "{body}");

    // The QBER rises by about 25 points, the link aborts, both ends show the alarm.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let a = link_ext(info, "SAE_A1", "SAE_B1");
        let b = link_ext(info, "SAE_B1", "SAE_A1");
        if a["alarm"] == true && b["alarm"] == true {
            assert!(a["qber"].as_f64().unwrap() > 0.2, "{a}");
            assert_eq!(a["secure_key_rate_bps"], 0.0);
            break;
        }
        assert!(Instant::now() < deadline, "no alarm: {a} {b}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(&info.sites[0].kme_log).unwrap();
    assert!(log.contains("ALARM"), "an alarm line is logged");

    // The attacker goes: the link recovers.
    let (code, _) = common::operator_post(info, 0, &op.cert, &op.key, 0.0);
    assert_eq!(code, 200);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let b = link_ext(info, "SAE_B1", "SAE_A1");
        if b["alarm"] == false {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "link did not recover: {b}\n{}\n{}",
            std::fs::read_to_string(&info.sites[1].kme_log).unwrap(),
            std::fs::read_to_string(&info.sites[0].kme_log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_faithful_bb84_link_feeds_both_pools_with_keys_the_protocol_made_equal() {
    // Small frames so that a debug build keeps up.
    let bb84 = "kind = \"bb84\"\npulses_per_frame = 2000000".to_owned();
    let net = common::start(devnet::Options {
        sites: 2,
        agents: false,
        length_km: Some(10.0),
        max_key_count: 300,
        block_bytes: 4096,
        link_sources: vec![(0, 1, bb84.clone()), (1, 0, bb84)],
        ..devnet::Options::default()
    });
    let info = net.info.clone();
    let a1 = info.client("SAE_A1").unwrap();
    let b1 = info.client("SAE_B1").unwrap();
    // Both directions: each KME's masters draw on key the protocol produced.
    for (m, s, mc, sc) in [
        ("SAE_A1", "SAE_B1", &a1, &b1),
        ("SAE_B1", "SAE_A1", &b1, &a1),
    ] {
        let deadline = Instant::now() + Duration::from_secs(60);
        let got = loop {
            match mc.get_key(s, Some(40), None).await {
                Ok(k) => break k,
                Err(e) => {
                    assert!(Instant::now() < deadline, "keys from the bb84 link: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        let ids = etsi_spec::KeyIds::from_ids(got.keys.iter().map(|k| k.key_ID.clone()));
        let back = sc.dec_keys(m, &ids).await.expect("slave gets them");
        for (x, y) in got.keys.iter().zip(&back.keys) {
            assert_eq!(x.key, y.key, "Alice's and Bob's keys agree");
        }
    }
    let log = std::fs::read_to_string(&info.sites[0].kme_log).unwrap();
    assert!(log.contains("bb84 frame done"), "frames are logged:\n{log}");
    assert!(log.contains("final_bits="), "{log}");
    // The pool keeps being refilled by new frames as keys are drawn.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut drawn = 0;
    while drawn < 600 {
        match a1.get_key("SAE_B1", Some(20), None).await {
            Ok(k) => drawn += k.keys.len(),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
        assert!(
            Instant::now() < deadline,
            "the bb84 link refills: {drawn} keys drawn"
        );
    }
}
