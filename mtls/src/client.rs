//! The HTTPS client builder shared by every client of the network.

use std::time::Duration;

use crate::TlsError;

/// PEM certificate chain and PKCS#8 key presented as the client certificate.
pub struct ClientIdentity<'a> {
    pub cert_pem: &'a [u8],
    pub key_pem: &'a [u8],
}

/// A reqwest builder that trusts only `ca_pem` (no system roots), presents `identity` when
/// given, speaks HTTP/1.1 over OpenSSL (native-tls) with TCP_NODELAY, and fails a connection
/// attempt after `connect_timeout`. Callers add their own request timeouts and pool settings.
pub fn builder(
    ca_pem: &[u8],
    identity: Option<ClientIdentity<'_>>,
    connect_timeout: Duration,
) -> Result<reqwest::ClientBuilder, TlsError> {
    let ca = reqwest::Certificate::from_pem(ca_pem)
        .map_err(|e| TlsError(format!("CA certificate: {e}")))?;
    let mut b = reqwest::Client::builder()
        .use_native_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(ca)
        .tcp_nodelay(true)
        .connect_timeout(connect_timeout);
    if let Some(id) = identity {
        let ident = reqwest::Identity::from_pkcs8_pem(id.cert_pem, id.key_pem)
            .map_err(|e| TlsError(format!("client certificate and key: {e}")))?;
        b = b.identity(ident);
    }
    Ok(b)
}

/// Checks that the server that sent `resp` presented a certificate with the URI SAN `uri`
/// (e.g. `urn:qkd:sae:AGENT_B`): every certificate of the CA passes the TLS check, so a
/// client that means one particular server checks its name too. The client must be built
/// with `tls_info(true)`. The error says what the certificate names instead.
pub fn check_server_uri(resp: &reqwest::Response, uri: &str) -> Result<(), String> {
    let der = resp
        .extensions()
        .get::<reqwest::tls::TlsInfo>()
        .and_then(|t| t.peer_certificate())
        .ok_or_else(|| "no server certificate to check (not TLS?)".to_owned())?;
    let cert =
        openssl::x509::X509::from_der(der).map_err(|e| format!("server certificate: {e}"))?;
    let uris: Vec<String> = cert
        .subject_alt_names()
        .map(|names| {
            names
                .iter()
                .filter_map(|n| n.uri().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if uris.iter().any(|u| u == uri) {
        Ok(())
    } else {
        Err(format!(
            "the server's certificate names {} instead of {uri}",
            if uris.is_empty() {
                "no URI".to_owned()
            } else {
                uris.join(", ")
            }
        ))
    }
}
