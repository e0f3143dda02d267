//! Share renewal end to end on a 3-site devnet (real KMEs, agents, CLI and certificates on
//! 127.0.0.1): after `renew`, every 2-subset of the new shares restores the file, while an
//! old share combined with a new one gives noise; a renewal killed at each site in turn, at
//! each step (staging, before and after the commit point), leaves the backup restorable and
//! is finished or rolled back by the next run; a sample set is renewed as a whole.

mod common;

use std::path::Path;

use common::{aborted, backup_net, client, random_file, restart_with_failpoint, store, Net};
use sharing::{Combiner, Scheme};

const SMALL_CHUNKS: &[&str] = &["--chunk-size", "65536"];

fn share_data(net: &Net, site: usize, id: &str) -> Vec<u8> {
    std::fs::read(
        net.info.sites[site]
            .store_dir
            .join(id)
            .join(format!("share-{site}"))
            .join("data"),
    )
    .unwrap()
}

/// Combines share chunks of shares 1 and 2 (as the agents keep them on disk) into
/// `len` bytes of output.
fn combine_1_2(scheme: Scheme, b: &[u8], c: &[u8], len: usize) -> Vec<u8> {
    let cs = 65_536;
    let comb = Combiner::new(scheme, cs, &[1, 2]).unwrap();
    let mut out = Vec::with_capacity(b.len());
    let mut buf = vec![0u8; cs];
    for (x, y) in b.chunks(cs).zip(c.chunks(cs)) {
        comb.combine_chunk(&[x, y], &mut buf).unwrap();
        out.extend_from_slice(&buf);
    }
    out.truncate(len);
    out
}

/// Restores `id` at site A with only the agents in `up` running; asserts the bytes.
fn restore_with(net: &mut Net, id: &str, file: &Path, up: &[usize], tag: &str) {
    for i in 0..3 {
        if !up.contains(&i) {
            net.kill_agent(i);
        }
    }
    let out = file.with_extension(format!("out-{tag}"));
    let r = client(&net.info, 0, &["restore", id, out.to_str().unwrap()]);
    for i in 0..3 {
        if !up.contains(&i) {
            net.restart_agent(i).unwrap();
        }
    }
    assert_eq!(r.code, 0, "{tag}: restore from {up:?}: {}", r.stderr);
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(file).unwrap(),
        "{tag}: restore from {up:?}"
    );
    std::fs::remove_file(out).unwrap();
}

fn epochs(net: &Net, id: &str) -> Vec<u64> {
    (0..3)
        .map(|i| {
            let m: serde_json::Value = serde_json::from_slice(
                &std::fs::read(
                    net.info.sites[i]
                        .store_dir
                        .join(id)
                        .join(format!("share-{i}"))
                        .join("manifest.json"),
                )
                .unwrap(),
            )
            .unwrap();
            m["epoch"].as_u64().unwrap_or(0)
        })
        .collect()
}

#[test]
fn renewed_shares_restore_from_every_pair_and_old_with_new_gives_noise() {
    let mut net = backup_net(None);
    let dir = tempfile::tempdir().unwrap();
    for (scheme_name, scheme) in [
        ("xor", Scheme::xor(2, 3).unwrap()),
        ("shamir", Scheme::shamir(2, 3).unwrap()),
    ] {
        let len = 6 * 65_536 + 4321;
        let f = random_file(dir.path(), &format!("in-{scheme_name}"), len);
        let id = store(
            &net.info,
            0,
            &f,
            &[SMALL_CHUNKS[0], SMALL_CHUNKS[1], "--scheme", scheme_name],
        );
        let old_b = share_data(&net, 1, &id);
        let old_c = share_data(&net, 2, &id);
        let file = std::fs::read(&f).unwrap();
        assert_eq!(
            combine_1_2(scheme, &old_b, &old_c, len),
            file,
            "{scheme_name}: the old shares on disk restore the file"
        );

        let r = client(&net.info, 0, &["renew", &id]);
        assert_eq!(r.code, 0, "{scheme_name}: {}", r.stderr);
        let rep = r.json();
        assert_eq!(rep["epoch"], 1, "{rep}");
        assert_eq!(rep["chunks"], 7);
        assert_eq!(rep["shares"].as_array().unwrap().len(), 3);
        assert_eq!(epochs(&net, &id), vec![1, 1, 1]);

        let new_b = share_data(&net, 1, &id);
        let new_c = share_data(&net, 2, &id);
        assert_ne!(old_b, new_b, "{scheme_name}: B's share changed");
        assert_eq!(combine_1_2(scheme, &new_b, &new_c, len), file);
        // An old share stolen before the renewal and a new one stolen after: noise, in
        // either combination (matches the file only by chance, 1 byte in 256).
        for (b, c, what) in [
            (&old_b, &new_c, "old B + new C"),
            (&new_b, &old_c, "new B + old C"),
        ] {
            let mixed = combine_1_2(scheme, b, c, len);
            let same = mixed.iter().zip(&file).filter(|(x, y)| x == y).count();
            assert!(
                (same as f64) < 3.0 * len as f64 / 256.0,
                "{scheme_name}: {what} matches {same} of {len} bytes of the file"
            );
        }

        let v = client(&net.info, 0, &["verify", &id]);
        assert_eq!(
            v.code, 0,
            "{scheme_name}: renewed shares verify: {}",
            v.stdout
        );
        for (pair, tag) in [([0, 1], "AB"), ([0, 2], "AC"), ([1, 2], "BC")] {
            restore_with(&mut net, &id, &f, &pair, &format!("{scheme_name}-{tag}"));
        }

        // A second renewal moves every share on again.
        let r = client(&net.info, 0, &["renew", &id]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        assert_eq!(epochs(&net, &id), vec![2, 2, 2]);
        restore_with(&mut net, &id, &f, &[0, 1, 2], &format!("{scheme_name}-2"));
    }
}

#[test]
fn a_renewal_killed_at_each_site_and_step_is_finished_or_rolled_back_and_restores() {
    let mut net = backup_net(None);
    let dir = tempfile::tempdir().unwrap();
    let f = random_file(dir.path(), "in", 3 * 65_536 + 17);
    let id = store(&net.info, 0, &f, SMALL_CHUNKS);
    let mut epoch = 0;
    for site in 0..3 {
        for step in ["renew-stage", "renew-precommit", "renew-commit"] {
            let tag = format!("{step}@{site}");
            restart_with_failpoint(&mut net, site, Some(step));
            let r = client(&net.info, 0, &["renew", &id]);
            assert_ne!(r.code, 0, "{tag}: the renewal went through a crashing site");
            assert!(aborted(&net, site), "{tag}: the failpoint was not reached");
            restart_with_failpoint(&mut net, site, None);
            let now = epochs(&net, &id);
            match step {
                // Nothing committed anywhere: every share as it was.
                "renew-stage" => assert_eq!(now, vec![epoch; 3], "{tag}"),
                // The others committed; this one has it prepared, not committed.
                "renew-precommit" => {
                    let mut want = vec![epoch + 1; 3];
                    want[site] = epoch;
                    assert_eq!(now, want, "{tag}");
                }
                // Committed everywhere (this one finished the swap when it restarted).
                _ => assert_eq!(now, vec![epoch + 1; 3], "{tag}"),
            }
            // Restorable in between, from any two sites that can restore.
            restore_with(&mut net, &id, &f, &[0, 1, 2], &format!("{tag}-between"));

            let r = client(&net.info, 0, &["renew", &id]);
            assert_eq!(r.code, 0, "{tag}: {}", r.stderr);
            let rep = r.json();
            if step == "renew-precommit" {
                assert_eq!(rep["finished_interrupted"], true, "{tag}: {rep}");
                epoch += 1;
            } else {
                assert_eq!(rep["finished_interrupted"], false, "{tag}: {rep}");
                if step == "renew-stage" {
                    assert_eq!(rep["rolled_back"].as_array().unwrap().len(), 1, "{rep}");
                }
                epoch += if step == "renew-commit" { 2 } else { 1 };
            }
            assert_eq!(epochs(&net, &id), vec![epoch; 3], "{tag}");
            restore_with(&mut net, &id, &f, &[0, 1, 2], &format!("{tag}-after"));
        }
    }
    for (pair, tag) in [([0, 1], "AB"), ([0, 2], "AC"), ([1, 2], "BC")] {
        restore_with(&mut net, &id, &f, &pair, tag);
    }
    let v = client(&net.info, 0, &["verify", &id]);
    assert_eq!(v.code, 0, "{}", v.stdout);
}

#[test]
fn a_sample_set_is_renewed_as_a_whole_and_a_lost_share_must_be_repaired_first() {
    let mut net = backup_net(None);
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run7");
    std::fs::create_dir_all(&run).unwrap();
    let files: Vec<_> = [0usize, 65_537, 2 * 65_536]
        .iter()
        .enumerate()
        .map(|(i, &len)| random_file(&run, &format!("s{i}.fq"), len + i))
        .collect();
    let r = client(
        &net.info,
        0,
        &[
            "store",
            run.to_str().unwrap(),
            SMALL_CHUNKS[0],
            SMALL_CHUNKS[1],
        ],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    let r = client(&net.info, 0, &["renew", "--set", "run7"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let renewed = r.json()["files"].as_array().unwrap().clone();
    assert_eq!(renewed.len(), 3);
    assert!(
        renewed.iter().all(|f| f["renewal"]["epoch"] == 1),
        "{renewed:?}"
    );
    let out = dir.path().join("back");
    let r = client(
        &net.info,
        0,
        &["restore", "--set", "run7", out.to_str().unwrap()],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    for f in &files {
        let name = f.file_name().unwrap();
        assert_eq!(
            std::fs::read(out.join("run7").join(name)).unwrap(),
            std::fs::read(f).unwrap()
        );
    }

    // The set's name alone names it too.
    let r = client(&net.info, 0, &["renew", "run7"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.json()["files"]
        .as_array()
        .unwrap()
        .iter()
        .all(|f| f["renewal"]["epoch"] == 2));

    // A share lost at B: renewal refuses (it would leave B's share behind) and says how
    // to fix it; after the repair, the renewal goes through.
    let id = renewed[1]["renewal"]["backup_id"]
        .as_str()
        .unwrap()
        .to_owned();
    std::fs::remove_dir_all(net.info.sites[1].store_dir.join(&id).join("share-1")).unwrap();
    net.restart_agent(1).unwrap();
    let r = client(&net.info, 0, &["renew", &id]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains(&format!("repair {id} --site B")),
        "{}",
        r.stderr
    );
    let r = client(&net.info, 0, &["repair", &id, "--site", "B"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(
        epochs(&net, &id),
        vec![2, 2, 2],
        "the repaired share joins epoch 2"
    );
    let r = client(&net.info, 0, &["renew", &id]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    restore_with(&mut net, &id, &files[1], &[1, 2], "after-repair");
}
