//! `cargo xtask`: the project's own commands. `setup` installs what is missing, `demo`
//! runs a local two-node mesh, `test` runs every check and test.
mod bench;
mod chart;
mod demo;
mod fuzz;
mod setup;
mod soak;
mod test;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install missing prerequisites (nightly rust-src, LLVM 22, bpf-linker, bpftool; for
    /// the benchmark also oha, HAProxy, openssl).
    Setup,
    /// Build and run a two-node demo cluster from examples/demo; Ctrl-C tears it down.
    Demo {
        /// Run unattended and exit 0 only if traffic went through the agents.
        #[arg(long)]
        smoke: bool,
        #[command(subcommand)]
        action: Option<DemoCmd>,
    },
    /// Setup, then formatting, lints, unit tests, the Helm chart's offline checks,
    /// kernel end-to-end tests, demo smoke, a 5-second smoke of every fuzz target.
    Test,
    /// Lint, render and strictly validate the Helm chart, offline (part of `test`).
    Chart,
    /// The Helm chart (deploy/chart) rendered as plain YAML, for kubectl apply.
    Manifests {
        /// The namespace to install into.
        #[arg(long, default_value = "mesh-system")]
        namespace: String,
        /// Write here instead of standard output.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Every fuzz target (cargo-fuzz, nightly) for `--seconds` each, from the seed
    /// corpus in fuzz/corpus; a crash fails it and leaves its input in fuzz/artifacts.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 600)]
        seconds: u64,
        /// Only the targets whose name contains this (repeatable).
        #[arg(long, value_name = "NAME")]
        target: Vec<String>,
    },
    /// The soak and chaos run: long-lived connections (checked end to end), churn and
    /// faults for N minutes; report and charts in docs/benchmarks/soak. Not a test:
    /// it takes its minutes and the whole machine.
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
        /// Long-lived connections, half across nodes (a multiple of 10).
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Workload certificate lifetime (renewed at half of it).
        #[arg(long, default_value = "2m")]
        cert_ttl: String,
        /// Write the report here instead of docs/benchmarks/soak.
        #[arg(long)]
        out: Option<std::path::PathBuf>,
    },
    /// Every scenario side by side (no mesh, mesh, HAProxy); report in docs/benchmarks.
    Bench {
        /// Short runs: a few minutes instead of the full measurement.
        #[arg(long)]
        quick: bool,
        /// Only the scenarios whose name contains this (repeatable; the baselines
        /// always run). The report then goes to target/bench, not docs/benchmarks.
        #[arg(long, value_name = "NAME")]
        only: Vec<String>,
        /// Record the proxies' CPU profile with perf during each saturation run
        /// (target/bench/perf-SCENARIO.data), the first run at the lowest fixed rate
        /// (perf-SCENARIO-RATE.data) and bulk transfer, and the whole
        /// machine's during the new-connection runs (perf-SCENARIO-newconn.data); the
        /// report goes to target/bench.
        #[arg(long)]
        profile: bool,
        /// Also measure the agent built from this git revision (B), in alternating
        /// rounds with this build's (A), and report each figure's ratio B/A per round;
        /// the report goes to target/bench. Use with --only.
        #[arg(long, value_name = "REV")]
        against: Option<String>,
    },
}

/// What to do with a running demo (from another terminal).
#[derive(Subcommand)]
enum DemoCmd {
    /// Run a command inside a demo pod, as the pod's own processes run: in its network
    /// namespace and its cgroup, with Service names resolving.
    Exec {
        /// The pod (client, web-1, web-2, or one added with add-pod).
        pod: String,
        /// The command and its arguments, after `--`.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Add a pod to the running demo: its netns and cgroup, and its Pod object (labels
    /// app: NAME, enrolled) in the config directory.
    AddPod {
        name: String,
        /// The node to put it on (node-1, node-2).
        #[arg(long)]
        node: String,
    },
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().cmd {
        Cmd::Setup => setup::bench(),
        Cmd::Demo {
            action: Some(DemoCmd::Exec { pod, cmd }),
            ..
        } => {
            return match demo::playground::exec(&pod, &cmd) {
                Ok(code) => std::process::ExitCode::from(code),
                Err(e) => {
                    eprintln!("xtask: error: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Cmd::Demo {
            action: Some(DemoCmd::AddPod { name, node }),
            ..
        } => demo::playground::add_pod(&name, &node),
        Cmd::Demo {
            smoke,
            action: None,
        } => setup::run().and_then(|()| demo::run(smoke)),
        Cmd::Test => setup::run().and_then(|()| test::run()),
        Cmd::Fuzz { seconds, target } => setup::run().and_then(|()| fuzz::run(seconds, &target)),
        Cmd::Soak {
            minutes,
            connections,
            cert_ttl,
            out,
        } => setup::run().and_then(|()| soak::run(minutes, connections, cert_ttl, out)),
        Cmd::Chart => chart::install().and_then(|()| chart::validate()),
        Cmd::Manifests { namespace, out } => chart::manifests(&namespace, out.as_deref()),
        Cmd::Bench {
            quick,
            only,
            profile,
            against,
        } => setup::bench().and_then(|()| bench::run(quick, only, profile, against)),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runs a command, echoing it, and fails if it fails.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<()> {
    eprintln!("+ {program} {}", args.join(" "));
    let status = std::process::Command::new(program).args(args).status()?;
    anyhow::ensure!(
        status.success(),
        "`{program} {}` failed ({status})",
        args.join(" ")
    );
    Ok(())
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> std::path::PathBuf {
    let manifest = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_owned()
}
