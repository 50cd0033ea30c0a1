//! Shared setup of the end-to-end tests.
#![allow(dead_code)]

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Mutex, mpsc},
    time::{Duration, Instant},
};

#[allow(unused_imports, reason = "not every test file writes YAML")]
pub use mesh_tests::{Cluster, Pod, yaml};

/// The tests share the kernel's cgroup root and bpffs: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

pub fn agent_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_AGENT_BIN") {
        return p.into();
    }
    // target/<profile>/deps/<test> -> target/<profile>/mesh-agent
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target dir")
        .join("mesh-agent");
    assert!(
        bin.exists(),
        "{} not built: run `cargo build -p mesh-agent` (cargo xtask test does)",
        bin.display()
    );
    bin
}

pub fn cluster(nodes: &[&str]) -> Cluster {
    let mut c = Cluster::new(
        nodes,
        &agent_bin(),
        env!("CARGO_BIN_EXE_mesh-testpod").as_ref(),
    )
    .expect("creating the simulated cluster");
    // `MESH_TEST_SOURCE=kubernetes`: the same test with the agents on the (fake)
    // Kubernetes API, every config file mirrored to it.
    if kubernetes_mode() {
        c.use_kubernetes_api()
            .expect("starting the fake Kubernetes API server");
    }
    c
}

/// Whether the agents read the fake Kubernetes API (`MESH_TEST_SOURCE=kubernetes`).
pub fn kubernetes_mode() -> bool {
    std::env::var("MESH_TEST_SOURCE").is_ok_and(|v| v == "kubernetes")
}

pub const PORT: u16 = 8080;
pub const SECS: Duration = Duration::from_secs(30);

pub fn vip(last: u8) -> IpAddr {
    IpAddr::from([10, 96, 0, last])
}

pub fn sa(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// Starts `mesh-testpod serve` in `pod` with the pod's name as its identity.
pub fn serve(c: &mut Cluster, pod: &Pod) {
    c.start_server(pod, PORT).expect("start server");
}

pub fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad JSON {out:?}: {e}"))
}

/// Sends `bytes` from `pod` to `addr` (`mesh-testpod sink`) and checks the server
/// received exactly them: its reply is their length and SHA-256.
pub fn sink_verified(c: &mut Cluster, pod: &Pod, addr: &str, bytes: u64, timeout: Duration) {
    let out = json(
        &c.run_in(
            pod,
            &["sink", "--addr", addr, "--bytes", &bytes.to_string()],
            timeout,
        )
        .unwrap(),
    );
    let sent_sha = out["sent_sha"].as_str().unwrap();
    assert_eq!(
        out["reply"].as_str().unwrap(),
        format!("{bytes} {sent_sha}"),
        "{out}"
    );
}

/// The access log lines of an agent log (one per connection, `connection closed` on
/// the `access` target, which always carries a `reporter`).
#[allow(dead_code, reason = "not every test file reads the access log")]
pub fn access_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|l| l.contains("connection closed") && l.contains(" reporter="))
        .collect()
}

/// Whether an access log line has every `key="value"` given.
#[allow(dead_code, reason = "not every test file reads the access log")]
pub fn has_fields(line: &str, fields: &[(&str, &str)]) -> bool {
    fields
        .iter()
        .all(|(k, v)| line.contains(&format!(" {k}=\"{v}")))
}

/// Whether the agents run with sockmap acceleration: they read `MESH_SOCKMAP` from the
/// environment they inherit, so `MESH_SOCKMAP=off cargo test` runs every test without it.
pub fn sockmap_on() -> bool {
    std::env::var("MESH_SOCKMAP").map_or(true, |v| v != "off")
}

/// The kernel counters of an agent, by name, from `meshctl bpf maps --dump`.
pub fn kernel_counters(c: &Cluster, node: &str) -> std::collections::HashMap<String, u64> {
    let dump = c
        .meshctl_json(node, &["bpf", "maps", "--dump", "MESH_COUNTERS"])
        .expect("meshctl bpf maps --dump MESH_COUNTERS");
    dump["entries"]
        .as_array()
        .unwrap_or_else(|| panic!("no entries: {dump}"))
        .iter()
        .map(|e| {
            let k = e["key"].as_str().unwrap_or_default().to_owned();
            let v = e["value"].as_str().and_then(|v| v.parse().ok());
            (k, v.unwrap_or_else(|| panic!("bad counter {e}")))
        })
        .collect()
}

/// The sum of the samples of `name` whose labels include every `labels` pair.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// Reads `meshctl observe -o json` lines on a thread, so the test can wait with a
/// deadline.
/// Each event comes with the instant its line arrived.
pub type Events = mpsc::Receiver<(serde_json::Value, Instant)>;

pub fn observe(c: &Cluster, node: &str, args: &[&str]) -> (std::process::Child, Events) {
    let mut child = Command::new(c.meshctl_bin())
        .arg("--socket")
        .arg(c.admin_socket(node))
        .args(["-o", "json", "observe"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Ok(v) = serde_json::from_str(&line)
                && tx.send((v, Instant::now())).is_err()
            {
                return;
            }
        }
    });
    (child, rx)
}

pub fn wait_for(
    rx: &Events,
    timeout: Duration,
    f: impl Fn(&serde_json::Value) -> bool,
) -> Option<(serde_json::Value, Instant)> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.checked_duration_since(Instant::now())?;
        match rx.recv_timeout(left) {
            Ok((v, at)) if f(&v) => return Some((v, at)),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// Waits until `f` holds, failing the test after `timeout`.
pub fn poll(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The name of the pod that answered `who` from `pod` to `addr`, or "" when the
/// connection failed (a pod between two states, or refused).
pub fn who_answers(c: &mut Cluster, pod: &Pod, addr: &str) -> String {
    c.run_in(pod, &["who", "--addr", addr], SECS)
        .ok()
        .and_then(|out| serde_json::from_str::<serde_json::Value>(out.trim()).ok())
        .and_then(|v| v["replies"][0].as_str().map(str::to_owned))
        .and_then(|r| r.split(' ').next().map(str::to_owned))
        .unwrap_or_default()
}

/// The names of the pods that answered `count` connections opened at once from `pod`
/// to `addr` (`mesh-testpod who --count`); panics if any failed.
pub fn answering(c: &mut Cluster, pod: &Pod, addr: &str, count: usize) -> Vec<String> {
    let out = c
        .run_in(
            pod,
            &["who", "--addr", addr, "--count", &count.to_string()],
            SECS,
        )
        .unwrap();
    json(&out)["replies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().split(' ').next().unwrap().to_owned())
        .collect()
}

/// Pods `direct` and `meshed` on `node`, both serving on [`PORT`], and Service
/// `decoy`, whose ClusterIP is really `direct`'s address and whose endpoint is
/// `meshed`: from a pod, a connection to `addr` that reaches `direct` was not
/// captured; one that reaches `meshed` went through the agent.
pub struct Decoy {
    pub direct: Pod,
    pub meshed: Pod,
    /// The two pods and the Service, for the config.
    pub yaml: String,
    pub addr: String,
}

pub fn decoy(c: &mut Cluster, node: &str) -> Decoy {
    let direct = c.add_pod(node, "direct").unwrap();
    let meshed = c.add_pod(node, "meshed").unwrap();
    serve(c, &direct);
    serve(c, &meshed);
    let yaml = c.pod_yaml(&direct, true)
        + &c.pod_yaml(&meshed, true)
        + &yaml::service("decoy", direct.ip, PORT, PORT)
        + &yaml::endpoint_slice("decoy", PORT, &[meshed.ip]);
    let addr = sa(direct.ip, PORT);
    Decoy {
        direct,
        meshed,
        yaml,
        addr,
    }
}

/// A config directory of node-1's own that lies: it claims `server`'s pod runs on
/// node-1 (a compromised node asking the CA for another node's identity).
#[allow(dead_code, reason = "not every test file uses it")]
pub fn lying_config(c: &Cluster, client: &Pod, server: &Pod) -> std::path::PathBuf {
    let own = c.work_dir.join("node-1-config");
    std::fs::create_dir_all(&own).unwrap();
    let lie = c.pod_yaml(client, true)
        + &c.pod_yaml(server, true)
            .replace("nodeName: node-2", "nodeName: node-1");
    std::fs::write(own.join("cluster.yaml"), lie).unwrap();
    own
}

/// Plaintext probes from a pod outside the mesh, every 50 ms for `secs`, while `f`
/// runs: how many were answered.
pub fn answered_while(
    c: &mut Cluster,
    from: &Pod,
    addr: &str,
    secs: u64,
    f: impl FnOnce(&mut Cluster),
) -> serde_json::Value {
    let probe = c
        .spawn(
            from,
            &[
                "probe",
                "--addr",
                addr,
                "--secs",
                &secs.to_string(),
                "--every-ms",
                "50",
            ],
        )
        .unwrap();
    f(c);
    let out = probe.wait_with_output().unwrap();
    json(&String::from_utf8_lossy(&out.stdout))
}

/// Long-lived echo streams from one pod (`mesh-testpod streams`), each checked end to
/// end (SHA-256 of what was sent and what came back) when they are stopped.
pub struct Streams {
    child: std::process::Child,
    out: BufReader<std::process::ChildStdout>,
    count: usize,
}

impl Streams {
    /// Opens `count` streams from `pod` to `addr` (`extra`: more `streams` options)
    /// and waits until all are open.
    pub fn open(c: &mut Cluster, pod: &Pod, addr: &str, count: usize, extra: &[&str]) -> Streams {
        let count_arg = count.to_string();
        let mut args = vec!["streams", "--addr", addr, "--count", &count_arg];
        args.extend_from_slice(extra);
        let mut child = c.spawn(pod, &args).unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert_eq!(json(&line)["ready"], count, "{line}");
        Streams { child, out, count }
    }

    /// Stops the streams and returns each one's result.
    pub fn finish(mut self) -> Vec<serde_json::Value> {
        use std::io::Write as _;
        self.child
            .stdin
            .as_mut()
            .unwrap()
            .write_all(b"stop\n")
            .unwrap();
        let mut line = String::new();
        self.out.read_line(&mut line).unwrap();
        let _ = self.child.wait();
        let streams = json(&line)["streams"].as_array().unwrap().clone();
        assert_eq!(streams.len(), self.count, "{line}");
        streams
    }

    /// Stops the streams and asserts every one carried bytes and lost none.
    pub fn check(self, what: &str) {
        for r in self.finish() {
            assert!(r["error"].is_null(), "{what}: a stream failed: {r}");
            assert!(
                r["bytes"].as_u64().unwrap() > 0,
                "{what}: nothing streamed: {r}"
            );
            assert_eq!(r["sent_sha"], r["got_sha"], "{what}: {r}");
        }
    }
}
