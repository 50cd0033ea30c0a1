//! Peers that misbehave: a silent peer agent, and floods of idle connections to
//! every listener a pod can reach. Each must cost a bounded amount, and the mesh's
//! traffic, readiness and the CA must carry on.
mod common;

use std::time::{Duration, Instant};

use common::*;
use mesh_tests::{
    cluster::{CA_IP, CA_PORT},
    proc::ip_in,
};
use nix::{sys::signal, unistd::Pid};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// How long the peer agent is stopped: a long pause (a CPU-starved node). The tunnel
/// sends a PING after 10 s of silence and gives it 20 s: a pause of 18 s must cost the
/// open connections nothing (with the 5 s it used to give, it cut them all).
const STOPPED: Duration = Duration::from_secs(18);

#[test]
fn a_silent_peer_agent_costs_new_streams_a_bounded_wait_and_open_ones_nothing() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    let client = c.add_pod("node-1", "client").unwrap();
    let server = c.add_pod("node-2", "server").unwrap();
    serve(&mut c, &server);
    let cfg = c.pod_yaml(&client, true)
        + &c.pod_yaml(&server, true)
        + &yaml::service("web", vip(90), 80, PORT)
        + &yaml::endpoint_slice("web", PORT, &[server.ip]);
    c.write_config("cluster.yaml", &cfg).unwrap();
    c.start_agent("node-1").unwrap();
    c.start_agent("node-2").unwrap();
    let web = sa(vip(90), 80);
    // Warm the pool: one tunnel connection to the server stays open.
    c.run_in(&client, &["who", "--addr", &web], SECS).unwrap();
    // Long-lived connections on it, echoing every 200 ms.
    let streams = Streams::open(&mut c, &client, &web, 10, &["--every-ms", "200"]);
    poll(
        "every stream to be through the tunnel and echoing",
        SECS,
        || {
            c.meshctl_json("node-1", &["conns"]).is_ok_and(|v| {
                v["conns"].as_array().is_some_and(|conns| {
                    conns
                        .iter()
                        .filter(|x| x["mode"] == "hbone" && x["bytes_received"].as_u64() > Some(0))
                        .count()
                        == 10
                })
            })
        },
    );

    // The peer's process stops; its kernel still ACKs, so only the mesh's own
    // timers can tell.
    let peer = Pid::from_raw(c.agent_pid("node-2").unwrap() as i32);
    signal::kill(peer, signal::Signal::SIGSTOP).unwrap();
    let stopped = Instant::now();
    // The agents run with --connect-timeout 2s: a stream on the pooled connection
    // fails within it, and the next one fails within the TCP + TLS bound of a fresh
    // connection: never the test's own 30 s.
    for attempt in ["pooled", "fresh"] {
        let started = Instant::now();
        let r = c.run_in(&client, &["who", "--addr", &web], SECS);
        let took = started.elapsed();
        assert!(r.is_err(), "{attempt}: a stopped peer answered: {r:?}");
        assert!(
            took < Duration::from_secs(5),
            "{attempt}: took {took:?} to fail against a silent peer"
        );
    }
    let log = c.agent_log("node-1");
    assert!(log.contains("tunnel_stream_timeout"), "{log}");
    std::thread::sleep(STOPPED.saturating_sub(stopped.elapsed()));
    signal::kill(peer, signal::Signal::SIGCONT).unwrap();
    let deadline = Instant::now() + SECS;
    while c.run_in(&client, &["who", "--addr", &web], SECS).is_err() {
        assert!(
            Instant::now() < deadline,
            "traffic did not resume after SIGCONT"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The open connections only waited: the pooled connection under them outlived the
    // pause (its PING timeout is longer), and every byte came back in order.
    std::thread::sleep(Duration::from_secs(1));
    streams.check("through a peer agent stopped for 18 s");
}

const FLOOD: usize = 20_000;

#[test]
fn idle_connection_floods_leave_traffic_readiness_and_the_ca_working() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    let client = c.add_pod("node-1", "client").unwrap();
    let server = c.add_pod("node-2", "server").unwrap();
    let attacker = c.add_pod("node-1", "attacker").unwrap();
    serve(&mut c, &server);
    let cfg = c.pod_yaml(&client, true)
        + &c.pod_yaml(&server, true)
        + &c.pod_yaml(&attacker, false)
        + &yaml::service("web", vip(91), 80, PORT)
        + &yaml::endpoint_slice("web", PORT, &[server.ip]);
    c.write_config("cluster.yaml", &cfg).unwrap();
    c.start_agent("node-1").unwrap();
    c.start_agent("node-2").unwrap();
    // Pods reach the CA as in a real cluster: the fabric routes back to node-1's pods.
    let fabric = c.fabric_netns().to_owned();
    ip_in(
        &fabric,
        &["route", "add", "10.244.1.0/24", "via", "172.30.0.1"],
    )
    .unwrap();
    let web = sa(vip(91), 80);
    c.run_in(&client, &["who", "--addr", &web], SECS).unwrap();
    let agent = c.agent_pid("node-1").unwrap();
    let baseline = rss_kib(agent);

    let node_ip = "10.244.1.1";
    let targets = [
        format!("{node_ip}:{}", mesh_common::METRICS_PORT),
        format!("{node_ip}:{}", mesh_common::READINESS_PORT),
        sa(client.ip, mesh_common::INBOUND_TUNNEL_PORT),
        format!("{CA_IP}:{CA_PORT}"),
    ];
    let mut floods = Vec::new();
    for t in &targets {
        floods.push(
            c.spawn(
                &attacker,
                &[
                    "idle",
                    "--addr",
                    t,
                    "--count",
                    &FLOOD.to_string(),
                    "--secs",
                    "15",
                ],
            )
            .unwrap(),
        );
    }
    // Each flood's report, read as it comes: the first line when every connection has
    // been tried ("established"), the last when the hold is over.
    let (tx, rx) = std::sync::mpsc::channel::<usize>();
    let readers: Vec<_> = floods
        .iter_mut()
        .enumerate()
        .map(|(i, f)| {
            let out = f.stdout.take().expect("piped stdout");
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut text = String::new();
                for line in
                    std::io::BufRead::lines(std::io::BufReader::new(out)).map_while(Result::ok)
                {
                    if line.contains("\"established\"") {
                        let _ = tx.send(i);
                    }
                    text.push_str(&line);
                    text.push('\n');
                }
                text
            })
        })
        .collect();
    // While the floods connect and then hold their sockets: mesh traffic, readiness
    // and the CA answer. The checks go on until every flood holds all it could open,
    // and for 6 s after that (the floods hold for 15 s).
    let started = Instant::now();
    let mut peak = 0;
    let mut checks = 0;
    let mut connected = 0;
    let mut all_held_at: Option<Instant> = None;
    while all_held_at.is_none_or(|t| t.elapsed() < Duration::from_secs(6)) {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the floods did not finish connecting in 60 s ({connected} of {})",
            targets.len()
        );
        c.run_in(&client, &["who", "--addr", &web], Duration::from_secs(5))
            .unwrap_or_else(|e| panic!("mesh traffic stopped under the flood: {e}"));
        let (code, body) = c.readiness("node-1").expect("readiness answers");
        assert_eq!(code, 200, "{body}");
        peak = peak.max(rss_kib(agent));
        checks += 1;
        connected += rx.try_iter().count();
        if connected == targets.len() && all_held_at.is_none() {
            all_held_at = Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(checks >= 10, "only {checks} checks");
    let ca_peek = c.run_in(
        &client,
        &["tls-peek", "--addr", &format!("{CA_IP}:{CA_PORT}")],
        SECS,
    );
    assert!(
        ca_peek.is_ok(),
        "the CA did not complete a handshake: {ca_peek:?}"
    );
    let mut reports = Vec::new();
    for (mut f, r) in floods.into_iter().zip(readers) {
        f.wait().unwrap();
        reports.push(r.join().expect("report reader"));
    }
    // Every flood got its connections through the kernel, and the agent and the CA
    // closed what was over their caps instead of holding it.
    for (t, r) in targets.iter().zip(&reports) {
        let last: serde_json::Value = r
            .lines()
            .last()
            .map(json)
            .unwrap_or_else(|| panic!("no report for {t}: {r}"));
        assert!(
            last["closed_by_server"].as_u64().unwrap_or(0) > (FLOOD as u64) / 2,
            "{t}: the server kept idle connections open: {r}"
        );
    }
    // A stated bound: the agent holds no per-connection state for refused sockets.
    assert!(
        peak < baseline + 64 * 1024,
        "agent RSS went from {baseline} KiB to {peak} KiB under the flood"
    );
    std::thread::sleep(Duration::from_secs(1));
    let after = rss_kib(agent);
    assert!(
        after < baseline + 32 * 1024,
        "agent RSS {after} KiB after the flood (baseline {baseline} KiB)"
    );
    eprintln!("agent RSS: baseline {baseline} KiB, peak {peak} KiB, after {after} KiB");
}

/// A log collector that stops reading (a full pipe, a stalled container runtime):
/// the agent's log lines cannot be written, and its traffic must not wait for them.
/// Every request below writes an access log line (~400 bytes); a pipe holds 64 KiB,
/// so an agent that writes its log on the threads that carry traffic stops after a
/// few hundred requests.
#[test]
fn a_log_collector_that_stops_reading_never_stalls_traffic() {
    let _g = serial();
    let mut c = cluster(&["node-1"]);
    let client = c.add_pod("node-1", "client").unwrap();
    let server = c.add_pod("node-1", "server").unwrap();
    c.start_echo_server(&server, PORT).unwrap();
    let cfg = c.pod_yaml(&client, true)
        + &c.pod_yaml(&server, true)
        + &yaml::routed_service("echo", vip(95), PORT, &[server.ip]);
    c.write_config("cluster.yaml", &cfg).unwrap();
    c.agent_log_stalled = true;
    c.start_agent("node-1").unwrap();
    let addr = sa(vip(95), 80);
    let started = Instant::now();
    for round in 0..4 {
        let out = json(
            &c.run_in(
                &client,
                &[
                    "echo-get", "--addr", &addr, "--host", "echo", "--count", "1000",
                ],
                SECS,
            )
            .unwrap_or_else(|e| panic!("round {round}: {e:#}")),
        );
        assert_eq!(out["statuses"]["200"], 1000, "round {round}: {out}");
    }
    // New connections too, and readiness.
    for i in 0..50 {
        let out = json(
            &c.run_in(
                &client,
                &["echo-get", "--addr", &addr, "--host", "echo"],
                SECS,
            )
            .unwrap_or_else(|e| panic!("connection {i}: {e:#}")),
        );
        assert_eq!(out["statuses"]["200"], 1, "connection {i}: {out}");
    }
    assert_eq!(c.readiness("node-1").unwrap().0, 200);
    eprintln!(
        "4,050 requests in {:?} with stderr stalled",
        started.elapsed()
    );
}
