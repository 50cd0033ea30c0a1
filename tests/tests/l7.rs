//! L7 on the real kernel: HTTPRoutes attached to a Service (GAMMA), routed per request
//! by the agents, across nodes and on one node, for HTTP/1.1 and HTTP/2 clients. The
//! cases follow the Gateway API mesh conformance suite, asserting also what it does
//! not (the rewritten path, the whole `Location`).
mod common;

use std::{collections::HashMap, time::Duration};

use common::*;
use serde_json::Value;

const ECHO_PORT: u16 = 8080;

/// client and `local` on node-1; `v1`, `v2` and `v3` on node-2. Services: `echo` (the
/// frontend, 10.96.0.20:80, endpoints local and v1), `echo-v1`, `echo-v2` (one
/// endpoint each), all HTTP on port 80 -> 8080.
fn l7_cluster(routes: &str) -> (Cluster, Pod) {
    let mut c = cluster(&["node-1", "node-2"]);
    let client = c.add_pod("node-1", "client").unwrap();
    let local = c.add_pod("node-1", "local").unwrap();
    let v1 = c.add_pod("node-2", "v1").unwrap();
    let v2 = c.add_pod("node-2", "v2").unwrap();
    let v3 = c.add_pod("node-2", "v3").unwrap();
    for p in [&local, &v1, &v2, &v3] {
        echo_serve(&mut c, p);
    }
    let mut cfg = String::new();
    for p in [&client, &local, &v1, &v2, &v3] {
        cfg += &c.pod_yaml(p, true);
    }
    cfg += &http_service("echo", vip(20), &[local.ip, v1.ip]);
    cfg += &http_service("echo-v1", vip(21), &[v1.ip]);
    cfg += &http_service("echo-v2", vip(22), &[v2.ip]);
    cfg += &http_service("echo-local", vip(23), &[local.ip]);
    cfg += routes;
    c.write_config("cluster.yaml", &cfg).unwrap();
    c.start_agent("node-1").unwrap();
    c.start_agent("node-2").unwrap();
    (c, client)
}

fn http_service(name: &str, vip: std::net::IpAddr, endpoints: &[std::net::IpAddr]) -> String {
    service_to(name, vip, endpoints, ECHO_PORT)
}

/// A Service on port 80 (named `http`) to `target` on `endpoints`.
fn service_to(
    name: &str,
    vip: std::net::IpAddr,
    endpoints: &[std::net::IpAddr],
    target: u16,
) -> String {
    let mut s = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  clusterIP: {vip}\n  ports:\n  - {{name: http, port: 80, targetPort: {target}}}\n---\n\
         apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: {name}-slice\n  namespace: default\n  labels: {{kubernetes.io/service-name: {name}}}\n\
         addressType: IPv4\nports: [{{name: http, port: {target}}}]\nendpoints:\n"
    );
    for ip in endpoints {
        s.push_str(&format!("- addresses: [\"{ip}\"]\n"));
    }
    s.push_str("---\n");
    s
}

fn echo_serve(c: &mut Cluster, pod: &Pod) {
    c.start_echo_server(pod, ECHO_PORT)
        .expect("start echo server");
}

/// One `echo-get` run: where it goes and what it sends.
struct Get<'a> {
    /// Default: the echo frontend, `vip(20):80`.
    addr: Option<String>,
    /// The `Host` header; default `echo`. `None` sends the address.
    host: Option<&'a str>,
    path: &'a str,
    h2: bool,
    count: usize,
    concurrency: usize,
    method: &'a str,
    headers: &'a [&'a str],
    body_bytes: usize,
    /// More requests on the same connection, as `METHOD PATH`.
    then: &'a [String],
}

impl Default for Get<'_> {
    fn default() -> Self {
        Get {
            addr: None,
            host: Some("echo"),
            path: "/",
            h2: false,
            count: 1,
            concurrency: 1,
            method: "GET",
            headers: &[],
            body_bytes: 0,
            then: &[],
        }
    }
}

/// Runs `echo-get` from `client`; an error when it could not connect or read.
fn try_get(c: &mut Cluster, client: &Pod, g: Get<'_>) -> anyhow::Result<Value> {
    let addr = g.addr.unwrap_or_else(|| sa(vip(20), 80));
    let count = g.count.to_string();
    let concurrency = g.concurrency.to_string();
    let body = g.body_bytes.to_string();
    let mut args = vec![
        "echo-get",
        "--addr",
        &addr,
        "--path",
        g.path,
        "--count",
        &count,
        "--method",
        g.method,
        "--concurrency",
        &concurrency,
    ];
    if let Some(host) = g.host {
        args.extend(["--host", host]);
    }
    if g.body_bytes > 0 {
        args.extend(["--body-bytes", &body]);
    }
    if g.h2 {
        args.push("--h2");
    }
    for h in g.headers {
        args.extend(["--header", h]);
    }
    for t in g.then {
        args.extend(["--then", t.as_str()]);
    }
    Ok(json(&c.run_in(client, &args, SECS)?))
}

/// Runs `echo-get` from `client`, which must succeed.
fn get(c: &mut Cluster, client: &Pod, g: Get<'_>) -> Value {
    try_get(c, client, g).unwrap()
}

/// Runs `grpc-call` (tonic) from `client` against the echo frontend.
fn grpc_call(
    c: &mut Cluster,
    client: &Pod,
    method: &str,
    count: usize,
    concurrency: usize,
    metadata: &[&str],
) -> Value {
    let addr = sa(vip(20), 80);
    let (count, concurrency) = (count.to_string(), concurrency.to_string());
    let mut args = vec![
        "grpc-call",
        "--addr",
        &addr,
        "--host",
        "echo",
        "--method",
        method,
        "--count",
        &count,
        "--concurrency",
        &concurrency,
    ];
    for m in metadata {
        args.extend(["--metadata", m]);
    }
    json(&c.run_in(client, &args, SECS).unwrap())
}

fn only_pod(out: &Value) -> String {
    let pods = out["pods"].as_object().unwrap();
    assert_eq!(pods.len(), 1, "{out}");
    pods.keys().next().unwrap().clone()
}

const MATCHING: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: matching, namespace: default}
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
  - matches: [{path: {type: Exact, value: /exact}}]
    backendRefs: [{name: echo-local, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /q}, queryParams: [{name: animal, value: whale}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /nowhere}}]
    backendRefs: [{name: missing, port: 80}]
---
"#;

#[test]
fn requests_are_routed_by_path_header_and_query_across_nodes_for_http1_and_http2() {
    let _g = serial();
    let (mut c, client) = l7_cluster(MATCHING);
    for h2 in [false, true] {
        for (path, headers, want) in [
            ("/", &[][..], "v1"),
            ("/example", &[], "v1"),
            ("/v2", &[], "v2"),
            ("/v2/", &[], "v2"),
            ("/v2/example", &[], "v2"),
            ("/v2example", &[], "v1"),
            ("/foo/v2/example", &[], "v1"),
            ("/", &["version: two"][..], "v2"),
            ("/exact", &[], "local"),
            ("/exact/more", &[], "v1"),
            ("/q?animal=whale", &[], "v2"),
            ("/q?animal=dolphin", &[], "v1"),
        ] {
            let out = get(
                &mut c,
                &client,
                Get {
                    path,
                    h2,
                    headers,
                    ..Get::default()
                },
            );
            assert_eq!(out["statuses"]["200"], 1, "{path} h2={h2}: {out}");
            assert_eq!(only_pod(&out), want, "{path} {headers:?} h2={h2}: {out}");
            // The app hears the protocol the client spoke, even across nodes (where
            // the request travelled as HTTP/2 between the agents).
            let proto = if h2 { "HTTP/2.0" } else { "HTTP/1.1" };
            assert_eq!(out["last"]["proto"], proto, "{out}");
            assert_eq!(out["last"]["path"], path, "{out}");
            assert_eq!(out["last"]["host"], "echo", "{out}");
            // The agents' own headers never reach the app.
            let seen = out["last"]["headers"].as_object().unwrap();
            assert!(seen.keys().all(|k| !k.starts_with("x-mesh-")), "{out}");
        }
        // A rule whose only backend does not exist: 500.
        let out = get(
            &mut c,
            &client,
            Get {
                path: "/nowhere",
                h2,
                ..Get::default()
            },
        );
        assert_eq!(out["statuses"]["500"], 1, "{out}");
    }
    // A client cannot forge the headers between agents: not the destination, not the
    // protocol, not the Service the metrics are labelled with. Across nodes ("/", v1)
    // and on one node ("/exact").
    for (path, want) in [("/", "v1"), ("/exact", "local")] {
        let out = get(
            &mut c,
            &client,
            Get {
                path,
                headers: &[
                    "x-mesh-dst: 10.0.0.1:22",
                    "x-mesh-orig-proto: HTTP/2",
                    "x-mesh-svc: forged/forged",
                ],
                ..Get::default()
            },
        );
        assert_eq!(out["statuses"]["200"], 1, "{out}");
        assert_eq!(only_pod(&out), want, "{out}");
        assert_eq!(out["last"]["proto"], "HTTP/1.1", "{out}");
        let seen = out["last"]["headers"].as_object().unwrap();
        assert!(seen.keys().all(|k| !k.starts_with("x-mesh-")), "{out}");
    }
    for (node, service) in [("node-1", "echo-local"), ("node-2", "echo-v1")] {
        let text = c.metrics(node).unwrap();
        let forged = metric(
            &text,
            "istio_requests_total",
            &[("destination_service_name", "forged")],
        );
        assert_eq!(forged, 0, "{node} counted a forged Service");
        let real = metric(
            &text,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("destination_service_name", service),
            ],
        );
        assert!(real > 0, "{node} counted no request for {service}");
    }
    // One access log line per request, with the route and rule.
    let log = c.agent_log("node-1");
    assert!(
        log.lines()
            .any(|l| l.contains("httproute/default/matching") && l.contains("/v2example")),
        "{log}"
    );
}

const FILTERS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: filters, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, sectionName: http}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /headers}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-set, value: set-by-route}]
        add: [{name: x-add, value: added}]
        remove: [x-remove]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        add: [{name: x-response, value: from-route}]
    backendRefs:
    - name: echo-v2
      port: 80
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {set: [{name: x-backend, value: v2}]}
  - matches: [{path: {type: PathPrefix, value: /prefix}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /full}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /one}}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /redirect-host}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {hostname: example.org}
  - matches: [{path: {type: PathPrefix, value: /redirect-301}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /moved}}
  - matches: [{path: {type: PathPrefix, value: /redirect-port}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {port: 8083, statusCode: 308, path: {type: ReplaceFullPath, replaceFullPath: /new}}
  - matches: [{path: {type: PathPrefix, value: /redirect-303}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {statusCode: 303, hostname: other.example}
  - matches: [{path: {type: PathPrefix, value: /redirect-307}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {statusCode: 307, scheme: https, port: 8443}
---
"#;

#[test]
fn filters_modify_headers_rewrite_paths_and_redirect() {
    let _g = serial();
    let (mut c, client) = l7_cluster(FILTERS);
    for h2 in [false, true] {
        let out = get(
            &mut c,
            &client,
            Get {
                path: "/headers",
                h2,
                headers: &["x-set: from-client", "x-add: from-client", "x-remove: gone"],
                ..Get::default()
            },
        );
        let seen = &out["last"]["headers"];
        assert_eq!(seen["x-set"], "set-by-route", "{out}");
        assert_eq!(seen["x-add"], "from-client,added", "{out}");
        assert!(seen.get("x-remove").is_none(), "{out}");
        assert_eq!(seen["x-backend"], "v2", "{out}");
        assert_eq!(out["last_headers"]["x-response"], "from-route", "{out}");
        assert_eq!(only_pod(&out), "v2");

        let out = get(
            &mut c,
            &client,
            Get {
                path: "/prefix/one?x=1",
                h2,
                ..Get::default()
            },
        );
        assert_eq!(out["last"]["path"], "/one?x=1", "{out}");
        assert_eq!(out["last"]["host"], "rewritten.example", "{out}");
        let out = get(
            &mut c,
            &client,
            Get {
                path: "/prefix",
                h2,
                ..Get::default()
            },
        );
        assert_eq!(out["last"]["path"], "/", "{out}");
        let out = get(
            &mut c,
            &client,
            Get {
                path: "/full/anything",
                h2,
                ..Get::default()
            },
        );
        assert_eq!(out["last"]["path"], "/one", "{out}");

        for (path, status, location) in [
            (
                "/redirect-host/a",
                "302",
                "http://example.org/redirect-host/a",
            ),
            ("/redirect-301/a?b=c", "301", "https://echo/moved/a?b=c"),
            ("/redirect-port", "308", "http://echo:8083/new"),
            (
                "/redirect-303/x",
                "303",
                "http://other.example/redirect-303/x",
            ),
            ("/redirect-307", "307", "https://echo:8443/redirect-307"),
        ] {
            let out = get(
                &mut c,
                &client,
                Get {
                    path,
                    h2,
                    ..Get::default()
                },
            );
            assert_eq!(out["statuses"][status], 1, "{path}: {out}");
            assert_eq!(out["last_headers"]["location"], location, "{path}: {out}");
        }
        // Nothing matches: 404 from the agent.
        let out = get(
            &mut c,
            &client,
            Get {
                path: "/other",
                h2,
                ..Get::default()
            },
        );
        assert_eq!(out["statuses"]["404"], 1, "{out}");
    }
}

#[test]
fn weights_split_requests_and_one_connection_is_balanced_per_request() {
    let _g = serial();
    let routes = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /split}}]
    backendRefs:
    - {name: echo-v1, port: 80, weight: 70}
    - {name: echo-v2, port: 80, weight: 30}
    - {name: echo-local, port: 80, weight: 0}
  - backendRefs: [{name: echo, port: 80}]
---
"#;
    let (mut c, client) = l7_cluster(routes);
    for h2 in [false, true] {
        let out = get(
            &mut c,
            &client,
            Get {
                path: "/split",
                h2,
                count: 1000,
                ..Get::default()
            },
        );
        let pods: HashMap<String, u64> = serde_json::from_value(out["pods"].clone()).unwrap();
        assert_eq!(out["statuses"]["200"], 1000, "{out}");
        let v1 = pods.get("v1").copied().unwrap_or(0);
        assert!((650..=750).contains(&v1), "70% within ±5%: {out}");
        assert_eq!(pods.get("local"), None, "weight 0 got requests: {out}");
    }
    // The Service's own endpoints (local on node-1, v1 on node-2): the healthy
    // same-node endpoint takes every request, however many are in flight.
    let out = get(
        &mut c,
        &client,
        Get {
            path: "/",
            h2: true,
            count: 400,
            concurrency: 16,
            ..Get::default()
        },
    );
    assert_eq!(out["statuses"]["200"], 400, "{out}");
    assert_eq!(only_pod(&out), "local", "same node first: {out}");
    // A pod IP is not the frontend: no routes, the pod itself answers (MeshFrontend).
    let v2_ip = c.pod_ip("v2");
    let out = get(
        &mut c,
        &client,
        Get {
            addr: Some(sa(v2_ip, ECHO_PORT)),
            host: None,
            path: "/split",
            ..Get::default()
        },
    );
    assert_eq!(only_pod(&out), "v2", "{out}");
}

const COUNTED: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: counted, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - name: remote
    matches: [{path: {type: PathPrefix, value: /remote}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - name: here
    matches: [{path: {type: PathPrefix, value: /here}}]
    backendRefs: [{name: echo-local, port: 80}]
---
"#;

#[test]
fn request_metrics_count_exactly_at_both_reporters_and_meshctl_shows_routes() {
    let _g = serial();
    let (mut c, client) = l7_cluster(COUNTED);
    let (mut watch, events) = observe(&c, "node-1", &["--service", "echo-v1"]);
    poll("the observer to subscribe", SECS, || {
        metric(&c.metrics("node-1").unwrap(), "mesh_flow_observers", &[]) == 1
    });
    let mut send = |path: &str, count: usize, headers: &[&str]| {
        let out = get(
            &mut c,
            &client,
            Get {
                path,
                count,
                headers,
                ..Get::default()
            },
        );
        assert_eq!(
            out["statuses"]
                .as_object()
                .unwrap()
                .values()
                .map(|v| v.as_u64().unwrap())
                .sum::<u64>(),
            count as u64,
            "{out}"
        );
        out
    };
    let out = send("/remote", 5, &[]);
    // A request id is made up when the client sent none; trace context passes.
    let id = out["last"]["headers"]["x-request-id"]
        .as_str()
        .unwrap_or("");
    assert_eq!(id.len(), 36, "{out}");
    send("/remote", 3, &["x-echo-status: 503"]);
    let out = send(
        "/here",
        4,
        &[
            "x-request-id: from-the-client",
            "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ],
    );
    assert_eq!(
        out["last"]["headers"]["x-request-id"], "from-the-client",
        "{out}"
    );
    assert_eq!(
        out["last"]["headers"]["traceparent"],
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "{out}"
    );
    send("/nothing", 2, &[]);
    let count = |node: &str, labels: &[(&str, &str)]| {
        metric(&c.metrics(node).unwrap(), "istio_requests_total", labels)
    };
    let remote = |reporter| {
        [
            ("reporter", reporter),
            ("source_workload", "client"),
            (
                "source_principal",
                "spiffe://cluster.local/ns/default/sa/client",
            ),
            ("destination_workload", "v1"),
            (
                "destination_principal",
                "spiffe://cluster.local/ns/default/sa/v1",
            ),
            ("destination_service", "echo-v1.default.svc.cluster.local"),
            ("destination_service_name", "echo-v1"),
            ("destination_service_namespace", "default"),
            ("request_protocol", "http"),
            ("connection_security_policy", "mutual_tls"),
        ]
    };
    // Counted when the response ends: the client has its answers, so both agents
    // have counted, at most a scheduling moment later.
    poll("the destination's counts", SECS, || {
        count("node-2", &[("reporter", "destination")]) == 8
    });
    for (node, reporter) in [("node-1", "source"), ("node-2", "destination")] {
        let mut ok = remote(reporter).to_vec();
        ok.push(("response_code", "200"));
        assert_eq!(count(node, &ok), 5, "{node}: {}", c.metrics(node).unwrap());
        let mut failed = remote(reporter).to_vec();
        failed.push(("response_code", "503"));
        assert_eq!(
            count(node, &failed),
            3,
            "{node}: {}",
            c.metrics(node).unwrap()
        );
        let text = c.metrics(node).unwrap();
        assert_eq!(
            metric(&text, "istio_request_duration_milliseconds_count", &ok),
            5,
            "{text}"
        );
        assert!(metric(&text, "istio_response_bytes_sum", &ok) > 0, "{text}");
        assert_eq!(
            metric(&text, "istio_request_bytes_count", &failed),
            3,
            "{text}"
        );
    }
    // The same-node requests are reported once by each view, in the one agent.
    for reporter in ["source", "destination"] {
        let labels = [
            ("reporter", reporter),
            ("destination_workload", "local"),
            ("destination_service_name", "echo-local"),
            ("response_code", "200"),
            ("connection_security_policy", "none"),
        ];
        assert_eq!(
            count("node-1", &labels),
            4,
            "{}",
            c.metrics("node-1").unwrap()
        );
    }
    assert_eq!(count("node-2", &[("destination_workload", "local")]), 0);
    // No rule matched: 404 with Envoy's NR flag, at the source only.
    assert_eq!(
        count(
            "node-1",
            &[
                ("response_code", "404"),
                ("response_flags", "NR"),
                ("destination_workload", "unknown")
            ]
        ),
        2
    );
    // meshctl routes: the frontend and the requests per rule.
    let out = c.meshctl("node-1", &["-o", "json", "routes"]).unwrap();
    let routes = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        routes["frontends"][0]["service"], "default/echo:80",
        "{routes}"
    );
    assert_eq!(
        routes["frontends"][0]["routes"][0], "default/counted",
        "{routes}"
    );
    let rule = |name: &str| {
        routes["rules"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["rule"] == name)
            .cloned()
            .unwrap_or_default()
    };
    assert_eq!(rule("remote")["requests"], 8, "{routes}");
    assert_eq!(rule("remote")["errors"], 3, "{routes}");
    assert_eq!(rule("here")["requests"], 4, "{routes}");
    let table = c.meshctl("node-1", &["routes"]).unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("httproute/default/counted") && table.contains("remote"),
        "{table}"
    );
    // meshctl observe: one event per request.
    let (ev, _) = wait_for(&events, SECS, |e| {
        e["kind"] == "request" && e["reason"].as_str().is_some_and(|r| r.contains("-> 503"))
    })
    .expect("a request event");
    assert!(
        ev["reason"].as_str().unwrap().contains("GET echo/remote"),
        "{ev}"
    );
    let _ = watch.kill();
    let _ = watch.wait();
}

const L7_POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin-writes, namespace: default}
spec:
  action: DENY
  rules:
  - to: [{operation: {methods: ["POST"], paths: ["/admin/*", "/local/admin/{**}"]}}]
  - when: [{key: "request.headers[x-debug]", values: ["on"]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: grpc-get-only, namespace: default}
spec:
  selector: {matchLabels: {app: v2}}
  action: ALLOW
  rules:
  - to: [{operation: {methods: ["POST"], paths: ["/echo.Echo/Get"]}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: all, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /echo.Echo}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /local}}]
    backendRefs: [{name: echo-local, port: 80}]
  - backendRefs: [{name: echo-v1, port: 80}]
---
"#;

#[test]
fn l7_policy_denies_one_request_and_the_connection_serves_the_next() {
    let _g = serial();
    let (mut c, client) = l7_cluster(L7_POLICY);
    // Across nodes (enforced by node-2's agent) and on one node.
    for (prefix, node) in [("", "node-2"), ("/local", "node-1")] {
        let admin = format!("{prefix}/admin/users");
        let then = [
            format!("GET {admin}"),
            format!("POST {prefix}/public"),
            format!("POST {admin}"),
        ];
        let out = get(
            &mut c,
            &client,
            Get {
                method: "POST",
                path: &admin,
                then: &then,
                ..Get::default()
            },
        );
        assert_eq!(out["statuses"]["403"], 1, "{out}");
        // The same connection carried on: GET allowed, POST elsewhere allowed, POST
        // /admin denied again.
        assert_eq!(out["then"], serde_json::json!([200, 200, 403]), "{out}");
        let text = c.metrics(node).unwrap();
        assert!(
            metric(
                &text,
                "istio_requests_total",
                &[
                    ("reporter", "destination"),
                    ("response_code", "403"),
                    ("response_flags", "UAEX")
                ]
            ) >= 2,
            "{text}"
        );
    }
    // gRPC (tonic), method by method: v2 allows only /echo.Echo/Get; a denial is
    // PERMISSION_DENIED (7).
    let ok = grpc_call(&mut c, &client, "get", 1, 1, &[]);
    assert_eq!(ok["codes"]["0"], 1, "{ok}");
    assert_eq!(only_pod(&ok), "v2", "{ok}");
    let denied = grpc_call(&mut c, &client, "delete", 1, 1, &[]);
    assert_eq!(denied["codes"]["7"], 1, "{denied}");
    // The way around an L7 policy: the pod IP, where no route applies and the source
    // agent carries bytes, not requests. Only the DENY's L7 parts stand against such a
    // connection, so the destination's agent, seeing HTTP, checks each request of it:
    // across nodes (v1) and on one node (local). (Before, it refused the whole
    // connection, and with it every client of the pod that used its IP or a Service
    // without routes.)
    // A Service with no route attached (`echo-v1`) takes the same way.
    let cases = [
        (sa(c.pod_ip("v1"), ECHO_PORT), "v1", "", "node-2"),
        (
            sa(c.pod_ip("local"), ECHO_PORT),
            "local",
            "/local",
            "node-1",
        ),
        (sa(vip(21), 80), "v1", "", "node-2"),
    ];
    for (addr, pod, prefix, node) in cases {
        let before = c.agent_log(node).matches("routed request refused").count();
        let out = get(
            &mut c,
            &client,
            Get {
                addr: Some(addr.clone()),
                host: None,
                method: "POST",
                path: &format!("{prefix}/public"),
                then: &[
                    format!("POST {prefix}/admin/users"),
                    format!("GET {prefix}/admin/users"),
                    format!("POST {prefix}/public/../admin/users"),
                    format!("CONNECT {prefix}/public"),
                ],
                ..Get::default()
            },
        );
        assert_eq!(out["statuses"]["200"], 1, "{pod}: {out}");
        assert_eq!(only_pod(&out), pod, "{out}");
        assert_eq!(
            out["then"],
            serde_json::json!([403, 200, 403, 400]),
            "{pod}: {out}"
        );
        let after = c.agent_log(node).matches("routed request refused").count();
        assert!(after >= before + 2, "{node} logged no refusal");
        // HTTP/2 with prior knowledge is served the same way, and reaches the app as
        // HTTP/2.
        let out = get(
            &mut c,
            &client,
            Get {
                addr: Some(addr.clone()),
                host: None,
                h2: true,
                path: &format!("{prefix}/public"),
                then: &[format!("POST {prefix}/admin/users")],
                ..Get::default()
            },
        );
        assert_eq!(out["statuses"]["200"], 1, "{pod} h2: {out}");
        assert_eq!(out["last"]["proto"], "HTTP/2.0", "{out}");
        assert_eq!(out["then"], serde_json::json!([403]), "{pod} h2: {out}");
        // A connection that is not HTTP cannot be checked request by request: it is
        // refused, and the application never sees its bytes.
        let who = c.run_in(&client, &["who", "--addr", &addr], SECS);
        assert!(
            who.as_ref().map_or(true, |o| !o.contains("HTTP/1.1")),
            "{pod}: the application answered a connection that is not HTTP: {who:?}"
        );
        poll("the destination to log the refusal", SECS, || {
            c.agent_log(node)
                .lines()
                .any(|l| l.contains("connection refused") && l.contains("is not HTTP"))
        });
    }
    // A server-first port (Redis's) is never served as HTTP, however the client's
    // bytes look: they would reach a protocol that may act on them.
    for pod in ["v1", "local"] {
        let addr = sa(c.pod_ip(pod), 6379);
        let out = try_get(
            &mut c,
            &client,
            Get {
                addr: Some(addr),
                host: None,
                path: "/public",
                ..Get::default()
            },
        );
        assert!(
            out.is_err(),
            "{pod}: HTTP reached a server-first port: {out:?}"
        );
    }
}

/// The way around an L7 policy that an application opens: a path it resolves to the
/// denied one. Each spelling below reaches `/admin/users` in common servers (dot
/// segments, encoded dots and letters: every server; `//` and `%2F`: nginx and others
/// that merge or decode slashes; `;v=1`: Tomcat and Spring's path parameters). Before
/// the mesh normalized paths, every one of them got a 200 from the application.
#[test]
fn l7_policy_sees_the_path_the_application_gets() {
    let _g = serial();
    let (mut c, client) = l7_cluster(L7_POLICY);
    // Across nodes (enforced by node-2's agent) and on one node.
    for prefix in ["", "/local"] {
        let spellings = [
            "/public/../admin/users",
            "/public/%2e%2e/admin/users",
            "/%61dmin/users",
            "//admin/users",
            "/admin%2Fusers",
            "/admin;v=1/users",
        ];
        let then: Vec<String> = spellings
            .iter()
            .map(|p| format!("POST {prefix}{p}"))
            .collect();
        let out = get(
            &mut c,
            &client,
            Get {
                method: "POST",
                path: &format!("{prefix}/public/page"),
                then: &then,
                ..Get::default()
            },
        );
        assert_eq!(out["statuses"]["200"], 1, "{out}");
        assert_eq!(
            out["then"],
            serde_json::json!([403, 403, 403, 403, 403, 403]),
            "{prefix}: {out}"
        );
        // The application gets the path the policy saw, the query as sent; an encoded
        // slash that crosses no policy boundary is delivered as sent.
        for (sent, delivered) in [
            ("/public/./a/../%7Eb?next=/../x", "/public/~b?next=/../x"),
            ("/public/group%2fname", "/public/group%2Fname"),
        ] {
            let out = get(
                &mut c,
                &client,
                Get {
                    method: "POST",
                    path: &format!("{prefix}{sent}"),
                    ..Get::default()
                },
            );
            assert_eq!(out["statuses"]["200"], 1, "{prefix}{sent}: {out}");
            assert_eq!(out["last"]["path"], format!("{prefix}{delivered}"), "{out}");
        }
        // What cannot be read one way is refused: a malformed escape, a NUL, a method
        // a policy's upper-case name would not match.
        let out = get(
            &mut c,
            &client,
            Get {
                path: &format!("{prefix}/public/%zz"),
                then: &[
                    format!("GET {prefix}/public/%00"),
                    format!("post {prefix}/admin/users"),
                ],
                ..Get::default()
            },
        );
        assert_eq!(out["statuses"]["400"], 1, "{out}");
        assert_eq!(
            out["then"],
            serde_json::json!([400, 400]),
            "{prefix}: {out}"
        );
    }
    // A header the DENY names, sent a second time behind a harmless first value: the
    // application may read either (before, the first alone was checked: 200).
    for headers in [&["x-debug: on"][..], &["x-debug: off", "x-debug: on"]] {
        let out = get(
            &mut c,
            &client,
            Get {
                path: "/public/page",
                headers,
                ..Get::default()
            },
        );
        assert_eq!(out["statuses"]["403"], 1, "{headers:?}: {out}");
    }
    // gRPC paths are normal already and pass unchanged (v2 allows only Get).
    let ok = grpc_call(&mut c, &client, "get", 1, 1, &[]);
    assert_eq!(ok["codes"]["0"], 1, "{ok}");
}

const RESILIENT: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: resilient, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /timeout}}]
    timeouts: {request: 500ms}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /no-timeout}}]
    timeouts: {request: 0s}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /retry}}]
    retry: {codes: [500], attempts: 3, backoff: 10ms}
    backendRefs: [{name: echo-v1, port: 80}]
---
"#;

#[test]
fn timeouts_answer_504_and_retries_stop_at_their_limits() {
    let _g = serial();
    let (mut c, client) = l7_cluster(RESILIENT);
    let mut status_of = |path: &str, headers: &[&str], body_bytes: usize| {
        let out = get(
            &mut c,
            &client,
            Get {
                path,
                headers,
                body_bytes,
                method: if body_bytes > 0 { "POST" } else { "GET" },
                ..Get::default()
            },
        );
        let statuses = out["statuses"].as_object().unwrap();
        assert_eq!(statuses.len(), 1, "{out}");
        let status: u16 = statuses.keys().next().unwrap().parse().unwrap();
        (status, out)
    };
    // 500 ms request timeout on a backend that takes 1 s: 504.
    let started = std::time::Instant::now();
    let (status, out) = status_of("/timeout", &["x-echo-delay-ms: 1000"], 0);
    assert_eq!(status, 504, "{out}");
    assert!(
        started.elapsed() < Duration::from_millis(950),
        "{:?}",
        started.elapsed()
    );
    // `0s` is no timeout.
    assert_eq!(
        status_of("/no-timeout", &["x-echo-delay-ms: 1000"], 0).0,
        200
    );
    // Two 500s, then success, with attempts 3: 200.
    let (status, out) = status_of("/retry", &["x-echo-fail-first: 2", "x-echo-key: a"], 0);
    assert_eq!(status, 200, "{out}");
    // Four 500s: the first attempt and three retries all fail.
    let (status, out) = status_of("/retry", &["x-echo-fail-first: 4", "x-echo-key: b"], 0);
    assert_eq!(status, 500, "{out}");
    // ...and exactly four were sent: the fifth request with that key succeeds.
    assert_eq!(
        status_of("/retry", &["x-echo-fail-first: 4", "x-echo-key: b"], 0).0,
        200
    );
    // A 503 is not in the codes: one attempt only, so the next one succeeds.
    let h503 = [
        "x-echo-fail-first: 1",
        "x-echo-key: c",
        "x-echo-status: 503",
    ];
    assert_eq!(status_of("/retry", &h503, 0).0, 503);
    assert_eq!(status_of("/retry", &h503, 0).0, 200);
    // A small body is sent again whole; a body over 64 KiB is not retried.
    let (status, out) = status_of("/retry", &["x-echo-fail-first: 1", "x-echo-key: d"], 1024);
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["last"]["body_len"], 1024, "{out}");
    let (status, out) = status_of(
        "/retry",
        &["x-echo-fail-first: 1", "x-echo-key: e"],
        100 * 1024,
    );
    assert_eq!(status, 500, "{out}");
    let log = c.agent_log("node-1");
    assert!(
        log.lines()
            .any(|l| l.contains("retries=2") && l.contains("path=\"/retry\"")),
        "{log}"
    );
    // A connection failure is retried (codes or not), on another endpoint: the
    // same-node one refuses, the other node's answers.
    let v1 = c.pod("v1");
    c.start_echo_server(&v1, 8082).unwrap();
    let applied = c.agent_log("node-1").matches("config applied").count();
    let flaky = service_to(
        "echo-flaky",
        vip(29),
        &[c.pod_ip("local"), c.pod_ip("v1")],
        8082,
    ) + r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: flaky, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo-flaky, port: 80}]
  rules:
  - retry: {codes: [503], attempts: 2}
    backendRefs: [{name: echo-flaky, port: 80}]
---
"#;
    c.write_config("flaky.yaml", &flaky).unwrap();
    poll("the flaky Service", SECS, || {
        c.agent_log("node-1").matches("config applied").count() > applied
    });
    let out = get(
        &mut c,
        &client,
        Get {
            addr: Some(sa(vip(29), 80)),
            host: Some("flaky"),
            path: "/flaky",
            ..Get::default()
        },
    );
    assert_eq!(out["statuses"]["200"], 1, "{out}");
    assert_eq!(only_pod(&out), "v1", "{out}");
    let log = c.agent_log("node-1");
    assert!(
        log.lines()
            .any(|l| l.contains("retries=1") && l.contains("path=\"/flaky\"")),
        "{log}"
    );
}

#[test]
fn websocket_upgrades_pass_through_a_routed_port_on_one_node_and_across_nodes() {
    let _g = serial();
    let (mut c, client) = l7_cluster("");
    const WS_PORT: u16 = 8081;
    for name in ["local", "v1"] {
        let pod = c.pod(name);
        c.start_ws_server(&pod, WS_PORT).expect("start ws server");
    }
    let applied = |c: &Cluster| {
        ["node-1", "node-2"].map(|n| c.agent_log(n).matches("config applied").count())
    };
    let before = applied(&c);
    let cfg = service_to("ws", vip(24), &[c.pod_ip("local"), c.pod_ip("v1")], WS_PORT)
        + &service_to("ws-local", vip(25), &[c.pod_ip("local")], WS_PORT)
        + &service_to("ws-v1", vip(26), &[c.pod_ip("v1")], WS_PORT)
        + r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ws, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: ws, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /here}}]
    backendRefs: [{name: ws-local, port: 80}]
  - backendRefs: [{name: ws-v1, port: 80}]
---
"#;
    c.write_config("ws.yaml", &cfg).unwrap();
    poll("both agents to apply the routes", SECS, || {
        let now = applied(&c);
        now[0] > before[0] && now[1] > before[1]
    });
    let addr = sa(vip(24), 80);
    for (path, pod) in [("/here", "local"), ("/there", "v1")] {
        let out = json(
            &c.run_in(
                &client,
                &[
                    "ws-get", "--addr", &addr, "--host", "ws", "--path", path, "--count", "20",
                ],
                SECS,
            )
            .unwrap(),
        );
        assert_eq!(out["status"], 101, "{out}");
        let echoes = out["echoes"].as_array().unwrap();
        assert_eq!(echoes.len(), 20, "{out}");
        assert_eq!(echoes[19], format!("{pod}: message 19"), "{out}");
    }
    let log = c.agent_log("node-1");
    assert!(
        log.lines()
            .any(|l| l.contains("httproute/default/ws") && l.contains("status=101")),
        "{log}"
    );
}

const GRPC_ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{method: {service: echo.Echo, method: Stream}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{method: {service: echo.Echo}, headers: [{name: x-tenant, value: local}]}]
    backendRefs: [{name: echo-local, port: 80}]
  - matches: [{method: {service: echo.Weighted}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-grpc-filter, value: set}]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-grpc-response, value: added}]}
    backendRefs:
    - {name: echo-v1, port: 80, weight: 70}
    - {name: echo-local, port: 80, weight: 0}
    - name: echo-v2
      port: 80
      weight: 30
      filters:
      - type: RequestHeaderModifier
        requestHeaderModifier: {set: [{name: x-grpc-backend, value: v2}]}
  - backendRefs: [{name: echo-v1, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: loses-to-grpc, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - backendRefs: [{name: echo-local, port: 80}]
---
"#;

#[test]
fn grpc_routes_streams_both_ways_with_trailers_and_a_1_gib_upload() {
    let _g = serial();
    let (mut c, client) = l7_cluster(GRPC_ROUTES);
    let addr = sa(vip(20), 80);
    // A bidirectional stream: each chunk is echoed before the next is sent, so the
    // test stalls (and times out) if anything on the way waits for more.
    let out = json(
        &c.run_in(
            &client,
            &[
                "echo-stream",
                "--addr",
                &addr,
                "--host",
                "echo",
                "--count",
                "50",
            ],
            SECS,
        )
        .unwrap(),
    );
    assert_eq!(out["status"], 200, "{out}");
    assert_eq!(out["pod"], "v2", "{out}");
    assert_eq!(out["echoed"], 50, "{out}");
    assert_eq!(out["trailers"]["grpc-status"], "0", "{out}");
    assert_eq!(out["trailers"]["x-echo-trailer"], "done", "{out}");
    // GRPCRoute service and header matches; the HTTPRoute on the same port lost the
    // conflict (GEP-1294), so nothing goes to its backend by default.
    let unary = |c: &mut Cluster, metadata: &[&str]| {
        let out = grpc_call(c, &client, "get", 1, 1, metadata);
        assert_eq!(out["codes"]["0"], 1, "{out}");
        only_pod(&out)
    };
    assert_eq!(unary(&mut c, &["x-tenant: local"]), "local");
    assert_eq!(unary(&mut c, &[]), "v1");
    // A real gRPC bidirectional stream (tonic): each message answered before the
    // next is sent, and the stream's end (its trailers) says OK.
    let out = grpc_call(&mut c, &client, "stream", 50, 1, &[]);
    assert_eq!(out["echoed"], 50, "{out}");
    assert_eq!(out["pod"], "v2", "{out}");
    assert_eq!(out["end"], "ok", "{out}");
    // GRPCRoute weights and header modifiers, rule-wide and per backend.
    let out = grpc_call(&mut c, &client, "weighted", 500, 8, &[]);
    assert_eq!(out["codes"]["0"], 500, "{out}");
    let pods: HashMap<String, u64> = serde_json::from_value(out["pods"].clone()).unwrap();
    let v1 = pods.get("v1").copied().unwrap_or(0);
    assert!((300..=400).contains(&v1), "70% within ±10%: {out}");
    assert_eq!(pods.get("local"), None, "weight 0 got requests: {out}");
    let last = &out["last"];
    assert_eq!(last["metadata"]["x-grpc-filter"], "set", "{out}");
    assert_eq!(
        last["response_metadata"]["x-grpc-response"], "added",
        "{out}"
    );
    assert_eq!(
        last["metadata"].get("x-grpc-backend").is_some(),
        last["pod"] == "v2",
        "the per-backend filter applies to v2 only: {out}"
    );
    // 1 GiB streamed over HTTP/1.1 across nodes (as HTTP/2 between the agents), and
    // 256 MiB over HTTP/2, with matching checksums.
    for (mib, h2) in [("1024", false), ("256", true)] {
        let mut args = vec![
            "echo-upload",
            "--addr",
            &addr,
            "--host",
            "echo",
            "--mib",
            mib,
        ];
        if h2 {
            args.push("--h2");
        }
        let started = std::time::Instant::now();
        let out = json(&c.run_in(&client, &args, Duration::from_secs(300)).unwrap());
        eprintln!("{mib} MiB (h2={h2}) in {:?}", started.elapsed());
        assert_eq!(out["status"], 200, "{out}");
        assert_eq!(out["pod"], "v1", "{out}");
        assert_eq!(out["server_len"], out["sent_len"], "{out}");
        assert_eq!(out["server_sha"], out["sent_sha"], "{out}");
    }
}

#[test]
fn one_connection_is_spread_per_request_and_a_slow_endpoint_gets_far_fewer() {
    let _g = serial();
    let routes = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: all, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /one}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - backendRefs: [{name: echo-trio, port: 80}]
---
"#;
    let (mut c, client) = l7_cluster(routes);
    let applied = c.agent_log("node-1").matches("config applied").count();
    // Three endpoints on the other node (no same-node preference applies), and one
    // Service whose same-node endpoint refuses connections.
    let trio = http_service(
        "echo-trio",
        vip(27),
        &[c.pod_ip("v1"), c.pod_ip("v2"), c.pod_ip("v3")],
    ) + &service_to(
        "echo-near-down",
        vip(28),
        &[c.pod_ip("local"), c.pod_ip("v1")],
        8082,
    ) + r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: near-down, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo-near-down, port: 80}]
  rules:
  - backendRefs: [{name: echo-near-down, port: 80}]
---
"#;
    let v1 = c.pod("v1");
    c.start_echo_server(&v1, 8082).unwrap();
    c.write_config("trio.yaml", &trio).unwrap();
    poll("the trio Service", SECS, || {
        c.agent_log("node-1").matches("config applied").count() > applied
    });
    // 1,000 gRPC calls (tonic) on one HTTP/2 connection, 16 at a time: all three
    // endpoints take a share.
    let out = grpc_call(&mut c, &client, "get", 1000, 16, &["x-echo-slow-pod: none"]);
    assert_eq!(out["codes"]["0"], 1000, "{out}");
    let pods: HashMap<String, u64> = serde_json::from_value(out["pods"].clone()).unwrap();
    for p in ["v1", "v2", "v3"] {
        assert!(pods.get(p).copied().unwrap_or(0) >= 50, "{p}: {out}");
    }
    // v2 answers in 100 ms, the others at once: it gets far fewer.
    let out = grpc_call(&mut c, &client, "get", 600, 8, &["x-echo-slow-pod: v2"]);
    assert_eq!(out["codes"]["0"], 600, "{out}");
    let pods: HashMap<String, u64> = serde_json::from_value(out["pods"].clone()).unwrap();
    let v2 = pods.get("v2").copied().unwrap_or(0);
    let others = pods
        .get("v3")
        .copied()
        .unwrap_or(0)
        .min(pods.get("v1").copied().unwrap_or(0));
    assert!(v2 * 3 < others, "the slow endpoint was not avoided: {out}");
    // A same-node endpoint that refuses connections: after its first failure the
    // other node's endpoint takes the requests.
    let out = get(
        &mut c,
        &client,
        Get {
            addr: Some(sa(vip(28), 80)),
            host: Some("near"),
            count: 20,
            ..Get::default()
        },
    );
    let pods: HashMap<String, u64> = serde_json::from_value(out["pods"].clone()).unwrap();
    assert!(pods.get("v1").copied().unwrap_or(0) >= 18, "{out}");
    assert!(out["statuses"]["502"].as_u64().unwrap_or(0) <= 2, "{out}");
    // HTTP/1.1 across nodes travels as HTTP/2 requests on the pooled tunnel: 1,000
    // sequential requests on one client connection open no tunnel connection.
    get(
        &mut c,
        &client,
        Get {
            path: "/one",
            ..Get::default()
        },
    );
    let tunnels = |c: &Cluster| {
        metric(
            &c.metrics("node-1").unwrap(),
            "mesh_tunnel_connections",
            &[],
        )
    };
    let before = tunnels(&c);
    assert!(before >= 1, "{}", c.metrics("node-1").unwrap());
    let out = get(
        &mut c,
        &client,
        Get {
            path: "/one",
            count: 1000,
            ..Get::default()
        },
    );
    assert_eq!(out["statuses"]["200"], 1000, "{out}");
    assert_eq!(out["last"]["proto"], "HTTP/1.1", "{out}");
    assert_eq!(tunnels(&c), before);
    // The destination agent took them as requests (only HTTP/2 requests on the
    // tunnel reach its request metrics).
    let text = c.metrics("node-2").unwrap();
    assert!(
        metric(
            &text,
            "istio_requests_total",
            &[
                ("reporter", "destination"),
                ("destination_service_name", "echo-v1")
            ]
        ) >= 1001,
        "{text}"
    );
}

const MIRRORED: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mirrored, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /mirror}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: echo-v2, port: 80}}
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /half}}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: echo-local, port: 80}, fraction: {numerator: 1, denominator: 2}}
    backendRefs: [{name: echo-v1, port: 80}]
---
"#;

#[test]
fn mirrors_get_a_copy_of_their_share_and_their_answers_are_ignored() {
    let _g = serial();
    let (mut c, client) = l7_cluster(MIRRORED);
    let out = get(
        &mut c,
        &client,
        Get {
            path: "/mirror",
            count: 200,
            ..Get::default()
        },
    );
    assert_eq!(out["statuses"]["200"], 200, "{out}");
    assert_eq!(only_pod(&out), "v1", "{out}");
    // With a body: the copy carries it too.
    let out = get(
        &mut c,
        &client,
        Get {
            path: "/mirror/body",
            method: "POST",
            body_bytes: 1024,
            count: 20,
            ..Get::default()
        },
    );
    assert_eq!(out["statuses"]["200"], 20, "{out}");
    let at = |c: &Cluster, node: &str, family: &str, pod: &str| {
        metric(
            &c.metrics(node).unwrap(),
            family,
            &[("reporter", "destination"), ("destination_workload", pod)],
        )
    };
    poll("every copy to reach v2", SECS, || {
        at(&c, "node-2", "istio_requests_total", "v2") == 220
    });
    assert_eq!(at(&c, "node-2", "istio_request_bytes_sum", "v2"), 20 * 1024);
    // Half of 400 requests, within a tolerance.
    let out = get(
        &mut c,
        &client,
        Get {
            path: "/half",
            count: 400,
            ..Get::default()
        },
    );
    assert_eq!(out["statuses"]["200"], 400, "{out}");
    assert_eq!(only_pod(&out), "v1", "{out}");
    std::thread::sleep(Duration::from_millis(500));
    let copies = at(&c, "node-1", "istio_requests_total", "local");
    assert!(
        (140..=260).contains(&copies),
        "{copies} of 400 mirrored, wanted about 200"
    );
}

#[test]
fn cors_preflights_are_answered_by_the_route_and_only_allowed_origins_get_headers() {
    let _g = serial();
    let routes = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: cors, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - filters:
    - type: CORS
      cors:
        allowOrigins: ["https://app.example", "https://*.shop.example"]
        allowMethods: [GET, POST]
        allowHeaders: [x-token]
        exposeHeaders: [x-echo-pod]
        allowCredentials: true
        maxAge: 60
    backendRefs: [{name: echo-v1, port: 80}]
---
"#;
    let (mut c, client) = l7_cluster(routes);
    let preflight = |c: &mut Cluster, origin: &str| {
        let o = format!("origin: {origin}");
        let h = [o.as_str(), "access-control-request-method: POST"];
        get(
            c,
            &client,
            Get {
                method: "OPTIONS",
                headers: &h,
                ..Get::default()
            },
        )
    };
    let out = preflight(&mut c, "https://app.example");
    assert_eq!(out["statuses"]["200"], 1, "{out}");
    let h = &out["last_headers"];
    assert_eq!(
        h["access-control-allow-origin"], "https://app.example",
        "{out}"
    );
    assert_eq!(h["access-control-allow-methods"], "GET, POST", "{out}");
    assert_eq!(h["access-control-allow-headers"], "x-token", "{out}");
    assert_eq!(h["access-control-max-age"], "60", "{out}");
    assert_eq!(h["access-control-allow-credentials"], "true", "{out}");
    assert!(
        h.get("x-echo-pod").is_none(),
        "the backend answered a preflight: {out}"
    );
    let out = preflight(&mut c, "https://evil.example");
    assert!(
        out["last_headers"]
            .get("access-control-allow-origin")
            .is_none(),
        "{out}"
    );
    // The actual request goes to the backend and its answer carries the headers.
    let out = get(
        &mut c,
        &client,
        Get {
            headers: &["origin: https://a.shop.example"],
            ..Get::default()
        },
    );
    assert_eq!(only_pod(&out), "v1", "{out}");
    assert_eq!(
        out["last_headers"]["access-control-allow-origin"], "https://a.shop.example",
        "{out}"
    );
    assert_eq!(
        out["last_headers"]["access-control-expose-headers"], "x-echo-pod",
        "{out}"
    );
}

#[test]
fn consumer_routes_apply_to_their_namespace_and_expect_100_continue_passes() {
    let _g = serial();
    let producer = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: producer, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - backendRefs: [{name: echo-v1, port: 80}]
---
"#;
    let (mut c, client) = l7_cluster(producer);
    // A client in another namespace, with a consumer route of its own namespace.
    let shopper = c.add_pod("node-1", "shopper").unwrap();
    let applied = c.agent_log("node-1").matches("config applied").count();
    let cfg = c
        .pod_yaml(&shopper, true)
        .replace("namespace: default", "namespace: shop")
        + r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, namespace: default, port: 80}]
  rules:
  - backendRefs: [{name: echo-v2, namespace: default, port: 80}]
---
"#;
    c.write_config("shop.yaml", &cfg).unwrap();
    poll("the shop namespace", SECS, || {
        c.agent_log("node-1").matches("config applied").count() > applied
    });
    let out = get(
        &mut c,
        &client,
        Get {
            count: 20,
            ..Get::default()
        },
    );
    assert_eq!(only_pod(&out), "v1", "the producer route: {out}");
    // The new pod's certificate comes a moment after it is enrolled: until then its
    // agent answers 502 (no plaintext fallback). Wait for it.
    poll("the shop pod's certificate", SECS, || {
        get(&mut c, &shopper, Get::default())["statuses"]["200"] == 1
    });
    let out = get(
        &mut c,
        &shopper,
        Get {
            count: 20,
            ..Get::default()
        },
    );
    assert_eq!(only_pod(&out), "v2", "the consumer route: {out}");
    // `Expect: 100-continue` from a real curl: the agent answers 100 when it starts
    // reading the body, so curl does not sit out its wait (set to 10 s here).
    let body = c.work_dir.join("body.bin");
    std::fs::write(&body, vec![b'x'; 2 << 20]).unwrap();
    let started = std::time::Instant::now();
    let mut curl = c
        .command_in_pod(&client, std::path::Path::new("/usr/bin/curl"))
        .unwrap();
    curl.args([
        "-s",
        "--expect100-timeout",
        "10",
        "-H",
        "Expect: 100-continue",
    ])
    .args(["-H", "Host: echo", "--data-binary"])
    .arg(format!("@{}", body.display()))
    .arg(format!("http://{}/upload", vip(20)));
    let out = curl.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let answer = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(answer["body_len"], 2 << 20, "{answer}");
    assert_eq!(answer["headers"]["expect"], "100-continue", "{answer}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "curl waited for a 100 Continue: {:?}",
        started.elapsed()
    );
}
