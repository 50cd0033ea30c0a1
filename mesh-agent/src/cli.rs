//! Command line of `mesh-agent`.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::telemetry::{AccessLog, LogFormat};

#[derive(Debug, Parser)]
#[command(
    name = "mesh-agent",
    version,
    about = "Node agent of the eBPF sidecarless mesh"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
#[expect(
    clippy::large_enum_variant,
    reason = "parsed once at start; boxing would only complicate clap"
)]
pub enum Command {
    /// Attach the kernel programs and carry the node's mesh traffic until SIGTERM.
    Run(RunArgs),
    /// Run the mesh CA: sign workload certificates for the nodes that run them.
    Ca(CaArgs),
}

/// Where the config comes from: exactly one of a directory or the Kubernetes API.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct SourceArgs {
    /// Directory of YAML files (Service, EndpointSlice, Pod, ...), watched for changes.
    /// Pods in it are in the mesh unless their labels say otherwise.
    #[arg(long, env = "MESH_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,

    /// Watch the Kubernetes API: in a pod, with its service account; elsewhere, with
    /// `--kubeconfig` or `$KUBECONFIG`. Pods are in the mesh only when their labels
    /// (or their namespace's) say `mesh.dev/dataplane-mode: enabled`.
    #[arg(long)]
    pub kubernetes: bool,

    /// A kubeconfig file for the Kubernetes API (implies `--kubernetes`).
    #[arg(long, env = "MESH_KUBECONFIG")]
    pub kubeconfig: Option<PathBuf>,
}

/// `host:port` with a host and a port number (`[v6]:port` for IPv6).
fn host_port(s: &str) -> Result<String, String> {
    let (host, port) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("{s:?}: expected host:port"))?;
    if host.is_empty() || host.trim_matches(['[', ']']).is_empty() {
        return Err(format!("{s:?}: no host"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(s.to_owned()),
        _ => Err(format!("{s:?}: {port:?} is not a port number")),
    }
}

/// How the CA authenticates nodes: exactly one way.
#[derive(Debug, Args)]
#[group(required = true, multiple = false)]
pub struct NodeAuthArgs {
    /// Bootstrap tokens: one `<node-name> <token>` line per node (standalone mode).
    #[arg(long)]
    pub node_tokens: Option<PathBuf>,

    /// Kubernetes: the agents present their projected service-account token, which
    /// the CA checks with a TokenReview (needs `--kubernetes` or `--kubeconfig`).
    #[arg(long)]
    pub token_review: bool,
}

/// The source `SourceArgs` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Directory(PathBuf),
    /// The API, with this kubeconfig (`None`: in-cluster, or `$KUBECONFIG`).
    Kubernetes(Option<PathBuf>),
}

impl SourceArgs {
    pub fn source(&self) -> Source {
        match (&self.config_dir, &self.kubeconfig) {
            (Some(dir), _) => Source::Directory(dir.clone()),
            (None, path) => Source::Kubernetes(path.clone()),
        }
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// This node's name: pods whose spec.nodeName equals it are enrolled.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    #[command(flatten)]
    pub source: SourceArgs,

    /// cgroup v2 directory to attach the programs to. Default: the cgroup v2 root,
    /// found from /proc/self/mountinfo.
    #[arg(long)]
    pub cgroup: Option<PathBuf>,

    /// The host's /proc, where the agent finds the netns of pods that carry no
    /// `mesh.dev/netns` annotation, by their UID in each process's cgroup (in a
    /// DaemonSet: the host's /proc mounted into the agent's container).
    #[arg(long, env = "MESH_HOST_PROC", default_value = "/proc")]
    pub host_proc: PathBuf,

    /// Unix socket for the mesh's CNI plugin (`mesh-cni`), root only. Unset: no CNI
    /// plugin talks to this agent (pods are placed by annotation or found in /proc).
    #[arg(long, env = "MESH_CNI_SOCKET")]
    pub cni_socket: Option<PathBuf>,

    /// How long the CNI plugin's ADD waits for the pod's enrollment before the
    /// sandbox fails (the kubelet then retries it).
    #[arg(long, default_value = "20s", value_parser = humantime::parse_duration)]
    pub cni_timeout: Duration,

    /// bpffs mount; pins go to <bpffs>/mesh/<node-name>. Mounted if absent.
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,

    /// Upstream connect timeout; on expiry the client connection is reset.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub connect_timeout: Duration,

    /// How long protocol detection waits for a client's first bytes on a routed
    /// Service port that does not declare its protocol; then the connection is
    /// carried as opaque TCP.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub detect_timeout: Duration,

    /// Threads that serve connections, each with a runtime of its own (default: the
    /// CPUs the agent may use, from its cgroup and affinity).
    #[arg(long, env = "MESH_WORKER_THREADS", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub worker_threads: Option<u16>,

    /// Ports where the server speaks first: never held for protocol detection, and
    /// routes attached to them are refused (they stay L4). Comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "25,587,3306,4444,5432,6379,9300,11211"
    )]
    pub server_first_ports: Vec<u16>,

    /// Readiness endpoint (GET /healthz/ready), on the node.
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,

    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Access log (one line per connection): on (in --log-format), off, text or json.
    #[arg(long, value_enum, default_value = "on")]
    pub access_log: AccessLog,

    /// Admin API socket (gRPC, for meshctl); created with mode 0600.
    #[arg(
        long,
        env = "MESH_ADMIN_SOCKET",
        default_value = "/run/mesh/admin.sock"
    )]
    pub admin_socket: PathBuf,

    /// Prometheus metrics (GET /metrics), on the node.
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,

    /// Handover socket (mode 0600): a new agent on this node connects here and takes
    /// the running agent's listeners over, without a refused connection.
    #[arg(
        long,
        env = "MESH_HANDOVER_SOCKET",
        default_value = "/run/mesh/handover.sock"
    )]
    pub handover_socket: PathBuf,

    /// Once a successor took over: how long this agent keeps relaying the
    /// connections it carries before it exits and closes them. Set it below the
    /// pod's termination grace period (the chart does: the grace period minus 5 s).
    #[arg(long, env = "MESH_DRAIN_TIMEOUT", default_value = "25s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// sockmap acceleration: the kernel hands bytes between an application and the
    /// agent inside the pod without the TCP/IP stack (sock_ops + sk_msg). `off` keeps
    /// every hop on plain TCP.
    #[arg(long, env = "MESH_SOCKMAP", value_enum, default_value = "on")]
    pub sockmap: Switch,

    /// With sockmap on: bytes a receiving socket may leave unread before its sender is
    /// moved to the TCP path, where the receive window applies (the sockmap itself has
    /// no bound).
    #[arg(long, default_value_t = 4 * 1024 * 1024)]
    pub sockmap_unread_limit: u32,

    /// Entries of a bounded kernel map, `NAME=ENTRIES` (repeatable): `services`
    /// (service ports, default 65536), `backends` (fail-open endpoints, 16384),
    /// `orig-dst` (connections between connect and the agent's accept, 65536),
    /// `sockets` (sockmap sockets, 65536), `pods` (enrolled pods, 4096). The agent
    /// warns at 80% full; changing a size starts from new maps (not a hitless restart).
    #[arg(long = "bpf-map-size", value_name = "NAME=ENTRIES", value_parser = crate::bpf::sizes::parse)]
    pub bpf_map_sizes: Vec<(crate::bpf::sizes::Sized, u32)>,

    /// Kubernetes cluster domain, for Istio's `destination_service` names.
    #[arg(long, default_value = "cluster.local")]
    pub cluster_domain: String,

    #[command(flatten)]
    pub identity: IdentityArgs,

    #[command(flatten)]
    pub tunnel: TunnelArgs,

    /// Namespace whose PeerAuthentication and AuthorizationPolicy objects apply
    /// mesh-wide (Istio's root namespace).
    #[arg(long, default_value = "istio-system")]
    pub root_namespace: String,

    /// With the Kubernetes source: write each HTTPRoute's and GRPCRoute's
    /// `status.parents` (Accepted, ResolvedRefs). One agent of the cluster writes at
    /// a time, the holder of the Lease `mesh-route-status` in `--namespace`.
    #[arg(long, value_enum, default_value = "on")]
    pub route_status: Switch,

    /// The namespace the agent runs in (in a DaemonSet: from the downward API), where
    /// the route-status Lease lives.
    #[arg(long, env = "POD_NAMESPACE", default_value = "mesh-system")]
    pub namespace: String,
}

/// Where the agent gets its workload certificates.
#[derive(Debug, Args)]
pub struct IdentityArgs {
    /// Trust domain of the SPIFFE IDs: spiffe://<trust-domain>/ns/<ns>/sa/<sa>.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,

    /// Address of the CA (`mesh-agent ca`): `host:port`, a name (resolved on each
    /// connect, `mesh-ca.mesh-system.svc:15012`) or an address (`10.0.0.5:15012`).
    #[arg(long, env = "MESH_CA_ADDR", value_parser = host_port)]
    pub ca_addr: String,

    /// Name in the CA's serving certificate.
    #[arg(long, default_value = "mesh-ca")]
    pub ca_server_name: String,

    /// The CA's root certificate (PEM), to verify the CA.
    #[arg(long, env = "MESH_CA_ROOT")]
    pub ca_root: PathBuf,

    /// File with this node's token for the CA: its bootstrap token, or on Kubernetes
    /// the agent's projected service-account token (audience `mesh-ca`). Read for
    /// every request, so a rotated token is picked up (see docs/security.md).
    #[arg(long, env = "MESH_CA_TOKEN_FILE")]
    pub ca_token_file: PathBuf,

    /// Lifetime to request for workload certificates; renewed at half of it.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub cert_ttl: Duration,
}

/// The HBONE tunnel between nodes.
#[derive(Debug, Args)]
pub struct TunnelArgs {
    /// Concurrent connections one pod may hold through the agent (outbound, inbound and
    /// deliveries together); the agent's total is cut from its fd limit.
    #[arg(long, default_value_t = 2048, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections_per_pod: u32,

    /// Streams per pooled tunnel connection before another connection is opened.
    #[arg(long, default_value_t = 100)]
    pub tunnel_stream_limit: u32,

    /// A pooled tunnel connection with no streams is closed after this long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub tunnel_idle_timeout: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Switch {
    On,
    Off,
}

impl Switch {
    pub fn is_on(self) -> bool {
        self == Switch::On
    }
}

#[derive(Debug, Args)]
pub struct CaArgs {
    /// Address to serve the CA API (gRPC over TLS) on.
    #[arg(long, default_value = "0.0.0.0:15012")]
    pub listen: SocketAddr,

    /// Trust domain the CA signs for.
    #[arg(long, default_value = "cluster.local")]
    pub trust_domain: String,

    /// Where a generated root is kept (used when no --root-cert is given).
    #[arg(long, default_value = "/var/lib/mesh/ca")]
    pub state_dir: PathBuf,

    /// Root certificate (PEM) from a file instead of a generated one.
    #[arg(long)]
    pub root_cert: Option<PathBuf>,

    /// Certificate that signs workload certificates: an intermediate under
    /// --root-cert. Default: the root itself.
    #[arg(long)]
    pub signing_cert: Option<PathBuf>,

    /// Private key (PEM) of the signing certificate.
    #[arg(long)]
    pub signing_key: Option<PathBuf>,

    /// Where the CA learns which pods (so which identities) run on which node.
    #[command(flatten)]
    pub source: SourceArgs,

    #[command(flatten)]
    pub node_auth: NodeAuthArgs,

    /// Longest certificate lifetime the CA grants.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_cert_ttl: Duration,

    /// DNS name in the CA's serving certificate (agents' --ca-server-name).
    #[arg(long, default_value = "mesh-ca")]
    pub server_name: String,

    /// With `--token-review`: the only service account (`<namespace>/<name>`) whose
    /// tokens speak for a node: the agents'.
    #[arg(long, default_value = "mesh-system/mesh-agent")]
    pub agent_service_account: String,

    /// With `--token-review`: the audience the agents' tokens must carry.
    #[arg(long, default_value = "mesh-ca")]
    pub token_audience: String,

    #[arg(long, value_enum, default_value = "text")]
    pub log_format: LogFormat,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_address_is_a_host_and_a_port() {
        for ok in [
            "mesh-ca.mesh-system.svc:15012",
            "10.0.0.5:15012",
            "[fd00::5]:15012",
        ] {
            assert_eq!(host_port(ok).as_deref(), Ok(ok));
        }
        for bad in ["mesh-ca", ":15012", "mesh-ca:0", "mesh-ca:http", "[]:15012"] {
            assert!(host_port(bad).is_err(), "{bad}");
        }
    }
}
