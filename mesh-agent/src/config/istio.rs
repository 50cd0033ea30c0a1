//! `security.istio.io/v1` PeerAuthentication and AuthorizationPolicy, the documented
//! subset (docs/config.md). The wire types refuse unknown fields, so a field the mesh
//! does not implement (an L7 `methods`, a `when`, `portLevelMtls`...) is an error that
//! names it, never a rule silently ignored.
use std::collections::BTreeMap;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::{
    error::FieldError,
    model::{
        AuthorizationPolicy, AuthzAction, MtlsMode, OperationMatch, PeerAuthentication, Rule,
        SourceMatch,
    },
    translate::object_id,
};

type Result<T> = std::result::Result<T, FieldError>;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationObject {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: ObjectMeta,
    #[serde(default)]
    spec: PeerAuthenticationSpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PeerAuthenticationSpec {
    selector: Option<WorkloadSelector>,
    mtls: Option<MutualTls>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkloadSelector {
    #[serde(default)]
    match_labels: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MutualTls {
    mode: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AuthorizationPolicyObject {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: ObjectMeta,
    #[serde(default)]
    spec: AuthorizationPolicySpec,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AuthorizationPolicySpec {
    selector: Option<WorkloadSelector>,
    action: Option<String>,
    rules: Option<Vec<RuleObject>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleObject {
    from: Option<Vec<From>>,
    to: Option<Vec<To>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct From {
    source: SourceObject,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SourceObject {
    #[serde(default)]
    principals: Vec<String>,
    #[serde(default)]
    not_principals: Vec<String>,
    #[serde(default)]
    namespaces: Vec<String>,
    #[serde(default)]
    not_namespaces: Vec<String>,
    #[serde(default)]
    ip_blocks: Vec<String>,
    #[serde(default)]
    not_ip_blocks: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct To {
    operation: OperationObject,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct OperationObject {
    #[serde(default)]
    ports: Vec<String>,
    #[serde(default)]
    not_ports: Vec<String>,
}

pub fn peer_authentication(obj: &PeerAuthenticationObject) -> Result<PeerAuthentication> {
    let id = object_id(&obj.metadata)?;
    let mode = match obj.spec.mtls.as_ref().and_then(|m| m.mode.as_deref()) {
        None | Some("UNSET") => None,
        Some("STRICT") => Some(MtlsMode::Strict),
        Some("PERMISSIVE") => Some(MtlsMode::Permissive),
        Some(other) => {
            return Err(FieldError::new(
                "spec.mtls.mode",
                format!("{other:?} is not supported; expected STRICT, PERMISSIVE or UNSET"),
            ));
        }
    };
    Ok(PeerAuthentication {
        id,
        selector: obj.spec.selector.as_ref().map(|s| s.match_labels.clone()),
        mode,
    })
}

pub fn authorization_policy(obj: &AuthorizationPolicyObject) -> Result<AuthorizationPolicy> {
    let id = object_id(&obj.metadata)?;
    let action = match obj.spec.action.as_deref() {
        None | Some("ALLOW") => AuthzAction::Allow,
        Some("DENY") => AuthzAction::Deny,
        Some("AUDIT") => AuthzAction::Audit,
        Some(other) => {
            return Err(FieldError::new(
                "spec.action",
                format!("{other:?} is not supported; expected ALLOW, DENY or AUDIT"),
            ));
        }
    };
    let mut rules = Vec::new();
    for (i, r) in obj.spec.rules.iter().flatten().enumerate() {
        let mut rule = Rule::default();
        for (j, f) in r.from.iter().flatten().enumerate() {
            let field = format!("spec.rules[{i}].from[{j}].source");
            rule.from.push(source(&f.source, &field)?);
        }
        for (j, t) in r.to.iter().flatten().enumerate() {
            let field = format!("spec.rules[{i}].to[{j}].operation");
            rule.to.push(OperationMatch {
                ports: ports(&t.operation.ports, &format!("{field}.ports"))?,
                not_ports: ports(&t.operation.not_ports, &format!("{field}.notPorts"))?,
            });
        }
        rules.push(rule);
    }
    Ok(AuthorizationPolicy {
        id,
        selector: obj.spec.selector.as_ref().map(|s| s.match_labels.clone()),
        action,
        rules,
    })
}

fn source(s: &SourceObject, field: &str) -> Result<SourceMatch> {
    let m = SourceMatch {
        principals: s.principals.clone(),
        not_principals: s.not_principals.clone(),
        namespaces: s.namespaces.clone(),
        not_namespaces: s.not_namespaces.clone(),
        ip_blocks: ip_blocks(&s.ip_blocks, &format!("{field}.ipBlocks"))?,
        not_ip_blocks: ip_blocks(&s.not_ip_blocks, &format!("{field}.notIpBlocks"))?,
    };
    for (name, values) in [
        ("principals", &m.principals),
        ("notPrincipals", &m.not_principals),
        ("namespaces", &m.namespaces),
        ("notNamespaces", &m.not_namespaces),
    ] {
        if let Some((k, _)) = values.iter().enumerate().find(|(_, v)| !valid_pattern(v)) {
            return Err(FieldError::new(
                format!("{field}.{name}[{k}]"),
                "empty, or `*` in the middle (only a prefix or suffix `*` is supported)",
            ));
        }
    }
    Ok(m)
}

/// Istio's string match: exact, `prefix*`, `*suffix`, or `*`.
fn valid_pattern(p: &str) -> bool {
    if p.is_empty() {
        return false;
    }
    let inner = p.strip_prefix('*').unwrap_or(p);
    let inner = inner.strip_suffix('*').unwrap_or(inner);
    // `*` alone is fine; `*x*` (a substring match) is not something Istio supports.
    let both_ends = p.len() > 1 && p.starts_with('*') && p.ends_with('*');
    !(inner.contains('*') || both_ends)
}

fn ip_blocks(values: &[String], field: &str) -> Result<Vec<IpNet>> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.parse::<IpNet>()
                .or_else(|_| v.parse::<std::net::IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    FieldError::new(
                        format!("{field}[{i}]"),
                        format!("{v:?} is not an IP address or CIDR block"),
                    )
                })
        })
        .collect()
}

fn ports(values: &[String], field: &str) -> Result<Vec<u16>> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| match v.parse::<u16>() {
            Ok(p) if p != 0 => Ok(p),
            _ => Err(FieldError::new(
                format!("{field}[{i}]"),
                format!("{v:?} is not a port number (1-65535)"),
            )),
        })
        .collect()
}
