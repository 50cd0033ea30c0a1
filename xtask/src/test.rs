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
    // The Helm chart, checked offline: lint, render, strict schema validation.
    crate::chart::install()?;
    crate::chart::validate()?;
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
    // The tests that exercise what the config source decides, once more with the
    // agents reading the fake Kubernetes API server (every config file mirrored to it).
    println!("==> kernel end-to-end tests on the Kubernetes API source");
    for (file, filter) in KUBERNETES_MODE {
        let status = std::process::Command::new("cargo")
            .args([
                "test",
                "-p",
                "mesh-tests",
                "--test",
                file,
                filter,
                "--",
                "--test-threads=1",
            ])
            .env("MESH_AGENT_BIN", &agent)
            .env("MESH_TEST_SOURCE", "kubernetes")
            .status()?;
        anyhow::ensure!(
            status.success(),
            "kernel end-to-end tests failed on the Kubernetes API source: {file} {filter}"
        );
    }
    crate::demo::run(true)?;
    crate::demo::check::playground()?;
    // A smoke of every fuzz target (the long runs are `cargo xtask fuzz`).
    crate::fuzz::run(5, &[])
}

/// (test file, name filter) run again on the Kubernetes API source: enrollment by
/// label, pods found in /proc and through the CNI plugin, service and endpoint changes
/// under traffic, policy and mTLS mode changes on open connections, kubelet probes,
/// STRICT across restarts, routes. The directory-only tests (file errors, one
/// generation per directory) are not among them.
const KUBERNETES_MODE: &[(&str, &str)] = &[
    ("enrollment", ""),
    ("datapath", ""),
    ("cni", ""),
    ("config_reload", "removed_endpoint"),
    ("security", "authorization_deny"),
    ("security", "strict_refuses"),
    ("capture", "kubelet_probes"),
    ("capture", "strict_never_lapses"),
    ("l7", "requests_are_routed_by_path"),
    ("operator", "meshctl_inspects"),
];

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
