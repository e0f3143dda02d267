//! A fast, deterministic generator of synthetic FASTQ: genome-like test files of any size.
//!
//! Records look like Illumina reads:
//!
//! ```text
//! @SIM:1:FCX:1:<tile>:<x>:<y> 1:N:0:ACGT
//! <150 bases of ACGT, now and then an N>
//! +
//! <150 quality characters in '!'..='J', mostly high, falling towards the end of the read>
//! ```
//!
//! The output is cut to exactly the requested size (the last record is truncated). The same
//! seed always gives the same bytes. A wyrand generator makes 8 or more symbols per random
//! `u64`, records are assembled in a 4 MiB buffer, so generation runs well above 500 MB/s.

use std::io::{self, Write};
use std::path::Path;

/// Bases per read.
pub const READ_LEN: usize = 150;
/// Size of the buffer records are assembled in before they are written.
pub const BUF_BYTES: usize = 4 << 20;
/// Longest record: header (at most ~60 bytes) + read + "+" + qualities, with slack.
const MAX_RECORD: usize = 96 + 2 * READ_LEN + 4;

/// wyrand: a tiny, fast 64-bit PRNG (not cryptographic).
#[derive(Debug, Clone)]
struct WyRand(u64);

impl WyRand {
    #[inline(always)]
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0xa076_1d64_78bd_642f);
        let t = u128::from(self.0) * u128::from(self.0 ^ 0xe703_7ed1_a0b4_28db);
        ((t >> 64) ^ t) as u64
    }

    /// Uniform-ish in `0..n` (multiply-shift; bias irrelevant here).
    #[inline(always)]
    fn below(&mut self, n: u32) -> u32 {
        (((self.next() >> 32) * u64::from(n)) >> 32) as u32
    }
}

/// Two quality tables of 256 entries each: one byte of randomness picks one quality character.
/// `[0]` for the body of a read, `[1]` for its last ~20 cycles, where quality drops.
fn quality_tables() -> [[u8; 256]; 2] {
    // Weights over Q0..=Q41 ('!'..='J'), summing to 256: most calls are Q30+, a tail of low
    // scores and Q2 ('#'), as in real Illumina output.
    fn table(weights: &[(u8, u32)]) -> [u8; 256] {
        let total: u32 = weights.iter().map(|w| w.1).sum();
        assert_eq!(total, 256, "quality weights must sum to 256");
        let mut t = [0u8; 256];
        let mut i = 0;
        for &(q, w) in weights {
            for _ in 0..w {
                t[i] = b'!' + q;
                i += 1;
            }
        }
        t
    }
    let body = table(&[
        (41, 70),
        (40, 46),
        (39, 34),
        (38, 26),
        (37, 20),
        (36, 14),
        (35, 10),
        (34, 7),
        (33, 5),
        (32, 4),
        (30, 4),
        (28, 3),
        (25, 3),
        (22, 2),
        (18, 2),
        (14, 2),
        (10, 1),
        (2, 3),
    ]);
    let tail = table(&[
        (41, 32),
        (40, 22),
        (39, 22),
        (38, 20),
        (37, 20),
        (36, 18),
        (35, 16),
        (34, 14),
        (33, 12),
        (32, 12),
        (30, 12),
        (28, 10),
        (25, 10),
        (22, 8),
        (18, 8),
        (14, 8),
        (10, 6),
        (5, 2),
        (2, 4),
    ]);
    [body, tail]
}

/// Four bases per byte of randomness.
fn base_table() -> [[u8; 4]; 256] {
    const ACGT: [u8; 4] = *b"ACGT";
    let mut t = [[0u8; 4]; 256];
    for (b, e) in t.iter_mut().enumerate() {
        for (j, c) in e.iter_mut().enumerate() {
            *c = ACGT[(b >> (2 * j)) & 3];
        }
    }
    t
}

#[inline(always)]
fn push_u32(buf: &mut Vec<u8>, mut v: u32) {
    let mut tmp = [0u8; 10];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    buf.extend_from_slice(&tmp[i..]);
}

/// Streams synthetic FASTQ records; see the module documentation.
pub struct FastqGen {
    rng: WyRand,
    bases: [[u8; 4]; 256],
    quals: [[u8; 256]; 2],
    tile: u32,
    y: u32,
    in_tile: u32,
}

impl FastqGen {
    pub fn new(seed: u64) -> Self {
        let mut rng = WyRand(seed ^ 0x5eed_fa57_9c0d_e000);
        rng.next();
        FastqGen {
            rng,
            bases: base_table(),
            quals: quality_tables(),
            tile: 1101,
            y: 1000,
            in_tile: 0,
        }
    }

    /// Appends one record to `buf`.
    pub fn push_record(&mut self, buf: &mut Vec<u8>) {
        // Flow-cell coordinates: y grows within a tile, x is anywhere across it.
        self.in_tile += 1;
        if self.in_tile > 400_000 {
            self.in_tile = 0;
            self.y = 1000;
            self.tile += 1;
            if self.tile % 100 > 28 {
                self.tile += 100 - self.tile % 100 + 1;
            }
        }
        self.y += 1 + self.rng.below(8);
        let x = 1000 + self.rng.below(31_000);

        buf.extend_from_slice(b"@SIM:1:FCX:1:");
        push_u32(buf, self.tile);
        buf.push(b':');
        push_u32(buf, x);
        buf.push(b':');
        push_u32(buf, self.y);
        buf.extend_from_slice(b" 1:N:0:ACGT\n");

        // Bases: 32 per u64 (4 per byte through the table).
        let seq_at = buf.len();
        let mut left = READ_LEN;
        while left > 0 {
            let r = self.rng.next().to_le_bytes();
            for b in r {
                let n = left.min(4);
                buf.extend_from_slice(&self.bases[b as usize][..n]);
                left -= n;
                if left == 0 {
                    break;
                }
            }
        }
        buf.extend_from_slice(b"\n+\n");

        // Qualities: 8 per u64; the last 20 cycles draw from the lower tail table.
        let qual_at = buf.len();
        let tail_from = READ_LEN - 20;
        let mut i = 0;
        while i < READ_LEN {
            let r = self.rng.next().to_le_bytes();
            for b in r {
                let t = usize::from(i >= tail_from);
                buf.push(self.quals[t][b as usize]);
                i += 1;
                if i == READ_LEN {
                    break;
                }
            }
        }
        buf.push(b'\n');

        // About one read in eight has a no-call: base N with quality '#' (Q2).
        let r = self.rng.next();
        if r & 7 == 0 {
            let pos = ((r >> 32) % READ_LEN as u64) as usize;
            buf[seq_at + pos] = b'N';
            buf[qual_at + pos] = b'#';
        }
    }

    /// Writes exactly `size` bytes of FASTQ to `w`, in writes of at most [`BUF_BYTES`]; every
    /// write but the last ends on a record boundary, and only the last record of the output
    /// can be truncated.
    pub fn write_to<W: Write>(&mut self, w: &mut W, size: u64) -> io::Result<()> {
        let mut buf = Vec::with_capacity(BUF_BYTES + MAX_RECORD);
        let mut left = size;
        while left > 0 {
            buf.clear();
            if left <= BUF_BYTES as u64 {
                let n = left as usize;
                while buf.len() < n {
                    self.push_record(&mut buf);
                }
                w.write_all(&buf[..n])?;
                left = 0;
            } else {
                while buf.len() + MAX_RECORD <= BUF_BYTES {
                    self.push_record(&mut buf);
                }
                w.write_all(&buf)?;
                left -= buf.len() as u64;
            }
        }
        Ok(())
    }
}

/// Writes a synthetic FASTQ file of exactly `size` bytes at `path` (replacing it), synced to
/// disk. Returns the number of bytes written.
pub fn write_file(path: &Path, size: u64, seed: u64) -> io::Result<u64> {
    let mut f = std::fs::File::create(path)?;
    FastqGen::new(seed).write_to(&mut f, size)?;
    f.sync_all()?;
    Ok(size)
}

/// Parses a size such as `1GiB`, `512MiB`, `100MB`, `4096`, `1.5G`, `64k`.
/// Binary units (KiB, MiB, GiB, TiB and the bare K, M, G, T) are powers of 1,024; KB, MB, GB,
/// TB are powers of 1,000.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '_'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let num: String = num.chars().filter(|&c| c != '_').collect();
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as 1GiB, 512MiB or 1000000"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024f64.powi(2),
        "g" | "gib" => 1024f64.powi(3),
        "t" | "tib" => 1024f64.powi(4),
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (use B, KiB, MiB, GiB, KB, MB, GB)"
            ))
        }
    };
    let v = n * mult;
    if !v.is_finite() || v < 0.0 || v > u64::MAX as f64 {
        return Err(format!("{s:?}: size out of range"));
    }
    Ok(v.round() as u64)
}

/// `1073741824` → `1.00 GiB`.
pub fn human_size(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.2} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gen(size: u64, seed: u64) -> Vec<u8> {
        let mut v = Vec::new();
        FastqGen::new(seed).write_to(&mut v, size).unwrap();
        v
    }

    #[test]
    fn exact_size() {
        for size in [0u64, 1, 7, 345, 1000, 4096, (BUF_BYTES as u64) * 2 + 12_345] {
            assert_eq!(gen(size, 1).len() as u64, size, "size {size}");
        }
    }

    #[test]
    fn deterministic() {
        let size = BUF_BYTES as u64 + 100_003;
        assert_eq!(gen(size, 42), gen(size, 42));
        assert_ne!(gen(10_000, 42), gen(10_000, 43));
        // A shorter file is a prefix of a longer one.
        let long = gen(BUF_BYTES as u64 * 2, 7);
        let short = gen(BUF_BYTES as u64 + 20_000, 7);
        assert_eq!(&long[..short.len()], &short[..]);
    }

    #[test]
    fn looks_like_fastq() {
        let size = BUF_BYTES as u64 * 2 + 777;
        let data = gen(size, 3);
        // Every chunk but the last ends on a record boundary, so only the last record of the
        // file may be incomplete.
        let text = std::str::from_utf8(&data).unwrap();
        let lines: Vec<&str> = text.split('\n').collect();
        let full = (lines.len() - 1) / 4; // complete records
        assert!(full > 10_000);
        let mut ns = 0;
        let mut high = 0usize;
        let mut quals = 0usize;
        for r in 0..full {
            let (h, s, p, q) = (
                lines[4 * r],
                lines[4 * r + 1],
                lines[4 * r + 2],
                lines[4 * r + 3],
            );
            assert!(h.starts_with("@SIM:1:FCX:1:"), "header {h:?}");
            assert!(h.ends_with(" 1:N:0:ACGT"), "header {h:?}");
            let coords: Vec<&str> = h["@SIM:1:FCX:1:".len()..h.len() - 11].split(':').collect();
            assert_eq!(coords.len(), 3, "{h:?}");
            assert!(coords.iter().all(|c| c.parse::<u32>().is_ok()), "{h:?}");
            assert_eq!(s.len(), READ_LEN);
            assert!(s.bytes().all(|b| b"ACGTN".contains(&b)), "{s:?}");
            ns += s.bytes().filter(|&b| b == b'N').count();
            assert_eq!(p, "+");
            assert_eq!(q.len(), READ_LEN);
            assert!(q.bytes().all(|b| (b'!'..=b'J').contains(&b)), "{q:?}");
            high += q.bytes().filter(|&b| b >= b'!' + 30).count();
            quals += q.len();
        }
        // About one read in eight carries an N.
        assert!(ns > full / 16 && ns < full / 4, "{ns} Ns in {full} reads");
        // Skewed high: most calls are Q30 or better, but not all.
        let frac = high as f64 / quals as f64;
        assert!(frac > 0.8 && frac < 0.99, "Q30+ fraction {frac}");
        // The last partial record is a prefix of a well-formed one.
        let rest = &lines[4 * full..];
        if let Some(h) = rest.first().filter(|h| !h.is_empty()) {
            assert!("@SIM:1:FCX:1:".starts_with(h) || h.starts_with("@SIM:1:FCX:1:"));
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("100MB").unwrap(), 100_000_000);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64 KiB").unwrap(), 65_536);
        assert!(parse_size("lots").is_err());
        assert!(parse_size("1XB").is_err());
        assert_eq!(human_size(1 << 30), "1.00 GiB");
    }
}
