//! A workload's certificate as the agent holds it: the signed chain with its in-memory
//! key (never written to disk), and the identity read back from a peer's certificate.
use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use rustls::{
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, pem::PemObject},
    sign::CertifiedKey,
};
use x509_parser::{extensions::GeneralName, prelude::FromDer};

use super::Identity;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate chain is empty")]
    EmptyChain,
    #[error("certificate PEM: {0}")]
    Pem(String),
    #[error("certificate is not valid X.509: {0}")]
    Parse(String),
    #[error("certificate has no SPIFFE URI SAN")]
    NoIdentity,
    #[error("certificate has {0} URI SANs; a workload certificate has exactly one")]
    ManyIdentities(usize),
    #[error(transparent)]
    Identity(#[from] super::spiffe::ParseIdentityError),
    #[error("signed certificate is for {got}, requested {want}")]
    WrongIdentity {
        want: Box<Identity>,
        got: Box<Identity>,
    },
    #[error("private key: {0}")]
    Key(String),
}

/// One workload's current certificate, ready to hand to rustls.
pub struct WorkloadCert {
    pub key: Arc<CertifiedKey>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// Hex serial number, for logs.
    pub serial: String,
}

impl WorkloadCert {
    /// Assembles the certificate from the CA's PEM chain and the key the CSR was made
    /// with, checking that the CA signed the identity that was asked for.
    pub fn from_signed(
        identity: &Identity,
        key: &rcgen::KeyPair,
        chain_pem: &[String],
    ) -> Result<WorkloadCert, CertError> {
        let mut chain = Vec::new();
        for pem in chain_pem {
            for der in CertificateDer::pem_slice_iter(pem.as_bytes()) {
                chain.push(der.map_err(|e| CertError::Pem(e.to_string()))?);
            }
        }
        let leaf = chain.first().ok_or(CertError::EmptyChain)?;
        let info = CertInfo::parse(leaf)?;
        if info.identity != *identity {
            return Err(CertError::WrongIdentity {
                want: Box::new(identity.clone()),
                got: Box::new(info.identity),
            });
        }
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signer = rustls::crypto::ring::sign::any_supported_type(&der)
            .map_err(|e| CertError::Key(e.to_string()))?;
        Ok(WorkloadCert {
            key: Arc::new(CertifiedKey::new(chain, signer)),
            not_before: info.not_before,
            not_after: info.not_after,
            serial: info.serial,
        })
    }

    /// When to renew: half-way through the lifetime.
    pub fn refresh_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + life / 2
    }

    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        now >= self.not_before && now < self.not_after
    }
}

/// What the mesh reads from a certificate.
#[derive(Debug)]
pub struct CertInfo {
    pub identity: Identity,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub serial: String,
}

impl CertInfo {
    pub fn parse(der: &CertificateDer<'_>) -> Result<CertInfo, CertError> {
        let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|e| CertError::Parse(e.to_string()))?;
        let uris: Vec<&str> = match cert
            .subject_alternative_name()
            .map_err(|e| CertError::Parse(e.to_string()))?
        {
            Some(san) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| match n {
                    GeneralName::URI(u) => Some(*u),
                    _ => None,
                })
                .collect(),
            None => Vec::new(),
        };
        let identity = match uris.as_slice() {
            [] => return Err(CertError::NoIdentity),
            [uri] => Identity::parse(uri)?,
            many => return Err(CertError::ManyIdentities(many.len())),
        };
        let to_system = |t: x509_parser::time::ASN1Time| {
            let secs = t.timestamp();
            if secs >= 0 {
                SystemTime::UNIX_EPOCH + Duration::from_secs(secs as u64)
            } else {
                SystemTime::UNIX_EPOCH
            }
        };
        Ok(CertInfo {
            identity,
            not_before: to_system(cert.validity().not_before),
            not_after: to_system(cert.validity().not_after),
            serial: cert.raw_serial_as_string(),
        })
    }
}

/// The identity in a peer's certificate (already verified by the TLS layer).
pub fn peer_identity(der: &CertificateDer<'_>) -> Result<Identity, CertError> {
    CertInfo::parse(der).map(|i| i.identity)
}
