//! The agent under load and at shutdown.
mod common;

use std::time::{Duration, Instant};

use common::*;

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

#[test]
fn a_thousand_concurrent_connections_complete_and_fds_return() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    let client = c.add_pod("node-1", "client").unwrap();
    let server = c.add_pod("node-2", "server").unwrap();
    serve(&mut c, &server);
    let cfg = c.pod_yaml(&client, true)
        + &c.pod_yaml(&server, true)
        + &yaml::service("svc", vip(60), 80, PORT)
        + &yaml::endpoint_slice("svc", PORT, &[server.ip]);
    c.write_config("cluster.yaml", &cfg).unwrap();
    // Pooled tunnels are meant to outlive the connections they carried; a short
    // idle timeout lets the test see them close too.
    c.agent_args = vec!["--tunnel-idle-timeout".into(), "1s".into()];
    c.start_agent("node-1").unwrap();
    c.start_agent("node-2").unwrap();
    let pid = c.agent_pid("node-1").unwrap();
    // One connection first: the agent keeps a few ready sockets in each pod it dials
    // from (inpod/netns.rs), which belong to its steady state, not to a leak.
    // It also pools a tunnel, closed after the 1 s idle timeout.
    c.run_in(&client, &["who", "--addr", &sa(vip(60), 80)], SECS)
        .unwrap();
    // Wait for the pooled tunnel to idle out, as the agent itself reports it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c
        .metrics("node-1")
        .unwrap_or_default()
        .lines()
        .any(|l| l == "mesh_tunnel_connections 0")
    {
        assert!(
            Instant::now() < deadline,
            "the pooled tunnel never idled out"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = open_fds(pid);

    let out = json(
        &c.run_in(
            &client,
            &["hold", "--addr", &sa(vip(60), 80), "--count", "1000"],
            SECS * 2,
        )
        .unwrap(),
    );
    assert_eq!(out["ok"], 1000, "{out}");
    assert_eq!(out["failed"], 0, "{out}");

    // The agent's spare sockets in the client pod (inpod/netns.rs) are topped up
    // when fewer than half are left, so between the two counts they may differ by up
    // to half the set (4, one address family): that is their steady state. A leak of
    // the 1,000 connections would be hundreds.
    const SPARE_SWING: usize = 4;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = open_fds(pid);
        if now <= before + SPARE_SWING {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "agent fds: {before} before, {now} after"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Program ids attached to a cgroup, as the kernel reports them (bpftool).
fn attached(cgroup: &std::path::Path) -> Vec<serde_json::Value> {
    let out = std::process::Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(cgroup)
        .arg("-j")
        .output()
        .expect("bpftool (installed by cargo xtask setup)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Vec::new();
    }
    serde_json::from_str::<Vec<serde_json::Value>>(text.trim()).expect("bpftool JSON")
}

#[test]
fn sigterm_detaches_every_program_and_removes_every_pin() {
    let _g = serial();
    let mut c = cluster(&["node-1"]);
    let pod = c.add_pod("node-1", "app").unwrap();
    c.write_config("cluster.yaml", &c.pod_yaml(&pod, true))
        .unwrap();
    c.start_agent("node-1").unwrap();
    let cgroup = c.node("node-1").cgroup.clone();
    let pins = c.bpffs.join("mesh").join("node-1");

    let progs = attached(&cgroup);
    let names: Vec<&str> = progs.iter().filter_map(|p| p["name"].as_str()).collect();
    for expected in [
        "mesh_connect4",
        "mesh_connect6",
        "mesh_getpeername4",
        "mesh_getpeername6",
        "mesh_sock_ops",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} not attached: {names:?}"
        );
    }
    let mut link_pins: Vec<String> = pins
        .join("links")
        .read_dir()
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    link_pins.sort();
    // Five cgroup links, the inbound (sk_lookup) link of the one enrolled pod, and
    // with sockmap on the recvmsg and sendmsg tracepoints that bound it.
    let guard = usize::from(sockmap_on());
    assert_eq!(link_pins.len(), 6 + 2 * guard, "{link_pins:?}");
    for name in ["mesh_recv_guard", "mesh_send_guard"] {
        assert_eq!(
            link_pins.iter().filter(|p| *p == name).count(),
            guard,
            "{link_pins:?}"
        );
    }
    let sk_lookup = link_pins
        .iter()
        .filter(|p| p.starts_with("mesh_sk_lookup-"));
    assert_eq!(sk_lookup.count(), 1, "{link_pins:?}");
    assert!(
        pins.join("maps").read_dir().unwrap().count() >= 5,
        "map pins missing"
    );

    // The kernel's view: the pod's netns has the sk_lookup link.
    let pod_links = || netns_links(&pod.netns_path);
    assert_eq!(pod_links().len(), 1, "the pod's sk_lookup link");

    let status = c.stop_agent("node-1").unwrap();
    assert!(
        status.success(),
        "agent exit: {status}\n{}",
        c.agent_log("node-1")
    );
    assert_eq!(
        attached(&cgroup),
        Vec::<serde_json::Value>::new(),
        "programs still attached after SIGTERM"
    );
    assert!(!pins.exists(), "pins left behind at {}", pins.display());
    // Programs attached to a map or a tracepoint rather than the cgroup are gone too.
    // The kernel frees a program after an RCU grace period, not at the agent's exit.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "prog", "show"])
            .output()
            .expect("bpftool");
        let progs = String::from_utf8_lossy(&out.stdout).into_owned();
        // The pod netns's inbound program goes with its link: nothing is left
        // attached inside a pod either.
        let left: Vec<&str> = [
            "mesh_recv_guard",
            "mesh_send_guard",
            "mesh_sk_msg",
            "mesh_sk_lookup",
        ]
        .into_iter()
        .filter(|n| progs.contains(n))
        .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left:?} still loaded 5 s after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        pod_links(),
        Vec::<serde_json::Value>::new(),
        "links left in the pod's netns"
    );
}

/// The kernel's netns links (sk_lookup) attached to the network namespace at `path`.
fn netns_links(path: &std::path::Path) -> Vec<serde_json::Value> {
    use std::os::unix::fs::MetadataExt as _;
    let ino = std::fs::metadata(path).expect("the pod's netns").ino();
    let out = std::process::Command::new("bpftool")
        .args(["-j", "link", "show"])
        .output()
        .expect("bpftool");
    let links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("bpftool JSON");
    links
        .into_iter()
        .filter(|l| l["type"] == "netns" && l["netns_ino"].as_u64() == Some(ino))
        .collect()
}
