//! The routing decision for one request, as a pure function: which rule, and then a
//! redirect, a 404, or a backend with the rewritten path and authority. Weighted
//! backend choice takes its random number as an argument, so tests choose it.
use std::sync::Arc;

use super::filters::{RedirectFrom, location, rewrite};
use crate::{
    config::Filter,
    state::{CompiledRule, PortRoutes, RequestView},
};

#[derive(Debug)]
pub enum Decision {
    /// No rule matches: 404 (gRPC UNIMPLEMENTED).
    NotFound,
    /// A RequestRedirect filter: answered by the agent.
    Redirect {
        rule: Arc<CompiledRule>,
        status: u16,
        location: String,
    },
    /// Every backend weight is 0, or there are none: 500 (gRPC UNAVAILABLE).
    NoBackend {
        rule: Arc<CompiledRule>,
    },
    Forward(Forward),
}

#[derive(Debug)]
pub struct Forward {
    pub rule: Arc<CompiledRule>,
    pub backend: usize,
    /// The authority and path-and-query to send (after URLRewrite).
    pub authority: String,
    pub path_and_query: String,
}

/// What the decision needs of the request.
pub struct Incoming<'a> {
    pub view: RequestView<'a>,
    pub authority: &'a str,
    /// The Service port the client dialled (for redirects that keep the port).
    pub port: u16,
}

pub fn decide(routes: &PortRoutes, req: &Incoming<'_>, roll: u64) -> Decision {
    let Some(selected) = routes.select(&req.view) else {
        return Decision::NotFound;
    };
    let rule = selected.rule.clone();
    let mut authority = req.authority.to_owned();
    let mut path = req.view.path.to_owned();
    for f in &rule.filters {
        match f {
            Filter::Redirect(r) => {
                let (host, _) = split_authority(req.authority);
                let location = location(
                    r,
                    &RedirectFrom {
                        scheme: "http",
                        host,
                        port: req.port,
                        path: req.view.path,
                        query: req.view.query,
                    },
                    selected.prefix,
                );
                return Decision::Redirect {
                    status: r.status,
                    location,
                    rule,
                };
            }
            Filter::Rewrite(r) => {
                (authority, path) = rewrite(r, &authority, &path, selected.prefix);
            }
            Filter::RequestHeaders(_)
            | Filter::ResponseHeaders(_)
            | Filter::Mirror(_)
            | Filter::Cors(_) => {}
        }
    }
    let Some(backend) = weighted(&rule, roll) else {
        return Decision::NoBackend { rule };
    };
    let path_and_query = match req.view.query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    Decision::Forward(Forward {
        rule,
        backend,
        authority,
        path_and_query,
    })
}

/// The backend for `roll` by weight; weight 0 gets nothing.
fn weighted(rule: &CompiledRule, roll: u64) -> Option<usize> {
    let total: u64 = rule.backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut at = roll % total;
    for (i, b) in rule.backends.iter().enumerate() {
        let w = u64::from(b.weight);
        if at < w {
            return Some(i);
        }
        at -= w;
    }
    None
}

/// `host[:port]` -> (host, port); IPv6 literals keep their brackets off.
pub fn split_authority(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[') {
        if let Some((host, tail)) = rest.split_once(']') {
            let port = tail.strip_prefix(':').and_then(|p| p.parse().ok());
            return (host, port);
        }
        return (authority, None);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use http::HeaderMap;

    use super::*;
    use crate::{
        config::{Config, load_text},
        state::{DEFAULT_SERVER_FIRST_PORTS, HttpRoutes},
    };

    const YAML: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: app}
spec: {clusterIP: 10.96.0.20, ports: [{name: http, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: a, namespace: app}
spec: {clusterIP: 10.96.0.21, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: app}
spec: {clusterIP: 10.96.0.22, ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 8080}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /redirect}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {hostname: example.org, statusCode: 301, path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}}
  - matches: [{path: {type: PathPrefix, value: /prefix}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: rewritten.example, path: {type: ReplacePrefixMatch, replacePrefixMatch: /}}
    backendRefs: [{name: a, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /split}}]
    backendRefs: [{name: a, port: 80, weight: 70}, {name: b, port: 80, weight: 30}, {name: echo, port: 8080, weight: 0}]
  - matches: [{path: {type: PathPrefix, value: /none}}]
    backendRefs: [{name: a, port: 80, weight: 0}]
"#;

    fn routes() -> Arc<PortRoutes> {
        let mut c = Config::default();
        load_text("r.yaml".as_ref(), YAML, &mut c, &mut HashMap::new()).unwrap();
        HttpRoutes::build(&c, DEFAULT_SERVER_FIRST_PORTS)
            .for_client("10.96.0.20:8080".parse().unwrap(), "app")
            .unwrap()
    }

    fn run(routes: &PortRoutes, uri: &str, roll: u64) -> Decision {
        let uri: http::Uri = uri.parse().unwrap();
        let h = HeaderMap::new();
        decide(
            routes,
            &Incoming {
                view: RequestView {
                    method: "GET",
                    path: uri.path(),
                    query: uri.query(),
                    headers: &h,
                },
                authority: "echo:8080",
                port: 8080,
            },
            roll,
        )
    }

    #[test]
    fn redirects_rewrites_weights_and_not_found() {
        let r = routes();
        match run(&r, "/redirect/page?x=1", 0) {
            Decision::Redirect {
                status, location, ..
            } => {
                assert_eq!(status, 301);
                assert_eq!(location, "http://example.org:8080/new/page?x=1");
            }
            other => panic!("{other:?}"),
        }
        match run(&r, "/prefix/one?q", 0) {
            Decision::Forward(f) => {
                assert_eq!(f.path_and_query, "/one?q");
                assert_eq!(f.authority, "rewritten.example");
            }
            other => panic!("{other:?}"),
        }
        let mut counts = [0usize; 3];
        for roll in 0..1000 {
            match run(&r, "/split", roll) {
                Decision::Forward(f) => counts[f.backend] += 1,
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(counts, [700, 300, 0]);
        assert!(matches!(run(&r, "/none", 5), Decision::NoBackend { .. }));
        assert!(matches!(run(&r, "/elsewhere", 5), Decision::NotFound));
    }

    #[test]
    fn authorities_split_into_host_and_port() {
        assert_eq!(split_authority("echo:8080"), ("echo", Some(8080)));
        assert_eq!(split_authority("echo"), ("echo", None));
        assert_eq!(split_authority("[fd00::1]:80"), ("fd00::1", Some(80)));
        assert_eq!(split_authority("fd00::1"), ("fd00::1", None));
    }
}
