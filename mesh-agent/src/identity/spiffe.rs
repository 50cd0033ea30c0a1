//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<account>`.
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    pub trust_domain: String,
    pub namespace: String,
    pub service_account: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{uri:?} is not a workload SPIFFE ID (spiffe://<trust-domain>/ns/<ns>/sa/<sa>)")]
pub struct ParseIdentityError {
    pub uri: String,
}

impl Identity {
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Identity {
        Identity {
            trust_domain: trust_domain.to_owned(),
            namespace: namespace.to_owned(),
            service_account: service_account.to_owned(),
        }
    }

    pub fn parse(uri: &str) -> Result<Identity, ParseIdentityError> {
        let err = || ParseIdentityError {
            uri: uri.to_owned(),
        };
        let rest = uri.strip_prefix("spiffe://").ok_or_else(err)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] if [td, ns, sa].iter().all(|p| valid_segment(p)) => {
                Ok(Identity::new(td, ns, sa))
            }
            _ => Err(err()),
        }
    }

    /// Istio's principal form, as AuthorizationPolicy `principals` match it:
    /// `<trust-domain>/ns/<ns>/sa/<sa>`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Written directly, not through `principal()`: metrics and logs format
        // identities per request, and this saves an allocation each time.
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_rejects_other_uris() {
        let id = Identity::new("cluster.local", "default", "web");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/web");
        assert_eq!(Identity::parse(&id.to_string()), Ok(id.clone()));
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/web");
        for bad in [
            "https://cluster.local/ns/default/sa/web",
            "spiffe://cluster.local/ns/default",
            "spiffe://cluster.local/ns//sa/web",
            "spiffe://cluster.local/ns/default/sa/web/extra",
            "spiffe://cluster.local/ns/a b/sa/web",
        ] {
            assert!(Identity::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
