//! Sources of the random pads used by the sharing schemes.
//!
//! The secrecy of a share set is only as good as its randomness:
//!
//! * [`ChaChaSource`] — a ChaCha stream cipher keyed with 32 bytes from the OS. Fast
//!   (several GB/s), but a CSPRNG gives **computational secrecy only**: an adversary who
//!   could break ChaCha (or learn the seed) could recover the secret from fewer than k shares.
//! * [`OsSource`] — the kernel generator (`getrandom(2)`). It is itself a CSPRNG, so this
//!   is also **computational secrecy**; slower (~0.5 GB/s here) but with no state in-process.
//! * [`DeviceSource`] — reads any device or file, e.g. `/dev/hwrng` or a quantum RNG's
//!   character device. If, and only if, the device's output is truly uniform and
//!   independent, the shares are **information-theoretically secret** (fewer than k shares
//!   reveal nothing, whatever the adversary's computing power).
//!
//! Buffers that hold random pads are wiped with the `zeroize` crate after use by the
//! callers in this crate ([`crate::sharing::Splitter`]).

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use rand_chacha::{ChaCha12Rng, ChaCha20Rng, ChaCha8Rng};
use rand_core::{RngCore, SeedableRng};
use thiserror::Error;
use zeroize::Zeroizing;

/// What a source's output can guarantee.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Secrecy {
    /// Secure only against computationally bounded adversaries.
    Computational,
    /// Information-theoretic, provided the physical source is truly random.
    InformationTheoretic,
}

/// A failure to obtain random bytes.
#[derive(Debug, Error)]
pub enum RngError {
    /// The operating system generator failed.
    #[error("OS random generator failed: {0}")]
    Os(getrandom::Error),
    /// Reading the random device failed or hit end of file.
    #[error("reading random device {path}: {source}")]
    Device {
        /// Device path.
        path: PathBuf,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// The randomness path is not a character device.
    #[error("randomness source {0} is not a character device (a file would repeat its bytes in every backup): use a device like /dev/hwrng, or chacha12 / os")]
    NotADevice(PathBuf),
}

/// A source of uniformly random bytes.
pub trait RandomSource {
    /// Fills `buf` completely with random bytes.
    ///
    /// # Errors
    /// When the underlying generator or device fails; `buf` content is then unspecified.
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RngError>;

    /// The kind of secrecy shares made from this source have.
    fn secrecy(&self) -> Secrecy;
}

impl<T: RandomSource + ?Sized> RandomSource for &mut T {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RngError> {
        (**self).fill(buf)
    }
    fn secrecy(&self) -> Secrecy {
        (**self).secrecy()
    }
}

impl<T: RandomSource + ?Sized> RandomSource for Box<T> {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RngError> {
        (**self).fill(buf)
    }
    fn secrecy(&self) -> Secrecy {
        (**self).secrecy()
    }
}

/// Number of ChaCha rounds. ChaCha8 is the fastest (≈4.5 GB/s measured on the project VM),
/// ChaCha12 (≈3 GB/s) is what `rand`'s `StdRng` uses, ChaCha20 (≈1.7 GB/s) the most
/// conservative. All three have no known practical attack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ChaChaRounds {
    /// 8 rounds.
    R8,
    /// 12 rounds (default).
    #[default]
    R12,
    /// 20 rounds.
    R20,
}

enum ChaChaState {
    R8(ChaCha8Rng),
    R12(ChaCha12Rng),
    R20(ChaCha20Rng),
}

/// ChaCha CSPRNG seeded from the OS. Computational secrecy only.
pub struct ChaChaSource {
    state: ChaChaState,
}

impl fmt::Debug for ChaChaSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rounds = match self.state {
            ChaChaState::R8(_) => 8,
            ChaChaState::R12(_) => 12,
            ChaChaState::R20(_) => 20,
        };
        f.debug_struct("ChaChaSource")
            .field("rounds", &rounds)
            .finish_non_exhaustive()
    }
}

impl ChaChaSource {
    /// A generator with a fresh 32-byte seed from the OS.
    ///
    /// # Errors
    /// [`RngError::Os`] when the OS generator fails.
    pub fn from_os(rounds: ChaChaRounds) -> Result<Self, RngError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        getrandom::fill(seed.as_mut()).map_err(RngError::Os)?;
        Ok(Self::from_seed(rounds, *seed))
    }

    /// A deterministic generator (for tests and reproducible benchmarks only).
    #[must_use]
    pub fn from_seed(rounds: ChaChaRounds, seed: [u8; 32]) -> Self {
        let state = match rounds {
            ChaChaRounds::R8 => ChaChaState::R8(ChaCha8Rng::from_seed(seed)),
            ChaChaRounds::R12 => ChaChaState::R12(ChaCha12Rng::from_seed(seed)),
            ChaChaRounds::R20 => ChaChaState::R20(ChaCha20Rng::from_seed(seed)),
        };
        Self { state }
    }
}

impl RandomSource for ChaChaSource {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RngError> {
        match &mut self.state {
            ChaChaState::R8(r) => r.fill_bytes(buf),
            ChaChaState::R12(r) => r.fill_bytes(buf),
            ChaChaState::R20(r) => r.fill_bytes(buf),
        }
        Ok(())
    }
    fn secrecy(&self) -> Secrecy {
        Secrecy::Computational
    }
}

/// The operating system's generator (`getrandom`). Computational secrecy (it is a CSPRNG).
#[derive(Clone, Copy, Debug, Default)]
pub struct OsSource;

impl RandomSource for OsSource {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RngError> {
        getrandom::fill(buf).map_err(RngError::Os)
    }
    fn secrecy(&self) -> Secrecy {
        Secrecy::Computational
    }
}

/// Reads random bytes from a character device such as `/dev/hwrng`.
///
/// Claims [`Secrecy::InformationTheoretic`]: that holds only if the device really is a
/// true (physical/quantum) random source; this type cannot check it. A regular file (or
/// anything but a character device) is refused: it would be read again from its start by
/// every store, so two backups' shares would use the same "randomness" and their XOR would
/// reveal the XOR of the two files.
#[derive(Debug)]
pub struct DeviceSource {
    path: PathBuf,
    file: File,
}

impl DeviceSource {
    /// Opens `path` for reading.
    ///
    /// # Errors
    /// [`RngError::Device`] if it cannot be opened.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, RngError> {
        use std::os::unix::fs::FileTypeExt;
        let path = path.as_ref().to_path_buf();
        let file = File::open(&path).map_err(|source| RngError::Device {
            path: path.clone(),
            source,
        })?;
        let is_char = file
            .metadata()
            .map(|m| m.file_type().is_char_device())
            .unwrap_or(false);
        if !is_char {
            return Err(RngError::NotADevice(path));
        }
        Ok(Self { path, file })
    }
}

impl RandomSource for DeviceSource {
    fn fill(&mut self, buf: &mut [u8]) -> Result<(), RngError> {
        self.file
            .read_exact(buf)
            .map_err(|source| RngError::Device {
                path: self.path.clone(),
                source,
            })
    }
    fn secrecy(&self) -> Secrecy {
        Secrecy::InformationTheoretic
    }
}

/// Which source to use, as chosen in configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RngChoice {
    /// [`ChaChaSource`] with the given rounds (the default is ChaCha12).
    ChaCha(ChaChaRounds),
    /// [`OsSource`].
    Os,
    /// [`DeviceSource`] at this path.
    Device(PathBuf),
}

impl Default for RngChoice {
    fn default() -> Self {
        RngChoice::ChaCha(ChaChaRounds::default())
    }
}

impl std::str::FromStr for RngChoice {
    type Err = String;

    /// `chacha8`, `chacha12`, `chacha20`, `os`, or a device path (starting with `/`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "chacha8" => Ok(RngChoice::ChaCha(ChaChaRounds::R8)),
            "chacha12" | "chacha" | "" => Ok(RngChoice::ChaCha(ChaChaRounds::R12)),
            "chacha20" => Ok(RngChoice::ChaCha(ChaChaRounds::R20)),
            "os" => Ok(RngChoice::Os),
            p if p.starts_with('/') => Ok(RngChoice::Device(PathBuf::from(p))),
            other => Err(format!(
                "unknown randomness source {other:?}: use chacha8, chacha12, chacha20, os or a device path like /dev/hwrng"
            )),
        }
    }
}

impl RngChoice {
    /// Opens the chosen source.
    ///
    /// # Errors
    /// If seeding from the OS or opening the device fails.
    pub fn open(&self) -> Result<Box<dyn RandomSource + Send>, RngError> {
        Ok(match self {
            RngChoice::ChaCha(r) => Box::new(ChaChaSource::from_os(*r)?),
            RngChoice::Os => Box::new(OsSource),
            RngChoice::Device(p) => Box::new(DeviceSource::open(p)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_fill() {
        for choice in [
            RngChoice::ChaCha(ChaChaRounds::R8),
            RngChoice::default(),
            RngChoice::ChaCha(ChaChaRounds::R20),
            RngChoice::Os,
            RngChoice::Device("/dev/urandom".into()),
        ] {
            let mut src = choice.open().expect("open");
            let mut buf = [0u8; 64];
            src.fill(&mut buf).expect("fill");
            assert!(buf.iter().any(|&b| b != 0), "{choice:?}");
        }
    }

    #[test]
    fn device_eof_is_error() {
        let mut src = DeviceSource::open("/dev/null").expect("open");
        let mut buf = [0u8; 4];
        assert!(matches!(src.fill(&mut buf), Err(RngError::Device { .. })));
    }

    #[test]
    fn a_regular_file_is_not_a_randomness_device() {
        let dir = std::env::temp_dir().join(format!("rng-test-{}", std::process::id()));
        std::fs::write(&dir, [7u8; 64]).expect("write");
        let r = DeviceSource::open(&dir);
        let _ = std::fs::remove_file(&dir);
        assert!(matches!(r, Err(RngError::NotADevice(_))));
    }

    #[test]
    fn missing_device_is_error() {
        assert!(DeviceSource::open("/nonexistent/hwrng").is_err());
    }
}
