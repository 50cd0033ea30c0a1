//! (ClusterIP, port) -> the ready endpoints of that service port.
use std::{
    net::SocketAddr,
    sync::atomic::{AtomicUsize, Ordering},
};

use crate::{
    bpf::ServiceAddr,
    config::{Config, EndpointSlice, NamespacedName, Protocol, Service, ServicePort, TargetPort},
};

/// One service port as a load-balancing target.
#[derive(Debug)]
pub struct Target {
    pub service: NamespacedName,
    pub port: u16,
    pub endpoints: Vec<SocketAddr>,
    next: AtomicUsize,
}

impl Target {
    /// Round robin over the ready endpoints.
    pub fn pick(&self) -> Option<SocketAddr> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        Some(self.endpoints[i])
    }
}

#[derive(Debug, Default)]
pub struct RouteTable {
    targets: foldhash::HashMap<SocketAddr, std::sync::Arc<Target>>,
}

impl RouteTable {
    pub fn build(config: &Config) -> RouteTable {
        let slices = Slices::of(config);
        let mut targets = foldhash::HashMap::default();
        for svc in &config.services {
            for port in svc.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
                let endpoints = slices.endpoints(svc, port);
                for vip in &svc.cluster_ips {
                    let target = Target {
                        service: svc.id.clone(),
                        port: port.port,
                        endpoints: endpoints.clone(),
                        next: AtomicUsize::new(0),
                    };
                    targets.insert(
                        SocketAddr::new(*vip, port.port),
                        std::sync::Arc::new(target),
                    );
                }
            }
        }
        RouteTable { targets }
    }

    pub fn get(&self, dst: SocketAddr) -> Option<std::sync::Arc<Target>> {
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        self.targets.get(&dst).cloned()
    }

    /// The (ClusterIP, port) pairs the kernel must capture.
    /// Every (ClusterIP, port) with its target, sorted for stable output.
    pub fn targets(&self) -> Vec<(SocketAddr, std::sync::Arc<Target>)> {
        let mut all: Vec<_> = self.targets.iter().map(|(a, t)| (*a, t.clone())).collect();
        all.sort_by(|a, b| (&a.1.service, a.0).cmp(&(&b.1.service, b.0)));
        all
    }

    pub fn service_addrs(&self) -> foldhash::HashSet<ServiceAddr> {
        self.targets.keys().map(|a| ServiceAddr(*a)).collect()
    }
}

/// The EndpointSlices of each Service (`kubernetes.io/service-name`), indexed once per
/// config: looking them up per service port in the whole list made a build quadratic
/// (10,000 Services with a slice each: 100 million comparisons).
pub(crate) struct Slices<'a> {
    by_service: foldhash::HashMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
}

impl<'a> Slices<'a> {
    pub fn of(config: &'a Config) -> Slices<'a> {
        let mut by_service: foldhash::HashMap<(&str, &str), Vec<&EndpointSlice>> =
            foldhash::HashMap::default();
        for slice in &config.endpoint_slices {
            by_service
                .entry((slice.id.namespace.as_str(), slice.service_name.as_str()))
                .or_default()
                .push(slice);
        }
        Slices { by_service }
    }

    /// Ready endpoints of one service port (see [`endpoints_from`]).
    pub fn endpoints(&self, svc: &Service, port: &ServicePort) -> Vec<SocketAddr> {
        let slices = self
            .by_service
            .get(&(svc.id.namespace.as_str(), svc.id.name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        endpoints_from(slices, port)
    }
}

/// Ready endpoints of one service port from its Service's slices, in a stable order.
/// A slice port matches the service port by name (both unnamed counts as a match), as
/// Kubernetes does; a slice without ports falls back to a numeric targetPort.
fn endpoints_from(slices: &[&EndpointSlice], port: &ServicePort) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for slice in slices {
        let backend_port = match slice.ports.iter().find(|p| p.name == port.name) {
            Some(p) if p.protocol == port.protocol => Some(p.port),
            Some(_) => None,
            None if slice.ports.is_empty() => match port.target_port {
                TargetPort::Number(n) => Some(n),
                TargetPort::Name(_) => None,
            },
            None => None,
        };
        let Some(backend_port) = backend_port else {
            continue;
        };
        for ep in slice.endpoints.iter().filter(|e| e.ready) {
            out.push(SocketAddr::new(ep.address, backend_port));
        }
    }
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Endpoint, EndpointSlice, SlicePort};

    fn nn(name: &str) -> NamespacedName {
        NamespacedName {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    fn config() -> Config {
        Config {
            services: vec![std::sync::Arc::new(Service {
                id: nn("web"),
                cluster_ips: vec!["10.96.0.20".parse().unwrap()],
                ports: vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    target_port: TargetPort::Name("http".into()),
                    protocol: Protocol::Tcp,
                    app_protocol: None,
                }],
            })],
            endpoint_slices: vec![std::sync::Arc::new(EndpointSlice {
                id: nn("web-abc"),
                service_name: "web".into(),
                ports: vec![SlicePort {
                    name: Some("http".into()),
                    port: 8080,
                    protocol: Protocol::Tcp,
                }],
                endpoints: vec![
                    Endpoint {
                        address: "10.244.1.5".parse().unwrap(),
                        ready: true,
                        node_name: None,
                    },
                    Endpoint {
                        address: "10.244.2.5".parse().unwrap(),
                        ready: true,
                        node_name: None,
                    },
                    Endpoint {
                        address: "10.244.3.5".parse().unwrap(),
                        ready: false,
                        node_name: None,
                    },
                ],
            })],
            pods: vec![],
            ..Config::default()
        }
    }

    #[test]
    fn resolves_ready_endpoints_by_port_name() {
        let table = RouteTable::build(&config());
        let t = table.get("10.96.0.20:80".parse().unwrap()).unwrap();
        let eps: Vec<String> = t.endpoints.iter().map(|e| e.to_string()).collect();
        assert_eq!(eps, ["10.244.1.5:8080", "10.244.2.5:8080"]);
        assert!(table.get("10.96.0.20:81".parse().unwrap()).is_none());
    }

    #[test]
    fn round_robin_visits_every_endpoint() {
        let table = RouteTable::build(&config());
        let t = table.get("10.96.0.20:80".parse().unwrap()).unwrap();
        let picks: std::collections::HashSet<SocketAddr> = (0..4).map(|_| t.pick().unwrap()).collect();
        assert_eq!(picks.len(), 2);
    }

    #[test]
    fn v4_mapped_lookups_find_ipv4_services() {
        let table = RouteTable::build(&config());
        assert!(
            table
                .get("[::ffff:10.96.0.20]:80".parse().unwrap())
                .is_some()
        );
    }
}
