//! The CA's certificate revocation list, for servers (each request's client certificate)
//! and for the [`crate::pinned`] client (the server's certificate, inside the handshake).
//!
//! The CRL is a PEM file that may be replaced while a process runs: it is looked at again at
//! most once a second, and read again whenever its size, modification or change time or
//! inode differ (writers should write a temporary file and rename it into place, as `certs`
//! does). A CRL that is missing, unreadable, not signed by the CA or past its nextUpdate
//! revokes every certificate (fail closed), and says so in the log.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::x509::{CrlStatus, X509Crl, X509Ref, X509};

use crate::TlsError;

/// How often the file is looked at for a change.
const RECHECK: Duration = Duration::from_secs(1);

/// What identifies one version of the file.
type Version = Option<(u64, i64, i64, i64, i64, u64)>;

fn version(path: &Path) -> Version {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).ok().map(|m| {
        (
            m.size(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
            m.ino(),
        )
    })
}

/// A revocation list that follows its file.
pub struct Revocations {
    path: PathBuf,
    ca: X509,
    current: Mutex<Current>,
}

struct Current {
    checked: Instant,
    version: Version,
    crl: Result<X509Crl, String>,
    /// Whether the CRL's expiry has been logged.
    expiry_logged: bool,
}

impl Revocations {
    /// Loads the CRL at `crl`, which must be signed by the CA at `ca` (errors name the file).
    pub fn load(crl: &Path, ca: &Path) -> Result<Self, TlsError> {
        let pem =
            std::fs::read(ca).map_err(|e| TlsError(format!("tls.ca {}: {e}", ca.display())))?;
        let ca = X509::from_pem(&pem).map_err(|e| TlsError(format!("tls.ca: {e}")))?;
        let r = Revocations {
            path: crl.to_owned(),
            ca,
            current: Mutex::new(Current {
                checked: Instant::now(),
                version: None,
                crl: Err("not loaded".into()),
                expiry_logged: false,
            }),
        };
        let (version, loaded) = r.read();
        if let Err(e) = &loaded {
            return Err(TlsError(format!("tls.crl {}: {e}", crl.display())));
        }
        if let Ok(mut cur) = r.current.lock() {
            cur.version = version;
            cur.crl = loaded;
        }
        Ok(r)
    }

    fn read(&self) -> (Version, Result<X509Crl, String>) {
        let v = version(&self.path);
        let crl = std::fs::read(&self.path)
            .map_err(|e| e.to_string())
            .and_then(|pem| X509Crl::from_pem(&pem).map_err(|e| e.to_string()))
            .and_then(|crl| {
                let key = self.ca.public_key().map_err(|e| e.to_string())?;
                match crl.verify(&key) {
                    Ok(true) => Ok(crl),
                    _ => Err("the CRL is not signed by the CA (tls.ca)".to_owned()),
                }
            });
        (v, crl)
    }

    /// The current CRL, read again if the file changed; `None` if it cannot be trusted.
    fn with_current<T>(&self, f: impl FnOnce(&X509Crl) -> T) -> Option<T> {
        let mut cur = self.current.lock().ok()?;
        if cur.checked.elapsed() >= RECHECK {
            cur.checked = Instant::now();
            let v = version(&self.path);
            if v != cur.version {
                let (v, crl) = self.read();
                match &crl {
                    Ok(_) => {
                        tracing::info!(crl = %self.path.display(), "certificate revocation list reloaded")
                    }
                    Err(e) => {
                        tracing::error!(crl = %self.path.display(), error = %e, "certificate revocation list unusable: refusing every certificate")
                    }
                }
                cur.version = v;
                cur.crl = crl;
                cur.expiry_logged = false;
            }
        }
        let expired = match &cur.crl {
            Ok(crl) => crl.next_update().is_some_and(|next| {
                Asn1Time::days_from_now(0)
                    .ok()
                    .and_then(|now| now.compare(next).ok())
                    .is_some_and(|o| o == std::cmp::Ordering::Greater)
            }),
            Err(_) => return None,
        };
        if expired {
            if !cur.expiry_logged {
                tracing::error!(crl = %self.path.display(), "certificate revocation list is past its nextUpdate: refusing every certificate until a fresh one is installed");
                cur.expiry_logged = true;
            }
            return None;
        }
        cur.crl.as_ref().ok().map(f)
    }

    /// Whether the CRL revokes the certificate with serial `serial_hex` (or cannot be trusted).
    pub fn revokes_serial(&self, serial_hex: &str) -> bool {
        let Ok(serial) = BigNum::from_hex_str(serial_hex).and_then(|b| b.to_asn1_integer()) else {
            return true;
        };
        self.with_current(|crl| matches!(crl.get_by_serial(&serial), CrlStatus::Revoked(_)))
            .unwrap_or(true)
    }

    /// Whether the CRL revokes `cert` (or cannot be trusted).
    pub fn revokes(&self, cert: &X509Ref) -> bool {
        let cert = cert.to_owned();
        self.with_current(|crl| matches!(crl.get_by_cert(&cert), CrlStatus::Revoked(_)))
            .unwrap_or(true)
    }
}
