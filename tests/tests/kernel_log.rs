//! The kernel programs' own log (aya-log): off by default, switched on and off at run
//! time with `meshctl log-level set --kernel`, each decision in the agent's log with
//! the pod it concerns.
mod common;

use common::*;

/// The agent's lines that came from the kernel log.
fn kernel_lines(c: &Cluster) -> Vec<String> {
    c.agent_log("node-1")
        .lines()
        .filter(|l| l.contains("kernel: "))
        .map(str::to_owned)
        .collect()
}

#[test]
fn kernel_debug_logging_is_switched_at_run_time_and_names_the_pod() {
    let _g = serial();
    let mut c = cluster(&["node-1"]);
    let client = c.add_pod("node-1", "client").unwrap();
    let server = c.add_pod("node-1", "server").unwrap();
    let outsider = c.add_pod("node-1", "outsider").unwrap();
    serve(&mut c, &server);
    let config = c.pod_yaml(&client, true)
        + &c.pod_yaml(&server, true)
        + &c.pod_yaml(&outsider, false)
        + &yaml::service("web", vip(80), 80, PORT)
        + &yaml::endpoint_slice("web", PORT, &[server.ip])
        + &yaml::peer_authentication("STRICT");
    c.write_config("cluster.yaml", &config).unwrap();
    c.start_agent("node-1").unwrap();
    let level = |c: &Cluster| c.meshctl_json("node-1", &["log-level", "get"]).unwrap();
    assert_eq!(level(&c)["kernel"], "off");

    // Off: traffic and refusals leave no kernel line.
    assert_eq!(who_answers(&mut c, &client, &sa(vip(80), 80)), "server");
    assert_eq!(who_answers(&mut c, &outsider, &sa(server.ip, PORT)), "");
    assert!(kernel_lines(&c).is_empty(), "{:?}", kernel_lines(&c));

    // On: the redirect of the client's connection and the refusal of the outsider's
    // plaintext, each with its pod.
    let on = c
        .meshctl_json("node-1", &["log-level", "set", "--kernel", "debug"])
        .unwrap();
    assert_eq!(on["kernel"], "debug", "{on}");
    assert_eq!(who_answers(&mut c, &client, &sa(vip(80), 80)), "server");
    assert_eq!(who_answers(&mut c, &outsider, &sa(server.ip, PORT)), "");
    let mut lines = Vec::new();
    poll("the kernel's lines", SECS, || {
        lines = kernel_lines(&c);
        lines.iter().any(|l| l.contains("kernel: refuse"))
    });
    let redirect = lines
        .iter()
        .find(|l| l.contains("kernel: redirect") && l.contains("port=80"))
        .unwrap_or_else(|| panic!("no redirect line: {lines:#?}"));
    assert!(redirect.contains("pod=default/client"), "{redirect}");
    assert!(redirect.contains(&vip(80).to_string()), "{redirect}");
    let refuse = lines
        .iter()
        .find(|l| l.contains("kernel: refuse") && l.contains("reason=strict"))
        .unwrap_or_else(|| panic!("no refusal line: {lines:#?}"));
    assert!(refuse.contains("pod=default/server"), "{refuse}");
    assert!(refuse.contains(&outsider.ip.to_string()), "{refuse}");
    // An invalid level changes nothing.
    let bad = c
        .meshctl("node-1", &["log-level", "set", "--kernel", "loud"])
        .unwrap();
    assert!(!bad.status.success());
    assert_eq!(level(&c)["kernel"], "debug");

    // Off again: nothing more.
    let off = c
        .meshctl_json("node-1", &["log-level", "set", "--kernel", "off"])
        .unwrap();
    assert_eq!(off["kernel"], "off", "{off}");
    let before = kernel_lines(&c).len();
    assert_eq!(who_answers(&mut c, &client, &sa(vip(80), 80)), "server");
    assert_eq!(who_answers(&mut c, &outsider, &sa(server.ip, PORT)), "");
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(kernel_lines(&c).len(), before, "{:?}", kernel_lines(&c));
    // The userspace filter was left as it was.
    assert_eq!(level(&c)["filter"], "info");
}
