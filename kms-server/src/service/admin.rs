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

    /// This KME now, for the operator's dashboard.
    pub fn sample(&self) -> dashboard_web::KmeSample {
        let mut sample = dashboard_web::KmeSample {
            kme_id: self.kme_id().to_owned(),
            t_ms: dashboard_web::now_ms(),
            requests_total: self.metrics.requests_by_code(),
            ..Default::default()
        };
        let Ok(st) = self.lock() else { return sample };
        sample.keys_awaiting_slaves = st.records.len() as u64;
        for p in &self.settings.peers {
            let Some(l) = st.links.get(&p.kme_id) else {
                continue;
            };
            let modelled = p.link.length_km.is_some() || l.perf.is_some();
            sample.links.push(dashboard_web::LinkSample {
                peer: p.kme_id.clone(),
                producer: self.kme_id() < p.kme_id.as_str(),
                qber: l.perf.map(|x| x.qber),
                secure_key_rate_bps: l.perf.map(|x| x.secure_key_rate_bps),
                abort_qber: modelled.then_some(p.link.abort_qber),
                alarm: l.perf.is_some_and(|x| x.aborted),
                eavesdropper: l.eavesdropper,
                own_bytes: l.own.unconsumed(),
                theirs_bytes: l.theirs.unconsumed(),
                capacity_bytes: self.capacity_bytes(),
                consumed_bytes_total: self.metrics.consumed_total(&p.kme_id),
            });
        }
        sample
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
            "# HELP qkd_local_pool_bytes Key held for exchanges between SAEs of this KME.\n# TYPE qkd_local_pool_bytes gauge\nqkd_local_pool_bytes {}",
            st.local.unconsumed()
        );
        let _ = writeln!(
            out,
            "# HELP qkd_keys_awaiting_slaves Keys handed to masters that their slaves have not fetched yet.\n# TYPE qkd_keys_awaiting_slaves gauge\nqkd_keys_awaiting_slaves {}",
            st.records.len()
        );
        let _ = writeln!(
            out,
            "# HELP qkd_pool_capacity_bytes Capacity of each link direction's pool.\n# TYPE qkd_pool_capacity_bytes gauge\nqkd_pool_capacity_bytes {}",
            self.capacity_bytes()
        );
        out.push_str(
            "# HELP qkd_link_qber_ratio Quantum bit error rate of the link (physical model).\n# TYPE qkd_link_qber_ratio gauge\n\
             # HELP qkd_link_qber_abort_threshold_ratio QBER above which the link aborts.\n# TYPE qkd_link_qber_abort_threshold_ratio gauge\n\
             # HELP qkd_link_secure_key_rate_bytes_per_second Modelled secure key rate.\n# TYPE qkd_link_secure_key_rate_bytes_per_second gauge\n\
             # HELP qkd_link_alarm 1 while the link is aborted (QBER over the threshold).\n# TYPE qkd_link_alarm gauge\n\
             # HELP qkd_link_eavesdropper_ratio Fraction of pulses the modelled eavesdropper takes.\n# TYPE qkd_link_eavesdropper_ratio gauge\n",
        );
        for p in &self.settings.peers {
            let Some(l) = st.links.get(&p.kme_id) else {
                continue;
            };
            let peer = &p.kme_id;
            // Only the producing end models the link (the far end repeats what it announces):
            // one series, and one alert, per link.
            if self.kme_id() > peer.as_str() {
                continue;
            }
            if let Some(x) = l.perf {
                let _ = writeln!(
                    out,
                    "qkd_link_qber_ratio{{peer=\"{peer}\"}} {}\n\
                     qkd_link_qber_abort_threshold_ratio{{peer=\"{peer}\"}} {}\n\
                     qkd_link_secure_key_rate_bytes_per_second{{peer=\"{peer}\"}} {}\n\
                     qkd_link_alarm{{peer=\"{peer}\"}} {}",
                    x.qber,
                    p.link.abort_qber,
                    x.secure_key_rate_bps / 8.0,
                    u8::from(x.aborted)
                );
            }
            let _ = writeln!(
                out,
                "qkd_link_eavesdropper_ratio{{peer=\"{peer}\"}} {}",
                l.eavesdropper
            );
        }
        out
    }
}
