//! Restarts without a gap: a new agent takes over from the running one (an upgrade,
//! a DaemonSet rolling update with a surge pod) while long-lived connections stream
//! across nodes and on one node and a client dials every 10 ms; and what a SIGKILL
//! costs, with STRICT holding throughout both.
mod common;

use std::{
    process::Child,
    time::{Duration, Instant},
};

use common::*;

/// Streaming connections per path (across nodes, on one node).
const STREAMS: usize = 100;

/// A client dialling `addr` every 10 ms for `secs`.
fn dialler(c: &mut Cluster, pod: &Pod, addr: &str, secs: u64) -> Child {
    c.spawn(
        pod,
        &[
            "probe",
            "--addr",
            addr,
            "--secs",
            &secs.to_string(),
            "--every-ms",
            "10",
            "--timeout-ms",
            "5000",
        ],
    )
    .unwrap()
}

fn result(child: Child) -> serde_json::Value {
    let out = child.wait_with_output().unwrap();
    json(&String::from_utf8_lossy(&out.stdout))
}

/// Every agent's warnings and errors (current and previous, both nodes): what a
/// failed dial met.
fn warnings(c: &Cluster) -> String {
    let mut out = String::new();
    for node in ["node-1", "node-2"] {
        for (which, log) in [
            ("agent", c.agent_log(node)),
            ("previous agent", c.previous_agent_log(node)),
        ] {
            for line in log
                .lines()
                .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            {
                out.push_str(&format!("{node} {which}: {line}\n"));
            }
        }
    }
    out
}

/// Asserts the dialler `d` sent more than `min` dials and every one was answered; a
/// failure shows every agent's warnings.
fn all_answered(c: &Cluster, d: Child, min: u64, what: &str) {
    let r = result(d);
    assert!(r["sent"].as_u64().unwrap() > min, "{what}: {r}");
    assert_eq!(
        r["answered"],
        r["sent"],
        "{what}: dials failed: {r}\n{}",
        warnings(c)
    );
}

struct Setup {
    c: Cluster,
    client: Pod,
    outsider: Pod,
    server: Pod,
}

/// node-1: `client` and `local`; node-2: `server` and `outsider` (not in the mesh).
/// `web` is served across nodes, `near` on node-1; every meshed pod is STRICT.
fn setup() -> Setup {
    let mut c = cluster(&["node-1", "node-2"]);
    let client = c.add_pod("node-1", "client").unwrap();
    let local = c.add_pod("node-1", "local").unwrap();
    let server = c.add_pod("node-2", "server").unwrap();
    let outsider = c.add_pod("node-2", "outsider").unwrap();
    serve(&mut c, &server);
    serve(&mut c, &local);
    let config = c.pod_yaml(&client, true)
        + &c.pod_yaml(&local, true)
        + &c.pod_yaml(&server, true)
        + &c.pod_yaml(&outsider, false)
        + &yaml::service("web", vip(80), 80, PORT)
        + &yaml::endpoint_slice("web", PORT, &[server.ip])
        + &yaml::service("near", vip(81), 81, PORT)
        + &yaml::endpoint_slice("near", PORT, &[local.ip])
        + &yaml::peer_authentication("STRICT");
    c.write_config("cluster.yaml", &config).unwrap();
    c.start_agent("node-1").unwrap();
    c.start_agent("node-2").unwrap();
    Setup {
        c,
        client,
        outsider,
        server,
    }
}

#[test]
fn an_upgrade_under_load_drops_no_connection_refuses_none_and_strict_holds() {
    let _g = serial();
    let Setup {
        mut c,
        client,
        outsider,
        server,
    } = setup();
    let across = Streams::open(&mut c, &client, &sa(vip(80), 80), STREAMS, &[]);
    let near = Streams::open(&mut c, &client, &sa(vip(81), 81), STREAMS, &[]);
    let secs = 20;
    let dial_across = dialler(&mut c, &client, &sa(vip(80), 80), secs);
    let dial_near = dialler(&mut c, &client, &sa(vip(81), 81), secs);
    let started = Instant::now();
    let plaintext = answered_while(&mut c, &outsider, &sa(server.ip, PORT), secs, |c| {
        // A rolling update: one node after the other.
        for node in ["node-1", "node-2"] {
            c.upgrade_agent(node, SECS).unwrap();
        }
        // The old agent reports its drain once it has stopped accepting (within a
        // moment of the takeover).
        let mut status = serde_json::Value::Null;
        poll("the previous agent's first drain report", SECS, || {
            status = c.meshctl_json("node-2", &["status"]).unwrap();
            status["previous_agent"]["deadline_unix_ms"].as_u64() > Some(0)
        });
        let previous = &status["previous_agent"];
        assert_eq!(previous["state"], "draining", "{status}");
        assert!(
            previous["connections"].as_u64().unwrap() > 0,
            "the previous agent of node-2 relays the streams: {status}"
        );
        let text = String::from_utf8(c.meshctl("node-2", &["status"]).unwrap().stdout).unwrap();
        assert!(text.contains("draining:"), "{text}");
        assert!(text.contains("connections left"), "{text}");
    });
    assert!(started.elapsed() >= Duration::from_secs(secs));
    // Plaintext from outside the mesh never reached the STRICT pod.
    assert!(plaintext["sent"].as_u64().unwrap() > 100, "{plaintext}");
    assert_eq!(plaintext["answered"], 0, "{plaintext}");
    // Every dial during both handovers was answered.
    for (what, d) in [("across nodes", dial_across), ("on one node", dial_near)] {
        all_answered(&c, d, 200, what);
    }
    // The streams carried by the previous agents went on, byte for byte.
    across.check("across nodes");
    near.check("on one node");
    // With their connections ended, the previous agents exit on their own, cleanly,
    // and leave the kernel state to their successors.
    for node in ["node-1", "node-2"] {
        let status = c.wait_previous_agent(node, SECS).unwrap();
        assert!(status.success(), "{node}: {status:?}");
        let log = c.previous_agent_log(node);
        assert!(log.contains("drained: every connection ended"), "{log}");
    }
    // The successors carry on alone: new connections, STRICT.
    assert_eq!(who_answers(&mut c, &client, &sa(vip(80), 80)), "server");
    assert_eq!(who_answers(&mut c, &client, &sa(vip(81), 81)), "local");
    let again = answered_while(&mut c, &outsider, &sa(server.ip, PORT), 1, |_| {});
    assert_eq!(again["answered"], 0, "{again}");
    let status = c.meshctl_json("node-1", &["status"]).unwrap();
    assert_eq!(status["previous_agent"]["state"], "exited", "{status}");
    // The stopped agents' ids no longer exempt anything from capture.
    let settings = c
        .meshctl_json("node-1", &["bpf", "maps", "--dump", "MESH_SETTINGS"])
        .unwrap();
    let slot = settings["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "previous_agent_tgid")
        .unwrap_or_else(|| panic!("{settings}"));
    assert_eq!(slot["value"], "0", "{settings}");
}

#[test]
fn a_sigkill_ends_the_agents_connections_and_a_restart_serves_again_with_strict_held() {
    let _g = serial();
    let Setup {
        mut c,
        client,
        outsider,
        server,
    } = setup();
    let across = Streams::open(&mut c, &client, &sa(vip(80), 80), STREAMS, &[]);
    let near = Streams::open(&mut c, &client, &sa(vip(81), 81), STREAMS, &[]);
    let mut gap = Duration::ZERO;
    let plaintext = answered_while(&mut c, &outsider, &sa(server.ip, PORT), 8, |c| {
        c.crash_agent("node-2").unwrap();
        c.crash_agent("node-1").unwrap();
        let killed = Instant::now();
        let dir = c.config_dir.clone();
        c.launch_agent("node-1", &dir).unwrap();
        c.launch_agent("node-2", &dir).unwrap();
        // The first new connection that gets through: the gap a crash costs.
        loop {
            let ok = c
                .run_in(&client, &["who", "--addr", &sa(vip(80), 80)], SECS)
                .is_ok_and(|out| {
                    json(&out)["replies"][0]
                        .as_str()
                        .is_some_and(|r| r.starts_with("server"))
                });
            if ok {
                gap = killed.elapsed();
                break;
            }
            assert!(
                killed.elapsed() < SECS,
                "no connection got through after the restart"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        c.wait_ready("node-1", SECS).unwrap();
        c.wait_ready("node-2", SECS).unwrap();
    });
    println!("gap after SIGKILL of both agents: {gap:?} to the first connection through");
    // Plaintext never reached the STRICT pod, not even with no agent running.
    assert!(plaintext["sent"].as_u64().unwrap() > 50, "{plaintext}");
    assert_eq!(plaintext["answered"], 0, "{plaintext}");
    // The killed agents' connections ended; none of them silently went on.
    for (what, s) in [("across nodes", across), ("on one node", near)] {
        for r in &s.finish() {
            assert!(
                !r["error"].is_null(),
                "{what}: a stream outlived its agent: {r}"
            );
        }
    }
    // New connections are served, the same and across nodes.
    assert_eq!(who_answers(&mut c, &client, &sa(vip(80), 80)), "server");
    assert_eq!(who_answers(&mut c, &client, &sa(vip(81), 81)), "local");
}

#[test]
fn a_successor_that_dies_before_it_is_ready_leaves_the_old_agent_serving_everything() {
    let _g = serial();
    let Setup {
        mut c,
        client,
        outsider,
        server,
    } = setup();
    let across = Streams::open(&mut c, &client, &sa(vip(80), 80), STREAMS, &[]);
    let dial = dialler(&mut c, &client, &sa(vip(80), 80), 10);
    // A successor whose config never loads: it takes the listeners, the admin and
    // the CNI socket paths, and never becomes ready. Then it dies.
    let broken = c.work_dir.join("broken-config");
    std::fs::create_dir_all(&broken).unwrap();
    std::fs::write(broken.join("bad.yaml"), "kind: [\n").unwrap();
    let plaintext = answered_while(&mut c, &outsider, &sa(server.ip, PORT), 8, |c| {
        c.launch_successor("node-2", &broken).unwrap();
        poll("the listeners to be handed over", SECS, || {
            c.previous_agent_log("node-2")
                .contains("handing the listeners over to a successor")
        });
        std::thread::sleep(Duration::from_secs(1));
        c.kill_successor("node-2").unwrap();
        poll("the old agent to serve on", SECS, || {
            c.previous_agent_log("node-2")
                .contains("the successor left before it was ready; serving on")
        });
        poll("node-2 to be ready again", SECS, || {
            c.readiness("node-2").is_ok_and(|(code, _)| code == 200)
        });
    });
    assert_eq!(plaintext["answered"], 0, "{plaintext}");
    all_answered(&c, dial, 200, "across nodes");
    across.check("across nodes");
    // The admin socket path is the old agent's again: meshctl reaches it, and its
    // own id is the agent's in the kernel, with no previous agent exempt.
    let status = c.meshctl_json("node-2", &["status"]).unwrap();
    assert_eq!(status["ready"], true, "{status}");
    let settings = c
        .meshctl_json("node-2", &["bpf", "maps", "--dump", "MESH_SETTINGS"])
        .unwrap();
    let slot = |name: &str| {
        settings["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["key"] == name)
            .map(|e| e["value"].as_str().unwrap_or_default().to_owned())
            .unwrap_or_else(|| panic!("{settings}"))
    };
    assert_eq!(slot("previous_agent_tgid"), "0", "{settings}");
    assert_eq!(
        slot("agent_tgid"),
        c.agent_pid("node-2").unwrap().to_string(),
        "{settings}"
    );
    // And new connections, across nodes, are served.
    assert_eq!(who_answers(&mut c, &client, &sa(vip(80), 80)), "server");
    // The next upgrade finds the agent on the handover socket again: hitless.
    c.upgrade_agent("node-2", SECS).unwrap();
    assert_eq!(who_answers(&mut c, &client, &sa(vip(80), 80)), "server");
}

#[test]
fn a_successor_not_ready_yet_leaves_every_new_connection_to_the_old_agent() {
    let _g = serial();
    let Setup { mut c, client, .. } = setup();
    // Without the CA the successor gets no certificates: it takes the listeners,
    // loads the config and enrolls both pods of node-1, and stays not ready.
    c.stop_ca().unwrap();
    let dir = c.config_dir.clone();
    c.launch_successor("node-1", &dir).unwrap();
    poll("the successor to enroll both pods", SECS, || {
        c.agent_log("node-1")
            .matches("serving the listeners the previous agent handed over")
            .count()
            == 2
    });
    let status = c.meshctl_json("node-1", &["status"]).unwrap();
    assert_eq!(status["ready"], false, "{status}");
    assert_eq!(
        status["previous_agent"]["state"], "handing over",
        "{status}"
    );
    // Meanwhile every new connection is the running agent's, which has what the
    // successor lacks (a certificate for the tunnel across nodes, the local pods).
    let across = dialler(&mut c, &client, &sa(vip(80), 80), 3);
    let near = dialler(&mut c, &client, &sa(vip(81), 81), 3);
    for (what, d) in [("across nodes", across), ("on one node", near)] {
        all_answered(&c, d, 100, what);
    }
    // With the CA back the successor becomes ready, serves, and the old one drains.
    c.start_ca().unwrap();
    poll("the successor to take over", SECS, || {
        c.meshctl_json("node-1", &["status"])
            .is_ok_and(|s| s["ready"] == true && s["previous_agent"]["state"] != "handing over")
    });
    let dial = dialler(&mut c, &client, &sa(vip(80), 80), 2);
    let r = result(dial);
    assert_eq!(r["answered"], r["sent"], "after the takeover: {r}");
    let status = c.wait_previous_agent("node-1", SECS).unwrap();
    assert!(status.success(), "{status:?}");
    assert_eq!(who_answers(&mut c, &client, &sa(vip(81), 81)), "local");
}
