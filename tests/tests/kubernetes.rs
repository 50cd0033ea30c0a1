//! The agent on the Kubernetes API: the same objects as the directory, from a
//! list-then-watch of a real HTTPS API server (the fake in `mesh_tests::fakeapi`),
//! followed as they change, with the failure modes a real cluster has: CRDs that are
//! not installed, a bad object beside good ones, and a watch that comes back after
//! the server compacted its history (410 Gone).
mod common;

use std::{net::SocketAddr, time::Duration};

use common::*;
use mesh_tests::{cluster::CA_IP, fakeapi::FakeApi};

const API_PORT: u16 = 6443;

fn namespace(name: &str, label: Option<&str>) -> String {
    let labels = label
        .map(|l| format!("\n  labels: {{mesh.dev/dataplane-mode: {l}}}"))
        .unwrap_or_default();
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n---\n")
}

fn start_api(c: &Cluster) -> FakeApi {
    let netns = std::path::PathBuf::from("/run/netns").join(c.fabric_netns());
    FakeApi::start(
        &netns,
        SocketAddr::from((CA_IP, API_PORT)),
        &c.work_dir.join("api"),
    )
    .expect("starting the fake API server")
}

#[test]
fn the_agent_follows_the_kubernetes_api_through_bad_objects_absent_crds_and_a_410() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    let client = c.add_pod("node-1", "client").unwrap();
    let server = c.add_pod("node-2", "server").unwrap();
    serve(&mut c, &server);
    let api = start_api(&c);
    // No Gateway API CRDs in this cluster: the agent must not wait for them.
    api.serve_kind("gateway.networking.k8s.io/v1", "HTTPRoute", false);
    api.serve_kind("gateway.networking.k8s.io/v1", "GRPCRoute", false);
    let pods = c.pod_yaml(&client, true) + &c.pod_yaml(&server, true);
    // The CA still reads the directory for which identities run on which node.
    c.write_config("pods.yaml", &pods).unwrap();
    api.apply(
        &(namespace("default", Some("enabled"))
            + &pods
            + &yaml::service("web", vip(10), 80, PORT)
            + &yaml::endpoint_slice("web", PORT, &[server.ip])),
    )
    .unwrap();
    c.kubeconfig = Some(api.kubeconfig().to_owned());
    c.start_agent("node-1").unwrap();
    c.start_agent("node-2").unwrap();
    let log = c.agent_log("node-1");
    assert!(
        log.contains("source=Kubernetes") && log.contains("every kind listed"),
        "{log}"
    );
    assert!(
        log.contains("does not serve this kind") && log.contains("HTTPRoute"),
        "the absent CRD was not reported"
    );
    let web = sa(vip(10), 80);
    assert_eq!(who_answers(&mut c, &client, &web), "server");

    // A new Service is picked up from the watch; a bad one beside it is refused alone.
    api.apply(
        &(yaml::service("api", vip(11), 80, PORT)
            + &yaml::endpoint_slice("api", PORT, &[server.ip])
            + &yaml::service("broken", vip(12), 0, PORT)),
    )
    .unwrap();
    let api_addr = sa(vip(11), 80);
    poll("the new Service to be served", SECS, || {
        who_answers(&mut c, &client, &api_addr) == "server"
    });
    poll("the bad Service to be reported", SECS, || {
        let log = c.agent_log("node-1");
        log.contains("object rejected") && log.contains("Service default/broken")
    });
    assert_eq!(who_answers(&mut c, &client, &web), "server");

    // The API server goes away; while it is down `api` is deleted and the history
    // compacted. The watch comes back from a resourceVersion that is gone (410), so
    // the agent must re-list and notice the deletion it never saw as an event.
    let before = api.requests();
    api.refuse_watches(true);
    api.drop_watches();
    api.delete("v1", "Service", "default", "api").unwrap();
    api.compact();
    api.refuse_watches(false);
    poll("the Service deleted in the gap to be gone", SECS, || {
        who_answers(&mut c, &client, &api_addr).is_empty()
    });
    let after = api.requests();
    assert!(
        after.gone > before.gone,
        "no watch was answered 410: {after:?}"
    );
    let services = "api/v1/services";
    assert!(
        after.lists.get(services) > before.lists.get(services),
        "Services were not re-listed: {after:?}"
    );
    assert_eq!(who_answers(&mut c, &client, &web), "server");
    assert_eq!(after.unauthorized, 0, "{after:?}");
    // One re-list per kind, then watching again: no re-list storm.
    std::thread::sleep(Duration::from_secs(2));
    let settled = api.requests();
    std::thread::sleep(Duration::from_secs(2));
    let later = api.requests();
    assert_eq!(
        (later.gone, later.lists.values().sum::<u64>()),
        (settled.gone, settled.lists.values().sum::<u64>()),
        "still re-listing: {later:?}"
    );
    let log = c.agent_log("node-1");
    assert!(log.contains("re-listing"), "the 410 was not logged as such");
    drop(c);
}
