//! The routing decision without a kernel: a snapshot built from YAML, a source pod
//! whose namespace thread is this process's own network namespace.
use std::{collections::HashMap, sync::Arc};

use arc_swap::{ArcSwap, ArcSwapOption};

use super::*;
use crate::{
    authz::{PolicySet, Workload},
    config::{Config, load_text},
    inpod::Netns,
    proxy::{PodMeta, snapshot::LocalPods},
    state::{DEFAULT_SERVER_FIRST_PORTS, HttpRoutes, RouteTable, WorkloadIndex},
};

const YAML: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{name: http, port: 80, targetPort: 8080}, {name: raw, port: 9000}]}
---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: shop}
spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-1, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}, {name: raw, port: 9000}]
endpoints: [{addresses: [10.244.2.5]}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop}
spec: {nodeName: node-2, serviceAccountName: web}
status: {podIP: 10.244.2.5}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop}
spec: {nodeName: node-1}
status: {podIP: 10.244.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: outside, namespace: shop, annotations: {mesh.dev/enroll: "false"}}
spec: {nodeName: node-2}
status: {podIP: 10.244.2.9}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules: [{backendRefs: [{name: web, port: 80}]}]
"#;

fn pod(name: &str, ip: &str) -> Arc<PodContext> {
    let ip: std::net::IpAddr = ip.parse().unwrap();
    let id = NamespacedName {
        namespace: "shop".into(),
        name: name.into(),
    };
    Arc::new(PodContext {
        meta: ArcSwap::from_pointee(PodMeta {
            workload: Workload {
                id: id.clone(),
                labels: Default::default(),
            },
            workload_name: name.into(),
        }),
        id,
        ip: Some(ip),
        ips: vec![ip],
        identity: Identity::new("cluster.local", "shop", "default"),
        netns: Netns::enter("/proc/self/ns/net".as_ref()).unwrap(),
        netns_cookie: 1,
        tls_server: ArcSwapOption::empty(),
        tunnel_peers: crate::limits::ConnLimits::new("test", 8, 8),
    })
}

fn snapshot(local: &[Arc<PodContext>]) -> Snapshot {
    let mut config = Config::default();
    load_text("c.yaml".as_ref(), YAML, &mut config, &mut HashMap::new()).unwrap();
    let mut pods = LocalPods::new();
    for p in local {
        pods.insert(p.ip.unwrap(), p.clone());
    }
    Snapshot {
        generation: 1,
        routes: Arc::new(RouteTable::build(&config)),
        http: Arc::new(HttpRoutes::build(&config, DEFAULT_SERVER_FIRST_PORTS)),
        workloads: Arc::new(WorkloadIndex::build(&config, "cluster.local")),
        policy: PolicySet::build(&config, "istio-system"),
        local: Arc::new(pods),
    }
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

#[test]
fn a_routed_port_is_http_and_another_port_of_the_service_is_l4() {
    let client = pod("client", "10.244.1.5");
    let snap = snapshot(std::slice::from_ref(&client));
    match plan(&snap, &client, addr("10.96.0.10:80")).unwrap() {
        Plan::Http(h) => {
            assert_eq!(h.service.name, "web");
            assert_eq!(h.port, 80);
            let fallback = h.fallback.unwrap();
            assert_eq!(fallback.endpoint, addr("10.244.2.5:8080"));
            assert!(matches!(fallback.way, Way::Hbone(_)));
        }
        other => panic!("{other:?}"),
    }
    match plan(&snap, &client, addr("10.96.0.10:9000")).unwrap() {
        Plan::Tcp(t) => {
            assert_eq!(t.service.unwrap().1, 9000);
            assert_eq!(t.hop.endpoint, addr("10.244.2.5:9000"));
            match t.hop.way {
                Way::Hbone(id) => {
                    assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web")
                }
                other => panic!("{other:?}"),
            }
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn pod_ips_are_their_own_endpoint_without_routes_and_strangers_pass_through() {
    let client = pod("client", "10.244.1.5");
    let snap = snapshot(std::slice::from_ref(&client));
    // The meshed pod's IP: its identity, no service, no routes (GAMMA frontend rule).
    match plan(&snap, &client, addr("10.244.2.5:8080")).unwrap() {
        Plan::Tcp(t) => {
            assert!(t.service.is_none());
            assert!(matches!(t.hop.way, Way::Hbone(_)));
        }
        other => panic!("{other:?}"),
    }
    for outside in ["10.244.2.9:80", "192.0.2.1:443"] {
        match plan(&snap, &client, addr(outside)).unwrap() {
            Plan::Tcp(t) => assert!(matches!(t.hop.way, Way::Passthrough), "{outside}"),
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn a_local_pod_is_delivered_here_and_a_service_without_endpoints_is_refused() {
    let client = pod("client", "10.244.1.5");
    let server = pod("web-1", "10.244.2.5");
    let snap = snapshot(&[client.clone(), server]);
    match plan(&snap, &client, addr("10.96.0.10:9000")).unwrap() {
        Plan::Tcp(t) => match t.hop.way {
            Way::Local(p) => assert_eq!(p.id.name, "web-1"),
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    match plan(&snap, &client, addr("10.96.0.11:80")) {
        Err(OutboundError::NoEndpoints { service, port }) => {
            assert_eq!((service.name.as_str(), port), ("empty", 80));
        }
        other => panic!("{other:?}"),
    }
    // The v4-mapped form of a ClusterIP is the same frontend.
    assert!(matches!(
        plan(&snap, &client, addr("[::ffff:10.96.0.10]:80")).unwrap(),
        Plan::Http(_)
    ));
}
