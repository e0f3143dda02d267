//! Faithful mode of the simulated QKD link: both ends really run BB84 on simulated photons and
//! post-process, so their final keys agree because the protocol made them agree.
//!
//! Alice is the producing KME (HTTP client), Bob the far KME (HTTP server). Alice drives every
//! step with a request/reply exchange through a [`Channel`]; [`Bob::handle`] answers one
//! message at a time and keeps the state of the frame in progress.
//!
//! ## One frame
//! 1. **Preparation** (BB84: C. H. Bennett and G. Brassard, "Quantum cryptography: public key
//!    distribution and coin tossing", Proc. IEEE Int. Conf. Computers, Systems and Signal
//!    Processing, Bangalore, 175–179, 1984). Alice draws a random bit and a random basis for
//!    each of the N pulses (ChaCha20 seeded from the OS; two bit tables, N/4 bytes in all).
//! 2. **Quantum channel** ([`sim`]): fibre and detector loss, an intercept-resend
//!    eavesdropper and misalignment, applied in Alice's process because photons cannot cross
//!    HTTPS. Only the pulses that reach Bob's detector travel ([`ToBob::Pulses`]: index and
//!    arriving state); Bob measures them in his own random bases and adds dark counts.
//! 3. **Sifting**: Bob announces his click indices and bases ([`FromBob::Clicks`]); Alice
//!    says which bases match ([`ToBob::Sift`]); both keep those bits.
//! 4. **Parameter estimation**: in the same message Alice names a random sample of the
//!    sifted positions (`sample_fraction`, at least [`MIN_SAMPLE`] bits when the key allows)
//!    and discloses her bits there; Bob replies with his ([`FromBob::Sample`]). Both compute
//!    the QBER; above `abort_qber` the frame ends with [`Bb84Error::Aborted`]. The sample is
//!    discarded.
//! 5. **Error correction**: Cascade (Brassard and Salvail, EUROCRYPT '93), see [`cascade`].
//!    Alice sends all block parities of a pass ([`ToBob::CascadePass`]); Bob replies with the
//!    batch of ranges whose parities he needs next ([`FromBob::Cascade`]); Alice answers
//!    ([`ToBob::Parities`]) until Bob's batch is empty. Bob corrects his key toward Alice's.
//!    Every parity Alice discloses counts as leaked.
//! 6. **Verification**: polynomial hash over GF(2^61 − 1) at a random point Alice draws now
//!    ([`ToBob::Verify`]); a mismatch discards the frame ([`Bb84Error::VerificationFailed`]).
//!    The 64-bit tag counts as leaked.
//! 7. **Privacy amplification** with a Toeplitz matrix whose `n + ℓ − 1` seed bits Alice
//!    sends ([`ToBob::Amplify`]); see [`secure_length`] for ℓ and [`toeplitz`] for the hash.
//!    Bob stores the result under the frame ID ([`Bob::take_key`]).
//!
//! A frame at 10 km with the defaults needs about 45–90 round trips (most of them Cascade:
//! `log2(block)` per pass plus the searches the cascade effect reopens, which run one after
//! the other). The work is synchronous CPU (tens of milliseconds per step at most, about
//! 0.1 s for a whole frame at 10 km in release builds, both ends together); callers on an
//! async runtime may prefer a dedicated thread for it.
//!
//! Key material (bit tables, sifted and corrected keys, outputs) lives in `Zeroizing` buffers
//! and is wiped when a frame ends or is dropped. Nothing here logs key bits; `Debug` of the
//! messages shows lengths only.

pub mod cascade;
pub mod sim;
pub mod toeplitz;
pub mod wire;

use std::collections::VecDeque;
use std::future::Future;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use zeroize::Zeroizing;

use crate::physics::{h2, DeviceParams};
use cascade::{CascadeAlice, CascadeBob};
use wire::{PackedBits, PackedIndices, PackedQueries};

/// Most pulses in a frame (Alice keeps two bit tables of this many bits).
pub const MAX_PULSES: u64 = 1 << 32;
/// Most clicks Bob reports in a frame (bounds the sifted key).
pub const MAX_CLICKS: usize = 1 << 24;
/// Longest bit string either end decodes.
pub const MAX_WIRE_BITS: u64 = 1 << 27;
/// The parameter-estimation sample has at least this many bits when the sifted key has four
/// times as many.
pub const MIN_SAMPLE: usize = 2000;
/// Finished keys Bob keeps until they are taken; older ones are wiped.
pub const MAX_FINISHED: usize = 16;
/// Most round trips of one frame.
pub const MAX_ROUND_TRIPS: u32 = 10_000;

/// Errors of a frame.
#[derive(Debug, thiserror::Error)]
pub enum Bb84Error {
    /// The estimated QBER is above the abort threshold.
    #[error("frame aborted: estimated QBER {qber:.4} is above the threshold")]
    Aborted { qber: f64 },
    /// The verification hashes of the corrected keys differ; the frame was discarded.
    #[error("the corrected keys failed verification")]
    VerificationFailed,
    /// Nothing is left after privacy amplification (or the sifted key is too short).
    #[error("no secure key in this frame")]
    NoKey,
    /// A malformed, unexpected or out-of-order message, or invalid parameters.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The channel to the peer failed.
    #[error("channel error: {0}")]
    Channel(String),
    /// The OS random number generator failed.
    #[error("random number generator: {0}")]
    Rng(String),
}

fn protocol(msg: impl Into<String>) -> Bb84Error {
    Bb84Error::Protocol(msg.into())
}

/// Parameters of the link. Both ends should hold the same values (Bob uses `device` for his
/// dark counts, `abort_qber` for his own abort decision and `epsilon_pa` to check the final
/// length Alice proposes).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Bb84Params {
    /// Device and fibre model (see [`crate::physics`]).
    pub device: DeviceParams,
    /// Fibre length, km.
    pub length_km: f64,
    /// Fraction of the pulses an intercept-resend eavesdropper measures (0..=1).
    pub eavesdropper: f64,
    /// Abort above this estimated QBER.
    pub abort_qber: f64,
    /// Pulses N per frame.
    pub pulses_per_frame: u64,
    /// Fraction of the sifted key disclosed for parameter estimation.
    pub sample_fraction: f64,
    /// Security parameter of privacy amplification (and of the estimation tail bound).
    pub epsilon_pa: f64,
    /// Cascade passes.
    pub cascade_passes: u32,
}

impl Default for Bb84Params {
    /// 10 km of standard fibre with the default device; 12 M pulses per frame, i.e. about
    /// 373 k detections and 186 k sifted bits at 10 km (30 k at 50 km).
    fn default() -> Self {
        Bb84Params {
            device: DeviceParams::default(),
            length_km: 10.0,
            eavesdropper: 0.0,
            abort_qber: 0.11,
            pulses_per_frame: 12_000_000,
            sample_fraction: 0.1,
            epsilon_pa: 1e-10,
            cascade_passes: 4,
        }
    }
}

impl Bb84Params {
    /// Checks the ranges; the error names the parameter.
    pub fn validate(&self) -> Result<(), Bb84Error> {
        self.device.validate().map_err(Bb84Error::Protocol)?;
        let bad = |what: &str| Err(protocol(format!("invalid parameter {what}")));
        if !(self.length_km.is_finite() && self.length_km >= 0.0) {
            return bad("length_km");
        }
        if !(0.0..=1.0).contains(&self.eavesdropper) {
            return bad("eavesdropper");
        }
        if !(self.abort_qber > 0.0 && self.abort_qber <= 0.5) {
            return bad("abort_qber");
        }
        if self.pulses_per_frame == 0 || self.pulses_per_frame > MAX_PULSES {
            return bad("pulses_per_frame");
        }
        if !(self.sample_fraction > 0.0 && self.sample_fraction < 1.0) {
            return bad("sample_fraction");
        }
        if !(self.epsilon_pa > 0.0 && self.epsilon_pa < 1.0) {
            return bad("epsilon_pa");
        }
        if self.cascade_passes == 0 || self.cascade_passes as usize > cascade::MAX_PASSES {
            return bad("cascade_passes");
        }
        Ok(())
    }
}

/// Bound on the phase error and secure length (bits, not yet rounded to bytes).
///
/// ```text
/// e_ph = min(1/2, e + μ),   μ = sqrt( (n + k)/(n k) · (k + 1)/k · ln(2/ε) )
/// ℓ    = ⌊ n (1 − H2(e_ph)) − leak_EC − verification_bits − 2 log2(1/ε) ⌋
/// ```
///
/// `n`: bits kept after the sample, `k`: sample bits, `e`: error rate of the sample,
/// `ε = epsilon_pa`. The form of ℓ is the BB84 bound of Shor–Preskill / GLLP (D. Gottesman,
/// H.-K. Lo, N. Lütkenhaus, J. Preskill, QIC 4, 325, 2004) with the leftover-hash term
/// `2 log2(1/ε)`. The phase error rate of the kept bits is bounded by the sample's bit error
/// rate plus the Serfling-type deviation μ for sampling without replacement, in the form of
/// M. Tomamichel, C. C. W. Lim, N. Gisin and R. Renner, Nat. Commun. 3, 634 (2012) (phase and
/// bit errors have the same statistics in BB84 by basis symmetry). Not applied: the
/// multi-photon (photon-number-splitting) correction of GLLP, which needs the decoy-state
/// estimate of the single-photon fraction; this simulation does not send decoy intensities.
pub fn secure_length(
    n: u64,
    k: u64,
    sample_errors: u64,
    leak_ec: u64,
    verification_bits: u64,
    epsilon: f64,
) -> (f64, i64) {
    if n == 0 || k == 0 {
        return (0.5, 0);
    }
    let (nf, kf) = (n as f64, k as f64);
    let e = sample_errors as f64 / kf;
    let mu = ((nf + kf) / (nf * kf) * (kf + 1.0) / kf * (2.0 / epsilon).ln()).sqrt();
    let e_ph = (e + mu).min(0.5);
    let l = nf * (1.0 - h2(e_ph))
        - leak_ec as f64
        - verification_bits as f64
        - 2.0 * (1.0 / epsilon).log2();
    (e_ph, l.floor().max(-1e18) as i64)
}

/// Sample size for parameter estimation out of `sifted` bits.
fn sample_size(sifted: usize, fraction: f64) -> usize {
    let k = (sifted as f64 * fraction).ceil() as usize;
    k.max(MIN_SAMPLE.min(sifted / 4)).min(sifted / 2)
}

/// Messages from Alice to Bob. Each names its frame.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ToBob {
    /// What the quantum channel delivers to Bob's detector: for each detected pulse its index
    /// and the arriving state (as prepared, or as resent by the eavesdropper, after
    /// misalignment). Starts a frame; an older unfinished frame at Bob is discarded.
    Pulses {
        frame: Uuid,
        /// Pulses N in the frame (Bob's detector gates, for dark counts).
        pulses: u64,
        indices: PackedIndices,
        bits: PackedBits,
        bases: PackedBits,
    },
    /// Sifting and the parameter-estimation sample.
    Sift {
        frame: Uuid,
        /// One bit per click of Bob: 1 when Alice's basis matches Bob's.
        matching: PackedBits,
        /// One bit per sifted bit: 1 when it is in the sample.
        sample: PackedBits,
        /// Alice's bits at the sample positions, in order.
        sample_bits: PackedBits,
    },
    /// Start of a Cascade pass: Alice's parity of each block.
    CascadePass {
        frame: Uuid,
        /// 0-based; passes come in order.
        pass: u32,
        block_size: u32,
        /// The 32-byte permutation seed, base64; in pass 0 only.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        seed: Option<String>,
        parities: PackedBits,
    },
    /// Alice's parities of the ranges Bob asked for last, in his order.
    Parities { frame: Uuid, parities: PackedBits },
    /// Verification: the point `hash_key` and Alice's tag.
    Verify {
        frame: Uuid,
        hash_key: u64,
        tag: u64,
    },
    /// Privacy amplification: the final length (a multiple of 8) and the Toeplitz seed of
    /// `n + final_bits − 1` bits.
    Amplify {
        frame: Uuid,
        final_bits: u64,
        seed: PackedBits,
    },
    /// Alice ends the frame; Bob discards it.
    Abort { frame: Uuid, reason: String },
}

impl ToBob {
    pub fn frame(&self) -> Uuid {
        match self {
            ToBob::Pulses { frame, .. }
            | ToBob::Sift { frame, .. }
            | ToBob::CascadePass { frame, .. }
            | ToBob::Parities { frame, .. }
            | ToBob::Verify { frame, .. }
            | ToBob::Amplify { frame, .. }
            | ToBob::Abort { frame, .. } => *frame,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ToBob::Pulses { .. } => "pulses",
            ToBob::Sift { .. } => "sift",
            ToBob::CascadePass { .. } => "cascade_pass",
            ToBob::Parities { .. } => "parities",
            ToBob::Verify { .. } => "verify",
            ToBob::Amplify { .. } => "amplify",
            ToBob::Abort { .. } => "abort",
        }
    }
}

/// Replies from Bob to Alice.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum FromBob {
    /// Bob's clicks (strictly increasing pulse indices) and his basis for each.
    Clicks {
        frame: Uuid,
        indices: PackedIndices,
        bases: PackedBits,
    },
    /// Bob's bits at the sample positions.
    Sample { frame: Uuid, bits: PackedBits },
    /// The ranges whose parities Bob needs next; none: the pass is finished.
    Cascade { frame: Uuid, queries: PackedQueries },
    /// Whether the tags matched, and how many bits Cascade corrected (public: the positions
    /// follow from the disclosed parities).
    Verified {
        frame: Uuid,
        ok: bool,
        corrected: u64,
    },
    /// Bob holds the final key of the frame.
    Done { frame: Uuid, final_bits: u64 },
    /// Bob discarded the frame.
    Aborted { frame: Uuid },
}

impl FromBob {
    pub fn frame(&self) -> Uuid {
        match self {
            FromBob::Clicks { frame, .. }
            | FromBob::Sample { frame, .. }
            | FromBob::Cascade { frame, .. }
            | FromBob::Verified { frame, .. }
            | FromBob::Done { frame, .. }
            | FromBob::Aborted { frame } => *frame,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            FromBob::Clicks { .. } => "clicks",
            FromBob::Sample { .. } => "sample",
            FromBob::Cascade { .. } => "cascade",
            FromBob::Verified { .. } => "verified",
            FromBob::Done { .. } => "done",
            FromBob::Aborted { .. } => "aborted",
        }
    }
}

/// The channel Alice talks through (in the KME: an HTTPS POST to the peer; in tests: an
/// in-process Bob). An error reply of Bob arrives as `Err`.
pub trait Channel: Send {
    fn exchange(&mut self, msg: ToBob) -> impl Future<Output = Result<FromBob, Bb84Error>> + Send;
}

/// Figures of one frame (no key material).
#[derive(Debug, Clone, Default, Serialize)]
pub struct FrameStats {
    /// Pulses N sent.
    pub pulses: u64,
    /// Bob's clicks (signal and dark counts).
    pub detections: u64,
    /// Bits with matching bases.
    pub sifted_bits: u64,
    /// Bits disclosed for parameter estimation (and discarded).
    pub sample_bits: u64,
    /// Errors found in the sample.
    pub sample_errors: u64,
    /// Estimated QBER (sample errors / sample bits).
    pub qber: f64,
    /// Upper bound on the phase error rate used for privacy amplification.
    pub phase_error_bound: f64,
    /// QBER over the whole sifted key: sample errors plus the bits Cascade corrected. Exact
    /// once verification passed; known to both ends (the corrected positions are public).
    pub actual_qber: f64,
    /// Bits Bob corrected.
    pub corrected_bits: u64,
    /// Parity bits disclosed by Cascade.
    pub leaked_ec_bits: u64,
    /// Bits disclosed by verification.
    pub verification_bits: u64,
    /// Final key bits (a multiple of 8).
    pub final_bits: u64,
    /// Request/reply exchanges with Bob.
    pub round_trips: u32,
    /// Simulation only (the eavesdropper's own count): detected pulses she measured.
    pub simulated_intercepted: u64,
}

/// A finished frame at Alice.
#[derive(Debug)]
pub struct FrameOutcome {
    pub frame: Uuid,
    pub key: Zeroizing<Vec<u8>>,
    pub stats: FrameStats,
}

fn os_rng() -> Result<ChaCha20Rng, Bb84Error> {
    ChaCha20Rng::try_from_os_rng().map_err(|e| Bb84Error::Rng(e.to_string()))
}

/// How a frame failed at Alice: `Local` errors leave Bob holding the frame, so Alice tells
/// him to drop it; after `Remote` ones Bob already has.
enum Fail {
    Local(Bb84Error),
    Remote(Bb84Error),
}

impl From<Bb84Error> for Fail {
    fn from(e: Bb84Error) -> Self {
        Fail::Local(e)
    }
}

/// The producing end.
pub struct Alice {
    params: Bb84Params,
    /// Alice's choices: bits, bases, sample, seeds.
    rng: ChaCha20Rng,
    /// Nature: the channel and the eavesdropper.
    nature: ChaCha20Rng,
}

impl std::fmt::Debug for Alice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alice")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

impl Alice {
    /// Checks the parameters and seeds the generators from the OS.
    pub fn new(params: Bb84Params) -> Result<Self, Bb84Error> {
        params.validate()?;
        Ok(Alice {
            params,
            rng: os_rng()?,
            nature: os_rng()?,
        })
    }

    pub fn params(&self) -> &Bb84Params {
        &self.params
    }

    /// Runs one frame to the end; on success both ends hold the same final key, Bob's under
    /// `frame`.
    pub async fn run_frame<C: Channel>(&mut self, ch: &mut C) -> Result<FrameOutcome, Bb84Error> {
        let frame = Uuid::new_v4();
        let mut stats = FrameStats::default();
        match self.frame_steps(ch, frame, &mut stats).await {
            Ok(key) => {
                tracing::debug!(
                    %frame,
                    sifted = stats.sifted_bits,
                    qber = stats.qber,
                    leaked = stats.leaked_ec_bits,
                    final_bits = stats.final_bits,
                    round_trips = stats.round_trips,
                    "BB84 frame done"
                );
                Ok(FrameOutcome { frame, key, stats })
            }
            Err(Fail::Remote(e)) => Err(e),
            Err(Fail::Local(e)) => {
                // Best effort: Bob drops the frame (he also drops it when a new one starts).
                let _ = ch
                    .exchange(ToBob::Abort {
                        frame,
                        reason: e.to_string(),
                    })
                    .await;
                Err(e)
            }
        }
    }

    /// One exchange; checks the reply's frame.
    async fn call<C: Channel>(
        ch: &mut C,
        frame: Uuid,
        msg: ToBob,
        stats: &mut FrameStats,
    ) -> Result<FromBob, Fail> {
        stats.round_trips += 1;
        if stats.round_trips > MAX_ROUND_TRIPS {
            return Err(Fail::Local(protocol("too many round trips")));
        }
        let reply = ch.exchange(msg).await.map_err(Fail::Remote)?;
        if reply.frame() != frame {
            return Err(Fail::Local(protocol(format!(
                "reply for frame {} in frame {frame}",
                reply.frame()
            ))));
        }
        Ok(reply)
    }

    fn unexpected(reply: &FromBob, step: &str) -> Fail {
        Fail::Local(protocol(format!(
            "unexpected reply '{}' to {step}",
            reply.kind()
        )))
    }

    /// Drives one frame through the protocol steps (see the module docs); returns Alice's
    /// final key.
    async fn frame_steps<C: Channel>(
        &mut self,
        ch: &mut C,
        frame: Uuid,
        stats: &mut FrameStats,
    ) -> Result<Zeroizing<Vec<u8>>, Fail> {
        stats.pulses = self.params.pulses_per_frame;
        let detected = self.send_pulses(ch, frame, stats).await?;
        let (matching, sifted) = sift(detected);
        stats.sifted_bits = sifted.len() as u64;
        let (key, est) = self.estimate(ch, frame, matching, sifted, stats).await?;
        self.correct_errors(ch, frame, &key, est.qber, stats)
            .await?;
        let n = key.len();
        let words = toeplitz::pack(&key);
        drop(key);
        self.verify(ch, frame, &words, n, &est, stats).await?;
        self.amplify(ch, frame, &words, n, &est, stats).await
    }

    /// Steps 1–2, preparation and the quantum channel: draws the bits and bases, sends what
    /// reaches Bob's detector and decodes his clicks.
    async fn send_pulses<C: Channel>(
        &mut self,
        ch: &mut C,
        frame: Uuid,
        stats: &mut FrameStats,
    ) -> Result<Detected, Fail> {
        let p = self.params;
        let pulses = p.pulses_per_frame;
        let bits = sim::random_words(&mut self.rng, pulses);
        let bases = sim::random_words(&mut self.rng, pulses);
        let arrivals = sim::quantum_channel(&bits, &bases, pulses, &p, &mut self.nature);
        stats.simulated_intercepted = arrivals.intercepted;
        let msg = ToBob::Pulses {
            frame,
            pulses,
            indices: PackedIndices::encode(&arrivals.indices),
            bits: PackedBits::from_bits(arrivals.bits.iter().copied()),
            bases: PackedBits::from_bits(arrivals.bases.iter().copied()),
        };
        drop(arrivals);
        let reply = Self::call(ch, frame, msg, stats).await?;
        let FromBob::Clicks {
            indices,
            bases: bob_bases,
            ..
        } = &reply
        else {
            return Err(Self::unexpected(&reply, "pulses"));
        };
        let clicks = indices.decode("clicks", pulses, MAX_CLICKS as u64)?;
        let bob_bases = bob_bases.to_bits("click bases", Some(clicks.len()))?;
        stats.detections = clicks.len() as u64;
        Ok(Detected {
            bits,
            bases,
            clicks,
            bob_bases,
        })
    }

    /// Step 4, parameter estimation: draws the sample, discloses Alice's bits there (with
    /// the sifting bits) and compares Bob's; aborts above `abort_qber`. Returns the key
    /// without the sample.
    async fn estimate<C: Channel>(
        &mut self,
        ch: &mut C,
        frame: Uuid,
        matching: Vec<u8>,
        sifted: Zeroizing<Vec<u8>>,
        stats: &mut FrameStats,
    ) -> Result<(Zeroizing<Vec<u8>>, AliceEstimate), Fail> {
        let s = sifted.len();
        let k = sample_size(s, self.params.sample_fraction);
        if k == 0 {
            return Err(Fail::Local(Bb84Error::NoKey));
        }
        let mut order: Vec<u32> = (0..s as u32).collect();
        let mut in_sample = vec![0u8; s];
        for i in 0..k {
            let j = i + sim::below(&mut self.rng, (s - i) as u64) as usize;
            order.swap(i, j);
            in_sample[order[i] as usize] = 1;
        }
        drop(order);
        let mut sample = Zeroizing::new(Vec::with_capacity(k));
        let mut key = Zeroizing::new(Vec::with_capacity(s - k));
        for (&b, &m) in sifted.iter().zip(&in_sample) {
            if m == 1 {
                sample.push(b);
            } else {
                key.push(b);
            }
        }
        drop(sifted);
        let msg = ToBob::Sift {
            frame,
            matching: PackedBits::from_bits(matching),
            sample: PackedBits::from_bits(in_sample),
            sample_bits: PackedBits::from_bits(sample.iter().copied()),
        };
        let reply = Self::call(ch, frame, msg, stats).await?;
        let FromBob::Sample { bits: theirs, .. } = &reply else {
            return Err(Self::unexpected(&reply, "sift"));
        };
        let theirs = theirs.to_bits("sample bits", Some(k))?;
        let errors = sample
            .iter()
            .zip(theirs.iter())
            .filter(|(a, b)| a != b)
            .count() as u64;
        let qber = errors as f64 / k as f64;
        stats.sample_bits = k as u64;
        stats.sample_errors = errors;
        stats.qber = qber;
        if qber > self.params.abort_qber {
            return Err(Fail::Local(Bb84Error::Aborted { qber }));
        }
        let est = AliceEstimate {
            sifted: s,
            sample: k,
            errors,
            qber,
        };
        Ok((key, est))
    }

    /// Step 5, error correction: the Cascade passes, each answered until Bob asks nothing
    /// more. Alice's key does not change; the leak goes to `stats`.
    async fn correct_errors<C: Channel>(
        &mut self,
        ch: &mut C,
        frame: Uuid,
        key: &[u8],
        qber: f64,
        stats: &mut FrameStats,
    ) -> Result<(), Fail> {
        let n = key.len();
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        let first = cascade::first_block_size(qber, n);
        let mut casc = CascadeAlice::new(n, seed);
        for pass in 0..self.params.cascade_passes as usize {
            let bs = cascade::block_size(first, pass, n);
            let parities = casc.start_pass(key, bs)?;
            let mut msg = ToBob::CascadePass {
                frame,
                pass: pass as u32,
                block_size: bs,
                seed: (pass == 0).then(|| wire::encode_seed(&seed)),
                parities: PackedBits::from_bits(parities),
            };
            loop {
                let reply = Self::call(ch, frame, msg, stats).await?;
                let FromBob::Cascade { queries, .. } = &reply else {
                    return Err(Self::unexpected(&reply, "cascade"));
                };
                let queries = queries.decode("cascade queries", n as u64 * 4)?;
                if queries.is_empty() {
                    break;
                }
                let answers = casc.answer(key, &queries)?;
                if casc.leaked > n as u64 {
                    return Err(Fail::Local(Bb84Error::NoKey));
                }
                msg = ToBob::Parities {
                    frame,
                    parities: PackedBits::from_bits(answers),
                };
            }
        }
        stats.leaked_ec_bits = casc.leaked;
        Ok(())
    }

    /// Step 6, verification: the polynomial tag of the `n`-bit key `words` at a fresh
    /// random point; Bob compares it with his own.
    async fn verify<C: Channel>(
        &mut self,
        ch: &mut C,
        frame: Uuid,
        words: &[u64],
        n: usize,
        est: &AliceEstimate,
        stats: &mut FrameStats,
    ) -> Result<(), Fail> {
        let hash_key = sim::below(&mut self.rng, toeplitz::P61);
        let tag = toeplitz::poly_tag(hash_key, words, n);
        let reply = Self::call(
            ch,
            frame,
            ToBob::Verify {
                frame,
                hash_key,
                tag,
            },
            stats,
        )
        .await?;
        let FromBob::Verified { ok, corrected, .. } = reply else {
            return Err(Self::unexpected(&reply, "verify"));
        };
        stats.verification_bits = toeplitz::TAG_BITS;
        stats.corrected_bits = corrected;
        stats.actual_qber = (est.errors + corrected) as f64 / est.sifted as f64;
        if !ok {
            return Err(Fail::Remote(Bb84Error::VerificationFailed));
        }
        Ok(())
    }

    /// Step 7, privacy amplification: the final length from [`secure_length`], a fresh
    /// Toeplitz seed for Bob, and Alice's final key.
    async fn amplify<C: Channel>(
        &mut self,
        ch: &mut C,
        frame: Uuid,
        words: &[u64],
        n: usize,
        est: &AliceEstimate,
        stats: &mut FrameStats,
    ) -> Result<Zeroizing<Vec<u8>>, Fail> {
        let (e_ph, l) = secure_length(
            n as u64,
            est.sample as u64,
            est.errors,
            stats.leaked_ec_bits,
            stats.verification_bits,
            self.params.epsilon_pa,
        );
        stats.phase_error_bound = e_ph;
        let l = if l > 0 { (l as usize / 8) * 8 } else { 0 };
        if l == 0 {
            return Err(Fail::Local(Bb84Error::NoKey));
        }
        let seed_bits = n + l - 1;
        let seed = sim::random_words(&mut self.rng, seed_bits as u64);
        let out = toeplitz::toeplitz(&seed, words, n, l);
        let msg = ToBob::Amplify {
            frame,
            final_bits: l as u64,
            seed: PackedBits::from_words(&seed, seed_bits),
        };
        let reply = Self::call(ch, frame, msg, stats).await?;
        let FromBob::Done { final_bits, .. } = reply else {
            return Err(Self::unexpected(&reply, "amplify"));
        };
        if final_bits != l as u64 {
            return Err(Fail::Local(protocol("Bob stored a key of another length")));
        }
        stats.final_bits = l as u64;
        Ok(toeplitz::to_bytes(&out, l))
    }
}

/// Alice's tables and Bob's clicks after the quantum channel.
struct Detected {
    bits: Zeroizing<Vec<u64>>,
    bases: Zeroizing<Vec<u64>>,
    clicks: Vec<u64>,
    bob_bases: Zeroizing<Vec<u8>>,
}

/// Step 3, sifting at Alice: which of Bob's clicks have matching bases (for Bob), and
/// Alice's bits there. Alice's bit tables are dropped (and wiped) here.
fn sift(detected: Detected) -> (Vec<u8>, Zeroizing<Vec<u8>>) {
    let Detected {
        bits,
        bases,
        clicks,
        bob_bases,
    } = detected;
    let matching: Vec<u8> = clicks
        .iter()
        .zip(bob_bases.iter())
        .map(|(&i, &b)| u8::from(sim::get(&bases, i) == b))
        .collect();
    let mut sifted = Zeroizing::new(Vec::with_capacity(clicks.len() / 2 + 1));
    sifted.extend(
        clicks
            .iter()
            .zip(&matching)
            .filter(|(_, &m)| m == 1)
            .map(|(&i, _)| sim::get(&bits, i)),
    );
    drop(bits);
    drop(bases);
    (matching, sifted)
}

/// Alice's parameter-estimation outcome.
#[derive(Debug, Clone, Copy)]
struct AliceEstimate {
    /// Sifted bits, sample included.
    sifted: usize,
    /// Sample bits.
    sample: usize,
    /// Errors in the sample.
    errors: u64,
    /// Estimated QBER.
    qber: f64,
}

/// The sample outcome Bob keeps for the frame.
#[derive(Debug, Clone, Copy)]
struct Estimate {
    sample: u64,
    errors: u64,
}

/// Bob's state of a frame in progress.
enum Stage {
    /// Measured; waiting for sifting.
    Measured(sim::Clicks),
    /// Sifted and sampled; waiting for Cascade.
    Sampled {
        key: Zeroizing<Vec<u8>>,
        est: Estimate,
    },
    /// In Cascade.
    Cascade {
        cascade: Box<CascadeBob>,
        est: Estimate,
    },
    /// Verified; waiting for privacy amplification.
    Verified {
        key: Zeroizing<Vec<u8>>,
        est: Estimate,
        leaked: u64,
    },
    /// Bob's own abort decision; the frame stays only to answer with the reason.
    Aborted { qber: f64 },
}

/// What one message does to the frame.
enum Next {
    Continue(Stage),
    Finished(Zeroizing<Vec<u8>>),
    Discard,
}

/// The receiving end: one per link at the far KME.
pub struct Bob {
    params: Bb84Params,
    rng: ChaCha20Rng,
    /// The frame in progress (a new frame discards an unfinished older one).
    current: Option<(Uuid, Stage)>,
    /// Finished keys waiting for [`Bob::take_key`], oldest first.
    finished: VecDeque<(Uuid, Zeroizing<Vec<u8>>)>,
    /// Test hook: flip one bit of the corrected key before verification.
    #[cfg(test)]
    corrupt_before_verify: bool,
}

impl std::fmt::Debug for Bob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bob")
            .field("params", &self.params)
            .field("current", &self.current.as_ref().map(|c| c.0))
            .field("finished", &self.finished.len())
            .finish_non_exhaustive()
    }
}

impl Bob {
    /// Checks the parameters and seeds Bob's generator from the OS.
    pub fn new(params: Bb84Params) -> Result<Self, Bb84Error> {
        params.validate()?;
        Ok(Bob {
            params,
            rng: os_rng()?,
            current: None,
            finished: VecDeque::new(),
            #[cfg(test)]
            corrupt_before_verify: false,
        })
    }

    pub fn params(&self) -> &Bb84Params {
        &self.params
    }

    /// Takes the final key of a finished frame (once; `None` if unknown or unfinished).
    pub fn take_key(&mut self, frame: Uuid) -> Option<Zeroizing<Vec<u8>>> {
        let i = self.finished.iter().position(|(id, _)| *id == frame)?;
        self.finished.remove(i).map(|(_, k)| k)
    }

    /// Handles one message. An error discards the frame it names (if it is the frame in
    /// progress).
    pub fn handle(&mut self, msg: ToBob) -> Result<FromBob, Bb84Error> {
        let frame = msg.frame();
        if let ToBob::Pulses {
            pulses,
            indices,
            bits,
            bases,
            ..
        } = &msg
        {
            return self.on_pulses(frame, *pulses, indices, bits, bases);
        }
        let stage = match self.current.take() {
            Some((id, stage)) if id == frame => stage,
            other => {
                self.current = other;
                if let ToBob::Abort { .. } = msg {
                    return Ok(FromBob::Aborted { frame });
                }
                return Err(protocol(format!("no frame {frame} in progress")));
            }
        };
        let (next, reply) = self.step(frame, stage, &msg)?;
        match next {
            Next::Continue(stage) => self.current = Some((frame, stage)),
            Next::Finished(key) => {
                self.finished.push_back((frame, key));
                while self.finished.len() > MAX_FINISHED {
                    if let Some((old, _)) = self.finished.pop_front() {
                        tracing::warn!(frame = %old, "BB84 key never taken; wiped");
                    }
                }
            }
            Next::Discard => {}
        }
        Ok(reply)
    }

    /// [`ToBob::Pulses`]: starts a new frame (dropping an unfinished older one) and measures
    /// the arriving pulses.
    fn on_pulses(
        &mut self,
        frame: Uuid,
        pulses: u64,
        indices: &PackedIndices,
        bits: &PackedBits,
        bases: &PackedBits,
    ) -> Result<FromBob, Bb84Error> {
        if self.current.as_ref().is_some_and(|c| c.0 == frame)
            || self.finished.iter().any(|(id, _)| *id == frame)
        {
            self.current = None;
            return Err(protocol(format!("frame {frame} already started")));
        }
        // A new frame: an unfinished older one is dropped (and wiped).
        self.current = None;
        if pulses == 0 || pulses > MAX_PULSES {
            return Err(protocol(format!("{pulses} pulses in a frame")));
        }
        let idx = indices.decode("arrivals", pulses, MAX_CLICKS as u64)?;
        let bits = bits.to_bits("arriving bits", Some(idx.len()))?;
        let bases = bases.to_bits("arriving bases", Some(idx.len()))?;
        let clicks = sim::detect(
            &idx,
            &bits,
            &bases,
            pulses,
            self.params.device.dark_count_probability,
            MAX_CLICKS,
            &mut self.rng,
        )
        .ok_or_else(|| protocol("too many clicks"))?;
        let reply = FromBob::Clicks {
            frame,
            indices: PackedIndices::encode(&clicks.indices),
            bases: PackedBits::from_bits(clicks.bases.iter().copied()),
        };
        self.current = Some((frame, Stage::Measured(clicks)));
        Ok(reply)
    }

    /// One step of the frame in progress; the stage is consumed (an error drops it).
    fn step(
        &mut self,
        frame: Uuid,
        stage: Stage,
        msg: &ToBob,
    ) -> Result<(Next, FromBob), Bb84Error> {
        match (stage, msg) {
            (_, ToBob::Abort { .. }) => Ok((Next::Discard, FromBob::Aborted { frame })),
            (Stage::Aborted { qber }, _) => Err(Bb84Error::Aborted { qber }),
            (
                Stage::Measured(clicks),
                ToBob::Sift {
                    matching,
                    sample,
                    sample_bits,
                    ..
                },
            ) => self.on_sift(frame, clicks, matching, sample, sample_bits),
            (
                stage @ (Stage::Sampled { .. } | Stage::Cascade { .. }),
                ToBob::CascadePass {
                    pass,
                    block_size,
                    seed,
                    parities,
                    ..
                },
            ) => {
                let seed = seed.as_deref();
                Self::on_cascade_pass(frame, stage, *pass, *block_size, seed, parities)
            }
            (Stage::Cascade { cascade, est }, ToBob::Parities { parities, .. }) => {
                Self::on_parities(frame, cascade, est, parities)
            }
            (Stage::Cascade { cascade, est }, ToBob::Verify { hash_key, tag, .. }) => {
                self.on_verify(frame, cascade, est, *hash_key, *tag)
            }
            (
                Stage::Verified { key, est, leaked },
                ToBob::Amplify {
                    final_bits, seed, ..
                },
            ) => self.on_amplify(frame, key, est, leaked, *final_bits, seed),
            (_, other) => Err(protocol(format!(
                "message out of order in frame {frame}: {}",
                other.kind()
            ))),
        }
    }

    /// [`ToBob::Sift`]: keeps the bits where the bases match, compares the sample and
    /// decides on Bob's own abort.
    fn on_sift(
        &self,
        frame: Uuid,
        clicks: sim::Clicks,
        matching: &PackedBits,
        sample: &PackedBits,
        sample_bits: &PackedBits,
    ) -> Result<(Next, FromBob), Bb84Error> {
        let matching = matching.to_bits("matching", Some(clicks.indices.len()))?;
        let mut sifted = Zeroizing::new(Vec::with_capacity(clicks.bits.len() / 2 + 1));
        sifted.extend(
            clicks
                .bits
                .iter()
                .zip(matching.iter())
                .filter(|(_, &m)| m == 1)
                .map(|(&b, _)| b),
        );
        drop(clicks);
        let in_sample = sample.to_bits("sample", Some(sifted.len()))?;
        let k = in_sample.iter().filter(|&&m| m == 1).count();
        if k == 0 || k == sifted.len() {
            return Err(protocol("the sample must be a proper, non-empty subset"));
        }
        let theirs = sample_bits.to_bits("sample bits", Some(k))?;
        let mut mine = Zeroizing::new(Vec::with_capacity(k));
        let mut key = Zeroizing::new(Vec::with_capacity(sifted.len() - k));
        for (&b, &m) in sifted.iter().zip(in_sample.iter()) {
            if m == 1 {
                mine.push(b);
            } else {
                key.push(b);
            }
        }
        let errors = mine
            .iter()
            .zip(theirs.iter())
            .filter(|(a, b)| a != b)
            .count();
        let qber = errors as f64 / k as f64;
        let reply = FromBob::Sample {
            frame,
            bits: PackedBits::from_bits(mine.iter().copied()),
        };
        let est = Estimate {
            sample: k as u64,
            errors: errors as u64,
        };
        if qber > self.params.abort_qber {
            return Ok((Next::Continue(Stage::Aborted { qber }), reply));
        }
        Ok((Next::Continue(Stage::Sampled { key, est }), reply))
    }

    /// [`ToBob::CascadePass`]: starts Cascade at pass 0 (with the seed) or the next pass,
    /// and asks for the first batch of parities.
    fn on_cascade_pass(
        frame: Uuid,
        stage: Stage,
        pass: u32,
        block_size: u32,
        seed: Option<&str>,
        parities: &PackedBits,
    ) -> Result<(Next, FromBob), Bb84Error> {
        let (mut cascade, est) = match (stage, seed) {
            (Stage::Sampled { key, est }, Some(seed)) if pass == 0 => {
                let seed = wire::decode_seed("cascade seed", seed)?;
                (Box::new(CascadeBob::new(key, seed)), est)
            }
            (Stage::Cascade { cascade, est }, None) if pass as usize == cascade.passes() => {
                (cascade, est)
            }
            _ => return Err(protocol(format!("unexpected Cascade pass {pass}"))),
        };
        let n = cascade.key().len();
        let parities = parities.to_bits(
            "block parities",
            Some(n.div_ceil(block_size.max(1) as usize)),
        )?;
        let queries = cascade.start_pass(block_size, &parities)?;
        let reply = FromBob::Cascade {
            frame,
            queries: PackedQueries::encode(&queries),
        };
        Ok((Next::Continue(Stage::Cascade { cascade, est }), reply))
    }

    /// [`ToBob::Parities`]: Alice's answers to the pending queries; asks for the next batch.
    fn on_parities(
        frame: Uuid,
        mut cascade: Box<CascadeBob>,
        est: Estimate,
        parities: &PackedBits,
    ) -> Result<(Next, FromBob), Bb84Error> {
        if cascade.idle() {
            return Err(protocol("parities while no query is pending"));
        }
        let parities = parities.to_bits("parities", None)?;
        let queries = cascade.answer(&parities)?;
        let reply = FromBob::Cascade {
            frame,
            queries: PackedQueries::encode(&queries),
        };
        Ok((Next::Continue(Stage::Cascade { cascade, est }), reply))
    }

    /// [`ToBob::Verify`]: ends Cascade and compares Alice's tag with Bob's; a mismatch
    /// discards the frame.
    fn on_verify(
        &self,
        frame: Uuid,
        cascade: Box<CascadeBob>,
        est: Estimate,
        hash_key: u64,
        tag: u64,
    ) -> Result<(Next, FromBob), Bb84Error> {
        if !cascade.idle() || cascade.passes() == 0 {
            return Err(protocol("verification before Cascade finished"));
        }
        #[cfg(test)]
        let cascade = {
            let mut c = cascade;
            if self.corrupt_before_verify {
                if let Some(b) = c.key_mut().first_mut() {
                    *b ^= 1;
                }
            }
            c
        };
        let (leaked, corrected) = (cascade.leaked, cascade.corrected);
        let key = (*cascade).into_key();
        let words = toeplitz::pack(&key);
        let ok = toeplitz::poly_tag(hash_key, &words, key.len()) == tag;
        let reply = FromBob::Verified {
            frame,
            ok,
            corrected,
        };
        if !ok {
            return Ok((Next::Discard, reply));
        }
        Ok((Next::Continue(Stage::Verified { key, est, leaked }), reply))
    }

    /// [`ToBob::Amplify`]: checks the final length against Bob's own bound and computes the
    /// final key.
    fn on_amplify(
        &self,
        frame: Uuid,
        key: Zeroizing<Vec<u8>>,
        est: Estimate,
        leaked: u64,
        final_bits: u64,
        seed: &PackedBits,
    ) -> Result<(Next, FromBob), Bb84Error> {
        let n = key.len() as u64;
        let (_, bound) = secure_length(
            n,
            est.sample,
            est.errors,
            leaked,
            toeplitz::TAG_BITS,
            self.params.epsilon_pa,
        );
        let l = final_bits;
        if l == 0 || !l.is_multiple_of(8) || l > n || (l as i64) > bound {
            return Err(protocol(format!(
                "final length {l} (bound {bound} for {n} bits)"
            )));
        }
        let seed_bits = (n + l - 1) as usize;
        let seed = seed.to_words("toeplitz seed", Some(seed_bits))?;
        let words = toeplitz::pack(&key);
        let out = toeplitz::toeplitz(&seed, &words, n as usize, l as usize);
        let bytes = toeplitz::to_bytes(&out, l as usize);
        Ok((
            Next::Finished(bytes),
            FromBob::Done {
                frame,
                final_bits: l,
            },
        ))
    }
}

#[cfg(test)]
mod tests;
