//! The agent's own view of the config: only what the data path needs, already checked.
//! Kubernetes objects are translated into these at the edge (`translate.rs`), so the
//! proxy never sees an unvalidated field.
use std::{collections::BTreeMap, fmt, net::IpAddr, path::PathBuf, sync::Arc};

use ipnet::IpNet;

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, serde::Serialize, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
    pub protocol: Protocol,
    /// `appProtocol` as written (`http`, `kubernetes.io/h2c`, `grpc`, `tcp`, ...).
    pub app_protocol: Option<String>,
}

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct Service {
    pub id: NamespacedName,
    /// Empty for headless services (`clusterIP: None`), which the mesh does not capture.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `mesh.dev/fail-open` ([`FAIL_OPEN_ANNOTATION`]); `None`: as its namespace says.
    pub fail_open: Option<bool>,
}

/// On a Service or a Namespace, `"true"`: while no agent serves a client's node, the
/// client's connections to the Service go straight to one of its ready endpoints
/// (plaintext) instead of being refused. `"false"` (the default) keeps it closed.
pub const FAIL_OPEN_ANNOTATION: &str = "mesh.dev/fail-open";

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// The first of `addresses`: Kubernetes says consumers use only the first (the
    /// others are checked, not kept; at 100,000 endpoints a list each cost 9 MiB).
    pub address: IpAddr,
    /// `conditions.ready`; Kubernetes says an absent value means ready.
    pub ready: bool,
    pub node_name: Option<String>,
}

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    pub id: NamespacedName,
    /// From the `kubernetes.io/service-name` label; the slice belongs to this service
    /// in the same namespace.
    pub service_name: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<Endpoint>,
}

/// A pod's labels, sorted by key, in one allocation. A `BTreeMap` spends a 540-byte
/// node on even one label: at 20,000 pods that was 11 MiB of the agent's memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Labels(Box<[(String, String)]>);

impl Labels {
    pub fn get(&self, key: &str) -> Option<&String> {
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(key))
            .ok()
            .map(|i| &self.0[i].1)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&String, &String)> {
        self.0.iter().map(|(k, v)| (k, v))
    }

    /// Sets one label (for tests and tools; the config builds labels whole).
    pub fn insert(&mut self, key: String, value: String) {
        let mut all: BTreeMap<String, String> = std::mem::take(self).into();
        all.insert(key, value);
        *self = all.into();
    }
}

impl From<BTreeMap<String, String>> for Labels {
    fn from(map: BTreeMap<String, String>) -> Labels {
        Labels(map.into_iter().collect())
    }
}

impl From<Labels> for BTreeMap<String, String> {
    fn from(labels: Labels) -> BTreeMap<String, String> {
        labels.0.into_vec().into_iter().collect()
    }
}

impl<const N: usize> From<[(String, String); N]> for Labels {
    fn from(pairs: [(String, String); N]) -> Labels {
        BTreeMap::from(pairs).into()
    }
}

impl serde::Serialize for Labels {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

/// A namespace: only what its labels say about the mesh.
#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct Namespace {
    pub name: String,
    pub dataplane: super::enrollment::DataplaneMode,
    /// `mesh.dev/fail-open`: the default of its Services.
    pub fail_open: Option<bool>,
}

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct Pod {
    pub id: NamespacedName,
    /// `metadata.uid`: how the agent finds the pod's netns in `/proc` when no
    /// annotation names it.
    pub uid: Option<String>,
    pub node_name: Option<String>,
    /// The primary address (`status.podIP`); `None` once the pod has finished.
    pub ip: Option<IpAddr>,
    /// Every address of the pod (`status.podIP` then the rest of `status.podIPs`).
    pub ips: Vec<IpAddr>,
    /// `status.phase` is Succeeded or Failed: the pod owns no IP and is not enrolled.
    pub finished: bool,
    pub service_account: String,
    /// Where the pod's network namespace is (annotation [`NETNS_ANNOTATION`]).
    pub netns: Option<PathBuf>,
    /// The pod's own word on the mesh (its labels, or [`ENROLL_ANNOTATION`]).
    pub dataplane: super::enrollment::DataplaneMode,
    /// Whether the pod is in the mesh: its word, else its namespace's, else the
    /// source's default (`Config::resolve_enrollment`).
    pub enroll: bool,
    pub labels: Labels,
    /// What metrics group this pod under (its Deployment or other owner; see
    /// `translate::workload_name`).
    pub workload: String,
    /// The ports the kubelet probes (`probes::probe_ports`), sorted.
    pub probe_ports: Vec<u16>,
    /// What the agent last recorded on the pod (annotation [`STATUS_ANNOTATION`]).
    pub mesh_status: Option<String>,
}

/// `PeerAuthentication.spec.mtls.mode`. DISABLE is not offered: an enrolled workload
/// always accepts mTLS.
#[derive(Debug, serde::Serialize, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MtlsMode {
    Strict,
    Permissive,
}

/// `matchLabels` of a workload selector; every label must match.
pub type Selector = BTreeMap<String, String>;

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct PeerAuthentication {
    pub id: NamespacedName,
    pub selector: Option<Selector>,
    /// `None` is UNSET: inherit from the enclosing scope.
    pub mode: Option<MtlsMode>,
}

#[derive(Debug, serde::Serialize, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthzAction {
    Allow,
    Deny,
    Audit,
}

/// `from.source`: every field present must match; within a field, any value.
#[derive(Debug, serde::Serialize, Clone, Default, PartialEq, Eq)]
pub struct SourceMatch {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
}

/// `to.operation`. The L4 fields (ports) apply to every connection; the L7 fields
/// (hosts, methods, paths) to HTTP requests (see `authz` for what they mean on a
/// connection that is not HTTP).
#[derive(Debug, serde::Serialize, Clone, Default, PartialEq, Eq)]
pub struct OperationMatch {
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    /// Istio string patterns, or path templates with `{*}` and `{**}`.
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

impl OperationMatch {
    /// Whether any field needs an HTTP request to be decided.
    pub fn has_l7(&self) -> bool {
        [
            &self.hosts,
            &self.not_hosts,
            &self.methods,
            &self.not_methods,
            &self.paths,
            &self.not_paths,
        ]
        .iter()
        .any(|v| !v.is_empty())
    }
}

/// One `when` condition: the attribute named by `key` must match one of `values` (if
/// any) and none of `not_values`.
#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub enum Condition {
    /// `request.headers[name]` (L7); the name is lowercase.
    RequestHeader {
        name: String,
        values: Vec<String>,
        not_values: Vec<String>,
    },
    /// `source.ip`: addresses or CIDR blocks.
    SourceIp {
        values: Vec<IpNet>,
        not_values: Vec<IpNet>,
    },
    /// `source.namespace`.
    SourceNamespace {
        values: Vec<String>,
        not_values: Vec<String>,
    },
    /// `source.principal`.
    SourcePrincipal {
        values: Vec<String>,
        not_values: Vec<String>,
    },
    /// `destination.port`.
    DestinationPort {
        values: Vec<u16>,
        not_values: Vec<u16>,
    },
}

impl Condition {
    pub fn is_l7(&self) -> bool {
        matches!(self, Condition::RequestHeader { .. })
    }
}

/// One rule: any `from` AND any `to` AND every `when` (an absent list matches
/// everything).
#[derive(Debug, serde::Serialize, Clone, Default, PartialEq, Eq)]
pub struct Rule {
    pub from: Vec<SourceMatch>,
    pub to: Vec<OperationMatch>,
    pub when: Vec<Condition>,
}

#[derive(Debug, serde::Serialize, Clone, PartialEq, Eq)]
pub struct AuthorizationPolicy {
    pub id: NamespacedName,
    pub selector: Option<Selector>,
    pub action: AuthzAction,
    /// No rules: the policy matches nothing (so an ALLOW policy with no rules denies all).
    pub rules: Vec<Rule>,
}

/// Annotation that binds a Pod to its network namespace on the node, as a path to a
/// netns file (`/var/run/netns/NAME` or `/proc/PID/ns/net`). In standalone mode this is
/// how the agent finds a pod; see docs/config.md.
pub const NETNS_ANNOTATION: &str = "mesh.dev/netns";
/// Annotation to keep a pod out of the mesh: `"false"` (the older spelling of the
/// label `mesh.dev/dataplane-mode: none`).
pub const ENROLL_ANNOTATION: &str = "mesh.dev/enroll";
/// Written by the node's agent on each pod it enrolled (value [`STATUS_ENROLLED`]),
/// through `pods/status`, and removed when it takes the pod out.
pub const STATUS_ANNOTATION: &str = "mesh.dev/status";
pub const STATUS_ENROLLED: &str = "enrolled";
/// Label of an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One consistent generation of config, as read from a directory or the API.
///
/// Objects are shared, not copied: the source's store, this generation and the one
/// before it hold the same allocation of every object that did not change, so a
/// change costs the objects it touches (and a comparison of two generations is a
/// pointer comparison for the rest).
#[derive(Debug, serde::Serialize, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub namespaces: Vec<Arc<Namespace>>,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub pods: Vec<Arc<Pod>>,
    pub peer_authentications: Vec<Arc<PeerAuthentication>>,
    pub authorization_policies: Vec<Arc<AuthorizationPolicy>>,
    /// HTTPRoutes and GRPCRoutes.
    pub routes: Vec<Arc<super::route::Route>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_look_up_by_key_keep_key_order_and_serialize_as_a_map() {
        let mut labels = Labels::from(BTreeMap::from([
            ("version".to_owned(), "v1".to_owned()),
            ("app".to_owned(), "web".to_owned()),
        ]));
        assert_eq!(labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(labels.get("version").map(String::as_str), Some("v1"));
        assert_eq!(labels.get("zone"), None);
        labels.insert("tier".into(), "front".into());
        labels.insert("app".into(), "api".into());
        let keys: Vec<&str> = labels.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["app", "tier", "version"]);
        assert_eq!(labels.get("app").map(String::as_str), Some("api"));
        assert_eq!(
            serde_json::to_value(&labels).unwrap(),
            serde_json::json!({"app": "api", "tier": "front", "version": "v1"})
        );
        assert_eq!(Labels::default().get("app"), None);
    }
}
