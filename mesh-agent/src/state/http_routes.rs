//! The HTTPRoutes and GRPCRoutes attached to each Service frontend (ClusterIP, port),
//! compiled for matching: every match of every rule of every route that applies, in
//! Gateway API precedence order, so a request takes the first entry that matches.
//!
//! Which routes apply to a client (GAMMA): routes in the Service's own namespace
//! (producer routes) apply to every client; routes in another namespace (consumer
//! routes) apply only to clients in that namespace, and replace the producer routes
//! for them. On one Service port, GRPCRoutes win over HTTPRoutes (GEP-1294); the
//! losers are reported.
use std::{cmp::Ordering, collections::HashMap, net::SocketAddr, sync::Arc};

use http::HeaderMap;
use regex::Regex;

use super::routes::Slices;
use crate::config::{
    Config, Filter, Mirror, NamespacedName, PathMatch, Protocol, Retry, Route, RouteKind,
    RouteMatch, RouteProblem, Service, ServicePort, StrMatch, Timeouts,
};

/// What a Service port says its clients speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortProtocol {
    /// HTTP/1.1 (or HTTP/2 with prior knowledge: both are recognised on the wire).
    Http,
    /// HTTP/2 (h2c) or gRPC.
    Http2,
    /// Opaque TCP: never inspected.
    Opaque,
    /// Nothing declared: the first bytes decide (bounded peek, with a timeout).
    Detect,
}

/// Ports where the server speaks first (SMTP, MySQL, PostgreSQL, redis, ...): a client
/// there may send nothing until it hears the server, so detection would stall it.
/// Linkerd's default opaque ports.
pub const DEFAULT_SERVER_FIRST_PORTS: &[u16] = &[25, 587, 3306, 4444, 5432, 6379, 9300, 11211];

/// `appProtocol` first, then the port name's prefix (Istio's `<proto>[-suffix]`),
/// then the server-first list; otherwise detection.
pub fn declared(port: &ServicePort, server_first: &[u16]) -> PortProtocol {
    let by_app = port.app_protocol.as_deref().and_then(|a| match a {
        "http" | "kubernetes.io/ws" => Some(PortProtocol::Http),
        "kubernetes.io/h2c" | "http2" | "grpc" | "grpc-web" => Some(PortProtocol::Http2),
        "tcp" | "linkerd.io/opaque" | "kubernetes.io/wss" | "https" | "tls" | "mysql" | "redis"
        | "mongo" => Some(PortProtocol::Opaque),
        _ => None,
    });
    if let Some(p) = by_app {
        return p;
    }
    let by_name = port.name.as_deref().and_then(|n| {
        let proto = n.split('-').next().unwrap_or(n);
        match proto {
            "http" => Some(PortProtocol::Http),
            "http2" | "grpc" | "grpc-web" => Some(PortProtocol::Http2),
            "tcp" | "tls" | "https" | "mysql" | "mongo" | "redis" => Some(PortProtocol::Opaque),
            _ => None,
        }
    });
    if let Some(p) = by_name {
        return p;
    }
    let numeric_target = match port.target_port {
        crate::config::TargetPort::Number(n) => Some(n),
        crate::config::TargetPort::Name(_) => None,
    };
    if server_first.contains(&port.port)
        || numeric_target.is_some_and(|t| server_first.contains(&t))
    {
        return PortProtocol::Opaque;
    }
    PortProtocol::Detect
}

/// A backend of a rule, resolved to the ready endpoints of that Service port.
#[derive(Debug)]
pub struct CompiledBackend {
    pub service: NamespacedName,
    pub port: u16,
    pub weight: u32,
    pub filters: Vec<Filter>,
    /// `None`: the Service or its port does not exist (requests for it get 500).
    pub endpoints: Option<Vec<SocketAddr>>,
}

#[derive(Debug)]
pub struct CompiledRule {
    pub route: NamespacedName,
    pub kind: RouteKind,
    /// The rule's `name`, or its index.
    pub name: String,
    pub filters: Vec<Filter>,
    pub backends: Vec<CompiledBackend>,
    pub timeouts: Timeouts,
    pub retry: Option<Retry>,
    pub mirrors: Vec<CompiledMirror>,
}

/// A `RequestMirror` of a rule, resolved to the ready endpoints of its Service port.
#[derive(Debug)]
pub struct CompiledMirror {
    pub mirror: Mirror,
    /// `None`: the Service or its port does not exist (nothing is mirrored).
    pub endpoints: Option<Vec<SocketAddr>>,
}

impl CompiledMirror {
    /// Whether this request is mirrored, from a random roll.
    pub fn takes(&self, roll: u32) -> bool {
        self.mirror.numerator > 0 && roll % self.mirror.denominator < self.mirror.numerator
    }
}

impl CompiledRule {
    /// "httproute/ns/name" or "grpcroute/ns/name": how logs, metrics and `meshctl`
    /// name the route.
    pub fn route_label(&self) -> String {
        let kind = match self.kind {
            RouteKind::Http => "httproute",
            RouteKind::Grpc => "grpcroute",
        };
        format!("{kind}/{}", self.route)
    }
}

#[derive(Debug)]
enum PathTest {
    Exact(String),
    Prefix(String),
    Regex(Regex),
    Grpc {
        service: Option<StrTest>,
        method: Option<StrTest>,
    },
}

#[derive(Debug)]
enum StrTest {
    Exact(String),
    Regex(Regex),
}

impl StrTest {
    fn compile(m: &StrMatch) -> Option<StrTest> {
        Some(match m {
            StrMatch::Exact(s) => StrTest::Exact(s.clone()),
            StrMatch::Regex(r) => StrTest::Regex(anchored(r)?),
        })
    }

    fn test(&self, v: &str) -> bool {
        match self {
            StrTest::Exact(s) => s == v,
            StrTest::Regex(r) => r.is_match(v),
        }
    }
}

/// Gateway API regex matches are whole-value matches.
fn anchored(pattern: &str) -> Option<Regex> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(crate::config::REGEX_SIZE_LIMIT * 2)
        .build()
        .ok()
}

#[derive(Debug)]
struct Entry {
    path: PathTest,
    method: Option<String>,
    headers: Vec<(http::HeaderName, StrTest)>,
    query: Vec<(String, StrTest)>,
    rule: Arc<CompiledRule>,
}

/// What of a request the matches look at.
pub struct RequestView<'a> {
    pub method: &'a str,
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
}

impl Entry {
    fn matches(&self, req: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathTest::Exact(p) => req.path == p,
            PathTest::Prefix(p) => prefix_matches(p, req.path),
            PathTest::Regex(r) => r.is_match(req.path),
            PathTest::Grpc { service, method } => {
                let Some((svc, m)) = grpc_parts(req.path) else {
                    return service.is_none() && method.is_none();
                };
                service.as_ref().is_none_or(|t| t.test(svc))
                    && method.as_ref().is_none_or(|t| t.test(m))
            }
        };
        path_ok
            && self.method.as_deref().is_none_or(|m| m == req.method)
            && self.headers.iter().all(|(name, t)| {
                req.headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| t.test(v))
            })
            && self
                .query
                .iter()
                .all(|(name, t)| query_value(req.query, name).is_some_and(|v| t.test(&v)))
    }
}

/// `/pkg.Service/Method` -> (`pkg.Service`, `Method`).
pub fn grpc_parts(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (svc, method) = rest.split_once('/')?;
    (!svc.is_empty() && !method.is_empty() && !method.contains('/')).then_some((svc, method))
}

/// Element-wise prefix: `/abc` matches `/abc`, `/abc/` and `/abc/def`, not `/abcd`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The first value of query parameter `name`, percent-decoded.
fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// Precedence of one match (higher first), Gateway API's order: exact path, then
/// (implementation-specific) regex, then the longest prefix; then a method match,
/// the most header matches, the most query matches. GRPCRoute: a service and a
/// method match, exact over regex, then the most headers.
fn rank(m: &RouteMatch) -> Rank {
    let (class, len) = match &m.path {
        PathMatch::Exact(p) => (4, p.len()),
        PathMatch::Regex(r) => (3, r.len()),
        PathMatch::Prefix(p) => (2, p.len()),
        PathMatch::Grpc { service, method } => {
            let score = |s: &Option<StrMatch>| match s {
                Some(StrMatch::Exact(_)) => 2,
                Some(StrMatch::Regex(_)) => 1,
                None => 0,
            };
            (2, score(service) * 3 + score(method))
        }
    };
    (
        class,
        len,
        m.method.is_some(),
        m.headers.len(),
        m.query.len(),
    )
}

/// The routes for one frontend as one client namespace sees them.
#[derive(Debug)]
pub struct PortRoutes {
    pub service: NamespacedName,
    pub port: u16,
    pub kind: RouteKind,
    pub protocol: PortProtocol,
    entries: Vec<Entry>,
}

/// The rule a request goes to, and the path prefix that matched (for
/// `ReplacePrefixMatch`).
pub struct Selected<'a> {
    pub rule: &'a Arc<CompiledRule>,
    pub prefix: Option<&'a str>,
}

impl PortRoutes {
    /// The rule the request goes to, or `None` (404 / gRPC UNIMPLEMENTED).
    pub fn select(&self, req: &RequestView<'_>) -> Option<Selected<'_>> {
        self.entries
            .iter()
            .find(|e| e.matches(req))
            .map(|e| Selected {
                rule: &e.rule,
                prefix: match &e.path {
                    PathTest::Prefix(p) => Some(p.as_str()),
                    _ => None,
                },
            })
    }

    /// Routes by name, for `meshctl routes`.
    pub fn route_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .entries
            .iter()
            .map(|e| e.rule.route.to_string())
            .collect();
        names.sort();
        names.dedup();
        names
    }

    /// Every (route label, rule name) with an entry here, in no particular order.
    pub fn rules(&self) -> Vec<(String, String)> {
        self.entries
            .iter()
            .map(|e| (e.rule.route_label(), e.rule.name.clone()))
            .collect()
    }
}

#[derive(Debug, Default)]
struct Frontend {
    /// Routes in the Service's namespace: for every client without consumer routes.
    producer: Option<Arc<PortRoutes>>,
    /// Routes in other namespaces, by that namespace: for its clients only.
    consumers: HashMap<String, Arc<PortRoutes>>,
}

#[derive(Debug, Default)]
pub struct HttpRoutes {
    frontends: HashMap<SocketAddr, Frontend>,
    pub problems: Vec<RouteProblem>,
}

impl HttpRoutes {
    pub fn build(config: &Config, server_first: &[u16]) -> HttpRoutes {
        if config.routes.is_empty() {
            return HttpRoutes::default();
        }
        let index = Index::of(config);
        let mut problems = Vec::new();
        // (service, port number) -> (scope namespace -> routes attached from it).
        let mut attached: HashMap<(NamespacedName, u16), HashMap<String, Vec<&Route>>> =
            HashMap::new();
        for route in &config.routes {
            for parent in &route.parents {
                let Some(svc) = index.service(&parent.service) else {
                    problems.push(RouteProblem {
                        route: route.id.clone(),
                        kind: route.kind,
                        service: parent.service.clone(),
                        reason: "NoMatchingParent",
                        message: format!("Service {} does not exist", parent.service),
                    });
                    continue;
                };
                if svc.cluster_ips.is_empty() {
                    problems.push(RouteProblem {
                        route: route.id.clone(),
                        kind: route.kind,
                        service: svc.id.clone(),
                        reason: "NotAllowedByListeners",
                        message: format!(
                            "Service {} is headless: routes attach to a ClusterIP",
                            svc.id
                        ),
                    });
                    continue;
                }
                let ports: Vec<&ServicePort> = svc
                    .ports
                    .iter()
                    .filter(|p| p.protocol == Protocol::Tcp)
                    .filter(|p| parent.port.is_none_or(|n| n == p.port))
                    .filter(|p| {
                        parent
                            .section
                            .as_deref()
                            .is_none_or(|s| p.name.as_deref() == Some(s))
                    })
                    .collect();
                if ports.is_empty() {
                    problems.push(RouteProblem {
                        route: route.id.clone(),
                        kind: route.kind,
                        service: svc.id.clone(),
                        reason: "NoMatchingParent",
                        message: format!("Service {} has no such port", svc.id),
                    });
                }
                for p in ports {
                    let scope = attached
                        .entry((svc.id.clone(), p.port))
                        .or_default()
                        .entry(route.id.namespace.clone())
                        .or_default();
                    if !scope
                        .iter()
                        .any(|r| r.id == route.id && r.kind == route.kind)
                    {
                        scope.push(route);
                    }
                }
            }
        }
        let mut frontends: HashMap<SocketAddr, Frontend> = HashMap::new();
        for ((svc_id, port), scopes) in attached {
            let Some(svc) = index.service(&svc_id) else {
                continue;
            };
            let Some(sp) = svc.ports.iter().find(|p| p.port == port) else {
                continue;
            };
            if declared(sp, server_first) == PortProtocol::Opaque {
                for r in scopes.values().flatten() {
                    problems.push(RouteProblem {
                        route: r.id.clone(),
                        kind: r.kind,
                        service: svc_id.clone(),
                        reason: "UnsupportedValue",
                        message: format!(
                            "{svc_id} port {port} is declared opaque TCP (appProtocol, name or a server-first port): it stays L4"
                        ),
                    });
                }
                continue;
            }
            let mut frontend = Frontend::default();
            for (ns, mut routes) in scopes {
                // GEP-1294: GRPCRoute wins over HTTPRoute on one port.
                if routes.iter().any(|r| r.kind == RouteKind::Grpc) {
                    for r in routes.iter().filter(|r| r.kind == RouteKind::Http) {
                        problems.push(RouteProblem {
                            route: r.id.clone(),
                            kind: r.kind,
                            service: svc_id.clone(),
                            reason: "Conflicted",
                            message: format!(
                                "a GRPCRoute is attached to {svc_id} port {port}; GRPCRoute wins"
                            ),
                        });
                    }
                    routes.retain(|r| r.kind == RouteKind::Grpc);
                }
                let compiled = Arc::new(compile(&index, svc, sp, &routes, server_first));
                if ns == svc_id.namespace {
                    frontend.producer = Some(compiled);
                } else {
                    frontend.consumers.insert(ns, compiled);
                }
            }
            for ip in &svc.cluster_ips {
                frontends.insert(
                    SocketAddr::new(ip.to_canonical(), port),
                    Frontend {
                        producer: frontend.producer.clone(),
                        consumers: frontend.consumers.clone(),
                    },
                );
            }
        }
        problems.sort_by(|a, b| (&a.route, a.reason).cmp(&(&b.route, b.reason)));
        HttpRoutes {
            frontends,
            problems,
        }
    }

    /// The routes a client in `namespace` gets at frontend `dst`, if any are attached.
    pub fn for_client(&self, dst: SocketAddr, namespace: &str) -> Option<Arc<PortRoutes>> {
        let f = self
            .frontends
            .get(&SocketAddr::new(dst.ip().to_canonical(), dst.port()))?;
        f.consumers.get(namespace).or(f.producer.as_ref()).cloned()
    }

    /// Every frontend with its route sets, sorted, for `meshctl routes`.
    pub fn frontends(&self) -> Vec<(SocketAddr, Option<String>, Arc<PortRoutes>)> {
        let mut out = Vec::new();
        for (addr, f) in &self.frontends {
            if let Some(p) = &f.producer {
                out.push((*addr, None, p.clone()));
            }
            for (ns, c) in &f.consumers {
                out.push((*addr, Some(ns.clone()), c.clone()));
            }
        }
        out.sort_by(|a, b| (a.0, &a.1).cmp(&(b.0, &b.1)));
        out
    }
}

/// Precedence (higher first) of a match, then the tie-breaks: creation time, route
/// name, rule index, match index.
type Rank = (u8, usize, bool, usize, usize);
type Tie<'a> = (Option<i64>, &'a NamespacedName, usize, usize);

struct Staged<'a> {
    entry: Entry,
    rank: Rank,
    tie: Tie<'a>,
}

fn compile(
    index: &Index<'_>,
    svc: &Service,
    port: &ServicePort,
    routes: &[&Route],
    server_first: &[u16],
) -> PortRoutes {
    let kind = routes.first().map(|r| r.kind).unwrap_or(RouteKind::Http);
    let mut staged: Vec<Staged<'_>> = Vec::new();
    for route in routes {
        for (ri, rule) in route.rules.iter().enumerate() {
            let compiled = Arc::new(CompiledRule {
                route: route.id.clone(),
                kind: route.kind,
                name: rule.name.clone().unwrap_or_else(|| ri.to_string()),
                filters: rule.filters.clone(),
                backends: rule
                    .backends
                    .iter()
                    .map(|b| CompiledBackend {
                        service: b.service.clone(),
                        port: b.port,
                        weight: b.weight,
                        filters: b.filters.clone(),
                        endpoints: index.endpoints(&b.service, b.port),
                    })
                    .collect(),
                timeouts: rule.timeouts,
                retry: rule.retry.clone(),
                mirrors: rule
                    .filters
                    .iter()
                    .filter_map(|f| match f {
                        Filter::Mirror(m) => Some(CompiledMirror {
                            endpoints: index.endpoints(&m.service, m.port),
                            mirror: m.clone(),
                        }),
                        _ => None,
                    })
                    .collect(),
            });
            for (mi, m) in rule.matches.iter().enumerate() {
                let Some(entry) = entry(m, compiled.clone()) else {
                    continue;
                };
                staged.push(Staged {
                    entry,
                    rank: rank(m),
                    tie: (route.created, &route.id, ri, mi),
                });
            }
        }
    }
    staged.sort_by(|a, b| b.rank.cmp(&a.rank).then_with(|| tie_break(&a.tie, &b.tie)));
    let protocol = match (kind, declared(port, server_first)) {
        (RouteKind::Grpc, _) => PortProtocol::Http2,
        (_, p) => p,
    };
    PortRoutes {
        service: svc.id.clone(),
        port: port.port,
        kind,
        protocol,
        entries: staged.into_iter().map(|s| s.entry).collect(),
    }
}

/// Oldest route first (a route with a creation time before one without), then by
/// `{namespace}/{name}`, then rule order, then match order.
fn tie_break(a: &Tie<'_>, b: &Tie<'_>) -> Ordering {
    let created = match (a.0, b.0) {
        (Some(x), Some(y)) => x.cmp(&y),
        (Some(_), None) => Ordering::Less,
        (None, Some(_)) => Ordering::Greater,
        (None, None) => Ordering::Equal,
    };
    created
        .then_with(|| a.1.cmp(b.1))
        .then_with(|| a.2.cmp(&b.2))
        .then_with(|| a.3.cmp(&b.3))
}

fn entry(m: &RouteMatch, rule: Arc<CompiledRule>) -> Option<Entry> {
    let path = match &m.path {
        PathMatch::Exact(p) => PathTest::Exact(p.clone()),
        PathMatch::Prefix(p) => PathTest::Prefix(p.clone()),
        PathMatch::Regex(r) => PathTest::Regex(anchored(r)?),
        PathMatch::Grpc { service, method } => PathTest::Grpc {
            service: match service {
                Some(s) => Some(StrTest::compile(s)?),
                None => None,
            },
            method: match method {
                Some(s) => Some(StrTest::compile(s)?),
                None => None,
            },
        },
    };
    let mut headers = Vec::new();
    for h in &m.headers {
        headers.push((
            http::HeaderName::from_bytes(h.name.as_bytes()).ok()?,
            StrTest::compile(&h.value)?,
        ));
    }
    let mut query = Vec::new();
    for q in &m.query {
        query.push((q.name.clone(), StrTest::compile(&q.value)?));
    }
    Some(Entry {
        path,
        method: m.method.clone(),
        headers,
        query,
        rule,
    })
}

/// Services by name and their slices, looked up once per build.
struct Index<'a> {
    services: foldhash::HashMap<&'a NamespacedName, &'a Service>,
    slices: Slices<'a>,
}

impl<'a> Index<'a> {
    fn of(config: &'a Config) -> Index<'a> {
        Index {
            services: config.services.iter().map(|s| (&s.id, &**s)).collect(),
            slices: Slices::of(config),
        }
    }

    fn service(&self, id: &NamespacedName) -> Option<&'a Service> {
        self.services.get(id).copied()
    }

    /// The ready endpoints of a backend Service port, `None` if there is no such port.
    fn endpoints(&self, id: &NamespacedName, port: u16) -> Option<Vec<SocketAddr>> {
        let svc = self.service(id)?;
        let sp = svc
            .ports
            .iter()
            .find(|p| p.port == port && p.protocol == Protocol::Tcp)?;
        Some(self.slices.endpoints(svc, sp))
    }
}

#[cfg(test)]
mod tests;
