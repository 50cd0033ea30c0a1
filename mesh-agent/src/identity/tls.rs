//! rustls settings for the tunnel: TLS 1.3 only, HTTP/2 by ALPN, certificates looked up
//! per handshake so that a renewed certificate is used without rebuilding anything.
use std::sync::Arc;

use rustls::{
    ClientConfig, ServerConfig, SignatureScheme,
    client::ResolvesClientCert,
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
};

use super::{Identity, SecretManager, verify::ExpectedServer};

pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsConfigError {
    #[error("no trust bundle yet (no certificate has been issued)")]
    NoTrustBundle,
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

#[derive(Debug)]
struct CurrentCert {
    secrets: Arc<SecretManager>,
    identity: Identity,
}

impl std::fmt::Debug for SecretManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretManager")
    }
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.secrets.current(&self.identity).map(|c| c.key.clone())
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.secrets.current(&self.identity).map(|c| c.key.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The inbound side of one workload: serves `identity`'s certificate and requires a
/// client certificate that chains to the trust bundle.
pub fn server_config(
    secrets: &Arc<SecretManager>,
    identity: &Identity,
) -> Result<Arc<ServerConfig>, TlsConfigError> {
    let verifier = secrets
        .client_verifier()
        .ok_or(TlsConfigError::NoTrustBundle)?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CurrentCert {
            secrets: secrets.clone(),
            identity: identity.clone(),
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: a resumed session would carry the client's identity forward
    // without checking its certificate again (expiry, a root removed from the bundle).
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// The outbound side: presents `source`'s certificate and accepts only a server that
/// proves to be `expected`.
pub fn client_config(
    secrets: &Arc<SecretManager>,
    source: &Identity,
    expected: &Identity,
) -> Result<Arc<ClientConfig>, TlsConfigError> {
    let roots = secrets.roots().ok_or(TlsConfigError::NoTrustBundle)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(ExpectedServer::new(roots, expected.clone())))
        .with_client_cert_resolver(Arc::new(CurrentCert {
            secrets: secrets.clone(),
            identity: source.clone(),
        }));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Every connection is a full handshake that verifies the server again.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}
