//! Development PKI for a QKD network on one machine.
//!
//! [`DevPki::generate`] writes, into one folder:
//! - `ca.pem` / `ca.key`: a self-signed ECDSA P-256 CA (the key stays in the folder so more
//!   identities can be issued later; it is a *development* CA, never commit it);
//! - per KME `kme-<ID>.pem/.key`: TLS server certificate, CN = KME ID, SAN `127.0.0.1`,
//!   `::1`, `localhost` and `URI:urn:qkd:kme:<ID>` (a peer KME checks it before it sends
//!   anything), EKU serverAuth;
//! - per KME `kme-<ID>-peer.pem/.key`: KME-to-KME client certificate, CN = KME ID, SAN
//!   `URI:urn:qkd:kme:<ID>`, EKU clientAuth;
//! - per operator `operator-<NAME>.pem/.key` ([`Purpose::Operator`]): CN = name, SAN
//!   `URI:urn:qkd:operator:<NAME>`, EKU clientAuth;
//! - per SAE `sae-<ID>.pem/.key`: SAE client certificate, CN = SAE ID, SAN `DNS:<ID>` (when
//!   the ID is a valid DNS label) and `URI:urn:qkd:sae:<ID>`, EKU clientAuth;
//! - per site agent `sae-<ID>.pem/.key`: as an SAE, plus serverAuth and SAN `127.0.0.1`,
//!   `::1`, `localhost` (the agent serves HTTPS and is an SAE of its KME);
//! - on demand, `crl.pem` ([`Ca::revoke`]): a CRL signed by the CA listing revoked serials,
//!   which a KME checks client certificates against (`tls.crl`).
//!
//! The URI SANs are the roles: `urn:qkd:kme:`, `urn:qkd:operator:`, `urn:qkd:sae:`
//! ([`KME_URI`], [`OPERATOR_URI`], [`SAE_URI`]). A KME recognises peers and operators by
//! them, and refuses to treat a KME or operator certificate as an SAE.
//!
//! Owns: issuing development certificates. Must never depend on: the KME, the backup crates
//! or any network code; it only writes files.
//!
//! Private keys are PKCS#8 PEM with mode 0600. The `openssl` crate is used because the KME
//! itself is built on OpenSSL, so certificates are produced by the library that checks them.

#![forbid(unsafe_code)]

use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use openssl::asn1::{Asn1Integer, Asn1Time};
use openssl::bn::{BigNum, MsbOption};
use openssl::ec::{EcGroup, EcKey};
use openssl::error::ErrorStack;
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName,
    SubjectKeyIdentifier,
};
use openssl::x509::{
    CrlNumber, X509Crl, X509CrlBuilder, X509NameBuilder, X509RevokedBuilder, X509,
};

/// What can go wrong while generating a PKI.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("OpenSSL: {0}")]
    Ssl(#[from] ErrorStack),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid identity name {0:?}: use 1-64 characters from A-Z a-z 0-9 . _ -")]
    BadName(String),
    #[error("invalid serial number {0:?}: give it in hex, as `openssl x509 -serial` prints it")]
    BadSerial(String),
}

/// The serial number of a certificate in upper-case hex (as a CRL entry and the KME's logs
/// name it).
pub fn serial_hex(cert: &X509) -> Result<String, PkiError> {
    Ok(cert.serial_number().to_bn()?.to_hex_str()?.to_string())
}

/// Reads a PEM certificate.
pub fn read_cert(path: &Path) -> Result<X509, PkiError> {
    Ok(X509::from_pem(&read(path)?)?)
}

/// URI SAN prefix of a KME's certificates (server and peer client).
pub const KME_URI: &str = "urn:qkd:kme:";
/// URI SAN prefix of an operator's certificate.
pub const OPERATOR_URI: &str = "urn:qkd:operator:";
/// URI SAN prefix of an SAE's certificate.
pub const SAE_URI: &str = "urn:qkd:sae:";

/// A certificate with its private key.
pub struct Issued {
    pub cert: X509,
    pub key: PKey<Private>,
}

/// Paths of one written certificate and key.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub id: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate authority that can issue KME and SAE certificates.
pub struct Ca {
    issued: Issued,
}

/// The purpose of an issued certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// KME HTTPS server.
    KmeServer,
    /// KME acting as a client of a peer KME.
    KmePeer,
    /// SAE client.
    Sae,
    /// An SAE that also serves HTTPS (a backup site agent): client and server certificate,
    /// CN = SAE ID, SAN `127.0.0.1`, `::1`, `localhost` and `URI:urn:qkd:sae:<ID>`.
    Agent,
    /// An operator of a KME (the admin interface): client certificate, SAN
    /// `URI:urn:qkd:operator:<NAME>`.
    Operator,
}

/// Identity names double as file names and URL path segments, so they are kept plain.
pub fn check_name(name: &str) -> Result<(), PkiError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(PkiError::BadName(name.to_owned()))
    }
}

fn new_key() -> Result<PKey<Private>, ErrorStack> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    PKey::from_ec_key(EcKey::generate(&group)?)
}

fn serial() -> Result<Asn1Integer, ErrorStack> {
    let mut bn = BigNum::new()?;
    bn.rand(127, MsbOption::MAYBE_ZERO, false)?;
    bn.to_asn1_integer()
}

impl Ca {
    /// A new self-signed CA named `cn`, valid for ten years.
    pub fn new(cn: &str) -> Result<Self, PkiError> {
        let key = new_key()?;
        let mut name = X509NameBuilder::new()?;
        name.append_entry_by_nid(Nid::COMMONNAME, cn)?;
        name.append_entry_by_nid(Nid::ORGANIZATIONNAME, "QKD devnet")?;
        let name = name.build();
        let mut b = X509::builder()?;
        b.set_version(2)?;
        let sn = serial()?;
        b.set_serial_number(&sn)?;
        b.set_subject_name(&name)?;
        b.set_issuer_name(&name)?;
        b.set_pubkey(&key)?;
        b.set_not_before(&*Asn1Time::days_from_now(0)?)?;
        b.set_not_after(&*Asn1Time::days_from_now(3650)?)?;
        b.append_extension(BasicConstraints::new().critical().ca().build()?)?;
        b.append_extension(
            KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()?,
        )?;
        let ski = SubjectKeyIdentifier::new().build(&b.x509v3_context(None, None))?;
        b.append_extension(ski)?;
        b.sign(&key, MessageDigest::sha256())?;
        Ok(Ca {
            issued: Issued {
                cert: b.build(),
                key,
            },
        })
    }

    /// Loads a CA written earlier by [`DevPki::generate`].
    pub fn load(cert: &Path, key: &Path) -> Result<Self, PkiError> {
        let cert = X509::from_pem(&read(cert)?)?;
        let key = PKey::private_key_from_pem(&read(key)?)?;
        Ok(Ca {
            issued: Issued { cert, key },
        })
    }

    /// The CA certificate.
    pub fn cert(&self) -> &X509 {
        &self.issued.cert
    }

    /// Issues a certificate with CN = `id` for `purpose`, valid for two years.
    pub fn issue(&self, id: &str, purpose: Purpose) -> Result<Issued, PkiError> {
        check_name(id)?;
        let key = new_key()?;
        let mut name = X509NameBuilder::new()?;
        name.append_entry_by_nid(Nid::COMMONNAME, id)?;
        name.append_entry_by_nid(Nid::ORGANIZATIONNAME, "QKD devnet")?;
        let name = name.build();
        let mut b = X509::builder()?;
        b.set_version(2)?;
        let sn = serial()?;
        b.set_serial_number(&sn)?;
        b.set_subject_name(&name)?;
        b.set_issuer_name(self.issued.cert.subject_name())?;
        b.set_pubkey(&key)?;
        b.set_not_before(&*Asn1Time::days_from_now(0)?)?;
        b.set_not_after(&*Asn1Time::days_from_now(730)?)?;
        b.append_extension(BasicConstraints::new().critical().build()?)?;
        b.append_extension(
            KeyUsage::new()
                .critical()
                .digital_signature()
                .key_agreement()
                .build()?,
        )?;
        let mut eku = ExtendedKeyUsage::new();
        match purpose {
            Purpose::KmeServer => eku.server_auth(),
            Purpose::KmePeer | Purpose::Sae | Purpose::Operator => eku.client_auth(),
            Purpose::Agent => eku.server_auth().client_auth(),
        };
        b.append_extension(eku.build()?)?;
        let san = {
            let ctx = b.x509v3_context(Some(&self.issued.cert), None);
            let mut san = SubjectAlternativeName::new();
            match purpose {
                Purpose::KmeServer => {
                    san.ip("127.0.0.1").ip("::1").dns("localhost");
                    san.uri(&format!("{KME_URI}{id}"));
                }
                Purpose::KmePeer => {
                    san.uri(&format!("{KME_URI}{id}"));
                }
                Purpose::Operator => {
                    san.uri(&format!("{OPERATOR_URI}{id}"));
                }
                Purpose::Agent => {
                    san.ip("127.0.0.1").ip("::1").dns("localhost");
                    san.uri(&format!("{SAE_URI}{id}"));
                }
                Purpose::Sae => {
                    if id.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-') {
                        san.dns(id);
                    }
                    san.uri(&format!("{SAE_URI}{id}"));
                }
            }
            san.build(&ctx)?
        };
        b.append_extension(san)?;
        b.sign(&self.issued.key, MessageDigest::sha256())?;
        Ok(Issued {
            cert: b.build(),
            key,
        })
    }

    /// A CRL, valid for 30 days, that revokes the certificates with the given serial
    /// numbers (upper-case hex, as [`serial_hex`] gives them), signed by this CA.
    pub fn crl(&self, serials_hex: &[String]) -> Result<X509Crl, PkiError> {
        let now = Asn1Time::days_from_now(0)?;
        let mut b = X509CrlBuilder::new()?;
        b.set_issuer_name(self.issued.cert.subject_name())?;
        b.set_last_update(&now)?;
        b.set_next_update(&*Asn1Time::days_from_now(30)?)?;
        for hex in serials_hex {
            let bn = BigNum::from_hex_str(hex).map_err(|_| PkiError::BadSerial(hex.clone()))?;
            let mut r = X509RevokedBuilder::new()?;
            r.set_serial_number(&*bn.to_asn1_integer()?)?;
            r.set_revocation_date(&now)?;
            b.add_revoked(r.build())?;
        }
        let dummy = X509::builder()?;
        let ctx = dummy.x509v3_context(Some(&self.issued.cert), None);
        b.append_extension(AuthorityKeyIdentifier::new().keyid(true).build(&ctx)?)?;
        // The CRL number: seconds since the epoch, so a later CRL has a larger one.
        let n = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs());
        let n = u32::try_from(n).unwrap_or(u32::MAX);
        b.append_extension(CrlNumber::new(BigNum::from_u32(n)?)?.build()?)?;
        b.sort()?;
        b.sign(&self.issued.key, MessageDigest::sha256())?;
        Ok(b.build()?)
    }

    /// Writes `crl.pem` into `dir`, revoking the given serials (see [`Ca::crl`]): into a
    /// temporary file renamed into place, so a KME reading it never sees half a CRL.
    pub fn write_crl(&self, dir: &Path, serials_hex: &[String]) -> Result<PathBuf, PkiError> {
        let path = dir.join("crl.pem");
        let tmp = dir.join(".crl.pem.tmp");
        write_file(&tmp, &self.crl(serials_hex)?.to_pem()?, 0o644)?;
        fs::rename(&tmp, &path).map_err(|source| PkiError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(path)
    }

    /// Writes `ca.pem` and `ca.key` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<IdentityFiles, PkiError> {
        write_issued(dir, "ca", "ca", &self.issued)
    }

    /// Issues and writes `<prefix>-<id>.pem/.key` into `dir`.
    pub fn issue_to(
        &self,
        dir: &Path,
        id: &str,
        purpose: Purpose,
    ) -> Result<IdentityFiles, PkiError> {
        let issued = self.issue(id, purpose)?;
        let stem = match purpose {
            Purpose::KmeServer => format!("kme-{id}"),
            Purpose::KmePeer => format!("kme-{id}-peer"),
            Purpose::Sae | Purpose::Agent => format!("sae-{id}"),
            Purpose::Operator => format!("operator-{id}"),
        };
        write_issued(dir, id, &stem, &issued)
    }
}

fn read(p: &Path) -> Result<Vec<u8>, PkiError> {
    fs::read(p).map_err(|source| PkiError::Io {
        path: p.to_owned(),
        source,
    })
}

fn write_file(path: &Path, data: &[u8], mode: u32) -> Result<(), PkiError> {
    let io = |source| PkiError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)
        .map_err(io)?;
    f.write_all(data).map_err(io)
}

fn write_issued(
    dir: &Path,
    id: &str,
    stem: &str,
    issued: &Issued,
) -> Result<IdentityFiles, PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Io {
        path: dir.to_owned(),
        source,
    })?;
    let cert = dir.join(format!("{stem}.pem"));
    let key = dir.join(format!("{stem}.key"));
    write_file(&cert, &issued.cert.to_pem()?, 0o644)?;
    write_file(&key, &issued.key.private_key_to_pem_pkcs8()?, 0o600)?;
    Ok(IdentityFiles {
        id: id.to_owned(),
        cert,
        key,
    })
}

/// The files of a generated development PKI.
#[derive(Debug, Clone)]
pub struct DevPki {
    pub dir: PathBuf,
    pub ca: IdentityFiles,
    /// Server certificate of each KME.
    pub kme_servers: Vec<IdentityFiles>,
    /// KME-to-KME client certificate of each KME.
    pub kme_peers: Vec<IdentityFiles>,
    pub saes: Vec<IdentityFiles>,
    /// Site agents: SAEs with a server certificate too.
    pub agents: Vec<IdentityFiles>,
}

impl DevPki {
    /// Generates a fresh CA and certificates for the given KME and SAE IDs into `dir`.
    pub fn generate(dir: &Path, kme_ids: &[String], sae_ids: &[String]) -> Result<Self, PkiError> {
        Self::generate_with_agents(dir, kme_ids, sae_ids, &[])
    }

    /// As [`DevPki::generate`], plus site agents (SAEs that also serve HTTPS).
    pub fn generate_with_agents(
        dir: &Path,
        kme_ids: &[String],
        sae_ids: &[String],
        agent_ids: &[String],
    ) -> Result<Self, PkiError> {
        let ca = Ca::new("QKD devnet CA")?;
        let ca_files = ca.write(dir)?;
        let mut pki = DevPki {
            dir: dir.to_owned(),
            ca: ca_files,
            kme_servers: Vec::new(),
            kme_peers: Vec::new(),
            saes: Vec::new(),
            agents: Vec::new(),
        };
        for id in kme_ids {
            pki.kme_servers
                .push(ca.issue_to(dir, id, Purpose::KmeServer)?);
            pki.kme_peers.push(ca.issue_to(dir, id, Purpose::KmePeer)?);
        }
        for id in sae_ids {
            pki.saes.push(ca.issue_to(dir, id, Purpose::Sae)?);
        }
        for id in agent_ids {
            pki.agents.push(ca.issue_to(dir, id, Purpose::Agent)?);
        }
        Ok(pki)
    }
}

impl DevPki {
    /// Revokes the certificates at `certs` (PEM): writes `dir/crl.pem`, signed by the CA in
    /// `dir` (`ca.pem`, `ca.key`), listing their serials and every serial an existing
    /// `dir/crl.pem` lists. Returns the CRL's path and every serial it lists.
    pub fn revoke(dir: &Path, certs: &[PathBuf]) -> Result<(PathBuf, Vec<String>), PkiError> {
        let ca = Ca::load(&dir.join("ca.pem"), &dir.join("ca.key"))?;
        let mut serials: Vec<String> = Vec::new();
        let existing = dir.join("crl.pem");
        if existing.exists() {
            let crl = X509Crl::from_pem(&read(&existing)?)?;
            for r in crl.get_revoked().into_iter().flatten() {
                serials.push(r.serial_number().to_bn()?.to_hex_str()?.to_string());
            }
        }
        for c in certs {
            let hex = serial_hex(&read_cert(c)?)?;
            if !serials.contains(&hex) {
                serials.push(hex);
            }
        }
        let path = ca.write_crl(dir, &serials)?;
        Ok((path, serials))
    }
}
