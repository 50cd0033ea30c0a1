//! Keeps one certificate per local workload identity: creates the key in memory, has
//! the CA sign it, renews it half-way through its life (retrying with backoff), keeps
//! the old certificate while it is still valid, and follows trust-bundle changes.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use futures_util::future::BoxFuture;
use rustls::{RootCertStore, pki_types::CertificateDer, pki_types::pem::PemObject};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{Instrument, info, info_span, warn};

use super::{
    Identity,
    cert::{CertError, WorkloadCert},
    verify::BundleClientVerifier,
};

/// What the CA returns for one CSR.
pub struct Signed {
    pub chain_pem: Vec<String>,
    pub trust_bundle_pem: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("CA call failed: {0}")]
    Call(String),
    #[error("CA refused: {0}")]
    Refused(String),
    #[error("creating the key or CSR: {0}")]
    Csr(#[from] rcgen::Error),
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("trust bundle: {0}")]
    Bundle(String),
}

/// Something that signs CSRs: the CA client, or a fake in tests.
pub trait Signer: Send + Sync + 'static {
    fn sign(&self, csr_pem: String, ttl: Duration) -> BoxFuture<'_, Result<Signed, SignError>>;
}

/// The roots workloads trust, as the CA last sent them.
pub struct TrustBundle {
    pub pem: Vec<String>,
    pub roots: Arc<RootCertStore>,
}

impl TrustBundle {
    pub fn from_pem(pem: Vec<String>) -> Result<TrustBundle, SignError> {
        let mut roots = RootCertStore::empty();
        for p in &pem {
            for der in CertificateDer::pem_slice_iter(p.as_bytes()) {
                let der = der.map_err(|e| SignError::Bundle(e.to_string()))?;
                roots
                    .add(der)
                    .map_err(|e| SignError::Bundle(e.to_string()))?;
            }
        }
        if roots.is_empty() {
            return Err(SignError::Bundle("no root certificates".into()));
        }
        Ok(TrustBundle {
            pem,
            roots: Arc::new(roots),
        })
    }
}

/// Retry policy for failed signing.
const BACKOFF_START: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

struct Entry {
    cert: watch::Receiver<Option<Arc<WorkloadCert>>>,
    task: JoinHandle<()>,
}

pub struct SecretManager {
    signer: Arc<dyn Signer>,
    ttl: Duration,
    entries: Mutex<HashMap<Identity, Entry>>,
    bundle: ArcSwap<Option<TrustBundle>>,
    client_verifier: Mutex<Option<Arc<BundleClientVerifier>>>,
}

impl SecretManager {
    pub fn new(signer: Arc<dyn Signer>, ttl: Duration) -> Arc<SecretManager> {
        Arc::new(SecretManager {
            signer,
            ttl,
            entries: Mutex::new(HashMap::new()),
            bundle: ArcSwap::from_pointee(None),
            client_verifier: Mutex::new(None),
        })
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts keeping a certificate for `id` (no-op if already kept).
    pub fn ensure(self: &Arc<Self>, id: &Identity) {
        let mut entries = self.entries();
        if entries.contains_key(id) {
            return;
        }
        let (tx, rx) = watch::channel(None);
        let span = info_span!("identity", id = %id);
        let task = tokio::spawn(self.clone().keep(id.clone(), tx).instrument(span));
        entries.insert(id.clone(), Entry { cert: rx, task });
    }

    /// Stops renewing identities that no local pod uses any more.
    pub fn retain(&self, keep: &HashSet<Identity>) {
        self.entries().retain(|id, e| {
            let keep = keep.contains(id);
            if !keep {
                e.task.abort();
                info!(id = %id, "identity no longer used; certificate dropped");
            }
            keep
        });
    }

    /// The certificate to serve for `id` now: the newest one, while it is valid.
    pub fn current(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        let cert = self.entries().get(id)?.cert.borrow().clone()?;
        cert.is_valid_at(SystemTime::now()).then_some(cert)
    }

    /// Every kept identity with its newest certificate (if one was issued yet).
    pub fn snapshot(&self) -> Vec<(Identity, Option<Arc<WorkloadCert>>)> {
        let mut all: Vec<_> = self
            .entries()
            .iter()
            .map(|(id, e)| (id.clone(), e.cert.borrow().clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// How many root certificates the current trust bundle holds.
    pub fn trust_anchors(&self) -> usize {
        self.bundle
            .load()
            .as_ref()
            .as_ref()
            .map_or(0, |b| b.roots.roots.len())
    }

    /// Waits until `id` has a certificate, at most `timeout`.
    pub async fn wait(&self, id: &Identity, timeout: Duration) -> Option<Arc<WorkloadCert>> {
        let mut rx = self.entries().get(id)?.cert.clone();
        let got = tokio::time::timeout(timeout, rx.wait_for(|c| c.is_some())).await;
        match got {
            Ok(Ok(c)) => c.clone(),
            _ => None,
        }
    }

    pub fn roots(&self) -> Option<Arc<RootCertStore>> {
        self.bundle
            .load()
            .as_ref()
            .as_ref()
            .map(|b| b.roots.clone())
    }

    /// The client verifier every inbound listener shares; follows the trust bundle.
    pub fn client_verifier(&self) -> Option<Arc<BundleClientVerifier>> {
        self.client_verifier
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    async fn keep(self: Arc<Self>, id: Identity, tx: watch::Sender<Option<Arc<WorkloadCert>>>) {
        let mut backoff = BACKOFF_START;
        loop {
            match self.issue(&id).await {
                Ok(cert) => {
                    let refresh_at = cert.refresh_at();
                    info!(
                        serial = %cert.serial,
                        expires_in_s = cert.not_after.duration_since(SystemTime::now()).unwrap_or_default().as_secs(),
                        "certificate issued"
                    );
                    let now = SystemTime::now();
                    if let Some(skew) = clock_skew(cert.not_before, cert.not_after, now) {
                        warn!(
                            skew_s = skew,
                            "the CA's clock and this node's disagree: \
                            certificates look {} to this node",
                            if skew > 0 { "old" } else { "not yet valid" }
                        );
                    }
                    let life = cert
                        .not_after
                        .duration_since(cert.not_before)
                        .unwrap_or_default();
                    tx.send_replace(Some(cert));
                    backoff = BACKOFF_START;
                    let wait = refresh_at.duration_since(now).unwrap_or(Duration::ZERO);
                    tokio::time::sleep(renewal_wait(wait, life, rand::random::<f64>())).await;
                }
                Err(e) => {
                    let still_valid = tx
                        .borrow()
                        .as_ref()
                        .is_some_and(|c| c.is_valid_at(SystemTime::now()));
                    warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, still_valid, "certificate request failed");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }

    async fn issue(&self, id: &Identity) -> Result<Arc<WorkloadCert>, SignError> {
        let key = rcgen::KeyPair::generate()?;
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = vec![rcgen::SanType::URI(rcgen::string::Ia5String::try_from(
            id.to_string(),
        )?)];
        let csr = params.serialize_request(&key)?.pem()?;
        let signed = self.signer.sign(csr, self.ttl).await?;
        let cert = WorkloadCert::from_signed(id, &key, &signed.chain_pem)?;
        self.update_bundle(signed.trust_bundle_pem)?;
        Ok(Arc::new(cert))
    }

    fn update_bundle(&self, pem: Vec<String>) -> Result<(), SignError> {
        if self
            .bundle
            .load()
            .as_ref()
            .as_ref()
            .is_some_and(|b| b.pem == pem)
        {
            return Ok(());
        }
        let bundle = TrustBundle::from_pem(pem)?;
        let roots = bundle.roots.clone();
        let mut verifier = self
            .client_verifier
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        match verifier.as_ref() {
            Some(v) => v.update(roots),
            None => BundleClientVerifier::new(roots).map(|v| *verifier = Some(Arc::new(v))),
        }
        .map_err(|e| SignError::Bundle(e.to_string()))?;
        info!(roots = bundle.roots.len(), "trust bundle updated");
        self.bundle.store(Arc::new(Some(bundle)));
        Ok(())
    }
}

impl SecretManager {
    /// Stops every renewal task (they hold the manager, so dropping it is not enough).
    pub fn shutdown(&self) {
        for (_, e) in self.entries().drain() {
            e.task.abort();
        }
    }
}

/// How long to wait before renewing: `until_refresh` (half the lifetime on this
/// node's clock), but never less than a tenth of the lifetime nor one second, so a
/// clock far ahead of the CA cannot make the agent renew in a loop; plus up to 10%
/// jitter (`jitter` in 0..1) so a node's identities do not all renew at once.
pub fn renewal_wait(until_refresh: Duration, life: Duration, jitter: f64) -> Duration {
    let floor = (life / 10).max(Duration::from_secs(1));
    let base = until_refresh.max(floor);
    base + base.mul_f64(jitter.clamp(0.0, 1.0) * 0.1)
}

/// Seconds by which this node's clock seems off from the CA's, when that is more
/// than the CA's backdating explains: positive when the node is ahead (the fresh
/// certificate is already past a quarter of its life), negative when it is behind
/// (the certificate is not valid yet).
pub fn clock_skew(not_before: SystemTime, not_after: SystemTime, now: SystemTime) -> Option<i64> {
    let life = not_after.duration_since(not_before).ok()?;
    match now.duration_since(not_before) {
        Ok(age) if age > life / 4 && age > Duration::from_secs(120) => Some(age.as_secs() as i64),
        Ok(_) => None,
        Err(e) => Some(-(e.duration().as_secs() as i64)),
    }
}

#[cfg(test)]
mod renewal_tests {
    use super::*;

    #[test]
    fn renewal_has_a_floor_and_bounded_jitter() {
        let hour = Duration::from_secs(3600);
        assert_eq!(renewal_wait(Duration::ZERO, hour, 0.0), hour / 10);
        assert_eq!(
            renewal_wait(Duration::ZERO, Duration::from_secs(4), 0.0),
            Duration::from_secs(1)
        );
        let w = renewal_wait(hour / 2, hour, 1.0);
        assert!(w >= hour / 2 && w <= (hour / 2).mul_f64(1.1), "{w:?}");
    }

    #[test]
    fn skew_is_reported_only_beyond_backdating() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let day = Duration::from_secs(86_400);
        assert_eq!(clock_skew(t0, t0 + day, t0 + Duration::from_secs(60)), None);
        assert_eq!(clock_skew(t0, t0 + day, t0 + day / 2), Some(43_200));
        assert_eq!(
            clock_skew(t0, t0 + day, t0 - Duration::from_secs(30)),
            Some(-30)
        );
    }
}
