//! The routing decision for one outbound connection, as a pure function of the
//! snapshot, the source pod and the original destination: no socket, no clock. The
//! outbound proxy then carries the plan out (`outbound.rs`, `http/`).
//!
//!   ClusterIP with an HTTPRoute/GRPCRoute attached -> HTTP, routed per request;
//!   any other ClusterIP                            -> one endpoint of the service (L4);
//!   anything else                                  -> the address is its own endpoint.
//!
//! An endpoint is reached one of three ways (`Way`): delivered on this node, through
//! the mTLS tunnel to another node's agent, or passed through as plain TCP.
use std::{net::SocketAddr, sync::Arc};

use super::{OutboundError, PodContext, Snapshot};
use crate::{
    config::NamespacedName,
    identity::Identity,
    state::{PortRoutes, WorkloadInfo},
};

/// How an endpoint is reached.
#[derive(Clone)]
pub enum Way {
    /// A pod this agent serves: authorized and delivered here, without encryption.
    Local(Arc<PodContext>),
    /// A meshed pod on another node: HBONE to its `:15008`, which must prove `Identity`.
    Hbone(Identity),
    /// Outside the mesh: a plain connection, as the application asked.
    Passthrough,
}

impl std::fmt::Debug for Way {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Way::Local(p) => write!(f, "Local({})", p.id),
            Way::Hbone(id) => write!(f, "Hbone({id})"),
            Way::Passthrough => f.write_str("Passthrough"),
        }
    }
}

/// One endpoint and the way to it.
#[derive(Debug, Clone)]
pub struct Hop {
    pub endpoint: SocketAddr,
    pub way: Way,
    /// What the config says is at the endpoint (for telemetry), if anything.
    pub workload: Option<Arc<WorkloadInfo>>,
}

impl Hop {
    /// The endpoint as telemetry names it: its workload and the identity it proves.
    pub fn peer(&self) -> crate::telemetry::Peer {
        crate::telemetry::Peer {
            workload: self.workload.as_ref().map(|w| w.workload_ref()),
            addr: Some(self.endpoint),
            identity: match &self.way {
                Way::Local(dest) => Some(dest.identity.clone()),
                Way::Hbone(identity) => Some(identity.clone()),
                Way::Passthrough => None,
            },
        }
    }
}

/// A connection to carry byte for byte.
#[derive(Debug, Clone)]
pub struct TcpPlan {
    /// The service and port the client dialled, when it dialled a ClusterIP.
    pub service: Option<(NamespacedName, u16)>,
    pub hop: Hop,
}

/// A connection to a service port with routes attached: terminated, and each request
/// routed on its own. `fallback` is where the bytes go if the client turns out not to
/// speak HTTP (detection), balanced per connection as any L4 service.
#[derive(Debug, Clone)]
pub struct HttpPlan {
    pub service: NamespacedName,
    pub port: u16,
    pub routes: Arc<PortRoutes>,
    pub fallback: Option<Hop>,
}

#[derive(Debug, Clone)]
pub enum Plan {
    Tcp(TcpPlan),
    Http(HttpPlan),
}

/// Plans the connection `pod` opened to `dst`.
#[expect(
    clippy::result_large_err,
    reason = "once per connection; the error is logged and the connection reset"
)]
pub fn plan(snap: &Snapshot, pod: &PodContext, dst: SocketAddr) -> Result<Plan, OutboundError> {
    let Some(target) = snap.routes.get(dst) else {
        // Not a ClusterIP: the address is the endpoint. A meshed pod's IP takes the
        // same path as a service endpoint of that pod (local delivery or the tunnel,
        // with both identities and the destination's policy), without a service, and
        // without the service's routes (GAMMA: routes attach to the frontend only).
        return Ok(Plan::Tcp(TcpPlan {
            service: None,
            hop: hop_to(snap, dst),
        }));
    };
    if let Some(routes) = snap.http.for_client(dst, &pod.id.namespace) {
        return Ok(Plan::Http(HttpPlan {
            service: target.service.clone(),
            port: target.port,
            routes,
            fallback: target.pick().map(|e| hop_to(snap, e)),
        }));
    }
    let endpoint = target.pick().ok_or_else(|| OutboundError::NoEndpoints {
        service: target.service.clone(),
        port: target.port,
    })?;
    Ok(Plan::Tcp(TcpPlan {
        service: Some((target.service.clone(), target.port)),
        hop: hop_to(snap, endpoint),
    }))
}

/// The way to one endpoint: a local pod first (whatever the config says about its
/// node), then a meshed pod elsewhere, else passthrough.
pub fn hop_to(snap: &Snapshot, endpoint: SocketAddr) -> Hop {
    let workload = snap.workloads.get(endpoint.ip()).cloned();
    let way = match (snap.local_pod(endpoint.ip()), &workload) {
        (Some(pod), _) => Way::Local(pod.clone()),
        (None, Some(w)) if w.meshed => Way::Hbone(w.identity.clone()),
        _ => Way::Passthrough,
    };
    Hop {
        endpoint,
        way,
        workload,
    }
}

#[cfg(test)]
mod tests;
