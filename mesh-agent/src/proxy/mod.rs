//! The proxies. Outbound: pod -> service endpoint, delivered locally on the same node,
//! through the mTLS tunnel to another node, or passed through to a workload outside the
//! mesh. Inbound: the tunnel's server side (:15008) and plaintext capture (:15006).
mod deliver;
mod dial;
mod error;
mod inbound;
mod outbound;
mod plaintext;
mod pool;
mod relay;
mod tunnel;

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use arc_swap::ArcSwap;

pub use error::{InboundError, OutboundError, TunnelError};
pub use inbound::serve_tunnel;
pub use outbound::serve_outbound;
pub use plaintext::serve_plaintext;
pub use pool::Pool;

use crate::{
    authz::{LiveConns, PolicySet, Workload},
    bpf::MeshMaps,
    identity::{Identity, SecretManager},
    inpod::Netns,
    state::{RouteTable, WorkloadIndex},
};

/// Shared by every connection of this agent.
pub struct ProxyContext {
    pub routes: ArcSwap<RouteTable>,
    pub workloads: ArcSwap<WorkloadIndex>,
    pub policy: ArcSwap<PolicySet>,
    /// The pods this agent serves, by IP: same-node traffic is delivered to them.
    pub local: ArcSwap<HashMap<IpAddr, Arc<PodContext>>>,
    pub live: Arc<LiveConns>,
    pub secrets: Arc<SecretManager>,
    pub pool: Arc<Pool>,
    pub maps: Arc<MeshMaps>,
    pub connect_timeout: Duration,
    /// Source of connection ids for tracing spans and logs.
    pub next_conn_id: AtomicU64,
}

/// One enrolled pod, as its connections see it.
pub struct PodContext {
    pub workload: Workload,
    pub ip: Option<IpAddr>,
    pub identity: Identity,
    pub netns: Netns,
    pub netns_cookie: u64,
    pub tls_server: Arc<rustls::ServerConfig>,
}
