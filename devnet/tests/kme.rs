//! End-to-end tests of the KME network: real `kms-server` processes, real certificates,
//! 127.0.0.1 only. Every reply is checked against `etsi-spec/openapi.yaml`.

mod common;

use std::collections::HashSet;

use common::{call, frozen_net, ids_of, raw, start, stored, DEC, ENC, STATUS};
use serde_json::{json, Value};

fn keys_of(body: &Value) -> Vec<(String, String)> {
    body["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| {
            (
                k["key_ID"].as_str().expect("id").to_owned(),
                k["key"].as_str().expect("key").to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_to_slave_flow_get_and_post_with_status_counting_down() {
    let net = frozen_net(2000);
    let info = &net.info;
    let (a1, base_a) = raw(info, Some("SAE_A1"), 0);
    let (b1, base_b) = raw(info, Some("SAE_B1"), 1);

    let st = call(&a1, "get", &format!("{base_a}/SAE_B1/status"), STATUS, None).await;
    assert_eq!(st.status, 200);
    assert_eq!(st.body["source_KME_ID"], "KME_A");
    assert_eq!(st.body["target_KME_ID"], "KME_B");
    assert_eq!(st.body["master_SAE_ID"], "SAE_A1");
    assert_eq!(st.body["slave_SAE_ID"], "SAE_B1");
    assert_eq!(st.body["key_size"], 256);
    let before = st.body["stored_key_count"].as_u64().unwrap();
    assert!(before >= 100, "pool is filled: {before}");

    // GET form: 3 keys of the default size.
    let got = call(
        &a1,
        "get",
        &format!("{base_a}/SAE_B1/enc_keys?number=3"),
        ENC,
        None,
    )
    .await;
    assert_eq!(got.status, 200);
    let keys = keys_of(&got.body);
    assert_eq!(keys.len(), 3);
    for (_, k) in &keys {
        assert_eq!(k.len(), 44, "256-bit key in base64");
    }
    assert_eq!(stored(info, "SAE_A1", "SAE_B1").await, before - 3);

    // POST form: 2 keys of 512 bits = 4 default-size keys' worth.
    let got2 = call(
        &a1,
        "post",
        &format!("{base_a}/SAE_B1/enc_keys"),
        ENC,
        Some(r#"{"number":2,"size":512}"#),
    )
    .await;
    assert_eq!(got2.status, 200);
    let keys2 = keys_of(&got2.body);
    assert_eq!(keys2[0].1.len(), 88);
    assert_eq!(stored(info, "SAE_A1", "SAE_B1").await, before - 3 - 4);

    // The slave fetches: GET for the first, POST for the rest.
    let one = call(
        &b1,
        "get",
        &format!("{base_b}/SAE_A1/dec_keys?key_ID={}", keys[0].0),
        DEC,
        None,
    )
    .await;
    assert_eq!(one.status, 200);
    assert_eq!(keys_of(&one.body), vec![keys[0].clone()]);
    let rest: Vec<Value> = keys[1..]
        .iter()
        .chain(&keys2)
        .map(|(id, _)| json!({"key_ID": id}))
        .collect();
    let many = call(
        &b1,
        "post",
        &format!("{base_b}/SAE_A1/dec_keys"),
        DEC,
        Some(&json!({ "key_IDs": rest }).to_string()),
    )
    .await;
    assert_eq!(many.status, 200);
    let expect: Vec<(String, String)> = keys[1..].iter().chain(&keys2).cloned().collect();
    assert_eq!(
        keys_of(&many.body),
        expect,
        "slave gets exactly the master's bytes"
    );

    // The reverse direction (B's master, A's slave) has its own pool.
    let rev = call(&b1, "get", &format!("{base_b}/SAE_A1/status"), STATUS, None).await;
    assert_eq!(rev.body["source_KME_ID"], "KME_B");
    assert_eq!(rev.body["stored_key_count"].as_u64(), Some(before));

    // SAEs of the same KME exchange keys too.
    let (a2, _) = raw(info, Some("SAE_A2"), 0);
    let local = call(&a1, "get", &format!("{base_a}/SAE_A2/enc_keys"), ENC, None).await;
    assert_eq!(local.status, 200);
    let lk = keys_of(&local.body);
    let back = call(
        &a2,
        "get",
        &format!("{base_a}/SAE_A1/dec_keys?key_ID={}", lk[0].0),
        DEC,
        None,
    )
    .await;
    assert_eq!(keys_of(&back.body), lk);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multicast_delivers_the_same_key_to_each_named_slave_once() {
    let net = frozen_net(2000);
    let info = &net.info;
    let (a1, base_a) = raw(info, Some("SAE_A1"), 0);
    let (b1, base_b) = raw(info, Some("SAE_B1"), 1);
    let (b2, _) = raw(info, Some("SAE_B2"), 1);
    let (a2, _) = raw(info, Some("SAE_A2"), 0);
    let got = call(
        &a1,
        "post",
        &format!("{base_a}/SAE_B1/enc_keys"),
        ENC,
        Some(r#"{"number":2,"additional_slave_SAE_IDs":["SAE_B2","SAE_A2"]}"#),
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.body);
    let keys = keys_of(&got.body);
    let body =
        json!({"key_IDs": keys.iter().map(|(id, _)| json!({"key_ID": id})).collect::<Vec<_>>()})
            .to_string();
    for (client, base) in [(&b1, &base_b), (&b2, &base_b), (&a2, &base_a)] {
        let r = call(
            client,
            "post",
            &format!("{base}/SAE_A1/dec_keys"),
            DEC,
            Some(&body),
        )
        .await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(keys_of(&r.body), keys);
        let again = call(
            client,
            "post",
            &format!("{base}/SAE_A1/dec_keys"),
            DEC,
            Some(&body),
        )
        .await;
        assert_eq!(again.status, 400, "each slave gets a key once");
    }
    // A slave that was not named gets nothing.
    let (c1, base_c) = raw(info, Some("SAE_C1"), 2);
    let r = call(
        &c1,
        "post",
        &format!("{base_c}/SAE_A1/dec_keys"),
        DEC,
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 400);

    // Slaves at two different remote KMEs cannot share one key.
    let r = call(
        &a1,
        "post",
        &format!("{base_a}/SAE_B1/enc_keys"),
        ENC,
        Some(r#"{"additional_slave_SAE_IDs":["SAE_C1"]}"#),
    )
    .await;
    assert_eq!(r.status, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_path_answers_in_spec_format_and_changes_nothing() {
    // Frozen pools, and no relay: B and C stay unreachable from each other.
    let net = start(devnet::Options {
        rate_bytes_per_sec: 1,
        max_key_count: 2000,
        relay: false,
        ..devnet::Options::default()
    });
    let info = &net.info;
    let (a1, base_a) = raw(info, Some("SAE_A1"), 0);
    let (b1, base_b) = raw(info, Some("SAE_B1"), 1);
    let (b2, _) = raw(info, Some("SAE_B2"), 1);

    // One real key for SAE_B1, to mix into bad dec_keys requests.
    let good = call(&a1, "get", &format!("{base_a}/SAE_B1/enc_keys"), ENC, None).await;
    let good_id = ids_of(&good.body)[0].clone();
    let before_ab = stored(info, "SAE_A1", "SAE_B1").await;
    let before_ba = stored(info, "SAE_B1", "SAE_A1").await;
    let before_aa = stored(info, "SAE_A1", "SAE_A2").await;

    let big = format!(
        r#"{{"number":1,"extension_optional":[{{"pad":"{}"}}]}}"#,
        "x".repeat(300_000)
    );
    let enc_cases: Vec<(&str, String, Option<String>, &str)> = vec![
        ("get", "SAE_B1/enc_keys?number=0".into(), None, "number"),
        ("get", "SAE_B1/enc_keys?number=-1".into(), None, "number"),
        (
            "get",
            "SAE_B1/enc_keys?number=9223372036854775808".into(),
            None,
            "number",
        ),
        ("get", "SAE_B1/enc_keys?number=abc".into(), None, "number"),
        (
            "get",
            "SAE_B1/enc_keys?number=1025".into(),
            None,
            "max_key_per_request",
        ),
        // 3 x 32 KiB is more than the 64,000-byte pool can ever hold: 400 at once, not 503.
        (
            "get",
            "SAE_B1/enc_keys?number=3&size=262144".into(),
            None,
            "max_key_count",
        ),
        ("get", "SAE_B1/enc_keys?size=100".into(), None, "size"),
        ("get", "SAE_B1/enc_keys?size=8".into(), None, "size"),
        ("get", "SAE_B1/enc_keys?size=1048584".into(), None, "size"),
        ("get", "SAE_B1/enc_keys?count=2".into(), None, "count"),
        (
            "get",
            "SAE_B1/enc_keys?number=1&number=2".into(),
            None,
            "twice",
        ),
        ("get", "NOBODY/enc_keys".into(), None, "NOBODY"),
        ("get", "SAE_A1/enc_keys".into(), None, "itself"),
        (
            "post",
            "SAE_B1/enc_keys".into(),
            Some("{not json".into()),
            "malformed",
        ),
        (
            "post",
            "SAE_B1/enc_keys".into(),
            Some(r#"{"number":-5}"#.into()),
            "malformed",
        ),
        (
            "post",
            "SAE_B1/enc_keys".into(),
            Some(r#"{"number":1.5}"#.into()),
            "malformed",
        ),
        (
            "post",
            "SAE_B1/enc_keys".into(),
            Some(r#"{"number":18446744073709551616}"#.into()),
            "malformed",
        ),
        // Valid JSON, but not an object: serde would read a struct from an array by position.
        (
            "post",
            "SAE_B1/enc_keys".into(),
            Some("[]".into()),
            "object",
        ),
        (
            "post",
            "SAE_B1/enc_keys".into(),
            Some("42".into()),
            "object",
        ),
        (
            "post",
            "SAE_B1/enc_keys".into(),
            Some("true".into()),
            "object",
        ),
        (
            "post",
            "SAE_B1/enc_keys".into(),
            Some(r#""number""#.into()),
            "object",
        ),
        (
            "post",
            "SAE_B1/enc_keys".into(),
            Some(r#"[{"number":1}]"#.into()),
            "object",
        ),
        (
            "post",
            "SAE_B1/enc_keys".into(),
            Some("null".into()),
            "object",
        ),
        (
            "post",
            "SAE_B1/enc_keys".into(),
            Some(r#"{"extension_mandatory":[{"abc_route":"x"}]}"#.into()),
            "abc_route",
        ),
        (
            "post",
            "SAE_B1/enc_keys".into(),
            Some(r#"{"additional_slave_SAE_IDs":["SAE_B2","SAE_A2","SAE_C1"]}"#.into()),
            "max_SAE_ID_count",
        ),
        (
            "post",
            "SAE_B1/enc_keys".into(),
            Some(r#"{"additional_slave_SAE_IDs":["SAE_B1"]}"#.into()),
            "twice",
        ),
        (
            "post",
            "SAE_B1/enc_keys".into(),
            Some(r#"{"additional_slave_SAE_IDs":["GHOST"]}"#.into()),
            "GHOST",
        ),
        ("post", "SAE_B1/enc_keys".into(), Some(big), "exceeds"),
    ];
    for (method, path, body, needle) in &enc_cases {
        let r = call(
            &a1,
            method,
            &format!("{base_a}/{path}"),
            ENC,
            body.as_deref(),
        )
        .await;
        assert_eq!(r.status, 400, "{method} {path}: {}", r.body);
        let msg = r.body.to_string();
        assert!(
            msg.contains(needle),
            "{method} {path}: message {msg} should name {needle}"
        );
    }
    // B and C are not linked in the default star topology (and this network does not relay).
    let (b1_, _) = raw(info, Some("SAE_B1"), 1);
    let r = call(&b1_, "get", &format!("{base_b}/SAE_C1/enc_keys"), ENC, None).await;
    assert_eq!(r.status, 400);
    assert!(r.body["message"].as_str().unwrap().contains("SAE_C1"));
    let r = call(&a1, "get", &format!("{base_a}/NOBODY/status"), STATUS, None).await;
    assert_eq!(r.status, 400);
    // An SAE is never its own slave, not even in Status.
    let r = call(&a1, "get", &format!("{base_a}/SAE_A1/status"), STATUS, None).await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body["message"].as_str().unwrap().contains("itself"));

    let unknown = uuid::Uuid::new_v4().to_string();
    let dec_cases: Vec<(&reqwest::Client, &str, String, Option<String>, &str)> = vec![
        (
            &b1,
            "get",
            format!("SAE_A1/dec_keys?key_ID={unknown}"),
            None,
            unknown.as_str(),
        ),
        (
            &b1,
            "get",
            "SAE_A1/dec_keys?key_ID=not-a-uuid".into(),
            None,
            "not-a-uuid",
        ),
        (&b1, "get", "SAE_A1/dec_keys".into(), None, "exactly one"),
        (
            &b1,
            "get",
            format!("SAE_A1/dec_keys?key_ID={good_id}&key_ID={unknown}"),
            None,
            "exactly one",
        ),
        (
            &b1,
            "get",
            format!("SAE_A2/dec_keys?key_ID={good_id}"),
            None,
            good_id.as_str(),
        ),
        (
            &b1,
            "get",
            format!("NOBODY/dec_keys?key_ID={good_id}"),
            None,
            "NOBODY",
        ),
        (
            &b2,
            "get",
            format!("SAE_A1/dec_keys?key_ID={good_id}"),
            None,
            good_id.as_str(),
        ),
        (
            &b1,
            "post",
            "SAE_A1/dec_keys".into(),
            Some(json!({"key_IDs":[{"key_ID":good_id},{"key_ID":unknown}]}).to_string()),
            unknown.as_str(),
        ),
        (
            &b1,
            "post",
            "SAE_A1/dec_keys".into(),
            Some(json!({"key_IDs":[{"key_ID":good_id},{"key_ID":good_id}]}).to_string()),
            "twice",
        ),
        (
            &b1,
            "post",
            "SAE_A1/dec_keys".into(),
            Some(r#"{"key_IDs":[]}"#.into()),
            "no key_ID",
        ),
        (
            &b1,
            "post",
            "SAE_A1/dec_keys".into(),
            Some(r#"{"keys":[]}"#.into()),
            "malformed",
        ),
        (
            &b1,
            "post",
            "SAE_A1/dec_keys".into(),
            Some("[1,2".into()),
            "malformed",
        ),
    ];
    for (client, method, path, body, needle) in &dec_cases {
        let r = call(
            client,
            method,
            &format!("{base_b}/{path}"),
            DEC,
            body.as_deref(),
        )
        .await;
        assert_eq!(r.status, 400, "{method} {path}: {}", r.body);
        let msg = r.body.to_string();
        assert!(
            msg.contains(needle),
            "{method} {path}: message {msg} should name {needle}"
        );
    }

    // Nothing changed: pools as before, and the good key is still deliverable, once.
    assert_eq!(stored(info, "SAE_A1", "SAE_B1").await, before_ab);
    assert_eq!(stored(info, "SAE_B1", "SAE_A1").await, before_ba);
    assert_eq!(stored(info, "SAE_A1", "SAE_A2").await, before_aa);
    let r = call(
        &b1,
        "get",
        &format!("{base_b}/SAE_A1/dec_keys?key_ID={good_id}"),
        DEC,
        None,
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(keys_of(&r.body), keys_of(&good.body));

    // Outside the spec's paths and methods: still the Error format.
    let r = call(
        &a1,
        "get",
        &format!("{base_a}/SAE_B1/nothing"),
        "/none",
        None,
    )
    .await;
    assert_eq!(r.status, 404);
    let r = call(
        &a1,
        "delete",
        &format!("{base_a}/SAE_B1/enc_keys"),
        ENC,
        None,
    )
    .await;
    assert_eq!(r.status, 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_identifies_the_sae_and_refuses_the_others() {
    let net = frozen_net(2000);
    let info = &net.info;
    let (a1, base_a) = raw(info, Some("SAE_A1"), 0);

    // No client certificate: 401 in the spec's format on every operation.
    let (anon, _) = raw(info, None, 0);
    for (m, p, t) in [
        ("get", "SAE_B1/status", STATUS),
        ("get", "SAE_B1/enc_keys", ENC),
        ("post", "SAE_B1/enc_keys", ENC),
        (
            "get",
            "SAE_B1/dec_keys?key_ID=00000000-0000-0000-0000-000000000000",
            DEC,
        ),
    ] {
        let body = (m == "post").then_some("{}");
        let r = call(&anon, m, &format!("{base_a}/{p}"), t, body).await;
        assert_eq!(r.status, 401, "{m} {p}");
    }

    // SAE_B1's certificate at KME_A (not its KME): 401.
    let (b1_at_a, _) = raw(info, Some("SAE_B1"), 0);
    let r = call(
        &b1_at_a,
        "get",
        &format!("{base_a}/SAE_A1/enc_keys"),
        ENC,
        None,
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(r.body["message"].as_str().unwrap().contains("SAE_B1"));

    // A certificate from another CA: the TLS handshake fails.
    let other = tempfile::tempdir().unwrap();
    let pki = certs::DevPki::generate(other.path(), &[], &["SAE_A1".to_owned()]).unwrap();
    let ca = std::fs::read(&info.ca_cert).unwrap();
    let ident = etsi_spec::Identity::from_files(&pki.saes[0].cert, &pki.saes[0].key).unwrap();
    let foreign = etsi_spec::Client::new(&info.sites[0].kme_url, &ca, Some(&ident)).unwrap();
    let err = foreign.status("SAE_B1").await.unwrap_err();
    assert!(
        matches!(err, etsi_spec::ClientError::Transport(_)),
        "foreign CA must fail at TLS: {err}"
    );

    // SAE_B2 asking for keys that were obtained for SAE_B1: refused, and B1 still gets them.
    let got = call(
        &a1,
        "get",
        &format!("{base_a}/SAE_B1/enc_keys?number=2"),
        ENC,
        None,
    )
    .await;
    let ids = ids_of(&got.body);
    let (b2, base_b) = raw(info, Some("SAE_B2"), 1);
    let body = json!({"key_IDs": ids.iter().map(|i| json!({"key_ID": i})).collect::<Vec<_>>()})
        .to_string();
    let r = call(
        &b2,
        "post",
        &format!("{base_b}/SAE_A1/dec_keys"),
        DEC,
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 400);
    let (b1, _) = raw(info, Some("SAE_B1"), 1);
    let r = call(
        &b1,
        "post",
        &format!("{base_b}/SAE_A1/dec_keys"),
        DEC,
        Some(&body),
    )
    .await;
    assert_eq!(r.status, 200);
    assert_eq!(keys_of(&r.body), keys_of(&got.body));

    // An SAE cannot use the KME-to-KME interface.
    let r = a1
        .post(format!(
            "{}/internal/v1/keys/register",
            info.sites[0].kme_url
        ))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_byte_is_reused_with_masters_on_both_kmes_at_once() {
    const PER_DIRECTION: usize = 10_000;
    const BATCH: u64 = 250;
    let net = frozen_net(12_000);
    let info = net.info.clone();
    let mut tasks = Vec::new();
    for (master, slave) in [("SAE_A1", "SAE_B1"), ("SAE_B1", "SAE_A1")] {
        for _ in 0..4 {
            let info = info.clone();
            tasks.push(tokio::spawn(async move {
                let m = info.client(master).unwrap();
                let s = info.client(slave).unwrap();
                let mut out = Vec::new();
                for _ in 0..(PER_DIRECTION as u64 / BATCH / 4) {
                    let got = m.get_key(slave, Some(BATCH), None).await.expect("enc_keys");
                    let ids =
                        etsi_spec::KeyIds::from_ids(got.keys.iter().map(|k| k.key_ID.clone()));
                    let back = s.dec_keys(master, &ids).await.expect("dec_keys");
                    assert_eq!(got.keys.len(), back.keys.len());
                    for (x, y) in got.keys.iter().zip(&back.keys) {
                        assert_eq!(x.key_ID, y.key_ID);
                        assert_eq!(x.key, y.key, "slave gets the master's bytes");
                        out.push((x.key_ID.clone(), x.key.clone()));
                    }
                }
                out
            }));
        }
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    assert_eq!(all.len(), 2 * PER_DIRECTION);
    let ids: HashSet<&str> = all.iter().map(|(i, _)| i.as_str()).collect();
    let values: HashSet<&str> = all.iter().map(|(_, k)| k.as_str()).collect();
    assert_eq!(ids.len(), all.len(), "key IDs are unique");
    assert_eq!(values.len(), all.len(), "key values are unique");
}

#[test]
fn bad_configuration_is_a_one_line_error_naming_the_field() {
    let net = frozen_net(100);
    let bin = devnet::sibling_binary("kms-server").unwrap();
    let cfg = std::fs::read_to_string(&net.info.sites[0].kme_config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            cfg.replace("max_key_count = 100", "max_key_count = 100\nkey_size = 100"),
            vec![],
            "limits.key_size",
        ),
        (
            cfg.replace("max_key_count = 100", "max_key_count = \"lots\""),
            vec![],
            "max_key_count",
        ),
        (
            cfg.clone(),
            vec![("KMS_LIMITS__MIN_KEY_SIZE", "7")],
            "limits.min_key_size",
        ),
        (cfg.replace("kme_id = ", "kme_idd = "), vec![], "kme_id"),
    ];
    for (text, env, needle) in cases {
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, text).unwrap();
        let out = std::process::Command::new(&bin)
            .arg("--config")
            .arg(&p)
            .envs(env)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
        assert!(err.contains(needle), "{err} should name {needle}");
    }
}

/// Stops a devnet started by the CLI, also when the test fails.
struct DownOnDrop(std::path::PathBuf);

impl Drop for DownOnDrop {
    fn drop(&mut self) {
        let _ = devnet::down(&self.0);
    }
}

fn curl(args: &[&str]) -> Value {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--fail-with-body"])
        .args(args)
        .output()
        .expect("curl is installed");
    assert!(
        out.status.success(),
        "curl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON reply")
}

#[test]
fn devnet_cli_gives_a_network_that_curl_drives_with_only_devnet_json() {
    let dir = tempfile::tempdir().unwrap();
    let bin = devnet::sibling_binary("devnet").unwrap();
    let up = std::process::Command::new(&bin)
        .args(["up", "--dir"])
        .arg(dir.path())
        .args(["--links", "A-B,A-C,B-C"])
        .output()
        .unwrap();
    let _guard = DownOnDrop(dir.path().to_owned());
    assert!(
        up.status.success(),
        "{}",
        String::from_utf8_lossy(&up.stderr)
    );

    let text = std::fs::read_to_string(dir.path().join("devnet.json")).unwrap();
    let net: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(net["links"].as_array().unwrap().len(), 3);
    let ca = net["ca_cert"].as_str().unwrap();
    let site = |i: usize| &net["sites"][i];
    let sae = |i: usize| &site(i)["saes"][0];
    let (b_url, c_url) = (
        site(1)["kme_url"].as_str().unwrap(),
        site(2)["kme_url"].as_str().unwrap(),
    );
    let (b_id, c_id) = (
        sae(1)["id"].as_str().unwrap(),
        sae(2)["id"].as_str().unwrap(),
    );
    let auth = |i: usize| {
        vec![
            "--cacert".to_owned(),
            ca.to_owned(),
            "--cert".to_owned(),
            sae(i)["cert"].as_str().unwrap().to_owned(),
            "--key".to_owned(),
            sae(i)["key"].as_str().unwrap().to_owned(),
        ]
    };
    let with = |i: usize, extra: &[&str]| {
        let mut a = auth(i);
        a.extend(extra.iter().map(|s| s.to_string()));
        curl(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    // B is the master, C the slave (the B-C link of the triangle).
    let st = with(1, &[&format!("{b_url}/api/v1/keys/{c_id}/status")]);
    assert_eq!(st["target_KME_ID"], site(2)["kme_id"]);
    let keys = with(
        1,
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            r#"{"number":2,"size":256}"#,
            &format!("{b_url}/api/v1/keys/{c_id}/enc_keys"),
        ],
    );
    let ids: Vec<Value> = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| json!({"key_ID": k["key_ID"]}))
        .collect();
    let back = with(
        2,
        &[
            "-X",
            "POST",
            "-H",
            "Content-Type: application/json",
            "-d",
            &json!({ "key_IDs": ids }).to_string(),
            &format!("{c_url}/api/v1/keys/{b_id}/dec_keys"),
        ],
    );
    assert_eq!(back["keys"], keys["keys"]);

    let down = std::process::Command::new(&bin)
        .args(["down", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(down.status.success());
    assert!(!dir.path().join("devnet.json").exists());
}
