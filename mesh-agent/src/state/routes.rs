//! (ClusterIP, port) -> the ready endpoints of that service port.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
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
    targets: foldhash::HashMap<SocketAddr, Arc<Target>>,
    /// What each Service's targets were built from, so the next build can keep them.
    built: foldhash::HashMap<NamespacedName, Built>,
}

/// One Service's targets and the objects they came from (allocations shared with the
/// config, compared by pointer).
#[derive(Debug)]
struct Built {
    service: Arc<Service>,
    slices: Vec<Arc<EndpointSlice>>,
    targets: Vec<(SocketAddr, Arc<Target>)>,
}

impl RouteTable {
    pub fn build(config: &Config) -> RouteTable {
        RouteTable::rebuild(config, &RouteTable::default())
    }

    /// The table for `config`, keeping `previous`'s targets of every Service whose
    /// object and slices are the allocations they were built from: an endpoint change
    /// rebuilds one Service's targets, not ten thousand.
    pub fn rebuild(config: &Config, previous: &RouteTable) -> RouteTable {
        let slices = Slices::of(config);
        let mut targets = foldhash::HashMap::default();
        let mut built = foldhash::HashMap::default();
        for svc in &config.services {
            let own = slices.of_service(svc);
            let kept = previous.built.get(&svc.id).filter(|b| {
                Arc::ptr_eq(&b.service, svc)
                    && b.slices.len() == own.len()
                    && b.slices.iter().zip(own).all(|(x, y)| Arc::ptr_eq(x, y))
            });
            let these = match kept {
                Some(b) => b.targets.clone(),
                None => targets_of(svc, own),
            };
            targets.extend(these.iter().cloned());
            built.insert(
                svc.id.clone(),
                Built {
                    service: svc.clone(),
                    slices: own.to_vec(),
                    targets: these,
                },
            );
        }
        RouteTable { targets, built }
    }

    pub fn get(&self, dst: SocketAddr) -> Option<Arc<Target>> {
        let dst = SocketAddr::new(dst.ip().to_canonical(), dst.port());
        self.targets.get(&dst).cloned()
    }

    /// The (ClusterIP, port) pairs the kernel must capture.
    /// Every (ClusterIP, port) with its target, sorted for stable output.
    pub fn targets(&self) -> Vec<(SocketAddr, Arc<Target>)> {
        let mut all: Vec<_> = self.targets.iter().map(|(a, t)| (*a, t.clone())).collect();
        all.sort_by(|a, b| (&a.1.service, a.0).cmp(&(&b.1.service, b.0)));
        all
    }

    pub fn service_addrs(&self) -> foldhash::HashSet<ServiceAddr> {
        self.targets.keys().map(|a| ServiceAddr(*a)).collect()
    }
}

/// Every (ClusterIP, port) target of one Service.
fn targets_of(svc: &Service, slices: &[Arc<EndpointSlice>]) -> Vec<(SocketAddr, Arc<Target>)> {
    let mut out = Vec::new();
    for port in svc.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
        let endpoints = endpoints_from(slices, port);
        for vip in &svc.cluster_ips {
            let target = Target {
                service: svc.id.clone(),
                port: port.port,
                endpoints: endpoints.clone(),
                next: AtomicUsize::new(0),
            };
            out.push((SocketAddr::new(*vip, port.port), Arc::new(target)));
        }
    }
    out
}

/// The EndpointSlices of each Service (`kubernetes.io/service-name`), indexed once per
/// config: looking them up per service port in the whole list made a build quadratic
/// (10,000 Services with a slice each: 100 million comparisons).
pub(crate) struct Slices<'a> {
    by_service: foldhash::HashMap<(&'a str, &'a str), Vec<Arc<EndpointSlice>>>,
}

impl<'a> Slices<'a> {
    pub fn of(config: &'a Config) -> Slices<'a> {
        let mut by_service: foldhash::HashMap<(&str, &str), Vec<Arc<EndpointSlice>>> =
            foldhash::HashMap::default();
        for slice in &config.endpoint_slices {
            by_service
                .entry((slice.id.namespace.as_str(), slice.service_name.as_str()))
                .or_default()
                .push(slice.clone());
        }
        Slices { by_service }
    }

    /// The slices of one Service, in config order.
    pub fn of_service<'s>(&'s self, svc: &'s Service) -> &'s [Arc<EndpointSlice>] {
        self.by_service
            .get(&(svc.id.namespace.as_str(), svc.id.name.as_str()))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Ready endpoints of one service port (see [`endpoints_from`]).
    pub fn endpoints(&self, svc: &Service, port: &ServicePort) -> Vec<SocketAddr> {
        endpoints_from(self.of_service(svc), port)
    }
}

/// Ready endpoints of one service port from its Service's slices, in a stable order.
/// A slice port matches the service port by name (both unnamed counts as a match), as
/// Kubernetes does; a slice without ports falls back to a numeric targetPort.
fn endpoints_from(slices: &[Arc<EndpointSlice>], port: &ServicePort) -> Vec<SocketAddr> {
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
        let picks: std::collections::HashSet<SocketAddr> =
            (0..4).map(|_| t.pick().unwrap()).collect();
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

    #[test]
    fn a_rebuild_keeps_the_targets_of_services_whose_objects_did_not_change() {
        let mut first = config();
        let mut api = (*first.services[0]).clone();
        api.id = nn("api");
        api.cluster_ips = vec!["10.96.0.21".parse().unwrap()];
        first.services.push(Arc::new(api));
        let before = RouteTable::build(&first);
        let web: SocketAddr = "10.96.0.20:80".parse().unwrap();
        let api: SocketAddr = "10.96.0.21:80".parse().unwrap();

        // web's slice changes (one endpoint fewer); api is the same allocation.
        let mut second = first.clone();
        let mut slice = (*second.endpoint_slices[0]).clone();
        slice.endpoints.remove(0);
        second.endpoint_slices[0] = Arc::new(slice);
        let after = RouteTable::rebuild(&second, &before);
        assert!(Arc::ptr_eq(
            &before.get(api).unwrap(),
            &after.get(api).unwrap()
        ));
        assert!(!Arc::ptr_eq(
            &before.get(web).unwrap(),
            &after.get(web).unwrap()
        ));
        let eps: Vec<String> = after
            .get(web)
            .unwrap()
            .endpoints
            .iter()
            .map(|e| e.to_string())
            .collect();
        assert_eq!(eps, ["10.244.2.5:8080"]);
        // The same as a build from nothing, whatever was kept.
        let fresh = RouteTable::build(&second);
        assert_eq!(fresh.targets().len(), after.targets().len());
        for (addr, t) in fresh.targets() {
            assert_eq!(after.get(addr).unwrap().endpoints, t.endpoints, "{addr}");
        }
        // A Service removed is gone; a new Service object is built anew.
        let mut third = second.clone();
        third.services.remove(1);
        let gone = RouteTable::rebuild(&third, &after);
        assert!(gone.get(api).is_none());
        let mut fourth = second.clone();
        fourth.services[1] = Arc::new((*fourth.services[1]).clone());
        let anew = RouteTable::rebuild(&fourth, &after);
        assert!(!Arc::ptr_eq(
            &after.get(api).unwrap(),
            &anew.get(api).unwrap()
        ));
    }
}
