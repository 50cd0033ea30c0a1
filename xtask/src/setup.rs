//! Idempotent installation of what building and testing need. Each step checks first
//! and says what it found; a machine that has everything gets through in well under a
//! second.
use std::process::Command;

use anyhow::Context as _;

use crate::sh;

const APT_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "bpftool",
    "iproute2",
    "util-linux",
    // The encryption test captures the wire between node namespaces.
    "tcpdump",
    // The config test checks that an idle agent opens no config file.
    "strace",
    // Server-first and client-first protocols through a routed port (detection).
    "mariadb-server",
    "mariadb-client",
    "redis-server",
    "redis-tools",
];
const BPF_LINKER_VERSION: &str = "0.13.0";

fn output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run() -> anyhow::Result<()> {
    nightly_rust_src()?;
    apt_packages()?;
    bpf_linker()?;
    Ok(())
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"]).context("rustup is required")?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        sh(
            "rustup",
            &["toolchain", "install", "nightly", "--profile", "minimal"],
        )?;
    }
    let installed = output(
        "rustup",
        &["component", "list", "--toolchain", "nightly", "--installed"],
    )
    .unwrap_or_default();
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: nightly rust-src ok");
    } else {
        sh(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
        )?;
    }
    Ok(())
}

fn apt_packages() -> anyhow::Result<()> {
    apt_install(APT_PACKAGES)
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| {
            output("dpkg-query", &["-W", "-f=${Status}", p])
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect();
    if missing.is_empty() {
        eprintln!("setup: Debian packages ok ({})", packages.join(", "));
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(", "));
    sh("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    sh("apt-get", &args)
}

/// What only `cargo xtask bench` needs: the load generator and the baseline proxy.
/// Kept out of `run` so the test and demo commands do not compile oha.
const BENCH_APT_PACKAGES: &[&str] = &["haproxy", "openssl"];
const OHA_VERSION: &str = "1.16.0";

pub fn bench() -> anyhow::Result<()> {
    run()?;
    apt_install(BENCH_APT_PACKAGES)?;
    if oha_path().is_some() {
        eprintln!("setup: oha ok");
        return Ok(());
    }
    eprintln!("setup: building oha {OHA_VERSION} (a few minutes, once)");
    let status = Command::new("cargo")
        .args(["install", "oha", "--locked", "--version", OHA_VERSION])
        .status()?;
    anyhow::ensure!(status.success(), "installing oha failed");
    Ok(())
}

/// The oha binary, if installed (cargo's bin directory or PATH).
pub fn oha_path() -> Option<std::path::PathBuf> {
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cargo")))
        .map(|p| p.join("bin/oha"));
    cargo_bin
        .filter(|p| p.exists())
        .or_else(|| output("which", &["oha"]).map(|p| std::path::PathBuf::from(p.trim())))
        .filter(|p| output(&p.display().to_string(), &["--version"]).is_some())
}

fn bpf_linker() -> anyhow::Result<()> {
    if let Some(v) = output("bpf-linker", &["--version"])
        && v.contains(BPF_LINKER_VERSION)
    {
        eprintln!("setup: bpf-linker {BPF_LINKER_VERSION} ok");
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (a few minutes, once)"
    );
    let status = Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .status()?;
    anyhow::ensure!(status.success(), "installing bpf-linker failed");
    Ok(())
}
