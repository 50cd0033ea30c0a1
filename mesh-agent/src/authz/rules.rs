//! Does one policy match one connection? Istio's semantics for the L4 fields: within a
//! field any value matches, fields of a source are ANDed, `from` and `to` lists are
//! ORed, a rule needs a matching `from` and a matching `to`, and rules are ORed.
use std::net::IpAddr;

use crate::config::{AuthorizationPolicy, OperationMatch, Rule, SourceMatch};

/// What authorization knows about a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAttrs {
    /// Istio principal form (`td/ns/x/sa/y`); `None` for plaintext.
    pub principal: Option<String>,
    /// From the peer identity; `None` for plaintext.
    pub namespace: Option<String>,
    pub source_ip: IpAddr,
    pub dest_port: u16,
}

/// `*`, `prefix*`, `*suffix` or exact. `*` needs a value: it does not match plaintext.
pub fn string_match(pattern: &str, value: Option<&str>) -> bool {
    let Some(value) = value else { return false };
    if pattern == "*" {
        return !value.is_empty();
    }
    if let Some(suffix) = pattern.strip_prefix('*') {
        return value.ends_with(suffix);
    }
    if let Some(prefix) = pattern.strip_suffix('*') {
        return value.starts_with(prefix);
    }
    pattern == value
}

fn any_match(patterns: &[String], value: Option<&str>) -> bool {
    patterns.iter().any(|p| string_match(p, value))
}

/// A positive list must have a match (when present); a `not` list must have none.
fn field(values: &[String], not_values: &[String], value: Option<&str>) -> bool {
    (values.is_empty() || any_match(values, value))
        && (not_values.is_empty() || !any_match(not_values, value))
}

impl SourceMatch {
    pub fn matches(&self, c: &ConnAttrs) -> bool {
        let in_blocks = |blocks: &[ipnet::IpNet]| blocks.iter().any(|b| b.contains(&c.source_ip));
        field(
            &self.principals,
            &self.not_principals,
            c.principal.as_deref(),
        ) && field(
            &self.namespaces,
            &self.not_namespaces,
            c.namespace.as_deref(),
        ) && (self.ip_blocks.is_empty() || in_blocks(&self.ip_blocks))
            && (self.not_ip_blocks.is_empty() || !in_blocks(&self.not_ip_blocks))
    }
}

impl OperationMatch {
    pub fn matches(&self, c: &ConnAttrs) -> bool {
        (self.ports.is_empty() || self.ports.contains(&c.dest_port))
            && !self.not_ports.contains(&c.dest_port)
    }
}

impl Rule {
    pub fn matches(&self, c: &ConnAttrs) -> bool {
        (self.from.is_empty() || self.from.iter().any(|f| f.matches(c)))
            && (self.to.is_empty() || self.to.iter().any(|t| t.matches(c)))
    }
}

impl AuthorizationPolicy {
    pub fn matches(&self, c: &ConnAttrs) -> bool {
        self.rules.iter().any(|r| r.matches(c))
    }
}
