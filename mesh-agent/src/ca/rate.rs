//! Signing rate limits: a token bucket per node and per CSR identity. The buckets are
//! sized for a node starting all its pods at once, and for renewal at half-life; past
//! them a node is told to slow down (RESOURCE_EXHAUSTED) and its agent backs off.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

/// A node may ask this many certificates at once, then [`NODE_PER_SEC`] a second.
pub const NODE_BURST: f64 = 200.0;
pub const NODE_PER_SEC: f64 = 20.0;
/// One identity on one node: a few at once (a restart), then one a second.
pub const IDENTITY_BURST: f64 = 5.0;
pub const IDENTITY_PER_SEC: f64 = 1.0;
/// Buckets kept before full (idle) ones are dropped.
const MAX_BUCKETS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("this node asks for certificates too fast")]
    Node,
    #[error("this identity is renewed too often from this node")]
    Identity,
}

/// A token bucket (also the CA's budget of token reviews, `token_review.rs`).
#[derive(Debug, Clone, Copy)]
pub(super) struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A bucket holding `burst` tokens at `now`.
    pub(super) fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            at: now,
        }
    }

    /// Takes one token if there is one after refilling at `per_sec` up to `burst`.
    pub(super) fn take(&mut self, now: Instant, burst: f64, per_sec: f64) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * per_sec).min(burst);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Default)]
pub struct SigningRate {
    buckets: Mutex<HashMap<String, Bucket>>,
}

impl SigningRate {
    /// Admits one CSR from `node` (an authenticated node name).
    pub fn check(&self, node: &str, csr: &str) -> Result<(), RateError> {
        self.check_at(node, csr, Instant::now())
    }

    fn check_at(&self, node: &str, csr: &str, now: Instant) -> Result<(), RateError> {
        use std::hash::{DefaultHasher, Hash, Hasher};
        let mut b = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() > MAX_BUCKETS {
            b.retain(|_, v| now.saturating_duration_since(v.at) < Duration::from_secs(60));
        }
        let fresh = |burst| Bucket::full(burst, now);
        let node_key = format!("node {node}");
        if !b.entry(node_key).or_insert_with(|| fresh(NODE_BURST)).take(
            now,
            NODE_BURST,
            NODE_PER_SEC,
        ) {
            return Err(RateError::Node);
        }
        // A renewal carries a new key each time: the identity is the SAN it asks for.
        let mut h = DefaultHasher::new();
        identity_hint(csr).hash(&mut h);
        let id_key = format!("id {node} {:x}", h.finish());
        if !b
            .entry(id_key)
            .or_insert_with(|| fresh(IDENTITY_BURST))
            .take(now, IDENTITY_BURST, IDENTITY_PER_SEC)
        {
            return Err(RateError::Identity);
        }
        Ok(())
    }
}

/// The SPIFFE ID a CSR asks for, if it parses; the CSR text otherwise.
fn identity_hint(csr: &str) -> String {
    rcgen::CertificateSigningRequestParams::from_pem(csr)
        .ok()
        .and_then(|c| {
            c.params
                .subject_alt_names
                .into_iter()
                .find_map(|s| match s {
                    rcgen::SanType::URI(u) => Some(u.as_str().to_owned()),
                    _ => None,
                })
        })
        .unwrap_or_else(|| csr.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_identity_is_limited_before_the_node_is() {
        let r = SigningRate::default();
        let t0 = Instant::now();
        for _ in 0..IDENTITY_BURST as usize {
            r.check_at("n1", "csr-a", t0).unwrap();
        }
        assert_eq!(r.check_at("n1", "csr-a", t0), Err(RateError::Identity));
        // Another identity on the same node, and the same on another node, go on.
        r.check_at("n1", "csr-b", t0).unwrap();
        r.check_at("n2", "csr-a", t0).unwrap();
        // Refilled after a second.
        r.check_at("n1", "csr-a", t0 + Duration::from_secs(1))
            .unwrap();
    }

    #[test]
    fn a_node_is_limited_across_identities() {
        let r = SigningRate::default();
        let t0 = Instant::now();
        for i in 0..NODE_BURST as usize {
            r.check_at("n1", &format!("csr-{i}"), t0).unwrap();
        }
        assert_eq!(r.check_at("n1", "csr-x", t0), Err(RateError::Node));
    }
}
