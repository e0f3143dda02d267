//! What the sites hold: `list` (every backup found, by ID) and `verify` (every share of one
//! backup checked at its site, without reconstructing).

use std::collections::HashMap;

use uuid::Uuid;

use super::{BackupClient, BackupEntry, SiteCheck};
use share_transfer::wire::{Manifest, ShareCheck};

impl BackupClient {
    /// Every backup found at the reachable sites, and the sites that could not be asked.
    pub async fn list(&self) -> (Vec<BackupEntry>, Vec<(String, String)>) {
        let mut by_id: HashMap<Uuid, BackupEntry> = HashMap::new();
        let mut errors = Vec::new();
        let replies = self
            .ask_sites::<Vec<Manifest>>(reqwest::Method::GET, "/v1/backups", None)
            .await;
        for (site, reply) in replies {
            match reply {
                Ok(ms) => {
                    for m in ms {
                        let e = by_id.entry(m.backup_id).or_insert_with(|| BackupEntry {
                            backup_id: m.backup_id,
                            name: m.open.name.clone(),
                            bytes: m.open.original_len,
                            created: m.open.created,
                            scheme: m.open.scheme,
                            shares: Vec::new(),
                            placement: m.open.placement.clone(),
                            placement_version: m.open.placement_version,
                        });
                        if m.open.placement_version > e.placement_version {
                            // A share moved: the newest placement is the backup's.
                            e.placement = m.open.placement.clone();
                            e.placement_version = m.open.placement_version;
                        }
                        e.shares
                            .push((m.share_index, site.name.clone(), m.complete));
                    }
                }
                Err(e) => errors.push((site.name.clone(), e.to_string())),
            }
        }
        let mut v: Vec<BackupEntry> = by_id.into_values().collect();
        for e in &mut v {
            e.shares.sort();
        }
        v.sort_by_key(|e| (e.created, e.backup_id));
        (v, errors)
    }

    /// Checks every share of backup `id` at every site (all sites at once), without
    /// reconstructing: each agent re-reads its chunks against their digests. Shares the
    /// backup places at a site that does not hold them are reported as lost there.
    pub async fn verify(&self, id: Uuid) -> Vec<SiteCheck> {
        let (mut checks, found) = futures_util::join!(self.check_sites(id), self.find_shares(id));
        let placement = found
            .candidates
            .iter()
            .max_by_key(|(_, m)| m.open.placement_version)
            .map(|(_, m)| m.open.placement.clone())
            .unwrap_or_default();
        self.mark_lost(&mut checks, &placement);
        checks
    }

    /// Every site's check of its shares of backup `id`.
    pub(super) async fn check_sites(&self, id: Uuid) -> Vec<SiteCheck> {
        let path = format!("/v1/backups/{id}/verify");
        let replies = self
            .ask_sites::<Vec<ShareCheck>>(reqwest::Method::POST, &path, None)
            .await;
        replies
            .into_iter()
            .map(|(site, reply)| {
                let (shares, error) = match reply {
                    Ok(shares) => (shares, None),
                    Err(e) => (Vec::new(), Some(e.to_string())),
                };
                SiteCheck {
                    site: site.name.clone(),
                    shares,
                    lost: Vec::new(),
                    error,
                }
            })
            .collect()
    }

    /// Notes, at every site that answered, the shares `placement` puts there that it does
    /// not hold.
    pub(super) fn mark_lost(&self, checks: &mut [SiteCheck], placement: &[String]) {
        for c in checks.iter_mut().filter(|c| c.error.is_none()) {
            let Some(site) = self.cfg.sites.iter().find(|s| s.name == c.site) else {
                continue;
            };
            for (i, agent) in placement.iter().enumerate() {
                let i = i as u8;
                if *agent == site.agent_sae_id && !c.shares.iter().any(|s| s.share_index == i) {
                    c.lost.push(i);
                }
            }
        }
    }
}
