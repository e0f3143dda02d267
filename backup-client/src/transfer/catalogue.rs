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
        for site in &self.cfg.sites {
            match self
                .agent_call::<Vec<Manifest>>(site, reqwest::Method::GET, "/v1/backups", None)
                .await
            {
                Ok(ms) => {
                    for m in ms {
                        let e = by_id.entry(m.backup_id).or_insert_with(|| BackupEntry {
                            backup_id: m.backup_id,
                            name: m.open.name.clone(),
                            bytes: m.open.original_len,
                            created: m.open.created,
                            scheme: m.open.scheme,
                            shares: Vec::new(),
                        });
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
    /// reconstructing: each agent re-reads its chunks against their digests.
    pub async fn verify(&self, id: Uuid) -> Vec<SiteCheck> {
        let path = format!("/v1/backups/{id}/verify");
        let checks = self.cfg.sites.iter().map(|site| {
            let path = path.clone();
            async move {
                let r = self
                    .agent_call::<Vec<ShareCheck>>(site, reqwest::Method::POST, &path, None)
                    .await;
                match r {
                    Ok(shares) => SiteCheck {
                        site: site.name.clone(),
                        shares,
                        lost: Vec::new(),
                        error: None,
                    },
                    Err(e) => SiteCheck {
                        site: site.name.clone(),
                        shares: Vec::new(),
                        lost: Vec::new(),
                        error: Some(e.to_string()),
                    },
                }
            }
        });
        let mut out = futures_util::future::join_all(checks).await;
        // Where the shares should be, as the manifests found say.
        let found = self.find_shares(id).await;
        let placement = found
            .candidates
            .iter()
            .map(|(_, m)| m.open.placement.clone())
            .next()
            .unwrap_or_default();
        for c in out.iter_mut().filter(|c| c.error.is_none()) {
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
        out
    }
}
