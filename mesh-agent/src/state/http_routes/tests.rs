use std::collections::HashMap;

use http::HeaderMap;

use super::*;
use crate::config::{Config, load_text};

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: app}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: http, port: 80, targetPort: 8080}
  - {name: admin, port: 9000}
  - {name: tcp-raw, port: 7000}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v1, namespace: app}
spec:
  clusterIP: 10.96.0.21
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: app}
spec:
  clusterIP: 10.96.0.22
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: echo-v1-a
  namespace: app
  labels: {kubernetes.io/service-name: echo-v1}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.244.1.10]}]
"#;

fn config(routes: &str) -> Config {
    let mut c = Config::default();
    let mut seen = HashMap::new();
    load_text("services.yaml".as_ref(), SERVICES, &mut c, &mut seen).unwrap();
    load_text("routes.yaml".as_ref(), routes, &mut c, &mut seen).unwrap();
    c
}

fn front() -> SocketAddr {
    "10.96.0.20:80".parse().unwrap()
}

/// Which backend service the request goes to, by the rule chosen.
fn pick(routes: &PortRoutes, method: &str, uri: &str, headers: &[(&str, &str)]) -> Option<String> {
    let uri: http::Uri = uri.parse().unwrap();
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    let view = RequestView {
        method,
        path: uri.path(),
        query: uri.query(),
        headers: &map,
    };
    routes.select(&view).map(|s| {
        s.rule
            .backends
            .first()
            .map_or("(none)".to_owned(), |b| b.service.name.clone())
    })
}

const MATCHING: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: matching, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches:
    - path: {type: PathPrefix, value: /}
    - headers: [{name: version, value: one}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches:
    - path: {type: PathPrefix, value: /v2}
    - headers: [{name: version, value: two}]
    backendRefs: [{name: echo-v2, port: 80}]
"#;

#[test]
fn path_prefix_is_element_wise_and_headers_win_over_a_shorter_prefix() {
    let routes = HttpRoutes::build(&config(MATCHING), DEFAULT_SERVER_FIRST_PORTS);
    let r = routes.for_client(front(), "app").unwrap();
    for (path, want) in [
        ("/", "echo-v1"),
        ("/example", "echo-v1"),
        ("/v2", "echo-v2"),
        ("/v2/", "echo-v2"),
        ("/v2/example", "echo-v2"),
        ("/v2example", "echo-v1"),
        ("/foo/v2/example", "echo-v1"),
    ] {
        assert_eq!(pick(&r, "GET", path, &[]).as_deref(), Some(want), "{path}");
    }
    // A header match beats the catch-all prefix `/` (more header matches)...
    assert_eq!(
        pick(&r, "GET", "/", &[("version", "two")]).as_deref(),
        Some("echo-v2")
    );
    // ...but `/v2` is a longer prefix than `/`, so it beats `version: one` on `/`.
    assert_eq!(
        pick(&r, "GET", "/v2", &[("version", "one")]).as_deref(),
        Some("echo-v2")
    );
}

#[test]
fn precedence_exact_then_regex_then_longest_prefix_then_method_headers_query() {
    let routes = config(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: prec, namespace: app}
spec:
  parentRefs: [{group: core, kind: Service, name: echo, sectionName: http}]
  rules:
  - name: prefix
    matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - name: exact
    matches: [{path: {type: Exact, value: /api/exact}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - name: regex
    matches: [{path: {type: RegularExpression, value: "/api/v[0-9]+/.*"}}]
    backendRefs: [{name: echo, port: 9000}]
  - name: method
    matches: [{path: {type: PathPrefix, value: /api}, method: POST}]
    backendRefs: [{name: echo, port: 7000}]
  - name: query
    matches: [{path: {type: PathPrefix, value: /api}, queryParams: [{name: q, value: "a b"}]}]
    backendRefs: [{name: echo-v2, port: 80}]
"#,
    );
    let table = HttpRoutes::build(&routes, DEFAULT_SERVER_FIRST_PORTS);
    let r = table.for_client(front(), "app").unwrap();
    let rule = |m: &str, uri: &str| {
        let uri: http::Uri = uri.parse().unwrap();
        let h = HeaderMap::new();
        r.select(&RequestView {
            method: m,
            path: uri.path(),
            query: uri.query(),
            headers: &h,
        })
        .map(|s| s.rule.name.clone())
    };
    assert_eq!(rule("GET", "/api/exact").as_deref(), Some("exact"));
    assert_eq!(rule("POST", "/api/exact").as_deref(), Some("exact"));
    assert_eq!(rule("GET", "/api/v1/x").as_deref(), Some("regex"));
    // Regex matches the whole path, not a part of it.
    assert_eq!(rule("GET", "/x/api/v1/x").as_deref(), None);
    assert_eq!(rule("POST", "/api/other").as_deref(), Some("method"));
    assert_eq!(rule("GET", "/api/other?q=a%20b").as_deref(), Some("query"));
    assert_eq!(rule("GET", "/api/other?q=ab").as_deref(), Some("prefix"));
    // Nothing matches outside /api: the caller answers 404.
    assert_eq!(rule("GET", "/other").as_deref(), None);
}

#[test]
fn consumer_routes_replace_producer_routes_for_their_namespace_only() {
    let c = config(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: producer, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules: [{backendRefs: [{name: echo-v1, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, namespace: app, port: 80}]
  rules: [{backendRefs: [{name: echo-v2, namespace: app, port: 80}]}]
"#,
    );
    let table = HttpRoutes::build(&c, DEFAULT_SERVER_FIRST_PORTS);
    let app = table.for_client(front(), "app").unwrap();
    let shop = table.for_client(front(), "shop").unwrap();
    let other = table.for_client(front(), "other").unwrap();
    assert_eq!(pick(&app, "GET", "/", &[]).as_deref(), Some("echo-v1"));
    assert_eq!(pick(&shop, "GET", "/", &[]).as_deref(), Some("echo-v2"));
    assert_eq!(pick(&other, "GET", "/", &[]).as_deref(), Some("echo-v1"));
    // Another port of the Service has no routes: it stays L4.
    assert!(
        table
            .for_client("10.96.0.20:9000".parse().unwrap(), "app")
            .is_none()
    );
    // A pod IP never gets the Service's routes (the frontend is the ClusterIP).
    assert!(
        table
            .for_client("10.244.1.10:8080".parse().unwrap(), "app")
            .is_none()
    );
}

#[test]
fn grpc_routes_win_over_http_routes_and_match_service_and_method() {
    let c = config(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules: [{backendRefs: [{name: echo-v1, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: rpc, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{method: {service: pkg.Echo, method: Say}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{method: {type: RegularExpression, service: "pkg\\..*"}}]
    backendRefs: [{name: echo-v1, port: 80}]
"#,
    );
    let table = HttpRoutes::build(&c, DEFAULT_SERVER_FIRST_PORTS);
    assert_eq!(table.problems.len(), 1, "{:?}", table.problems);
    assert_eq!(table.problems[0].reason, "Conflicted");
    assert_eq!(table.problems[0].route.name, "web");
    let r = table.for_client(front(), "app").unwrap();
    assert_eq!(r.kind, RouteKind::Grpc);
    assert_eq!(r.protocol, PortProtocol::Http2);
    assert_eq!(
        pick(&r, "POST", "/pkg.Echo/Say", &[]).as_deref(),
        Some("echo-v2")
    );
    assert_eq!(
        pick(&r, "POST", "/pkg.Echo/Other", &[]).as_deref(),
        Some("echo-v1")
    );
    assert_eq!(pick(&r, "POST", "/other.Echo/Say", &[]).as_deref(), None);
}

#[test]
fn backends_resolve_to_ready_endpoints_and_missing_ones_are_marked() {
    let c = config(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
  - backendRefs:
    - {name: echo-v1, port: 80, weight: 70}
    - {name: missing, port: 80, weight: 30}
"#,
    );
    let table = HttpRoutes::build(&c, DEFAULT_SERVER_FIRST_PORTS);
    let r = table.for_client(front(), "app").unwrap();
    let h = HeaderMap::new();
    let rule = r
        .select(&RequestView {
            method: "GET",
            path: "/",
            query: None,
            headers: &h,
        })
        .unwrap()
        .rule;
    assert_eq!(
        rule.backends[0].endpoints.as_deref(),
        Some(&["10.244.1.10:8080".parse().unwrap()][..])
    );
    assert_eq!(rule.backends[1].endpoints, None);
    // No port named: attached to every TCP port except the opaque one.
    assert!(
        table
            .for_client("10.96.0.20:9000".parse().unwrap(), "app")
            .is_some()
    );
    assert!(
        table
            .for_client("10.96.0.20:7000".parse().unwrap(), "app")
            .is_none()
    );
    assert!(
        table
            .problems
            .iter()
            .any(|p| p.reason == "UnsupportedValue" && p.message.contains("7000")),
        "{:?}",
        table.problems
    );
}

#[test]
fn protocol_comes_from_app_protocol_then_name_then_server_first_ports() {
    let port = |name: Option<&str>, app: Option<&str>, n: u16| ServicePort {
        name: name.map(str::to_owned),
        port: n,
        target_port: crate::config::TargetPort::Number(n),
        protocol: Protocol::Tcp,
        app_protocol: app.map(str::to_owned),
    };
    let d = |p| declared(&p, DEFAULT_SERVER_FIRST_PORTS);
    assert_eq!(d(port(None, Some("http"), 80)), PortProtocol::Http);
    assert_eq!(
        d(port(None, Some("kubernetes.io/h2c"), 80)),
        PortProtocol::Http2
    );
    assert_eq!(d(port(None, Some("grpc"), 80)), PortProtocol::Http2);
    assert_eq!(
        d(port(Some("http-web"), Some("tcp"), 80)),
        PortProtocol::Opaque
    );
    assert_eq!(
        d(port(None, Some("linkerd.io/opaque"), 80)),
        PortProtocol::Opaque
    );
    assert_eq!(d(port(Some("http-web"), None, 80)), PortProtocol::Http);
    assert_eq!(d(port(Some("http2-x"), None, 80)), PortProtocol::Http2);
    assert_eq!(d(port(Some("grpc"), None, 80)), PortProtocol::Http2);
    assert_eq!(d(port(Some("tcp-db"), None, 80)), PortProtocol::Opaque);
    assert_eq!(d(port(Some("db"), None, 3306)), PortProtocol::Opaque);
    assert_eq!(d(port(Some("web"), None, 8080)), PortProtocol::Detect);
    assert_eq!(d(port(None, None, 6379)), PortProtocol::Opaque);
}

#[test]
fn prefix_and_grpc_path_helpers() {
    assert!(prefix_matches("/", "/anything"));
    assert!(prefix_matches("/abc", "/abc"));
    assert!(prefix_matches("/abc", "/abc/"));
    assert!(!prefix_matches("/abc", "/abcd"));
    assert_eq!(grpc_parts("/pkg.Svc/Method"), Some(("pkg.Svc", "Method")));
    assert_eq!(grpc_parts("/pkg.Svc"), None);
    assert_eq!(grpc_parts("/a/b/c"), None);
}
