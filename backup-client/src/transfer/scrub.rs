//! Scrubbing (`verify --all`): every chunk of every share of every backup, re-read and
//! checked against its digest by the agent that holds it (only the results cross the
//! network), gathered into one report that names each damaged or missing chunk by file (as
//! `set/path` for files of sample sets), backup, site, share and chunk.

use std::collections::HashMap;

use serde::Serialize;
use share_transfer::wire::SetManifest;
use uuid::Uuid;

use super::{BackupClient, SiteCheck};

/// What is wrong with one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Fault {
    /// Present but its bytes do not match the digest recorded when it was stored.
    Damaged,
    /// Never written, or its file or log entry is gone.
    Missing,
}

/// One bad chunk.
#[derive(Debug, Clone, Serialize)]
pub struct BadChunk {
    pub name: String,
    pub backup_id: Uuid,
    pub site: String,
    pub share_index: u8,
    pub chunk: u64,
    pub fault: Fault,
}

/// One backup's shares as the sites found them.
#[derive(Debug, Clone, Serialize)]
pub struct ScrubbedBackup {
    pub backup_id: Uuid,
    pub name: String,
    pub bytes: u64,
    /// Every share at every site complete and intact.
    pub ok: bool,
    pub sites: Vec<SiteCheck>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct ScrubReport {
    /// Seconds since the Unix epoch when the scrub started.
    pub started: u64,
    pub seconds: f64,
    /// Nothing damaged, missing, incomplete or unreachable.
    pub ok: bool,
    pub backups: Vec<ScrubbedBackup>,
    pub bad_chunks: Vec<BadChunk>,
    /// Shares lost at their site (`repair` rebuilds them): `(name, backup, site, share)`.
    pub lost_shares: Vec<(String, Uuid, String, u8)>,
    /// Files of the set checked whose backup no reachable site holds: `(path, backup)`.
    pub lost: Vec<(String, Uuid)>,
    /// `(site, error)` of sites that could not be asked.
    pub unreachable: Vec<(String, String)>,
    pub shares_checked: usize,
    pub chunks_checked: u64,
}

impl BackupClient {
    /// Checks every backup found at the sites (or only those of `set`), one after the
    /// other, each at all sites at once; a set's files are named by their path in it.
    pub async fn scrub(&self, set: Option<&SetManifest>) -> ScrubReport {
        let t = std::time::Instant::now();
        let started = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let (mut entries, mut unreachable) = self.list().await;
        let mut report = ScrubReport {
            started,
            seconds: 0.0,
            ok: true,
            backups: Vec::new(),
            bad_chunks: Vec::new(),
            unreachable: Vec::new(),
            lost: Vec::new(),
            lost_shares: Vec::new(),
            shares_checked: 0,
            chunks_checked: 0,
        };
        if set.is_none() {
            // Files of sets are named by set and path.
            let (sets, _) = self.sets().await;
            let names: HashMap<Uuid, String> = sets
                .iter()
                .flat_map(|m| {
                    m.files
                        .iter()
                        .map(move |f| (f.backup_id, format!("{}/{}", m.name, f.path)))
                })
                .collect();
            for e in &mut entries {
                if let Some(n) = names.get(&e.backup_id) {
                    e.name.clone_from(n);
                }
            }
        }
        if let Some(set) = set {
            let paths: HashMap<Uuid, &str> = set
                .files
                .iter()
                .map(|f| (f.backup_id, f.path.as_str()))
                .collect();
            for f in &set.files {
                if !entries.iter().any(|e| e.backup_id == f.backup_id) {
                    report.lost.push((f.path.clone(), f.backup_id));
                }
            }
            entries.retain(|e| paths.contains_key(&e.backup_id));
            for e in &mut entries {
                if let Some(p) = paths.get(&e.backup_id) {
                    e.name = format!("{}/{p}", set.name);
                }
            }
        }
        for e in entries {
            // The placement came with the listing: no second round of manifests.
            let mut sites = self.check_sites(e.backup_id).await;
            self.mark_lost(&mut sites, &e.placement);
            let mut ok = true;
            for s in &sites {
                if let Some(err) = &s.error {
                    ok = false;
                    if !unreachable.iter().any(|(n, _)| n == &s.site) {
                        unreachable.push((s.site.clone(), err.clone()));
                    }
                }
                for &i in &s.lost {
                    ok = false;
                    report
                        .lost_shares
                        .push((e.name.clone(), e.backup_id, s.site.clone(), i));
                }
                for c in &s.shares {
                    report.shares_checked += 1;
                    report.chunks_checked += c.chunk_count;
                    ok &= c.complete && c.damaged.is_empty() && c.missing.is_empty();
                    let bad = c
                        .damaged
                        .iter()
                        .map(|&j| (j, Fault::Damaged))
                        .chain(c.missing.iter().map(|&j| (j, Fault::Missing)));
                    for (chunk, fault) in bad {
                        report.bad_chunks.push(BadChunk {
                            name: e.name.clone(),
                            backup_id: e.backup_id,
                            site: s.site.clone(),
                            share_index: c.share_index,
                            chunk,
                            fault,
                        });
                    }
                }
            }
            report.ok &= ok;
            report.backups.push(ScrubbedBackup {
                backup_id: e.backup_id,
                name: e.name,
                bytes: e.bytes,
                ok,
                sites,
            });
        }
        report.ok &= unreachable.is_empty() && report.lost.is_empty();
        report.unreachable = unreachable;
        report.seconds = t.elapsed().as_secs_f64();
        report
    }
}
