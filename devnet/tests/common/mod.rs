//! Shared helpers of the end-to-end tests: networks in temporary folders, raw HTTPS calls,
//! and validation of every response against `etsi-spec/openapi.yaml`.
#![allow(dead_code)]

use std::path::Path;
use std::sync::OnceLock;

use devnet::{Devnet, DevnetInfo, Options};
use serde_json::Value;

/// A running devnet in its own temporary folder (removed with it).
pub struct Net {
    pub net: Devnet,
    _dir: tempfile::TempDir,
}

impl std::ops::Deref for Net {
    type Target = Devnet;
    fn deref(&self) -> &Devnet {
        &self.net
    }
}

impl std::ops::DerefMut for Net {
    fn deref_mut(&mut self) -> &mut Devnet {
        &mut self.net
    }
}

/// A network whose pools are filled once and then practically frozen (1 byte/s), so that
/// pool figures only change when keys are taken.
pub fn frozen_net(max_key_count: u64) -> Net {
    start(Options {
        rate_bytes_per_sec: 1,
        max_key_count,
        ..Options::default()
    })
}

pub fn start(opts: Options) -> Net {
    let dir = tempfile::tempdir().expect("tempdir");
    let net = Devnet::start(dir.path(), &opts).expect("devnet starts");
    Net { net, _dir: dir }
}

pub fn info(net: &Net) -> &DevnetInfo {
    &net.net.info
}

/// OpenAPI path templates of the 014 operations (for [`call`]'s reply check).
pub const STATUS: &str = "/keys/{slave_SAE_ID}/status";
pub const ENC: &str = "/keys/{slave_SAE_ID}/enc_keys";
pub const DEC: &str = "/keys/{master_SAE_ID}/dec_keys";

/// The key IDs of a key container.
pub fn ids_of(body: &Value) -> Vec<String> {
    body["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["key_ID"].as_str().expect("key_ID").to_owned())
        .collect()
}

/// Certificate and key files of SAE `id`.
pub fn sae_files(info: &DevnetInfo, id: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let s = info
        .sites
        .iter()
        .flat_map(|s| &s.saes)
        .find(|x| x.id == id)
        .expect("sae");
    (s.cert.clone(), s.key.clone())
}

/// A raw reqwest client presenting `sae`'s certificate (or none) to its site's KME.
pub fn raw(info: &DevnetInfo, sae: Option<&str>, site: usize) -> (reqwest::Client, String) {
    let ca = std::fs::read(&info.ca_cert).expect("ca");
    let ident = sae.map(|id| {
        let (cert, key) = sae_files(info, id);
        etsi_spec::Identity::from_files(&cert, &key).expect("identity")
    });
    let url = info.sites[site].kme_url.clone();
    let c = etsi_spec::Client::new(&url, &ca, ident.as_ref()).expect("client");
    (c.http().clone(), format!("{url}/api/v1/keys"))
}

/// A reply: status and body.
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

/// Sends a request and checks the reply against the OpenAPI document for `template`.
pub async fn call(
    http: &reqwest::Client,
    method: &str,
    url: &str,
    template: &str,
    body: Option<&str>,
) -> Reply {
    let mut rb = match method {
        "get" => http.get(url),
        "post" => http.post(url),
        "put" => http.put(url),
        "delete" => http.delete(url),
        m => panic!("method {m}"),
    };
    if let Some(b) = body {
        rb = rb
            .header("content-type", "application/json")
            .body(b.to_owned());
    }
    let resp = rb.send().await.expect("request sent");
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.expect("body");
    let body: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        panic!(
            "{method} {url} -> {status}: body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&bytes)
        )
    });
    spec_check(method, template, status, &body);
    Reply { status, body }
}

fn openapi() -> &'static Value {
    static DOC: OnceLock<Value> = OnceLock::new();
    DOC.get_or_init(|| {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../etsi-spec/openapi.yaml");
        let text = std::fs::read_to_string(&p).expect("openapi.yaml");
        serde_norway::from_str(&text).expect("openapi.yaml parses")
    })
}

fn resolve<'a>(doc: &'a Value, v: &'a Value) -> &'a Value {
    match v.get("$ref").and_then(Value::as_str) {
        Some(r) => {
            let ptr = r.trim_start_matches('#');
            doc.pointer(ptr)
                .unwrap_or_else(|| panic!("dangling $ref {r}"))
        }
        None => v,
    }
}

/// Validates `body` against the schema the OpenAPI document gives for this operation and
/// status. Paths outside the document (404/405) must still carry the Error format.
pub fn spec_check(method: &str, template: &str, status: u16, body: &Value) {
    let doc = openapi();
    let schema_ref = match doc.pointer(&format!(
        "/paths/{}/{method}",
        template.replace('~', "~0").replace('/', "~1")
    )) {
        Some(op) if status != 404 && status != 405 => {
            let resp = op
                .pointer(&format!("/responses/{status}"))
                .unwrap_or_else(|| {
                    panic!("openapi.yaml has no {status} response for {method} {template}")
                });
            let resp = resolve(doc, resp);
            resp.pointer("/content/application~1json/schema")
                .unwrap_or_else(|| panic!("no JSON schema for {method} {template} {status}"))
                .clone()
        }
        _ => serde_json::json!({"$ref": "#/components/schemas/Error"}),
    };
    let mut root = serde_json::Map::new();
    root.insert("allOf".into(), Value::Array(vec![schema_ref]));
    root.insert("components".into(), doc["components"].clone());
    let root = Value::Object(root);
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&root)
        .expect("schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(body)
        .map(|e| format!("{e} at {}", e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{method} {template} -> {status}: body does not match openapi.yaml: {errors:?}\nbody: {body}"
    );
}

/// `stored_key_count` of master → slave.
pub async fn stored(info: &DevnetInfo, master: &str, slave: &str) -> u64 {
    info.client(master)
        .expect("client")
        .status(slave)
        .await
        .expect("status")
        .stored_key_count
}

/// A network with site agents and bulk key, for backup tests.
pub fn backup_net(links: Option<Vec<(usize, usize)>>) -> Net {
    start(Options {
        rate_bytes_per_sec: 0,
        max_key_count: 200_000,
        links,
        ..Options::default()
    })
}

/// A network with agents and a slow (3 MB/s) link with small pools, so that a store or a
/// restore is still running when a test kills it.
pub fn slow_net() -> Net {
    start(Options {
        rate_bytes_per_sec: 3_000_000,
        max_key_count: 20_000,
        block_bytes: 64 * 1024,
        ..Options::default()
    })
}

/// Output of one `backup-client` run.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", self.stdout, self.stderr))
    }
}

/// Runs `backup-client --config <site's client config> --json ARGS`.
pub fn client(info: &DevnetInfo, site: usize, args: &[&str]) -> Run {
    client_with_config(&info.sites[site].client_config, args)
}

pub fn client_with_config(config: &Path, args: &[&str]) -> Run {
    let bin = devnet::sibling_binary("backup-client").expect("backup-client binary");
    let out = std::process::Command::new(bin)
        .arg("--config")
        .arg(config)
        .arg("--json")
        .args(args)
        .output()
        .expect("backup-client runs");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Stores `file` from `site`; returns the backup ID.
pub fn store(info: &DevnetInfo, site: usize, file: &Path, extra: &[&str]) -> String {
    let mut args = vec!["store", file.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let r = client(info, site, &args);
    assert_eq!(r.code, 0, "store failed: {}", r.stderr);
    r.json()["backup_id"]
        .as_str()
        .expect("backup_id")
        .to_owned()
}

/// A file of `len` pseudo-random bytes.
pub fn random_file(dir: &Path, name: &str, len: usize) -> std::path::PathBuf {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15 ^ len as u64;
    let data: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let p = dir.join(name);
    std::fs::write(&p, data).expect("write file");
    p
}

/// Every key ID the agents recorded as used for a chunk.
pub fn used_key_ids(info: &DevnetInfo) -> Vec<String> {
    let mut ids = Vec::new();
    for s in &info.sites {
        for entry in walk(&s.store_dir) {
            if entry.file_name().is_some_and(|n| n == "keys.log") {
                let text = std::fs::read_to_string(&entry).unwrap_or_default();
                for line in text.lines() {
                    ids.extend(line.split_whitespace().skip(1).map(str::to_owned));
                }
            }
        }
    }
    ids
}

/// Every file and folder below `root`, `root` included (links are not followed).
pub fn walk(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(p) = stack.pop() {
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            if let Ok(rd) = std::fs::read_dir(&p) {
                stack.extend(rd.flatten().map(|e| e.path()));
            }
        }
        out.push(p);
    }
    out
}

/// POSTs the eavesdropper switch of the link site `site`–KME_B at site `site`'s KME with
/// `cert`/`key`: status and body.
pub fn operator_post(
    info: &DevnetInfo,
    site: usize,
    cert: &std::path::Path,
    key: &std::path::Path,
    fraction: f64,
) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ca = std::fs::read(&info.ca_cert).unwrap();
    let ident = etsi_spec::Identity::from_files(cert, key).unwrap();
    let url = &info.sites[site].kme_url;
    let http = etsi_spec::Client::new(url, &ca, Some(&ident))
        .unwrap()
        .http()
        .clone();
    rt.block_on(async {
        let r = http
            .post(format!("{url}/admin/v1/links/KME_B/eavesdropper"))
            .header("content-type", "application/json")
            .body(format!("{{\"fraction\":{fraction}}}"))
            .send()
            .await
            .expect("admin request sent");
        let code = r.status().as_u16();
        (code, r.text().await.unwrap_or_default())
    })
}

/// Adds `failpoint = "…"` to site `i`'s agent configuration (or removes it) and restarts it.
pub fn restart_with_failpoint(net: &mut Net, i: usize, failpoint: Option<&str>) {
    let p = net.info.sites[i].agent_config.clone();
    let text = std::fs::read_to_string(&p).unwrap();
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("failpoint"))
        .map(|l| format!("{l}\n"))
        .collect();
    let text = match failpoint {
        Some(f) => format!("failpoint = \"{f}\"\n{text}"),
        None => text,
    };
    std::fs::write(&p, text).unwrap();
    net.restart_agent(i).unwrap();
}

/// Whether agent `i` aborted at its failpoint (its log says so).
pub fn aborted(net: &Net, i: usize) -> bool {
    let log = std::fs::read_to_string(&net.info.sites[i].agent_log).unwrap_or_default();
    log.contains("failpoint reached")
}
