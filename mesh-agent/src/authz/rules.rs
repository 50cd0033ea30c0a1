//! Does one policy match one connection or one request? Istio's semantics: within a
//! field any value matches, fields are ANDed, `from` and `to` lists are ORed, a rule
//! needs a matching `from`, a matching `to` and every `when`, and rules are ORed.
//!
//! L7 fields (hosts, methods, paths, `request.headers`) on a connection that is not an
//! HTTP request cannot be decided. They are read the way that fails closed, as
//! ztunnel does: in an ALLOW (or AUDIT) policy they never match, so the rule grants
//! nothing; in a DENY policy they match, so the rule denies the whole connection.
use std::net::IpAddr;

use http::HeaderMap;

use crate::config::{
    AuthorizationPolicy, AuthzAction, Condition, OperationMatch, Rule, SourceMatch,
};

/// How L7 fields are read on a connection, where there is no request to read them
/// from: the way that fails closed (the decision for the connection), or the other
/// way (could any of its requests be allowed?).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    FailClosed,
    Lenient,
}

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

/// What authorization knows about one HTTP request, on top of its connection.
#[derive(Debug, Clone, Copy)]
pub struct RequestAttrs<'a> {
    pub method: &'a str,
    /// Without the query.
    pub path: &'a str,
    /// The authority (`:authority` or `Host`), possibly with a port.
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

impl<'a> RequestAttrs<'a> {
    /// From the request as it will be delivered: the query is not part of the path.
    pub fn new(
        method: &'a str,
        path_and_query: &'a str,
        host: &'a str,
        headers: &'a HeaderMap,
    ) -> RequestAttrs<'a> {
        RequestAttrs {
            method,
            path: path_and_query
                .split_once('?')
                .map_or(path_and_query, |(p, _)| p),
            host,
            headers,
        }
    }
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

/// A path template is `/`-separated segments, each literal, `{*}` (exactly one
/// segment) or, last only, `{**}` (one or more segments).
pub fn valid_template(t: &str) -> bool {
    let Some(rest) = t.strip_prefix('/') else {
        return false;
    };
    let segments: Vec<&str> = rest.split('/').collect();
    segments.iter().enumerate().all(|(i, s)| match *s {
        "{*}" => true,
        "{**}" => i + 1 == segments.len(),
        s => !s.is_empty() && !s.contains('{') && !s.contains('}') && !s.contains('*'),
    })
}

fn template_match(t: &str, path: &str) -> bool {
    let (Some(t), Some(p)) = (t.strip_prefix('/'), path.strip_prefix('/')) else {
        return false;
    };
    let mut parts = p.split('/');
    for seg in t.split('/') {
        match seg {
            "{**}" => {
                // One or more non-empty segments remain.
                let rest: Vec<&str> = parts.by_ref().collect();
                return !rest.is_empty() && rest.iter().all(|s| !s.is_empty());
            }
            "{*}" => match parts.next() {
                Some(s) if !s.is_empty() => {}
                _ => return false,
            },
            lit => {
                if parts.next() != Some(lit) {
                    return false;
                }
            }
        }
    }
    parts.next().is_none()
}

fn path_match(pattern: &str, path: &str) -> bool {
    if pattern.contains('{') {
        template_match(pattern, path)
    } else {
        string_match(pattern, Some(path))
    }
}

/// Hosts compare without case, and a pattern without a port also matches the host
/// with any port (`web` matches `web:8080`), as Istio generates both.
fn host_match(pattern: &str, host: &str) -> bool {
    let (p, h) = (pattern.to_ascii_lowercase(), host.to_ascii_lowercase());
    string_match(&p, Some(&h)) || strip_port(&h).is_some_and(|bare| string_match(&p, Some(bare)))
}

/// `name:port` -> `name` (an IPv6 literal is bracketed, so its colons are not a port).
fn strip_port(h: &str) -> Option<&str> {
    let (name, port) = h.rsplit_once(':')?;
    (!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())).then_some(name)
}

/// A `request.headers[...]` condition on a request that may carry the header several
/// times. An application may read any of the values (the first, the last, all of
/// them joined), so the condition is read the way that fails closed, as undecidable
/// fields are: in a DENY policy it holds if it holds for any value, in an ALLOW (or
/// AUDIT) policy only if it holds for every one. A value that is not text is read
/// with its bytes replaced, not as absent: an absent header must not be the way past
/// a DENY on its presence.
fn header_condition(
    headers: &HeaderMap,
    name: &str,
    matches: impl Fn(Option<&str>) -> bool,
    deny: bool,
) -> bool {
    let mut all = headers
        .get_all(name)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()));
    let Some(first) = all.next() else {
        return matches(None);
    };
    let first = matches(Some(&first));
    if deny {
        first || all.any(|v| matches(Some(&v)))
    } else {
        first && all.all(|v| matches(Some(&v)))
    }
}

fn any_match(patterns: &[String], value: Option<&str>) -> bool {
    patterns.iter().any(|p| string_match(p, value))
}

/// A positive list must have a match (when present); a `not` list must have none.
fn field(values: &[String], not_values: &[String], value: Option<&str>) -> bool {
    (values.is_empty() || any_match(values, value))
        && (not_values.is_empty() || !any_match(not_values, value))
}

/// The same, with a matcher of one's own.
fn field_by(values: &[String], not_values: &[String], m: impl Fn(&str) -> bool) -> bool {
    (values.is_empty() || values.iter().any(|v| m(v)))
        && (not_values.is_empty() || !not_values.iter().any(|v| m(v)))
}

fn listed<T: PartialEq>(values: &[T], not_values: &[T], v: &T) -> bool {
    (values.is_empty() || values.contains(v)) && !not_values.contains(v)
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
    /// `undecidable`: what an L7 field counts as when there is no request.
    pub fn matches(
        &self,
        c: &ConnAttrs,
        req: Option<&RequestAttrs<'_>>,
        undecidable: bool,
    ) -> bool {
        let l4 = listed(&self.ports, &self.not_ports, &c.dest_port);
        if !l4 || !self.has_l7() {
            return l4;
        }
        let Some(r) = req else {
            return undecidable;
        };
        field_by(&self.hosts, &self.not_hosts, |p| host_match(p, r.host))
            && field(&self.methods, &self.not_methods, Some(r.method))
            && field_by(&self.paths, &self.not_paths, |p| path_match(p, r.path))
    }
}

impl Condition {
    pub fn matches(
        &self,
        c: &ConnAttrs,
        req: Option<&RequestAttrs<'_>>,
        undecidable: bool,
    ) -> bool {
        match self {
            Condition::RequestHeader {
                name,
                values,
                not_values,
            } => match req {
                Some(r) => header_condition(
                    r.headers,
                    name,
                    |v| field(values, not_values, v),
                    undecidable,
                ),
                None => undecidable,
            },
            Condition::SourceIp { values, not_values } => {
                let inside = |b: &[ipnet::IpNet]| b.iter().any(|n| n.contains(&c.source_ip));
                (values.is_empty() || inside(values)) && !inside(not_values)
            }
            Condition::SourceNamespace { values, not_values } => {
                field(values, not_values, c.namespace.as_deref())
            }
            Condition::SourcePrincipal { values, not_values } => {
                field(values, not_values, c.principal.as_deref())
            }
            Condition::DestinationPort { values, not_values } => {
                listed(values, not_values, &c.dest_port)
            }
        }
    }
}

impl Rule {
    pub fn matches(
        &self,
        c: &ConnAttrs,
        req: Option<&RequestAttrs<'_>>,
        undecidable: bool,
    ) -> bool {
        (self.from.is_empty() || self.from.iter().any(|f| f.matches(c)))
            && (self.to.is_empty() || self.to.iter().any(|t| t.matches(c, req, undecidable)))
            && self.when.iter().all(|w| w.matches(c, req, undecidable))
    }
}

impl AuthorizationPolicy {
    /// Whether the policy matches a connection (`req` is `None`) or a request.
    pub fn matches(&self, c: &ConnAttrs, req: Option<&RequestAttrs<'_>>) -> bool {
        // Fail closed on what cannot be decided: see the module comment.
        self.matches_reading(c, req, Reading::FailClosed)
    }

    /// `matches`, with the L7 fields of a connection read as `reading` says.
    pub fn matches_reading(
        &self,
        c: &ConnAttrs,
        req: Option<&RequestAttrs<'_>>,
        reading: Reading,
    ) -> bool {
        let fail_closed = self.action == AuthzAction::Deny;
        let undecidable = match reading {
            Reading::FailClosed => fail_closed,
            Reading::Lenient => !fail_closed,
        };
        self.rules.iter().any(|r| r.matches(c, req, undecidable))
    }

    /// Whether any rule needs an HTTP request to be decided.
    pub fn has_l7(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.to.iter().any(OperationMatch::has_l7) || r.when.iter().any(Condition::is_l7))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_match_whole_segments() {
        assert!(valid_template("/admin/{*}"));
        assert!(valid_template("/a/{*}/b/{**}"));
        assert!(!valid_template("/a/{**}/b"));
        assert!(!valid_template("a/{*}"));
        assert!(!valid_template("/a/x{*}"));
        assert!(template_match("/admin/{*}", "/admin/users"));
        assert!(!template_match("/admin/{*}", "/admin/users/1"));
        assert!(!template_match("/admin/{*}", "/admin/"));
        assert!(!template_match("/admin/{*}", "/admin"));
        assert!(template_match("/a/{*}/b/{**}", "/a/x/b/c/d"));
        assert!(!template_match("/a/{*}/b/{**}", "/a/x/b"));
        assert!(!template_match("/a/{*}/b/{**}", "/a/x/b/"));
        assert!(template_match("/pkg.Svc/{*}", "/pkg.Svc/Get"));
    }

    #[test]
    fn hosts_ignore_case_and_port() {
        assert!(host_match(
            "web.default.svc.cluster.local",
            "WEB.default.svc.cluster.local:80"
        ));
        assert!(host_match("*.example.com", "api.example.com:8443"));
        assert!(!host_match("web", "webx"));
        assert!(host_match("web:80", "web:80"));
        assert!(!host_match("web:81", "web:80"));
        assert!(host_match("[::1]", "[::1]:80"));
    }

    #[test]
    fn a_repeated_header_holds_for_a_deny_if_any_value_does_and_for_an_allow_if_all_do() {
        let is = |want: &'static str| move |v: Option<&str>| v == Some(want);
        let mut h = HeaderMap::new();
        assert!(!header_condition(&h, "x-role", is("admin"), true));
        h.append("x-role", http::HeaderValue::from_static("guest"));
        assert!(header_condition(&h, "X-Role", is("guest"), false));
        h.append("x-role", http::HeaderValue::from_static("admin"));
        // A DENY on `admin` sees the second value; an ALLOW on `guest` needs both.
        assert!(header_condition(&h, "x-role", is("admin"), true));
        assert!(!header_condition(&h, "x-role", is("guest"), false));
        // A value that is not text still counts as present.
        let mut h = HeaderMap::new();
        h.append("x-debug", http::HeaderValue::from_bytes(b"\xff").unwrap());
        assert!(header_condition(&h, "x-debug", |v| v.is_some(), true));
    }
}
