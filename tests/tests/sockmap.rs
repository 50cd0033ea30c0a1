//! sockmap acceleration of the hops between applications and the agent inside a pod:
//! with it on, the bytes of those hops never appear as TCP segments on the pod's
//! loopback; with it off (`MESH_SOCKMAP=off`), nothing joins the socket map. The rest
//! of the suite runs in both modes (cargo xtask test), so every other behaviour is
//! checked with and without it.
mod common;

use std::{io::BufRead, process::Stdio, time::Duration};

use common::*;

const BYTES: u64 = 32 * 1024 * 1024;

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
    assert_eq!(programs.contains("mesh_sk_msg"), on, "{status}");
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
        .args(["-i", "lo", "-n", "-s", "96", "-U", "-w"])
        .arg(&capture)
        .arg("tcp port 15001 and (((ip[2:2] - ((ip[0]&0xf)<<2)) - ((tcp[12]&0xf0)>>2)) != 0)")
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
    for svc in [vip(10), vip(11)] {
        let out = json(
            &c.run_in(
                &client,
                &[
                    "sink",
                    "--addr",
                    &sa(svc, 80),
                    "--bytes",
                    &BYTES.to_string(),
                ],
                SECS * 2,
            )
            .unwrap(),
        );
        let sent_sha = out["sent_sha"].as_str().unwrap();
        assert_eq!(
            out["reply"].as_str().unwrap(),
            format!("{BYTES} {sent_sha}"),
            "{out}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    mesh_tests::cluster::terminate(&mut tcpdump, Duration::from_secs(5)).ok();
    let after = [kernel_counters(&c, "node-1"), kernel_counters(&c, "node-2")];
    let delta = |node: usize, name: &str| after[node][name] - before[node][name];

    let segments = pcap_packets(&std::fs::read(&capture).unwrap());
    if on {
        // node-1: the client -> agent hop twice, the agent -> `local` hop once.
        assert!(
            delta(0, "sockmap_redirected_bytes") >= 3 * BYTES,
            "node-1 {:?}",
            after[0]
        );
        // node-2: the agent -> `remote` delivery hop.
        assert!(
            delta(1, "sockmap_redirected_bytes") >= BYTES,
            "node-2 {:?}",
            after[1]
        );
        assert_eq!(delta(0, "sockmap_add_failed"), 0, "{:?}", after[0]);
        // 64 MiB crossed the hop; none of it as TCP segments on lo.
        assert_eq!(
            segments, 0,
            "data segments on the client's lo with sockmap on"
        );
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
        // Control for the capture above: the same transfer is visible without sockmap.
        assert!(segments > 100, "only {segments} data segments on lo");
    }
    let maps = c.meshctl_json("node-1", &["bpf", "maps"]).unwrap();
    assert!(maps.to_string().contains("MESH_SOCKETS"), "{maps}");
}

/// Number of packets in a classic pcap file.
fn pcap_packets(bytes: &[u8]) -> usize {
    let mut n = 0;
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let caplen =
            u32::from_le_bytes([bytes[at + 8], bytes[at + 9], bytes[at + 10], bytes[at + 11]])
                as usize;
        at += 16 + caplen;
        n += 1;
    }
    n
}
