//! Who is redirected and who is not, and whose connection is whose.
mod common;

use std::{net::IpAddr, time::Duration};

use common::*;

/// Through Service `decoy` (`common::decoy`): a connection that reaches `direct` was
/// not redirected; one that reaches `meshed` went through the agent.
#[test]
fn non_enrolled_pods_and_the_agents_own_connections_are_not_redirected() {
    let _g = serial();
    let mut c = cluster(&["node-1"]);
    let enrolled = c.add_pod("node-1", "enrolled").unwrap();
    let outsider = c.add_pod("node-1", "outsider").unwrap();
    let d = decoy(&mut c, "node-1");
    let direct = d.direct.clone();
    let mut cfg = c.pod_yaml(&enrolled, true) + &c.pod_yaml(&outsider, false);
    cfg += &d.yaml;
    // `front` sends the agent to `direct`'s address, which is also `decoy`'s ClusterIP:
    // only the bypass mark keeps the agent's own connection from being captured again.
    cfg += &yaml::service("front", vip(30), 80, PORT);
    cfg += &yaml::endpoint_slice("front", PORT, &[direct.ip]);
    c.write_config("cluster.yaml", &cfg).unwrap();
    c.start_agent("node-1").unwrap();

    let who = |c: &mut Cluster, pod: &Pod, args: &[&str]| -> String {
        let mut full = vec!["who"];
        full.extend_from_slice(args);
        let out = json(&c.run_in(pod, &full, SECS).unwrap());
        out["replies"][0]
            .as_str()
            .unwrap()
            .split(' ')
            .next()
            .unwrap()
            .to_owned()
    };
    let decoy = d.addr.clone();
    assert_eq!(
        who(&mut c, &enrolled, &["--addr", &decoy]),
        "meshed",
        "enrolled pod must be redirected"
    );
    assert_eq!(
        who(&mut c, &outsider, &["--addr", &decoy]),
        "direct",
        "non-enrolled pod must not be redirected"
    );
    // The test process is root with CAP_NET_ADMIN in the pod: it can set the agent's
    // bypass mark, and is captured all the same (it lands on `meshed`, through the
    // agent, not on `direct`), and the kernel counts the forgery.
    let mark = mesh_common::BYPASS_MARK.to_string();
    let forged_before = kernel_counters(&c, "node-1")
        .get("bypass_mark_forged")
        .copied()
        .unwrap_or(0);
    assert_eq!(
        who(&mut c, &enrolled, &["--addr", &decoy, "--mark", &mark]),
        "meshed",
        "a pod's socket with the bypass mark must still be redirected"
    );
    assert_eq!(
        kernel_counters(&c, "node-1")["bypass_mark_forged"],
        forged_before + 1
    );
    // And it is the pod's connection in the agent's books, not the agent's.
    let log = c.agent_log("node-1");
    assert!(
        access_lines(&log).iter().any(|l| has_fields(
            l,
            &[
                ("src_workload", "default/enrolled"),
                ("dst_workload", "default/meshed")
            ]
        )),
        "{log}"
    );
    assert_eq!(
        who(&mut c, &enrolled, &["--addr", &sa(vip(30), 80)]),
        "direct",
        "the agent's own upstream connection must not be captured"
    );
}

#[test]
fn concurrent_connections_from_two_pods_are_attributed_to_their_source() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    let a = c.add_pod("node-1", "pod-a").unwrap();
    let b = c.add_pod("node-1", "pod-b").unwrap();
    let server = c.add_pod("node-2", "server").unwrap();
    serve(&mut c, &server);
    let cfg = c.pod_yaml(&a, true)
        + &c.pod_yaml(&b, true)
        + &c.pod_yaml(&server, true)
        + &yaml::service("svc", vip(40), 80, PORT)
        + &yaml::endpoint_slice("svc", PORT, &[server.ip]);
    c.write_config("cluster.yaml", &cfg).unwrap();
    c.start_agent("node-1").unwrap();
    c.start_agent("node-2").unwrap();

    let addr = sa(vip(40), 80);
    let mut children = Vec::new();
    for pod in [&a, &b] {
        children.push((
            pod.ip,
            c.spawn(pod, &["who", "--addr", &addr, "--count", "200"])
                .unwrap(),
        ));
    }
    for (_, child) in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v = json(&String::from_utf8_lossy(&out.stdout));
        let replies = v["replies"].as_array().unwrap();
        assert_eq!(replies.len(), 200);
        // Every connection was answered by the server (an empty reply is one the mesh
        // closed without carrying it).
        for r in replies {
            let r = r.as_str().unwrap_or_default();
            assert!(r.starts_with("server "), "reply {r:?}");
        }
    }
    // The server's agent saw each connection arrive through a tunnel from its true
    // source pod (the tunnel leaves from the pod's namespace) carrying that pod's
    // identity, never the other pod's.
    let count = |log: &str, name: &str, ip: IpAddr| {
        let identity = format!("spiffe://cluster.local/ns/default/sa/{name}");
        let addr = format!("{ip}:");
        access_lines(log)
            .into_iter()
            .filter(|l| {
                has_fields(
                    l,
                    &[
                        ("reporter", "destination"),
                        ("mode", "inbound"),
                        ("src_identity", &identity),
                        ("src_addr", &addr),
                    ],
                )
            })
            .count()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let log = c.agent_log("node-2");
        let got = (
            count(&log, "pod-a", a.ip),
            count(&log, "pod-b", b.ip),
            count(&log, "pod-a", b.ip) + count(&log, "pod-b", a.ip),
        );
        if got == (200, 200, 0) {
            break;
        }
        if std::time::Instant::now() >= deadline {
            // What the destination logged that matched neither pod, and what either
            // agent logged that was not a success: the lines that explain a miss.
            let odd: Vec<&str> = access_lines(&log)
                .into_iter()
                .filter(|l| {
                    has_fields(l, &[("reporter", "destination")])
                        && !l.contains("spiffe://cluster.local/ns/default/sa/pod-")
                })
                .collect();
            let source_log = c.agent_log("node-1");
            let failed: Vec<&str> = access_lines(&source_log)
                .into_iter()
                .chain(access_lines(&log))
                .filter(|l| !has_fields(l, &[("verdict", "forwarded")]))
                .collect();
            let conns = |node| {
                c.meshctl(node, &["conns"])
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            };
            let live = format!(
                "\nnode-2:\n{}\nnode-1:\n{}",
                conns("node-2"),
                conns("node-1")
            );
            panic!(
                "attribution (a, b, crossed) = {got:?}, want (200, 200, 0)\n\
                 unattributed at the destination: {odd:#?}\nnot forwarded: {failed:#?}\n\
                 open at the destination: {live}"
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Enrollment by label: the pod's own `mesh.dev/dataplane-mode` decides, then its
/// namespace's, then the directory's default (in); changed while the agent runs.
#[test]
fn namespace_and_pod_labels_decide_who_is_in_the_mesh() {
    let _g = serial();
    let mut c = cluster(&["node-1"]);
    let labelled = c.add_pod("node-1", "labelled").unwrap();
    let plain = c.add_pod("node-1", "plain").unwrap();
    let d = decoy(&mut c, "node-1");
    let label = |yaml: String, name: &str, mode: &str| yaml::with_dataplane_mode(&yaml, name, mode);
    let namespace = |mode: &str| {
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: default\n  labels: {{mesh.dev/dataplane-mode: {mode}}}\n---\n"
        )
    };
    let rest = d.yaml.clone();
    let labelled_yaml = label(c.pod_yaml(&labelled, true), "labelled", "enabled");
    // The namespace is out; one pod of it says it is in.
    let cfg = namespace("none") + &labelled_yaml + &c.pod_yaml(&plain, true) + &rest;
    c.write_config("cluster.yaml", &cfg).unwrap();
    c.start_agent("node-1").unwrap();
    let who = |c: &mut Cluster, pod: &Pod| who_answers(c, pod, &d.addr);
    assert_eq!(
        who(&mut c, &labelled),
        "meshed",
        "the pod's label puts it in"
    );
    assert_eq!(
        who(&mut c, &plain),
        "direct",
        "the namespace's label keeps it out"
    );

    // The namespace turns in: the unlabelled pod joins, without a restart.
    let cfg = namespace("enabled") + &labelled_yaml + &c.pod_yaml(&plain, true) + &rest;
    c.write_config("cluster.yaml", &cfg).unwrap();
    poll(
        "the namespace label change to enroll the pod",
        Duration::from_secs(10),
        || who(&mut c, &plain) == "meshed",
    );

    // A pod's `none` wins over its namespace's `enabled`.
    let plain_out = label(c.pod_yaml(&plain, true), "plain", "none");
    let cfg = namespace("enabled") + &labelled_yaml + &plain_out + &rest;
    c.write_config("cluster.yaml", &cfg).unwrap();
    poll(
        "the pod's none label to take it out",
        Duration::from_secs(10),
        || who(&mut c, &plain) == "direct",
    );
    assert_eq!(who(&mut c, &labelled), "meshed");

    // A typo in the label is refused with the object and the field, and the last good
    // config keeps serving.
    let typo = label(c.pod_yaml(&plain, true), "plain", "enable");
    let cfg = namespace("enabled") + &labelled_yaml + &typo + &rest;
    c.write_config("cluster.yaml", &cfg).unwrap();
    poll(
        "the typo reported with its object and field",
        Duration::from_secs(10),
        || {
            // One line names both (the directory says `<file>: Pod default/plain: field
            // ...`, the API source `object=Pod default/plain field=...`).
            c.agent_log("node-1").lines().any(|l| {
                l.contains("Pod default/plain")
                    && l.contains("metadata.labels[mesh.dev/dataplane-mode]")
            })
        },
    );
    assert_eq!(who(&mut c, &plain), "direct", "the last good config serves");
}

/// A pod with no `mesh.dev/netns` annotation, only its UID: the agent finds its netns
/// in `/proc` by the UID in its processes' cgroup, confirmed by the pod's IP, at start
/// and again after a restart. A process of the pod in a namespace of its own is not
/// taken for the pod; a second namespace that also holds the pod's IP makes the agent
/// refuse to guess (the pod is not enrolled, says why, and its plaintext is refused).
#[test]
fn pods_without_a_netns_path_are_found_by_uid_in_proc() {
    const FOUND: &str = "3f1c2b7a-9d4e-4a6b-8c2d-1e0f9a8b7c6d";
    const TWIN: &str = "7a6b5c4d-3e2f-4a1b-9c8d-7e6f5a4b3c2d";
    let _g = serial();
    let mut c = cluster(&["node-1"]);
    let found = c.add_kubelet_pod("node-1", "found", FOUND).unwrap();
    let twin = c.add_kubelet_pod("node-1", "twin", TWIN).unwrap();
    let d = decoy(&mut c, "node-1");
    for p in [&found, &twin] {
        serve(&mut c, p);
    }
    // A process of `found` in a namespace of its own, without the pod's IP: not it.
    c.start_in_foreign_netns(&found, "found-side", &[]).unwrap();
    // A process of `twin` in a second namespace that also holds twin's IP: ambiguous.
    c.start_in_foreign_netns(&twin, "twin-side", &[twin.ip])
        .unwrap();
    let by_uid = |pod: &Pod, uid: &str| yaml::pod_unplaced(&pod.name, &pod.node, pod.ip, Some(uid));
    let cfg = by_uid(&found, FOUND) + &by_uid(&twin, TWIN) + &d.yaml;
    c.write_config("cluster.yaml", &cfg).unwrap();
    // Not ready while twin cannot be enrolled: start without waiting for readiness.
    c.launch_agent("node-1", &c.config_dir.clone()).unwrap();
    let who = |c: &mut Cluster, pod: &Pod| who_answers(c, pod, &d.addr);
    poll("found to be enrolled", Duration::from_secs(15), || {
        who(&mut c, &found) == "meshed"
    });
    poll("twin to be refused", Duration::from_secs(15), || {
        c.agent_log("node-1").contains(&format!(
            "2 network namespaces of pod UID {TWIN} hold the pod's IPs"
        ))
    });
    // The destination must be enrolled itself before its refusal can be asserted: the
    // agent is not waited for (it never becomes ready here), and pods enroll one by one.
    poll("direct to be enrolled", Duration::from_secs(15), || {
        c.agent_log("node-1")
            .lines()
            .any(|l| l.contains("pod enrolled") && l.contains("default/direct"))
    });
    // Not enrolled, and still a meshed workload by its config: its plaintext is
    // refused at meshed destinations (fail closed), not taken as an outsider's.
    assert_eq!(
        who(&mut c, &twin),
        "",
        "an ambiguous pod is neither meshed nor let through"
    );
    assert!(
        c.agent_log("node-1")
            .contains("plaintext from default/twin, a meshed workload"),
        "{}",
        c.agent_log("node-1")
    );

    // After a restart, the pod is found again.
    c.stop_agent("node-1").unwrap();
    c.launch_agent("node-1", &c.config_dir.clone()).unwrap();
    poll(
        "found to be enrolled again",
        Duration::from_secs(15),
        || who(&mut c, &found) == "meshed",
    );
}

/// An agent killed while its pods run, and started again, finds a STRICT pod that no
/// config path places by the `/proc` scan (its UID in the pod's cgroup, confirmed by
/// its IP), and the pod accepts no plaintext at any moment in between: the kernel's
/// enforcement stays pinned through the crash and the new agent adopts it.
#[test]
fn a_restarted_agent_finds_its_pods_in_proc_and_strict_admits_no_plaintext_meanwhile() {
    const UID: &str = "5d2e8f1a-6b3c-4d7e-9f0a-1b2c3d4e5f6a";
    let _g = serial();
    let mut c = cluster(&["node-1"]);
    let found = c.add_kubelet_pod("node-1", "found", UID).unwrap();
    let outsider = c.add_pod("node-1", "outsider").unwrap();
    serve(&mut c, &found);
    let base = yaml::pod_unplaced(&found.name, &found.node, found.ip, Some(UID))
        + &c.pod_yaml(&outsider, false);
    c.write_config(
        "cluster.yaml",
        &(base.clone() + &yaml::peer_authentication("STRICT")),
    )
    .unwrap();
    c.start_agent("node-1").unwrap();
    let by_proc = |c: &Cluster| {
        c.agent_log("node-1").lines().any(|l| {
            l.contains("pod enrolled")
                && l.contains("pod=default/found")
                && l.contains(&format!("of pod UID {UID}"))
        })
    };
    assert!(by_proc(&c), "{}", c.agent_log("node-1"));
    let direct = sa(found.ip, PORT);
    assert_eq!(
        who_answers(&mut c, &outsider, &direct),
        "",
        "STRICT to begin with"
    );

    let out = answered_while(&mut c, &outsider, &direct, 12, |c| {
        c.crash_agent("node-1").unwrap();
        let dir = c.config_dir.clone();
        // The log starts afresh with the new agent.
        c.launch_agent("node-1", &dir).unwrap();
        poll(
            "the pod to be found in /proc again",
            Duration::from_secs(10),
            || by_proc(c),
        );
    });
    assert!(out["sent"].as_u64().unwrap() > 100, "{out}");
    assert_eq!(
        out["answered"], 0,
        "plaintext reached the STRICT pod: {out}"
    );
    c.wait_ready("node-1", SECS).unwrap();

    // The control: the same probes are answered once the pod is PERMISSIVE, so the zero
    // above is STRICT's doing, not a probe that cannot get through.
    c.write_config(
        "cluster.yaml",
        &(base + &yaml::peer_authentication("PERMISSIVE")),
    )
    .unwrap();
    poll("PERMISSIVE to apply", SECS, || {
        who_answers(&mut c, &outsider, &direct) == "found"
    });
    let out = answered_while(&mut c, &outsider, &direct, 2, |_| {});
    assert!(
        out["answered"].as_u64().unwrap() > 0,
        "no probe answered under PERMISSIVE: {out}"
    );
}
