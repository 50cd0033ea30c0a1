//! Certificate verification for the mesh's TLS: the chain must end at the current trust
//! bundle, and on the client side the server must be the exact identity the config
//! expects for that endpoint, not merely any workload of the mesh.
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, Error, OtherError, RootCertStore,
    SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::WebPkiSupportedAlgorithms,
    pki_types::{CertificateDer, ServerName, UnixTime},
    server::{
        ParsedCertificate, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
};

use super::{Identity, cert::peer_identity};

fn algorithms() -> WebPkiSupportedAlgorithms {
    rustls::crypto::ring::default_provider().signature_verification_algorithms
}

#[derive(Debug, thiserror::Error)]
#[error("peer is {got}, expected {want}")]
pub struct IdentityMismatch {
    pub want: Identity,
    pub got: Identity,
}

/// Client side: verifies the server against the trust bundle and the expected identity.
#[derive(Debug)]
pub struct ExpectedServer {
    roots: Arc<RootCertStore>,
    expected: Identity,
    algs: WebPkiSupportedAlgorithms,
}

impl ExpectedServer {
    pub fn new(roots: Arc<RootCertStore>, expected: Identity) -> ExpectedServer {
        ExpectedServer {
            roots,
            expected,
            algs: algorithms(),
        }
    }
}

fn other(e: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(e))))
}

impl ServerCertVerifier for ExpectedServer {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let got = peer_identity(end_entity).map_err(other)?;
        if got != self.expected {
            return Err(other(IdentityMismatch {
                want: self.expected.clone(),
                got,
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// Server side: any client whose chain ends at the *current* trust bundle. Which
/// identity it is gets decided by authorization after the handshake. The bundle can
/// change (CA rotation); the verifier is rebuilt then, and existing listeners see it.
#[derive(Debug)]
pub struct BundleClientVerifier {
    inner: ArcSwap<Arc<dyn ClientCertVerifier>>,
}

impl BundleClientVerifier {
    pub fn new(roots: Arc<RootCertStore>) -> Result<BundleClientVerifier, Error> {
        Ok(BundleClientVerifier {
            inner: ArcSwap::from_pointee(build_client_verifier(roots)?),
        })
    }

    pub fn update(&self, roots: Arc<RootCertStore>) -> Result<(), Error> {
        self.inner.store(Arc::new(build_client_verifier(roots)?));
        Ok(())
    }
}

fn build_client_verifier(roots: Arc<RootCertStore>) -> Result<Arc<dyn ClientCertVerifier>, Error> {
    WebPkiClientVerifier::builder_with_provider(
        roots,
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|e| Error::General(e.to_string()))
}

impl ClientCertVerifier for BundleClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Hints are optional in TLS 1.3; an owned copy cannot be returned by reference.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner
            .load()
            .verify_client_cert(end_entity, intermediates, now)?;
        // A chain without a workload identity is not a mesh workload.
        peer_identity(end_entity).map_err(other)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.load().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner.load().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.load().supported_verify_schemes()
    }
}
