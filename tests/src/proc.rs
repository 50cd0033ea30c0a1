//! Starting processes inside a pod or node: in its network namespace and its cgroup.
//!
//! The child joins the cgroup and the netns in `pre_exec`, before exec, so its very
//! first socket is already subject to the node's programs. Only raw syscalls on fds
//! opened before fork run there (no allocation after fork).
use std::{
    fs::{File, OpenOptions},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::Path,
    process::Command,
};

/// Makes `cmd` start inside `netns` (a netns file) and `cgroup` (a cgroup v2 directory).
pub fn enter(cmd: &mut Command, netns: &Path, cgroup: Option<&Path>) -> std::io::Result<()> {
    if let Some(c) = cgroup {
        enter_cgroup(cmd, c)?;
    }
    let ns = File::open(netns)?;
    // SAFETY: the closure only calls setns(2) on an fd owned by the closure.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Makes `cmd` start inside `cgroup` (a cgroup v2 directory), before anything else it
/// does (the pre-exec hooks run in the order they were added).
pub fn enter_cgroup(cmd: &mut Command, cgroup: &Path) -> std::io::Result<()> {
    let procs = OpenOptions::new()
        .write(true)
        .open(cgroup.join("cgroup.procs"))?;
    // SAFETY: the closure only calls write(2) on an fd owned by the closure.
    unsafe {
        cmd.pre_exec(move || {
            // "0" moves the writing process itself.
            if libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(())
}

/// Ends every process in `cgroup` (and below it) and removes the directory once they
/// are gone, waiting up to two seconds. Processes someone started in a pod by hand
/// (the demo's `exec`) would otherwise keep the cgroup, and the pod, alive.
pub fn kill_cgroup(cgroup: &Path) {
    let _ = std::fs::write(cgroup.join("cgroup.kill"), "1");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while std::fs::remove_dir(cgroup).is_err() && cgroup.exists() {
        if std::time::Instant::now() > deadline {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Runs a command and fails with its output if it fails.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program).args(args).output()?;
    if !out.status.success() {
        anyhow::bail!(
            "{program} {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip` inside a named netns.
pub fn ip_in(netns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    run("ip", &full)
}

/// Waits until `path` stops growing: its size unchanged over three checks 50 ms
/// apart (a packet-buffered capture that has written everything in flight). Gives up
/// after `limit`, leaving the caller's assertions to judge what was written.
pub fn wait_settled(path: &Path, limit: std::time::Duration) {
    let deadline = std::time::Instant::now() + limit;
    let size = || std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let (mut last, mut same) = (size(), 0);
    while same < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
        let now = size();
        same = if now == last { same + 1 } else { 0 };
        last = now;
    }
}
