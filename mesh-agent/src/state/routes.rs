//! (ClusterIP, port) -> the ready endpoints of that service port.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use crate::{
    bpf::{ServiceAddr, ServiceEntry},
    config::{Config, EndpointSlice, NamespacedName, Protocol, Service, ServicePort, TargetPort},
};

/// One service port as a load-balancing target.
#[derive(Debug)]
pub struct Target {
    pub service: NamespacedName,
    pub port: u16,
    pub endpoints: Vec<SocketAddr>,
    /// With no agent serving a client's node, its connections go straight to an
    /// endpoint (the Service's `mesh.dev/fail-open`, else its namespace's).
    pub fail_open: bool,
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
    /// The endpoints of fail-open service ports, gathered on first use: a pod sending
    /// plaintext over and over must not make the agent scan every Service each time.
    fail_open_endpoints: std::sync::OnceLock<foldhash::HashSet<SocketAddr>>,
}

/// Past this many changed Services a rebuild is cheaper than a patch.
const PATCH_LIMIT: usize = 64;

impl RouteTable {
    pub fn build(config: &Config) -> RouteTable {
        let slices = Slices::of(config);
        let open = FailOpen::of(config);
        let mut targets = foldhash::HashMap::default();
        for svc in &config.services {
            targets.extend(targets_of(svc, slices.of_service(svc), &open));
        }
        RouteTable {
            targets,
            fail_open_endpoints: Default::default(),
        }
    }

    /// Whether `endpoint` serves a fail-open service port (asked for plaintext from a
    /// meshed pod, which is otherwise refused).
    pub fn is_fail_open_endpoint(&self, endpoint: SocketAddr) -> bool {
        self.fail_open_endpoints
            .get_or_init(|| {
                self.targets
                    .values()
                    .filter(|t| t.fail_open)
                    .flat_map(|t| t.endpoints.iter().copied())
                    .collect()
            })
            .contains(&endpoint)
    }

    /// Whether any service port fails open (its endpoints must be in the kernel).
    pub fn any_fail_open(&self) -> bool {
        self.targets.values().any(|t| t.fail_open)
    }

    /// What the kernel must know of each (ClusterIP, port): that it is captured, and
    /// for a fail-open one its endpoints.
    pub fn service_entries(&self) -> foldhash::HashMap<ServiceAddr, ServiceEntry> {
        self.targets
            .iter()
            .map(|(a, t)| {
                let entry = ServiceEntry {
                    fail_open: t.fail_open,
                    backends: if t.fail_open {
                        t.endpoints.clone()
                    } else {
                        Vec::new()
                    },
                };
                (ServiceAddr(*a), entry)
            })
            .collect()
    }

    /// The table for `now`, from `previous` (the table of `before`): only the
    /// Services whose object or slices changed are built again, found by walking
    /// both configs' lists, which must be in key order (as a store builds them), and
    /// comparing allocations. An
    /// endpoint change costs one Service's targets and a copy of the map of
    /// pointers, not ten thousand Services' targets.
    pub fn rebuild(before: &Config, now: &Config, previous: &RouteTable) -> RouteTable {
        let Some(dirty) = changed_services(before, now) else {
            return RouteTable::build(now);
        };
        let open = FailOpen::of(now);
        let mut targets = previous.targets.clone();
        for (ns, name) in &dirty {
            let id = |s: &&Arc<Service>| s.id.namespace == *ns && s.id.name == *name;
            if let Some(old) = before.services.iter().find(id) {
                for port in &old.ports {
                    for vip in &old.cluster_ips {
                        targets.remove(&SocketAddr::new(*vip, port.port));
                    }
                }
            }
            if let Some(svc) = now.services.iter().find(id) {
                let slices: Vec<Arc<EndpointSlice>> = now
                    .endpoint_slices
                    .iter()
                    .filter(|s| s.id.namespace == *ns && s.service_name == *name)
                    .cloned()
                    .collect();
                targets.extend(targets_of(svc, &slices, &open));
            }
        }
        RouteTable {
            targets,
            fail_open_endpoints: Default::default(),
        }
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
}

/// The (namespace, name) of every Service whose object or EndpointSlices differ
/// between the two configs, or `None` when more than [`PATCH_LIMIT`] do.
fn changed_services<'a>(before: &'a Config, now: &'a Config) -> Option<Vec<(&'a str, &'a str)>> {
    // The walk needs both lists in key order, as the store builds every published
    // config (checking it here cost more than the rest of a change; the debug builds
    // the tests run check it).
    debug_assert!(
        [before, now].iter().all(|c| {
            c.services.is_sorted_by(|a, b| a.id <= b.id)
                && c.endpoint_slices.is_sorted_by(|a, b| a.id <= b.id)
        }),
        "configs not in key order"
    );
    let mut dirty = Vec::new();
    for (a, b) in changed(&before.services, &now.services, |s| {
        (&s.id.namespace, &s.id.name)
    }) {
        let s = a.or(b)?;
        dirty.push((s.id.namespace.as_str(), s.id.name.as_str()));
        if dirty.len() > PATCH_LIMIT {
            return None;
        }
    }
    let slices = changed(&before.endpoint_slices, &now.endpoint_slices, |s| {
        (&s.id.namespace, &s.id.name)
    });
    for (a, b) in slices {
        for s in [a, b].into_iter().flatten() {
            dirty.push((s.id.namespace.as_str(), s.service_name.as_str()));
        }
        if dirty.len() > PATCH_LIMIT {
            return None;
        }
    }
    dirty.sort_unstable();
    dirty.dedup();
    Some(dirty)
}

/// The entries that differ between two lists sorted by `key`: (old, new), either
/// side absent for an entry added or removed. Equal allocations are skipped without
/// a key comparison.
fn changed<'a, T, K: Ord>(
    old: &'a [Arc<T>],
    new: &'a [Arc<T>],
    key: impl Fn(&'a T) -> K,
) -> Vec<(Option<&'a T>, Option<&'a T>)> {
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    while i < old.len() || j < new.len() {
        match (old.get(i), new.get(j)) {
            (Some(a), Some(b)) if Arc::ptr_eq(a, b) => {
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) => match key(a).cmp(&key(b)) {
                std::cmp::Ordering::Equal => {
                    out.push((Some(&**a), Some(&**b)));
                    i += 1;
                    j += 1;
                }
                std::cmp::Ordering::Less => {
                    out.push((Some(&**a), None));
                    i += 1;
                }
                std::cmp::Ordering::Greater => {
                    out.push((None, Some(&**b)));
                    j += 1;
                }
            },
            (Some(a), None) => {
                out.push((Some(&**a), None));
                i += 1;
            }
            (None, Some(b)) => {
                out.push((None, Some(&**b)));
                j += 1;
            }
            (None, None) => break,
        }
    }
    out
}

/// Every (ClusterIP, port) target of one Service.
/// The namespaces that say `mesh.dev/fail-open` (few; read once per build).
struct FailOpen<'a> {
    namespaces: foldhash::HashMap<&'a str, bool>,
}

impl<'a> FailOpen<'a> {
    fn of(config: &'a Config) -> FailOpen<'a> {
        FailOpen {
            namespaces: config
                .namespaces
                .iter()
                .filter_map(|n| n.fail_open.map(|f| (n.name.as_str(), f)))
                .collect(),
        }
    }

    /// The Service's own word, else its namespace's, else closed.
    fn service(&self, svc: &Service) -> bool {
        svc.fail_open.unwrap_or_else(|| {
            self.namespaces
                .get(svc.id.namespace.as_str())
                .copied()
                .unwrap_or(false)
        })
    }
}

fn targets_of(
    svc: &Service,
    slices: &[Arc<EndpointSlice>],
    open: &FailOpen<'_>,
) -> Vec<(SocketAddr, Arc<Target>)> {
    let mut out = Vec::new();
    let fail_open = open.service(svc);
    for port in svc.ports.iter().filter(|p| p.protocol == Protocol::Tcp) {
        let endpoints = endpoints_from(slices, port);
        for vip in &svc.cluster_ips {
            let target = Target {
                service: svc.id.clone(),
                port: port.port,
                endpoints: endpoints.clone(),
                fail_open,
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
                fail_open: None,
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
    fn a_service_fails_open_by_its_own_word_else_its_namespaces_and_only_then_has_backends() {
        use crate::config::Namespace;
        let ns = |fail_open| {
            Arc::new(Namespace {
                name: "default".into(),
                dataplane: Default::default(),
                fail_open,
            })
        };
        let with = |svc: Option<bool>, namespace: Option<bool>| {
            let mut c = config();
            let mut s = (*c.services[0]).clone();
            s.fail_open = svc;
            c.services[0] = Arc::new(s);
            c.namespaces = vec![ns(namespace)];
            RouteTable::build(&c)
        };
        let addr = SocketAddr::from(([10, 96, 0, 20], 80));
        let entry = |t: &RouteTable| t.service_entries()[&ServiceAddr(addr)].clone();
        assert!(!entry(&with(None, None)).fail_open);
        assert!(entry(&with(None, None)).backends.is_empty());
        let open = with(None, Some(true));
        assert!(entry(&open).fail_open);
        assert_eq!(entry(&open).backends, open.get(addr).unwrap().endpoints);
        assert!(open.is_fail_open_endpoint(entry(&open).backends[0]));
        assert!(!entry(&with(Some(false), Some(true))).fail_open);
        assert!(entry(&with(Some(true), Some(false))).fail_open);
        assert!(!with(None, None).is_fail_open_endpoint(entry(&open).backends[0]));
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
        first.services.insert(0, Arc::new(api));
        let before = RouteTable::build(&first);
        let web: SocketAddr = "10.96.0.20:80".parse().unwrap();
        let api: SocketAddr = "10.96.0.21:80".parse().unwrap();

        // web's slice changes (one endpoint fewer); api is the same allocation.
        let mut second = first.clone();
        let mut slice = (*second.endpoint_slices[0]).clone();
        slice.endpoints.remove(0);
        second.endpoint_slices[0] = Arc::new(slice);
        let after = RouteTable::rebuild(&first, &second, &before);
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
        third.services.remove(0);
        let gone = RouteTable::rebuild(&second, &third, &after);
        assert!(gone.get(api).is_none());
        let mut fourth = second.clone();
        fourth.services[0] = Arc::new((*fourth.services[0]).clone());
        let anew = RouteTable::rebuild(&second, &fourth, &after);
        assert!(!Arc::ptr_eq(
            &after.get(api).unwrap(),
            &anew.get(api).unwrap()
        ));
    }
}
