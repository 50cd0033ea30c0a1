//! `mesh-cni install --watch` on a node's CNI directories (temporary ones here): the
//! binary copied, the entry chained last into the runtime's conflist, put back when
//! the network plugin rewrites its file, and everything taken off again on SIGTERM,
//! leaving the conflist exactly as it was.
use std::{
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

const BRIDGE: &str = r#"{"cniVersion": "1.0.0", "name": "k8s-pod-network", "plugins": [
  {"type": "bridge", "bridge": "cni0", "ipam": {"type": "host-local", "subnet": "10.244.1.0/24"}},
  {"type": "portmap", "capabilities": {"portMappings": true}}
]}"#;

fn plugins(conf: &Path) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(conf).unwrap()).unwrap();
    v["plugins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["type"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn wait(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn install_chains_last_keeps_it_there_and_sigterm_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (bin, conf_dir) = (dir.path().join("bin"), dir.path().join("net.d"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&conf_dir).unwrap();
    let conf = conf_dir.join("10-bridge.conflist");
    std::fs::write(&conf, BRIDGE).unwrap();
    // A later file is not the runtime's: it must not be touched.
    std::fs::write(conf_dir.join("99-loopback.conflist"), BRIDGE).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
        .args([
            "install",
            "--watch",
            "--every-secs",
            "1",
            "--agent-socket",
            "/run/x.sock",
        ])
        .arg("--bin-dir")
        .arg(&bin)
        .arg("--conf-dir")
        .arg(&conf_dir)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait("the entry to be chained", || {
        plugins(&conf) == ["bridge", "portmap", "mesh-cni"]
    });
    assert_eq!(
        std::fs::read(bin.join("mesh-cni")).unwrap(),
        std::fs::read(env!("CARGO_BIN_EXE_mesh-cni")).unwrap()
    );
    assert_eq!(
        plugins(&conf_dir.join("99-loopback.conflist")),
        ["bridge", "portmap"]
    );
    // The network plugin rewrites its conflist: the entry comes back.
    std::fs::write(&conf, BRIDGE).unwrap();
    wait("the entry to be put back", || {
        plugins(&conf) == ["bridge", "portmap", "mesh-cni"]
    });
    // SIGTERM (the DaemonSet's pod deleted, as on uninstall): nothing left behind.
    nix_kill(child.id());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    let after: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&conf).unwrap()).unwrap();
    let before: serde_json::Value = serde_json::from_str(BRIDGE).unwrap();
    assert_eq!(after, before, "the conflist is not as it was");
    assert!(!bin.join("mesh-cni").exists(), "the binary was left behind");
    let leftovers: Vec<_> = std::fs::read_dir(&conf_dir)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn sigterm_leaves_the_plugin_while_a_successor_agent_serves_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let (bin, conf_dir) = (dir.path().join("bin"), dir.path().join("net.d"));
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::create_dir_all(&conf_dir).unwrap();
    let conf = conf_dir.join("10-bridge.conflist");
    std::fs::write(&conf, BRIDGE).unwrap();
    // The successor agent's CNI socket, answering throughout.
    let socket = dir.path().join("cni.sock");
    let _agent = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
        .args(["install", "--watch", "--every-secs", "1"])
        .args(["--handover-wait-secs", "1"])
        .arg("--agent-socket")
        .arg(&socket)
        .arg("--bin-dir")
        .arg(&bin)
        .arg("--conf-dir")
        .arg(&conf_dir)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait("the entry to be chained", || {
        plugins(&conf) == ["bridge", "portmap", "mesh-cni"]
    });
    nix_kill(child.id());
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    assert_eq!(plugins(&conf), ["bridge", "portmap", "mesh-cni"]);
    assert!(
        bin.join("mesh-cni").exists(),
        "the successor's plugin was removed"
    );
}

#[test]
fn a_single_plugin_conf_or_no_config_is_refused_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let run = |conf_dir: &Path| {
        let out = Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
            .arg("install")
            .arg("--bin-dir")
            .arg(dir.path())
            .arg("--conf-dir")
            .arg(conf_dir)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let (ok, err) = run(&empty);
    assert!(!ok && err.contains("no .conflist"), "{err}");
    let single = dir.path().join("single");
    std::fs::create_dir_all(&single).unwrap();
    std::fs::write(single.join("10-flannel.conf"), r#"{"type": "flannel"}"#).unwrap();
    let (ok, err) = run(&single);
    assert!(!ok && err.contains("single-plugin .conf"), "{err}");
    let (ok, err) = {
        let out = Command::new(env!("CARGO_BIN_EXE_mesh-cni"))
            .args(["install", "--every-secs", "zero"])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    assert!(!ok && err.contains("expected a positive number"), "{err}");
}

fn nix_kill(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}
