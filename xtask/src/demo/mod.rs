//! `cargo xtask demo`: a two-node cluster built from examples/demo, real agents, a web
//! service with one replica per node, and a client calling it by its ClusterIP. While
//! it runs it is a playground: `demo exec` runs a command in a pod, `demo add-pod`
//! adds one, and Service names resolve in every pod ([`hosts`], [`playground`]).
pub mod check;
mod hosts;
pub mod playground;

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail};
use mesh_tests::Cluster;
use serde_yaml_ng::Value;

use crate::{root, sh};

const PREFIX: &str = "mesh-demo";

struct DemoPod {
    name: String,
    node: String,
    ip: Ipv4Addr,
    web: bool,
}

struct Topology {
    pods: Vec<DemoPod>,
    vip: SocketAddr,
    target_port: u16,
    files: Vec<PathBuf>,
}

fn str_at<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter()
        .try_fold(v, |v, k| v.get(k))
        .and_then(Value::as_str)
}

/// Reads the demo's pods and its service from the YAML directory.
fn topology(dir: &std::path::Path) -> anyhow::Result<Topology> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    let (mut pods, mut vip, mut target_port) = (Vec::new(), None, None);
    for f in &files {
        let text = std::fs::read_to_string(f)?;
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: Value =
                serde::Deserialize::deserialize(doc).with_context(|| format!("{}", f.display()))?;
            match str_at(&v, &["kind"]) {
                Some("Pod") => {
                    let name = str_at(&v, &["metadata", "name"])
                        .context("pod without name")?
                        .to_owned();
                    let netns =
                        str_at(&v, &["metadata", "annotations", "mesh.dev/netns"]).unwrap_or("");
                    let want = format!("/var/run/netns/{PREFIX}-{name}");
                    if netns != want {
                        bail!(
                            "{}: pod {name}: the demo needs annotation mesh.dev/netns: {want}",
                            f.display()
                        );
                    }
                    pods.push(DemoPod {
                        node: str_at(&v, &["spec", "nodeName"])
                            .context("pod without nodeName")?
                            .to_owned(),
                        ip: str_at(&v, &["status", "podIP"])
                            .context("pod without podIP")?
                            .parse()?,
                        web: str_at(&v, &["metadata", "labels", "app"]) == Some("web"),
                        name,
                    });
                }
                Some("Service") if vip.is_none() => {
                    let ip: IpAddr = str_at(&v, &["spec", "clusterIP"])
                        .context("service without clusterIP")?
                        .parse()?;
                    let port = &v["spec"]["ports"][0];
                    let p = port["port"].as_u64().context("service port")? as u16;
                    vip = Some(SocketAddr::new(ip, p));
                    target_port = Some(port["targetPort"].as_u64().unwrap_or(u64::from(p)) as u16);
                }
                _ => {}
            }
        }
    }
    Ok(Topology {
        pods,
        vip: vip.context("no Service in the demo config")?,
        target_port: target_port.unwrap_or(80),
        files,
    })
}

pub fn run(smoke: bool) -> anyhow::Result<()> {
    std::env::set_current_dir(root())?;
    println!("==> building the agent, meshctl and the demo's workload (cargo build)");
    sh(
        "cargo",
        &["build", "-p", "mesh-agent", "-p", "mesh-tests", "--bins"],
    )?;
    let topo = topology(&root().join("examples/demo"))?;
    // What an earlier demo that did not end cleanly left behind.
    if let Ok(old) = playground::State::load() {
        old.clear();
    }
    println!("==> creating the simulated nodes and pods (network namespaces, cgroups)");
    let mut nodes: Vec<&str> = topo.pods.iter().map(|p| p.node.as_str()).collect();
    nodes.sort();
    nodes.dedup();
    let target = root().join("target/debug");
    let mut c = Cluster::with_prefix(
        PREFIX,
        &nodes,
        &target.join("mesh-agent"),
        &target.join("mesh-testpod"),
    )?;
    let mut pods = Vec::new();
    for p in &topo.pods {
        pods.push((c.add_pod_with_ip(&p.node, &p.name, Some(p.ip))?, p.web));
    }
    for f in &topo.files {
        let name = f
            .file_name()
            .and_then(|n| n.to_str())
            .context("file name")?;
        c.write_config(name, &std::fs::read_to_string(f)?)?;
    }
    println!("==> starting one agent per node and the web servers");
    for n in &nodes {
        c.start_agent(n)?;
    }
    for (pod, web) in &pods {
        if *web {
            c.start_server(pod, topo.target_port)?;
        }
    }
    let client = pods
        .iter()
        .map(|(p, _)| p)
        .find(|p| !pods.iter().any(|(q, w)| *w && q.name == p.name))
        .context("no client pod")?
        .clone();

    println!("\nmesh demo: nodes {nodes:?}");
    for (pod, web) in &pods {
        println!(
            "  pod {:<8} on {:<7} {:<12} {}",
            pod.name,
            pod.node,
            pod.ip,
            if *web { "web server" } else { "client" }
        );
    }
    println!(
        "  service web: ClusterIP {} (exists only in the agents' eBPF maps)",
        topo.vip
    );
    println!("  agent logs: {}", c.work_dir.display());
    println!(
        "  config directory (the agents watch it; drop YAML here): {}",
        c.config_dir.display()
    );
    let meshctl = target.join("meshctl");
    for n in &nodes {
        println!(
            "  inspect {n}: {} --socket {} status|workloads|conns|observe|...",
            meshctl.display(),
            c.admin_socket(n).display()
        );
    }
    let mut state = playground::State {
        config_dir: c.config_dir.clone(),
        work_dir: c.work_dir.clone(),
        nodes: nodes.iter().map(|n| (*n).to_owned()).collect(),
        pods: pods.iter().map(|(p, _)| pod_state(p)).collect(),
    };
    state.save()?;
    sync_hosts(&state);
    let (to_main, requests) = std::sync::mpsc::channel();
    if !smoke {
        playground::serve_control(to_main)?;
        println!("\ntry it (from this directory, in another terminal):");
        println!(
            "  cargo xtask demo exec {} -- curl -s http://web/",
            client.name
        );
        println!(
            "  {} --socket {} conns",
            meshctl.display(),
            c.admin_socket(&client.node).display()
        );
        println!("  cargo xtask demo add-pod NAME --node {}", nodes[0]);
    }
    println!("\ndemo ready");
    if smoke {
        for n in &nodes {
            let status = c.meshctl_json(n, &["status"])?;
            anyhow::ensure!(status["ready"] == true, "meshctl status on {n}: {status}");
        }
    }

    let stop = Arc::new(AtomicBool::new(false));
    if !smoke {
        let stop = stop.clone();
        ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst))
            .context("installing Ctrl-C handler")?;
        println!(
            "calling {} from {} every second; Ctrl-C to stop and tear down\n",
            topo.vip, client.name
        );
    }
    let rounds = if smoke { 10 } else { usize::MAX };
    let mut answered_by = std::collections::BTreeMap::<String, usize>::new();
    let mut hops = std::collections::BTreeMap::<String, usize>::new();
    let mut logged = 0;
    let mut i = 0;
    while i < rounds && !stop.load(Ordering::SeqCst) {
        i += 1;
        let addr = topo.vip.to_string();
        match c.run_in(&client, &["who", "--addr", &addr], Duration::from_secs(10)) {
            Ok(out) => {
                let v: serde_json::Value = serde_json::from_str(out.trim())?;
                let reply = v["replies"][0].as_str().unwrap_or("").to_owned();
                let mut words = reply.split(' ');
                let (server, seen) = (words.next().unwrap_or("?"), words.next().unwrap_or("?"));
                let node = pods
                    .iter()
                    .find(|(p, _)| p.name == server)
                    .map_or("?", |(p, _)| p.node.as_str());
                println!(
                    "[{i:>3}] {} -> {addr} -> answered by {server} on {node} (it saw the caller as {seen})",
                    client.name
                );
                *answered_by.entry(server.to_owned()).or_default() += 1;
                if let Some(hop) = next_hop(&c, &client.node, &mut logged) {
                    println!("      {hop}");
                    *hops.entry(hop.mode.clone()).or_default() += 1;
                    if hop.mode == "hbone" && hop.src.is_some() && hop.dst.is_some() {
                        *hops.entry("hbone with both identities".into()).or_default() += 1;
                    }
                }
            }
            Err(e) => println!("[{i:>3}] {} -> {addr} FAILED: {e:#}", client.name),
        }
        if !smoke {
            serve_a_second(&mut c, &mut state, &requests, &stop);
        }
    }

    println!("\nanswers per backend: {answered_by:?}");
    println!("hops by mode (from the client node's log): {hops:?}");
    let mut carried = 0;
    for n in &nodes {
        c.stop_agent(n)?;
        let log = c.agent_log(n);
        let lines = |reporter: &str| {
            log.lines()
                .filter(|l| l.contains("connection closed"))
                .filter(|l| l.contains(&format!(" reporter=\"{reporter}\"")))
                .count()
        };
        let (outbound, inbound) = (lines("source"), lines("destination"));
        carried += outbound;
        let counters = log
            .lines()
            .find(|l| l.contains("kernel counters"))
            .unwrap_or("")
            .to_owned();
        println!(
            "agent {n}: {outbound} connections out, {inbound} in; {}",
            counters.split("INFO").last().unwrap_or("").trim()
        );
    }
    state.clear();
    if smoke {
        let webs = pods.iter().filter(|(_, w)| *w).count();
        anyhow::ensure!(
            answered_by.values().sum::<usize>() == rounds,
            "some calls failed: {answered_by:?}"
        );
        anyhow::ensure!(
            answered_by.len() == webs,
            "not every replica answered: {answered_by:?}"
        );
        anyhow::ensure!(
            hops.contains_key("hbone with both identities"),
            "no cross-node call was logged as an mTLS tunnel with both identities: {hops:?}"
        );
        anyhow::ensure!(
            carried >= rounds,
            "the agents carried {carried} connections, expected at least {rounds}"
        );
        println!(
            "demo smoke: ok ({rounds} calls through the agents, {webs} replicas, same-node and cross-node)"
        );
    }
    Ok(())
}

fn pod_state(p: &mesh_tests::cluster::Pod) -> playground::PodState {
    playground::PodState {
        name: p.name.clone(),
        namespace: "default".into(),
        node: p.node.clone(),
        ip: p.ip.to_string(),
        netns: p.netns.clone(),
        cgroup: p.cgroup.clone(),
    }
}

/// Writes each pod's hosts file where it differs from the Services now configured.
fn sync_hosts(state: &playground::State) {
    let services = hosts::services_in(&state.config_dir);
    for p in &state.pods {
        let dir = playground::netns_etc(&p.netns);
        let want = hosts::hosts_file(&services, &p.namespace);
        if std::fs::read_to_string(dir.join("hosts")).ok().as_deref() != Some(want.as_str()) {
            let _ = std::fs::create_dir_all(&dir);
            let tmp = dir.join(".hosts.tmp");
            if std::fs::write(&tmp, &want).is_ok() {
                let _ = std::fs::rename(&tmp, dir.join("hosts"));
            }
        }
    }
}

/// Between two calls: answers control requests and keeps the hosts files in step with
/// the config directory (a new Service resolves within a fifth of a second).
fn serve_a_second(
    c: &mut Cluster,
    state: &mut playground::State,
    requests: &std::sync::mpsc::Receiver<playground::Request>,
    stop: &AtomicBool,
) {
    let end = std::time::Instant::now() + Duration::from_secs(1);
    while !stop.load(Ordering::SeqCst) {
        let now = std::time::Instant::now();
        if now >= end {
            break;
        }
        let wait = (end - now).min(Duration::from_millis(200));
        if let Ok(req) = requests.recv_timeout(wait) {
            let answer = answer(c, state, &req.line);
            let _ = req.reply.send(answer);
        }
        sync_hosts(state);
    }
}

/// One control request: `add-pod NAME NODE`.
fn answer(c: &mut Cluster, state: &mut playground::State, line: &str) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    let result = match words.as_slice() {
        ["add-pod", name, node] => add_pod(c, state, name, node),
        _ => Err(anyhow::anyhow!("unknown request {line:?}")),
    };
    result.unwrap_or_else(|e| format!("error: {e:#}"))
}

fn add_pod(
    c: &mut Cluster,
    state: &mut playground::State,
    name: &str,
    node: &str,
) -> anyhow::Result<String> {
    anyhow::ensure!(playground::valid_pod_name(name), "bad pod name {name:?}");
    anyhow::ensure!(
        state.nodes.iter().any(|n| n == node),
        "no node {node:?}; the nodes are {:?}",
        state.nodes
    );
    anyhow::ensure!(
        !state.pods.iter().any(|p| p.name == name),
        "pod {name} already exists"
    );
    let pod = c.add_pod(node, name)?;
    let file = format!("pod-{name}.yaml");
    c.write_config(&file, &c.pod_yaml(&pod, true))?;
    state.pods.push(pod_state(&pod));
    state.save()?;
    sync_hosts(state);
    Ok(format!(
        "pod {name} on {node}, IP {}, labels {{app: {name}}}, enrolled; its Pod object is {}",
        pod.ip,
        c.config_dir.join(file).display()
    ))
}

/// One proxied connection as the client node's agent logged it.
struct Hop {
    mode: String,
    src: Option<String>,
    dst: Option<String>,
}

impl std::fmt::Display for Hop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = match self.mode.as_str() {
            "hbone" => "cross-node hop over the mTLS tunnel (HBONE)",
            "local" => "same-node hop, delivered locally (policy checked, not encrypted)",
            "passthrough" => "passthrough (destination not in the mesh)",
            other => other,
        };
        write!(f, "{how}")?;
        if let Some(src) = &self.src {
            write!(f, ": {src}")?;
        }
        if let Some(dst) = &self.dst {
            write!(f, " -> {dst}")?;
        }
        Ok(())
    }
}

/// Waits briefly for the agent on `node` to log the next closed connection after the
/// `seen` ones already reported, and reads its mode and identities.
fn next_hop(c: &Cluster, node: &str, seen: &mut usize) -> Option<Hop> {
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let log = c.agent_log(node);
        let closed: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("connection closed") && l.contains(" reporter=\"source\""))
            .collect();
        if let Some(line) = closed.get(*seen) {
            *seen = closed.len();
            let line = closed.last().copied().unwrap_or(line);
            return Some(Hop {
                mode: log_field(line, "mode")?,
                src: log_field(line, "src_identity").filter(|s| !s.is_empty()),
                dst: log_field(line, "dst_identity").filter(|s| !s.is_empty()),
            });
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The value of `key="value"` or `key=value` in a tracing text line.
fn log_field(line: &str, key: &str) -> Option<String> {
    let start = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[start..];
    let value = match rest.strip_prefix('"') {
        Some(quoted) => quoted.split('"').next()?,
        None => rest.split(' ').next()?,
    };
    Some(value.to_owned())
}
