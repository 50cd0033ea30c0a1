//! Who is calling the CA. The CA signs for a node only what runs on that node, so the
//! node's name must come from a credential, never from the request itself.
//!
//! Standalone mode uses bootstrap tokens: a file on the CA with one `<node> <token>`
//! line per node, and on each node a file with that node's token. It is re-read on each
//! request, so tokens can be added and revoked without a restart. On Kubernetes the
//! token is the agent's projected service-account token, reviewed by the API server
//! (`token_review.rs`).
use std::path::PathBuf;

use subtle::ConstantTimeEq as _;
use tonic::metadata::MetadataMap;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token in the request")]
    Missing,
    #[error("unknown token")]
    Unknown,
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The API server could not review the token (not the caller's fault).
    #[error("token review failed: {0}")]
    Review(String),
    #[error("token refused: {0}")]
    Rejected(String),
}

/// How the CA learns which node is calling.
pub enum NodeAuth {
    /// Bootstrap tokens from a file.
    Tokens(TokenFile),
    /// Service-account tokens, reviewed by the Kubernetes API server.
    TokenReview(Box<super::token_review::TokenReviewer>),
}

impl NodeAuth {
    /// The name of the node the request comes from.
    pub async fn authenticate(&self, metadata: &MetadataMap) -> Result<String, AuthError> {
        let token = bearer(metadata)?;
        match self {
            NodeAuth::Tokens(file) => file.node_of_token(token),
            NodeAuth::TokenReview(reviewer) => reviewer.node_of_token(token).await,
        }
    }
}

fn bearer(metadata: &MetadataMap) -> Result<&str, AuthError> {
    metadata
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Missing)
}

pub struct TokenFile {
    pub path: PathBuf,
}

impl TokenFile {
    fn node_of_token(&self, token: &str) -> Result<String, AuthError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| AuthError::Read {
            path: self.path.clone(),
            source,
        })?;
        find_node(&text, token).ok_or(AuthError::Unknown)
    }
}

/// Every line is compared in constant time, so timing tells nothing about which
/// token (or how much of one) matched.
fn find_node(text: &str, token: &str) -> Option<String> {
    let mut found = None;
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut parts = line.split_whitespace();
        if let (Some(node), Some(t)) = (parts.next(), parts.next())
            && bool::from(t.as_bytes().ct_eq(token.as_bytes()))
        {
            found = Some(node.to_owned());
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_tokens_to_nodes() {
        let text = "# node token\nnode-1 aaaa\n\nnode-2 bbbb\n";
        assert_eq!(find_node(text, "bbbb").as_deref(), Some("node-2"));
        assert_eq!(find_node(text, "aaaa").as_deref(), Some("node-1"));
        assert_eq!(find_node(text, "aaa"), None);
        assert_eq!(find_node(text, "node-1"), None);
    }
}
