//! Key stored in advance, the seed's condition: sizing a devnet's pools to a backup job and
//! waiting until every link direction holds that much key.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::DevnetInfo;

/// Bytes of key one link direction must hold for a (2,3) XOR store of `size` bytes and its
/// restore: the one-time pad of one share (an XOR share is as big as the file), a 256-bit
/// MAC key per chunk and per batch, with 2% and 16 MiB to spare.
pub fn job_key_bytes(size: u64) -> u64 {
    size + size / 50 + (16 << 20)
}

/// How the pools filled.
#[derive(Debug, Clone, Copy)]
pub struct Fill {
    /// Link directions waited for.
    pub directions: usize,
    /// Key held per direction at the end, bytes.
    pub per_direction: u64,
    /// Key added while waiting, all directions, bytes.
    pub added: u64,
    /// Time waited.
    pub secs: f64,
}

impl Fill {
    /// Key added per second while waiting, all directions.
    pub fn bytes_per_sec(&self) -> f64 {
        self.added as f64 / self.secs.max(1e-9)
    }
}

/// `(master SAE, slave SAE)` of every direction of every link: the first SAE of each site.
fn directions(info: &DevnetInfo) -> Result<Vec<(String, String)>> {
    let first_sae = |kme: &str| -> Result<String> {
        let site = info
            .sites
            .iter()
            .find(|s| s.kme_id == kme)
            .with_context(|| format!("link names unknown KME {kme}"))?;
        Ok(site.saes.first().context("a site without SAEs")?.id.clone())
    };
    let mut out = Vec::new();
    for [a, b] in &info.links {
        let (x, y) = (first_sae(a)?, first_sae(b)?);
        out.push((x.clone(), y.clone()));
        out.push((y, x));
    }
    Ok(out)
}

/// Key held by each direction, bytes, and each pool's capacity, bytes.
async fn levels(clients: &[(etsi_spec::Client, String)]) -> Result<Vec<(u64, u64)>> {
    let mut out = Vec::with_capacity(clients.len());
    for (c, slave) in clients {
        let st = c.status(slave).await?;
        let kb = st.key_size / 8;
        out.push((st.stored_key_count * kb, st.max_key_count * kb));
    }
    Ok(out)
}

/// Waits until every link direction holds at least 99% of its pool's capacity (the link
/// refills in blocks, so the last block may not fit exactly), at most `timeout`.
pub async fn wait_full(info: &DevnetInfo, timeout: Duration) -> Result<Fill> {
    let mut clients = Vec::new();
    for (m, s) in directions(info)? {
        clients.push((info.client(&m)?, s));
    }
    let start = Instant::now();
    let first: u64 = levels(&clients).await?.iter().map(|l| l.0).sum();
    loop {
        let now = levels(&clients).await?;
        if now.iter().all(|(held, cap)| *held >= cap / 100 * 99) {
            let held: u64 = now.iter().map(|l| l.0).sum();
            return Ok(Fill {
                directions: now.len(),
                per_direction: now.iter().map(|l| l.0).min().unwrap_or(0),
                added: held.saturating_sub(first),
                secs: start.elapsed().as_secs_f64(),
            });
        }
        if start.elapsed() > timeout {
            let text: Vec<String> = now
                .iter()
                .map(|(h, c)| format!("{} of {} MiB", h >> 20, c >> 20))
                .collect();
            bail!(
                "the key pools did not fill within {timeout:?}: {}",
                text.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
