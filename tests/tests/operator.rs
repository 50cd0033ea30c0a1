//! The operator surface: Istio-compatible metrics, `meshctl` over the admin socket,
//! flow events from the kernel and the agent, the access log, readiness and the
//! preflight check. Each test builds its own simulated cluster.
mod common;

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::fs::PermissionsExt as _,
    process::Command,
    time::{Duration, Instant},
};

use common::*;
use mesh_tests::pattern::Pattern;

const CLIENT_ID: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/default/sa/server";

/// `client` on node-1, `server` on node-2 behind `web` at vip(`v`):80; extra YAML
/// (policies, more pods) appended.
fn setup(c: &mut Cluster, v: u8, extra: &str) -> (Pod, Pod) {
    let client = c.add_pod("node-1", "client").unwrap();
    let server = c.add_pod("node-2", "server").unwrap();
    serve(c, &server);
    let cfg = c.pod_yaml(&client, true)
        + &c.pod_yaml(&server, true)
        + &yaml::service("web", vip(v), 80, PORT)
        + &yaml::endpoint_slice("web", PORT, &[server.ip])
        + extra;
    c.write_config("cluster.yaml", &cfg).unwrap();
    (client, server)
}

#[test]
fn metrics_count_exactly_the_connections_and_bytes_carried() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    let (client, _server) = setup(&mut c, 70, "");
    // The access log in JSON on one node and off on the other: both are options.
    c.agent_args = vec!["--access-log".into(), "json".into()];
    c.start_agent("node-1").unwrap();
    c.agent_args = vec!["--access-log".into(), "off".into()];
    c.start_agent("node-2").unwrap();

    const N: u64 = 7;
    const B: u64 = 100_000;
    // Client -> server: "SINK\n" and B bytes; server -> client: "<B> <sha>\n".
    let mut to_client = 0;
    for i in 0..N {
        let out = json(
            &c.run_in(
                &client,
                &[
                    "sink",
                    "--addr",
                    &sa(vip(70), 80),
                    "--bytes",
                    &B.to_string(),
                    "--seed",
                    &i.to_string(),
                ],
                SECS,
            )
            .unwrap(),
        );
        to_client += out["reply"].as_str().unwrap().len() as u64 + 1;
    }
    let to_server = N * (B + "SINK\n".len() as u64);

    let source = [
        ("reporter", "source"),
        ("source_workload", "client"),
        ("source_workload_namespace", "default"),
        ("source_principal", CLIENT_ID),
        ("destination_workload", "server"),
        ("destination_workload_namespace", "default"),
        ("destination_service", "web.default.svc.cluster.local"),
        ("destination_principal", SERVER_ID),
        ("connection_security_policy", "mutual_tls"),
        ("response_flags", "-"),
    ];
    let destination = [
        ("reporter", "destination"),
        ("source_workload", "client"),
        ("source_principal", CLIENT_ID),
        ("destination_workload", "server"),
        ("destination_principal", SERVER_ID),
        ("connection_security_policy", "mutual_tls"),
        ("response_flags", "-"),
    ];
    for (node, labels) in [("node-1", &source[..]), ("node-2", &destination[..])] {
        poll("every close to be counted", Duration::from_secs(10), || {
            metric(
                &c.metrics(node).unwrap(),
                "istio_tcp_connections_closed_total",
                labels,
            ) == N
        });
        let text = c.metrics(node).unwrap();
        let get = |name| metric(&text, name, labels);
        assert_eq!(
            get("istio_tcp_connections_opened_total"),
            N,
            "{node}\n{text}"
        );
        assert_eq!(
            get("istio_tcp_received_bytes_total"),
            to_server,
            "{node}\n{text}"
        );
        assert_eq!(
            get("istio_tcp_sent_bytes_total"),
            to_client,
            "{node}\n{text}"
        );
        // Nothing was counted under other flags.
        assert_eq!(
            metric(&text, "istio_tcp_connections_opened_total", &[]),
            N,
            "{node}\n{text}"
        );
        assert!(
            metric(&text, "mesh_config_reloads_total", &[("result", "ok")]) >= 1,
            "{text}"
        );
        assert!(
            metric(&text, "mesh_bpf_map_capacity", &[("map", "MESH_SERVICES")])
                == u64::from(mesh_common::limits::SERVICES),
            "{text}"
        );
        assert!(
            text.contains("mesh_certificate_expiry_timestamp_seconds{identity=\"spiffe://"),
            "{text}"
        );
    }

    // JSON access log on node-1: one line per connection, with the bytes.
    let log = c.agent_log("node-1");
    let lines: Vec<serde_json::Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "connection closed" && v["reporter"] == "source")
        .collect();
    assert_eq!(lines.len() as u64, N, "{log}");
    for v in &lines {
        assert_eq!(v["received"], B + 5, "{v}");
        assert_eq!(v["src_identity"], CLIENT_ID, "{v}");
        assert_eq!(v["dst_identity"], SERVER_ID, "{v}");
        assert_eq!(v["security"], "mutual_tls", "{v}");
        assert_eq!(v["verdict"], "forwarded", "{v}");
    }
    // Off on node-2.
    assert!(
        access_lines(&c.agent_log("node-2")).is_empty(),
        "{}",
        c.agent_log("node-2")
    );
}

fn allow_client_policy() -> String {
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
     metadata: {name: web-from-client, namespace: default}\n\
     spec:\n  selector: {matchLabels: {app: server}}\n  action: ALLOW\n  rules:\n  \
     - from: [{source: {principals: [\"cluster.local/ns/default/sa/client\"]}}]\n---\n"
        .to_owned()
}

#[test]
fn meshctl_inspects_a_live_agent() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    let extra = yaml::peer_authentication("STRICT") + &allow_client_policy();
    let (client, server) = setup(&mut c, 71, &extra);
    c.start_agent("node-1").unwrap();
    c.start_agent("node-2").unwrap();

    // A connection that stays open while we look.
    let mut stream = c
        .spawn(&client, &["stream", "--addr", &sa(vip(71), 80)])
        .unwrap();
    let mut out = BufReader::new(stream.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    // One round trip: the connection is through the agent and registered.
    let mut stdin = stream.stdin.take().unwrap();
    writeln!(stdin, "hello").unwrap();
    stdin.flush().unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "hello", "the stream did not echo");

    let status = c.meshctl_json("node-1", &["status"]).unwrap();
    assert_eq!(status["ready"], true, "{status}");
    assert_eq!(status["node"], "node-1", "{status}");
    assert!(!status["version"].as_str().unwrap().is_empty(), "{status}");
    let programs = status["programs"].to_string();
    for p in ["mesh_connect4", "mesh_sock_ops", "mesh_sk_lookup"] {
        assert!(programs.contains(p), "{status}");
    }
    let generation = status["config_generation"].as_u64().unwrap();
    assert!(generation >= 1, "{status}");

    let w = c.meshctl_json("node-1", &["workloads"]).unwrap();
    let find = |name: &str| {
        w["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no workload {name} in {w}"))
    };
    let cw = find("client");
    assert_eq!(cw["identity"], CLIENT_ID);
    assert_eq!(cw["node"], "node-1");
    assert_eq!(cw["ip"], client.ip.to_string());
    assert_eq!(cw["enrolled"], true, "{cw}");
    assert_eq!(cw["mtls_mode"], "STRICT", "{cw}");
    let sw = find("server");
    assert_eq!(sw["identity"], SERVER_ID);
    assert_eq!(sw["node"], "node-2");
    assert_eq!(sw["enrolled"], false, "a pod of another node: {sw}");
    assert_eq!(sw["meshed"], true, "{sw}");

    let s = c.meshctl_json("node-1", &["services"]).unwrap();
    let web = &s["services"][0];
    assert_eq!(web["name"], "web", "{s}");
    assert_eq!(web["cluster_ips"][0], vip(71).to_string(), "{s}");
    assert_eq!(web["ports"][0]["port"], 80, "{s}");
    assert_eq!(web["ports"][0]["target_port"], PORT.to_string(), "{s}");

    let e = c.meshctl_json("node-1", &["endpoints"]).unwrap();
    let svc = &e["services"][0];
    assert_eq!(svc["service"], "default/web", "{e}");
    assert_eq!(svc["frontend"], sa(vip(71), 80), "{e}");
    assert_eq!(svc["endpoints"][0]["address"], sa(server.ip, PORT), "{e}");
    assert_eq!(svc["endpoints"][0]["workload"], "default/server", "{e}");
    assert_eq!(svc["endpoints"][0]["node"], "node-2", "{e}");
    assert_eq!(svc["endpoints"][0]["identity"], SERVER_ID, "{e}");

    let p = c.meshctl_json("node-1", &["policies"]).unwrap();
    let policies = p["policies"].as_array().unwrap();
    assert!(
        policies
            .iter()
            .any(|x| x["kind"] == "PeerAuthentication" && x["action"] == "STRICT"),
        "{p}"
    );
    let allow = policies
        .iter()
        .find(|x| x["kind"] == "AuthorizationPolicy")
        .unwrap_or_else(|| panic!("{p}"));
    assert_eq!(allow["action"], "ALLOW", "{p}");
    assert_eq!(allow["scope"], "selector: app=server", "{p}");
    assert!(
        allow["summary"][0]
            .as_str()
            .unwrap()
            .contains("principals=cluster.local/ns/default/sa/client"),
        "{p}"
    );

    let certs = c.meshctl_json("node-1", &["certs"]).unwrap();
    let cert = &certs["certs"][0];
    assert_eq!(cert["identity"], CLIENT_ID, "{certs}");
    assert_eq!(cert["valid"], true, "{certs}");
    assert!(!cert["serial"].as_str().unwrap().is_empty(), "{certs}");
    assert!(cert["next_rotation"].as_str().unwrap() < cert["not_after"].as_str().unwrap());
    assert!(certs["trust_anchors"].as_u64().unwrap() >= 1, "{certs}");

    // The open stream, with its identities and the bytes it carried so far.
    let conns = c.meshctl_json("node-1", &["conns"]).unwrap();
    let live = conns["conns"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["mode"] == "hbone")
        .cloned()
        .unwrap_or_else(|| panic!("no open hbone connection in {conns}"));
    assert_eq!(live["source_identity"], CLIENT_ID, "{live}");
    assert_eq!(live["destination_identity"], SERVER_ID, "{live}");
    assert_eq!(live["destination_service"], "default/web", "{live}");
    assert_eq!(live["source_workload"], "default/client", "{live}");
    assert!(live["bytes_received"].as_u64().unwrap() > 0, "{live}");
    let inbound = c.meshctl_json("node-2", &["conns"]).unwrap();
    assert!(
        inbound["conns"]
            .as_array()
            .unwrap()
            .iter()
            .any(|x| x["mode"] == "inbound" && x["source_identity"] == CLIENT_ID),
        "{inbound}"
    );

    // The dump names a generation the status has named. On the Kubernetes API source
    // the agents' own pod marks (pods/status) come back as updates and can bring a
    // newer generation between two reads, so the status is read again after the dump
    // and the dump's generation must lie between the two readings.
    let dump = c.meshctl_json("node-1", &["config", "dump"]).unwrap();
    let after = c.meshctl_json("node-1", &["status"]).unwrap()["config_generation"]
        .as_u64()
        .unwrap();
    let dumped = dump["generation"].as_u64().unwrap();
    assert!(
        generation <= dumped && dumped <= after,
        "status said generation {generation}, then {after}; the dump {dump}"
    );
    assert_eq!(
        dump["config"]["pods"].as_array().unwrap().len(),
        2,
        "{dump}"
    );
    assert_eq!(dump["config"]["services"][0]["id"]["name"], "web", "{dump}");

    let metrics = c.meshctl("node-1", &["metrics"]).unwrap();
    let text = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        text.contains("istio_tcp_connections_opened_total"),
        "{text}"
    );
    assert_eq!(metric(&text, "mesh_connections_open", &[]), 1, "{text}");

    assert_eq!(
        c.meshctl_json("node-1", &["log-level", "get"]).unwrap()["filter"],
        "info"
    );
    let set = c
        .meshctl_json(
            "node-1",
            &["log-level", "set", "info,mesh_agent::proxy=debug"],
        )
        .unwrap();
    assert_eq!(set["filter"], "info,mesh_agent::proxy=debug");
    assert_eq!(
        c.meshctl_json("node-1", &["log-level", "get"]).unwrap()["filter"],
        "info,mesh_agent::proxy=debug"
    );
    let bad = c
        .meshctl("node-1", &["log-level", "set", "info,[[broken"])
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("invalid filter"),
        "{}",
        String::from_utf8_lossy(&bad.stderr)
    );

    let maps = c.meshctl_json("node-1", &["bpf", "maps"]).unwrap();
    let map = |name: &str| {
        maps["maps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no map {name} in {maps}"))
    };
    assert_eq!(map("MESH_SERVICES")["entries"], 1, "{maps}");
    assert_eq!(
        map("MESH_SERVICES")["max_entries"],
        mesh_common::limits::SERVICES,
        "{maps}"
    );
    assert_eq!(map("MESH_SERVICES")["kind"], "Hash", "{maps}");
    assert_eq!(map("MESH_ENROLLED_NETNS")["entries"], 1, "{maps}");
    assert_eq!(map("MESH_EVENTS")["kind"], "RingBuf", "{maps}");
    let dumped = c
        .meshctl_json("node-1", &["bpf", "maps", "--dump", "MESH_ENROLLED_NETNS"])
        .unwrap();
    assert_eq!(
        dumped["entries"][0]["value"],
        format!("STRICT own [{}]", client.ip),
        "{dumped}"
    );
    // No dump prints a kernel address (KASLR): socket maps name sockets opaquely.
    for name in ["MESH_SOCK_IDS", "MESH_SOCK_UNREAD", "MESH_SOCK_SENDING"] {
        let d = c
            .meshctl_json("node-1", &["bpf", "maps", "--dump", name])
            .unwrap();
        let text = d.to_string();
        assert!(
            !text.contains("0xffff"),
            "{name} prints a kernel address: {text}"
        );
    }
    let missing = c
        .meshctl("node-1", &["bpf", "maps", "--dump", "NOPE"])
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no map named NOPE"));

    // Tables by default, YAML on request.
    let table = c.meshctl("node-1", &["status"]).unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("ready") && l.ends_with("yes")),
        "{table}"
    );
    let yaml_out = c.meshctl("node-1", &["-o", "yaml", "certs"]).unwrap();
    assert!(
        String::from_utf8_lossy(&yaml_out.stdout).contains(&format!("identity: {CLIENT_ID}")),
        "{}",
        String::from_utf8_lossy(&yaml_out.stdout)
    );

    let _ = stream.kill();
    let _ = stream.wait();
}

#[test]
fn observe_streams_policy_denials_and_kernel_refusals() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    let outsider = c.add_pod("node-2", "outsider").unwrap();
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                metadata: {name: no-client, namespace: default}\n\
                spec:\n  selector: {matchLabels: {app: server}}\n  action: DENY\n  rules:\n  \
                - from: [{source: {principals: [\"cluster.local/ns/default/sa/client\"]}}]\n---\n";
    let extra = c.pod_yaml(&outsider, false) + &yaml::peer_authentication("STRICT") + deny;
    let (client, server) = setup(&mut c, 72, &extra);
    c.start_agent("node-1").unwrap();
    c.start_agent("node-2").unwrap();
    // Nobody observes: the programs send no flow events (each would cost a connect()
    // a ring buffer record and a wake-up).
    assert_eq!(flow_events(&c, "node-2"), "off");

    let (mut denied_watch, denied) = observe(&c, "node-2", &["--verdict", "denied"]);
    let (mut all_watch, all) = observe(&c, "node-2", &["--pod", "server"]);
    poll(
        "both observers to subscribe",
        Duration::from_secs(10),
        || metric(&c.metrics("node-2").unwrap(), "mesh_flow_observers", &[]) == 2,
    );
    assert_eq!(flow_events(&c, "node-2"), "on");

    let attempt = Instant::now();
    let refused = c.run_in(&client, &["who", "--addr", &sa(vip(72), 80)], SECS);
    eprintln!("the refused call took {:?}", attempt.elapsed());
    assert!(refused.is_err(), "the DENY policy let the client through");
    let (event, seen) =
        wait_for(&denied, Duration::from_secs(5), |_| true).expect("no denied flow event");
    eprintln!(
        "denial shown by observe {:?} after the attempt started",
        seen - attempt
    );
    assert!(
        seen - attempt < Duration::from_secs(1),
        "the denial was shown {:?} after the attempt",
        seen - attempt
    );
    assert_eq!(event["verdict"], "denied", "{event}");
    assert_eq!(event["origin"], "agent", "{event}");
    assert_eq!(event["pod"], "default/server", "{event}");
    assert_eq!(event["source_identity"], CLIENT_ID, "{event}");
    assert!(
        event["reason"]
            .as_str()
            .unwrap()
            .contains("default/no-client"),
        "{event}"
    );

    // The kernel's STRICT refusal of plaintext reaches the same stream.
    let plaintext = c.run_in(&outsider, &["who", "--addr", &sa(server.ip, PORT)], SECS);
    assert!(plaintext.is_err(), "STRICT let plaintext through");
    let (event, _) = wait_for(&all, Duration::from_secs(5), |v| {
        v["kind"] == "refused_strict"
    })
    .expect("no kernel refused_strict event");
    assert_eq!(event["origin"], "kernel", "{event}");
    assert_eq!(event["verdict"], "dropped", "{event}");
    assert_eq!(event["destination"], sa(server.ip, PORT), "{event}");
    assert!(
        event["source"]
            .as_str()
            .unwrap()
            .starts_with(&format!("{}:", outsider.ip)),
        "{event}"
    );
    // The filtered stream saw only the denial.
    assert!(
        wait_for(&denied, Duration::from_millis(300), |v| v["verdict"]
            != "denied")
        .is_none(),
        "--verdict denied let another verdict through"
    );
    for w in [&mut denied_watch, &mut all_watch] {
        let _ = w.kill();
        let _ = w.wait();
    }
    // Observers that leave are forgotten, even when nothing matched their filter.
    poll("the observers to be gone", Duration::from_secs(5), || {
        metric(&c.metrics("node-2").unwrap(), "mesh_flow_observers", &[]) == 0
    });
    // And the programs stop sending flow events.
    poll(
        "the kernel's flow events to go off",
        Duration::from_secs(5),
        || flow_events(&c, "node-2") == "off",
    );
    let plaintext = c.run_in(&outsider, &["who", "--addr", &sa(server.ip, PORT)], SECS);
    assert!(plaintext.is_err(), "STRICT let plaintext through");
}

/// The `flow_events` switch in the node's `MESH_SETTINGS`.
fn flow_events(c: &Cluster, node: &str) -> String {
    let settings = c
        .meshctl_json(node, &["bpf", "maps", "--dump", "MESH_SETTINGS"])
        .unwrap();
    settings["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == "flow_events")
        .and_then(|e| e["value"].as_str())
        .unwrap_or_else(|| panic!("{settings}"))
        .to_owned()
}

#[test]
fn the_admin_socket_is_root_only_and_garbage_hurts_nobody() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    let (client, _server) = setup(&mut c, 73, "");
    c.start_agent("node-1").unwrap();
    c.start_agent("node-2").unwrap();
    let sock = c.admin_socket("node-1");
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "admin socket mode {mode:o}");

    // A copy of meshctl an unprivileged user can run, in a directory it can enter, so
    // that only the socket's own permission stands in the way.
    std::fs::set_permissions(&c.work_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let bin = c.work_dir.join("meshctl-copy");
    std::fs::copy(c.meshctl_bin(), &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .arg("--socket")
        .arg(&sock)
        .arg("status")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a non-root caller got in: {stderr}");
    assert!(
        stderr.contains("permission denied") && stderr.contains("root"),
        "{stderr}"
    );

    // Garbage: random bytes, an HTTP/2 preface followed by junk, a half-written
    // frame, and a crowd of idle connections.
    let mut junk = Vec::new();
    for (i, prefix) in [
        &b""[..],
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04\x00",
    ]
    .iter()
    .enumerate()
    {
        let mut s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut bytes = prefix.to_vec();
        bytes.extend(Pattern::bytes(i as u64, 64 * 1024));
        let _ = s.write_all(&bytes);
        let mut sink = Vec::new();
        let _ = s.read_to_end(&mut sink);
        junk.push(s);
    }
    let idle: Vec<_> = (0..50)
        .map(|_| std::os::unix::net::UnixStream::connect(&sock).unwrap())
        .collect();
    // The API still answers, while the idle ones are still connected...
    let status = c.meshctl_json("node-1", &["status"]).unwrap();
    assert_eq!(status["ready"], true, "{status}");
    drop(idle);
    drop(junk);
    // ...and traffic still flows through the agent.
    let out = c
        .run_in(&client, &["who", "--addr", &sa(vip(73), 80)], SECS)
        .unwrap();
    assert!(
        json(&out)["replies"][0]
            .as_str()
            .unwrap()
            .starts_with("server "),
        "{out}"
    );
    let pid = c.agent_pid("node-1").unwrap();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
}

#[test]
fn readiness_turns_true_only_once_the_programs_are_attached() {
    let _g = serial();
    let mut c = cluster(&["node-1"]);
    let pod = c.add_pod("node-1", "app").unwrap();
    c.write_config("cluster.yaml", &c.pod_yaml(&pod, true))
        .unwrap();
    // A cgroup that does not exist yet: the agent cannot attach and must say so.
    let late = c.node("node-1").cgroup.join("late");
    c.agent_cgroup = Some(late.clone());
    let dir = c.config_dir.clone();
    c.launch_agent("node-1", &dir).unwrap();

    poll("the readiness endpoint", Duration::from_secs(10), || {
        c.readiness("node-1").is_ok()
    });
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        let (code, body) = c.readiness("node-1").unwrap();
        assert_eq!(code, 503, "{body}");
        assert!(body.contains("eBPF programs not attached"), "{body}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let status = c.meshctl_json("node-1", &["status"]).unwrap();
    assert_eq!(status["ready"], false, "{status}");
    assert_eq!(status["not_ready_reason"], "eBPF programs not attached");
    assert_eq!(status["programs"], serde_json::json!([]), "{status}");

    std::fs::create_dir(&late).unwrap();
    c.wait_ready("node-1", Duration::from_secs(15)).unwrap();
    let status = c.meshctl_json("node-1", &["status"]).unwrap();
    assert_eq!(status["ready"], true, "{status}");
    let attached = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(&late)
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&attached.stdout).contains("mesh_connect4"),
        "{}",
        String::from_utf8_lossy(&attached.stdout)
    );
    c.stop_agent("node-1").unwrap();
    std::fs::remove_dir(&late).unwrap();
}

#[test]
fn check_passes_here_and_names_what_is_missing() {
    let _g = serial();
    let meshctl = agent_bin().with_file_name("meshctl");
    let ok = Command::new(&meshctl).arg("check").output().unwrap();
    let text = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{text}");
    assert!(text.contains("this node can run the mesh"), "{text}");

    // The same check with BTF hidden (a private mount namespace, so nothing else on
    // the machine sees it).
    let script = format!(
        "mount --bind /dev/null /sys/kernel/btf/vmlinux && exec {} -o json check",
        meshctl.display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "check passed without BTF: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let checks: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let failed: Vec<&serde_json::Value> = checks
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["outcome"] == "fail")
        .collect();
    assert_eq!(failed.len(), 1, "{checks}");
    assert_eq!(failed[0]["name"], "BTF", "{checks}");
    assert!(
        failed[0]["detail"]
            .as_str()
            .unwrap()
            .contains("CONFIG_DEBUG_INFO_BTF"),
        "{checks}"
    );
}
