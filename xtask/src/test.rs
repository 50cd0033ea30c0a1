//! Every check the project has, in the order that fails fastest.
use crate::{root, sh};

pub fn run() -> anyhow::Result<()> {
    std::env::set_current_dir(root())?;
    sh("cargo", &["fmt", "--all", "--", "--check"])?;
    // Default members: everything but the kernel crate, which only builds for BPF.
    sh(
        "cargo",
        &["clippy", "--all-targets", "--", "-D", "warnings"],
    )?;
    sh(
        "cargo",
        &[
            "build",
            "-p",
            "mesh-agent",
            "-p",
            "mesh-cni",
            "-p",
            "mesh-tests",
            "--bins",
        ],
    )?;
    sh(
        "cargo",
        &[
            "test",
            "-p",
            "mesh-common",
            "-p",
            "mesh-agent",
            "-p",
            "mesh-cni",
            "-p",
            "xtask",
        ],
    )?;
    anyhow::ensure!(
        nix_is_root(),
        "the kernel end-to-end tests need root (network namespaces, cgroups, eBPF)"
    );
    let agent = root().join("target/debug/mesh-agent");
    // The whole end-to-end suite runs twice: with sockmap acceleration (the default)
    // and without it. The agents inherit MESH_SOCKMAP from the test process.
    for sockmap in ["on", "off"] {
        println!("==> kernel end-to-end tests, sockmap {sockmap}");
        let status = std::process::Command::new("cargo")
            .args(["test", "-p", "mesh-tests", "--", "--test-threads=1"])
            .env("MESH_AGENT_BIN", &agent)
            .env("MESH_SOCKMAP", sockmap)
            .status()?;
        anyhow::ensure!(
            status.success(),
            "kernel end-to-end tests failed with sockmap {sockmap}"
        );
    }
    crate::demo::run(true)
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}
