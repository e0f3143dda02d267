//! Crash safety of the durable key pool: KMEs are killed with SIGKILL during heavy enc_keys
//! and dec_keys traffic and restarted. Across all restarts no key is delivered twice, every
//! slave gets exactly its master's bytes, and every key a master received is still
//! deliverable to its slave afterwards (unless that slave's own fetch was cut by a crash).

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devnet::Options;
use etsi_spec::{ClientError, KeyIds};

/// What the SAEs saw.
#[derive(Default)]
struct Ledger {
    /// key ID → (master, slave, value) as the master received it.
    issued: HashMap<String, (String, String, String)>,
    /// (key ID, value) as slaves received them, every delivery.
    delivered: Vec<(String, String, String)>,
    /// Key IDs whose fetch by the slave was interrupted (the KME died mid-call).
    cut: HashSet<String>,
    /// Key IDs not yet asked for by their slave.
    waiting: Vec<(String, String, String)>,
    enc_errors: usize,
}

fn transport(e: &ClientError) -> bool {
    e.status().is_none()
}

async fn worker(
    info: devnet::DevnetInfo,
    master: &'static str,
    slave: &'static str,
    ledger: Arc<Mutex<Ledger>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let m = info.client(master).expect("master client");
    let s = info.client(slave).expect("slave client");
    let mut round = 0u64;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        round += 1;
        match m.get_key(slave, Some(8), None).await {
            Ok(got) => {
                let ids: Vec<String> = got.keys.iter().map(|k| k.key_ID.clone()).collect();
                {
                    let mut l = ledger.lock().unwrap();
                    for k in &got.keys {
                        let prev = l.issued.insert(
                            k.key_ID.clone(),
                            (master.into(), slave.into(), k.key.clone()),
                        );
                        assert!(prev.is_none(), "key ID {} issued twice", k.key_ID);
                    }
                    // Every other batch waits until after the crashes.
                    if round.is_multiple_of(2) {
                        for id in &ids {
                            l.waiting.push((id.clone(), master.into(), slave.into()));
                        }
                        continue;
                    }
                }
                match s
                    .dec_keys(master, &KeyIds::from_ids(ids.iter().cloned()))
                    .await
                {
                    Ok(back) => {
                        let mut l = ledger.lock().unwrap();
                        for k in &back.keys {
                            l.delivered
                                .push((k.key_ID.clone(), k.key.clone(), slave.into()));
                        }
                    }
                    Err(e) => {
                        let mut l = ledger.lock().unwrap();
                        if transport(&e) {
                            l.cut.extend(ids.iter().cloned());
                        } else {
                            // A clean refusal (e.g. 503 while reconciling) delivers nothing:
                            // ask again at the end.
                            for id in &ids {
                                l.waiting.push((id.clone(), master.into(), slave.into()));
                            }
                        }
                    }
                }
            }
            Err(e) => {
                if ledger.lock().unwrap().enc_errors == 0 {
                    eprintln!("first enc_keys refusal: {e}");
                }
                ledger.lock().unwrap().enc_errors += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_during_traffic_never_loses_or_repeats_a_key() {
    let mut net = common::start(Options {
        rate_bytes_per_sec: 200_000,
        max_key_count: 4_000,
        block_bytes: 16 * 1024,
        ..Options::default()
    });
    let info = net.info.clone();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for (master, slave) in [
        ("SAE_A1", "SAE_B1"),
        ("SAE_B1", "SAE_A1"),
        ("SAE_A1", "SAE_B1"),
        ("SAE_B1", "SAE_A1"),
    ] {
        workers.push(tokio::spawn(worker(
            info.clone(),
            master,
            slave,
            ledger.clone(),
            stop.clone(),
        )));
    }
    // Kill each KME twice, alternating, at uneven moments of the traffic.
    let started = Instant::now();
    let mut delivered_between = 0;
    for (round, site) in [0usize, 1, 0, 1].into_iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(700 + 311 * round as u64)).await;
        let before = ledger.lock().unwrap().issued.len();
        net.kill_kme(site);
        tokio::time::sleep(Duration::from_millis(150)).await;
        net.restart_kme(site).expect("restart");
        net.wait_ready(Duration::from_secs(30))
            .expect("network serves again after the restart");
        // After each restart: every key a master received so far and whose slave has not
        // asked for it yet is deliverable to that slave.
        delivered_between += deliver_waiting(&info, &ledger).await;
        assert!(
            before > 0 || round > 0,
            "traffic was flowing before the kill ({} enc_keys refusals)",
            ledger.lock().unwrap().enc_errors
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in workers {
        tokio::time::timeout(Duration::from_secs(30), w)
            .await
            .expect("worker stops")
            .expect("worker ran");
    }
    assert!(started.elapsed() < Duration::from_secs(120));

    eprintln!("traffic and restarts took {:?}", started.elapsed());
    // After the last restart: every waiting key is deliverable to its slave, exactly once.
    let cut: Vec<String> = ledger.lock().unwrap().cut.iter().cloned().collect();
    let waiting_total = deliver_waiting(&info, &ledger).await + delivered_between;
    // Keys whose fetch a crash cut: delivered at most once in all (now or before).
    let mut cut_lost = 0;
    for id in &cut {
        let (master, slave) = {
            let l = ledger.lock().unwrap();
            let (m, s, _) = &l.issued[id];
            (m.clone(), s.clone())
        };
        let s = info.client(&slave).unwrap();
        match s.dec_keys(&master, &KeyIds::from_ids([id.clone()])).await {
            Ok(back) => {
                let mut l = ledger.lock().unwrap();
                for k in &back.keys {
                    l.delivered
                        .push((k.key_ID.clone(), k.key.clone(), slave.clone()));
                }
            }
            Err(e) => {
                assert_eq!(e.status().map(|s| s.as_u16()), Some(400), "{e}");
                cut_lost += 1;
            }
        }
    }
    // A second fetch of a delivered key is refused.
    let probe = {
        let l = ledger.lock().unwrap();
        l.delivered.first().map(|(id, _, slave)| {
            let (master, _, _) = &l.issued[id];
            (id.clone(), master.clone(), slave.clone())
        })
    };
    let (id, master, slave) = probe.expect("some key was delivered");
    let again = info
        .client(&slave)
        .unwrap()
        .dec_keys(&master, &KeyIds::from_ids([id.clone()]))
        .await;
    assert!(again.is_err(), "a delivered key is not delivered again");

    let l = ledger.lock().unwrap();
    assert!(
        l.issued.len() > 200,
        "heavy traffic: only {} keys issued",
        l.issued.len()
    );
    let mut seen_ids = HashSet::new();
    for (id, value, slave) in &l.delivered {
        assert!(seen_ids.insert(id.clone()), "key {id} delivered twice");
        let (_, want_slave, want) = &l.issued[id];
        assert_eq!(value, want, "slave got the master's bytes for {id}");
        assert_eq!(slave, want_slave);
    }
    let values: HashSet<&str> = l.issued.values().map(|(_, _, v)| v.as_str()).collect();
    assert_eq!(values.len(), l.issued.len(), "no key value issued twice");
    // Every key issued is delivered, except those whose fetch a crash cut after the KME
    // had recorded the delivery.
    assert_eq!(l.delivered.len() + cut_lost, l.issued.len());
    assert!(cut_lost <= cut.len());
    eprintln!(
        "crash test: {} keys issued, {} delivered, {} after restarts, {} cut by a crash ({} of those lost), {} enc_keys refusals",
        l.issued.len(),
        l.delivered.len(),
        waiting_total,
        cut.len(),
        cut_lost,
        l.enc_errors
    );
}

/// Delivers every key waiting for its slave (in batches, all or nothing each; a refused batch
/// is retried key by key so that the failure names the key); returns how many.
async fn deliver_waiting(info: &devnet::DevnetInfo, ledger: &Arc<Mutex<Ledger>>) -> usize {
    let waiting = std::mem::take(&mut ledger.lock().unwrap().waiting);
    let mut groups: HashMap<(String, String), Vec<String>> = HashMap::new();
    for (id, master, slave) in &waiting {
        groups
            .entry((master.clone(), slave.clone()))
            .or_default()
            .push(id.clone());
    }
    for ((master, slave), ids) in &groups {
        let s = info.client(slave).unwrap();
        for chunk in ids.chunks(100) {
            let back = match s
                .dec_keys(master, &KeyIds::from_ids(chunk.iter().cloned()))
                .await
            {
                Ok(b) => b,
                Err(e) => {
                    for id in chunk {
                        if let Err(e) = s.dec_keys(master, &KeyIds::from_ids([id.clone()])).await {
                            panic!("key {id} that {master} received is not deliverable to {slave}: {e}");
                        }
                    }
                    panic!("batch refused although every key is deliverable: {e}");
                }
            };
            let mut l = ledger.lock().unwrap();
            for k in &back.keys {
                l.delivered
                    .push((k.key_ID.clone(), k.key.clone(), slave.clone()));
            }
        }
    }
    waiting.len()
}
