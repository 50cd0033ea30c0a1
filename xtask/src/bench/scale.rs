//! Scale: a generated config of many services and endpoints. How long until the agent
//! has it in its tables and the kernel map, what it costs in memory, and how long one
//! endpoint change takes at that size: ten changes, one at a time, each timed by the
//! agent itself (from the first file event to the kernel map and tables updated, and
//! its own work after the config is built) and by the bench (its polling of the log
//! included).
use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mesh_tests::Cluster;

use super::{load::peak_rss_mib, median, range, report::Scale};

fn service(i: usize) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: scale}}\n\
         spec:\n  clusterIP: 10.{}.{}.{}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n",
        100 + i / 65536,
        (i / 256) % 256,
        i % 256
    )
}

fn slice(i: usize, per: usize, salt: usize) -> String {
    let mut s = format!(
        "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: s{i}-a, namespace: scale, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
         addressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
    );
    for e in 0..per {
        let n = i * per + e + salt;
        let _ = writeln!(
            s,
            "- addresses: [\"10.{}.{}.{}\"]",
            200 + (n >> 16) % 50,
            (n >> 8) % 256,
            n % 256
        );
    }
    s.push_str("---\n");
    s
}

/// Endpoint changes made, one at a time.
const CHANGES: usize = 10;

/// A number the agent logged as `name=value`, or NaN.
fn field(line: &str, name: &str) -> f64 {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name))
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// The largest of the values, NaN when there are none.
fn max(v: &[f64]) -> f64 {
    range(v).map_or(f64::NAN, |(_, hi)| hi)
}

/// The agent's log line for `generation` once applied. Read straight from the file,
/// polled often: the bench's view then lags the agent's only by the agent's log batch.
fn applied_line(c: &Cluster, generation: u64) -> Option<String> {
    let log = std::fs::read_to_string(c.agent_log_path("node-1")).unwrap_or_default();
    let mark = format!("config applied generation={generation} ");
    log.lines().find(|l| l.contains(&mark)).map(str::to_owned)
}

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

pub fn run(target: &Path, services: usize, per: usize) -> anyhow::Result<Scale> {
    let mut c = Cluster::with_prefix(
        "mesh-scale",
        &["node-1"],
        &target.join("mesh-agent"),
        &target.join("mesh-testpod"),
    )?;
    // Service 0's slice lives in its own file: the one that changes.
    let mut big = String::with_capacity(services * (200 + per * 30));
    for i in 0..services {
        big.push_str(&service(i));
        if i > 0 {
            big.push_str(&slice(i, per, 0));
        }
    }
    c.write_config("big.yaml", &big)?;
    c.write_config("change.yaml", &slice(0, per, 0))?;
    let config_bytes = (big.len() + slice(0, per, 0).len()) as u64;

    let dir = c.config_dir.clone();
    let started = Instant::now();
    c.launch_agent("node-1", &dir)?;
    wait(
        "the first generation to be applied",
        Duration::from_secs(300),
        || applied_line(&c, 1).is_some(),
    )?;
    let apply_secs = started.elapsed().as_secs_f64();
    let first = applied_line(&c, 1).unwrap_or_default();
    let apply_agent_secs = field(&first, "latency_ms=") / 1e3;
    c.wait_ready("node-1", Duration::from_secs(60))?;
    let maps = c.meshctl_json("node-1", &["bpf", "maps"])?;
    let in_kernel = maps["maps"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "MESH_SERVICES"))
        .and_then(|m| m["entries"].as_u64())
        .context("no MESH_SERVICES in meshctl bpf maps")?;

    // One endpoint of one service changes, ten times, apart.
    let mut seen = Vec::new();
    let mut latency = Vec::new();
    let mut work = Vec::new();
    for n in 1..=CHANGES {
        let generation = n as u64 + 1;
        let t = Instant::now();
        c.write_config("change.yaml", &slice(0, per, n))?;
        let mut line = None;
        wait("the change to be applied", Duration::from_secs(300), || {
            line = applied_line(&c, generation);
            line.is_some()
        })?;
        seen.push(t.elapsed().as_secs_f64());
        let line = line.unwrap_or_default();
        latency.push(field(&line, "latency_ms=") / 1e3);
        work.push(field(&line, "apply_ms=") / 1e3);
        std::thread::sleep(Duration::from_millis(300));
    }
    let pid = c.agent_pid("node-1").context("agent pid")?;
    let agent_rss_mib = peak_rss_mib(pid);
    c.stop_agent("node-1")?;
    Ok(Scale {
        services,
        endpoints: services * per,
        config_bytes,
        apply_secs,
        apply_agent_secs,
        services_in_kernel_map: in_kernel,
        agent_rss_mib,
        endpoint_change_secs: median(&seen),
        endpoint_change_max_secs: max(&seen),
        endpoint_change_agent_secs: median(&latency),
        endpoint_change_agent_max_secs: max(&latency),
        endpoint_change_apply_secs: median(&work),
    })
}
