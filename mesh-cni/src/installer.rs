//! `mesh-cni install` / `mesh-cni uninstall`: the node-side install the agent's
//! DaemonSet runs (see `mesh_cni::install`).
//!
//! ```text
//! mesh-cni install --bin-dir /host/opt/cni/bin --conf-dir /host/etc/cni/net.d \
//!     --agent-socket /var/run/mesh/cni.sock [--timeout-seconds 30] [--watch] [--every-secs 5]
//!     [--handover-wait-secs 10]
//! mesh-cni uninstall --bin-dir ... --conf-dir ...
//! ```
//!
//! With `--watch` it stays: it re-checks every `--every-secs` (a network plugin that
//! rewrites its conflist drops our entry), and on SIGTERM or SIGINT it takes the
//! plugin off the node and exits, unless another agent serves the node: an
//! uninstall stops the agent too (its socket goes quiet within a second or two),
//! while in a rolling update a successor agent has taken the socket over and keeps
//! answering on it. So it waits up to `--handover-wait-secs` for the socket to go
//! quiet; if it never does, the plugin stays for the successor.
use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_cni::install::{entry, install, uninstall};

struct Options {
    bin_dir: PathBuf,
    conf_dir: PathBuf,
    agent_socket: String,
    timeout_seconds: u64,
    watch: bool,
    every: Duration,
    handover_wait: Duration,
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        bin_dir: PathBuf::from("/opt/cni/bin"),
        conf_dir: PathBuf::from("/etc/cni/net.d"),
        agent_socket: "/var/run/mesh/cni.sock".to_owned(),
        timeout_seconds: 30,
        watch: false,
        every: Duration::from_secs(5),
        handover_wait: Duration::from_secs(10),
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        if flag == "--watch" {
            o.watch = true;
            continue;
        }
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("{flag} {value:?}: expected a positive number"))
        };
        match flag.as_str() {
            "--bin-dir" => o.bin_dir = value.into(),
            "--conf-dir" => o.conf_dir = value.into(),
            "--agent-socket" => o.agent_socket = value.clone(),
            "--timeout-seconds" => o.timeout_seconds = number()?,
            "--every-secs" => o.every = Duration::from_secs(number()?),
            "--handover-wait-secs" => o.handover_wait = Duration::from_secs(number()?),
            other => return Err(format!("unknown option {other}")),
        }
    }
    Ok(o)
}

pub fn main(cmd: &str, args: &[String]) -> ExitCode {
    let o = match parse(args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("mesh-cni {cmd}: {e}");
            return ExitCode::from(2);
        }
    };
    match cmd {
        "install" => run_install(&o),
        "uninstall" => match uninstall(&o.bin_dir, &o.conf_dir) {
            Ok(()) => {
                eprintln!("mesh-cni: removed from {}", o.conf_dir.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("mesh-cni uninstall: {e}");
                ExitCode::FAILURE
            }
        },
        other => {
            eprintln!("mesh-cni: unknown command {other:?} (install, uninstall)");
            ExitCode::from(2)
        }
    }
}

fn run_install(o: &Options) -> ExitCode {
    let binary = match std::env::current_exe() {
        Ok(b) => b,
        Err(e) => {
            eprintln!("mesh-cni install: finding its own binary: {e}");
            return ExitCode::FAILURE;
        }
    };
    let e = entry(&o.agent_socket, o.timeout_seconds);
    let once = || match install(&binary, &o.bin_dir, &o.conf_dir, &e) {
        Ok(true) => {
            eprintln!(
                "mesh-cni: installed into {} and chained in {}",
                o.bin_dir.display(),
                o.conf_dir.display()
            );
            true
        }
        Ok(false) => true,
        Err(err) => {
            eprintln!("mesh-cni install: {err}");
            false
        }
    };
    if !o.watch {
        return if once() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        };
    }
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        if let Err(err) = signal_hook::flag::register(signal, stop.clone()) {
            eprintln!("mesh-cni install: cannot handle signal {signal}: {err}");
            return ExitCode::FAILURE;
        }
    }
    // Errors are retried: the network plugin may not have written its conflist yet.
    let mut last_ok = None;
    while !stop.load(Ordering::Relaxed) {
        let ok = once();
        if last_ok != Some(ok) && ok {
            eprintln!(
                "mesh-cni: watching {} every {:?}",
                o.conf_dir.display(),
                o.every
            );
        }
        last_ok = Some(ok);
        let until = Instant::now() + o.every;
        while Instant::now() < until && !stop.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    if successor_serves(&o.agent_socket, o.handover_wait) {
        eprintln!(
            "mesh-cni: stopped; an agent still serves {} after {:?} (a successor took \
             over), so the plugin stays in {}",
            o.agent_socket,
            o.handover_wait,
            o.conf_dir.display()
        );
        return ExitCode::SUCCESS;
    }
    match uninstall(&o.bin_dir, &o.conf_dir) {
        Ok(()) => {
            eprintln!("mesh-cni: stopped; removed from {}", o.conf_dir.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("mesh-cni: stopped; removing failed: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Whether an agent keeps answering on `socket` for all of `wait`: a successor that
/// took the node over. The agent being stopped closes it quickly.
fn successor_serves(socket: &str, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        if std::os::unix::net::UnixStream::connect(socket).is_err() {
            return false;
        }
        if Instant::now() >= deadline {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
