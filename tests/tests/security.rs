//! Zero-trust transport: encryption on the wire, identity checks on both ends of the
//! tunnel, certificate rotation, STRICT/PERMISSIVE inbound, L4 authorization and the
//! CA's node check. Each test builds its own simulated cluster.
mod common;

use std::{
    io::{BufRead as _, Write as _},
    process::{Command, Stdio},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use common::*;
use mesh_tests::{pattern::Pattern, tls};

const TUNNEL: u16 = mesh_common::INBOUND_TUNNEL_PORT;

/// Waits until the agent on `node` has applied a config generation newer than the
/// ones it had logged before.
fn wait_applied(c: &Cluster, node: &str, before: usize) {
    poll("config to be applied", Duration::from_secs(10), || {
        c.agent_log(node).matches("config applied").count() > before
    });
}

fn applied(c: &Cluster, node: &str) -> usize {
    c.agent_log(node).matches("config applied").count()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Two nodes; `client` on node-1, `server` on node-2 behind vip(50).
fn client_server(c: &mut Cluster) -> (Pod, Pod) {
    let client = c.add_pod("node-1", "client").unwrap();
    let server = c.add_pod("node-2", "server").unwrap();
    serve(c, &server);
    let cfg = c.pod_yaml(&client, true)
        + &c.pod_yaml(&server, true)
        + &yaml::service("web", vip(50), 80, PORT)
        + &yaml::endpoint_slice("web", PORT, &[server.ip]);
    c.write_config("cluster.yaml", &cfg).unwrap();
    (client, server)
}

/// Offsets of 48-byte windows of the payload to look for in a capture.
fn windows(seed: u64, len: usize) -> Vec<Vec<u8>> {
    let payload = Pattern::bytes(seed, len);
    (0..32)
        .map(|k| {
            let at = 1000 + k * (len - 2000) / 32;
            payload[at..at + 48].to_vec()
        })
        .collect()
}

fn found(capture: &[u8], windows: &[Vec<u8>]) -> usize {
    windows
        .iter()
        .filter(|w| capture.windows(w.len()).any(|x| x == w.as_slice()))
        .count()
}

/// Runs `sink` from `pod` to `addr` while tcpdump records the fabric bridge; returns
/// the capture.
fn capture_transfer(c: &mut Cluster, pod: &Pod, addr: &str, seed: u64, len: usize) -> Vec<u8> {
    let file = c.work_dir.join(format!("capture-{seed}.pcap"));
    let mut dump = Command::new("ip")
        .args([
            "netns",
            "exec",
            c.fabric_netns(),
            "tcpdump",
            "-i",
            "br0",
            "-s",
            "0",
            "-U",
            "--immediate-mode",
            // A 64 MiB capture buffer holds the whole transfer (4 MiB and its
            // headers) even when tcpdump gets no CPU until it ends: with the
            // default 2 MiB, a loaded machine dropped most of it (919,755 bytes
            // captured of 4 MiB once, in a full suite run).
            "-B",
            "65536",
            "-w",
        ])
        .arg(&file)
        .arg("tcp")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tcpdump");
    let mut line = String::new();
    std::io::BufReader::new(dump.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("listening"), "tcpdump: {line}");
    let out = c
        .run_in(
            pod,
            &[
                "sink",
                "--addr",
                addr,
                "--bytes",
                &len.to_string(),
                "--seed",
                &seed.to_string(),
            ],
            SECS,
        )
        .unwrap();
    let v = json(&out);
    assert!(
        v["reply"]
            .as_str()
            .unwrap_or("")
            .starts_with(&format!("{len} ")),
        "transfer incomplete: {out}"
    );
    mesh_tests::proc::wait_settled(&file, Duration::from_secs(2));
    mesh_tests::cluster::terminate(&mut dump, Duration::from_secs(5)).ok();
    std::fs::read(&file).unwrap()
}

#[test]
fn cross_node_bytes_are_encrypted_on_the_wire() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    let (client, server) = client_server(&mut c);
    c.start_agent("node-1").unwrap();
    c.start_agent("node-2").unwrap();
    const LEN: usize = 4 * 1024 * 1024;
    let seed = now() as u64 | 1;

    let meshed = capture_transfer(&mut c, &client, &sa(vip(50), 80), seed, LEN);
    assert!(
        meshed.len() > LEN / 2,
        "capture too small: {} bytes",
        meshed.len()
    );
    assert_eq!(
        found(&meshed, &windows(seed, LEN)),
        0,
        "plaintext payload seen on the wire between the nodes"
    );
    assert!(
        c.agent_log("node-1").contains("mode=\"hbone\""),
        "{}",
        c.agent_log("node-1")
    );

    // Without the mesh the same capture does see the payload: the capture works.
    c.stop_agent("node-1").unwrap();
    c.stop_agent("node-2").unwrap();
    let seed = seed.wrapping_mul(31) | 1;
    let plain = capture_transfer(&mut c, &client, &sa(server.ip, PORT), seed, LEN);
    assert!(
        found(&plain, &windows(seed, LEN)) >= 16,
        "the capture did not see the plaintext transfer"
    );
}

/// Starts `tls-serve` on the tunnel port of `pod` with a chain for `uri`.
fn fake_tunnel_endpoint(
    c: &mut Cluster,
    pod: &Pod,
    name: &str,
    (cert, key): (String, String),
) -> std::process::Child {
    let cert_file = c.work_dir.join(format!("{name}.crt"));
    let key_file = c.work_dir.join(format!("{name}.key"));
    std::fs::write(&cert_file, cert).unwrap();
    std::fs::write(&key_file, key).unwrap();
    let mut child = c
        .spawn(
            pod,
            &[
                "tls-serve",
                "--port",
                &TUNNEL.to_string(),
                "--cert",
                &cert_file.display().to_string(),
                "--key",
                &key_file.display().to_string(),
            ],
        )
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stderr.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("listening"), "{line}");
    child
}

#[test]
fn tunnel_fails_closed_unless_the_peer_proves_the_expected_identity() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    let (client, server) = client_server(&mut c);
    // Only node-1 runs an agent: node-2's tunnel port is played by a test server.
    c.start_agent("node-1").unwrap();
    let (root_cert, root_key) = c.ca_root();
    let root_cert = std::fs::read_to_string(root_cert).unwrap();
    let root_key = std::fs::read_to_string(root_key).unwrap();
    let want = "spiffe://cluster.local/ns/default/sa/server";
    let rogue = tls::rogue_ca().unwrap();
    let cases = [
        (
            "valid",
            tls::issue(want, &root_cert, &root_key, now() - 60, now() + 3600),
            true,
        ),
        (
            "wrong-identity",
            tls::issue(
                "spiffe://cluster.local/ns/default/sa/other",
                &root_cert,
                &root_key,
                now() - 60,
                now() + 3600,
            ),
            false,
        ),
        (
            "untrusted",
            tls::issue(want, &rogue.0, &rogue.1, now() - 60, now() + 3600),
            false,
        ),
        (
            "expired",
            tls::issue(want, &root_cert, &root_key, now() - 7200, now() - 3600),
            false,
        ),
    ];
    for (name, chain, handshake_ok) in cases {
        let mut fake = fake_tunnel_endpoint(&mut c, &server, name, chain.unwrap());
        // The fake endpoint does not speak the tunnel protocol, so the call fails
        // either way; what matters is whether the agent completed the TLS handshake.
        let call = c.run_in(&client, &["who", "--addr", &sa(vip(50), 80)], SECS);
        assert!(call.is_err(), "{name}: the call must fail closed");
        let mut line = String::new();
        std::io::BufReader::new(fake.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let v = json(&line);
        assert_eq!(
            v["handshake"] == "ok",
            handshake_ok,
            "{name}: server saw {line}; agent log:\n{}",
            c.agent_log("node-1")
        );
        let _ = fake.kill();
        let _ = fake.wait();
    }
    let log = c.agent_log("node-1");
    let refused = log
        .lines()
        .filter(|l| l.contains("connection refused; resetting client"))
        .filter(|l| l.contains("tls_handshake_failed"))
        .count();
    assert_eq!(refused, 3, "{log}");
    assert!(
        log.contains("peer is spiffe://cluster.local/ns/default/sa/other, expected"),
        "{log}"
    );
}

#[test]
fn certificates_rotate_under_traffic_and_tls12_is_refused() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    c.cert_ttl = "4s".into();
    // Short-lived tunnel connections, so that new handshakes happen during rotation.
    c.agent_args = vec!["--tunnel-idle-timeout".into(), "200ms".into()];
    let (client, server) = client_server(&mut c);
    // The tunnel port is probed from outside the mesh: an enrolled pod's connection
    // to it would be captured by its own agent.
    let outsider = c.add_pod("node-1", "outsider").unwrap();
    let cfg = std::fs::read_to_string(c.config_dir.join("cluster.yaml")).unwrap()
        + &c.pod_yaml(&outsider, false);
    c.write_config("cluster.yaml", &cfg).unwrap();
    c.start_agent("node-1").unwrap();
    c.start_agent("node-2").unwrap();
    let tunnel = sa(server.ip, TUNNEL);
    let peek = |c: &mut Cluster| {
        json(
            &c.run_in(&outsider, &["tls-peek", "--addr", &tunnel], SECS)
                .unwrap(),
        )
    };
    let before = peek(&mut c);
    assert_eq!(before["uri"], "spiffe://cluster.local/ns/default/sa/server");
    // The certificate a live pod presents follows the X.509-SVID profile: no subject,
    // one URI SAN, not a CA, a signing key only, for both TLS client and server.
    assert_eq!(before["subject_attributes"], 0, "{before}");
    assert_eq!(
        before["sans"],
        serde_json::json!(["URI(spiffe://cluster.local/ns/default/sa/server)"]),
        "{before}"
    );
    assert_eq!(before["ca"], false, "basicConstraints CA:FALSE: {before}");
    assert_eq!(
        before["key_usage"],
        serde_json::json!({"digital_signature": true, "key_encipherment": false, "key_cert_sign": false}),
        "{before}"
    );
    assert_eq!(
        before["ext_key_usage"],
        serde_json::json!({"server_auth": true, "client_auth": true}),
        "{before}"
    );

    let out = c
        .run_in(
            &client,
            &["loop", "--addr", &sa(vip(50), 80), "--secs", "9"],
            Duration::from_secs(60),
        )
        .unwrap();
    let v = json(&out);
    assert_eq!(v["failed"], serde_json::json!([]), "{out}");
    assert!(v["ok"].as_u64().unwrap() > 20, "{out}");

    let after = peek(&mut c);
    assert_eq!(after["uri"], before["uri"]);
    assert_ne!(
        after["serial"], before["serial"],
        "the served certificate did not change"
    );
    let issued = c.agent_log("node-2").matches("certificate issued").count();
    assert!(
        issued >= 3,
        "node-2 issued {issued} certificates in ~10s with a 4s lifetime"
    );

    let probe = json(
        &c.run_in(&outsider, &["tls12-probe", "--addr", &tunnel], SECS)
            .unwrap(),
    );
    assert_eq!(
        probe["handshake"], "failed",
        "a TLS 1.2 client was accepted: {probe}"
    );
}

#[test]
fn strict_refuses_plaintext_permissive_accepts_it_and_switching_needs_no_restart() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    let (client, server) = client_server(&mut c);
    let outsider = c.add_pod("node-2", "outsider").unwrap();
    let base = std::fs::read_to_string(c.config_dir.join("cluster.yaml")).unwrap()
        + &c.pod_yaml(&outsider, false);
    c.write_config("cluster.yaml", &base).unwrap();
    c.start_agent("node-1").unwrap();
    c.start_agent("node-2").unwrap();
    let direct = sa(server.ip, PORT);
    let plaintext = |c: &mut Cluster| c.run_in(&outsider, &["who", "--addr", &direct], SECS);
    let meshed = |c: &mut Cluster| c.run_in(&client, &["who", "--addr", &sa(vip(50), 80)], SECS);

    // Default PERMISSIVE: accepted through the agent, which marks it as plaintext.
    let out = plaintext(&mut c).unwrap();
    assert!(
        json(&out)["replies"][0]
            .as_str()
            .unwrap()
            .starts_with("server "),
        "{out}"
    );
    poll(
        "the plaintext connection log",
        Duration::from_secs(5),
        || {
            access_lines(&c.agent_log("node-2")).iter().any(|l| {
                has_fields(
                    l,
                    &[
                        ("mode", "plaintext"),
                        ("security", "none"),
                        ("verdict", "forwarded"),
                    ],
                )
            })
        },
    );

    for (mode, plaintext_ok) in [("STRICT", false), ("PERMISSIVE", true)] {
        let before = applied(&c, "node-2");
        c.write_config("peer-auth.yaml", &yaml::peer_authentication(mode))
            .unwrap();
        wait_applied(&c, "node-2", before);
        assert_eq!(plaintext(&mut c).is_ok(), plaintext_ok, "{mode}: plaintext");
        meshed(&mut c).unwrap_or_else(|e| panic!("{mode}: mesh traffic must flow: {e}"));
    }
    let log = c.agent_log("node-2");
    assert!(
        log.contains("inbound mTLS mode changed pod=default/server mode=Strict"),
        "{log}"
    );
    assert_eq!(
        log.matches("agent running").count(),
        1,
        "the agent restarted"
    );

    // Fail closed: a crashed agent leaves the sk_lookup program pinned, so a STRICT
    // pod keeps refusing plaintext until a new agent takes over. A clean stop
    // (SIGTERM) takes the pod out of the mesh, enforcement included.
    let before = applied(&c, "node-2");
    c.write_config("peer-auth.yaml", &yaml::peer_authentication("STRICT"))
        .unwrap();
    wait_applied(&c, "node-2", before);
    assert!(plaintext(&mut c).is_err(), "STRICT before the crash");
    c.crash_agent("node-2").unwrap();
    assert!(
        plaintext(&mut c).is_err(),
        "a crashed agent must leave STRICT enforced"
    );
    c.start_agent("node-2").unwrap();
    meshed(&mut c).unwrap_or_else(|e| panic!("after the restart, mesh traffic must flow: {e}"));
    assert!(plaintext(&mut c).is_err(), "STRICT after the restart");
    c.stop_agent("node-2").unwrap();
    plaintext(&mut c).unwrap_or_else(|e| panic!("a stopped agent must leave no enforcement: {e}"));
}

fn policy(name: &str, action: &str, rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: default}}\n\
         spec:\n  selector: {{matchLabels: {{app: server}}}}\n  action: {action}\n  rules:\n{rules}---\n"
    )
}

#[test]
fn authorization_deny_allow_and_audit_across_nodes_and_on_the_same_node() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    let client = c.add_pod("node-1", "client").unwrap();
    let other = c.add_pod("node-1", "other").unwrap();
    let server = c.add_pod("node-2", "server").unwrap();
    serve(&mut c, &server);
    // A replica of the same workload on node-1: same-node delivery, same policy.
    let local = c.add_pod("node-1", "local").unwrap();
    serve(&mut c, &local);
    let local_yaml = c
        .pod_yaml(&local, true)
        .replace("labels: {app: local}", "labels: {app: server}");
    let cfg = c.pod_yaml(&client, true)
        + &c.pod_yaml(&other, true)
        + &c.pod_yaml(&server, true)
        + &local_yaml
        + &yaml::service("remote", vip(60), 80, PORT)
        + &yaml::endpoint_slice("remote", PORT, &[server.ip])
        + &yaml::service("local", vip(61), 80, PORT)
        + &yaml::endpoint_slice("local", PORT, &[local.ip]);
    c.write_config("cluster.yaml", &cfg).unwrap();
    c.start_agent("node-1").unwrap();
    c.start_agent("node-2").unwrap();
    let call = |c: &mut Cluster, pod: &Pod, v: u8| {
        c.run_in(pod, &["who", "--addr", &sa(vip(v), 80)], SECS)
            .is_ok()
    };

    // Connections opened before the policy exists.
    let mut streams = Vec::new();
    for v in [60, 61] {
        let mut s = c
            .spawn(&client, &["stream", "--addr", &sa(vip(v), 80)])
            .unwrap();
        let mut out = std::io::BufReader::new(s.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready");
        streams.push((s, out));
    }

    let apply = |c: &mut Cluster, text: &str| {
        let (b1, b2) = (applied(c, "node-1"), applied(c, "node-2"));
        c.write_config("policy.yaml", text).unwrap();
        wait_applied(c, "node-1", b1);
        wait_applied(c, "node-2", b2);
    };
    apply(
        &mut c,
        &policy(
            "deny-client",
            "DENY",
            "  - from: [{source: {principals: [\"cluster.local/ns/default/sa/client\"]}}]\n",
        ),
    );
    for (v, where_) in [(60, "across nodes"), (61, "on the same node")] {
        assert!(
            !call(&mut c, &client, v),
            "DENY must refuse client {where_}"
        );
        assert!(
            call(&mut c, &other, v),
            "DENY must not touch other {where_}"
        );
    }
    // The connections opened before the DENY are reset.
    for (mut s, mut out) in streams {
        let stdin = s.stdin.as_mut().unwrap();
        let _ = writeln!(stdin, "still there?");
        let _ = stdin.flush();
        let mut line = String::new();
        let _ = out.read_line(&mut line);
        assert!(
            !line.contains("still there?"),
            "an open connection survived the DENY"
        );
        let status = s.wait().unwrap();
        assert!(
            !status.success(),
            "the stream ended cleanly instead of failing"
        );
    }

    apply(
        &mut c,
        &policy(
            "allow-other",
            "ALLOW",
            "  - from: [{source: {principals: [\"cluster.local/ns/default/sa/other\"]}}]\n    to: [{operation: {ports: [\"8080\"]}}]\n",
        ),
    );
    for v in [60, 61] {
        assert!(!call(&mut c, &client, v), "ALLOW other must refuse client");
        assert!(call(&mut c, &other, v), "ALLOW other must admit other");
    }

    apply(
        &mut c,
        &policy(
            "audit",
            "AUDIT",
            "  - to: [{operation: {ports: [\"8080\"]}}]\n",
        ),
    );
    for v in [60, 61] {
        assert!(call(&mut c, &client, v), "AUDIT must not refuse");
    }
    poll("audit records", Duration::from_secs(5), || {
        c.agent_log("node-2")
            .contains("policy audit policy=default/audit")
            && c.agent_log("node-1")
                .contains("policy audit policy=default/audit")
    });
}

#[test]
fn the_ca_signs_only_identities_that_run_on_the_asking_node() {
    let _g = serial();
    let mut c = cluster(&["node-1", "node-2"]);
    let (client, server) = client_server(&mut c);
    // node-1 is compromised: its config claims a pod running as server's identity.
    let own = lying_config(&c, &client, &server);
    c.launch_agent("node-1", &own).unwrap();
    let ca_log = || c.ca_log();
    poll("the CA to refuse", Duration::from_secs(15), || {
        ca_log().contains(
            "node node-1 runs no pod with identity spiffe://cluster.local/ns/default/sa/server",
        )
    });
    // Each identity is requested by its own task, so the refusal can be
    // logged before the signature of the pod that does run there.
    poll(
        "the CA to sign the pod that runs there",
        Duration::from_secs(10),
        || {
            ca_log().contains(
            "certificate signed node=node-1 identity=spiffe://cluster.local/ns/default/sa/client",
        )
        },
    );
    poll(
        "the agent to report the refusal",
        Duration::from_secs(10),
        || c.agent_log("node-1").contains("CA refused"),
    );
    let (code, _) = c.readiness("node-1").unwrap();
    assert_eq!(code, 503, "a node with an unsignable pod must not be ready");
}

#[test]
fn a_tunnel_connect_to_the_mesh_ports_of_the_pod_is_refused_and_sessions_never_resume() {
    let _g = serial();
    let mut c = cluster(&["node-1"]);
    let server = c.add_pod("node-1", "server").unwrap();
    let outsider = c.add_pod("node-1", "outsider").unwrap();
    serve(&mut c, &server);
    let cfg = c.pod_yaml(&server, true) + &c.pod_yaml(&outsider, false);
    c.write_config("cluster.yaml", &cfg).unwrap();
    c.start_agent("node-1").unwrap();
    // A valid workload certificate from the mesh's own CA.
    let client_id = issue_to_files(&c, "client", "spiffe://cluster.local/ns/default/sa/client");
    let tunnel = sa(server.ip, TUNNEL);
    let status = |c: &mut Cluster, port: u16| {
        let out = tunnel_client(
            c,
            &outsider,
            "tunnel-connect",
            &tunnel,
            &sa(server.ip, port),
            &client_id,
        )
        .unwrap();
        json(&out)["status"].as_u64().unwrap()
    };
    // The application port is open to a valid identity; the mesh's own ports never.
    assert_eq!(status(&mut c, PORT), 200);
    for port in mesh_common::MESH_PORTS {
        assert_eq!(status(&mut c, port), 403, "CONNECT to :{port}");
    }
    // A certificate the mesh's root signed, but for another trust domain, is no
    // workload of this mesh.
    let foreign = issue_to_files(
        &c,
        "foreign",
        "spiffe://elsewhere.example/ns/default/sa/client",
    );
    let r = tunnel_client(
        &mut c,
        &outsider,
        "tunnel-connect",
        &tunnel,
        &sa(server.ip, PORT),
        &foreign,
    );
    assert!(
        r.as_ref().map_or(true, |out| json(out)["status"] != 200),
        "a peer from another trust domain got through: {r:?}"
    );
    // No TLS session can be resumed: every connection is a full handshake that checks
    // the certificate again.
    let out = tunnel_client(
        &mut c,
        &outsider,
        "tunnel-resume",
        &tunnel,
        &sa(server.ip, PORT),
        &client_id,
    )
    .unwrap();
    assert_eq!(json(&out)["second_handshake"], "full", "{out}");
}

/// A certificate for `uri` from the mesh's own root, valid for an hour, written to
/// `<name>.crt` / `<name>.key` in the work dir. Returns the two paths.
fn issue_to_files(c: &Cluster, name: &str, uri: &str) -> (String, String) {
    let (root_cert, root_key) = c.ca_root();
    let (chain, key) = tls::issue(
        uri,
        &std::fs::read_to_string(root_cert).unwrap(),
        &std::fs::read_to_string(root_key).unwrap(),
        now() - 60,
        now() + 3600,
    )
    .unwrap();
    let (cert_file, key_file) = (
        c.work_dir.join(format!("{name}.crt")),
        c.work_dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert_file, chain).unwrap();
    std::fs::write(&key_file, key).unwrap();
    (
        cert_file.display().to_string(),
        key_file.display().to_string(),
    )
}

/// Runs `mesh-testpod <command>` (tunnel-connect or tunnel-resume) in `from` against
/// the tunnel port `tunnel`, asking for `target`, as the workload in `cert`.
fn tunnel_client(
    c: &mut Cluster,
    from: &Pod,
    command: &str,
    tunnel: &str,
    target: &str,
    (cert, key): &(String, String),
) -> anyhow::Result<String> {
    c.run_in(
        from,
        &[
            command, "--addr", tunnel, "--target", target, "--cert", cert, "--key", key,
        ],
        SECS,
    )
}
