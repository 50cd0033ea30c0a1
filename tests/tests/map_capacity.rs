//! Each bounded kernel map at its bound (sized small with `--bpf-map-size`, as an
//! operator can): the agent says so (log line, gauges, `meshctl status` and
//! `meshctl check`, from 80% on), and nothing is misrouted: what does not fit is
//! routed by the agent, kept on the TCP path, or refused, never sent elsewhere.
mod common;

use std::io::{BufRead as _, BufReader, Write as _};

use common::*;
use nix::{sys::signal, unistd::Pid};

/// `meshctl status`'s entry for one bounded map.
fn map_fill(c: &Cluster, node: &str, map: &str) -> serde_json::Value {
    let status = c.meshctl_json(node, &["status"]).unwrap();
    status["maps"]
        .as_array()
        .and_then(|maps| maps.iter().find(|m| m["map"] == map).cloned())
        .unwrap_or_else(|| panic!("no map {map} in {status}"))
}

/// `meshctl check`'s verdict on the kernel maps: (outcome, detail).
fn map_check(c: &Cluster, node: &str) -> (String, String) {
    let out = c.meshctl(node, &["-o", "json", "check"]).unwrap();
    let checks = json(&String::from_utf8_lossy(&out.stdout));
    let check = checks
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|c| c["name"] == "kernel map capacity")
                .cloned()
        })
        .unwrap_or_else(|| panic!("no map check in {checks}"));
    (
        check["outcome"].as_str().unwrap_or_default().to_owned(),
        check["detail"].as_str().unwrap_or_default().to_owned(),
    )
}

/// `count` Services, the even ones served by `a` and the odd ones by `b`.
fn services(c: &Cluster, count: u8, a: &Pod, b: &Pod) -> String {
    let mut cfg = String::new();
    for i in 0..count {
        let name = format!("svc-{i}");
        let server = if i % 2 == 0 { a } else { b };
        cfg += &yaml::service(&name, vip(100 + i), 80, PORT);
        cfg += &yaml::endpoint_slice(&name, PORT, &[server.ip]);
    }
    cfg + &c.pod_yaml(a, true) + &c.pod_yaml(b, true)
}

/// One node whose agent runs with `--bpf-map-size size`, a client and two servers.
fn one_node_with(size: &str) -> (Cluster, Pod, Pod, Pod) {
    let mut c = cluster(&["node-1"]);
    c.agent_args = vec!["--bpf-map-size".into(), size.into()];
    let client = c.add_pod("node-1", "client").unwrap();
    let a = c.add_pod("node-1", "server-a").unwrap();
    let b = c.add_pod("node-1", "server-b").unwrap();
    serve(&mut c, &a);
    serve(&mut c, &b);
    (c, client, a, b)
}

#[test]
fn a_full_services_map_is_reported_before_and_at_the_bound_and_every_service_still_routes() {
    let _g = serial();
    let (mut c, client, a, b) = one_node_with("services=16");
    let base = c.pod_yaml(&client, true);
    // 13 of 16: above 80%, nothing left out yet.
    c.write_config("cluster.yaml", &(base.clone() + &services(&c, 13, &a, &b)))
        .unwrap();
    c.start_agent("node-1").unwrap();
    let m = map_fill(&c, "node-1", "services");
    assert_eq!(
        (m["entries"].as_u64(), m["capacity"].as_u64()),
        (Some(13), Some(16)),
        "{m}"
    );
    assert_eq!(m["level"], "high", "{m}");
    let (outcome, detail) = map_check(&c, "node-1");
    assert_eq!(outcome, "warn", "{detail}");
    assert!(detail.contains("--bpf-map-size services=N"), "{detail}");
    poll("the 80% log line", SECS, || {
        c.agent_log("node-1").contains("kernel map above 80%")
    });

    // 20 of 16: four service ports left out of the kernel's map.
    c.write_config("cluster.yaml", &(base + &services(&c, 20, &a, &b)))
        .unwrap();
    poll("the left-out service ports", SECS, || {
        map_fill(&c, "node-1", "services")["left_out"].as_u64() == Some(4)
    });
    let m = map_fill(&c, "node-1", "services");
    assert_eq!(
        (m["entries"].as_u64(), m["level"].as_str()),
        (Some(16), Some("full")),
        "{m}"
    );
    let log = c.agent_log("node-1");
    assert!(log.contains("a kernel service map is full"), "{log}");
    assert!(log.contains("left_out_service_ports=4"), "{log}");
    let (outcome, detail) = map_check(&c, "node-1");
    assert_eq!(outcome, "fail", "{detail}");
    assert!(detail.contains("4 left out"), "{detail}");
    let status = c.meshctl("node-1", &["status"]).unwrap();
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("warning: kernel map services is full"),
        "{text}"
    );
    let metrics = c.metrics("node-1").unwrap();
    assert_eq!(
        metric(
            &metrics,
            "mesh_bpf_map_entries",
            &[("map", "MESH_SERVICES")]
        ),
        16,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "mesh_bpf_map_capacity",
            &[("map", "MESH_SERVICES")]
        ),
        16
    );
    // Every Service answers from its own server, in the map or not.
    for i in 0..20u8 {
        let want = if i % 2 == 0 { "server-a" } else { "server-b" };
        assert_eq!(
            who_answers(&mut c, &client, &sa(vip(100 + i), 80)),
            want,
            "svc-{i}"
        );
    }
}

#[test]
fn connections_that_lost_their_original_destination_are_refused_never_misrouted() {
    let _g = serial();
    let (mut c, client, a, b) = one_node_with("orig-dst=16");
    c.write_config(
        "cluster.yaml",
        &(c.pod_yaml(&client, true) + &services(&c, 2, &a, &b)),
    )
    .unwrap();
    c.start_agent("node-1").unwrap();
    assert_eq!(map_fill(&c, "node-1", "orig-dst")["capacity"], 16);

    // With the agent stopped for a moment (well under the 2 s after which the kernel
    // counts it as down), 64 connections complete in its accept queues: only the
    // newest 16 records of their original destination fit.
    const BURST: usize = 64;
    let agent = Pid::from_raw(c.agent_pid("node-1").unwrap() as i32);
    let addrs = format!("{},{}", sa(vip(100), 80), sa(vip(101), 80));
    signal::kill(agent, signal::Signal::SIGSTOP).unwrap();
    let burst = c.spawn(
        &client,
        &["burst", "--addrs", &addrs, "--count", &BURST.to_string()],
    );
    let mut burst = match burst {
        Ok(b) => b,
        Err(e) => {
            signal::kill(agent, signal::Signal::SIGCONT).unwrap();
            panic!("{e:#}");
        }
    };
    let mut out = BufReader::new(burst.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    signal::kill(agent, signal::Signal::SIGCONT).unwrap();
    assert_eq!(json(&line)["connected"], BURST, "{line}");
    burst.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    let results = json(&line)["results"].as_array().unwrap().clone();
    let (mut answered, mut refused) = (0, 0);
    for r in &results {
        match r["answer"].as_str() {
            Some(who) => {
                answered += 1;
                let want = if r["addr"] == sa(vip(100), 80) {
                    "server-a"
                } else {
                    "server-b"
                };
                assert!(who.starts_with(want), "misrouted: {r}");
            }
            None => refused += 1,
        }
    }
    assert!(refused >= BURST - 16, "{refused} refused: {results:?}");
    assert!(answered >= 1, "nothing answered: {results:?}");
    let log = c.agent_log("node-1");
    assert!(log.contains("reason=\"no_orig_dst\""), "{log}");
    // Afterwards the map has room again and new connections are served.
    assert_eq!(who_answers(&mut c, &client, &sa(vip(101), 80)), "server-b");
}

#[test]
fn a_full_sockmap_keeps_new_connections_on_tcp_and_loses_no_byte() {
    let _g = serial();
    let mut c = cluster(&["node-1"]);
    // Whatever the suite's setting: this is about the sockmap's bound.
    c.agent_args = vec![
        "--sockmap".into(),
        "on".into(),
        "--bpf-map-size".into(),
        "sockets=16".into(),
    ];
    let client = c.add_pod("node-1", "client").unwrap();
    let server = c.add_pod("node-1", "server").unwrap();
    serve(&mut c, &server);
    c.write_config(
        "cluster.yaml",
        &(c.pod_yaml(&client, true)
            + &c.pod_yaml(&server, true)
            + &yaml::service("web", vip(90), 80, PORT)
            + &yaml::endpoint_slice("web", PORT, &[server.ip])),
    )
    .unwrap();
    c.start_agent("node-1").unwrap();
    let programs = c.meshctl_json("node-1", &["status"]).unwrap()["programs"].to_string();
    assert!(programs.contains("sk_msg"), "sockmap is not on: {programs}");

    // Four sockets per connection (app and agent at the outbound hop, agent and app
    // at the delivery): the fifth connection finds the map full.
    let streams = Streams::open(
        &mut c,
        &client,
        &sa(vip(90), 80),
        12,
        &["--chunk", "4096", "--every-ms", "20"],
    );
    poll("the sockets map to be reported full", SECS, || {
        map_fill(&c, "node-1", "sockets")["level"] == "full"
    });
    poll("the full sockets map in the log", SECS, || {
        c.agent_log("node-1").contains("kernel map full")
    });
    let failed = kernel_counters(&c, "node-1")["sockmap_add_failed"];
    assert!(failed > 0, "no socket was turned away");
    std::thread::sleep(std::time::Duration::from_secs(1));
    streams.check("through a full sockets map");
}
