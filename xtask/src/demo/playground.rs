//! What makes the running demo a playground: a state file naming its pods, a control
//! socket through which `cargo xtask demo add-pod` asks it for a new pod, and
//! `cargo xtask demo exec`, which runs a command exactly as a pod's own processes run.
//!
//! The demo process owns the simulated cluster (it tears it down on Ctrl-C), so a new
//! pod is made by it, not by the process that asked; `exec` needs only the state file.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    os::unix::net::{UnixListener, UnixStream},
    path::{Path, PathBuf},
    sync::mpsc,
    time::Duration,
};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// Where a running demo leaves its state file and its control socket.
pub const RUN_DIR: &str = "/run/mesh-demo";

fn state_path() -> PathBuf {
    Path::new(RUN_DIR).join("state.json")
}

fn control_path() -> PathBuf {
    Path::new(RUN_DIR).join("control.sock")
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    pub name: String,
    pub namespace: String,
    pub node: String,
    pub ip: String,
    /// The `ip netns` name.
    pub netns: String,
    pub cgroup: PathBuf,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct State {
    pub config_dir: PathBuf,
    pub work_dir: PathBuf,
    pub nodes: Vec<String>,
    pub pods: Vec<PodState>,
}

impl State {
    pub fn save(&self) -> anyhow::Result<()> {
        std::fs::create_dir_all(RUN_DIR)?;
        let tmp = Path::new(RUN_DIR).join(".state.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, state_path())?;
        Ok(())
    }

    pub fn load() -> anyhow::Result<State> {
        let text = std::fs::read_to_string(state_path()).with_context(|| {
            format!(
                "no demo is running ({} is missing): start one with `cargo xtask demo`",
                state_path().display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{}", state_path().display()))
    }

    /// Removes what a demo left in [`RUN_DIR`] and its pods' hosts files.
    pub fn clear(&self) {
        for p in &self.pods {
            let _ = std::fs::remove_dir_all(netns_etc(&p.netns));
        }
        let _ = std::fs::remove_file(state_path());
        let _ = std::fs::remove_file(control_path());
    }
}

/// `/etc/netns/<netns>`: files `ip netns exec` mounts over `/etc` (the hosts file).
pub fn netns_etc(netns: &str) -> PathBuf {
    Path::new("/etc/netns").join(netns)
}

/// A request the demo's main loop answers (it owns the cluster).
pub struct Request {
    pub line: String,
    pub reply: mpsc::Sender<String>,
}

/// Serves the control socket on a thread of its own, passing each request line to the
/// main loop and its answer back.
pub fn serve_control(to_main: mpsc::Sender<Request>) -> anyhow::Result<()> {
    std::fs::create_dir_all(RUN_DIR)?;
    let _ = std::fs::remove_file(control_path());
    let listener = UnixListener::bind(control_path())
        .with_context(|| format!("binding {}", control_path().display()))?;
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { continue };
            let mut line = String::new();
            let mut reader = BufReader::new(&conn);
            // One short line per connection; anything longer is cut off.
            let _ = conn.set_read_timeout(Some(Duration::from_secs(5)));
            if reader.read_line(&mut line).is_err() || line.len() > 256 {
                continue;
            }
            let (reply, answer) = mpsc::channel();
            if to_main
                .send(Request {
                    line: line.trim().to_owned(),
                    reply,
                })
                .is_err()
            {
                return;
            }
            let text = answer
                .recv_timeout(Duration::from_secs(60))
                .unwrap_or_else(|_| "error: the demo did not answer".into());
            let _ = (&conn).write_all(format!("{text}\n").as_bytes());
        }
    });
    Ok(())
}

/// Whether `name` can name a demo pod: a short DNS label (it becomes a netns name, a
/// cgroup and a Kubernetes object name).
pub fn valid_pod_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// `cargo xtask demo add-pod NAME --node NODE`: asks the running demo for the pod.
pub fn add_pod(name: &str, node: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        valid_pod_name(name),
        "pod name {name:?}: use up to 32 lowercase letters, digits and '-'"
    );
    let state = State::load()?;
    anyhow::ensure!(
        state.nodes.iter().any(|n| n == node),
        "no node {node:?} in the demo; its nodes are {:?}",
        state.nodes
    );
    let mut conn = UnixStream::connect(control_path())
        .with_context(|| format!("the demo's control socket {}", control_path().display()))?;
    conn.write_all(format!("add-pod {name} {node}\n").as_bytes())?;
    let mut answer = String::new();
    BufReader::new(conn).read_line(&mut answer)?;
    let answer = answer.trim();
    match answer.strip_prefix("error: ") {
        Some(e) => anyhow::bail!("{e}"),
        None => {
            println!("{answer}");
            Ok(())
        }
    }
}

/// `cargo xtask demo exec POD -- CMD...`: runs `cmd` in the pod's cgroup (where the
/// mesh's programs attach) and its netns, with its hosts file. Returns the command's
/// exit code.
pub fn exec(pod: &str, cmd: &[String]) -> anyhow::Result<u8> {
    let state = State::load()?;
    let p = state.pods.iter().find(|p| p.name == pod).with_context(|| {
        let names: Vec<&str> = state.pods.iter().map(|p| p.name.as_str()).collect();
        format!("no pod {pod:?} in the demo; its pods are {names:?}")
    })?;
    let (program, args) = cmd.split_first().context("no command given after --")?;
    let mut command = std::process::Command::new("ip");
    command
        .args(["netns", "exec", &p.netns, program])
        .args(args);
    mesh_tests::proc::enter_cgroup(&mut command, &p.cgroup)
        .with_context(|| format!("pod {pod}'s cgroup {}", p.cgroup.display()))?;
    let status = command.status().context("running ip netns exec")?;
    Ok(status.code().map_or(1, |c| c.clamp(0, 255) as u8))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names_are_short_dns_labels() {
        for ok in ["redis", "web-3", "a1"] {
            assert!(valid_pod_name(ok), "{ok}");
        }
        for bad in ["", "Redis", "a b", "-x", "x-", "a/b", &"x".repeat(33)] {
            assert!(!valid_pod_name(bad), "{bad}");
        }
    }
}
