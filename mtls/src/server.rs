//! The server side: the mTLS acceptor and the identity of the peer certificate.
//!
//! A client certificate is requested and, when presented, must chain to the configured CA or
//! the handshake fails. A connection without a certificate is accepted at the TLS level so
//! that its requests get a proper 401 in the spec's Error format (the server decides). For
//! the same reason a certificate revoked by the CA's CRL is accepted at the TLS level: the
//! server checks each request's certificate against [`crate::crl::Revocations`] and answers
//! 401.

use std::any::Any;

use actix_tls::accept::openssl::TlsStream;
use actix_web::dev::Extensions;
use actix_web::rt::net::TcpStream;
use openssl::nid::Nid;
use openssl::ssl::{SslAcceptor, SslAcceptorBuilder, SslFiletype, SslMethod, SslVerifyMode};
use openssl::x509::X509;

use crate::TlsError;

/// Which certificate field carries an SAE ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum IdField {
    /// The subject common name (default).
    #[default]
    Cn,
    /// The first DNS entry of the subject alternative name.
    SanDns,
    /// The first URI entry of the subject alternative name; a `urn:qkd:sae:` prefix is removed.
    SanUri,
    /// The certificate serial number, upper-case hex.
    Serial,
}

/// The identity fields of a verified client certificate.
#[derive(Debug, Clone, Default)]
pub struct PeerCert {
    pub cn: Option<String>,
    pub san_dns: Vec<String>,
    pub san_uri: Vec<String>,
    pub serial_hex: String,
    /// SHA-256 of the certificate's DER, lower-case hex without separators.
    pub fingerprint_sha256: String,
}

impl PeerCert {
    fn from_x509(cert: &X509) -> Self {
        let cn = cert
            .subject_name()
            .entries_by_nid(Nid::COMMONNAME)
            .next()
            .and_then(|e| e.data().to_string().ok());
        let mut san_dns = Vec::new();
        let mut san_uri = Vec::new();
        if let Some(names) = cert.subject_alt_names() {
            for n in names.iter() {
                if let Some(d) = n.dnsname() {
                    san_dns.push(d.to_owned());
                }
                if let Some(u) = n.uri() {
                    san_uri.push(u.to_owned());
                }
            }
        }
        let serial_hex = cert
            .serial_number()
            .to_bn()
            .ok()
            .and_then(|bn| bn.to_hex_str().ok())
            .map(|s| s.to_string())
            .unwrap_or_default();
        let fingerprint_sha256 = cert
            .digest(openssl::hash::MessageDigest::sha256())
            .map(|d| d.iter().map(|b| format!("{b:02x}")).collect())
            .unwrap_or_default();
        PeerCert {
            cn,
            san_dns,
            san_uri,
            serial_hex,
            fingerprint_sha256,
        }
    }

    /// The names after `prefix` in the certificate's URI SANs (`urn:qkd:kme:` gives the KME
    /// IDs it claims).
    pub fn uri_names<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.san_uri
            .iter()
            .filter_map(move |u| u.strip_prefix(prefix))
    }

    /// The SAE ID carried in the configured field.
    pub fn sae_id(&self, field: IdField) -> Option<String> {
        match field {
            IdField::Cn => self.cn.clone(),
            IdField::SanDns => self.san_dns.first().cloned(),
            IdField::SanUri => self.san_uri.first().map(|u| {
                u.strip_prefix("urn:qkd:sae:")
                    .unwrap_or(u.as_str())
                    .to_owned()
            }),
            IdField::Serial => Some(self.serial_hex.clone()).filter(|s| !s.is_empty()),
        }
    }
}

/// An mTLS acceptor from PEM files: the server certificate chain and key, and the CA that
/// client certificates must chain to. Error messages name the file (`tls.ca`, ...).
pub fn acceptor(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<SslAcceptorBuilder, TlsError> {
    acceptor_inner(ca, cert, key).map_err(TlsError)
}

fn acceptor_inner(
    ca: &std::path::Path,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<SslAcceptorBuilder, String> {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls_server())
        .map_err(|e| format!("TLS: {e}"))?;
    b.set_private_key_file(key, SslFiletype::PEM)
        .map_err(|e| format!("tls.key {}: {e}", key.display()))?;
    b.set_certificate_chain_file(cert)
        .map_err(|e| format!("tls.cert {}: {e}", cert.display()))?;
    b.check_private_key()
        .map_err(|e| format!("tls.key does not match tls.cert: {e}"))?;
    b.set_ca_file(ca)
        .map_err(|e| format!("tls.ca {}: {e}", ca.display()))?;
    let ca_pem = std::fs::read(ca).map_err(|e| format!("tls.ca {}: {e}", ca.display()))?;
    let ca = X509::from_pem(&ca_pem).map_err(|e| format!("tls.ca: {e}"))?;
    b.add_client_ca(&ca).map_err(|e| format!("tls.ca: {e}"))?;
    b.set_verify(SslVerifyMode::PEER);
    // Clients that resume TLS sessions (hyper-openssl, browsers, many 014 clients) would
    // otherwise get a fatal "internal error" alert: with client certificates OpenSSL refuses
    // to resume a session whose context is not set. A resumed session keeps the verified
    // client certificate of the full handshake.
    b.set_session_id_context(b"qkd-mtls")
        .map_err(|e| format!("TLS: {e}"))?;
    // HTTP/1.1 only (what 014 clients use).
    b.set_alpn_select_callback(|_, client| {
        openssl::ssl::select_next_proto(b"\x08http/1.1", client)
            .ok_or(openssl::ssl::AlpnError::NOACK)
    });
    Ok(b)
}

/// `on_connect` hook: sets TCP_NODELAY and records the verified client certificate.
pub fn on_connect(conn: &dyn Any, ext: &mut Extensions) {
    if let Some(tls) = conn.downcast_ref::<TlsStream<TcpStream>>() {
        let _ = tls.get_ref().set_nodelay(true);
        if let Some(cert) = tls.ssl().peer_certificate() {
            ext.insert(PeerCert::from_x509(&cert));
        }
    }
}
