//! The outbound data path on the real kernel: pods reach ClusterIPs through the agents.
mod common;

use std::time::Duration;

use common::*;

/// Two nodes; a client on node-1; backend `local` on node-1 and `remote` on node-2,
/// each behind its own service.
fn two_node_cluster() -> (Cluster, Pod, Pod, Pod) {
    let mut c = cluster(&["node-1", "node-2"]);
    let client = c.add_pod("node-1", "client").unwrap();
    let local = c.add_pod("node-1", "local").unwrap();
    let remote = c.add_pod("node-2", "remote").unwrap();
    serve(&mut c, &local);
    serve(&mut c, &remote);
    let mut cfg = String::new();
    for p in [&client, &local, &remote] {
        cfg += &c.pod_yaml(p, true);
    }
    cfg += &yaml::service("local-svc", vip(10), 80, PORT);
    cfg += &yaml::endpoint_slice("local-svc", PORT, &[local.ip]);
    cfg += &yaml::service("remote-svc", vip(11), 80, PORT);
    cfg += &yaml::endpoint_slice("remote-svc", PORT, &[remote.ip]);
    c.write_config("cluster.yaml", &cfg).unwrap();
    c.start_agent("node-1").unwrap();
    c.start_agent("node-2").unwrap();
    (c, client, local, remote)
}

#[test]
fn same_node_and_cross_node_service_traffic() {
    let _g = serial();
    let (mut c, client, local, remote) = two_node_cluster();
    for (svc, backend, mode) in [(vip(10), &local, "local"), (vip(11), &remote, "hbone")] {
        let out = c
            .run_in(&client, &["who", "--addr", &sa(svc, 80)], SECS)
            .unwrap();
        let reply = json(&out)["replies"][0].as_str().unwrap().to_owned();
        // The backend names itself and the source it saw: its own pod IP, because
        // the agent delivers from inside the backend's namespace (docs/security.md).
        assert!(
            reply.starts_with(&format!("{} {}:", backend.name, backend.ip)),
            "{reply}"
        );
        // The agent knows the real source: the client's identity.
        let dst_identity = format!("spiffe://cluster.local/ns/default/sa/{}", backend.name);
        let want = [
            ("reporter", "source"),
            ("mode", mode),
            (
                "src_identity",
                "spiffe://cluster.local/ns/default/sa/client",
            ),
            ("dst_identity", dst_identity.as_str()),
        ];
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !access_lines(&c.agent_log("node-1"))
            .iter()
            .any(|l| has_fields(l, &want))
        {
            assert!(
                std::time::Instant::now() < deadline,
                "no access log line with {want:?} in:\n{}",
                c.agent_log("node-1")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn large_transfer_checksums_and_half_close_both_ways() {
    let _g = serial();
    let (mut c, client, _local, _remote) = two_node_cluster();
    const BYTES: u64 = 256 * 1024 * 1024;
    for svc in [vip(10), vip(11)] {
        // Client -> server, then the client half-closes and still reads the answer.
        sink_verified(&mut c, &client, &sa(svc, 80), BYTES, SECS * 4);

        // Server -> client, then the server half-closes and still receives.
        let out = json(
            &c.run_in(
                &client,
                &[
                    "source",
                    "--addr",
                    &sa(svc, 80),
                    "--bytes",
                    "10000000",
                    "--then",
                    "123456",
                ],
                SECS,
            )
            .unwrap(),
        );
        assert_eq!(out["received"], 10_000_000, "{out}");
        assert_eq!(out["sha"], out["expected_sha"], "{out}");
        assert_eq!(out["after_eof"], 0, "{out}");
    }
    // Each server logged what arrived after it had half-closed. The client is done
    // once its own FIN is out (it had the server's already), so the server may still
    // be reading: wait for its line.
    for backend in ["local", "remote"] {
        let path = c.work_dir.join(format!("{backend}.log"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let log = std::fs::read_to_string(&path).unwrap_or_default();
            if log.lines().any(|l| l.starts_with("SOURCE-TAIL 123456 ")) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{backend}: {log:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

#[test]
fn getpeername_returns_the_cluster_ip() {
    let _g = serial();
    let (mut c, client, _local, _remote) = two_node_cluster();
    let out = json(
        &c.run_in(&client, &["peername", "--addr", &sa(vip(11), 80)], SECS)
            .unwrap(),
    );
    assert_eq!(out["peer"], sa(vip(11), 80), "{out}");
    assert!(out["who"].as_str().unwrap().starts_with("remote "), "{out}");
    // IPv6 socket dialling the v4-mapped ClusterIP (connect6 / getpeername6).
    let mapped = format!("[::ffff:{}]:80", vip(10));
    let out = json(
        &c.run_in(&client, &["peername", "--addr", &mapped], SECS)
            .unwrap(),
    );
    assert_eq!(out["peer"], mapped, "{out}");
    assert!(out["who"].as_str().unwrap().starts_with("local "), "{out}");
}
