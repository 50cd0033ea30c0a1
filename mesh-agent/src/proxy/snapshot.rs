//! Everything a connection (and each request on it) consults, in one value swapped in
//! whole: the services and their routes, the workloads, the policy and the pods this
//! agent serves. A connection loads it once and sees one generation throughout, even
//! if the config or the set of local pods changes while it is being planned.
use std::{collections::HashMap, net::IpAddr, sync::Arc};

use arc_swap::ArcSwap;

use super::PodContext;
use crate::{
    authz::PolicySet,
    state::{HttpRoutes, RouteTable, WorkloadIndex},
};

/// The pods this agent serves, by each of their IPs.
pub type LocalPods = HashMap<IpAddr, Arc<PodContext>>;

#[derive(Clone, Default)]
pub struct Snapshot {
    /// The config generation the config-derived parts come from.
    pub generation: u64,
    pub routes: Arc<RouteTable>,
    pub http: Arc<HttpRoutes>,
    pub workloads: Arc<WorkloadIndex>,
    pub policy: Arc<PolicySet>,
    pub local: Arc<LocalPods>,
}

impl Snapshot {
    /// The local pod at `ip`, if this agent serves it.
    pub fn local_pod(&self, ip: IpAddr) -> Option<&Arc<PodContext>> {
        self.local.get(&ip.to_canonical())
    }
}

/// The shared cell. The two writers (a config generation, a change to the local pods)
/// each replace only their own parts, so neither undoes the other.
#[derive(Default)]
pub struct SnapshotCell(ArcSwap<Snapshot>);

/// The config-derived parts of a snapshot, built together from one generation.
pub struct ConfigParts {
    pub generation: u64,
    pub routes: Arc<RouteTable>,
    pub http: Arc<HttpRoutes>,
    pub workloads: Arc<WorkloadIndex>,
    pub policy: Arc<PolicySet>,
}

impl SnapshotCell {
    pub fn load(&self) -> Arc<Snapshot> {
        self.0.load_full()
    }

    pub fn publish_config(&self, parts: ConfigParts) {
        self.0.rcu(|cur| {
            Arc::new(Snapshot {
                generation: parts.generation,
                routes: parts.routes.clone(),
                http: parts.http.clone(),
                workloads: parts.workloads.clone(),
                policy: parts.policy.clone(),
                local: cur.local.clone(),
            })
        });
    }

    pub fn publish_local(&self, local: LocalPods) {
        let local = Arc::new(local);
        self.0.rcu(|cur| {
            Arc::new(Snapshot {
                local: local.clone(),
                ..Snapshot::clone(cur)
            })
        });
    }
}
