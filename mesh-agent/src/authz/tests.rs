use std::{collections::HashMap, net::IpAddr, path::Path};

use super::*;
use crate::config::{Config, load_text};

fn policy(yaml: &str) -> Arc<PolicySet> {
    let mut config = Config::default();
    load_text(
        Path::new("/cfg/policy.yaml"),
        yaml,
        &mut config,
        &mut HashMap::new(),
    )
    .unwrap();
    PolicySet::build(&config, "istio-system")
}

fn web() -> Workload {
    Workload {
        id: NamespacedName {
            namespace: "shop".into(),
            name: "web-1".into(),
        },
        labels: [("app".to_owned(), "web".to_owned())].into(),
    }
}

fn conn(principal: Option<&str>, ip: &str, port: u16) -> ConnAttrs {
    ConnAttrs {
        principal: principal.map(str::to_owned),
        namespace: principal
            .and_then(|p| p.split('/').nth(2))
            .map(str::to_owned),
        source_ip: ip.parse::<IpAddr>().unwrap(),
        dest_port: port,
    }
}

const CLIENT: &str = "cluster.local/ns/shop/sa/client";
const OTHER: &str = "cluster.local/ns/other/sa/bot";

#[test]
fn no_policy_allows_and_an_allow_policy_restricts() {
    assert!(
        policy("")
            .evaluate(&web(), &conn(None, "10.0.0.1", 80))
            .decision
            .allowed()
    );
    let p = policy(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/client"]}}]
    to: [{operation: {ports: ["8080"]}}]
"#,
    );
    assert!(
        p.evaluate(&web(), &conn(Some(CLIENT), "10.0.0.1", 8080))
            .decision
            .allowed()
    );
    assert_eq!(
        p.evaluate(&web(), &conn(Some(CLIENT), "10.0.0.1", 9090))
            .decision,
        Decision::NotAllowed
    );
    assert_eq!(
        p.evaluate(&web(), &conn(Some(OTHER), "10.0.0.1", 8080))
            .decision,
        Decision::NotAllowed
    );
    // Plaintext has no principal.
    assert_eq!(
        p.evaluate(&web(), &conn(None, "10.0.0.1", 8080)).decision,
        Decision::NotAllowed
    );
    // The selector does not pick other workloads: no ALLOW applies to them.
    let mut api = web();
    api.labels = [("app".to_owned(), "api".to_owned())].into();
    assert!(
        p.evaluate(&api, &conn(Some(OTHER), "10.0.0.1", 9090))
            .decision
            .allowed()
    );
}

#[test]
fn deny_wins_over_allow_and_not_forms_work() {
    let p = policy(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: shop}
spec:
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-outsiders, namespace: istio-system}
spec:
  action: DENY
  rules:
  - from: [{source: {notNamespaces: ["shop"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-plaintext-from-net, namespace: shop}
spec:
  action: DENY
  rules:
  - from: [{source: {notPrincipals: ["*"], notIpBlocks: ["10.244.0.0/16"]}}]
"#,
    );
    let deny_outsiders = NamespacedName {
        namespace: "istio-system".into(),
        name: "deny-outsiders".into(),
    };
    assert_eq!(
        p.evaluate(&web(), &conn(Some(OTHER), "10.244.1.5", 80))
            .decision,
        Decision::Denied(deny_outsiders.clone())
    );
    assert!(
        p.evaluate(&web(), &conn(Some(CLIENT), "10.244.1.5", 80))
            .decision
            .allowed()
    );
    // Plaintext has no namespace, so `notNamespaces` matches it too.
    assert_eq!(
        p.evaluate(&web(), &conn(None, "10.244.1.5", 80)).decision,
        Decision::Denied(deny_outsiders)
    );
}

#[test]
fn ip_blocks_and_wildcards() {
    let p = policy(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: lan, namespace: shop}
spec:
  rules:
  - from: [{source: {ipBlocks: ["192.168.0.0/16", "10.1.2.3"]}}]
  - from: [{source: {principals: ["*/sa/client"]}}]
"#,
    );
    assert!(
        p.evaluate(&web(), &conn(None, "192.168.4.4", 1))
            .decision
            .allowed()
    );
    assert!(
        p.evaluate(&web(), &conn(None, "10.1.2.3", 1))
            .decision
            .allowed()
    );
    assert!(
        !p.evaluate(&web(), &conn(None, "10.1.2.4", 1))
            .decision
            .allowed()
    );
    assert!(
        p.evaluate(&web(), &conn(Some(CLIENT), "10.9.9.9", 1))
            .decision
            .allowed()
    );
    assert!(
        !p.evaluate(&web(), &conn(Some(OTHER), "10.9.9.9", 1))
            .decision
            .allowed()
    );
}

#[test]
fn allow_without_rules_denies_everything_and_audit_only_records() {
    let p = policy(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: audit-all, namespace: shop}
spec:
  action: AUDIT
  rules: [{to: [{operation: {ports: ["8080"]}}]}]
"#,
    );
    let v = p.evaluate(&web(), &conn(Some(CLIENT), "10.0.0.1", 8080));
    assert!(v.decision.allowed());
    assert_eq!(v.audited.len(), 1);
    assert!(
        p.evaluate(&web(), &conn(Some(CLIENT), "10.0.0.1", 1))
            .audited
            .is_empty()
    );

    let p = policy(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: nothing, namespace: shop}\nspec: {}\n",
    );
    assert_eq!(
        p.evaluate(&web(), &conn(Some(CLIENT), "10.0.0.1", 8080))
            .decision,
        Decision::NotAllowed
    );
}

#[test]
fn mtls_mode_precedence() {
    let p = policy(
        r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: legacy, namespace: shop}
spec:
  selector: {matchLabels: {app: legacy}}
  mtls: {mode: PERMISSIVE}
"#,
    );
    assert_eq!(p.mtls_mode(&web()), MtlsMode::Strict);
    let mut legacy = web();
    legacy.labels = [("app".to_owned(), "legacy".to_owned())].into();
    assert_eq!(p.mtls_mode(&legacy), MtlsMode::Permissive);
    assert_eq!(policy("").mtls_mode(&web()), MtlsMode::Permissive);
}

#[test]
fn unsupported_fields_are_rejected_by_name() {
    for (yaml, field) in [
        (
            "spec:\n  rules:\n  - to: [{operation: {methods: [\"G*T\"]}}]\n",
            "methods[0]",
        ),
        (
            "spec:\n  rules:\n  - when: [{key: a, values: [b]}]\n",
            "when[0].key",
        ),
        ("spec:\n  action: CUSTOM\n", "spec.action"),
        (
            "spec:\n  rules:\n  - from: [{source: {ipBlocks: [\"10.0.0.0/33\"]}}]\n",
            "ipBlocks[0]",
        ),
        (
            "spec:\n  rules:\n  - to: [{operation: {ports: [\"http\"]}}]\n",
            "ports[0]",
        ),
    ] {
        let text = format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\n{yaml}"
        );
        let mut config = Config::default();
        let err = load_text(
            Path::new("/cfg/p.yaml"),
            &text,
            &mut config,
            &mut HashMap::new(),
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/cfg/p.yaml")
                && err.contains("AuthorizationPolicy shop/p")
                && err.contains(field),
            "{err}"
        );
    }
    let mut config = Config::default();
    let err = load_text(
        Path::new("/cfg/pa.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: p}\nspec:\n  portLevelMtls: {}\n",
        &mut config,
        &mut HashMap::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("portLevelMtls"), "{err}");
}

fn request<'a>(method: &'a str, path: &'a str, headers: &'a http::HeaderMap) -> RequestAttrs<'a> {
    RequestAttrs {
        method,
        path,
        host: "web.shop.svc.cluster.local:80",
        headers,
    }
}

const L7_DENY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin-writes, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {methods: ["POST"], paths: ["/admin/*"]}}]
"#;

#[test]
fn an_l7_deny_takes_the_request_it_names_and_no_other() {
    let p = policy(L7_DENY);
    let h = http::HeaderMap::new();
    let c = conn(Some(CLIENT), "10.0.0.1", 8080);
    let deny = |m, path| {
        p.evaluate_request(&web(), &c, Some(&request(m, path, &h)))
            .decision
    };
    assert!(matches!(deny("POST", "/admin/users"), Decision::Denied(_)));
    assert!(deny("GET", "/admin/users").allowed());
    assert!(deny("POST", "/shop").allowed());
    // On a connection that is not HTTP, the L7 parts of a DENY count as matching.
    assert!(matches!(
        p.evaluate(&web(), &c).decision,
        Decision::Denied(_)
    ));
}

/// The path a DENY names is denied however it is spelled for an application that
/// merges slashes, decodes `%2F` or drops `;` parameters, and an ALLOW grants a path
/// only if both readings are granted; a `%2F` that crosses no policy boundary passes.
#[test]
fn a_request_is_allowed_only_if_both_readings_of_its_path_are() {
    let h = http::HeaderMap::new();
    let c = conn(Some(CLIENT), "10.0.0.1", 8080);
    let deny = policy(L7_DENY);
    let check = |p: &PolicySet, m, path| p.check_request(&web(), &c, Some(&request(m, path, &h)));
    for path in [
        "//admin/users",
        "/admin%2Fusers",
        "/admin;v=1/users",
        "/x/..%2Fadmin/users",
    ] {
        assert!(
            matches!(check(&deny, "POST", path), Err(Decision::Denied(_))),
            "{path}"
        );
        // The first reading alone does not match the DENY: the second one decides.
        assert!(
            deny.evaluate_request(&web(), &c, Some(&request("POST", path, &h)))
                .decision
                .allowed(),
            "{path}"
        );
    }
    assert!(check(&deny, "POST", "/projects/group%2Fname").is_ok());
    assert!(check(&deny, "GET", "//admin/users").is_ok());
    let allow = policy(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: public-only, namespace: shop}
spec:
  action: ALLOW
  rules:
  - to: [{operation: {paths: ["/public/*"]}}]
"#,
    );
    assert!(check(&allow, "GET", "/public/page").is_ok());
    assert!(check(&allow, "GET", "/public/a%2Fb").is_ok());
    assert!(matches!(
        check(&allow, "GET", "/public/..%2Fadmin"),
        Err(Decision::NotAllowed)
    ));
}

/// A connection refused only for L7 fields it cannot show is one whose requests may
/// be checked one by one; one refused for who it is (or for an L4 field) is not.
#[test]
fn only_a_refusal_that_rests_on_l7_fields_is_decided_per_request() {
    let c = conn(Some(CLIENT), "10.0.0.1", 8080);
    let deny = policy(L7_DENY);
    assert!(deny.check(&web(), &c).is_err());
    assert!(deny.decided_per_request(&web(), &c));
    let allow_l7 = policy(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: reads-only, namespace: shop}
spec:
  action: ALLOW
  rules:
  - from: [{source: {namespaces: ["shop"]}}]
    to: [{operation: {methods: ["GET"]}}]
"#,
    );
    assert!(allow_l7.check(&web(), &c).is_err());
    assert!(allow_l7.decided_per_request(&web(), &c));
    // The same ALLOW, from a namespace it does not name: no request can pass.
    let other = ConnAttrs {
        namespace: Some("elsewhere".to_owned()),
        ..c.clone()
    };
    assert!(!allow_l7.decided_per_request(&web(), &other));
    let deny_l4 = policy(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-8080, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {ports: ["8080"]}}]
"#,
    );
    assert!(!deny_l4.decided_per_request(&web(), &c));
}

#[test]
fn an_l7_allow_grants_nothing_to_a_connection_that_is_not_http() {
    let p = policy(
        r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: grpc-get-only, namespace: shop}
spec:
  action: ALLOW
  rules:
  - from: [{source: {namespaces: ["shop"]}}]
    to: [{operation: {methods: ["POST"], paths: ["/echo.Echo/Get", "/health/{**}"], notHosts: ["evil*"]}}]
    when:
    - key: request.headers[x-tenant]
      values: ["blue", "green*"]
"#,
    );
    let c = conn(Some(CLIENT), "10.0.0.1", 8080);
    let mut h = http::HeaderMap::new();
    h.insert("x-tenant", http::HeaderValue::from_static("green-2"));
    let verdict = |m, path, h: &http::HeaderMap| {
        p.evaluate_request(&web(), &c, Some(&request(m, path, h)))
            .decision
    };
    assert!(verdict("POST", "/echo.Echo/Get", &h).allowed());
    assert!(verdict("POST", "/health/live/deep", &h).allowed());
    assert_eq!(verdict("POST", "/health", &h), Decision::NotAllowed);
    assert_eq!(
        verdict("POST", "/echo.Echo/Delete", &h),
        Decision::NotAllowed
    );
    assert_eq!(verdict("GET", "/echo.Echo/Get", &h), Decision::NotAllowed);
    assert_eq!(
        verdict("POST", "/echo.Echo/Get", &http::HeaderMap::new()),
        Decision::NotAllowed
    );
    assert_eq!(p.evaluate(&web(), &c).decision, Decision::NotAllowed);
}

#[test]
fn unsupported_l7_keys_and_bad_templates_are_refused_by_field() {
    let load = |yaml: &str| {
        let mut config = Config::default();
        load_text(
            Path::new("/cfg/policy.yaml"),
            yaml,
            &mut config,
            &mut HashMap::new(),
        )
        .map_err(|e| e.to_string())
    };
    let head = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  rules:\n";
    let e = load(&format!(
        "{head}  - when: [{{key: \"request.auth.claims[iss]\", values: [x]}}]\n"
    ))
    .unwrap_err();
    assert!(e.contains("spec.rules[0].when[0].key"), "{e}");
    let e = load(&format!(
        "{head}  - to: [{{operation: {{paths: [\"/a/{{**}}/b\"]}}}}]\n"
    ))
    .unwrap_err();
    assert!(e.contains("spec.rules[0].to[0].operation.paths[0]"), "{e}");
    let e = load(&format!(
        "{head}  - from: [{{source: {{requestPrincipals: [\"*\"]}}}}]\n"
    ))
    .unwrap_err();
    assert!(e.contains("requestPrincipals"), "{e}");
}
