//! Who may talk to whom: PeerAuthentication (is plaintext accepted?) and
//! AuthorizationPolicy (L4 per connection, L7 per routed request), evaluated in
//! Istio's order, plus the registry of open connections that a policy change
//! re-checks.
mod live;
pub mod path;
mod rules;

use std::sync::Arc;

pub use live::{LiveConns, LiveGuard};
pub use rules::{ConnAttrs, Reading, RequestAttrs, valid_template};

use crate::config::{
    AuthorizationPolicy, AuthzAction, Config, MtlsMode, NamespacedName, PeerAuthentication,
    Selector,
};

/// The workload a connection is for: enough to find the policies that apply to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    pub id: NamespacedName,
    pub labels: crate::config::Labels,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Matched this DENY policy.
    Denied(NamespacedName),
    /// ALLOW policies apply to the workload and none matched.
    NotAllowed,
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Allow => f.write_str("allowed"),
            Decision::Denied(p) => write!(f, "DENY policy {p}"),
            Decision::NotAllowed => f.write_str("no ALLOW policy matched"),
        }
    }
}

impl Decision {
    pub fn allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// The result of one check: the decision, and the AUDIT policies that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub decision: Decision,
    pub audited: Vec<NamespacedName>,
}

/// One config generation's security policy.
#[derive(Debug, Default)]
pub struct PolicySet {
    root_namespace: String,
    peer_authentications: Vec<Arc<PeerAuthentication>>,
    policies: Vec<Arc<AuthorizationPolicy>>,
}

fn selects(selector: &Selector, labels: &crate::config::Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

impl PolicySet {
    pub fn build(config: &Config, root_namespace: &str) -> Arc<PolicySet> {
        let mut peer_authentications = config.peer_authentications.clone();
        let mut policies = config.authorization_policies.clone();
        // A stable order (Istio uses creation time; files have none): by name.
        peer_authentications.sort_by(|a, b| a.id.cmp(&b.id));
        policies.sort_by(|a, b| a.id.cmp(&b.id));
        Arc::new(PolicySet {
            root_namespace: root_namespace.to_owned(),
            peer_authentications,
            policies,
        })
    }

    /// Whether a policy in `ns` with `selector` covers `w`: its own namespace, or
    /// every namespace from the root namespace.
    fn covers(&self, ns: &str, selector: Option<&Selector>, w: &Workload) -> bool {
        (ns == w.id.namespace || ns == self.root_namespace)
            && selector.is_none_or(|s| selects(s, &w.labels))
    }

    /// The mTLS mode for `w`: workload selector, then namespace, then mesh-wide, then
    /// PERMISSIVE (Istio's default). UNSET defers to the next scope.
    pub fn mtls_mode(&self, w: &Workload) -> MtlsMode {
        let scoped = |pred: &dyn Fn(&PeerAuthentication) -> bool| {
            self.peer_authentications
                .iter()
                .filter(|p| pred(p))
                .find_map(|p| p.mode)
        };
        let ns = &w.id.namespace;
        scoped(&|p| {
            &p.id.namespace == ns && p.selector.as_ref().is_some_and(|s| selects(s, &w.labels))
        })
        .or_else(|| scoped(&|p| &p.id.namespace == ns && p.selector.is_none()))
        .or_else(|| scoped(&|p| p.id.namespace == self.root_namespace && p.selector.is_none()))
        .unwrap_or(MtlsMode::Permissive)
    }

    /// Istio's order: AUDIT is recorded; any matching DENY denies; then, if ALLOW
    /// policies apply to the workload, one of them must match; no ALLOW policy allows.
    pub fn evaluate(&self, w: &Workload, c: &ConnAttrs) -> Verdict {
        self.evaluate_request(w, c, None)
    }

    /// `evaluate` for one HTTP request (`req`), or for a connection (`None`: L7
    /// fields are read as the rules module says).
    pub fn evaluate_request(
        &self,
        w: &Workload,
        c: &ConnAttrs,
        req: Option<&RequestAttrs<'_>>,
    ) -> Verdict {
        self.evaluate_reading(w, c, req, Reading::FailClosed)
    }

    /// Whether a connection that `check` refuses could have some of its requests
    /// allowed: its refusal comes only from L7 fields, read the way that fails closed,
    /// and reading them the other way allows it. Such a connection, when it speaks
    /// HTTP, is served with the policy checked for each request instead of refused.
    pub fn decided_per_request(&self, w: &Workload, c: &ConnAttrs) -> bool {
        self.evaluate_reading(w, c, None, Reading::Lenient)
            .decision
            .allowed()
    }

    fn evaluate_reading(
        &self,
        w: &Workload,
        c: &ConnAttrs,
        req: Option<&RequestAttrs<'_>>,
        reading: Reading,
    ) -> Verdict {
        let applicable = || {
            self.policies
                .iter()
                .filter(|p| self.covers(&p.id.namespace, p.selector.as_ref(), w))
        };
        let audited = applicable()
            .filter(|p| p.action == AuthzAction::Audit && p.matches_reading(c, req, reading))
            .map(|p| p.id.clone())
            .collect();
        if let Some(p) = applicable()
            .find(|p| p.action == AuthzAction::Deny && p.matches_reading(c, req, reading))
        {
            return Verdict {
                decision: Decision::Denied(p.id.clone()),
                audited,
            };
        }
        let mut allows = applicable()
            .filter(|p| p.action == AuthzAction::Allow)
            .peekable();
        let decision =
            if allows.peek().is_none() || allows.any(|p| p.matches_reading(c, req, reading)) {
                Decision::Allow
            } else {
                Decision::NotAllowed
            };
        Verdict { decision, audited }
    }

    /// `evaluate`, with every AUDIT policy that matched logged: the check every
    /// delivery (a connection or a routed request) makes.
    pub fn check(&self, w: &Workload, c: &ConnAttrs) -> Result<(), Decision> {
        self.check_request(w, c, None)
    }

    /// `check` for one HTTP request.
    pub fn check_request(
        &self,
        w: &Workload,
        c: &ConnAttrs,
        req: Option<&RequestAttrs<'_>>,
    ) -> Result<(), Decision> {
        let verdict = self.evaluate_request(w, c, req);
        for policy in &verdict.audited {
            tracing::info!(
                %policy,
                source = c.principal.as_deref().unwrap_or("(plaintext)"),
                source_ip = %c.source_ip,
                port = c.dest_port,
                method = req.map(|r| r.method),
                path = req.map(|r| r.path),
                allowed = verdict.decision.allowed(),
                "policy audit"
            );
        }
        if !verdict.decision.allowed() {
            return Err(verdict.decision);
        }
        // The other reading of the path (see `path`): a request is allowed only if
        // an application reading its path either way would be allowed too.
        if let Some(r) = req
            && let Some(other) = path::lenient(r.path)
        {
            let read = RequestAttrs { path: &other, ..*r };
            let second = self.evaluate_request(w, c, Some(&read)).decision;
            if !second.allowed() {
                tracing::debug!(path = r.path, read = %other, decision = %second, "denied on the path's other reading");
                return Err(second);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
