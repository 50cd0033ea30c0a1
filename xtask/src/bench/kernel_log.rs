//! What the kernel programs' log and flow events cost. Their decisions are logged with
//! aya-log when `meshctl log-level set --kernel debug` switches it on; off (the
//! default), each decision pays one array lookup. Flow events are written only while
//! `meshctl observe` runs. This measures both against a build of the same programs
//! with the log calls compiled out (the agent's `no-kernel-log` feature), side by
//! side in one run: four variants, alternated over rounds, each driving new
//! connections through the node's agent as fast as they go.
//!
//! Two figures per variant: new connections per second (end to end, noisy on a small
//! machine) and the kernel's own accounting of each program's run time
//! (`kernel.bpf_stats_enabled`, read with bpftool), which is what the log changes.
use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::Context as _;
use mesh_tests::{Cluster, Pod};
use serde::Serialize;

use super::{Plan, load::Oha, median, progress};

/// Rounds of the three variants, in a rotating order (drift hits each alike).
const ROUNDS: usize = 3;

/// Where the reference agent (log compiled out) is kept.
fn reference_path(release: &Path) -> PathBuf {
    release.join("mesh-agent-no-kernel-log")
}

/// Builds the agent with the log calls compiled out and sets it aside; the normal
/// release build that follows overwrites `target/release/mesh-agent`.
pub fn build_reference() -> anyhow::Result<()> {
    // The same packages as the normal build, so that the dependencies' features
    // unify alike and only the agent is built twice.
    let release = super::build_release_bins_with(&["mesh-agent/no-kernel-log"])?;
    std::fs::copy(release.join("mesh-agent"), reference_path(&release))
        .context("setting the no-kernel-log agent aside")?;
    Ok(())
}

/// One program's cost under one variant, over every round.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProgramCost {
    /// Over every round.
    pub ns_per_run: f64,
    /// Each round's, in round order: the spread a difference must beat.
    pub ns_per_run_rounds: Vec<f64>,
    pub runs_per_connection: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Variant {
    pub name: String,
    pub description: String,
    /// Median over the rounds.
    pub new_connections_per_s: f64,
    /// Every round's figure, in round order.
    pub new_connections_samples: Vec<f64>,
    /// By program name (as the kernel truncates it).
    pub programs: BTreeMap<String, ProgramCost>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct KernelLog {
    pub rounds: usize,
    pub secs_per_round: u64,
    /// The first is the reference (log compiled out).
    pub variants: Vec<Variant>,
}

/// Cumulative run time and run count of every loaded `mesh_` program, by name.
#[derive(Debug, Clone, Default)]
struct Stats(BTreeMap<String, (u64, u64)>);

impl Stats {
    fn read() -> anyhow::Result<Stats> {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "prog", "show"])
            .output()
            .context("running bpftool")?;
        anyhow::ensure!(out.status.success(), "bpftool prog show failed");
        Ok(Stats::parse(&serde_json::from_slice(&out.stdout)?))
    }

    fn parse(progs: &serde_json::Value) -> Stats {
        let mut m = BTreeMap::<String, (u64, u64)>::new();
        for p in progs.as_array().into_iter().flatten() {
            let Some(name) = p["name"].as_str().filter(|n| n.starts_with("mesh_")) else {
                continue;
            };
            let e = m.entry(name.to_owned()).or_default();
            e.0 += p["run_time_ns"].as_u64().unwrap_or(0);
            e.1 += p["run_cnt"].as_u64().unwrap_or(0);
        }
        Stats(m)
    }

    /// What ran between `before` and `self` (programs loaded meanwhile count whole).
    fn since(&self, before: &Stats) -> Stats {
        Stats(
            self.0
                .iter()
                .map(|(name, (ns, n))| {
                    let (ns0, n0) = before.0.get(name).copied().unwrap_or_default();
                    (name.clone(), (ns.saturating_sub(ns0), n.saturating_sub(n0)))
                })
                .collect(),
        )
    }

    fn add(&mut self, other: &Stats) {
        for (name, (ns, n)) in &other.0 {
            let e = self.0.entry(name.clone()).or_default();
            e.0 += ns;
            e.1 += n;
        }
    }
}

/// Switches the kernel's per-program run-time accounting on, and back as it was.
struct BpfStats {
    before: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> anyhow::Result<BpfStats> {
        let before = std::fs::read_to_string(BPF_STATS)?.trim().to_owned();
        std::fs::write(BPF_STATS, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(BpfStats { before })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.before);
    }
}

struct Setup {
    name: &'static str,
    description: &'static str,
    agent: PathBuf,
    debug: bool,
    /// `meshctl observe` runs on both nodes (the programs write flow events).
    observed: bool,
    samples: Vec<f64>,
    connections: f64,
    /// Each round's program statistics.
    rounds: Vec<Stats>,
}

impl Setup {
    /// A variant with the log off and nobody observing, not measured yet.
    fn new(name: &'static str, description: &'static str, agent: PathBuf) -> Setup {
        Setup {
            name,
            description,
            agent,
            debug: false,
            observed: false,
            samples: Vec::new(),
            connections: 0.0,
            rounds: Vec::new(),
        }
    }
}

/// `meshctl observe` on `node`, its output discarded, until killed.
fn observe(c: &Cluster, node: &str) -> anyhow::Result<std::process::Child> {
    std::process::Command::new(c.meshctl_bin())
        .arg("--socket")
        .arg(c.admin_socket(node))
        .args(["-o", "json", "observe"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting meshctl observe")
}

/// Runs the variants over `ROUNDS` rounds, new connections to `url` from
/// `client` through the agent of `node-1` (and `node-2`'s, idle).
pub fn run(
    c: &mut Cluster,
    oha: &Oha,
    plan: &Plan,
    client: &Pod,
    url: &str,
) -> anyhow::Result<KernelLog> {
    let release = c
        .agent_bin
        .parent()
        .context("agent binary has no directory")?
        .to_owned();
    let normal = c.agent_bin.clone();
    let mut setups = [
        Setup::new(
            "log-compiled-out",
            "the programs built without their log calls (the reference)",
            reference_path(&release),
        ),
        Setup::new(
            "log-off",
            "the shipped programs, kernel log off (the default)",
            normal.clone(),
        ),
        Setup {
            debug: true,
            ..Setup::new(
                "log-debug",
                "the shipped programs, `meshctl log-level set --kernel debug` on both nodes",
                normal.clone(),
            )
        },
        Setup {
            observed: true,
            ..Setup::new(
                "observed",
                "the shipped programs, kernel log off, `meshctl observe` running on both nodes (flow events on)",
                normal.clone(),
            )
        },
    ];
    anyhow::ensure!(
        setups[0].agent.exists(),
        "no reference agent at {}",
        setups[0].agent.display()
    );
    let _accounting = BpfStats::enable()?;
    c.agent_args = vec!["--sockmap".into(), "off".into()];
    let result = (|| -> anyhow::Result<()> {
        for round in 0..ROUNDS {
            for i in 0..setups.len() {
                let n = setups.len();
                let s = &mut setups[(round + i) % n];
                progress(&format!(
                    "kernel log, round {}: {} for {}s",
                    round + 1,
                    s.name,
                    plan.max_secs
                ));
                c.agent_bin = s.agent.clone();
                c.start_agent("node-1")?;
                c.start_agent("node-2")?;
                if s.debug {
                    for node in ["node-1", "node-2"] {
                        let out = c.meshctl(node, &["log-level", "set", "--kernel", "debug"])?;
                        anyhow::ensure!(
                            out.status.success(),
                            "meshctl log-level set --kernel debug: {}",
                            String::from_utf8_lossy(&out.stderr)
                        );
                    }
                }
                let observers: Vec<std::process::Child> = if s.observed {
                    ["node-1", "node-2"]
                        .iter()
                        .map(|node| observe(c, node))
                        .collect::<anyhow::Result<_>>()?
                } else {
                    Vec::new()
                };
                // Warm-up: the first certificate use, the agent's caches.
                let _ = oha.fixed_rate(c, client, url, 200, 4, 1);
                let before = Stats::read()?;
                let measured = oha.max_rate(c, client, url, plan.connections, plan.max_secs, true);
                let after = Stats::read()?;
                for mut o in observers {
                    let _ = o.kill();
                    let _ = o.wait();
                }
                c.stop_agent("node-1")?;
                c.stop_agent("node-2")?;
                let (rps, ok) = measured?;
                anyhow::ensure!(ok >= 0.99, "{}: success rate {ok:.4}", s.name);
                s.samples.push(rps);
                s.connections += rps * plan.max_secs as f64;
                s.rounds.push(after.since(&before));
            }
        }
        Ok(())
    })();
    c.agent_bin = normal;
    c.agent_args.clear();
    result?;
    Ok(KernelLog {
        rounds: ROUNDS,
        secs_per_round: plan.max_secs,
        variants: setups
            .into_iter()
            .map(|s| Variant {
                name: s.name.into(),
                description: s.description.into(),
                new_connections_per_s: median(&s.samples),
                new_connections_samples: s.samples,
                programs: program_costs(&s.rounds, s.connections),
            })
            .collect(),
    })
}

/// Each program's cost over the rounds (programs that never ran are left out).
fn program_costs(rounds: &[Stats], connections: f64) -> BTreeMap<String, ProgramCost> {
    let mut total = Stats::default();
    rounds.iter().for_each(|r| total.add(r));
    let per_run = |(ns, n): (u64, u64)| ns as f64 / n.max(1) as f64;
    total
        .0
        .iter()
        .filter(|(_, (_, n))| *n > 0)
        .map(|(name, &(ns, n))| {
            let cost = ProgramCost {
                ns_per_run: per_run((ns, n)),
                ns_per_run_rounds: rounds
                    .iter()
                    .map(|r| r.0.get(name).copied().map_or(f64::NAN, per_run))
                    .collect(),
                runs_per_connection: n as f64 / connections.max(1.0),
            };
            (name.clone(), cost)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_stats_are_summed_by_name_and_differenced() {
        let before = Stats::parse(&serde_json::json!([
            {"name": "mesh_connect4", "run_time_ns": 100, "run_cnt": 2},
            {"name": "mesh_connect4", "run_time_ns": 50, "run_cnt": 1},
            {"name": "other", "run_time_ns": 9, "run_cnt": 9},
        ]));
        assert_eq!(before.0.len(), 1);
        assert_eq!(before.0["mesh_connect4"], (150, 3));
        let after = Stats::parse(&serde_json::json!([
            {"name": "mesh_connect4", "run_time_ns": 400, "run_cnt": 6},
            {"name": "mesh_connect4", "run_time_ns": 50, "run_cnt": 1},
            {"name": "mesh_sock_ops", "run_time_ns": 30, "run_cnt": 3},
        ]));
        let d = after.since(&before);
        assert_eq!(d.0["mesh_connect4"], (300, 4));
        assert_eq!(d.0["mesh_sock_ops"], (30, 3));
    }

    #[test]
    fn program_costs_pool_the_rounds_and_keep_each() {
        let round = |ns, n| Stats([("mesh_connect4".to_owned(), (ns, n))].into());
        let idle = Stats([("mesh_sk_msg".to_owned(), (0, 0))].into());
        let costs = program_costs(&[round(100, 1), round(300, 1), idle], 2.0);
        assert_eq!(costs.len(), 1, "a program that never ran is left out");
        let c = &costs["mesh_connect4"];
        assert_eq!(c.ns_per_run, 200.0);
        assert_eq!(c.ns_per_run_rounds[..2], [100.0, 300.0]);
        assert!(c.ns_per_run_rounds[2].is_nan());
        assert_eq!(c.runs_per_connection, 1.0);
    }

    #[test]
    fn the_median_ignores_failed_samples() {
        assert_eq!(median(&[3.0, f64::NAN, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0]), 2.5);
        assert!(median(&[f64::NAN]).is_nan());
    }
}
