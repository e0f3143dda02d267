//! Physical model of a decoy-state BB84 link: secure key rate and QBER from fibre length and
//! device parameters.
//!
//! Formulas: asymptotic decoy-state BB84 with the GLLP key-rate bound (Gottesman, Lo,
//! Lütkenhaus, Preskill, QIC 4, 325 (2004)) and the infinite-decoy estimates of Lo, Ma and
//! Chen, PRL 94, 230504 (2005):
//!
//! ```text
//! η       = 10^(−α·L/10) · η_Bob · η_D                     overall transmittance
//! Q_μ     = Y0 + 1 − e^(−η μ)                              gain of signal states
//! E_μ Q_μ = e0 Y0 + e_d (1 − e^(−η μ)),  e0 = 1/2          error of signal states (QBER = E_μ)
//! Y1 ≈ Y0 + η,  e1 = (e0 Y0 + e_d η) / Y1                  single-photon yield and error
//! Q1      = Y1 μ e^(−μ)
//! R       = q { Q1 [1 − H2(e1)] − f Q_μ H2(E_μ) }           secret bits per pulse
//! rate    = ν R  (clamped at 0)
//! ```
//!
//! An intercept-resend eavesdropper on a fraction `p` of the pulses (random basis) adds `p/4`
//! to the error of the detected signals (`e_d → e_d + p/4`), which raises both `E_μ` and
//! `e1`. A link aborts (produces no key) when the QBER exceeds its threshold (11 % by
//! default, the limit of one-way post-processing for BB84).
//!
//! The defaults land near published commercial figures: about 10 Mbit/s at 10 km (Toshiba:
//! 13.7 Mbit/s at 10 km, Yuan et al., JLT 36, 3427, 2018), about 1.6 Mbit/s at 50 km and about
//! 0.13 Mbit/s at 100 km.

use serde::{Deserialize, Serialize};

/// Device and fibre parameters of a link.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeviceParams {
    /// Fibre loss α, dB/km (0.2 standard fibre, ~0.16 ultra-low-loss).
    pub fibre_loss_db_per_km: f64,
    /// Transmittance of Bob's optics η_Bob.
    pub bob_efficiency: f64,
    /// Detector efficiency η_D.
    pub detector_efficiency: f64,
    /// Dark/background count probability per gate Y0.
    pub dark_count_probability: f64,
    /// Optical misalignment error e_d.
    pub misalignment: f64,
    /// Mean photon number of the signal states μ.
    pub mean_photon_number: f64,
    /// Error-correction efficiency f (≥ 1).
    pub error_correction_efficiency: f64,
    /// Pulse repetition rate ν, Hz.
    pub repetition_rate_hz: f64,
    /// Sifting factor q (1/2 for standard BB84, near 1 with biased bases).
    pub sifting: f64,
}

impl Default for DeviceParams {
    fn default() -> Self {
        DeviceParams {
            fibre_loss_db_per_km: 0.2,
            bob_efficiency: 0.5,
            detector_efficiency: 0.2,
            dark_count_probability: 1e-5,
            misalignment: 0.02,
            mean_photon_number: 0.5,
            error_correction_efficiency: 1.16,
            repetition_rate_hz: 1e9,
            sifting: 0.9,
        }
    }
}

/// What the model predicts for a link.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LinkPerformance {
    /// Overall transmittance η.
    pub transmittance: f64,
    /// QBER of the sifted key, E_μ.
    pub qber: f64,
    /// Secure key rate, bit/s (0 when the link aborts).
    pub secure_key_rate_bps: f64,
    /// The QBER exceeds the abort threshold: no key is produced.
    pub aborted: bool,
}

/// Binary entropy H2(x).
pub fn h2(x: f64) -> f64 {
    if x <= 0.0 || x >= 1.0 {
        0.0
    } else {
        -x * x.log2() - (1.0 - x) * (1.0 - x).log2()
    }
}

impl DeviceParams {
    /// Checks the ranges; the error names the parameter.
    pub fn validate(&self) -> Result<(), String> {
        let unit = |v: f64, name: &str| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} must be within 0..=1, got {v}"))
            }
        };
        unit(self.bob_efficiency, "bob_efficiency")?;
        unit(self.detector_efficiency, "detector_efficiency")?;
        unit(self.dark_count_probability, "dark_count_probability")?;
        unit(self.misalignment, "misalignment")?;
        unit(self.sifting, "sifting")?;
        if self.fibre_loss_db_per_km.is_nan() || self.fibre_loss_db_per_km < 0.0 {
            return Err("fibre_loss_db_per_km must be >= 0".into());
        }
        if self.mean_photon_number.is_nan() || self.mean_photon_number <= 0.0 {
            return Err("mean_photon_number must be > 0".into());
        }
        if self.error_correction_efficiency.is_nan() || self.error_correction_efficiency < 1.0 {
            return Err("error_correction_efficiency must be >= 1".into());
        }
        if self.repetition_rate_hz.is_nan() || self.repetition_rate_hz <= 0.0 {
            return Err("repetition_rate_hz must be > 0".into());
        }
        Ok(())
    }

    /// The model at fibre length `length_km`, with an intercept-resend attacker on a fraction
    /// `eve` of the pulses, aborting above `abort_qber`.
    pub fn evaluate(&self, length_km: f64, eve: f64, abort_qber: f64) -> LinkPerformance {
        let eta = 10f64.powf(-self.fibre_loss_db_per_km * length_km / 10.0)
            * self.bob_efficiency
            * self.detector_efficiency;
        let mu = self.mean_photon_number;
        let y0 = self.dark_count_probability;
        let e_d = (self.misalignment + eve.clamp(0.0, 1.0) / 4.0).min(0.5);
        let q_mu = y0 + 1.0 - (-eta * mu).exp();
        let qber = (0.5 * y0 + e_d * (1.0 - (-eta * mu).exp())) / q_mu;
        let y1 = y0 + eta;
        let e1 = (0.5 * y0 + e_d * eta) / y1;
        let q1 = y1 * mu * (-mu).exp();
        let r = self.sifting
            * (q1 * (1.0 - h2(e1)) - self.error_correction_efficiency * q_mu * h2(qber));
        let aborted = qber > abort_qber;
        LinkPerformance {
            transmittance: eta,
            qber,
            secure_key_rate_bps: if aborted {
                0.0
            } else {
                (self.repetition_rate_hz * r).max(0.0)
            },
            aborted,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ABORT: f64 = 0.11;

    /// Independent evaluation of the formulas for the default parameters at 10 km,
    /// worked by hand: η = 10^-0.2 · 0.5 · 0.2 = 0.0630957.
    #[test]
    fn matches_the_formulas_at_a_worked_point() {
        let p = DeviceParams::default();
        let m = p.evaluate(10.0, 0.0, ABORT);
        assert!((m.transmittance - 0.063_095_734).abs() < 1e-8);
        let eta = m.transmittance;
        let q_mu = 1e-5 + 1.0 - (-eta * 0.5).exp();
        let e = (0.5e-5 + 0.02 * (1.0 - (-eta * 0.5).exp())) / q_mu;
        assert!((m.qber - e).abs() < 1e-12);
        let y1 = 1e-5 + eta;
        let e1 = (0.5e-5 + 0.02 * eta) / y1;
        let r = 0.9 * (y1 * 0.5 * (-0.5f64).exp() * (1.0 - h2(e1)) - 1.16 * q_mu * h2(e));
        assert!((m.secure_key_rate_bps - 1e9 * r).abs() < 1.0);
    }

    #[test]
    fn lands_near_published_commercial_figures() {
        let p = DeviceParams::default();
        let at = |l: f64| p.evaluate(l, 0.0, ABORT).secure_key_rate_bps;
        // Mbit/s at ~10 km (Toshiba 13.7 Mbit/s), kbit/s-scale near 100 km.
        assert!((5e6..20e6).contains(&at(10.0)), "{}", at(10.0));
        assert!((0.5e6..3e6).contains(&at(50.0)), "{}", at(50.0));
        assert!((1e4..5e5).contains(&at(100.0)), "{}", at(100.0));
        assert_eq!(at(200.0), 0.0, "dark counts win at 200 km");
        assert!((h2(0.11) - 0.4999).abs() < 1e-3);
    }

    #[test]
    fn rate_falls_and_qber_rises_with_distance() {
        let p = DeviceParams::default();
        let mut last = p.evaluate(0.0, 0.0, ABORT);
        for l in (1..=200).map(f64::from) {
            let m = p.evaluate(l, 0.0, ABORT);
            assert!(
                m.secure_key_rate_bps <= last.secure_key_rate_bps,
                "rate at {l} km"
            );
            assert!(m.qber >= last.qber - 1e-15, "qber at {l} km");
            last = m;
        }
    }

    #[test]
    fn an_intercept_resend_attacker_raises_the_qber_by_a_quarter_and_aborts_the_link() {
        let p = DeviceParams::default();
        let clean = p.evaluate(10.0, 0.0, ABORT);
        let eve = p.evaluate(10.0, 1.0, ABORT);
        assert!(
            (eve.qber - clean.qber - 0.25).abs() < 0.01,
            "{} {}",
            eve.qber,
            clean.qber
        );
        assert!(eve.aborted);
        assert_eq!(eve.secure_key_rate_bps, 0.0);
        let partial = p.evaluate(10.0, 0.2, ABORT);
        assert!(!partial.aborted && partial.secure_key_rate_bps < clean.secure_key_rate_bps);
    }
}
