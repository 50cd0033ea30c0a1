//! `security.istio.io/v1` PeerAuthentication and AuthorizationPolicy, the documented
//! subset (docs/config.md). The wire types refuse unknown fields, so a field the mesh
//! does not implement (`requestPrincipals`, a `when` on `request.auth.claims`,
//! `portLevelMtls`...) is an error that names it, never a rule silently ignored.
use std::collections::BTreeMap;

use ipnet::IpNet;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::{
    error::FieldError,
    model::{
        AuthorizationPolicy, AuthzAction, Condition, MtlsMode, OperationMatch, PeerAuthentication,
        Rule, SourceMatch,
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
    when: Option<Vec<ConditionObject>>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConditionObject {
    key: String,
    #[serde(default)]
    values: Vec<String>,
    #[serde(default)]
    not_values: Vec<String>,
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
    #[serde(default)]
    hosts: Vec<String>,
    #[serde(default)]
    not_hosts: Vec<String>,
    #[serde(default)]
    methods: Vec<String>,
    #[serde(default)]
    not_methods: Vec<String>,
    #[serde(default)]
    paths: Vec<String>,
    #[serde(default)]
    not_paths: Vec<String>,
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
            rule.to.push(operation(&t.operation, &field)?);
        }
        for (j, c) in r.when.iter().flatten().enumerate() {
            rule.when
                .push(condition(c, &format!("spec.rules[{i}].when[{j}]"))?);
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

fn operation(o: &OperationObject, field: &str) -> Result<OperationMatch> {
    let m = OperationMatch {
        ports: ports(&o.ports, &format!("{field}.ports"))?,
        not_ports: ports(&o.not_ports, &format!("{field}.notPorts"))?,
        hosts: o.hosts.clone(),
        not_hosts: o.not_hosts.clone(),
        methods: o.methods.clone(),
        not_methods: o.not_methods.clone(),
        paths: o.paths.clone(),
        not_paths: o.not_paths.clone(),
    };
    for (name, values) in [
        ("hosts", &m.hosts),
        ("notHosts", &m.not_hosts),
        ("methods", &m.methods),
        ("notMethods", &m.not_methods),
    ] {
        patterns(values, &format!("{field}.{name}"))?;
    }
    for (name, values) in [("paths", &m.paths), ("notPaths", &m.not_paths)] {
        for (k, v) in values.iter().enumerate() {
            let ok = if v.contains('{') {
                crate::authz::valid_template(v)
            } else {
                valid_pattern(v)
            };
            if !ok {
                return Err(FieldError::new(
                    format!("{field}.{name}[{k}]"),
                    format!(
                        "{v:?} is neither an Istio string match (exact, prefix*, *suffix, *) \
                         nor a path template (/-separated segments, {{*}} for one segment, \
                         {{**}} for the rest, last)"
                    ),
                ));
            }
        }
    }
    Ok(m)
}

/// A `when` condition; the keys are the ones the mesh can evaluate.
fn condition(c: &ConditionObject, field: &str) -> Result<Condition> {
    if c.values.is_empty() && c.not_values.is_empty() {
        return Err(FieldError::new(
            format!("{field}.values"),
            "a condition needs values or notValues",
        ));
    }
    let strings = || -> Result<(Vec<String>, Vec<String>)> {
        patterns(&c.values, &format!("{field}.values"))?;
        patterns(&c.not_values, &format!("{field}.notValues"))?;
        Ok((c.values.clone(), c.not_values.clone()))
    };
    let key = c.key.trim();
    if let Some(name) = key
        .strip_prefix("request.headers[")
        .and_then(|k| k.strip_suffix(']'))
    {
        if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
            return Err(FieldError::new(
                format!("{field}.key"),
                format!("{name:?} is not a header name"),
            ));
        }
        let (values, not_values) = strings()?;
        return Ok(Condition::RequestHeader {
            name: name.to_ascii_lowercase(),
            values,
            not_values,
        });
    }
    Ok(match key {
        "source.ip" => Condition::SourceIp {
            values: ip_blocks(&c.values, &format!("{field}.values"))?,
            not_values: ip_blocks(&c.not_values, &format!("{field}.notValues"))?,
        },
        "source.namespace" => {
            let (values, not_values) = strings()?;
            Condition::SourceNamespace { values, not_values }
        }
        "source.principal" => {
            let (values, not_values) = strings()?;
            Condition::SourcePrincipal { values, not_values }
        }
        "destination.port" => Condition::DestinationPort {
            values: ports(&c.values, &format!("{field}.values"))?,
            not_values: ports(&c.not_values, &format!("{field}.notValues"))?,
        },
        other => {
            return Err(FieldError::new(
                format!("{field}.key"),
                format!(
                    "{other:?} is not supported; expected request.headers[NAME], source.ip, \
                     source.namespace, source.principal or destination.port"
                ),
            ));
        }
    })
}

fn patterns(values: &[String], field: &str) -> Result<()> {
    match values.iter().enumerate().find(|(_, v)| !valid_pattern(v)) {
        Some((k, _)) => Err(FieldError::new(
            format!("{field}[{k}]"),
            "empty, or `*` in the middle (only a prefix or suffix `*` is supported)",
        )),
        None => Ok(()),
    }
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
        patterns(values, &format!("{field}.{name}"))?;
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
