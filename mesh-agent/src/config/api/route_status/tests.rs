use serde_json::json;

use super::*;
use crate::config::{Kind, enrollment, translate};

const ROUTE: &str = r#"{
  "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
  "metadata": {"name": "web", "namespace": "shop", "generation": 3, "resourceVersion": "41"},
  "spec": {
    "parentRefs": [
      {"group": "", "kind": "Service", "name": "web", "port": 80},
      {"name": "edge", "namespace": "gw"}
    ],
    "rules": [{"backendRefs": [{"name": "web-v2", "port": 80}]}]
  },
  "status": {"parents": [
    {"parentRef": {"name": "edge", "namespace": "gw"}, "controllerName": "example.net/gateway",
     "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
       "observedGeneration": 3, "lastTransitionTime": "2026-01-01T00:00:00Z"}]}
  ]}
}"#;

fn service(name: &str, port: u16) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": port}]}})
}

fn config(services: &[(&str, u16)]) -> Config {
    let mut c = Config::default();
    for (n, p) in services {
        c.push(translate(Kind::Service, service(n, *p)).unwrap());
    }
    c.resolve_enrollment(enrollment::Default::NotEnrolled);
    c
}

fn parse(doc: &str) -> (RouteMeta, Route) {
    let object: DynamicObject = serde_json::from_str(doc).unwrap();
    let meta = RouteMeta::of(&object);
    let value: Value = serde_json::from_str(doc).unwrap();
    let route = match translate(Kind::HttpRoute, value).unwrap() {
        crate::config::Object::Route(r) => (*r).clone(),
        o => panic!("{o:?}"),
    };
    (meta, route)
}

fn id() -> NamespacedName {
    NamespacedName {
        namespace: "shop".into(),
        name: "web".into(),
    }
}

fn at(s: &str) -> Timestamp {
    s.parse().unwrap()
}

fn condition<'a>(parents: &'a [Value], kind: &str) -> &'a Value {
    let ours = parents
        .iter()
        .find(|p| p["controllerName"] == CONTROLLER_NAME)
        .expect("an entry of ours");
    ours["conditions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["type"] == kind)
        .unwrap()
}

fn status_reason(c: &Value) -> (Option<&str>, Option<&str>) {
    (c["status"].as_str(), c["reason"].as_str())
}

#[test]
fn an_attached_route_is_accepted_with_its_refs_resolved_and_the_gateways_entry_kept() {
    let (meta, route) = parse(ROUTE);
    let c = config(&[("web", 80), ("web-v2", 80)]);
    let verdict = Verdict::Accepted(&route);
    let parents = update(&id(), &meta, verdict, &c, &[], at("2026-12-06T10:00:00Z")).unwrap();
    assert_eq!(parents.len(), 2, "{parents:#?}");
    assert_eq!(
        parents[0]["controllerName"], "example.net/gateway",
        "another controller's entry is kept"
    );
    assert_eq!(
        parents[1]["parentRef"],
        json!({"group": "", "kind": "Service", "name": "web", "port": 80})
    );
    let accepted = condition(&parents, "Accepted");
    assert_eq!(status_reason(accepted), (Some("True"), Some("Accepted")));
    assert_eq!(accepted["observedGeneration"], 3);
    assert_eq!(accepted["lastTransitionTime"], "2026-12-06T10:00:00Z");
    let refs = condition(&parents, "ResolvedRefs");
    assert_eq!(status_reason(refs), (Some("True"), Some("ResolvedRefs")));

    // Written back, the same inputs need no write, even an hour later.
    let mut written = meta.clone();
    written.status_parents = parents.clone();
    assert_eq!(
        update(
            &id(),
            &written,
            verdict,
            &c,
            &[],
            at("2026-12-06T11:00:00Z")
        ),
        None
    );

    // A missing backend: ResolvedRefs turns False (a new transition time); Accepted
    // keeps its time.
    let c = config(&[("web", 80)]);
    let parents = update(
        &id(),
        &written,
        verdict,
        &c,
        &[],
        at("2026-12-06T12:00:00Z"),
    )
    .unwrap();
    let refs = condition(&parents, "ResolvedRefs");
    assert_eq!(
        status_reason(refs),
        (Some("False"), Some("BackendNotFound"))
    );
    assert!(
        refs["message"].as_str().unwrap().contains("shop/web-v2"),
        "{refs}"
    );
    assert_eq!(refs["lastTransitionTime"], "2026-12-06T12:00:00Z");
    assert_eq!(
        condition(&parents, "Accepted")["lastTransitionTime"],
        "2026-12-06T10:00:00Z"
    );
    // A new generation is a change even when nothing else is.
    let mut newer = written.clone();
    newer.generation = 4;
    let c = config(&[("web", 80), ("web-v2", 80)]);
    let parents = update(&id(), &newer, verdict, &c, &[], at("2026-12-06T13:00:00Z")).unwrap();
    assert_eq!(condition(&parents, "Accepted")["observedGeneration"], 4);
}

#[test]
fn a_parent_that_could_not_attach_gets_the_problems_reason() {
    let (meta, route) = parse(ROUTE);
    let c = config(&[("web-v2", 80)]);
    let problems = [RouteProblem {
        route: id(),
        kind: crate::config::RouteKind::Http,
        service: id(),
        reason: "NoMatchingParent",
        message: "Service shop/web does not exist".into(),
    }];
    let verdict = Verdict::Accepted(&route);
    let now = Timestamp::now();
    let parents = update(&id(), &meta, verdict, &c, &problems, now).unwrap();
    let accepted = condition(&parents, "Accepted");
    assert_eq!(
        status_reason(accepted),
        (Some("False"), Some("NoMatchingParent"))
    );
    // A problem with another parent Service is not this parent's.
    let other = [RouteProblem {
        service: NamespacedName {
            namespace: "shop".into(),
            name: "api".into(),
        },
        ..problems[0].clone()
    }];
    let parents = update(&id(), &meta, verdict, &c, &other, now).unwrap();
    assert_eq!(condition(&parents, "Accepted")["status"], "True");
}

#[test]
fn a_refused_route_says_which_field_and_whether_an_older_generation_serves() {
    let (meta, _) = parse(ROUTE);
    let c = config(&[]);
    let error = FieldError::new("spec.rules[0].matches[0].path.value", "is not a path");
    let verdict = Verdict::Rejected {
        error: &error,
        previous_serves: true,
    };
    let parents = update(&id(), &meta, verdict, &c, &[], Timestamp::now()).unwrap();
    let accepted = condition(&parents, "Accepted");
    assert_eq!(
        status_reason(accepted),
        (Some("False"), Some("UnsupportedValue"))
    );
    let message = accepted["message"].as_str().unwrap();
    assert!(
        message.contains("spec.rules[0].matches[0].path.value: is not a path"),
        "{message}"
    );
    assert!(
        message.contains("last accepted generation keeps serving"),
        "{message}"
    );
    assert_eq!(condition(&parents, "ResolvedRefs")["status"], "Unknown");
    // A backendRef of a kind the mesh cannot resolve.
    let error = FieldError::new(
        "spec.rules[0].backendRefs[0].kind",
        "only Service backends are supported",
    );
    let verdict = Verdict::Rejected {
        error: &error,
        previous_serves: false,
    };
    let parents = update(&id(), &meta, verdict, &c, &[], Timestamp::now()).unwrap();
    let refs = condition(&parents, "ResolvedRefs");
    assert_eq!(status_reason(refs), (Some("False"), Some("InvalidKind")));
}

#[test]
fn a_route_of_a_gateway_only_is_inert_and_gets_no_entry_of_ours() {
    // Only the Gateway parent, and a filter the mesh does not serve.
    let doc = ROUTE
        .replace(
            r#"{"group": "", "kind": "Service", "name": "web", "port": 80},"#,
            "",
        )
        .replace(
            r#""rules": [{"#,
            r#""rules": [{"filters": [{"type": "ExtensionRef", "extensionRef": {"group": "x", "kind": "Y", "name": "z"}}], "#,
        );
    let (meta, route) = parse(&doc);
    assert_eq!(meta.parent_refs.len(), 1);
    assert!(
        route.parents.is_empty() && route.rules.is_empty(),
        "{route:?}"
    );
    let verdict = Verdict::Accepted(&route);
    assert_eq!(
        update(&id(), &meta, verdict, &config(&[]), &[], Timestamp::now()),
        None
    );
}
