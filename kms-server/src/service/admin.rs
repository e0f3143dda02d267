//! Operating the KME: the eavesdropper switch (operators only), housekeeping (expiry of
//! unfetched keys, dropping consumed segments), and the pool and link gauges for metrics.

use super::{Kme, KmeError};
use crate::pool::store::Batch;

/// Most keys one housekeeping step expires under the state lock.
pub const EXPIRY_STEP: usize = 4096;

impl Kme {
    /// An operator puts an intercept-resend attacker on the link to `peer` (fraction of
    /// pulses, 0 = none). Only the link's producing end models the link.
    pub fn set_eavesdropper(
        &self,
        peer: &str,
        fraction: f64,
    ) -> Result<Option<qkd_sim::physics::LinkPerformance>, KmeError> {
        if !(0.0..=1.0).contains(&fraction) {
            return Err(KmeError::bad_request("fraction must be within 0..=1"));
        }
        let Some(cfg) = self.settings.peers.iter().find(|p| p.kme_id == peer) else {
            return Err(KmeError::bad_request(format!("no QKD link to KME {peer}")));
        };
        if self.kme_id() > peer {
            return Err(KmeError::bad_request(format!(
                "the link is modelled at its producing end: switch the eavesdropper at KME {peer}"
            )));
        }
        let mut st = self.lock()?;
        let link = st
            .links
            .get_mut(peer)
            .ok_or_else(|| KmeError::unavailable("link state missing"))?;
        link.eavesdropper = fraction;
        if let Some(src) = self.sources.get(peer) {
            src.set_eavesdropper(fraction);
        }
        let perf = cfg
            .link
            .length_km
            .map(|l| cfg.link.device.evaluate(l, fraction, cfg.link.abort_qber));
        link.perf = perf.or(link.perf);
        tracing::warn!(
            peer,
            fraction,
            "operator set the eavesdropper on the QKD link"
        );
        Ok(perf)
    }

    /// Erases keys no slave fetched within `limits.key_ttl_secs`, and lets the store drop
    /// segment files that hold nothing live any more. Returns how many keys were erased.
    /// Incremental: each step holds the state lock for at most [`EXPIRY_STEP`] keys.
    pub async fn housekeeping(&self) -> Result<usize, KmeError> {
        let mut total = 0;
        loop {
            let (n, more) = self.housekeeping_step().await?;
            total += n;
            if !more {
                return Ok(total);
            }
            tokio::task::yield_now().await;
        }
    }

    async fn housekeeping_step(&self) -> Result<(usize, bool), KmeError> {
        let (n, more, durable) = {
            let mut st = self.lock()?;
            let (changes, more) = st
                .records
                .expire(self.settings.limits.key_ttl_secs, EXPIRY_STEP);
            let n = changes.erased.len();
            let mut batch = Batch::default();
            changes.into_batch(&mut batch);
            let rec_low = st.records.low_water();
            for (id, s) in st.streams() {
                let l = s
                    .low_water()
                    .min(rec_low.get(&id).copied().unwrap_or(u64::MAX));
                batch.low_water.push((id.name(), l));
            }
            (n, more, self.persist(batch))
        };
        durable.await?;
        Ok((n, more))
    }

    /// The live pool and link gauges, in the Prometheus text format.
    pub fn gauges(&self) -> String {
        use std::fmt::Write;
        let mut out = String::from(
            "# HELP qkd_pool_bytes Key held per link direction (own: for masters here).\n# TYPE qkd_pool_bytes gauge\n",
        );
        let Ok(st) = self.lock() else { return out };
        for (peer, l) in &st.links {
            let _ = writeln!(
                out,
                "qkd_pool_bytes{{peer=\"{peer}\",direction=\"own\"}} {}",
                l.own.unconsumed()
            );
            let _ = writeln!(
                out,
                "qkd_pool_bytes{{peer=\"{peer}\",direction=\"theirs\"}} {}",
                l.theirs.unconsumed()
            );
        }
        let _ = writeln!(
            out,
            "# TYPE qkd_local_pool_bytes gauge\nqkd_local_pool_bytes {}",
            st.local.unconsumed()
        );
        let _ = writeln!(
            out,
            "# TYPE qkd_keys_awaiting_slaves gauge\nqkd_keys_awaiting_slaves {}",
            st.records.len()
        );
        out.push_str("# TYPE qkd_link_qber gauge\n# TYPE qkd_link_secure_key_rate_bps gauge\n# TYPE qkd_link_alarm gauge\n");
        for (peer, l) in &st.links {
            if let Some(p) = l.perf {
                let _ = writeln!(out, "qkd_link_qber{{peer=\"{peer}\"}} {}", p.qber);
                let _ = writeln!(
                    out,
                    "qkd_link_secure_key_rate_bps{{peer=\"{peer}\"}} {}",
                    p.secure_key_rate_bps
                );
                let _ = writeln!(
                    out,
                    "qkd_link_alarm{{peer=\"{peer}\"}} {}",
                    u8::from(p.aborted)
                );
            }
        }
        out
    }
}
