//! `gateway.networking.k8s.io/v1` HTTPRoute and GRPCRoute attached to Services (GAMMA),
//! the wire objects and their translation into the model (`route.rs`). Unknown fields
//! are refused by the wire types; fields of the standard channel this agent does not
//! implement yet (sessionPersistence, ExtensionRef) are
//! refused by name, never silently ignored. Limits are Gateway API's own.
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;

use super::{
    error::FieldError,
    model::NamespacedName,
    route::{
        Backend, Cors, Filter, HeaderMatch, HeaderMods, Mirror, ParentRef, PathMatch, PathModifier,
        QueryMatch, Redirect, Retry, Rewrite, Route, RouteKind, RouteMatch, RouteRule, StrMatch,
        Timeouts,
    },
    translate::object_id,
};

type Result<T> = std::result::Result<T, FieldError>;

/// Gateway API's limits per route.
const MAX_RULES: usize = 16;
const MAX_MATCHES_PER_RULE: usize = 64;
const MAX_MATCHES: usize = 128;
const MAX_BACKENDS: usize = 16;
const MAX_FILTERS: usize = 16;
const MAX_PARENTS: usize = 32;
const MAX_HEADER_MATCHES: usize = 16;
/// A compiled regex may take at most this much memory.
pub const REGEX_SIZE_LIMIT: usize = 64 * 1024;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteObject {
    #[serde(rename = "apiVersion")]
    _api_version: String,
    #[serde(rename = "kind")]
    _kind: String,
    metadata: ObjectMeta,
    spec: RouteSpec,
    /// Written by controllers; read back from the API, never used.
    #[serde(default, rename = "status")]
    _status: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RouteSpec {
    #[serde(default)]
    parent_refs: Vec<ParentRefObject>,
    /// GAMMA: a mesh route matches by the Service's address, never by `Host`; the
    /// field is accepted (routes are shared with gateways) and has no effect.
    #[serde(default, rename = "hostnames")]
    _hostnames: Vec<String>,
    #[serde(default)]
    rules: Vec<RuleObject>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ParentRefObject {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<i32>,
    section_name: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RuleObject {
    name: Option<String>,
    #[serde(default)]
    matches: Vec<MatchObject>,
    #[serde(default)]
    filters: Vec<FilterObject>,
    #[serde(default)]
    backend_refs: Vec<BackendRefObject>,
    timeouts: Option<TimeoutsObject>,
    retry: Option<RetryObject>,
    session_persistence: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MatchObject {
    path: Option<PathObject>,
    #[serde(default)]
    headers: Vec<NameValueMatch>,
    #[serde(default)]
    query_params: Vec<NameValueMatch>,
    /// HTTPRoute: an HTTP method; GRPCRoute: `{type, service, method}`.
    method: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PathObject {
    #[serde(rename = "type")]
    kind: Option<String>,
    value: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NameValueMatch {
    #[serde(rename = "type")]
    kind: Option<String>,
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GrpcMethodObject {
    #[serde(rename = "type")]
    kind: Option<String>,
    service: Option<String>,
    method: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FilterObject {
    #[serde(rename = "type")]
    kind: String,
    request_header_modifier: Option<HeaderModsObject>,
    response_header_modifier: Option<HeaderModsObject>,
    request_redirect: Option<RedirectObject>,
    url_rewrite: Option<RewriteObject>,
    request_mirror: Option<MirrorObject>,
    cors: Option<CorsObject>,
    /// Refused by type below; accepted here so the error names the type.
    #[serde(rename = "extensionRef")]
    _extension_ref: Option<serde_yaml_ng::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HeaderModsObject {
    #[serde(default)]
    set: Vec<HeaderObject>,
    #[serde(default)]
    add: Vec<HeaderObject>,
    #[serde(default)]
    remove: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct HeaderObject {
    name: String,
    value: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RedirectObject {
    scheme: Option<String>,
    hostname: Option<String>,
    path: Option<PathModifierObject>,
    port: Option<i32>,
    status_code: Option<i32>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RewriteObject {
    hostname: Option<String>,
    path: Option<PathModifierObject>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct PathModifierObject {
    #[serde(rename = "type")]
    kind: String,
    replace_full_path: Option<String>,
    replace_prefix_match: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct BackendRefObject {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<i32>,
    weight: Option<i32>,
    #[serde(default)]
    filters: Vec<FilterObject>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CorsObject {
    #[serde(default)]
    allow_origins: Vec<String>,
    #[serde(default)]
    allow_methods: Vec<String>,
    #[serde(default)]
    allow_headers: Vec<String>,
    #[serde(default)]
    expose_headers: Vec<String>,
    allow_credentials: Option<bool>,
    max_age: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MirrorObject {
    backend_ref: MirrorRefObject,
    percent: Option<i64>,
    fraction: Option<FractionObject>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct MirrorRefObject {
    group: Option<String>,
    kind: Option<String>,
    name: String,
    namespace: Option<String>,
    port: Option<i32>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct FractionObject {
    numerator: i64,
    denominator: Option<i64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RetryObject {
    #[serde(default)]
    codes: Option<Vec<i64>>,
    attempts: Option<i64>,
    backoff: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TimeoutsObject {
    request: Option<String>,
    backend_request: Option<String>,
}

/// A route none of whose parents is a Service belongs to another controller (a
/// Gateway's, say), read from the raw document so that features the mesh does not
/// serve never fail it. A route that names no parent at all is the mesh's to refuse.
pub fn is_foreign(doc: &serde_json::Value) -> bool {
    let Some(parents) = doc["spec"]["parentRefs"].as_array() else {
        return false;
    };
    !parents.is_empty() && !parents.iter().any(is_mesh_parent_doc)
}

/// A Service parent, of a parentRef as written (see `is_mesh_parent`).
pub fn is_mesh_parent_doc(p: &serde_json::Value) -> bool {
    is_core_group(p.get("group").and_then(|g| g.as_str()))
        && p.get("kind").and_then(|k| k.as_str()) == Some("Service")
}

/// Only the metadata of a route that is not the mesh's.
#[derive(Debug, Deserialize)]
pub struct ForeignRouteObject {
    metadata: ObjectMeta,
}

/// A route that is not the mesh's: kept (so the store knows it) with no parent and
/// no rule, so it attaches nowhere.
pub fn foreign_route(obj: &ForeignRouteObject, kind: RouteKind) -> Result<Route> {
    Ok(Route {
        id: object_id(&obj.metadata)?,
        kind,
        created: None,
        parents: Vec::new(),
        rules: Vec::new(),
    })
}

/// Translates an HTTPRoute (`kind` Http) or a GRPCRoute (`kind` Grpc).
pub fn route(obj: &RouteObject, kind: RouteKind) -> Result<Route> {
    let id = object_id(&obj.metadata)?;
    let created = obj
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second());
    let spec = &obj.spec;
    if spec.parent_refs.is_empty() {
        return Err(FieldError::new(
            "spec.parentRefs",
            "is required: a mesh route attaches to a Service",
        ));
    }
    if spec.parent_refs.len() > MAX_PARENTS {
        return Err(too_many("spec.parentRefs", MAX_PARENTS));
    }
    // Parents other than a Service (a Gateway, by Gateway API's defaults) belong to
    // another controller: ignored, not refused. A route with no Service parent is not
    // the mesh's at all; nothing of it is read, so a gateway's route that uses
    // features the mesh lacks raises no error here.
    let parents = spec
        .parent_refs
        .iter()
        .enumerate()
        .filter(|(_, p)| is_mesh_parent(p))
        .map(|(i, p)| parent(p, &id, &format!("spec.parentRefs[{i}]")))
        .collect::<Result<Vec<_>>>()?;
    if parents.is_empty() {
        return Ok(Route {
            id,
            kind,
            created,
            parents,
            rules: Vec::new(),
        });
    }
    if spec.rules.len() > MAX_RULES {
        return Err(too_many("spec.rules", MAX_RULES));
    }
    let mut total_matches = 0;
    let mut rules = Vec::new();
    for (i, r) in spec.rules.iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        total_matches += r.matches.len();
        if total_matches > MAX_MATCHES {
            return Err(too_many("spec.rules[*].matches", MAX_MATCHES));
        }
        rules.push(rule(r, kind, &id, &field)?);
    }
    if rules.is_empty() {
        // Gateway API's default: one rule matching everything, to the parent itself
        // is not defined for mesh; a route without rules routes nothing.
        return Err(FieldError::new("spec.rules", "is empty"));
    }
    Ok(Route {
        id,
        kind,
        created,
        parents,
        rules,
    })
}

fn too_many(field: &str, max: usize) -> FieldError {
    FieldError::new(
        field,
        format!("more than {max} entries (Gateway API's limit)"),
    )
}

fn is_core_group(group: Option<&str>) -> bool {
    matches!(group, Some("") | Some("core"))
}

/// A Service parent (`group: ""` or `core`, `kind: Service`): the mesh's. `group`
/// defaults to gateway.networking.k8s.io and `kind` to Gateway.
fn is_mesh_parent(p: &ParentRefObject) -> bool {
    is_core_group(p.group.as_deref()) && p.kind.as_deref() == Some("Service")
}

fn parent(p: &ParentRefObject, route: &NamespacedName, field: &str) -> Result<ParentRef> {
    name(&p.name, &format!("{field}.name"))?;
    let port = p
        .port
        .map(|v| port(v, &format!("{field}.port")))
        .transpose()?;
    Ok(ParentRef {
        service: NamespacedName {
            namespace: p.namespace.clone().unwrap_or(route.namespace.clone()),
            name: p.name.clone(),
        },
        port,
        section: p.section_name.clone().filter(|s| !s.is_empty()),
    })
}

fn name(v: &str, field: &str) -> Result<()> {
    let ok = !v.is_empty()
        && v.len() <= 253
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{v:?} is not a Kubernetes object name"),
        ))
    }
}

fn port(v: i32, field: &str) -> Result<u16> {
    match u16::try_from(v) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(FieldError::new(
            field,
            format!("{v} is not a port number (1-65535)"),
        )),
    }
}

fn rule(r: &RuleObject, kind: RouteKind, route: &NamespacedName, field: &str) -> Result<RouteRule> {
    let retry = r
        .retry
        .as_ref()
        .map(|o| retry(o, kind, &format!("{field}.retry")))
        .transpose()?;
    if r.session_persistence.is_some() {
        return Err(not_yet(
            &format!("{field}.sessionPersistence"),
            "session persistence",
        ));
    }
    if r.matches.len() > MAX_MATCHES_PER_RULE {
        return Err(too_many(&format!("{field}.matches"), MAX_MATCHES_PER_RULE));
    }
    let mut matches = r
        .matches
        .iter()
        .enumerate()
        .map(|(i, m)| route_match(m, kind, &format!("{field}.matches[{i}]")))
        .collect::<Result<Vec<_>>>()?;
    if matches.is_empty() {
        matches.push(RouteMatch::any());
    }
    let filters = filters(&r.filters, kind, route, &format!("{field}.filters"))?;
    if r.backend_refs.len() > MAX_BACKENDS {
        return Err(too_many(&format!("{field}.backendRefs"), MAX_BACKENDS));
    }
    let redirects = filters.iter().any(|f| matches!(f, Filter::Redirect(_)));
    if redirects && !r.backend_refs.is_empty() {
        return Err(FieldError::new(
            format!("{field}.filters"),
            "RequestRedirect cannot be combined with backendRefs",
        ));
    }
    let backends = r
        .backend_refs
        .iter()
        .enumerate()
        .map(|(i, b)| backend(b, kind, route, &format!("{field}.backendRefs[{i}]")))
        .collect::<Result<Vec<_>>>()?;
    let timeouts = match &r.timeouts {
        None => Timeouts::default(),
        Some(t) => {
            if kind == RouteKind::Grpc {
                return Err(FieldError::new(
                    format!("{field}.timeouts"),
                    "is not a GRPCRoute field",
                ));
            }
            let request = t
                .request
                .as_deref()
                .map(|v| duration(v, &format!("{field}.timeouts.request")))
                .transpose()?
                .flatten();
            let backend_request = t
                .backend_request
                .as_deref()
                .map(|v| duration(v, &format!("{field}.timeouts.backendRequest")))
                .transpose()?
                .flatten();
            if let (Some(req), Some(be)) = (request, backend_request)
                && be > req
            {
                return Err(FieldError::new(
                    format!("{field}.timeouts.backendRequest"),
                    "is longer than timeouts.request",
                ));
            }
            Timeouts {
                request,
                backend_request,
            }
        }
    };
    Ok(RouteRule {
        name: r.name.clone(),
        matches,
        filters,
        backends,
        timeouts,
        retry,
    })
}

/// Retries a rule may ask for at most: each one is another request to a backend.
pub const MAX_RETRY_ATTEMPTS: u32 = 10;
/// Without `codes`: the gateway errors (Envoy's `gateway-error`). A 500 is not
/// retried unless listed: it is often the application's own answer.
pub const DEFAULT_RETRY_CODES: [u16; 3] = [502, 503, 504];
/// Linkerd's default limit.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 1;
/// Envoy's base interval.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_millis(25);

fn retry(o: &RetryObject, kind: RouteKind, field: &str) -> Result<Retry> {
    if kind == RouteKind::Grpc {
        return Err(FieldError::new(field, "is not a GRPCRoute field"));
    }
    let codes = match &o.codes {
        None => DEFAULT_RETRY_CODES.to_vec(),
        Some(codes) => codes
            .iter()
            .enumerate()
            .map(|(i, c)| match u16::try_from(*c) {
                Ok(c) if (400..=599).contains(&c) => Ok(c),
                _ => Err(FieldError::new(
                    format!("{field}.codes[{i}]"),
                    format!("{c} is not a status code from 400 to 599"),
                )),
            })
            .collect::<Result<Vec<_>>>()?,
    };
    let attempts = match o.attempts {
        None => DEFAULT_RETRY_ATTEMPTS,
        Some(a) => match u32::try_from(a) {
            Ok(a) if a <= MAX_RETRY_ATTEMPTS => a,
            _ => {
                return Err(FieldError::new(
                    format!("{field}.attempts"),
                    format!("{a} is not from 0 to {MAX_RETRY_ATTEMPTS}"),
                ));
            }
        },
    };
    let backoff = match &o.backoff {
        None => DEFAULT_RETRY_BACKOFF,
        Some(v) => duration(v, &format!("{field}.backoff"))?.unwrap_or(Duration::ZERO),
    };
    Ok(Retry {
        codes,
        attempts,
        backoff,
    })
}

/// Gateway API's limit on each CORS list.
const MAX_CORS_ENTRIES: usize = 64;
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

fn cors(c: &CorsObject, field: &str) -> Result<Cors> {
    for (name, list) in [
        ("allowOrigins", &c.allow_origins),
        ("allowMethods", &c.allow_methods),
        ("allowHeaders", &c.allow_headers),
        ("exposeHeaders", &c.expose_headers),
    ] {
        if list.len() > MAX_CORS_ENTRIES {
            return Err(too_many(&format!("{field}.{name}"), MAX_CORS_ENTRIES));
        }
    }
    for (i, o) in c.allow_origins.iter().enumerate() {
        let ok =
            o == "*"
                || o.split_once("://").is_some_and(|(scheme, host)| {
                    matches!(scheme, "http" | "https")
                        && !host.is_empty()
                        && !host.contains('/')
                        && host.strip_prefix("*.").unwrap_or(host).bytes().all(|b| {
                            b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b':'
                        })
                });
        if !ok {
            return Err(FieldError::new(
                format!("{field}.allowOrigins[{i}]"),
                format!(
                    "{o:?} is not `*` or an origin such as https://app.example or https://*.example.com"
                ),
            ));
        }
    }
    for (i, m) in c.allow_methods.iter().enumerate() {
        if m != "*" && !METHODS.contains(&m.as_str()) {
            return Err(FieldError::new(
                format!("{field}.allowMethods[{i}]"),
                format!("{m:?} is not `*` or an HTTP method"),
            ));
        }
    }
    for (name, list) in [
        ("allowHeaders", &c.allow_headers),
        ("exposeHeaders", &c.expose_headers),
    ] {
        for (i, h) in list.iter().enumerate() {
            if h != "*" && http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                return Err(FieldError::new(
                    format!("{field}.{name}[{i}]"),
                    format!("{h:?} is not a header name"),
                ));
            }
        }
    }
    let max_age = match c.max_age.unwrap_or(5) {
        a @ 1..=86_400 => a as u32,
        other => {
            return Err(FieldError::new(
                format!("{field}.maxAge"),
                format!("{other} is not from 1 to 86400 seconds"),
            ));
        }
    };
    Ok(Cors {
        allow_origins: c.allow_origins.clone(),
        allow_methods: c.allow_methods.clone(),
        allow_headers: c.allow_headers.clone(),
        expose_headers: c.expose_headers.clone(),
        allow_credentials: c.allow_credentials.unwrap_or(false),
        max_age,
    })
}

fn mirror(m: &MirrorObject, route: &NamespacedName, field: &str) -> Result<Mirror> {
    let b = &m.backend_ref;
    let f = format!("{field}.backendRef");
    if !(b.group.is_none() || is_core_group(b.group.as_deref()))
        || !matches!(b.kind.as_deref(), None | Some("Service"))
    {
        return Err(FieldError::new(
            f,
            "only Service backends are supported (group \"\", kind Service)",
        ));
    }
    name(&b.name, &format!("{f}.name"))?;
    let Some(p) = b.port else {
        return Err(FieldError::new(
            format!("{f}.port"),
            "is required for a Service backend",
        ));
    };
    let port = port(p, &format!("{f}.port"))?;
    let (numerator, denominator) = match (m.percent, &m.fraction) {
        (Some(_), Some(_)) => {
            return Err(FieldError::new(
                field,
                "percent and fraction cannot both be set",
            ));
        }
        (None, None) => (100, 100),
        (Some(p), None) => match u32::try_from(p) {
            Ok(p) if p <= 100 => (p, 100),
            _ => {
                return Err(FieldError::new(
                    format!("{field}.percent"),
                    format!("{p} is not from 0 to 100"),
                ));
            }
        },
        (None, Some(fr)) => {
            let d = fr.denominator.unwrap_or(100);
            match (u32::try_from(fr.numerator), u32::try_from(d)) {
                (Ok(n), Ok(d)) if d > 0 && n <= d => (n, d),
                _ => {
                    return Err(FieldError::new(
                        format!("{field}.fraction"),
                        format!(
                            "{}/{d} is not a fraction from 0 to 1 with a positive denominator",
                            fr.numerator
                        ),
                    ));
                }
            }
        }
    };
    Ok(Mirror {
        service: NamespacedName {
            namespace: b.namespace.clone().unwrap_or(route.namespace.clone()),
            name: b.name.clone(),
        },
        port,
        numerator,
        denominator,
    })
}

fn not_yet(field: &str, what: &str) -> FieldError {
    FieldError::new(
        field,
        format!(
            "{what} are not supported by this version of the agent (refused rather than ignored)"
        ),
    )
}

/// GEP-2257 durations: `^([0-9]{1,5}(h|m|s|ms)){1,4}$`. `Ok(None)` is zero, which
/// Gateway API defines as "no timeout".
pub fn duration(v: &str, field: &str) -> Result<Option<Duration>> {
    let bad = || {
        FieldError::new(
            field,
            format!("{v:?} is not a Gateway API duration (such as 500ms, 10s, 1m30s)"),
        )
    };
    let mut rest = v;
    let mut total = Duration::ZERO;
    let mut parts = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return Err(bad());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(1), 1)
        } else {
            return Err(bad());
        };
        rest = &rest[len..];
        total += unit * n as u32;
        parts += 1;
        if parts > 4 {
            return Err(bad());
        }
    }
    if parts == 0 {
        return Err(bad());
    }
    Ok((!total.is_zero()).then_some(total))
}

fn regex(v: &str, field: &str) -> Result<String> {
    regex::RegexBuilder::new(v)
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map(|_| v.to_owned())
        .map_err(|e| {
            FieldError::new(
                field,
                format!("{v:?} is not a usable regular expression: {e}"),
            )
        })
}

fn str_match(kind: Option<&str>, value: &str, field: &str) -> Result<StrMatch> {
    match kind.unwrap_or("Exact") {
        "Exact" => Ok(StrMatch::Exact(value.to_owned())),
        "RegularExpression" => Ok(StrMatch::Regex(regex(value, &format!("{field}.value"))?)),
        other => Err(FieldError::new(
            format!("{field}.type"),
            format!("{other:?} is not Exact or RegularExpression"),
        )),
    }
}

fn header_name(v: &str, field: &str) -> Result<String> {
    match http::HeaderName::from_bytes(v.as_bytes()) {
        Ok(n) if !v.starts_with(':') => Ok(n.as_str().to_owned()),
        _ => Err(FieldError::new(
            field,
            format!("{v:?} is not an HTTP header name"),
        )),
    }
}

fn header_value(v: &str, field: &str) -> Result<String> {
    http::HeaderValue::from_str(v)
        .map(|_| v.to_owned())
        .map_err(|_| FieldError::new(field, format!("{v:?} is not a valid HTTP header value")))
}

fn path_value(v: &str, field: &str) -> Result<String> {
    if !v.starts_with('/') || v.contains("//") || v.contains('?') || v.contains('#') {
        return Err(FieldError::new(
            field,
            format!("{v:?} is not an absolute path (starts with /, no //, ? or #)"),
        ));
    }
    http::uri::PathAndQuery::try_from(v)
        .map(|_| v.to_owned())
        .map_err(|_| FieldError::new(field, format!("{v:?} is not a valid path")))
}

fn route_match(m: &MatchObject, kind: RouteKind, field: &str) -> Result<RouteMatch> {
    if m.headers.len() > MAX_HEADER_MATCHES {
        return Err(too_many(&format!("{field}.headers"), MAX_HEADER_MATCHES));
    }
    let mut headers = Vec::new();
    for (i, h) in m.headers.iter().enumerate() {
        let f = format!("{field}.headers[{i}]");
        let name = header_name(&h.name, &format!("{f}.name"))?;
        if headers.iter().any(|x: &HeaderMatch| x.name == name) {
            return Err(FieldError::new(
                format!("{f}.name"),
                format!("header {name:?} is matched twice"),
            ));
        }
        headers.push(HeaderMatch {
            name,
            value: str_match(h.kind.as_deref(), &h.value, &f)?,
        });
    }
    let path;
    let mut method = None;
    let mut query = Vec::new();
    match kind {
        RouteKind::Http => {
            path = match &m.path {
                None => PathMatch::Prefix("/".to_owned()),
                Some(p) => {
                    let value = p.value.as_deref().unwrap_or("/");
                    let f = format!("{field}.path");
                    match p.kind.as_deref().unwrap_or("PathPrefix") {
                        "Exact" => PathMatch::Exact(path_value(value, &format!("{f}.value"))?),
                        "PathPrefix" => {
                            let v = path_value(value, &format!("{f}.value"))?;
                            let trimmed = v.trim_end_matches('/');
                            PathMatch::Prefix(if trimmed.is_empty() {
                                "/".to_owned()
                            } else {
                                trimmed.to_owned()
                            })
                        }
                        "RegularExpression" => {
                            PathMatch::Regex(regex(value, &format!("{f}.value"))?)
                        }
                        other => {
                            return Err(FieldError::new(
                                format!("{f}.type"),
                                format!("{other:?} is not Exact, PathPrefix or RegularExpression"),
                            ));
                        }
                    }
                }
            };
            for (i, q) in m.query_params.iter().enumerate() {
                let f = format!("{field}.queryParams[{i}]");
                if q.name.is_empty() {
                    return Err(FieldError::new(format!("{f}.name"), "is empty"));
                }
                query.push(QueryMatch {
                    name: q.name.clone(),
                    value: str_match(q.kind.as_deref(), &q.value, &f)?,
                });
            }
            if let Some(v) = &m.method {
                let f = format!("{field}.method");
                let s = v
                    .as_str()
                    .ok_or_else(|| FieldError::new(&f, "is not a string"))?;
                const METHODS: &[&str] = &[
                    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
                ];
                if !METHODS.contains(&s) {
                    return Err(FieldError::new(
                        f,
                        format!("{s:?} is not one of {}", METHODS.join(", ")),
                    ));
                }
                method = Some(s.to_owned());
            }
        }
        RouteKind::Grpc => {
            if m.path.is_some() {
                return Err(FieldError::new(
                    format!("{field}.path"),
                    "is not a GRPCRoute field (use method)",
                ));
            }
            if !m.query_params.is_empty() {
                return Err(FieldError::new(
                    format!("{field}.queryParams"),
                    "is not a GRPCRoute field",
                ));
            }
            path = match &m.method {
                None => PathMatch::Grpc {
                    service: None,
                    method: None,
                },
                Some(v) => {
                    let f = format!("{field}.method");
                    let g: GrpcMethodObject =
                        serde_path_to_error::deserialize(v.clone()).map_err(|e| {
                            FieldError::new(format!("{f}.{}", e.path()), e.into_inner().to_string())
                        })?;
                    if g.service.is_none() && g.method.is_none() {
                        return Err(FieldError::new(f, "needs a service, a method or both"));
                    }
                    let kind = g.kind.as_deref();
                    let one = |v: &Option<String>, sub: &str| -> Result<Option<StrMatch>> {
                        v.as_deref()
                            .map(|s| {
                                if kind.unwrap_or("Exact") == "Exact"
                                    && (s.is_empty() || s.contains('/'))
                                {
                                    return Err(FieldError::new(
                                        format!("{f}.{sub}"),
                                        format!("{s:?} is not a gRPC {sub} name"),
                                    ));
                                }
                                str_match(kind, s, &f)
                            })
                            .transpose()
                    };
                    PathMatch::Grpc {
                        service: one(&g.service, "service")?,
                        method: one(&g.method, "method")?,
                    }
                }
            };
        }
    }
    Ok(RouteMatch {
        path,
        headers,
        query,
        method,
    })
}

fn header_mods(h: &HeaderModsObject, field: &str) -> Result<HeaderMods> {
    let pairs = |list: &[HeaderObject], sub: &str| -> Result<Vec<(String, String)>> {
        list.iter()
            .enumerate()
            .map(|(i, h)| {
                let f = format!("{field}.{sub}[{i}]");
                Ok((
                    header_name(&h.name, &format!("{f}.name"))?,
                    header_value(&h.value, &format!("{f}.value"))?,
                ))
            })
            .collect()
    };
    let mods = HeaderMods {
        set: pairs(&h.set, "set")?,
        add: pairs(&h.add, "add")?,
        remove: h
            .remove
            .iter()
            .enumerate()
            .map(|(i, n)| header_name(n, &format!("{field}.remove[{i}]")))
            .collect::<Result<_>>()?,
    };
    if mods.set.is_empty() && mods.add.is_empty() && mods.remove.is_empty() {
        return Err(FieldError::new(field, "sets, adds and removes nothing"));
    }
    Ok(mods)
}

fn path_modifier(p: &PathModifierObject, field: &str) -> Result<PathModifier> {
    match p.kind.as_str() {
        "ReplaceFullPath" => {
            let v = p.replace_full_path.as_deref().ok_or_else(|| {
                FieldError::new(format!("{field}.replaceFullPath"), "is required")
            })?;
            Ok(PathModifier::ReplaceFullPath(path_value(
                v,
                &format!("{field}.replaceFullPath"),
            )?))
        }
        "ReplacePrefixMatch" => {
            let v = p.replace_prefix_match.as_deref().ok_or_else(|| {
                FieldError::new(format!("{field}.replacePrefixMatch"), "is required")
            })?;
            Ok(PathModifier::ReplacePrefixMatch(path_value(
                v,
                &format!("{field}.replacePrefixMatch"),
            )?))
        }
        other => Err(FieldError::new(
            format!("{field}.type"),
            format!("{other:?} is not ReplaceFullPath or ReplacePrefixMatch"),
        )),
    }
}

fn hostname(v: &str, field: &str) -> Result<String> {
    let ok = !v.is_empty()
        && v.len() <= 253
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
    if ok {
        Ok(v.to_ascii_lowercase())
    } else {
        Err(FieldError::new(field, format!("{v:?} is not a hostname")))
    }
}

fn filters(
    list: &[FilterObject],
    kind: RouteKind,
    route: &NamespacedName,
    field: &str,
) -> Result<Vec<Filter>> {
    if list.len() > MAX_FILTERS {
        return Err(too_many(field, MAX_FILTERS));
    }
    let mut out = Vec::new();
    let mut seen = Vec::new();
    for (i, f) in list.iter().enumerate() {
        let field = format!("{field}[{i}]");
        // Only RequestMirror may repeat (one copy per mirror).
        if f.kind != "RequestMirror" && seen.contains(&f.kind.as_str()) {
            return Err(FieldError::new(
                format!("{field}.type"),
                format!("{} is listed twice in one rule", f.kind),
            ));
        }
        seen.push(f.kind.as_str());
        let need = |present: bool, sub: &str| {
            if present {
                Ok(())
            } else {
                Err(FieldError::new(
                    format!("{field}.{sub}"),
                    "is required by its type",
                ))
            }
        };
        let filter = match f.kind.as_str() {
            "RequestHeaderModifier" => {
                need(f.request_header_modifier.is_some(), "requestHeaderModifier")?;
                Filter::RequestHeaders(header_mods(
                    f.request_header_modifier
                        .as_ref()
                        .unwrap_or(&HeaderModsObject::default()),
                    &format!("{field}.requestHeaderModifier"),
                )?)
            }
            "ResponseHeaderModifier" => {
                need(
                    f.response_header_modifier.is_some(),
                    "responseHeaderModifier",
                )?;
                Filter::ResponseHeaders(header_mods(
                    f.response_header_modifier
                        .as_ref()
                        .unwrap_or(&HeaderModsObject::default()),
                    &format!("{field}.responseHeaderModifier"),
                )?)
            }
            "RequestRedirect" if kind == RouteKind::Http => {
                let Some(r) = &f.request_redirect else {
                    return Err(FieldError::new(
                        format!("{field}.requestRedirect"),
                        "is required by its type",
                    ));
                };
                let f2 = format!("{field}.requestRedirect");
                let status = match r.status_code.unwrap_or(302) {
                    s @ (301 | 302 | 303 | 307 | 308) => s as u16,
                    other => {
                        return Err(FieldError::new(
                            format!("{f2}.statusCode"),
                            format!("{other} is not 301, 302, 303, 307 or 308"),
                        ));
                    }
                };
                let scheme = match r.scheme.as_deref() {
                    None => None,
                    Some(s @ ("http" | "https")) => Some(s.to_owned()),
                    Some(other) => {
                        return Err(FieldError::new(
                            format!("{f2}.scheme"),
                            format!("{other:?} is not http or https"),
                        ));
                    }
                };
                Filter::Redirect(Redirect {
                    scheme,
                    hostname: r
                        .hostname
                        .as_deref()
                        .map(|h| hostname(h, &format!("{f2}.hostname")))
                        .transpose()?,
                    path: r
                        .path
                        .as_ref()
                        .map(|p| path_modifier(p, &format!("{f2}.path")))
                        .transpose()?,
                    port: r.port.map(|p| port(p, &format!("{f2}.port"))).transpose()?,
                    status,
                })
            }
            "URLRewrite" if kind == RouteKind::Http => {
                let Some(r) = &f.url_rewrite else {
                    return Err(FieldError::new(
                        format!("{field}.urlRewrite"),
                        "is required by its type",
                    ));
                };
                let f2 = format!("{field}.urlRewrite");
                Filter::Rewrite(Rewrite {
                    hostname: r
                        .hostname
                        .as_deref()
                        .map(|h| hostname(h, &format!("{f2}.hostname")))
                        .transpose()?,
                    path: r
                        .path
                        .as_ref()
                        .map(|p| path_modifier(p, &format!("{f2}.path")))
                        .transpose()?,
                })
            }
            "RequestMirror" => {
                let Some(m) = &f.request_mirror else {
                    return Err(FieldError::new(
                        format!("{field}.requestMirror"),
                        "is required by its type",
                    ));
                };
                Filter::Mirror(mirror(m, route, &format!("{field}.requestMirror"))?)
            }
            "CORS" if kind == RouteKind::Http => {
                let Some(c) = &f.cors else {
                    return Err(FieldError::new(
                        format!("{field}.cors"),
                        "is required by its type",
                    ));
                };
                Filter::Cors(cors(c, &format!("{field}.cors"))?)
            }
            "ExtensionRef" => {
                return Err(not_yet(&format!("{field}.type"), "ExtensionRef filters"));
            }
            other => {
                return Err(FieldError::new(
                    format!("{field}.type"),
                    format!("{other:?} is not a {kind} filter type"),
                ));
            }
        };
        out.push(filter);
    }
    let redirect = out.iter().any(|f| matches!(f, Filter::Redirect(_)));
    let rewrite = out.iter().any(|f| matches!(f, Filter::Rewrite(_)));
    if redirect && rewrite {
        return Err(FieldError::new(
            field,
            "RequestRedirect and URLRewrite cannot be combined",
        ));
    }
    Ok(out)
}

fn backend(
    b: &BackendRefObject,
    kind: RouteKind,
    route: &NamespacedName,
    field: &str,
) -> Result<Backend> {
    if !(b.group.is_none() || is_core_group(b.group.as_deref()))
        || !matches!(b.kind.as_deref(), None | Some("Service"))
    {
        return Err(FieldError::new(
            field,
            "only Service backends are supported (group \"\", kind Service)",
        ));
    }
    name(&b.name, &format!("{field}.name"))?;
    let port = match b.port {
        Some(p) => port(p, &format!("{field}.port"))?,
        None => {
            return Err(FieldError::new(
                format!("{field}.port"),
                "is required for a Service backend",
            ));
        }
    };
    let weight = match b.weight.unwrap_or(1) {
        w @ 0..=1_000_000 => w as u32,
        other => {
            return Err(FieldError::new(
                format!("{field}.weight"),
                format!("{other} is not between 0 and 1000000"),
            ));
        }
    };
    let filters = filters(&b.filters, kind, route, &format!("{field}.filters"))?;
    if filters.iter().any(|f| matches!(f, Filter::Redirect(_))) {
        return Err(FieldError::new(
            format!("{field}.filters"),
            "a backend cannot redirect",
        ));
    }
    if filters.iter().any(|f| matches!(f, Filter::Mirror(_))) {
        return Err(FieldError::new(
            format!("{field}.filters"),
            "RequestMirror is supported on rules, not on a backend",
        ));
    }
    Ok(Backend {
        service: NamespacedName {
            namespace: b.namespace.clone().unwrap_or(route.namespace.clone()),
            name: b.name.clone(),
        },
        port,
        weight,
        filters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_follow_gep_2257() {
        let d = |v| duration(v, "f");
        assert_eq!(d("500ms").unwrap(), Some(Duration::from_millis(500)));
        assert_eq!(d("1m30s").unwrap(), Some(Duration::from_secs(90)));
        assert_eq!(d("1h").unwrap(), Some(Duration::from_secs(3600)));
        assert_eq!(d("0s").unwrap(), None);
        for bad in ["", "1", "s", "1.5s", "123456s", "1s1s1s1s1s", "-1s", "1d"] {
            assert!(d(bad).is_err(), "{bad:?} accepted");
        }
    }

    fn retry_of(yaml: &str) -> Result<Retry> {
        let o: RetryObject =
            serde_yaml_ng::from_str(yaml).map_err(|e| FieldError::new("x", e.to_string()))?;
        retry(&o, RouteKind::Http, "spec.rules[0].retry")
    }

    #[test]
    fn retries_take_gateway_api_fields_with_bounded_defaults() {
        let r = retry_of("{codes: [500, 503], attempts: 3, backoff: 100ms}").unwrap();
        assert_eq!(
            r,
            Retry {
                codes: vec![500, 503],
                attempts: 3,
                backoff: Duration::from_millis(100)
            }
        );
        let d = retry_of("{}").unwrap();
        assert_eq!(d.codes, DEFAULT_RETRY_CODES.to_vec());
        assert_eq!(d.attempts, DEFAULT_RETRY_ATTEMPTS);
        assert_eq!(d.backoff, DEFAULT_RETRY_BACKOFF);
        let e = retry_of("{codes: [200]}").unwrap_err().to_string();
        assert!(e.contains("spec.rules[0].retry.codes[0]"), "{e}");
        let e = retry_of("{attempts: 11}").unwrap_err().to_string();
        assert!(e.contains("spec.rules[0].retry.attempts"), "{e}");
        let e = retry_of("{backoff: soon}").unwrap_err().to_string();
        assert!(e.contains("spec.rules[0].retry.backoff"), "{e}");
        assert!(
            retry(
                &RetryObject {
                    codes: None,
                    attempts: None,
                    backoff: None
                },
                RouteKind::Grpc,
                "f"
            )
            .is_err()
        );
    }

    fn mirror_of(yaml: &str) -> Result<Mirror> {
        let o: MirrorObject =
            serde_yaml_ng::from_str(yaml).map_err(|e| FieldError::new("x", e.to_string()))?;
        let route = NamespacedName {
            namespace: "shop".into(),
            name: "r".into(),
        };
        mirror(&o, &route, "spec.rules[0].filters[0].requestMirror")
    }

    #[test]
    fn mirrors_take_a_percent_or_a_fraction_of_a_service_port() {
        let m = mirror_of("{backendRef: {name: shadow, port: 80}}").unwrap();
        assert_eq!((m.numerator, m.denominator), (100, 100));
        assert_eq!(m.service.to_string(), "shop/shadow");
        let m = mirror_of("{backendRef: {name: s, namespace: o, port: 80}, percent: 20}").unwrap();
        assert_eq!(
            (m.numerator, m.denominator, m.service.namespace.as_str()),
            (20, 100, "o")
        );
        let m = mirror_of(
            "{backendRef: {name: s, port: 80}, fraction: {numerator: 1, denominator: 3}}",
        )
        .unwrap();
        assert_eq!((m.numerator, m.denominator), (1, 3));
        for (bad, field) in [
            ("{backendRef: {name: s}}", "backendRef.port"),
            ("{backendRef: {name: s, port: 80}, percent: 101}", "percent"),
            (
                "{backendRef: {name: s, port: 80}, fraction: {numerator: 3, denominator: 2}}",
                "fraction",
            ),
            (
                "{backendRef: {name: s, port: 80}, percent: 5, fraction: {numerator: 1}}",
                "requestMirror",
            ),
            ("{backendRef: {name: s, port: 80, kind: Pod}}", "backendRef"),
        ] {
            let e = mirror_of(bad).unwrap_err().to_string();
            assert!(e.contains(field), "{bad}: {e}");
        }
    }

    #[test]
    fn cors_lists_are_checked_by_field() {
        let c = |yaml: &str| {
            let o: CorsObject =
                serde_yaml_ng::from_str(yaml).map_err(|e| FieldError::new("x", e.to_string()))?;
            cors(&o, "spec.rules[0].filters[0].cors")
        };
        let ok =
            c("{allowOrigins: ['https://*.example.com', 'http://a:8080'], allowMethods: [GET]}")
                .unwrap();
        assert_eq!(ok.max_age, 5);
        assert!(!ok.allow_credentials);
        for (bad, field) in [
            ("{allowOrigins: ['example.com']}", "allowOrigins[0]"),
            ("{allowOrigins: ['https://a/b']}", "allowOrigins[0]"),
            ("{allowMethods: [FETCH]}", "allowMethods[0]"),
            ("{allowHeaders: ['bad header']}", "allowHeaders[0]"),
            ("{maxAge: 0}", "maxAge"),
        ] {
            let e = c(bad).unwrap_err().to_string();
            assert!(e.contains(field), "{bad}: {e}");
        }
    }
}
