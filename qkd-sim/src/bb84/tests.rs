//! End-to-end tests of a frame: Alice and an in-process Bob, with every message passed
//! through JSON as it would cross the KME-to-KME channel.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use super::*;

/// Polls a future that never waits (the loopback channel is synchronous).
fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = pin!(f);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return v;
        }
    }
}

fn json<T: Serialize + serde::de::DeserializeOwned>(v: &T) -> Result<T, Bb84Error> {
    let s = serde_json::to_string(v).map_err(|e| Bb84Error::Channel(e.to_string()))?;
    serde_json::from_str(&s).map_err(|e| Bb84Error::Channel(e.to_string()))
}

struct Loopback<'a> {
    bob: &'a mut Bob,
}

impl Channel for Loopback<'_> {
    fn exchange(&mut self, msg: ToBob) -> impl Future<Output = Result<FromBob, Bb84Error>> + Send {
        let reply = json(&msg)
            .and_then(|m| self.bob.handle(m))
            .and_then(|r| json(&r));
        std::future::ready(reply)
    }
}

fn params(length_km: f64) -> Bb84Params {
    Bb84Params {
        length_km,
        ..Bb84Params::default()
    }
}

fn run(alice: &mut Alice, bob: &mut Bob) -> Result<FrameOutcome, Bb84Error> {
    block_on(alice.run_frame(&mut Loopback { bob }))
}

/// Runs frames and checks that both ends hold the same key.
fn agreeing_frames(p: Bb84Params, frames: usize) -> Vec<FrameStats> {
    let mut alice = Alice::new(p).unwrap();
    let mut bob = Bob::new(p).unwrap();
    (0..frames)
        .map(|_| {
            let out = run(&mut alice, &mut bob).unwrap_or_else(|e| panic!("frame failed: {e}"));
            assert!(out.stats.final_bits > 0, "{:?}", out.stats);
            assert_eq!(out.key.len() as u64 * 8, out.stats.final_bits);
            let theirs = bob.take_key(out.frame).expect("Bob holds the frame's key");
            assert!(theirs[..] == out.key[..], "the two ends' keys differ");
            assert!(bob.take_key(out.frame).is_none(), "a key is taken once");
            out.stats
        })
        .collect()
}

#[test]
fn both_ends_hold_the_same_key_at_10_km() {
    for s in agreeing_frames(params(10.0), 3) {
        assert!((150_000..250_000).contains(&s.sifted_bits), "{s:?}");
        assert!(s.round_trips < 250, "{s:?}");
        assert!(s.final_bits > 40_000, "{s:?}");
    }
}

#[test]
fn both_ends_hold_the_same_key_at_50_km() {
    for s in agreeing_frames(params(50.0), 3) {
        assert!((20_000..40_000).contains(&s.sifted_bits), "{s:?}");
    }
}

#[test]
fn estimated_qber_matches_the_model_at_10_km() {
    let p = params(10.0);
    let model = p.device.evaluate(p.length_km, 0.0, p.abort_qber).qber;
    let s = &agreeing_frames(p, 1)[0];
    // Sample of ~18.6 k bits: standard deviation ≈ 0.001.
    assert!(
        (s.qber - model).abs() < 0.005,
        "estimated {} vs model {model}",
        s.qber
    );
    assert!(
        (s.actual_qber - model).abs() < 0.002,
        "actual {} vs model {model}",
        s.actual_qber
    );
    // Detections follow the model's gain Q_μ = Y0 + 1 − e^(−ημ).
    let eta = sim::transmittance(&p);
    let q = p.device.dark_count_probability + 1.0 - (-eta * p.device.mean_photon_number).exp();
    let expect = q * p.pulses_per_frame as f64;
    assert!(
        (s.detections as f64 - expect).abs() < 5.0 * expect.sqrt(),
        "{} detections vs {expect}",
        s.detections
    );
}

#[test]
fn the_final_length_shrinks_as_noise_grows() {
    let finals: Vec<u64> = [0.01, 0.03, 0.05]
        .iter()
        .map(|&e_d| {
            let mut p = params(10.0);
            p.device.misalignment = e_d;
            agreeing_frames(p, 1)[0].final_bits
        })
        .collect();
    assert!(
        finals[0] > finals[1] && finals[1] > finals[2],
        "final bits {finals:?}"
    );
}

#[test]
fn a_full_intercept_resend_attack_aborts_with_a_quarter_qber() {
    let mut p = params(10.0);
    p.eavesdropper = 1.0;
    let mut alice = Alice::new(p).unwrap();
    let mut bob = Bob::new(p).unwrap();
    match run(&mut alice, &mut bob) {
        Err(Bb84Error::Aborted { qber }) => {
            // e = 1/4 + e_d/2 with e_d = 0.02.
            assert!((qber - 0.25).abs() < 0.025, "qber {qber}");
        }
        other => panic!("expected an abort, got {other:?}"),
    }
    assert!(bob.current.is_none(), "Bob dropped the aborted frame");
}

#[test]
fn a_partial_attack_raises_the_qber_by_a_twentieth() {
    let clean = agreeing_frames(params(10.0), 1)[0].actual_qber;
    let mut p = params(10.0);
    p.eavesdropper = 0.2;
    let s = &agreeing_frames(p, 1)[0];
    let rise = s.actual_qber - clean;
    assert!(
        (rise - 0.05).abs() < 0.01,
        "QBER {clean} → {}",
        s.actual_qber
    );
    assert!((s.qber - s.actual_qber).abs() < 0.01, "{s:?}");
    assert!(s.simulated_intercepted > 0);
}

#[test]
fn verification_catches_a_corrupted_key() {
    let p = params(50.0);
    let mut alice = Alice::new(p).unwrap();
    let mut bob = Bob::new(p).unwrap();
    bob.corrupt_before_verify = true;
    match run(&mut alice, &mut bob) {
        Err(Bb84Error::VerificationFailed) => {}
        other => panic!("expected a verification failure, got {other:?}"),
    }
    assert!(bob.current.is_none() && bob.finished.is_empty());
    bob.corrupt_before_verify = false;
    agreeing_frames(p, 1);
}

#[test]
fn malformed_and_out_of_order_messages_are_errors() {
    let p = Bb84Params {
        pulses_per_frame: 200_000,
        ..params(10.0)
    };
    let mut bob = Bob::new(p).unwrap();
    let frame = Uuid::new_v4();
    let bits = |n: usize| PackedBits::from_bits(std::iter::repeat_n(0u8, n));
    // Before any frame.
    for msg in [
        ToBob::Parities {
            frame,
            parities: bits(3),
        },
        ToBob::Verify {
            frame,
            hash_key: 1,
            tag: 2,
        },
    ] {
        assert!(matches!(bob.handle(msg), Err(Bb84Error::Protocol(_))));
    }
    // Malformed pulses.
    let bad = [
        ToBob::Pulses {
            frame,
            pulses: 10,
            indices: PackedIndices::encode(&[3, 20]),
            bits: bits(2),
            bases: bits(2),
        },
        ToBob::Pulses {
            frame,
            pulses: 100,
            indices: PackedIndices::encode(&[3, 20]),
            bits: bits(3),
            bases: bits(2),
        },
        ToBob::Pulses {
            frame,
            pulses: 100,
            indices: PackedIndices {
                count: 2,
                b64: "not base64!".into(),
            },
            bits: bits(2),
            bases: bits(2),
        },
        ToBob::Pulses {
            frame,
            pulses: 0,
            indices: PackedIndices::encode(&[]),
            bits: bits(0),
            bases: bits(0),
        },
    ];
    for msg in bad {
        assert!(matches!(bob.handle(msg), Err(Bb84Error::Protocol(_))));
    }
    // A good start, then messages out of order or with wrong lengths.
    let start = || ToBob::Pulses {
        frame,
        pulses: 100,
        indices: PackedIndices::encode(&[1, 5, 9, 50]),
        bits: bits(4),
        bases: bits(4),
    };
    let Ok(FromBob::Clicks { indices, .. }) = bob.handle(start()) else {
        panic!("a valid start");
    };
    let clicks = indices.decode("t", 100, 100).unwrap().len();
    assert!(
        bob.handle(ToBob::Verify {
            frame,
            hash_key: 1,
            tag: 2
        })
        .is_err(),
        "verify before sifting"
    );
    assert!(bob.current.is_none(), "an error drops the frame");
    assert!(bob.handle(start()).is_ok(), "the frame can start again");
    let wrong = ToBob::Sift {
        frame,
        matching: bits(clicks + 1),
        sample: bits(0),
        sample_bits: bits(0),
    };
    assert!(matches!(bob.handle(wrong), Err(Bb84Error::Protocol(_))));
    assert!(bob.handle(start()).is_ok());
    assert!(
        matches!(bob.handle(start()), Err(Bb84Error::Protocol(_))),
        "duplicate frame"
    );
    // A reply to another frame confuses no one: JSON garbage does not parse.
    assert!(serde_json::from_str::<ToBob>(r#"{"type":"sift","frame":"x"}"#).is_err());
    assert!(serde_json::from_str::<ToBob>(r#"{"type":"launch"}"#).is_err());
    // Abort of an unknown frame is acknowledged.
    assert!(matches!(
        bob.handle(ToBob::Abort {
            frame: Uuid::new_v4(),
            reason: String::new()
        }),
        Ok(FromBob::Aborted { .. })
    ));
}

#[test]
fn a_new_frame_discards_an_unfinished_one() {
    let p = params(10.0);
    let mut bob = Bob::new(p).unwrap();
    let start = |frame| ToBob::Pulses {
        frame,
        pulses: 1000,
        indices: PackedIndices::encode(&[1, 2, 3]),
        bits: PackedBits::from_bits([0, 1, 0]),
        bases: PackedBits::from_bits([1, 1, 0]),
    };
    let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
    bob.handle(start(a)).unwrap();
    bob.handle(start(b)).unwrap();
    let sift = ToBob::Sift {
        frame: a,
        matching: PackedBits::from_bits([1, 1, 1]),
        sample: PackedBits::from_bits([1, 0, 0]),
        sample_bits: PackedBits::from_bits([0]),
    };
    assert!(bob.handle(sift).is_err());
    assert_eq!(bob.current.as_ref().map(|c| c.0), Some(b));
}

#[test]
fn parameters_are_checked_and_run_frame_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let p = params(10.0);
    let mut alice = Alice::new(p).unwrap();
    let mut bob = Bob::new(p).unwrap();
    let mut ch = Loopback { bob: &mut bob };
    let fut = alice.run_frame(&mut ch);
    assert_send(&fut);
    drop(fut);
    for bad in [
        Bb84Params {
            sample_fraction: 1.0,
            ..p
        },
        Bb84Params {
            cascade_passes: 0,
            ..p
        },
        Bb84Params {
            eavesdropper: 1.5,
            ..p
        },
        Bb84Params {
            pulses_per_frame: 0,
            ..p
        },
    ] {
        assert!(Alice::new(bad).is_err() && Bob::new(bad).is_err());
    }
}

#[test]
fn the_secure_length_falls_with_errors_and_leak() {
    let (e1, l1) = secure_length(100_000, 10_000, 200, 15_000, 64, 1e-10);
    let (e2, l2) = secure_length(100_000, 10_000, 400, 15_000, 64, 1e-10);
    let (_, l3) = secure_length(100_000, 10_000, 200, 20_000, 64, 1e-10);
    assert!(e1 > 0.02 && e2 > e1);
    assert!(l1 > l2 && l1 > l3 && l1 - l3 == 5_000);
    assert!(secure_length(100_000, 10_000, 2_000, 60_000, 64, 1e-10).1 < 0);
    assert_eq!(sample_size(186_000, 0.1), 18_600);
    assert_eq!(sample_size(10_000, 0.1), 2_000);
    assert_eq!(sample_size(100, 0.1), 25);
}
