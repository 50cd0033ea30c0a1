//! What a pod's connections do while no agent serves its node, by policy: a Service
//! (or a namespace) marked `mesh.dev/fail-open: "true"` is reached directly, the
//! kernel picking one of its ready endpoints; every other Service stays closed, as
//! STRICT pods always do.
mod common;

use std::time::{Duration, Instant};

use common::*;

fn fail_open_service(name: &str, vip: std::net::IpAddr, port: u16) -> String {
    yaml::service(name, vip, port, PORT).replace(
        &format!("metadata: {{name: {name}, namespace: default}}"),
        &format!(
            "metadata: {{name: {name}, namespace: default, annotations: {{mesh.dev/fail-open: \"true\"}}}}"
        ),
    )
}

#[test]
fn a_fail_open_service_is_reached_with_the_agent_down_and_a_fail_closed_one_is_not() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    let client = c.add_pod("node-1", "client").unwrap();
    let server = c.add_pod("node-2", "server").unwrap();
    serve(&mut c, &server);
    let open = fail_open_service("open", vip(80), 80);
    assert!(open.contains("mesh.dev/fail-open"), "{open}");
    let config = c.pod_yaml(&client, true)
        + &c.pod_yaml(&server, true)
        + &open
        + &yaml::endpoint_slice("open", PORT, &[server.ip])
        + &yaml::service("closed", vip(81), 81, PORT)
        + &yaml::endpoint_slice("closed", PORT, &[server.ip])
        + &yaml::peer_authentication("PERMISSIVE");
    c.write_config("cluster.yaml", &config).unwrap();
    c.start_agent("node-1").unwrap();
    c.start_agent("node-2").unwrap();
    // With the agent up both go through the mesh.
    assert_eq!(who_answers(&mut c, &client, &sa(vip(80), 80)), "server");
    assert_eq!(who_answers(&mut c, &client, &sa(vip(81), 81)), "server");
    let before = kernel_counters(&c, "node-1");

    // The client's agent dies: its heartbeat stops.
    c.crash_agent("node-1").unwrap();
    let down = Instant::now();
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        who_answers(&mut c, &client, &sa(vip(80), 80)),
        "server",
        "the fail-open service must be reachable with the agent down"
    );
    assert_eq!(
        who_answers(&mut c, &client, &sa(vip(81), 81)),
        "",
        "the fail-closed service must not be reachable with the agent down"
    );
    // Nor is a pod IP: only Services marked fail-open are opened.
    assert_eq!(who_answers(&mut c, &client, &sa(server.ip, PORT)), "");
    println!("fail-open served {:?} after the agent died", down.elapsed());

    // Back up: both through the mesh again, and the kernel counted what it opened.
    let dir = c.config_dir.clone();
    c.start_agent_with("node-1", &dir).unwrap();
    assert_eq!(who_answers(&mut c, &client, &sa(vip(80), 80)), "server");
    assert_eq!(who_answers(&mut c, &client, &sa(vip(81), 81)), "server");
    let after = kernel_counters(&c, "node-1");
    assert!(
        after["fail_open"] > before.get("fail_open").copied().unwrap_or(0),
        "{after:?}"
    );
    assert!(after["agent_down_refused"] >= 2, "{after:?}");
}
