//! Registrations at a link's producing end that name a block the producer has not appended
//! yet (it appends only after the far end acknowledged the block, and the far end's masters
//! may take keys from it at once): the producer waits for its copy instead of refusing, so
//! no byte is left free here that the far end already handed out; a range that never comes
//! is still refused.

use std::path::Path;

use kms_server::config::Settings;
use kms_server::peer::{RegisteredKey, Registration};
use kms_server::pool::StreamId;
use kms_server::service::Kme;

/// KME_A (the producing end of its link to KME_B, which is not running), in memory.
fn kme_a(dir: &Path) -> Kme {
    let ids = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let pki = certs::DevPki::generate(dir, &ids(&["KME_A", "KME_B"]), &ids(&["SAE_A1", "SAE_B1"]))
        .expect("PKI");
    let toml = format!(
        "kme_id = \"KME_A\"\nlisten = \"127.0.0.1:1\"\nsaes = [\"SAE_A1\"]\n\n\
         [tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\npeer_cert = \"{}\"\npeer_key = \"{}\"\n\n\
         [[peers]]\nkme_id = \"KME_B\"\nurl = \"https://127.0.0.1:1\"\nsaes = [\"SAE_B1\"]\n",
        pki.ca.cert.display(),
        pki.kme_servers[0].cert.display(),
        pki.kme_servers[0].key.display(),
        pki.kme_peers[0].cert.display(),
        pki.kme_peers[0].key.display(),
    );
    let cfg = dir.join("kme-A.toml");
    std::fs::write(&cfg, toml).unwrap();
    Kme::new(Settings::load(&cfg).expect("settings")).expect("KME")
}

fn append(kme: &Kme, offset: u64, data: &[u8]) {
    let mut st = kme.lock().unwrap();
    let durable = kme
        .append_durable(
            &mut st,
            &StreamId::theirs("KME_B"),
            offset,
            data.to_vec().into(),
        )
        .expect("append");
    drop(st);
    drop(durable); // in memory: nothing to wait for
}

fn registration(offset: u64, len: u64) -> (Registration, String) {
    let id = uuid::Uuid::new_v4();
    let reg = Registration {
        master: "SAE_B1".into(),
        slaves: vec!["SAE_A1".into()],
        keys: vec![RegisteredKey {
            key_id: id,
            offset,
            len,
        }],
    };
    (reg, id.to_string())
}

#[tokio::test(start_paused = true)]
async fn a_registration_waits_for_the_producers_own_append() {
    let dir = tempfile::tempdir().unwrap();
    let kme = std::sync::Arc::new(kme_a(dir.path()));
    let first: Vec<u8> = (0..64).collect();
    let second: Vec<u8> = (64..128).collect();
    append(&kme, 0, &first);
    // The far end took bytes 70..102 from the second block, which is not here yet.
    let (reg, id) = registration(70, 32);
    let k = kme.clone();
    let pending = tokio::spawn(async move { k.register_many("KME_B", vec![reg]).await });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert!(!pending.is_finished(), "waits for the producer's copy");
    append(&kme, 64, &second);
    let results = pending.await.unwrap();
    assert_eq!(results, vec![None], "registered once the block is here");
    let keys = kme
        .dec_keys("SAE_A1", "SAE_B1", &[id])
        .await
        .expect("slave gets the key");
    assert_eq!(&keys[0].1[..], &second[6..38], "the registered bytes");
    // Bytes 64..70 and 102..128 are still free here, nothing else.
    let st = kme.lock().unwrap();
    assert_eq!(st.links["KME_B"].theirs.unconsumed(), 64 + 6 + 26);
}

#[tokio::test(start_paused = true)]
async fn a_range_that_never_comes_is_refused_after_the_wait() {
    let dir = tempfile::tempdir().unwrap();
    let kme = kme_a(dir.path());
    append(&kme, 0, &[7u8; 64]);
    let started = tokio::time::Instant::now();
    let (reg, id) = registration(1_000, 32);
    let results = kme.register_many("KME_B", vec![reg]).await;
    assert!(
        started.elapsed() >= kms_server::service::registration::APPEND_WAIT,
        "waited for the block first"
    );
    let why = results[0].as_deref().expect("refused");
    assert!(why.contains("not (or no longer) held"), "{why}");
    assert!(
        kme.dec_keys("SAE_A1", "SAE_B1", &[id]).await.is_err(),
        "nothing registered"
    );
    assert_eq!(kme.lock().unwrap().links["KME_B"].theirs.unconsumed(), 64);
}
