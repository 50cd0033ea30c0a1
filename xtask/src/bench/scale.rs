//! Scale: a generated config of many services and endpoints. How long until the agent
//! has it in its tables and the kernel map, what it costs in memory, and how long one
//! endpoint change takes at that size (the whole directory is re-read: that is the
//! honest cost of the file source).
use std::{
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mesh_tests::Cluster;

use super::{load::peak_rss_mib, report::Scale};

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

fn applied(c: &Cluster, generation: u64) -> bool {
    c.agent_log("node-1")
        .contains(&format!("config applied generation={generation} "))
}

fn wait(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !f() {
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
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
        || applied(&c, 1),
    )?;
    let apply_secs = started.elapsed().as_secs_f64();
    c.wait_ready("node-1", Duration::from_secs(60))?;
    let maps = c.meshctl_json("node-1", &["bpf", "maps"])?;
    let in_kernel = maps["maps"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["name"] == "MESH_SERVICES"))
        .and_then(|m| m["entries"].as_u64())
        .context("no MESH_SERVICES in meshctl bpf maps")?;

    // One endpoint of one service changes.
    let t = Instant::now();
    c.write_config("change.yaml", &slice(0, per, 1))?;
    wait("the change to be applied", Duration::from_secs(300), || {
        applied(&c, 2)
    })?;
    let endpoint_change_secs = t.elapsed().as_secs_f64();
    let pid = c.agent_pid("node-1").context("agent pid")?;
    let agent_rss_mib = peak_rss_mib(pid);
    c.stop_agent("node-1")?;
    Ok(Scale {
        services,
        endpoints: services * per,
        config_bytes,
        apply_secs,
        services_in_kernel_map: in_kernel,
        agent_rss_mib,
        endpoint_change_secs,
    })
}
