//! Config objects for the simulated cluster, as the YAML an operator would write.
use std::net::IpAddr;

pub fn service(name: &str, vip: IpAddr, port: u16, target_port: u16) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  clusterIP: {vip}\n  ports:\n  - {{name: tcp, port: {port}, targetPort: {target_port}}}\n---\n"
    )
}

/// An EndpointSlice for `service` with one ready endpoint per address.
pub fn endpoint_slice(service: &str, port: u16, endpoints: &[IpAddr]) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata:\n  name: {service}-slice\n  namespace: default\n  labels: {{kubernetes.io/service-name: {service}}}\n\
         addressType: IPv4\nports: [{{name: tcp, port: {port}}}]\nendpoints:\n"
    );
    if endpoints.is_empty() {
        s = s.replace("endpoints:\n", "endpoints: []\n");
    }
    for ip in endpoints {
        s.push_str(&format!("- addresses: [\"{ip}\"]\n"));
    }
    s.push_str("---\n");
    s
}

/// A Service on port 80 (port name `http`) to `target_port` on `endpoints`, with an
/// HTTPRoute whose one rule sends every request to it: an L7 (routed) Service.
pub fn routed_service(name: &str, vip: IpAddr, target_port: u16, endpoints: &[IpAddr]) -> String {
    service(name, vip, 80, target_port).replace("name: tcp,", "name: http,")
        + &endpoint_slice(name, target_port, endpoints).replace("name: tcp,", "name: http,")
        + &format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {{name: {name}, namespace: default}}\n\
             spec:\n  parentRefs: [{{group: \"\", kind: Service, name: {name}, port: 80}}]\n\
             \x20 rules:\n  - backendRefs: [{{name: {name}, port: 80}}]\n---\n"
        )
}

/// A Pod whose service account is its own name, labelled `app: <name>`.
pub fn pod(name: &str, node: &str, ip: IpAddr, netns: &str, enrolled: bool) -> String {
    pod_as(name, node, ip, netns, enrolled, name)
}

/// A Pod running as `service_account`, labelled `app: <name>`.
pub fn pod_as(
    name: &str,
    node: &str,
    ip: IpAddr,
    netns: &str,
    enrolled: bool,
    service_account: &str,
) -> String {
    let enroll = if enrolled {
        ""
    } else {
        "\n    mesh.dev/enroll: \"false\""
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n  labels: {{app: {name}}}\n  annotations:\n    mesh.dev/netns: {netns}{enroll}\n\
         spec:\n  nodeName: {node}\n  serviceAccountName: {service_account}\n  containers: [{{name: app, image: mesh-testpod}}]\n\
         status: {{podIP: \"{ip}\"}}\n---\n"
    )
}

/// A Pod with no netns annotation. With a `uid`, the agent finds its netns in `/proc`
/// (the pod's cgroup must carry the UID: `Cluster::add_kubelet_pod`); without one,
/// only the CNI plugin can place it.
pub fn pod_unplaced(name: &str, node: &str, ip: IpAddr, uid: Option<&str>) -> String {
    let uid = uid.map(|u| format!("  uid: {u}\n")).unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: default\n{uid}  labels: {{app: {name}}}\n\
         spec:\n  nodeName: {node}\n  serviceAccountName: {name}\n  containers: [{{name: app, image: mesh-testpod}}]\n\
         status: {{podIP: \"{ip}\"}}\n---\n"
    )
}

/// `pod_yaml` (a Pod of these helpers, labelled `app: <name>`) with the label
/// `mesh.dev/dataplane-mode: <mode>` added.
pub fn with_dataplane_mode(pod_yaml: &str, name: &str, mode: &str) -> String {
    pod_yaml.replace(
        &format!("labels: {{app: {name}}}"),
        &format!("labels: {{app: {name}, mesh.dev/dataplane-mode: {mode}}}"),
    )
}

/// `pod_yaml` (a Pod of these helpers) whose one container is `container`, a YAML
/// flow mapping such as `{name: app, readinessProbe: {tcpSocket: {port: 8080}}}`.
pub fn with_container(pod_yaml: &str, container: &str) -> String {
    pod_yaml.replace(
        "containers: [{name: app, image: mesh-testpod}]",
        &format!("containers: [{container}]"),
    )
}

/// A PeerAuthentication for namespace `default` (`mode`: STRICT or PERMISSIVE).
pub fn peer_authentication(mode: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {{name: default, namespace: default}}\nspec:\n  mtls: {{mode: {mode}}}\n---\n"
    )
}
