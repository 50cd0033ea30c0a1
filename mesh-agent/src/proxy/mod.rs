//! The proxies. Today: outbound L4 (pod -> service endpoint).
mod dial;
mod error;
mod outbound;

use std::{
    sync::{Arc, atomic::AtomicU64},
    time::Duration,
};

use arc_swap::ArcSwap;

pub use error::OutboundError;
pub use outbound::serve_outbound;

use crate::{bpf::MeshMaps, config::NamespacedName, inpod::Netns, state::RouteTable};

/// Shared by every connection of this agent.
pub struct ProxyContext {
    pub routes: ArcSwap<RouteTable>,
    pub maps: Arc<MeshMaps>,
    pub connect_timeout: Duration,
    /// Source of connection ids for tracing spans and logs.
    pub next_conn_id: AtomicU64,
}

/// One enrolled pod, as its connections see it.
pub struct PodContext {
    pub id: NamespacedName,
    pub netns: Netns,
    pub netns_cookie: u64,
}
