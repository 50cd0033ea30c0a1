//! The agent on the Kubernetes API: the same objects as the directory, from a
//! list-then-watch of a real HTTPS API server (the fake in `mesh_tests::fakeapi`),
//! followed as they change, with the failure modes a real cluster has: CRDs that are
//! not installed, a bad object beside good ones, and a watch that comes back after
//! the server compacted its history (410 Gone).
mod common;

use std::time::Duration;

use common::*;

#[test]
fn the_agent_follows_the_kubernetes_api_through_bad_objects_absent_crds_and_a_410() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    let client = c.add_pod("node-1", "client").unwrap();
    let server = c.add_pod("node-2", "server").unwrap();
    serve(&mut c, &server);
    c.use_kubernetes_api().unwrap();
    let api = || c.api().expect("the fake API server");
    // No Gateway API CRDs in this cluster: the agent must not wait for them.
    api().serve_kind("gateway.networking.k8s.io/v1", "HTTPRoute", false);
    api().serve_kind("gateway.networking.k8s.io/v1", "GRPCRoute", false);
    // Written to the directory (which the CA reads) and mirrored to the API server.
    c.write_config(
        "cluster.yaml",
        &(c.pod_yaml(&client, true)
            + &c.pod_yaml(&server, true)
            + &yaml::service("web", vip(10), 80, PORT)
            + &yaml::endpoint_slice("web", PORT, &[server.ip])),
    )
    .unwrap();
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
    c.write_config(
        "more.yaml",
        &(yaml::service("api", vip(11), 80, PORT)
            + &yaml::endpoint_slice("api", PORT, &[server.ip])),
    )
    .unwrap();
    c.api()
        .unwrap()
        .apply(&yaml::service("broken", vip(12), 0, PORT))
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
    let api = || c.api().expect("the fake API server");
    let before = api().requests();
    api().refuse_watches(true);
    api().drop_watches();
    api().delete("v1", "Service", "default", "api").unwrap();
    api().compact();
    api().refuse_watches(false);
    poll("the Service deleted in the gap to be gone", SECS, || {
        who_answers(&mut c, &client, &api_addr).is_empty()
    });
    let after = c.api().unwrap().requests();
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
    let settled = c.api().unwrap().requests();
    std::thread::sleep(Duration::from_secs(2));
    let later = c.api().unwrap().requests();
    assert_eq!(
        (later.gone, later.lists.values().sum::<u64>()),
        (settled.gone, settled.lists.values().sum::<u64>()),
        "still re-listing: {later:?}"
    );
    let log = c.agent_log("node-1");
    assert!(log.contains("re-listing"), "the 410 was not logged as such");
}
