//! Key stored in advance, the seed's condition: sizing a devnet's pools to a backup job and
//! waiting until every link direction holds that much key.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{DevnetInfo, Options};

/// Bytes of a key of the default size (256 bit), the unit of `max_key_count`.
pub const KEY_BYTES: u64 = 32;

/// Bytes of key one link direction must hold for a (2,3) XOR store of `size` bytes and its
/// restore: the one-time pad of one share (an XOR share is as big as the file), a 256-bit
/// MAC key per chunk and per batch, with 2% and 16 MiB to spare.
pub fn job_key_bytes(size: u64) -> u64 {
    size + size / 50 + (16 << 20)
}

/// A network like `base` whose pools hold the key of a job on a `size`-byte file: the
/// links' prefill fills them at once, then the links run at a QKD link's rate (`base`'s, or
/// the default 10 km model's if `base` is bulk) rather than in bulk, so that the job
/// consumes stored key.
pub fn stored_key_options(base: &Options, size: u64) -> Options {
    const BLOCK: u64 = 1 << 20;
    // A whole number of blocks, so that the link fills the pools to the last byte.
    let pool = job_key_bytes(size).div_ceil(BLOCK) * BLOCK;
    Options {
        max_key_count: base.max_key_count.max(pool / KEY_BYTES),
        block_bytes: BLOCK as usize,
        rate_bytes_per_sec: match base.rate_bytes_per_sec {
            0 => Options::default().rate_bytes_per_sec,
            r => r,
        },
        ..base.clone()
    }
}

/// How many pools of `max_key_count` keys the network's KMEs hold together: both ends
/// hold both directions of each link, and each KME its local pool (filled at once too).
pub fn pools_held(opts: &Options) -> u64 {
    let links = opts
        .links
        .as_ref()
        .map_or(opts.sites.saturating_sub(1), Vec::len) as u64;
    4 * links + opts.sites as u64
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

/// Waits until every link direction is full, at most `timeout`. A link tops a pool up in
/// blocks of `block_bytes` and only when a whole block fits, so a pool counts as full once
/// less than a block is missing.
pub async fn wait_full(info: &DevnetInfo, block_bytes: usize, timeout: Duration) -> Result<Fill> {
    let mut clients = Vec::new();
    for (m, s) in directions(info)? {
        clients.push((info.client(&m)?, s));
    }
    let start = Instant::now();
    let first: u64 = levels(&clients).await?.iter().map(|l| l.0).sum();
    loop {
        let now = levels(&clients).await?;
        if now
            .iter()
            .all(|(held, cap)| cap.saturating_sub(*held) < block_bytes as u64)
        {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The stored-key pools hold the whole job and are a whole number of link blocks (a
    /// link only tops a pool up by whole blocks: a pool that is not would never be full).
    #[test]
    fn stored_key_pools_hold_the_job_in_whole_blocks() {
        for size in [0, 1, 32 << 20, 1 << 30, (1 << 30) + 12_345] {
            let o = stored_key_options(&Options::default(), size);
            let pool = o.max_key_count * KEY_BYTES;
            assert!(pool >= job_key_bytes(size), "{size}");
            assert_eq!(pool % o.block_bytes as u64, 0, "{size}");
            assert_ne!(
                o.rate_bytes_per_sec, 0,
                "the links are not bulk during the job"
            );
        }
    }
}
