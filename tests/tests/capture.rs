//! Capture that holds under attack: every connection of an enrolled pod goes through
//! the agent (pod IPs too, not only ClusterIPs), STRICT holds on every address of a
//! pod, and no restart or pod update opens a window in which plaintext gets through.
mod common;

use std::time::Duration;

use common::*;
use mesh_tests::proc::ip_in;

fn applied(c: &Cluster, node: &str) -> usize {
    c.agent_log(node).matches("config applied").count()
}

/// Writes `file` and waits until every agent in `nodes` applied it.
fn apply(c: &Cluster, nodes: &[&str], file: &str, text: &str) {
    let before: Vec<usize> = nodes.iter().map(|n| applied(c, n)).collect();
    c.write_config(file, text).unwrap();
    for (n, b) in nodes.iter().zip(before) {
        poll("config to be applied", Duration::from_secs(10), || {
            applied(c, n) > b
        });
    }
}

/// The pod's name from a WHO answer ("<name> <peer address>").
fn who(c: &mut Cluster, pod: &Pod, addr: &str) -> Result<String, String> {
    c.run_in(pod, &["who", "--addr", addr], SECS)
        .map(|out| {
            json(&out)["replies"][0]
                .as_str()
                .unwrap_or_default()
                .split(' ')
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .map_err(|e| e.to_string())
}

/// The Pod object of `pod` in namespace `ns`.
fn pod_in(c: &Cluster, pod: &Pod, ns: &str) -> String {
    c.pod_yaml(pod, true)
        .replace("namespace: default", &format!("namespace: {ns}"))
}

const DENY_EVIL: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
    metadata: {name: deny-evil, namespace: default}\nspec:\n  action: DENY\n  \
    rules:\n  - from: [{source: {namespaces: [\"evil\"]}}]\n---\n";

#[test]
fn meshed_pods_reach_meshed_pods_by_pod_ip_over_the_mesh_under_strict() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    let client = c.add_pod("node-1", "client").unwrap();
    let evil = c.add_pod("node-1", "attacker").unwrap();
    let near = c.add_pod("node-1", "near").unwrap();
    let far = c.add_pod("node-2", "far").unwrap();
    // Not in the mesh: what an enrolled pod dials there passes through its agent.
    let plain = c.add_pod("node-2", "plain").unwrap();
    serve(&mut c, &near);
    serve(&mut c, &far);
    serve(&mut c, &plain);
    let cfg = c.pod_yaml(&client, true)
        + &c.pod_yaml(&plain, false)
        + &pod_in(&c, &evil, "evil")
        + &c.pod_yaml(&near, true)
        + &c.pod_yaml(&far, true)
        + &yaml::service("far", vip(70), 80, PORT)
        + &yaml::endpoint_slice("far", PORT, &[far.ip])
        + &yaml::peer_authentication("STRICT")
        + &yaml::peer_authentication("STRICT").replace("namespace: default", "namespace: evil");
    c.write_config("cluster.yaml", &cfg).unwrap();
    c.start_agent("node-1").unwrap();
    c.start_agent("node-2").unwrap();

    // By pod IP, under STRICT, on another node and on the same node.
    assert_eq!(who(&mut c, &client, &sa(far.ip, PORT)).unwrap(), "far");
    assert_eq!(who(&mut c, &client, &sa(near.ip, PORT)).unwrap(), "near");
    // The cross-node hop is the mTLS tunnel with both identities, at both ends, and
    // no service (it was not a ClusterIP).
    let src_id = "spiffe://cluster.local/ns/default/sa/client";
    let dst_id = "spiffe://cluster.local/ns/default/sa/far";
    poll("both ends to log the pod-IP hop", SECS, || {
        let n1 = c.agent_log("node-1");
        let n2 = c.agent_log("node-2");
        access_lines(&n1).iter().any(|l| {
            has_fields(
                l,
                &[
                    ("reporter", "source"),
                    ("mode", "hbone"),
                    ("security", "mutual_tls"),
                    ("src_identity", src_id),
                    ("dst_identity", dst_id),
                    ("dst_service", "\""),
                ],
            )
        }) && access_lines(&n2).iter().any(|l| {
            has_fields(
                l,
                &[
                    ("reporter", "destination"),
                    ("src_identity", src_id),
                    ("dst_identity", dst_id),
                ],
            )
        })
    });
    let metrics = c.metrics("node-2").unwrap();
    let opened = metric(
        &metrics,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", src_id),
            ("destination_principal", dst_id),
            ("destination_service", "unknown"),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert!(opened > 0, "{metrics}");

    // Before the DENY, `evil` reaches every address: what follows is refused by the
    // policy, not by anything else.
    let targets = [sa(far.ip, PORT), sa(vip(70), 80), sa(near.ip, PORT)];
    for addr in &targets {
        let r = who(&mut c, &evil, addr);
        assert!(
            r.as_ref().is_ok_and(|w| !w.is_empty()),
            "evil to {addr} before the DENY: {r:?}"
        );
    }
    // Any other address is captured too and passes through the agent, counted and
    // logged as such (no identity, no encryption: the far end is not in the mesh).
    let plain_addr = sa(plain.ip, PORT);
    assert_eq!(who(&mut c, &client, &plain_addr).unwrap(), "plain");
    poll("the passthrough connection's log line", SECS, || {
        access_lines(&c.agent_log("node-1")).iter().any(|l| {
            has_fields(
                l,
                &[
                    ("reporter", "source"),
                    ("mode", "passthrough"),
                    ("src_identity", src_id),
                    ("orig_dst", &plain_addr),
                    ("dst_addr", &plain_addr),
                    ("dst_identity", "\""),
                    ("security", "none"),
                ],
            )
        })
    });
    let metrics = c.metrics("node-1").unwrap();
    let opened = metric(
        &metrics,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("source_principal", src_id),
            ("destination_workload", "plain"),
            ("destination_principal", "unknown"),
            ("connection_security_policy", "none"),
        ],
    );
    assert!(opened > 0, "{metrics}");

    // A DENY on the source namespace refuses the pod-IP path and the ClusterIP path
    // alike, and the same pod outside `evil` still gets through.
    apply(&c, &["node-1", "node-2"], "deny.yaml", DENY_EVIL);
    for addr in targets {
        let r = who(&mut c, &evil, &addr);
        assert!(r.is_err(), "evil to {addr} must be refused, got {r:?}");
        let ok = who(&mut c, &client, &addr);
        assert!(
            ok.as_ref().is_ok_and(|w| !w.is_empty()),
            "client to {addr}: {ok:?}"
        );
    }
    // Refused by that policy at the destination: node-2 for `far`, node-1 for `near`
    // (the same-node hop).
    for (node, dst) in [("node-2", "default/far"), ("node-1", "default/near")] {
        let log = c.agent_log(node);
        assert!(
            access_lines(&log).iter().any(|l| has_fields(
                l,
                &[
                    ("reporter", "destination"),
                    ("src_workload", "evil/attacker"),
                    ("dst_workload", dst),
                    ("verdict", "denied"),
                    ("policy", "default/deny-evil"),
                ]
            )),
            "{node}: {log}"
        );
    }
}

/// Another pod's connection churn never takes a pod's record of where its connection
/// was going: the record lives on the socket itself, not in a map the node's pods
/// share (an LRU of 65,536 entries, which 200,000 abandoned connects would cycle
/// three times). The long-lived connection's `getpeername` still names the ClusterIP,
/// and the pod's new connections are still routed.
#[test]
fn another_pods_connection_churn_never_takes_a_pods_original_destination() {
    let _g = serial();
    let mut c = cluster(&["node-1"]);
    let victim = c.add_pod("node-1", "victim").unwrap();
    let churner = c.add_pod("node-1", "churner").unwrap();
    let server = c.add_pod("node-1", "server").unwrap();
    serve(&mut c, &server);
    let cfg = c.pod_yaml(&victim, true)
        + &c.pod_yaml(&churner, true)
        + &c.pod_yaml(&server, true)
        + &yaml::service("web", vip(73), 80, PORT)
        + &yaml::endpoint_slice("web", PORT, &[server.ip])
        // No endpoints: the agent refuses what reaches it at once.
        + &yaml::service("empty", vip(74), 80, PORT);
    c.write_config("cluster.yaml", &cfg).unwrap();
    c.start_agent("node-1").unwrap();

    let web = sa(vip(73), 80);
    let mut held = c
        .spawn(&victim, &["peername", "--addr", &web, "--hold"])
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(held.stdout.as_mut().expect("piped stdout")),
        &mut first,
    )
    .unwrap();
    assert_eq!(json(&first)["peer"], web, "{first}");

    let churn = json(
        &c.run_in(
            &churner,
            &["churn", "--addr", &sa(vip(74), 80), "--count", "200000"],
            Duration::from_secs(120),
        )
        .unwrap(),
    );
    assert_eq!(
        churn["refused"], 0,
        "the churn's connects were refused: {churn}"
    );

    std::io::Write::write_all(held.stdin.as_mut().expect("piped stdin"), b"again\n").unwrap();
    let out = held.wait_with_output().unwrap();
    let again = json(&String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        again["peer"], web,
        "after the churn the connection no longer knows where it went: {again}"
    );
    assert!(
        again["who"]
            .as_str()
            .unwrap_or_default()
            .starts_with("server "),
        "{again}"
    );
    assert_eq!(who(&mut c, &victim, &web).unwrap(), "server");
}

/// The ifindex of `dev` in the network namespace `netns`.
fn ifindex(netns: &str, dev: &str) -> u32 {
    let out = ip_in(netns, &["-o", "link", "show", dev]).unwrap();
    out.split(':').next().unwrap().trim().parse().unwrap()
}

/// The node's own network namespace and cgroup as a `Pod`, so a process can be run
/// there as the kubelet or any node process would (its address toward its pods is the
/// bridge's, 10.244.<n>.1).
fn node_as_pod(c: &Cluster, node: &str) -> Pod {
    let n = c.node(node);
    Pod {
        name: "node".into(),
        node: node.into(),
        ip: std::net::IpAddr::from([10, 244, n.index, 1]),
        netns_path: format!("/run/netns/{}", n.netns).into(),
        netns: n.netns.clone(),
        cgroup: n.cgroup.clone(),
    }
}

/// The IPv6 link-local address of `dev` in `netns`, once it is usable.
fn link_local(netns: &str, dev: &str) -> String {
    let mut found = String::new();
    poll("an IPv6 link-local address", SECS, || {
        let out = ip_in(
            netns,
            &["-6", "-o", "addr", "show", "dev", dev, "scope", "link"],
        )
        .unwrap_or_default();
        if out.contains("tentative") {
            return false;
        }
        found = out
            .split_whitespace()
            .skip_while(|w| *w != "inet6")
            .nth(1)
            .and_then(|a| a.split('/').next())
            .unwrap_or_default()
            .to_owned();
        !found.is_empty()
    });
    found
}

#[test]
fn strict_covers_every_address_of_a_pod_and_permissive_captures_each() {
    let _g = serial();
    let mut c = cluster(&["node-1"]);
    let server = c.add_pod("node-1", "server").unwrap();
    let outsider = c.add_pod("node-1", "outsider").unwrap();
    serve(&mut c, &server);
    // A second address, added inside the pod after the config was written.
    let added = "10.244.1.200";
    ip_in(
        &server.netns,
        &["addr", "add", &format!("{added}/32"), "dev", "eth0"],
    )
    .unwrap();
    let server_ll = link_local(&server.netns, "eth0");
    link_local(&outsider.netns, "eth0");
    let node_netns = c.node("node-1").netns.clone();
    link_local(&node_netns, "cbr0");
    let cfg = c.pod_yaml(&server, true) + &c.pod_yaml(&outsider, false);
    c.write_config("cluster.yaml", &cfg).unwrap();
    c.start_agent("node-1").unwrap();

    let from_pod = format!("[{server_ll}%{}]:{PORT}", ifindex(&outsider.netns, "eth0"));
    let from_node = format!("[{server_ll}%{}]:{PORT}", ifindex(&node_netns, "cbr0"));
    let v4 = sa(server.ip, PORT);
    let added_addr = format!("{added}:{PORT}");
    let node_pod = node_as_pod(&c, "node-1");
    let probes: [(&Pod, &str); 6] = [
        (&outsider, &v4),
        (&outsider, &from_pod),
        (&outsider, &added_addr),
        (&node_pod, &v4),
        (&node_pod, &from_node),
        (&node_pod, &added_addr),
    ];

    for mode in ["STRICT", "PERMISSIVE"] {
        apply(
            &c,
            &["node-1"],
            "peer-auth.yaml",
            &yaml::peer_authentication(mode),
        );
        for (pod, addr) in probes {
            let before = kernel_counters(&c, "node-1");
            let r = who(&mut c, pod, addr);
            let after = kernel_counters(&c, "node-1");
            let grew = |k: &str| after[k] > before[k];
            match mode {
                "STRICT" => {
                    assert!(r.is_err(), "STRICT: {} to {addr} answered: {r:?}", pod.name);
                    assert!(grew("inbound_strict_refused"), "{mode} {addr}");
                }
                _ => {
                    assert_eq!(
                        r.as_deref(),
                        Ok("server"),
                        "PERMISSIVE: {} to {addr}",
                        pod.name
                    );
                    assert!(
                        grew("inbound_plaintext_captured"),
                        "{mode} {addr}: not captured"
                    );
                }
            }
        }
    }
}

#[test]
fn strict_never_lapses_across_a_crash_a_restart_without_the_ca_and_a_label_change() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    let client = c.add_pod("node-1", "client").unwrap();
    let server = c.add_pod("node-2", "server").unwrap();
    let outsider = c.add_pod("node-2", "outsider").unwrap();
    serve(&mut c, &server);
    let base = c.pod_yaml(&client, true)
        + &c.pod_yaml(&outsider, false)
        + &yaml::service("web", vip(80), 80, PORT)
        + &yaml::endpoint_slice("web", PORT, &[server.ip])
        + &yaml::peer_authentication("STRICT");
    c.write_config("cluster.yaml", &(base.clone() + &c.pod_yaml(&server, true)))
        .unwrap();
    c.start_agent("node-1").unwrap();
    c.start_agent("node-2").unwrap();
    let direct = sa(server.ip, PORT);
    assert!(
        who(&mut c, &outsider, &direct).is_err(),
        "STRICT to begin with"
    );
    assert_eq!(who(&mut c, &client, &sa(vip(80), 80)).unwrap(), "server");

    // SIGKILL, then a restart while the CA answers nothing for 15 s.
    let ca = c.ca_pid().expect("the CA runs");
    let signal_ca =
        |sig| nix::sys::signal::kill(nix::unistd::Pid::from_raw(ca as i32), sig).unwrap();
    let out = answered_while(&mut c, &outsider, &direct, 20, |c| {
        c.crash_agent("node-2").unwrap();
        signal_ca(nix::sys::signal::Signal::SIGSTOP);
        let dir = c.config_dir.clone();
        c.launch_agent("node-2", &dir).unwrap();
        std::thread::sleep(Duration::from_secs(15));
        signal_ca(nix::sys::signal::Signal::SIGCONT);
    });
    assert!(out["sent"].as_u64().unwrap() > 200, "{out}");
    assert_eq!(
        out["answered"], 0,
        "plaintext reached the STRICT pod: {out}"
    );
    c.wait_ready("node-2", SECS).unwrap();
    assert_eq!(who(&mut c, &client, &sa(vip(80), 80)).unwrap(), "server");

    // A label change is applied in place: no re-enrollment, no window.
    let out = answered_while(&mut c, &outsider, &direct, 3, |c| {
        let relabelled = c.pod_yaml(&server, true).replace(
            "labels: {app: server}",
            "labels: {app: server, version: v2}",
        );
        apply(
            c,
            &["node-2"],
            "cluster.yaml",
            &(base.clone() + &relabelled),
        );
    });
    assert_eq!(
        out["answered"], 0,
        "plaintext reached the STRICT pod: {out}"
    );
    let log = c.agent_log("node-2");
    assert!(log.contains("pod updated in place"), "{log}");
    assert_eq!(who(&mut c, &client, &sa(vip(80), 80)).unwrap(), "server");

    // The control: the same probes are answered once the pod is PERMISSIVE, so the
    // zeros above are STRICT's doing, not a probe that cannot get through.
    let permissive = base.replace(
        &yaml::peer_authentication("STRICT"),
        &yaml::peer_authentication("PERMISSIVE"),
    ) + &c.pod_yaml(&server, true);
    apply(&c, &["node-2"], "cluster.yaml", &permissive);
    let out = answered_while(&mut c, &outsider, &direct, 2, |_| {});
    assert!(
        out["answered"].as_u64().unwrap() > 0,
        "no probe answered under PERMISSIVE: {out}"
    );

    // Certificate requests never hold up a stop: with the CA stopped, an agent that
    // has just enrolled its pod (whose certificate cannot come) exits on SIGTERM at
    // once, not after its certificate waits.
    signal_ca(nix::sys::signal::Signal::SIGSTOP);
    c.crash_agent("node-2").unwrap();
    let dir = c.config_dir.clone();
    // A launch starts a new log.
    c.launch_agent("node-2", &dir).unwrap();
    poll("the restarted agent to enroll its pod", SECS, || {
        c.agent_log("node-2").contains("pod enrolled")
    });
    let stopping = std::time::Instant::now();
    let status = c.stop_agent("node-2").unwrap();
    let took = stopping.elapsed();
    signal_ca(nix::sys::signal::Signal::SIGCONT);
    assert!(status.success(), "{status:?}");
    assert!(
        took < Duration::from_secs(3),
        "SIGTERM took {took:?} with certificates outstanding"
    );
}

#[test]
fn plaintext_from_a_meshed_pod_is_refused_even_where_plaintext_is_allowed() {
    let _g = serial();
    let mut c = cluster(&["node-1"]);
    let server = c.add_pod("node-1", "server").unwrap();
    let client = c.add_pod("node-1", "client").unwrap();
    let outsider = c.add_pod("node-1", "outsider").unwrap();
    serve(&mut c, &server);
    let cfg =
        c.pod_yaml(&server, true) + &c.pod_yaml(&client, true) + &c.pod_yaml(&outsider, false);
    c.write_config("cluster.yaml", &cfg).unwrap();
    c.start_agent("node-1").unwrap();
    let target = sa(server.ip, PORT);
    // A process in the meshed client's netns that escaped the pod's cgroup: its
    // connect() is not captured, so it reaches the PERMISSIVE server as plaintext from
    // a meshed pod's address. That can only be a bypass of the client's agent.
    let escaped = |c: &Cluster, netns: &std::path::Path| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-testpod"));
        cmd.args(["who", "--addr", &target]);
        mesh_tests::proc::enter(&mut cmd, netns, None).unwrap();
        let _ = c;
        cmd.output().unwrap()
    };
    let from_meshed = escaped(&c, &client.netns_path);
    assert!(
        !String::from_utf8_lossy(&from_meshed.stdout).contains("server"),
        "plaintext from a meshed pod was answered: {}",
        String::from_utf8_lossy(&from_meshed.stdout)
    );
    // The control: the same plaintext from a pod outside the mesh is accepted.
    let from_outside = escaped(&c, &outsider.netns_path);
    assert!(
        String::from_utf8_lossy(&from_outside.stdout).contains("server"),
        "{}",
        String::from_utf8_lossy(&from_outside.stderr)
    );
    let log = c.agent_log("node-1");
    assert!(
        log.lines()
            .any(|l| l.contains("plaintext_from_meshed") && l.contains("default/client")),
        "{log}"
    );
}

/// The kubelet's probes reach a STRICT pod: plaintext from the node's own address to a
/// port the pod's spec probes goes straight to the application (which sees the node's
/// address, not the agent's), and nothing else gets that pass: not another port from
/// the node, not the probed port from another pod. A change of the probes in the pod's
/// spec moves the pass in place, and a pod without probes gets none.
#[test]
fn kubelet_probes_reach_a_strict_pod_and_nothing_else_does() {
    let _g = serial();
    let mut c = cluster(&["node-1"]);
    let server = c.add_pod("node-1", "server").unwrap();
    let plain = c.add_pod("node-1", "plain").unwrap();
    let outsider = c.add_pod("node-1", "outsider").unwrap();
    const OTHER: u16 = PORT + 1;
    for (pod, port) in [(&server, PORT), (&server, OTHER), (&plain, PORT)] {
        c.start_server(pod, port).unwrap();
    }
    let node = node_as_pod(&c, "node-1");
    // A named port, resolved against the container's ports as the kubelet does.
    let (server_yaml, others) = (
        c.pod_yaml(&server, true),
        c.pod_yaml(&plain, true) + &c.pod_yaml(&outsider, false),
    );
    let probing = |container: &str| {
        yaml::with_container(&server_yaml, container)
            + &others
            + &yaml::peer_authentication("STRICT")
    };
    let http_probe = format!(
        "{{name: app, ports: [{{name: http, containerPort: {PORT}}}], \
         readinessProbe: {{httpGet: {{path: /ready, port: http}}}}}}"
    );
    c.write_config("cluster.yaml", &probing(&http_probe))
        .unwrap();
    c.start_agent("node-1").unwrap();
    let entry = c
        .meshctl_json("node-1", &["bpf", "maps", "--dump", "MESH_ENROLLED_NETNS"])
        .unwrap()
        .to_string();
    assert!(
        entry.contains(&format!("probes from 10.244.1.1 to [{PORT}]")),
        "{entry}"
    );

    let probe = sa(server.ip, PORT);
    let other = sa(server.ip, OTHER);
    let answer = |c: &mut Cluster, from: &Pod, addr: &str| {
        c.run_in(from, &["who", "--addr", addr], SECS)
            .map(|out| {
                json(&out)["replies"][0]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .map_err(|e| e.to_string())
    };
    let before = kernel_counters(&c, "node-1");
    let r = answer(&mut c, &node, &probe).expect("the kubelet's probe must be answered");
    // Straight to the application: it sees the node's own address.
    assert!(r.starts_with("server 10.244.1.1:"), "{r}");
    let after = kernel_counters(&c, "node-1");
    assert_eq!(
        after["inbound_strict_refused"], before["inbound_strict_refused"],
        "the probe was counted as refused"
    );
    for (from, addr, what) in [
        (&node, &other, "another port from the node"),
        (
            &outsider,
            &probe,
            "the probed port from a pod outside the mesh",
        ),
        (&node, &sa(plain.ip, PORT), "a pod that probes nothing"),
    ] {
        let r = answer(&mut c, from, addr);
        assert!(r.is_err(), "STRICT: {what} was answered: {r:?}");
    }

    // The probe moves to the other port (a tcpSocket liveness probe by number): the
    // pass follows in place, the old port is refused again.
    let tcp_probe = format!("{{name: app, livenessProbe: {{tcpSocket: {{port: {OTHER}}}}}}}");
    c.write_config("cluster.yaml", &probing(&tcp_probe))
        .unwrap();
    poll("the probe to move to the other port", SECS, || {
        answer(&mut c, &node, &other).is_ok()
    });
    assert!(
        answer(&mut c, &node, &probe).is_err(),
        "the old probe port still passes"
    );
    assert!(
        c.agent_log("node-1").contains("pod updated in place"),
        "the probes were not changed in place"
    );
}
