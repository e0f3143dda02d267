//! Sample sets: several files, or folders, stored as one named job. Each file is its own
//! backup (with its own resume); the set's manifest ([`SetManifest`]: path, size, mtime and
//! backup of every file) is kept at every site and rewritten after each file, so that an
//! interrupted set carries on where it stopped and a lost client finds its catalogue again.
//!
//! What goes in (`collect`): regular files. A folder is walked recursively. Symbolic links
//! are never followed (a link could lead out of the folder or loop) and, like sockets,
//! FIFOs and devices, are listed as skipped with the reason. Paths in the set are relative to
//! the folder holding each argument: `store --set S run42/` gives `run42/...`.
//!
//! What is sent again: a file is unchanged, and not sent, when its size and modification
//! time match the set's record, its content digest (BLAKE3, kept only in the client's
//! `state_dir`, never at the sites) matches the one recorded when it was stored, and its
//! backup still has at least k complete shares. Without a recorded digest (a new client) size
//! and time decide, and the report says so.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use share_transfer::wire::{valid_set_name, valid_set_path, SetFile, SetManifest};
use uuid::Uuid;

use super::{io_err, BackupClient, StoreOptions, TransferError};

/// A file of the set dealt with: stored now, or found unchanged.
struct Done<'a> {
    file: &'a Found,
    backup_id: Uuid,
    outcome: Outcome,
    digest: String,
}

impl Done<'_> {
    /// Counts it in the set's progress and records it in the client's state, the set's
    /// manifest and the report.
    fn record(
        self,
        sp: &super::SetProgress,
        local: &mut LocalSet,
        manifest: &mut SetManifest,
        reports: &mut Vec<SetFileReport>,
    ) {
        let f = self.file;
        sp.files_done.fetch_add(1, Relaxed);
        sp.bytes_done.fetch_add(f.size, Relaxed);
        local.files.insert(
            f.path.clone(),
            (f.size, f.mtime_ns, self.digest, self.backup_id),
        );
        manifest.files.push(SetFile {
            path: f.path.clone(),
            size: f.size,
            mtime_ns: f.mtime_ns,
            backup_id: self.backup_id,
        });
        reports.push(SetFileReport {
            path: f.path.clone(),
            bytes: f.size,
            backup_id: self.backup_id,
            outcome: self.outcome,
        });
    }
}

/// The progress of the files stored at once, summed into the client's progress (what the
/// progress line shows) several times a second.
struct LiveProgress {
    main: std::sync::Arc<super::Progress>,
    files: std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<super::Progress>>>>,
    ticker: tokio::task::JoinHandle<()>,
}

impl LiveProgress {
    fn start(main: std::sync::Arc<super::Progress>) -> Self {
        let files: std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<super::Progress>>>> =
            Default::default();
        let (m, f) = (main.clone(), files.clone());
        let ticker = tokio::spawn(async move {
            loop {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                let (mut done, mut total) = (0, 0);
                for p in f.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                    done += p.done.load(Relaxed);
                    total += p.total.load(Relaxed);
                }
                m.done.store(done, Relaxed);
                m.total.store(total, Relaxed);
            }
        });
        LiveProgress {
            main,
            files,
            ticker,
        }
    }

    /// A progress for one more file in flight (sharing the key-wait notice).
    fn add(&self) -> std::sync::Arc<super::Progress> {
        let p = std::sync::Arc::new(super::Progress {
            notice: self.main.notice.clone(),
            ..Default::default()
        });
        self.lock().push(p.clone());
        p
    }

    fn remove(&self, p: &std::sync::Arc<super::Progress>) {
        self.lock().retain(|x| !std::sync::Arc::ptr_eq(x, p));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<std::sync::Arc<super::Progress>>> {
        self.files.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn stop(self) {
        self.ticker.abort();
        self.main.done.store(0, Relaxed);
        self.main.total.store(0, Relaxed);
    }
}

/// A regular file found for a set.
#[derive(Debug, Clone)]
pub struct Found {
    /// Path within the set.
    pub path: String,
    pub full: PathBuf,
    pub size: u64,
    pub mtime_ns: u128,
}

/// A path not stored, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    pub path: String,
    pub why: String,
}

/// The files of the arguments, sorted by path, and what was skipped.
pub fn collect(args: &[PathBuf]) -> Result<(Vec<Found>, Vec<Skipped>), TransferError> {
    let mut found = Vec::new();
    let mut skipped = Vec::new();
    for arg in args {
        let name = arg
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .ok_or_else(|| TransferError::Usage(format!("{}: no file name", arg.display())))?;
        walk(arg, &name, &mut found, &mut skipped)?;
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    for w in found.windows(2) {
        if w[0].path == w[1].path {
            return Err(TransferError::Usage(format!(
                "{} and {} would both be {:?} in the set; give them from different folders",
                w[0].full.display(),
                w[1].full.display(),
                w[0].path
            )));
        }
    }
    Ok((found, skipped))
}

fn walk(
    full: &Path,
    path: &str,
    found: &mut Vec<Found>,
    skipped: &mut Vec<Skipped>,
) -> Result<(), TransferError> {
    let md = std::fs::symlink_metadata(full).map_err(io_err(full))?;
    let ft = md.file_type();
    if !valid_set_path(path) {
        skipped.push(Skipped {
            path: path.to_owned(),
            why: "name cannot be restored safely".into(),
        });
    } else if ft.is_symlink() {
        skipped.push(Skipped {
            path: path.to_owned(),
            why: "symbolic link (not followed)".into(),
        });
    } else if ft.is_dir() {
        let mut entries: Vec<_> = std::fs::read_dir(full)
            .map_err(io_err(full))?
            .collect::<Result<_, _>>()
            .map_err(io_err(full))?;
        entries.sort_by_key(std::fs::DirEntry::file_name);
        for e in entries {
            let child = format!("{path}/{}", e.file_name().to_string_lossy());
            walk(&e.path(), &child, found, skipped)?;
        }
    } else if ft.is_file() {
        let mtime_ns = md
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        found.push(Found {
            path: path.to_owned(),
            full: full.to_owned(),
            size: md.len(),
            mtime_ns,
        });
    } else {
        skipped.push(Skipped {
            path: path.to_owned(),
            why: "not a regular file (socket, FIFO or device)".into(),
        });
    }
    Ok(())
}

/// What the client remembers of a set: each file's digest when it was stored.
#[derive(Debug, Default, Serialize, Deserialize)]
struct LocalSet {
    /// path → (size, mtime_ns, BLAKE3 hex, backup)
    files: BTreeMap<String, (u64, u128, String, Uuid)>,
}

impl LocalSet {
    fn path(state_dir: &Path, name: &str) -> PathBuf {
        state_dir.join("sets").join(format!("{name}.json"))
    }

    fn load(state_dir: &Path, name: &str) -> Self {
        std::fs::read(Self::path(state_dir, name))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Replaces the file atomically.
    fn save(&self, state_dir: &Path, name: &str) -> Result<(), TransferError> {
        let p = Self::path(state_dir, name);
        let dir = p.parent().unwrap_or(state_dir);
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let tmp = p.with_extension("tmp");
        let text = serde_json::to_vec(self).map_err(|e| TransferError::Failed(e.to_string()))?;
        std::fs::write(&tmp, text).map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, &p).map_err(io_err(&p))
    }
}

/// BLAKE3 of a file, hex.
fn digest(path: &Path) -> Result<String, TransferError> {
    let mut h = blake3::Hasher::new();
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    h.update_reader(file).map_err(io_err(path))?;
    Ok(h.finalize().to_hex().to_string())
}

/// What happened to one file of a set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Sent (new, changed, or its earlier backup was not complete).
    Stored,
    /// Same size, time and digest as its complete backup: not sent.
    Unchanged,
    /// Same size and time as its complete backup; no digest recorded here to compare.
    UnchangedBySizeAndTime,
    /// In the set from an earlier run, not given this time: kept.
    Kept,
}

/// One file of a set's report.
#[derive(Debug, Clone, Serialize)]
pub struct SetFileReport {
    pub path: String,
    pub bytes: u64,
    pub backup_id: Uuid,
    pub outcome: Outcome,
}

/// Result of storing a set.
#[derive(Debug, Clone, Serialize)]
pub struct SetReport {
    pub set: String,
    pub files: Vec<SetFileReport>,
    pub skipped: Vec<Skipped>,
    /// Bytes of the files sent this time.
    pub bytes_sent: u64,
    pub seconds: f64,
    /// Sites that hold the final manifest.
    pub manifest_sites: Vec<String>,
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl BackupClient {
    /// Every set readable at the reachable sites (the newest copy of each owner's set), and
    /// the sites that could not be asked.
    pub async fn sets(&self) -> (Vec<SetManifest>, Vec<(String, String)>) {
        let mut by_key: HashMap<(String, String), SetManifest> = HashMap::new();
        let mut errors = Vec::new();
        let replies = self
            .ask_sites::<Vec<SetManifest>>(reqwest::Method::GET, "/v1/sets", None)
            .await;
        for (site, reply) in replies {
            match reply {
                Ok(all) => {
                    for m in all {
                        let key = (m.owner.clone(), m.name.clone());
                        match by_key.get(&key) {
                            Some(have) if have.updated >= m.updated => {}
                            _ => {
                                by_key.insert(key, m);
                            }
                        }
                    }
                }
                Err(e) => errors.push((site.name.clone(), e.to_string())),
            }
        }
        let mut v: Vec<SetManifest> = by_key.into_values().collect();
        v.sort_by(|a, b| (&a.name, &a.owner).cmp(&(&b.name, &b.owner)));
        (v, errors)
    }

    /// The set `name`: this client's own if it has one, else the only readable one of that
    /// name.
    pub async fn find_set(&self, name: &str) -> Result<Option<SetManifest>, TransferError> {
        let (all, _) = self.sets().await;
        let named: Vec<SetManifest> = all.into_iter().filter(|m| m.name == name).collect();
        if let Some(mine) = named.iter().find(|m| m.owner == self.cfg.sae_id) {
            return Ok(Some(mine.clone()));
        }
        match named.len() {
            0 => Ok(None),
            1 => Ok(named.into_iter().next()),
            _ => Err(TransferError::Usage(format!(
                "several clients have a set {name:?} ({}); only your own can be chosen by name",
                named
                    .iter()
                    .map(|m| m.owner.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        }
    }

    /// Writes the set's manifest at every site; the sites that took it (at least one).
    async fn put_set(&self, m: &SetManifest) -> Result<Vec<String>, TransferError> {
        let body = serde_json::to_vec(m).map_err(|e| TransferError::Failed(e.to_string()))?;
        let mut ok = Vec::new();
        let mut errors = Vec::new();
        let path = format!("/v1/sets/{}", m.name);
        let replies = self
            .ask_sites::<SetManifest>(reqwest::Method::PUT, &path, Some(body))
            .await;
        for (site, reply) in replies {
            match reply {
                Ok(_) => ok.push(site.name.clone()),
                Err(e) => errors.push(e.to_string()),
            }
        }
        if ok.is_empty() {
            return Err(TransferError::Failed(format!(
                "no site took the manifest of set {}: {}",
                m.name,
                errors.join("; ")
            )));
        }
        Ok(ok)
    }

    /// Backups with at least k complete shares at the reachable sites.
    async fn complete_backups(&self) -> HashSet<Uuid> {
        let (entries, _) = self.list().await;
        entries
            .into_iter()
            .filter(|e| {
                let complete = e.shares.iter().filter(|(_, _, c)| *c).count();
                complete >= usize::from(e.scheme.k)
            })
            .map(|e| e.backup_id)
            .collect()
    }

    /// Stores the files under `args` as set `name`: new and changed files are sent (each
    /// resumes if an earlier run was interrupted in it), unchanged ones are not; the
    /// manifest at the sites is rewritten after each file. `each` hears of every file
    /// before it is handled: (position, count, path, whether it is sent).
    pub async fn store_set(
        &self,
        name: &str,
        args: &[PathBuf],
        opts: &StoreOptions,
        mut each: impl FnMut(usize, usize, &str, bool),
    ) -> Result<SetReport, TransferError> {
        let started = std::time::Instant::now();
        if !valid_set_name(name) {
            return Err(TransferError::Usage(format!(
                "set name {name:?}: use 1 to 128 of A-Z a-z 0-9 . _ - (not starting with .)"
            )));
        }
        let (found, skipped) = collect(args)?;
        if found.is_empty() {
            return Err(TransferError::Usage(format!(
                "no regular file to store in {}",
                args.iter()
                    .map(|a| a.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let (previous, complete) =
            futures_util::join!(self.find_set(name), self.complete_backups());
        let before: HashMap<String, SetFile> = previous?
            .filter(|m| m.owner == self.cfg.sae_id)
            .map(|m| m.files.into_iter().map(|f| (f.path.clone(), f)).collect())
            .unwrap_or_default();
        let mut local = LocalSet::load(&self.cfg.state_dir, name);
        let mut manifest = SetManifest {
            name: name.to_owned(),
            owner: String::new(),
            readers: self.cfg.backup.readers.clone(),
            updated: now(),
            files: Vec::new(),
        };
        let given: HashSet<&str> = found.iter().map(|f| f.path.as_str()).collect();
        // Files of earlier runs not given now stay in the set: nothing is dropped silently.
        let mut reports: Vec<SetFileReport> = Vec::new();
        for f in before.values().filter(|f| !given.contains(f.path.as_str())) {
            manifest.files.push(f.clone());
            reports.push(SetFileReport {
                path: f.path.clone(),
                bytes: f.size,
                backup_id: f.backup_id,
                outcome: Outcome::Kept,
            });
        }
        let mut bytes_sent = 0;
        let mut sites = Vec::new();
        let sp = &self.progress.set;
        sp.files.store(found.len() as u64, Relaxed);
        sp.bytes.store(found.iter().map(|f| f.size).sum(), Relaxed);
        for c in [&sp.files_done, &sp.bytes_done, &sp.bytes_sent] {
            c.store(0, Relaxed);
        }
        // Unchanged files are recorded at once; the others are stored up to
        // `backup.set_files_in_flight` at a time, so that one file's set-up and
        // finalisation overlap another's transfer.
        let mut to_send: Vec<(usize, &Found)> = Vec::new();
        for (pos, f) in found.iter().enumerate() {
            let same = before.get(&f.path).filter(|p| {
                p.size == f.size && p.mtime_ns == f.mtime_ns && complete.contains(&p.backup_id)
            });
            // Read here only to confirm a file that looks unchanged; a file sent gets the
            // digest its store computed while reading it.
            let looked = match same {
                Some(_) => Some(digest(&f.full)?),
                None => None,
            };
            let outcome = match (same, local.files.get(&f.path), &looked) {
                (Some(p), Some((_, _, d, id)), Some(now)) if d == now && *id == p.backup_id => {
                    Some(Outcome::Unchanged)
                }
                (Some(_), None, _) => Some(Outcome::UnchangedBySizeAndTime),
                _ => None,
            };
            let (Some(outcome), Some(p), Some(dig)) = (outcome, same, looked) else {
                to_send.push((pos, f));
                continue;
            };
            each(pos + 1, found.len(), &f.path, false);
            let done = Done {
                file: f,
                backup_id: p.backup_id,
                outcome,
                digest: dig,
            };
            done.record(sp, &mut local, &mut manifest, &mut reports);
        }
        local.save(&self.cfg.state_dir, name)?;
        if to_send.is_empty() {
            manifest.files.sort_by(|a, b| a.path.cmp(&b.path));
            manifest.updated = now();
            sites = self.put_set(&manifest).await?;
        }
        let in_flight = self.cfg.backup.set_files_in_flight.max(1);
        let live = LiveProgress::start(self.progress.clone());
        let mut stores = futures_util::stream::iter(to_send.into_iter().map(|(pos, f)| {
            each(pos + 1, found.len(), &f.path, true);
            let sub = self.with_progress(live.add());
            async move { (f, sub.store(&f.full, opts).await, sub.progress) }
        }))
        .buffer_unordered(in_flight);
        while let Some((f, r, sub_progress)) = stores.next().await {
            live.remove(&sub_progress);
            let r = r?;
            bytes_sent += r.bytes;
            sp.bytes_sent.fetch_add(r.bytes, Relaxed);
            let done = Done {
                file: f,
                backup_id: r.backup_id,
                outcome: Outcome::Stored,
                digest: blake3::Hash::from_bytes(r.digest).to_hex().to_string(),
            };
            done.record(sp, &mut local, &mut manifest, &mut reports);
            local.save(&self.cfg.state_dir, name)?;
            manifest.files.sort_by(|a, b| a.path.cmp(&b.path));
            manifest.updated = now();
            sites = self.put_set(&manifest).await?;
        }
        drop(stores);
        live.stop();
        reports.sort_by(|a, b| a.path.cmp(&b.path));
        Ok(SetReport {
            set: name.to_owned(),
            files: reports,
            skipped,
            bytes_sent,
            seconds: started.elapsed().as_secs_f64(),
            manifest_sites: sites,
        })
    }

    /// The backup of `file` in set `name`.
    pub async fn set_member(&self, name: &str, file: &str) -> Result<Uuid, TransferError> {
        let m = self.require_set(name).await?;
        m.files
            .iter()
            .find(|f| f.path == file)
            .map(|f| f.backup_id)
            .ok_or_else(|| {
                TransferError::Usage(format!(
                    "set {name} has no file {file:?} (see `backup-client list`)"
                ))
            })
    }

    /// Set `name`, or a usage error that says none is found.
    pub async fn require_set(&self, name: &str) -> Result<SetManifest, TransferError> {
        self.find_set(name).await?.ok_or_else(|| {
            TransferError::Usage(format!(
                "no set {name:?} at the reachable sites (see `backup-client list`)"
            ))
        })
    }

    /// Restores every file of set `name` under `dir` (created), each at its path within
    /// the set; returns (path, restored bytes) per file.
    pub async fn restore_set(
        &self,
        name: &str,
        dir: &Path,
        mut each: impl FnMut(usize, usize, &str),
    ) -> Result<Vec<(String, u64)>, TransferError> {
        let m = self.require_set(name).await?;
        let mut out = Vec::new();
        for (pos, f) in m.files.iter().enumerate() {
            // Checked here too: the manifest comes from the sites.
            if !valid_set_path(&f.path) {
                return Err(TransferError::Failed(format!(
                    "set {name}: path {:?} would leave {}",
                    f.path,
                    dir.display()
                )));
            }
            each(pos + 1, m.files.len(), &f.path);
            let target = dir.join(&f.path);
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(io_err(parent))?;
            }
            let r = self.restore(f.backup_id, &target).await?;
            out.push((f.path.clone(), r.bytes));
        }
        Ok(out)
    }
}
