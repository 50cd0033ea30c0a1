//! Node identity from Kubernetes service-account tokens: the agent presents its
//! projected token (audience `mesh-ca`), the CA asks the API server about it with a
//! TokenReview, and takes the node from the token's binding: a projected token is
//! bound to the agent's pod, and the API server names that pod's node in the user's
//! extra field `authentication.kubernetes.io/node-name`.
//!
//! Only the agent's own service account is accepted. Any pod can be given a token
//! with the `mesh-ca` audience for *its* service account, bound to its node; if the
//! CA took any service account, a workload could ask for the certificates of every
//! other workload on its node.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::{Api, Client, api::PostParams};

use super::{node_auth::AuthError, rate::Bucket};

/// The extra field of a bound token's user that names the node of the bound pod.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";
/// How long a review's answer is reused for the same token: the API server is asked
/// at most once a minute per token, not once per CSR.
const CACHE_FOR: Duration = Duration::from_secs(60);
/// Answers kept; past this the cache starts over (tokens are per node: a cluster has
/// far fewer).
const CACHE_ENTRIES: usize = 4096;
/// Reviews the CA asks the API server for, per second (and as a burst). Anyone who can
/// reach the CA can send made-up tokens, and each unknown one would otherwise cost the
/// API server a TokenReview; past the budget such requests are told to retry. Known
/// tokens are answered from the cache and cost nothing.
const REVIEWS_PER_SECOND: f64 = 20.0;
const REVIEW_BURST: f64 = 100.0;

pub struct TokenReviewer {
    client: Client,
    audience: String,
    /// `system:serviceaccount:<namespace>:<name>` of the agents.
    agent_user: String,
    cache: Mutex<HashMap<String, Reviewed>>,
    budget: Mutex<Bucket>,
}

/// A review's answer for one token, and when it was given: the node, or why not.
type Reviewed = (Instant, Result<String, String>);

impl TokenReviewer {
    /// `agent` is `<namespace>/<name>` of the agents' service account.
    pub fn new(client: Client, audience: String, agent: &str) -> anyhow::Result<TokenReviewer> {
        let (ns, name) = agent
            .split_once('/')
            .filter(|(ns, name)| !ns.is_empty() && !name.is_empty())
            .ok_or_else(|| {
                anyhow::anyhow!("--agent-service-account {agent:?}: expected <namespace>/<name>")
            })?;
        Ok(TokenReviewer {
            client,
            audience,
            agent_user: format!("system:serviceaccount:{ns}:{name}"),
            cache: Mutex::new(HashMap::new()),
            budget: Mutex::new(Bucket::full(REVIEW_BURST, Instant::now())),
        })
    }

    pub async fn node_of_token(&self, token: &str) -> Result<String, AuthError> {
        if let Some((at, answer)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(token)
            && at.elapsed() < CACHE_FOR
        {
            return answer.clone().map_err(AuthError::Rejected);
        }
        if !self.budget.lock().unwrap_or_else(|p| p.into_inner()).take(
            Instant::now(),
            REVIEW_BURST,
            REVIEWS_PER_SECOND,
        ) {
            return Err(AuthError::Review(
                "too many token reviews right now; retry".into(),
            ));
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        // An API server that cannot answer is not an answer: not cached.
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Review(e.to_string()))?;
        let answer = node_of(reviewed.status.as_ref(), &self.agent_user, &self.audience);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_ENTRIES {
            cache.clear();
        }
        let kept = answer
            .as_ref()
            .map(Clone::clone)
            .map_err(ToString::to_string);
        cache.insert(token.to_owned(), (Instant::now(), kept));
        answer
    }
}

/// The node a reviewed token speaks for, if it is the agents' own, valid for the CA's
/// audience, and bound to a pod on a node.
pub fn node_of(
    status: Option<&TokenReviewStatus>,
    agent_user: &str,
    audience: &str,
) -> Result<String, AuthError> {
    let status = status.ok_or_else(|| AuthError::Rejected("no review status".into()))?;
    if status.authenticated != Some(true) {
        let why = status
            .error
            .clone()
            .unwrap_or_else(|| "not authenticated".into());
        return Err(AuthError::Rejected(why));
    }
    // The answer's audiences are those of the token that the review asked for: ours
    // must be among them (a token for another audience is not for the CA).
    if !status.audiences.iter().flatten().any(|a| a == audience) {
        return Err(AuthError::Rejected(format!(
            "the token is not for audience {audience}"
        )));
    }
    let user = status.user.as_ref();
    let username = user.and_then(|u| u.username.as_deref()).unwrap_or("");
    if username != agent_user {
        return Err(AuthError::Rejected(format!(
            "{username:?} is not the agents' service account {agent_user}"
        )));
    }
    let nodes = user
        .and_then(|u| u.extra.as_ref())
        .and_then(|e| e.get(NODE_NAME_EXTRA))
        .map(Vec::as_slice)
        .unwrap_or_default();
    match nodes {
        [node] if !node.is_empty() => Ok(node.clone()),
        _ => Err(AuthError::Rejected(
            "the token is not bound to a pod on a node (not a projected token?)".into(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const AGENT: &str = "system:serviceaccount:mesh-system:mesh-agent";

    fn status(json: serde_json::Value) -> TokenReviewStatus {
        serde_json::from_value(json).unwrap()
    }

    fn bound(user: &str, node: &str, audiences: &[&str]) -> TokenReviewStatus {
        status(serde_json::json!({
            "authenticated": true,
            "audiences": audiences,
            "user": {"username": user, "extra": {NODE_NAME_EXTRA: [node]}}
        }))
    }

    #[test]
    fn reviews_are_budgeted_and_the_budget_refills() {
        let t0 = Instant::now();
        let mut b = Bucket::full(REVIEW_BURST, t0);
        let mut take = |at| b.take(at, REVIEW_BURST, REVIEWS_PER_SECOND);
        let burst = (0..1000).filter(|_| take(t0)).count();
        assert_eq!(burst, REVIEW_BURST as usize);
        assert!(!take(t0));
        // Half a second later: half a second's worth, no more.
        let later = t0 + Duration::from_millis(500);
        let refilled = (0..1000).filter(|_| take(later)).count();
        assert_eq!(refilled, (REVIEWS_PER_SECOND / 2.0) as usize);
    }

    #[test]
    fn the_agents_bound_token_names_its_node() {
        let s = bound(AGENT, "node-1", &["mesh-ca"]);
        assert_eq!(node_of(Some(&s), AGENT, "mesh-ca").unwrap(), "node-1");
    }

    #[test]
    fn any_other_token_is_refused_with_the_reason() {
        let cases = [
            (
                bound("system:serviceaccount:shop:web", "node-1", &["mesh-ca"]),
                "not the agents' service account",
            ),
            (
                bound(AGENT, "node-1", &["https://kubernetes.default.svc"]),
                "audience",
            ),
            (
                status(
                    serde_json::json!({"authenticated": true, "audiences": ["mesh-ca"],
                    "user": {"username": AGENT}}),
                ),
                "not bound to a pod on a node",
            ),
            (
                status(serde_json::json!({"authenticated": false, "error": "token expired"})),
                "token expired",
            ),
            (
                status(
                    serde_json::json!({"authenticated": true, "audiences": ["mesh-ca"],
                    "user": {"username": AGENT, "extra": {NODE_NAME_EXTRA: ["a", "b"]}}}),
                ),
                "not bound",
            ),
        ];
        for (s, why) in cases {
            let e = node_of(Some(&s), AGENT, "mesh-ca").unwrap_err().to_string();
            assert!(e.contains(why), "{e} (want {why})");
        }
        assert!(node_of(None, AGENT, "mesh-ca").is_err());
    }
}
