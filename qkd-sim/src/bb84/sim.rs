//! The simulated physics: random helpers, the quantum channel (fibre, eavesdropper,
//! misalignment) and Bob's detector (basis choice, measurement, dark counts).
//!
//! ## Where the quantum channel runs
//! Photons cannot travel over HTTPS, so the channel is a function applied in Alice's process
//! between her source and the wire: [`quantum_channel`] decides which pulses reach Bob's
//! detector and in what state, and only those cross to Bob (index + arriving bit and basis).
//! Alice's own bit and basis tables never leave her process. What Bob does with an arriving
//! state — choose a basis, measure, add dark counts — runs at Bob ([`detect`]) with Bob's own
//! random numbers, so Alice learns Bob's basis choices only from his sifting announcement, as
//! in BB84 (Bennett and Brassard, Proc. IEEE ICCSSP 1984, 175).
//!
//! ## Model
//! - Alice's source emits weak coherent pulses whose photon number is Poisson(μ). Each photon
//!   survives fibre (10^(−αL/10)), Bob's optics (η_Bob) and the detector (η_D) independently,
//!   with overall transmittance η. By Poisson thinning the number of photons that survive is
//!   Poisson(ημ), so a pulse is detected with probability `1 − e^(−ημ)`, independently of the
//!   others. The channel therefore never walks the undetected pulses: it jumps from one
//!   detected pulse to the next with geometrically distributed gaps.
//! - Intercept-resend eavesdropper on a fraction `eve` of the pulses: she measures in a random
//!   basis and resends the state she found (her basis, her result). She is assumed to resend
//!   so that Bob's detection statistics are unchanged (as in `physics.rs`), so whether a pulse
//!   is detected is decided first, and then whether she acted on it. On sifted bits she causes
//!   an error with probability 1/4 (wrong basis half the time, then a random result).
//! - Misalignment: the arriving bit is flipped with probability e_d.
//! - Bob measures an arriving state in his own random basis: matching basis → the arriving
//!   bit; other basis → a random bit.
//! - Dark counts: each of the N gates clicks with probability Y0 with a random bit; sampled
//!   the same way (geometric gaps, i.e. Binomial(N, Y0) clicks at uniform positions). A dark
//!   count in a gate that also detected a photon gives a double click when the two results
//!   differ, which Bob resolves by a random bit (squashing).
//!
//! This reproduces the gain and QBER of `physics::DeviceParams::evaluate`:
//! `Q_μ = Y0 + 1 − e^(−ημ)` and `E_μ Q_μ = Y0/2 + e_d (1 − e^(−ημ))`.

use rand::RngCore;
use zeroize::Zeroizing;

use super::Bb84Params;

/// A uniform double in [0, 1) (53 bits).
pub fn unit(rng: &mut impl RngCore) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// True with probability `p`.
pub fn bernoulli(rng: &mut impl RngCore, p: f64) -> bool {
    unit(rng) < p
}

/// One random bit.
pub fn bit(rng: &mut impl RngCore) -> u8 {
    (rng.next_u32() >> 31) as u8
}

/// Uniform in `0..n` (n ≥ 1), without bias (Lemire's multiply-and-reject). Deterministic for a
/// given generator state, so both ends expand a shared seed identically.
pub fn below(rng: &mut impl RngCore, n: u64) -> u64 {
    let mut m = u128::from(rng.next_u64()) * u128::from(n);
    if (m as u64) < n {
        let t = n.wrapping_neg() % n;
        while (m as u64) < t {
            m = u128::from(rng.next_u64()) * u128::from(n);
        }
    }
    (m >> 64) as u64
}

/// Number of failures before the first success of a Bernoulli(p) sequence (u64::MAX when
/// `p ≤ 0`, i.e. never).
pub fn geometric(rng: &mut impl RngCore, p: f64) -> u64 {
    if p.is_nan() || p <= 0.0 {
        return u64::MAX;
    }
    if p >= 1.0 {
        return 0;
    }
    let u = 1.0 - unit(rng); // (0, 1]
                             // `as` saturates: a gap beyond u64 means "no further event".
    (u.ln() / (-p).ln_1p()).floor() as u64
}

/// Calls `f` at every index in `0..n` where a Bernoulli(p) event occurs, in increasing order.
pub fn for_each_event<R: RngCore>(rng: &mut R, n: u64, p: f64, mut f: impl FnMut(&mut R, u64)) {
    let mut i = geometric(rng, p);
    while i < n {
        f(rng, i);
        i = i.saturating_add(1).saturating_add(geometric(rng, p));
    }
}

/// `n` random bits packed LSB-first into 64-bit words.
pub fn random_words(rng: &mut impl RngCore, n: u64) -> Zeroizing<Vec<u64>> {
    let words = n.div_ceil(64) as usize;
    let mut v = Zeroizing::new(Vec::with_capacity(words));
    v.extend((0..words).map(|_| rng.next_u64()));
    v
}

/// Bit `i` of LSB-first packed words.
pub fn get(words: &[u64], i: u64) -> u8 {
    ((words[(i / 64) as usize] >> (i % 64)) & 1) as u8
}

/// Overall transmittance η = 10^(−αL/10) · η_Bob · η_D.
pub fn transmittance(p: &Bb84Params) -> f64 {
    10f64.powf(-p.device.fibre_loss_db_per_km * p.length_km / 10.0)
        * p.device.bob_efficiency
        * p.device.detector_efficiency
}

/// What reaches Bob's detector: index of each detected pulse, and the arriving state.
pub struct Arrivals {
    pub indices: Vec<u64>,
    pub bits: Zeroizing<Vec<u8>>,
    pub bases: Zeroizing<Vec<u8>>,
    /// Simulation only: how many of these the eavesdropper measured.
    pub intercepted: u64,
}

/// The quantum channel between Alice's source and Bob's detector (see the module docs).
/// `alice_bits` / `alice_bases` hold one bit per pulse (LSB-first words) for `pulses` pulses.
pub fn quantum_channel(
    alice_bits: &[u64],
    alice_bases: &[u64],
    pulses: u64,
    p: &Bb84Params,
    rng: &mut impl RngCore,
) -> Arrivals {
    let eta = transmittance(p);
    let p_det = -(-eta * p.device.mean_photon_number).exp_m1();
    let expected = (pulses as f64 * p_det * 1.01 + 64.0).min(1e8) as usize;
    let mut out = Arrivals {
        indices: Vec::with_capacity(expected),
        bits: Zeroizing::new(Vec::with_capacity(expected)),
        bases: Zeroizing::new(Vec::with_capacity(expected)),
        intercepted: 0,
    };
    let eve = p.eavesdropper;
    let e_d = p.device.misalignment;
    for_each_event(rng, pulses, p_det, |rng, i| {
        let (mut b, mut basis) = (get(alice_bits, i), get(alice_bases, i));
        if eve > 0.0 && bernoulli(rng, eve) {
            // Intercept-resend: Eve's basis; her result is Alice's bit only when the bases
            // agree.
            let eve_basis = bit(rng);
            if eve_basis != basis {
                b = bit(rng);
            }
            basis = eve_basis;
            out.intercepted += 1;
        }
        if e_d > 0.0 && bernoulli(rng, e_d) {
            b ^= 1;
        }
        out.indices.push(i);
        out.bits.push(b);
        out.bases.push(basis);
    });
    out
}

/// Bob's clicks: gate index, Bob's basis and measured bit, in increasing index order.
pub struct Clicks {
    pub indices: Vec<u64>,
    pub bases: Zeroizing<Vec<u8>>,
    pub bits: Zeroizing<Vec<u8>>,
}

/// Bob's detector: measures the arriving states in random bases and adds dark counts with
/// probability `y0` per gate over `pulses` gates. `arrivals` must be strictly increasing and
/// `< pulses` (checked by the decoder). At most `max_clicks` clicks (else `None`).
pub fn detect(
    arrivals: &[u64],
    bits: &[u8],
    bases: &[u8],
    pulses: u64,
    y0: f64,
    max_clicks: usize,
    rng: &mut impl RngCore,
) -> Option<Clicks> {
    let mut dark = Vec::new();
    let mut too_many = false;
    for_each_event(rng, pulses, y0, |_, i| {
        if dark.len() < max_clicks {
            dark.push(i);
        } else {
            too_many = true;
        }
    });
    if too_many || arrivals.len() + dark.len() > max_clicks {
        return None;
    }
    let cap = arrivals.len() + dark.len();
    let mut c = Clicks {
        indices: Vec::with_capacity(cap),
        bases: Zeroizing::new(Vec::with_capacity(cap)),
        bits: Zeroizing::new(Vec::with_capacity(cap)),
    };
    let (mut a, mut d) = (0usize, 0usize);
    while a < arrivals.len() || d < dark.len() {
        let basis = bit(rng);
        let next_a = arrivals.get(a).copied().unwrap_or(u64::MAX);
        let next_d = dark.get(d).copied().unwrap_or(u64::MAX);
        let idx = next_a.min(next_d);
        let mut result = None;
        if next_a == idx {
            result = Some(if basis == bases[a] { bits[a] } else { bit(rng) });
            a += 1;
        }
        if next_d == idx {
            let noise = bit(rng);
            result = Some(match result {
                Some(r) if r != noise => bit(rng), // double click: random assignment
                _ => noise,
            });
            d += 1;
        }
        c.indices.push(idx);
        c.bases.push(basis);
        c.bits.push(result.unwrap_or(0));
    }
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn geometric_skipping_gives_the_binomial_mean() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let (n, p) = (2_000_000u64, 0.031);
        let mut count = 0u64;
        for_each_event(&mut rng, n, p, |_, _| count += 1);
        let mean = n as f64 * p;
        let sd = (mean * (1.0 - p)).sqrt();
        assert!((count as f64 - mean).abs() < 5.0 * sd, "{count} vs {mean}");
        assert_eq!(geometric(&mut rng, 0.0), u64::MAX);
        assert_eq!(geometric(&mut rng, 1.0), 0);
    }

    #[test]
    fn below_is_in_range_and_roughly_uniform() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let mut hist = [0u32; 7];
        for _ in 0..70_000 {
            hist[below(&mut rng, 7) as usize] += 1;
        }
        assert!(
            hist.iter().all(|&h| (9_000..11_000).contains(&h)),
            "{hist:?}"
        );
    }
}
