use std::{collections::HashMap, path::Path};

use super::{load::load_text, *};

fn parse(text: &str) -> Result<Config, ConfigError> {
    let mut config = Config::default();
    load_text(
        Path::new("/cfg/app.yaml"),
        text,
        &mut config,
        &mut HashMap::new(),
    )?;
    Ok(config)
}

fn err(text: &str) -> String {
    match parse(text) {
        Ok(c) => panic!("expected an error, got {c:?}"),
        Err(e) => e.to_string(),
    }
}

const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.20
  ports:
  - {name: http, port: 80, targetPort: 8080}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: shop
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.244.1.5]
  nodeName: node-1
- addresses: [10.244.2.5]
  conditions: {ready: false}
---
apiVersion: v1
kind: Pod
metadata:
  name: client
  namespace: shop
  annotations: {mesh.dev/netns: /var/run/netns/client}
spec:
  nodeName: node-1
  serviceAccountName: shopper
  containers: [{name: c, image: busybox}]
status: {podIP: 10.244.1.9}
---
"#;

#[test]
fn parses_services_slices_and_pods() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.services.len(), 1);
    let svc = &c.services[0];
    assert_eq!(svc.id.to_string(), "shop/web");
    assert_eq!(
        svc.cluster_ips,
        vec!["10.96.0.20".parse::<std::net::IpAddr>().unwrap()]
    );
    assert_eq!(svc.ports[0].target_port, TargetPort::Number(8080));
    let slice = &c.endpoint_slices[0];
    assert_eq!(slice.service_name, "web");
    assert!(
        slice.endpoints[0].ready,
        "absent ready condition means ready"
    );
    assert!(!slice.endpoints[1].ready);
    let pod = &c.pods[0];
    assert_eq!(pod.node_name.as_deref(), Some("node-1"));
    assert_eq!(pod.service_account, "shopper");
    assert_eq!(
        pod.netns.as_deref(),
        Some(Path::new("/var/run/netns/client"))
    );
    assert!(pod.enroll);
}

#[test]
fn malformed_yaml_names_the_file_and_position() {
    let e = err("apiVersion: v1\nkind: Service\nmetadata: {name: web\n");
    assert!(
        e.starts_with("/cfg/app.yaml: document 1: malformed YAML"),
        "{e}"
    );
    assert!(e.contains("line"), "{e}");
}

#[test]
fn unknown_kind_names_the_object_and_field() {
    let e = err("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: settings}\n");
    assert!(
        e.starts_with("/cfg/app.yaml: ConfigMap default/settings: field `kind`"),
        "{e}"
    );
    assert!(e.contains("not supported"), "{e}");
}

#[test]
fn invalid_service_port_names_the_field() {
    let e = err(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  clusterIP: 10.96.0.1\n  ports: [{port: 70000}]\n",
    );
    assert_eq!(
        e,
        "/cfg/app.yaml: Service default/web: field `spec.ports[0].port`: 70000 is not a port number (1-65535)"
    );
}

#[test]
fn wrongly_typed_field_reports_its_path() {
    let e = err(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: eighty}]\n",
    );
    assert!(
        e.starts_with("/cfg/app.yaml: Service default/web: field `spec.ports[0].port`"),
        "{e}"
    );
}

#[test]
fn bad_cluster_ip_and_missing_label_are_rejected() {
    let e = err(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {clusterIP: 10.96.0.999}\n",
    );
    assert!(e.contains("field `spec.clusterIP`"), "{e}");
    let e = err(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: s}\naddressType: IPv4\nendpoints: []\n",
    );
    assert!(
        e.contains("EndpointSlice default/s: field `metadata.labels[kubernetes.io/service-name]`"),
        "{e}"
    );
}

#[test]
fn duplicate_objects_are_rejected() {
    let doc = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {}\n";
    let e = err(&format!("{doc}---\n{doc}"));
    assert!(e.contains("Service default/web is defined twice"), "{e}");
}

#[test]
fn headless_services_have_no_cluster_ip() {
    let c = parse("apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {clusterIP: None, ports: [{port: 5432}]}\n").unwrap();
    assert!(c.services[0].cluster_ips.is_empty());
}

#[test]
fn load_dir_reads_only_yaml_files_in_order() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("b.yaml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: b}\nspec: {}\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("a.yml"),
        "apiVersion: v1\nkind: Service\nmetadata: {name: a}\nspec: {}\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not yaml: [").unwrap();
    std::fs::write(dir.path().join(".swap.yaml"), "not yaml: [").unwrap();
    let c = load_dir(dir.path()).unwrap();
    let names: Vec<_> = c.iter().map(|o| o.id().name).collect();
    assert_eq!(names, ["a", "b"]);
}

/// A few KB that a YAML library would expand to millions of nodes.
pub fn alias_bomb() -> String {
    let mut s =
        String::from("apiVersion: v1\nkind: Service\nmetadata: {name: bomb}\nspec:\n  a: &a [");
    s.push_str(&vec!["x"; 2000].join(","));
    s.push_str("]\n  b: [");
    s.push_str(&vec!["*a"; 3000].join(","));
    s.push_str("]\n");
    s
}

#[test]
fn anchors_and_aliases_are_refused_before_expansion() {
    let started = std::time::Instant::now();
    let e = err(&alias_bomb());
    assert!(
        e.contains("/cfg/app.yaml: line 5: YAML anchors are not accepted"),
        "{e}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
    let e = err("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec: *missing\n");
    assert!(e.contains("aliases") || e.contains("malformed"), "{e}");
}

#[test]
fn oversized_files_are_refused_unparsed() {
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.yaml");
    let f = std::fs::File::create(&big).unwrap();
    f.set_len(super::load::MAX_FILE_BYTES + 1).unwrap();
    let e = load_dir(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("big.yaml") && e.contains("over the limit"),
        "{e}"
    );
}

#[test]
fn the_alias_bomb_is_refused_from_a_directory_too() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bomb.yaml"), alias_bomb()).unwrap();
    let started = std::time::Instant::now();
    let e = load_dir(dir.path()).unwrap_err().to_string();
    assert!(e.contains("bomb.yaml: line 5: YAML anchors"), "{e}");
    assert!(started.elapsed() < std::time::Duration::from_secs(1));
}

#[test]
fn namespaces_are_cluster_scoped_and_their_labels_enroll_pods() {
    let e = err(
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {mesh.dev/dataplane-mode: yes}}\n",
    );
    assert!(
        e.starts_with(
            "/cfg/app.yaml: Namespace shop: field `metadata.labels[mesh.dev/dataplane-mode]`"
        ),
        "{e}"
    );
    let pod = |name: &str, labels: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{{labels}}}}}\nspec: {{}}\n---\n"
        )
    };
    let c = parse(&format!(
        "apiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: {{istio.io/dataplane-mode: none}}}}\n---\n{}{}",
        pod("out", ""),
        pod("in", "mesh.dev/dataplane-mode: enabled"),
    ))
    .unwrap();
    let enrolled: Vec<(&str, bool)> = c
        .pods
        .iter()
        .map(|p| (p.id.name.as_str(), p.enroll))
        .collect();
    assert_eq!(enrolled, [("out", false), ("in", true)]);
}

#[test]
fn fail_open_is_read_from_services_and_namespaces_and_anything_else_is_refused() {
    let open = GOOD.replace(
        "metadata: {name: web, namespace: shop}",
        "metadata: {name: web, namespace: shop, annotations: {mesh.dev/fail-open: \"true\"}}",
    );
    let c = parse(&open).unwrap();
    assert_eq!(c.services[0].fail_open, Some(true));
    assert_eq!(parse(GOOD).unwrap().services[0].fail_open, None);
    let ns = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, annotations: {mesh.dev/fail-open: \"false\"}}\n";
    assert_eq!(parse(ns).unwrap().namespaces[0].fail_open, Some(false));
    let e = err(&open.replace("\"true\"", "\"yes\""));
    assert!(
        e.contains("/cfg/app.yaml")
            && e.contains("Service shop/web")
            && e.contains("metadata.annotations[mesh.dev/fail-open]")
            && e.contains("\"yes\""),
        "{e}"
    );
}
