//! The ports the kubelet probes in a pod's spec: plaintext from the node to them
//! passes to the application even under STRICT (`mesh_common::is_probe`), as the
//! pod's readiness depends on it.
//!
//! Every container's (init containers too: a restartable init container is a sidecar
//! with probes of its own) liveness, readiness and startup probe of kind `httpGet`,
//! `tcpSocket` or `grpc`. A named port resolves against the container's own `ports`,
//! as the kubelet resolves it; a name the container does not declare, or a probe
//! aimed at another `host`, never reaches the pod's IP, so it adds no port.
use k8s_openapi::{
    api::core::v1::{Container, PodSpec, Probe},
    apimachinery::pkg::util::intstr::IntOrString,
};

/// The probed ports of `spec`, sorted, each once.
pub fn probe_ports(spec: Option<&PodSpec>) -> Vec<u16> {
    let Some(spec) = spec else {
        return Vec::new();
    };
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    let mut ports: Vec<u16> = containers.flat_map(container_ports).collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

fn container_ports(c: &Container) -> impl Iterator<Item = u16> + '_ {
    [&c.liveness_probe, &c.readiness_probe, &c.startup_probe]
        .into_iter()
        .flatten()
        .filter_map(move |p| probe_port(c, p))
}

fn probe_port(c: &Container, p: &Probe) -> Option<u16> {
    let aimed_elsewhere = |host: &Option<String>| host.as_deref().is_some_and(|h| !h.is_empty());
    if let Some(h) = &p.http_get {
        if aimed_elsewhere(&h.host) {
            return None;
        }
        return resolve(c, &h.port);
    }
    if let Some(t) = &p.tcp_socket {
        if aimed_elsewhere(&t.host) {
            return None;
        }
        return resolve(c, &t.port);
    }
    p.grpc.as_ref().and_then(|g| number(g.port))
}

fn resolve(c: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(n) => number(*n),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| number(p.container_port)),
    }
}

fn number(n: i32) -> Option<u16> {
    u16::try_from(n).ok().filter(|p| *p != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> PodSpec {
        serde_yaml_ng::from_str(yaml).unwrap()
    }

    #[test]
    fn every_probe_kind_of_every_container_counts_and_names_resolve() {
        let s = spec(
            r#"
containers:
- name: app
  ports: [{name: http, containerPort: 8080}, {name: admin, containerPort: 9901}]
  livenessProbe: {httpGet: {path: /healthz, port: http}}
  readinessProbe: {tcpSocket: {port: 8081}}
  startupProbe: {grpc: {port: 9000}}
- name: exec-only
  livenessProbe: {exec: {command: [true]}}
initContainers:
- name: sidecar
  restartPolicy: Always
  readinessProbe: {httpGet: {port: 15021}}
  livenessProbe: {httpGet: {port: 8080}}
"#,
        );
        assert_eq!(probe_ports(Some(&s)), vec![8080, 8081, 9000, 15021]);
    }

    #[test]
    fn probes_that_never_reach_the_pod_ip_add_nothing() {
        let s = spec(
            r#"
containers:
- name: app
  ports: [{name: http, containerPort: 8080}]
  livenessProbe: {httpGet: {port: undeclared}}
  readinessProbe: {httpGet: {host: 10.0.0.9, port: 8080}}
  startupProbe: {tcpSocket: {host: example.internal, port: 7000}}
"#,
        );
        assert!(probe_ports(Some(&s)).is_empty());
        assert!(probe_ports(None).is_empty());
    }

    #[test]
    fn out_of_range_ports_are_ignored() {
        let s = spec(
            r#"
containers:
- name: app
  livenessProbe: {grpc: {port: 70000}}
  readinessProbe: {tcpSocket: {port: 0}}
"#,
        );
        assert!(probe_ports(Some(&s)).is_empty());
    }
}
