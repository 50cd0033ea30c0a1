//! The CNI plugin (`mesh-cni`) against a running agent, run exactly as a container
//! runtime runs it: `CNI_*` in the environment, the network config with the chain's
//! `prevResult` on stdin, the result or a CNI error on stdout.
mod common;

use std::{
    io::Write as _,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use common::*;

/// How long the agent waits for a pod it does not know yet (`--cni-timeout`). With the
/// Kubernetes source a new pod reaches the agent through the API's watch, which on a
/// loaded two-core machine has taken over 2 s: the wait leaves room for that.
const AGENT_WAIT: Duration = Duration::from_secs(6);
/// The plugin's own read timeout, longer than the agent's wait as the chart sets them
/// (30 s against 20 s), so the agent's answer, success or "does not know the pod",
/// always arrives before the plugin gives up on the socket.
const PLUGIN_TIMEOUT_SECS: u64 = 12;

/// The plugin binary beside the agent's.
fn cni_bin() -> std::path::PathBuf {
    agent_bin().with_file_name("mesh-cni")
}

struct Run {
    ok: bool,
    out: serde_json::Value,
    took: Duration,
}

/// Runs the plugin for a sandbox of pod `name` whose netns is `netns` and whose IP the
/// chain gave as `ip`.
fn plugin(command: &str, socket: &str, name: &str, netns: &str, ip: std::net::IpAddr) -> Run {
    let conf = serde_json::json!({
        "cniVersion": "1.0.0", "name": "pods", "type": "mesh-cni",
        "agent_socket": socket, "timeout_seconds": PLUGIN_TIMEOUT_SECS,
        "prevResult": {
            "cniVersion": "1.0.0",
            "interfaces": [{"name": "eth0", "sandbox": netns}],
            "ips": [{"address": format!("{ip}/24"), "interface": 0}]
        }
    });
    let start = Instant::now();
    let mut child = Command::new(cni_bin())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", format!("sandbox-{name}"))
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", "/opt/cni/bin")
        .env(
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME={name};K8S_POD_INFRA_CONTAINER_ID=sandbox-{name}"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("running mesh-cni");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    Run {
        ok: out.status.success(),
        out: serde_json::from_str(text.trim()).unwrap_or(serde_json::Value::Null),
        took: start.elapsed(),
    }
}

/// The plugin for `pod`'s own sandbox: its netns, its IP.
fn for_pod(command: &str, socket: &str, pod: &Pod) -> Run {
    plugin(
        command,
        socket,
        &pod.name,
        &pod.netns_path.display().to_string(),
        pod.ip,
    )
}

/// A Pod the CNI places: no netns annotation, no UID.
fn placed_by_cni(pod: &Pod) -> String {
    yaml::pod_unplaced(&pod.name, &pod.node, pod.ip, None)
}

#[test]
fn add_answers_only_once_the_pod_is_enrolled_and_fails_closed() {
    let _g = serial();
    let mut c = cluster(&["node-1"]);
    let app = c.add_pod("node-1", "app").unwrap();
    let outside = c.add_pod("node-1", "outside").unwrap();
    let liar = c.add_pod("node-1", "liar").unwrap();
    let ghost = c.add_pod("node-1", "ghost").unwrap();
    let d = decoy(&mut c, "node-1");
    let cfg = placed_by_cni(&app)
        + &yaml::with_dataplane_mode(&placed_by_cni(&outside), "outside", "none")
        + &placed_by_cni(&liar)
        + &d.yaml;
    c.write_config("cluster.yaml", &cfg).unwrap();
    let socket = c.work_dir.join("cni.sock").display().to_string();
    c.agent_args = vec![
        "--cni-socket".into(),
        socket.clone(),
        "--cni-timeout".into(),
        format!("{}s", AGENT_WAIT.as_secs()),
    ];
    // With no agent, ADD fails at once (the kubelet retries) and DEL still succeeds.
    let r = for_pod("ADD", &socket, &app);
    assert!(!r.ok && r.out["code"] == 11, "{}", r.out);
    let r = for_pod("DEL", &socket, &app);
    assert!(r.ok, "DEL must succeed with no agent: {}", r.out);

    c.launch_agent("node-1", &c.config_dir.clone()).unwrap();
    poll("the CNI socket", Duration::from_secs(15), || {
        std::path::Path::new(&socket).exists()
    });
    let who = |c: &mut Cluster, pod: &Pod| who_answers(c, pod, &d.addr);

    // ADD returns the chain's result only once the pod is enrolled: the very first
    // connection after it is captured.
    let r = for_pod("ADD", &socket, &app);
    assert!(r.ok, "{}", r.out);
    assert_eq!(
        r.out["ips"][0]["address"],
        format!("{}/24", app.ip),
        "{}",
        r.out
    );
    assert_eq!(
        who(&mut c, &app),
        "meshed",
        "the pod ran before it was enrolled"
    );
    let r = for_pod("CHECK", &socket, &app);
    assert!(r.ok, "{}", r.out);

    // A pod out of the mesh is answered at once and left alone.
    let r = for_pod("ADD", &socket, &outside);
    assert!(
        r.ok && r.took < Duration::from_secs(2),
        "{} in {:?}",
        r.out,
        r.took
    );
    assert_eq!(who(&mut c, &outside), "direct");

    // A netns that does not hold the pod's IP is never used for it: the sandbox fails.
    let r = plugin(
        "ADD",
        &socket,
        "liar",
        &d.direct.netns_path.display().to_string(),
        liar.ip,
    );
    assert!(!r.ok && r.out["code"] == 11, "{}", r.out);
    let details = r.out["details"].as_str().unwrap_or_default();
    assert!(details.contains("holds none of the pod's IPs"), "{}", r.out);

    // A pod the config does not know yet is waited for (the API may see it after the
    // runtime does): ADD returns once the config has it and it is enrolled.
    let late = c.add_pod("node-1", "late").unwrap();
    let (late_netns, late_ip) = (late.netns_path.display().to_string(), late.ip);
    let socket2 = socket.clone();
    let add = std::thread::spawn(move || plugin("ADD", &socket2, "late", &late_netns, late_ip));
    std::thread::sleep(Duration::from_millis(1000));
    c.write_config("late.yaml", &placed_by_cni(&late)).unwrap();
    let r = add.join().unwrap();
    assert!(r.ok, "{}", r.out);
    assert_eq!(who(&mut c, &late), "meshed");

    // A pod the config never gets: waited for, then failed.
    let r = for_pod("ADD", &socket, &ghost);
    assert!(!r.ok && r.took >= AGENT_WAIT, "{} in {:?}", r.out, r.took);
    assert!(
        r.out["details"]
            .as_str()
            .unwrap_or_default()
            .contains("does not know the pod"),
        "{}",
        r.out
    );

    // DEL releases the pod: no longer captured.
    let r = for_pod("DEL", &socket, &app);
    assert!(r.ok, "{}", r.out);
    poll("app to be released", Duration::from_secs(10), || {
        who(&mut c, &app) != "meshed"
    });

    let r = plugin("VERSION", &socket, "app", "", app.ip);
    assert!(
        r.ok && r.out["supportedVersions"]
            .as_array()
            .is_some_and(|v| v.contains(&"1.0.0".into())),
        "{}",
        r.out
    );
}
