//! The proxies. Outbound: pod -> service endpoint, delivered locally on the same node,
//! through the mTLS tunnel to another node, or passed through to a workload outside the
//! mesh. Inbound: the tunnel's server side (:15008) and plaintext capture (:15006).
mod accept;
mod coalesce;
mod deliver;
mod dial;
mod error;
#[cfg(test)]
mod future_size;
pub mod http;
mod inbound;
mod outbound;
mod plaintext;
pub mod plan;
mod podhop;
mod pool;
mod relay;
pub use relay::pipe::grown as relay_buffers_grown;
pub mod shards;
mod snapshot;
mod tunnel;

use std::{
    net::IpAddr,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use arc_swap::{ArcSwap, ArcSwapOption};

pub use accept::Listener;
pub use error::{InboundError, OutboundError, TunnelError};
pub use inbound::{
    ConnectRefusal, MAX_STREAMS as TUNNEL_MAX_STREAMS, connect_target, serve_tunnel,
};
pub use outbound::serve_outbound;
pub use plaintext::serve_plaintext;
pub use pool::Pool;
pub use snapshot::{ConfigParts, LocalPods, Snapshot, SnapshotCell};

use crate::{
    authz::{Decision, LiveConns, Workload},
    bpf::MeshMaps,
    config::NamespacedName,
    identity::{Identity, SecretManager},
    inpod::Netns,
    telemetry::{Telemetry, WorkloadRef},
};

/// Shared by every connection of this agent.
pub struct ProxyContext {
    /// Services, routes, workloads, policy and the pods this agent serves, as one
    /// generation.
    pub snapshot: SnapshotCell,
    /// Per-endpoint latency and load, for per-request balancing.
    pub loads: Arc<http::Loads>,
    /// HTTP connections to applications (delivery and passthrough of routed requests).
    pub app_conns: Arc<http::AppConns>,
    /// How long protocol detection waits for a client's first bytes.
    pub detect_timeout: Duration,
    /// Ports where the server speaks first (`--server-first-ports`): never detected.
    pub server_first_ports: Vec<u16>,
    pub live: Arc<LiveConns>,
    pub secrets: Arc<SecretManager>,
    pub pool: Arc<Pool>,
    pub maps: Arc<MeshMaps>,
    pub connect_timeout: Duration,
    /// Source of connection ids for tracing spans and logs.
    pub next_conn_id: AtomicU64,
    pub telemetry: Arc<Telemetry>,
    /// Concurrent connections of the data path, per pod (netns cookie) and in total:
    /// one pod cannot take the agent's file descriptors from the others.
    pub conns: Arc<crate::limits::ConnLimits<u64>>,
    /// The runtimes accepted connections run on.
    pub shards: Arc<shards::Shards>,
    /// Cancelled when a successor took over: connections that can hand their
    /// clients on (HTTP) close once their requests in flight are answered.
    pub draining: tokio_util::sync::CancellationToken,
}

/// One enrolled pod, as its connections see it.
pub struct PodContext {
    pub id: NamespacedName,
    /// Labels and the metrics name: a change to them is applied in place, without
    /// re-enrolling the pod (which would lift its enforcement for a moment).
    pub meta: ArcSwap<PodMeta>,
    /// The primary address.
    pub ip: Option<IpAddr>,
    /// Every address of the pod.
    pub ips: Vec<IpAddr>,
    pub identity: Identity,
    pub netns: Netns,
    pub netns_cookie: u64,
    /// The tunnel's TLS settings, built once the first trust bundle is there: a pod
    /// is enrolled (and enforced) before its certificate arrives.
    pub tls_server: ArcSwapOption<rustls::ServerConfig>,
    /// Tunnel connections to this pod by source address: one source (a flood of
    /// half-open handshakes) cannot take the pod's whole connection cap.
    pub tunnel_peers: Arc<crate::limits::ConnLimits<IpAddr>>,
}

/// Tunnel connections one source address may hold to one pod (a peer's agent pools
/// about one per 100 streams per source pod).
pub const TUNNEL_PER_SOURCE: usize = 64;

/// What can change about a running pod without re-enrolling it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodMeta {
    pub workload: Workload,
    /// The metrics name (Deployment or other owner).
    pub workload_name: String,
}

impl PodContext {
    pub fn workload_ref(&self) -> WorkloadRef {
        WorkloadRef {
            namespace: self.id.namespace.clone(),
            workload: self.meta.load().workload_name.clone(),
            pod: self.id.name.clone(),
        }
    }

    /// The tunnel's server TLS settings, or why there are none yet.
    pub fn tls_server(
        &self,
        secrets: &Arc<SecretManager>,
    ) -> Result<Arc<rustls::ServerConfig>, crate::identity::TlsConfigError> {
        if let Some(c) = self.tls_server.load_full() {
            return Ok(c);
        }
        let c = crate::identity::server_config(secrets, &self.identity)?;
        self.tls_server.store(Some(c.clone()));
        Ok(c)
    }
}

/// The policy behind a denial, as metrics and logs name it.
pub fn deciding_policy(d: &Decision) -> String {
    match d {
        Decision::Denied(p) => p.to_string(),
        Decision::NotAllowed => "no_allow_match".to_owned(),
        Decision::Allow => String::new(),
    }
}
