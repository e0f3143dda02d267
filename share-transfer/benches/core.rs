//! Throughput table for the sharing core, OTP and MAC (one thread).
//!
//! Run: `cargo bench -p share-transfer --bench core`. Each figure is the median of several
//! runs; "GB/s" is 10^9 bytes of *secret* (or message) per second.

use std::hint::black_box;
use std::time::Instant;

use share_transfer::auth::{Mac, KEY_LEN};
use share_transfer::otp;
use sharing::rng::{ChaChaRounds, ChaChaSource, OsSource, RandomSource, RngError, Secrecy};
use sharing::{split_stream, Combiner, Scheme, Splitter};

const SECRET_LEN: usize = 64 << 20;
const RUNS: usize = 5;

/// Leaves the pad buffer as it is: measures the sharing arithmetic without randomness.
struct NoRng;

impl RandomSource for NoRng {
    fn fill(&mut self, _buf: &mut [u8]) -> Result<(), RngError> {
        Ok(())
    }
    fn secrecy(&self) -> Secrecy {
        Secrecy::Computational
    }
}

fn data(len: usize, seed: u8) -> Vec<u8> {
    let mut src = ChaChaSource::from_seed(ChaChaRounds::R8, [seed; 32]);
    let mut v = vec![0u8; len];
    src.fill(&mut v).expect("chacha cannot fail");
    v
}

/// Median GB/s of `RUNS` runs of `f`, each processing `bytes` bytes.
fn measure(bytes: usize, mut f: impl FnMut()) -> f64 {
    f(); // warm-up (page faults, caches)
    let mut rates: Vec<f64> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            f();
            bytes as f64 / t.elapsed().as_secs_f64() / 1e9
        })
        .collect();
    rates.sort_by(f64::total_cmp);
    rates[RUNS / 2]
}

fn row(name: &str, gbps: f64, note: &str) {
    println!("| {name:<48} | {gbps:>8.3} | {note} |");
}

fn split_all<R: RandomSource>(sp: &mut Splitter<R>, secret: &[u8], shares: &mut [Vec<u8>]) {
    let cs = sp.chunk_size();
    for (c, chunk) in secret.chunks_exact(cs).enumerate() {
        let mut views: Vec<&mut [u8]> = shares
            .iter_mut()
            .map(|s| &mut s[c * cs..(c + 1) * cs])
            .collect();
        sp.split_chunk(chunk, &mut views).expect("split");
    }
    black_box(&shares);
}

fn combine_all(c: &Combiner, cs: usize, shares: &[&[u8]], out: &mut [u8]) {
    let mut views: Vec<&[u8]> = Vec::with_capacity(shares.len());
    for (i, o) in out.chunks_exact_mut(cs).enumerate() {
        views.clear();
        views.extend(shares.iter().map(|s| &s[i * cs..(i + 1) * cs]));
        c.combine_chunk(&views, o).expect("combine");
    }
    black_box(&out);
}

/// Chunk size: `scheme.default_chunk_size()` (~1 MiB), or about `BENCH_CHUNK_KIB` KiB.
fn chunk_size(scheme: Scheme) -> usize {
    match std::env::var("BENCH_CHUNK_KIB")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
    {
        Some(kib) => {
            let unit = 64 * scheme.pieces_per_chunk();
            ((kib << 10) / unit).max(1) * unit
        }
        None => scheme.default_chunk_size(),
    }
}

fn bench_scheme(scheme: Scheme, secret: &[u8]) -> f64 {
    let cs = chunk_size(scheme);
    let len = secret.len() / cs * cs;
    let secret = &secret[..len];
    let n = usize::from(scheme.n());
    let k = usize::from(scheme.k());
    let mut shares = vec![vec![0u8; len]; n];
    let label = format!("{:?} ({},{})", scheme.kind(), scheme.k(), scheme.n());

    let mut sp = Splitter::new(scheme, cs, NoRng).expect("splitter");
    let no_rng = measure(len, || split_all(&mut sp, secret, &mut shares));
    row(
        &format!("{label} split, no RNG"),
        no_rng,
        "into n x 64 MiB arrays (DRAM-bound)",
    );

    // Streaming reality: shares go to n reused chunk buffers (cache-resident), as in
    // split_stream, instead of n freshly written 64 MiB arrays (DRAM write-allocate bound).
    let mut chunk_bufs = vec![vec![0u8; cs]; n];
    let mut sp = Splitter::new(scheme, cs, NoRng).expect("splitter");
    let r = measure(len, || {
        for chunk in secret.chunks_exact(cs) {
            sp.split_chunk(chunk, &mut chunk_bufs).expect("split");
            black_box(&chunk_bufs);
        }
    });
    row(
        &format!("{label} split, no RNG, reused chunk bufs"),
        r,
        "cache-resident outputs",
    );
    let mut sp = Splitter::new(
        scheme,
        cs,
        ChaChaSource::from_os(ChaChaRounds::R12).expect("seed"),
    )
    .expect("splitter");
    let r = measure(len, || {
        for chunk in secret.chunks_exact(cs) {
            sp.split_chunk(chunk, &mut chunk_bufs).expect("split");
            black_box(&chunk_bufs);
        }
    });
    row(
        &format!("{label} split incl. ChaCha12, reused bufs"),
        r,
        "cache-resident outputs",
    );

    let mut result = 0.0;
    for (rounds, name) in [
        (ChaChaRounds::R12, "ChaCha12 (default)"),
        (ChaChaRounds::R8, "ChaCha8"),
    ] {
        let rng = ChaChaSource::from_os(rounds).expect("seed");
        let mut sp = Splitter::new(scheme, cs, rng).expect("splitter");
        let r = measure(len, || split_all(&mut sp, secret, &mut shares));
        row(&format!("{label} split incl. {name}"), r, "");
        if rounds == ChaChaRounds::R12 {
            result = r;
        }
    }
    // Correct shares for combining.
    let mut sp = Splitter::new(
        scheme,
        cs,
        ChaChaSource::from_os(ChaChaRounds::R8).expect("seed"),
    )
    .expect("splitter");
    split_all(&mut sp, secret, &mut shares);
    let mut out = vec![0u8; len];
    // Worst-case-ish subset: the last k shares.
    let idx: Vec<u8> = (n - k..n).map(|i| i as u8).collect();
    let c = Combiner::new(scheme, cs, &idx).expect("combiner");
    let picked: Vec<&[u8]> = idx
        .iter()
        .map(|&i| shares[usize::from(i)].as_slice())
        .collect();
    let r = measure(len, || combine_all(&c, cs, &picked, &mut out));
    assert!(out == secret, "combine mismatch");
    row(&format!("{label} combine, shares {idx:?}"), r, "");
    result
}

fn main() {
    println!(
        "sharing + share-transfer core benchmark: {} MiB secret, ~1 MiB chunks, 1 thread, median of {RUNS}",
        SECRET_LEN >> 20
    );
    println!("GF(2^8) kernel: {:?}", sharing::gf256::Kernel::detect());
    println!();
    println!("| {:<48} | {:>8} | note |", "measurement", "GB/s");
    println!("|{}|{}|------|", "-".repeat(50), "-".repeat(10));
    let secret = data(SECRET_LEN, 1);

    for (rounds, name) in [
        (ChaChaRounds::R8, "ChaCha8"),
        (ChaChaRounds::R12, "ChaCha12"),
        (ChaChaRounds::R20, "ChaCha20"),
    ] {
        let mut rng = ChaChaSource::from_os(rounds).expect("seed");
        let mut buf = vec![0u8; 1 << 20];
        let r = measure(SECRET_LEN, || {
            for _ in 0..SECRET_LEN >> 20 {
                rng.fill(&mut buf).expect("fill");
            }
            black_box(&buf);
        });
        row(
            &format!("RNG {name} fill (1 MiB calls)"),
            r,
            "randomness alone",
        );
    }
    let mut os = OsSource;
    let mut buf = vec![0u8; 1 << 20];
    let r = measure(16 << 20, || {
        for _ in 0..16 {
            os.fill(&mut buf).expect("fill");
        }
    });
    row("RNG OS getrandom fill (1 MiB calls)", r, "randomness alone");

    let xor23 = bench_scheme(Scheme::xor(2, 3).expect("valid"), &secret);
    bench_scheme(Scheme::xor(3, 5).expect("valid"), &secret);
    bench_scheme(Scheme::xor(4, 7).expect("valid"), &secret);
    let shamir23 = bench_scheme(Scheme::shamir(2, 3).expect("valid"), &secret);

    // End to end through the share file format (BLAKE3 digest, headers, Vec outputs).
    let scheme = Scheme::xor(2, 3).expect("valid");
    let mut outs: Vec<Vec<u8>> = (0..3)
        .map(|_| Vec::with_capacity(SECRET_LEN + 4096))
        .collect();
    let r = measure(SECRET_LEN, || {
        for o in outs.iter_mut() {
            o.clear();
        }
        let rng = ChaChaSource::from_os(ChaChaRounds::R12).expect("seed");
        split_stream(
            scheme,
            scheme.default_chunk_size(),
            rng,
            secret.as_slice(),
            &mut outs,
        )
        .expect("split");
    });
    row(
        "Xor (2,3) split_stream incl. ChaCha12+BLAKE3",
        r,
        "to in-memory share files",
    );
    let mut back = Vec::with_capacity(SECRET_LEN);
    let r = measure(SECRET_LEN, || {
        back.clear();
        let mut readers: Vec<&[u8]> = outs[1..].iter().map(Vec::as_slice).collect();
        sharing::combine_stream(&mut readers, &mut back).expect("combine");
    });
    assert!(back == secret);
    row(
        "Xor (2,3) combine_stream incl. BLAKE3 verify",
        r,
        "shares 1,2",
    );

    let mut data_buf = secret.clone();
    let key = data(SECRET_LEN, 2);
    let r = measure(SECRET_LEN, || {
        for (d, k) in data_buf.chunks_mut(1 << 20).zip(key.chunks(1 << 20)) {
            otp::apply(d, k).expect("lengths");
        }
        black_box(&data_buf);
    });
    row("OTP XOR in place (1 MiB chunks)", r, "");
    let mut padded = vec![0u8; 1 << 20];
    let r = measure(SECRET_LEN, || {
        for (d, k) in secret.chunks(1 << 20).zip(key.chunks(1 << 20)) {
            otp::apply_into(&mut padded[..d.len()], d, k).expect("lengths");
            black_box(&padded);
        }
    });
    row(
        "OTP XOR into a buffer (1 MiB chunks)",
        r,
        "as seal/open pad",
    );

    let mac_key = data(KEY_LEN, 3);
    let r = measure(SECRET_LEN, || {
        let mut m = Mac::new(&mac_key).expect("key");
        for c in secret.chunks(1 << 20) {
            m.update(c);
        }
        black_box(m.finalize());
    });
    row("MAC POLYVAL Wegman-Carter (streaming)", r, "");

    // crates.io baseline: blahaj 0.7 (byte-wise Shamir), on a 1 MiB secret.
    let small = &secret[..1 << 20];
    let sharks = blahaj::Sharks(2);
    let r_blahaj = measure(small.len(), || {
        let shares: Vec<blahaj::Share> = sharks.dealer(small).take(3).collect();
        black_box(shares);
    });
    row(
        "blahaj 0.7 Shamir (2,3) split, 1 MiB",
        r_blahaj,
        "crates.io baseline",
    );
    let shares: Vec<blahaj::Share> = sharks.dealer(small).take(3).collect();
    let r = measure(small.len(), || {
        black_box(sharks.recover(&shares[1..]).expect("recover"));
    });
    row(
        "blahaj 0.7 Shamir (2,3) recover, 1 MiB",
        r,
        "crates.io baseline",
    );

    println!();
    println!(
        "ratio: our XOR (2,3) split incl. ChaCha12 / blahaj split = {:.0}x; our Shamir (2,3) split incl. ChaCha12 / blahaj = {:.0}x",
        xor23 / r_blahaj,
        shamir23 / r_blahaj
    );
}
