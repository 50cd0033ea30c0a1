//! Pod IP -> the workload behind it and the identity it must prove: what the outbound
//! side needs to choose between local delivery, the mTLS tunnel and plain passthrough.
use std::{collections::HashMap, net::IpAddr, sync::Arc};

use crate::{
    config::{Config, NamespacedName},
    identity::Identity,
};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadInfo {
    pub id: NamespacedName,
    pub node: Option<String>,
    /// The identity the config says this workload has; a tunnel peer must prove it.
    pub identity: Identity,
    /// In the mesh (not opted out): reached through its node's agent, over mTLS.
    pub meshed: bool,
    /// The metrics name (Deployment or other owner).
    pub workload: String,
}

/// Shared, not copied: a connection's or a request's plan holds the entry of the
/// endpoint it goes to, and cloning one was seven allocations per request.
#[derive(Debug, Default)]
pub struct WorkloadIndex {
    by_ip: HashMap<IpAddr, Arc<WorkloadInfo>>,
}

impl WorkloadIndex {
    pub fn build(config: &Config, trust_domain: &str) -> WorkloadIndex {
        // Every address of a pod names it (dual stack); a finished pod owns none.
        let by_ip = config
            .pods
            .iter()
            .flat_map(|p| {
                let info = Arc::new(WorkloadInfo {
                    id: p.id.clone(),
                    node: p.node_name.clone(),
                    identity: Identity::new(trust_domain, &p.id.namespace, &p.service_account),
                    meshed: p.enroll,
                    workload: p.workload.clone(),
                });
                p.ips
                    .iter()
                    .map(move |ip| (ip.to_canonical(), info.clone()))
            })
            .collect();
        WorkloadIndex { by_ip }
    }

    pub fn get(&self, ip: IpAddr) -> Option<&Arc<WorkloadInfo>> {
        self.by_ip.get(&ip.to_canonical())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&IpAddr, &WorkloadInfo)> {
        self.by_ip.iter().map(|(ip, w)| (ip, &**w))
    }
}

impl WorkloadInfo {
    pub fn workload_ref(&self) -> crate::telemetry::WorkloadRef {
        crate::telemetry::WorkloadRef {
            namespace: self.id.namespace.clone(),
            workload: self.workload.clone(),
            pod: self.id.name.clone(),
        }
    }
}
