//! The CA's keys and what it signs. The root (and an optional intermediate that does the
//! signing) come from files, or are generated on first run and kept in the state dir.
use std::{
    fs,
    io::Write as _,
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use time::OffsetDateTime;

use crate::identity::Identity;

#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Cert {
        what: &'static str,
        source: rcgen::Error,
    },
}

/// Why a CSR was not signed; the message goes back to the caller.
#[derive(Debug, thiserror::Error)]
pub enum SignRefusal {
    #[error("the CSR is not valid: {0}")]
    BadCsr(rcgen::Error),
    #[error("the CSR must name exactly one SPIFFE ID as a URI SAN and nothing else")]
    BadSan,
    #[error(transparent)]
    BadIdentity(#[from] crate::identity::ParseIdentityError),
    #[error("{0} is outside trust domain {1}")]
    WrongTrustDomain(Identity, String),
    #[error("node {node} runs no pod with identity {identity}")]
    NotOnNode { node: String, identity: Identity },
    #[error("signing failed: {0}")]
    Sign(rcgen::Error),
    #[error("the CSR's key type is not allowed (ECDSA P-256 or P-384, or Ed25519)")]
    KeyType,
}

/// Key types the CA signs: those the agent makes (P-256) and other modern curves; no
/// RSA of unknown size.
fn key_allowed(alg: &rcgen::SignatureAlgorithm) -> bool {
    [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &rcgen::PKCS_ED25519,
    ]
    .contains(&alg)
}

pub struct Authority {
    issuer: Issuer<'static, KeyPair>,
    /// PEM of the certificates between a leaf and the root (the intermediate, if any).
    intermediates_pem: Vec<String>,
    roots_pem: Vec<String>,
    pub trust_domain: String,
    pub max_ttl: Duration,
}

/// Where the signing material comes from.
pub enum Source<'a> {
    /// Generated on first run and persisted in this directory (standalone default).
    StateDir(&'a Path),
    /// Operator-provided: the root, and the certificate and key that sign (the root
    /// itself, or an intermediate under it).
    Files {
        root_cert: &'a Path,
        signing_cert: &'a Path,
        signing_key: &'a Path,
    },
}

fn read(path: &Path) -> Result<String, AuthorityError> {
    fs::read_to_string(path).map_err(|source| AuthorityError::Io {
        path: path.to_owned(),
        source,
    })
}

fn cert_err(what: &'static str) -> impl FnOnce(rcgen::Error) -> AuthorityError {
    move |source| AuthorityError::Cert { what, source }
}

fn serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    bytes[0] &= 0x7f; // positive
    SerialNumber::from_slice(&bytes)
}

impl Authority {
    pub fn load(
        source: Source<'_>,
        trust_domain: &str,
        max_ttl: Duration,
    ) -> Result<(Authority, bool), AuthorityError> {
        let (root_pem, signing_pem, key_pem, generated) = match source {
            Source::Files {
                root_cert,
                signing_cert,
                signing_key,
            } => (
                read(root_cert)?,
                read(signing_cert)?,
                read(signing_key)?,
                false,
            ),
            Source::StateDir(dir) => {
                let (cert_path, key_path) = (dir.join("root-cert.pem"), dir.join("root-key.pem"));
                if cert_path.exists() && key_path.exists() {
                    let root = read(&cert_path)?;
                    (root.clone(), root, read(&key_path)?, false)
                } else {
                    let (cert, key) = generate_root(trust_domain)?;
                    persist(dir, &cert_path, &key_path, &cert, &key)?;
                    (cert.clone(), cert, key, true)
                }
            }
        };
        let key = KeyPair::from_pem(&key_pem).map_err(cert_err("signing key"))?;
        let issuer =
            Issuer::from_ca_cert_pem(&signing_pem, key).map_err(cert_err("signing certificate"))?;
        let intermediates_pem = if signing_pem.trim() == root_pem.trim() {
            Vec::new()
        } else {
            vec![signing_pem]
        };
        Ok((
            Authority {
                issuer,
                intermediates_pem,
                roots_pem: vec![root_pem],
                trust_domain: trust_domain.to_owned(),
                max_ttl,
            },
            generated,
        ))
    }

    pub fn roots_pem(&self) -> &[String] {
        &self.roots_pem
    }

    /// Checks and signs a workload CSR. `on_node` says whether the calling node runs a
    /// pod with the identity asked for.
    pub fn sign(
        &self,
        csr_pem: &str,
        node: &str,
        requested_ttl: Duration,
        on_node: impl Fn(&Identity) -> bool,
    ) -> Result<(Identity, Vec<String>), SignRefusal> {
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(SignRefusal::BadCsr)?;
        if !key_allowed(csr.public_key.algorithm()) {
            return Err(SignRefusal::KeyType);
        }
        let uri = match csr.params.subject_alt_names.as_slice() {
            [SanType::URI(uri)] => uri.as_str().to_owned(),
            _ => return Err(SignRefusal::BadSan),
        };
        let identity = Identity::parse(&uri)?;
        if identity.trust_domain != self.trust_domain {
            return Err(SignRefusal::WrongTrustDomain(
                identity,
                self.trust_domain.clone(),
            ));
        }
        if !on_node(&identity) {
            return Err(SignRefusal::NotOnNode {
                node: node.to_owned(),
                identity,
            });
        }
        let ttl = if requested_ttl.is_zero() {
            self.max_ttl
        } else {
            requested_ttl.min(self.max_ttl)
        };
        // Allow for clock skew between nodes, without eating much of a short lifetime.
        let skew = (ttl / 10).min(Duration::from_secs(60));
        let now = OffsetDateTime::now_utc();
        // Only what the CA decides goes in: the SAN it checked, its validity, usages.
        // The X.509-SVID profile: an empty subject (the identity is the URI SAN alone),
        // an explicit CA:FALSE, and for an ECDSA key digitalSignature only.
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.subject_alt_names = vec![SanType::URI(
            rcgen::string::Ia5String::try_from(identity.to_string()).map_err(SignRefusal::Sign)?,
        )];
        params.not_before = now - skew;
        params.not_after = now + ttl;
        params.serial_number = Some(serial());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(SignRefusal::Sign)?;
        let mut chain = vec![cert.pem()];
        chain.extend(self.intermediates_pem.iter().cloned());
        Ok((identity, chain))
    }

    /// The CA's own serving certificate (for `server_name`), made fresh at each start;
    /// its key stays in memory. Returns (chain PEM, key PEM).
    pub fn serving_cert(&self, server_name: &str) -> Result<(String, String), AuthorityError> {
        let key = KeyPair::generate().map_err(cert_err("serving key"))?;
        let mut params = CertificateParams::new(vec![server_name.to_owned()])
            .map_err(cert_err("serving certificate name"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, server_name);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(60);
        params.not_after = now + Duration::from_secs(365 * 24 * 3600);
        params.serial_number = Some(serial());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(cert_err("serving certificate"))?;
        let mut chain = cert.pem();
        for pem in &self.intermediates_pem {
            chain.push_str(pem);
        }
        Ok((chain, key.serialize_pem()))
    }
}

fn generate_root(trust_domain: &str) -> Result<(String, String), AuthorityError> {
    let key = KeyPair::generate().map_err(cert_err("root key"))?;
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::OrganizationName, trust_domain);
    params
        .distinguished_name
        .push(DnType::CommonName, "mesh root CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = OffsetDateTime::now_utc();
    params.not_before = now - Duration::from_secs(3600);
    params.not_after = now + Duration::from_secs(10 * 365 * 24 * 3600);
    params.serial_number = Some(serial());
    let cert = params
        .self_signed(&key)
        .map_err(cert_err("root certificate"))?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// Writes the generated root: the key readable by root only, the key last so that a
/// crash in between leaves no key without its certificate.
fn persist(
    dir: &Path,
    cert_path: &Path,
    key_path: &Path,
    cert: &str,
    key: &str,
) -> Result<(), AuthorityError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| AuthorityError::Io { path, source }
    };
    fs::create_dir_all(dir).map_err(io(dir))?;
    fs::write(cert_path, cert).map_err(io(cert_path))?;
    let tmp = dir.join(".root-key.pem.tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(key.as_bytes()).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, key_path).map_err(io(key_path))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr_for(uri: &str) -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    fn authority(dir: &Path) -> Authority {
        Authority::load(
            Source::StateDir(dir),
            "cluster.local",
            Duration::from_secs(3600),
        )
        .unwrap()
        .0
    }

    #[test]
    fn workload_certificates_follow_the_x509_svid_profile() {
        use x509_parser::extensions::ParsedExtension;
        let dir = tempfile::tempdir().unwrap();
        let ca = authority(dir.path());
        let uri = "spiffe://cluster.local/ns/default/sa/web";
        let (_, chain) = ca
            .sign(&csr_for(uri), "node-1", Duration::ZERO, |_| true)
            .unwrap();
        let der: rustls::pki_types::CertificateDer =
            rustls::pki_types::pem::PemObject::from_pem_slice(chain[0].as_bytes()).unwrap();
        let (_, x) = x509_parser::parse_x509_certificate(&der).unwrap();
        assert_eq!(x.subject().iter().count(), 0, "subject {}", x.subject());
        let bc = x
            .basic_constraints()
            .unwrap()
            .expect("basicConstraints present");
        assert!(!bc.value.ca);
        let ku = x.key_usage().unwrap().expect("keyUsage present").value;
        assert!(ku.digital_signature());
        assert!(!ku.key_encipherment() && !ku.key_cert_sign());
        let eku = x.extended_key_usage().unwrap().expect("EKU present").value;
        assert!(eku.server_auth && eku.client_auth);
        let sans: Vec<String> = x
            .extensions()
            .iter()
            .filter_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(s) => Some(
                    s.general_names
                        .iter()
                        .map(|n| n.to_string())
                        .collect::<Vec<_>>(),
                ),
                _ => None,
            })
            .flatten()
            .collect();
        assert_eq!(sans, vec![format!("URI({uri})")]);
    }

    #[test]
    fn only_modern_key_types_are_signed() {
        assert!(key_allowed(&rcgen::PKCS_ECDSA_P256_SHA256));
        assert!(key_allowed(&rcgen::PKCS_ED25519));
        assert!(!key_allowed(&rcgen::PKCS_RSA_SHA256));
    }

    #[test]
    fn generates_once_then_reloads_the_same_root() {
        let dir = tempfile::tempdir().unwrap();
        let (a, generated) = Authority::load(
            Source::StateDir(dir.path()),
            "cluster.local",
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(generated);
        let mode = fs::metadata(dir.path().join("root-key.pem"))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let (b, generated) = Authority::load(
            Source::StateDir(dir.path()),
            "cluster.local",
            Duration::from_secs(60),
        )
        .unwrap();
        assert!(!generated);
        assert_eq!(a.roots_pem(), b.roots_pem());
    }

    #[test]
    fn signs_only_identities_on_the_node_and_caps_the_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let ca = authority(dir.path());
        let uri = "spiffe://cluster.local/ns/default/sa/web";
        let (id, chain) = ca
            .sign(
                &csr_for(uri),
                "node-1",
                Duration::from_secs(10 * 3600),
                |_| true,
            )
            .unwrap();
        assert_eq!(id.to_string(), uri);
        let der = rustls::pki_types::pem::PemObject::from_pem_slice(chain[0].as_bytes()).unwrap();
        let info = crate::identity::CertInfo::parse(&der).unwrap();
        assert_eq!(info.identity, id);
        let life = info.not_after.duration_since(info.not_before).unwrap();
        assert!(
            life <= Duration::from_secs(3600 + 60),
            "lifetime {life:?} not capped"
        );

        let refused = ca.sign(&csr_for(uri), "node-2", Duration::ZERO, |_| false);
        assert!(
            matches!(refused, Err(SignRefusal::NotOnNode { ref node, .. }) if node == "node-2"),
            "{refused:?}"
        );
        let other_td = ca.sign(
            &csr_for("spiffe://evil.local/ns/default/sa/web"),
            "node-1",
            Duration::ZERO,
            |_| true,
        );
        assert!(matches!(other_td, Err(SignRefusal::WrongTrustDomain(..))));
        assert!(matches!(
            ca.sign("garbage", "node-1", Duration::ZERO, |_| true),
            Err(SignRefusal::BadCsr(_))
        ));
    }
}
