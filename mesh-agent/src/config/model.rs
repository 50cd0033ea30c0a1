//! The agent's own view of the config: only what the data path needs, already checked.
//! Kubernetes objects are translated into these at the edge (`translate.rs`), so the
//! proxy never sees an unvalidated field.
use std::{fmt, net::IpAddr, path::PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub id: NamespacedName,
    /// Empty for headless services (`clusterIP: None`), which the mesh does not capture.
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlicePort {
    pub name: Option<String>,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addresses: Vec<IpAddr>,
    /// `conditions.ready`; Kubernetes says an absent value means ready.
    pub ready: bool,
    pub node_name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSlice {
    pub id: NamespacedName,
    /// From the `kubernetes.io/service-name` label; the slice belongs to this service
    /// in the same namespace.
    pub service_name: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    pub id: NamespacedName,
    pub node_name: Option<String>,
    pub ip: Option<IpAddr>,
    pub service_account: String,
    /// Where the pod's network namespace is (annotation [`NETNS_ANNOTATION`]).
    pub netns: Option<PathBuf>,
    /// `false` when the pod opted out with [`ENROLL_ANNOTATION`]` = "false"`.
    pub enroll: bool,
}

/// Annotation that binds a Pod to its network namespace on the node, as a path to a
/// netns file (`/var/run/netns/NAME` or `/proc/PID/ns/net`). In standalone mode this is
/// how the agent finds a pod; see docs/config.md.
pub const NETNS_ANNOTATION: &str = "mesh.dev/netns";
/// Annotation to keep a pod out of the mesh: `"false"`.
pub const ENROLL_ANNOTATION: &str = "mesh.dev/enroll";
/// Label of an EndpointSlice naming its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// One consistent generation of config, as read from a directory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub services: Vec<Service>,
    pub endpoint_slices: Vec<EndpointSlice>,
    pub pods: Vec<Pod>,
}
