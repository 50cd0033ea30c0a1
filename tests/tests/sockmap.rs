//! sockmap acceleration of the hops between applications and the agent inside a pod:
//! with it on, the bytes of those hops never appear as TCP segments on the pod's
//! loopback; with it off (`MESH_SOCKMAP=off`), nothing joins the socket map. The rest
//! of the suite runs in both modes (cargo xtask test), so every other behaviour is
//! checked with and without it.
mod common;

use std::{io::BufRead, process::Stdio, time::Duration};

use common::*;

/// Each transfer stays under the unread limit (4 MiB), so no receiver can fall behind
/// far enough to move its sender to TCP: every byte must take the sockmap.
const BYTES: u64 = 1024 * 1024;
const TRANSFERS: u64 = 8;

#[test]
fn sockmap_carries_the_pod_hops_only_when_switched_on() {
    let _g = serial();
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
    let on = sockmap_on();

    let status = c.meshctl_json("node-1", &["status"]).unwrap();
    let programs = status["programs"].to_string();
    assert_eq!(
        programs.contains("mesh_sk_msg"),
        on,
        "{status}\n{}",
        c.agent_log("node-1")
    );
    let settings = c
        .meshctl_json("node-1", &["bpf", "maps", "--dump", "MESH_SETTINGS"])
        .unwrap();
    assert_eq!(settings["entries"][0]["key"], "sockmap", "{settings}");
    assert_eq!(
        settings["entries"][0]["value"],
        if on { "on" } else { "off" },
        "{settings}"
    );

    // Every TCP segment with a payload on the client pod's loopback, during transfers
    // through the agent to both backends.
    let capture = c.work_dir.join("lo.pcap");
    let mut tcpdump = c
        .command_in_pod(&client, "tcpdump".as_ref())
        .unwrap()
        // --immediate-mode: libpcap otherwise hands packets over a block at a time
        // (or after its block timeout), and a transfer that ends within it left the
        // file empty when tcpdump was stopped ("0 packets captured, 1506 received by
        // filter").
        .args(["-i", "lo", "-n", "-s", "96", "-U", "--immediate-mode", "-w"])
        .arg(&capture)
        .arg(format!("tcp port {}", mesh_common::OUTBOUND_PORT))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.track(tcpdump.id());
    let mut line = String::new();
    std::io::BufReader::new(tcpdump.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("listening"), "tcpdump: {line}");

    let before = [kernel_counters(&c, "node-1"), kernel_counters(&c, "node-2")];
    for svc in [vip(10), vip(11)].repeat(TRANSFERS as usize) {
        sink_verified(&mut c, &client, &sa(svc, 80), BYTES, SECS * 2);
    }
    mesh_tests::proc::wait_settled(&capture, Duration::from_secs(2));
    mesh_tests::cluster::terminate(&mut tcpdump, Duration::from_secs(5)).ok();
    let after = [kernel_counters(&c, "node-1"), kernel_counters(&c, "node-2")];
    let delta = |node: usize, name: &str| after[node][name] - before[node][name];

    let payload = tcp_payload_bytes(&std::fs::read(&capture).unwrap());
    if on {
        // node-1: the client -> agent hop twice, the agent -> `local` hop once.
        assert!(
            delta(0, "sockmap_redirected_bytes") >= 3 * BYTES * TRANSFERS,
            "node-1 {:?}",
            after[0]
        );
        // node-2: the agent -> `remote` delivery hop.
        assert!(
            delta(1, "sockmap_redirected_bytes") >= BYTES * TRANSFERS,
            "node-2 {:?}",
            after[1]
        );
        assert_eq!(delta(0, "sockmap_add_failed"), 0, "{:?}", after[0]);
        assert_eq!(delta(0, "sockmap_backpressure"), 0, "{:?}", after[0]);
        // 16 MiB crossed the hop; none of it as TCP segments on lo.
        assert_eq!(payload, 0, "TCP payload on the client's lo with sockmap on");
        // Every hop is closed now: no socket's records outlive it. The send and receive
        // guards run on every socket of the node, so a record left behind is applied
        // to whatever socket the kernel allocates at that address next (a bulk sender
        // there charged a live receiver with all it sent, which then never looked
        // caught up).
        for node in ["node-1", "node-2"] {
            let left = || {
                let maps = c.meshctl_json(node, &["bpf", "maps"]).unwrap();
                ["MESH_SOCK_SENDING", "MESH_SOCK_IDS"].map(|name| {
                    let entries = maps["maps"]
                        .as_array()
                        .and_then(|m| m.iter().find(|m| m["name"] == name))
                        .and_then(|m| m["entries"].as_u64());
                    (name, entries)
                })
            };
            let deadline = std::time::Instant::now() + Duration::from_secs(5);
            loop {
                let now = left();
                if now.iter().all(|(_, n)| *n == Some(0)) {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "{node}: records of closed sockets left: {now:?}"
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    } else {
        for counters in &after {
            for name in [
                "sockmap_added",
                "sockmap_redirected",
                "sockmap_redirected_bytes",
            ] {
                assert_eq!(counters[name], 0, "{name} with sockmap off");
            }
        }
        // Control for the capture above: the same transfers show up without it (16 MiB;
        // tcpdump may drop some under load, so at least half).
        assert!(
            payload >= BYTES * TRANSFERS,
            "only {payload} bytes of TCP payload on lo"
        );
    }
    // The switch the kernel programs read is the one the agent was started with.
    let settings = c
        .meshctl_json("node-1", &["bpf", "maps", "--dump", "MESH_SETTINGS"])
        .unwrap();
    let switch = settings["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "sockmap")
        .cloned()
        .unwrap_or_else(|| panic!("no sockmap setting: {settings}"));
    assert_eq!(
        switch["value"],
        if sockmap_on() { "on" } else { "off" },
        "{settings}"
    );
}

/// TCP payload bytes in a classic pcap file of an Ethernet-framed capture (`lo`).
/// The original length is used, not the IP total length, which is 0 for the BIG TCP
/// super-packets loopback carries.
fn tcp_payload_bytes(bytes: &[u8]) -> u64 {
    let u32_at = |at: usize| {
        u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) as usize
    };
    let mut total = 0u64;
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let (caplen, orig_len) = (u32_at(at + 8), u32_at(at + 12));
        let pkt = &bytes[at + 16..(at + 16 + caplen).min(bytes.len())];
        // Ethernet (14) + IPv4 header (IHL words) + TCP header (data offset words).
        if pkt.len() > 14 + 20 + 13 && pkt[12..14] == [0x08, 0x00] {
            let ip = 14 + usize::from(pkt[14] & 0x0f) * 4;
            if pkt.len() > ip + 13 {
                let tcp = usize::from(pkt[ip + 12] >> 4) * 4;
                total += orig_len.saturating_sub(ip + tcp) as u64;
            }
        }
        at += 16 + caplen;
    }
    total
}

/// A receiver that stops reading must push back on its sender through the mesh, in
/// both modes: the bytes the path accepts stay bounded (socket buffers and the
/// sockmap's unread limit), they do not pile up in the kernel or the agent; and every
/// byte arrives, the last one after the stall included.
#[test]
fn a_receiver_that_stops_reading_pushes_back_through_the_mesh() {
    let _g = serial();
    let (c, out) = stall_through_the_mesh(&["node-1", "node-2"], "flood");
    let accepted = out["accepted"].as_u64().unwrap();
    eprintln!(
        "sockmap {}: {accepted} bytes accepted while the receiver stalled: {out}",
        sockmap_on()
    );
    assert_eq!(out["reply"], accepted.to_string(), "{out}");
    assert!(
        accepted < 64 * 1024 * 1024,
        "{accepted} bytes accepted while the receiver did not read"
    );
    // Two seconds after the server started draining, the path is empty again: the
    // last writes go straight through. A path left waiting for a TCP zero-window
    // probe (the receiver was never told there is more to read) takes 0.2 s to
    // seconds here.
    let last_write_ms = out["last_write_ms"].as_u64().unwrap_or(u64::MAX);
    assert!(last_write_ms < 150, "the last write waited: {out}");
    if sockmap_on() {
        // The kernel bounds nothing here: the unread guard held both writers back (the
        // application's by moving it to TCP, the agent's by its own pacing until the
        // server caught up), and once the agent had caught up, the client's last
        // writes came back to the sockmap.
        assert_the_unread_guard_held_and_let_go(&c);
    }
}

/// node-1's client pod and a server pod behind a ClusterIP, the agent started, and
/// the test pod's `tool` (`flood` or `sulk`) run for 3 s against the ClusterIP: the
/// cluster and what the tool printed.
fn stall_through_the_mesh(nodes: &[&str], tool: &str) -> (Cluster, serde_json::Value) {
    let mut c = cluster(nodes);
    let client = c.add_pod("node-1", "client").unwrap();
    let local = c.add_pod("node-1", "local").unwrap();
    serve(&mut c, &local);
    let mut cfg = c.pod_yaml(&client, true) + &c.pod_yaml(&local, true);
    cfg += &yaml::service("local-svc", vip(10), 80, PORT);
    cfg += &yaml::endpoint_slice("local-svc", PORT, &[local.ip]);
    c.write_config("cluster.yaml", &cfg).unwrap();
    c.start_agent("node-1").unwrap();
    let out = c.run_in(
        &client,
        &[tool, "--addr", &sa(vip(10), 80), "--secs", "3"],
        SECS,
    );
    let out = json(&out.unwrap_or_else(|e| panic!("{e:#}\n{}", c.agent_log("node-1"))));
    (c, out)
}

/// With sockmap on: the unread guard held the writers back, the agent paced its own
/// writes, the hop came back to the sockmap afterwards, and the sockmap carried bytes.
fn assert_the_unread_guard_held_and_let_go(c: &Cluster) {
    let k = kernel_counters(c, "node-1");
    let unread = || {
        c.meshctl_json("node-1", &["bpf", "maps", "--dump", "MESH_SOCK_UNREAD"])
            .map(|d| d.to_string())
            .unwrap_or_default()
    };
    assert!(k["sockmap_backpressure"] > 0, "{k:?}");
    assert!(k["sockmap_paced"] > 0, "{k:?}");
    assert!(k["sockmap_resumed"] > 0, "{k:?}\n{}", unread());
    assert!(k["sockmap_redirected"] > 0, "{k:?}");
}

/// The same the other way round: a client that stops reading while its server writes
/// as fast as it can. The path (the agent's hops, its relay, and with sockmap the
/// redirect into the client's socket) must push back on the server rather than hold
/// what the client does not read, lose nothing, and carry the server's last writes at
/// once when the client reads again.
#[test]
fn a_client_that_stops_reading_pushes_back_on_its_server() {
    let _g = serial();
    let (c, out) = stall_through_the_mesh(&["node-1"], "sulk");
    let accepted = out["accepted"].as_u64().unwrap_or_else(|| panic!("{out}"));
    eprintln!(
        "sockmap {}: {accepted} bytes accepted from the server while the client stalled: {out}",
        sockmap_on()
    );
    assert_eq!(out["received"].as_u64(), Some(accepted), "{out}");
    assert!(
        accepted < 64 * 1024 * 1024,
        "{accepted} bytes accepted while the client did not read"
    );
    let last_write_ms = out["last_write_ms"].as_u64().unwrap_or(u64::MAX);
    assert!(last_write_ms < 150, "the server's last write waited: {out}");
    if sockmap_on() {
        // The unread guard held the redirect into the client's socket back, the agent
        // paced its own writes to the client until it read again, and the hop came
        // back to the sockmap afterwards.
        assert_the_unread_guard_held_and_let_go(&c);
    }
}

/// The send and receive guards run on every socket of the node. Hundreds of hop
/// sockets open and close, then applications outside the mesh move bulk data on the
/// same node, in sockets the kernel allocates where the hop sockets were: none of
/// those bytes may be counted against any receiver. Records of the closed hops that
/// stayed behind made such a sender charge a receiver with everything it sent (counts
/// of +2^29 that never came down, and the agent waiting on them).
#[test]
fn sockets_outside_the_mesh_never_move_a_hops_unread_count() {
    if !sockmap_on() {
        return;
    }
    let _g = serial();
    let mut c = cluster(&["node-1"]);
    let client = c.add_pod("node-1", "client").unwrap();
    let local = c.add_pod("node-1", "local").unwrap();
    let plain_a = c.add_pod("node-1", "plain-a").unwrap();
    let plain_b = c.add_pod("node-1", "plain-b").unwrap();
    serve(&mut c, &local);
    serve(&mut c, &plain_b);
    let mut cfg = c.pod_yaml(&client, true) + &c.pod_yaml(&local, true);
    cfg += &c.pod_yaml(&plain_a, false);
    cfg += &c.pod_yaml(&plain_b, false);
    cfg += &yaml::service("local-svc", vip(10), 80, PORT);
    cfg += &yaml::endpoint_slice("local-svc", PORT, &[local.ip]);
    c.write_config("cluster.yaml", &cfg).unwrap();
    c.start_agent("node-1").unwrap();
    const BULK: u64 = 32 * 1024 * 1024;
    for _ in 0..3 {
        // 200 connections through the agent, each used: 800 hop sockets, then closed.
        let out = c
            .run_in(
                &client,
                &["hold", "--addr", &sa(vip(10), 80), "--count", "200"],
                SECS,
            )
            .unwrap();
        assert!(json(&out)["failed"] == 0, "{out}");
        // Bulk between two pods out of the mesh, on fresh sockets.
        for _ in 0..4 {
            sink_verified(&mut c, &plain_a, &sa(plain_b.ip, PORT), BULK, SECS * 2);
        }
    }
    let dump = c
        .meshctl_json("node-1", &["bpf", "maps", "--dump", "MESH_SOCK_UNREAD"])
        .unwrap();
    for e in dump["entries"].as_array().into_iter().flatten() {
        let value = e["value"].as_str().unwrap_or_default();
        let unread: i64 = value
            .split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("unreadable entry {e}"));
        assert!(
            unread.abs() < BULK as i64 / 2,
            "a receiver was charged with bytes sent outside the mesh: {value}\n{dump}"
        );
    }
}
