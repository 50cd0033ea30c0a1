//! The agent's model of Gateway API routes attached to Services (GAMMA): HTTPRoute and
//! GRPCRoute, already validated (`gateway.rs` translates the wire objects). Strings
//! here are known good: header names are lower-case tokens, regexes compile within
//! their size limit, paths start with `/`.
use std::time::Duration;

use super::model::NamespacedName;

#[derive(Debug, serde::Serialize, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RouteKind {
    Http,
    Grpc,
}

impl std::fmt::Display for RouteKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        })
    }
}

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct Route {
    pub id: NamespacedName,
    pub kind: RouteKind,
    /// `metadata.creationTimestamp` in seconds since the epoch: the older route wins a
    /// precedence tie. Files usually have none; then the name decides.
    pub created: Option<i64>,
    pub parents: Vec<ParentRef>,
    pub rules: Vec<RouteRule>,
}

/// A route that could not attach to a parent Service, or lost a conflict there:
/// for the log, `meshctl routes`, and the route's `status.parents` (`reason` is the
/// Gateway API reason of its `Accepted=False` condition).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteProblem {
    pub route: NamespacedName,
    pub kind: RouteKind,
    /// The parent Service it concerns.
    pub service: NamespacedName,
    pub reason: &'static str,
    pub message: String,
}

/// A Service the route attaches to: all its ports, or the one named by `port` or
/// `section` (the Service port's name).
#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct ParentRef {
    pub service: NamespacedName,
    pub port: Option<u16>,
    pub section: Option<String>,
}

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct RouteRule {
    pub name: Option<String>,
    /// Never empty: a rule without matches matches every request (PathPrefix `/`).
    pub matches: Vec<RouteMatch>,
    pub filters: Vec<Filter>,
    pub backends: Vec<Backend>,
    pub timeouts: Timeouts,
    pub retry: Option<Retry>,
}

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct RouteMatch {
    pub path: PathMatch,
    pub headers: Vec<HeaderMatch>,
    pub query: Vec<QueryMatch>,
    /// Upper-case HTTP method.
    pub method: Option<String>,
}

impl RouteMatch {
    /// The match of a rule that lists none.
    pub fn any() -> RouteMatch {
        RouteMatch {
            path: PathMatch::Prefix("/".to_owned()),
            headers: Vec::new(),
            query: Vec::new(),
            method: None,
        }
    }
}

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    /// Element-wise: `/abc` matches `/abc` and `/abc/def`, not `/abcd`. Stored
    /// without a trailing slash (except `/` itself).
    Prefix(String),
    Regex(String),
    /// GRPCRoute `method`: the request path is `/<service>/<method>`.
    Grpc {
        service: Option<StrMatch>,
        method: Option<StrMatch>,
    },
}

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub enum StrMatch {
    Exact(String),
    Regex(String),
}

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct HeaderMatch {
    /// Lower case.
    pub name: String,
    pub value: StrMatch,
}

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct QueryMatch {
    /// Exact and case-sensitive, as Gateway API says.
    pub name: String,
    pub value: StrMatch,
}

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub enum Filter {
    RequestHeaders(HeaderMods),
    ResponseHeaders(HeaderMods),
    Redirect(Redirect),
    Rewrite(Rewrite),
    Mirror(Mirror),
    Cors(Cors),
}

/// `CORS` (HTTPCORSFilter): which browser origins may call, and with what.
#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct Cors {
    /// `*`, exact origins, or `scheme://*.domain`.
    pub allow_origins: Vec<String>,
    /// Methods, or `*`.
    pub allow_methods: Vec<String>,
    /// Header names, or `*`.
    pub allow_headers: Vec<String>,
    pub expose_headers: Vec<String>,
    pub allow_credentials: bool,
    /// Seconds a browser may cache a preflight answer.
    pub max_age: u32,
}

/// `RequestMirror`: a copy of `numerator / denominator` of the requests goes to
/// another Service port too; its answers are ignored.
#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct Mirror {
    pub service: NamespacedName,
    pub port: u16,
    pub numerator: u32,
    pub denominator: u32,
}

/// `set` replaces, `add` appends, `remove` drops; applied in that order of listing
/// by Gateway API: set, add, remove.
#[derive(Debug, serde::Serialize, Clone, Default, PartialEq, Eq)]
pub struct HeaderMods {
    pub set: Vec<(String, String)>,
    pub add: Vec<(String, String)>,
    pub remove: Vec<String>,
}

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub enum PathModifier {
    ReplaceFullPath(String),
    ReplacePrefixMatch(String),
}

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    pub status: u16,
}

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct Rewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct Backend {
    pub service: NamespacedName,
    pub port: u16,
    /// Share of the rule's requests; 0 gets none.
    pub weight: u32,
    pub filters: Vec<Filter>,
}

/// `retry` (GEP-1731): a request that failed to connect, or got one of `codes`, is
/// sent again, up to `attempts` more times, `backoff` apart, within the request
/// timeout, if its body was small enough to keep.
#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct Retry {
    pub codes: Vec<u16>,
    pub attempts: u32,
    pub backoff: Duration,
}

/// `None` is no timeout (absent, or `0s`).
#[derive(Debug, serde::Serialize, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timeouts {
    pub request: Option<Duration>,
    pub backend_request: Option<Duration>,
}
