//! End-to-end tests of what the backup side refuses early and how it keeps its files: real
//! KMEs, agents and `backup-client` runs on 127.0.0.1. Private modes of every file a devnet
//! creates, restores that never write through a planted or foreign partial file, a
//! placement that names a site twice, a randomness "device" that is a file, and a store
//! that names a missing QKD link as such.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};

use common::{backup_net, client, client_with_config, random_file, start, store, walk};

#[test]
fn every_file_a_devnet_and_its_processes_create_is_private() {
    let net = backup_net(None);
    let f = random_file(&net.dir, "sample.fastq", 300_000);
    let id = store(&net.info, 0, &f, &[]);
    let out = net.dir.join("restored.fastq");
    let r = client(&net.info, 1, &["restore", &id, out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let mut checked = 0;
    for p in walk(&net.dir) {
        let meta = std::fs::symlink_metadata(&p).unwrap();
        if meta.file_type().is_socket() {
            continue;
        }
        let mode = meta.permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is {mode:o}", p.display());
        checked += 1;
    }
    // PKI, configurations, logs, KME stores, shares, client state, the restored file.
    assert!(checked > 60, "{checked} files checked");
    assert_eq!(
        std::fs::metadata(&out).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

use std::os::unix::fs::FileTypeExt;

#[test]
fn a_restore_never_writes_through_a_planted_or_foreign_partial_file() {
    let net = backup_net(None);
    let f = random_file(&net.dir, "in", 200_000);
    let id = store(&net.info, 0, &f, &[]);
    let victim = net.dir.join("victim");
    std::fs::write(&victim, b"not yours").unwrap();
    let out = net.dir.join("out");
    let partial = net.dir.join("out.partial");
    std::os::unix::fs::symlink(&victim, &partial).unwrap();
    let r = client(&net.info, 0, &["restore", &id, out.to_str().unwrap()]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("symbolic link"), "{}", r.stderr);
    assert_eq!(std::fs::read(&victim).unwrap(), b"not yours");
    assert!(!out.exists());
    // A partial file someone left readable by others.
    std::fs::remove_file(&partial).unwrap();
    std::fs::write(&partial, b"").unwrap();
    std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = client(&net.info, 0, &["restore", &id, out.to_str().unwrap()]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("group or others"), "{}", r.stderr);
    assert_eq!(
        std::fs::metadata(&partial).unwrap().uid(),
        rustix::process::geteuid().as_raw()
    );
    // Removed, the restore goes through.
    std::fs::remove_file(&partial).unwrap();
    let r = client(&net.info, 0, &["restore", &id, out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&f).unwrap());
}

#[test]
fn a_placement_naming_a_site_twice_and_a_file_as_randomness_are_refused() {
    let net = backup_net(None);
    let f = random_file(&net.dir, "in", 10_000);
    let base = std::fs::read_to_string(&net.info.sites[0].client_config).unwrap();
    let with_backup = |extra: &str| {
        // Keys of [backup] go into that table, wherever the devnet put it.
        let cfg = net.dir.join(format!("client-{}.toml", extra.len()));
        let text = if base.contains("[backup]") {
            base.replace("[backup]", &format!("[backup]\n{extra}"))
        } else {
            format!("{base}\n[backup]\n{extra}\n")
        };
        std::fs::write(&cfg, text).unwrap();
        cfg
    };
    let twice = with_backup(r#"placement = ["A", "B", "B"]"#);
    let r = client_with_config(&twice, &["store", f.to_str().unwrap()]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("listed twice"), "{}", r.stderr);
    let not_random = net.dir.join("not-random.bin");
    std::fs::write(&not_random, vec![7u8; 1 << 20]).unwrap();
    let file_rng = with_backup(&format!("rng = \"{}\"", not_random.display()));
    let r = client_with_config(&file_rng, &["store", f.to_str().unwrap()]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("not a character device"), "{}", r.stderr);
}

#[test]
fn a_store_to_a_site_without_a_qkd_link_says_so() {
    // The seed's star: A-B and A-C, no link between B and C, and no relay through A.
    let net = start(devnet::Options {
        rate_bytes_per_sec: 0,
        max_key_count: 200_000,
        relay: false,
        ..devnet::Options::default()
    });
    let f = random_file(&net.dir, "in", 10_000);
    let r = client(&net.info, 1, &["store", f.to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr
            .contains("no QKD link between this site and site C"),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("is back"), "{}", r.stderr);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
}

#[test]
fn a_server_that_is_not_the_sites_own_agent_is_refused() {
    let net = backup_net(None);
    let f = random_file(&net.dir, "in", 100_000);
    let id = store(&net.info, 0, &f, &[]);
    // Site A's client configuration now sends site B's traffic to site C's agent: a server
    // with a valid certificate of the CA, but not AGENT_B's.
    let text = std::fs::read_to_string(&net.info.sites[0].client_config).unwrap();
    let b_url = &net.info.sites[1].agent_url;
    let c_url = &net.info.sites[2].agent_url;
    assert!(text.contains(b_url.as_str()));
    let cfg = net.dir.join("client-A-misdirected.toml");
    std::fs::write(&cfg, text.replace(b_url.as_str(), c_url)).unwrap();
    let r = client_with_config(&cfg, &["store", f.to_str().unwrap()]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("is not site B's agent AGENT_B")
            && r.stderr.contains("urn:qkd:sae:AGENT_C"),
        "{}",
        r.stderr
    );
    // A restore does not take the impostor's answers for B's; A and C suffice.
    let out = net.dir.join("out");
    let r = client_with_config(&cfg, &["restore", &id, out.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&f).unwrap());
    let used = r.json()["used"].to_string();
    assert!(!used.contains("\"B\""), "{used}");
}
