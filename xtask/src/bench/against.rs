//! `cargo xtask bench --against REV`: this build's agent and the agent built from
//! another git revision, measured in alternating rounds in one run (A B, B A, A B), and
//! each figure given as the ratio B/A per round with the median and range of those
//! ratios.
//!
//! Why: between two runs of the same code this machine's figures move by tens of
//! percent (docs/benchmarks.md, "How much is noise"), so a change judged by comparing
//! two separate runs is judged by noise. Rounds that alternate put both builds under the
//! same drift, and the per-round ratios show how far the difference stands out of it.
use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::Context as _;

use super::{median, range, report::Scenario};
use crate::root;

/// Rounds of A and B; the order alternates (A B, B A, A B) so that neither always
/// runs first after an agent start.
pub const ROUNDS: usize = 3;

/// What the other build is called in scenario names: `mesh-l7-mtls@REV#2`.
pub fn tag(rev: &str) -> String {
    format!("@{rev}")
}

/// A scenario name in round `round` (counted from 1).
pub fn round_name(name: &str, round: usize) -> String {
    format!("{name}#{round}")
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git").current_dir(dir).args(args).output()?;
    anyhow::ensure!(
        out.status.success(),
        "git {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Builds the agent at `rev` in a worktree of its own (target/bench-against, with its
/// own target directory, so this build's binaries are untouched) and returns its
/// short commit and the binary, set aside under that commit's name.
pub fn build(rev: &str) -> anyhow::Result<(String, PathBuf)> {
    let root = root();
    let short = git(
        &root,
        &["rev-parse", "--short", &format!("{rev}^{{commit}}")],
    )
    .with_context(|| format!("--against {rev}: not a commit"))?;
    let base = root.join("target/bench-against");
    let tree = base.join("src");
    if tree.join(".git").exists() {
        git(&tree, &["checkout", "--quiet", "--detach", &short])?;
    } else {
        std::fs::create_dir_all(&base)?;
        // A stale registration (the directory was removed by hand) would refuse the add.
        let _ = git(&root, &["worktree", "prune"]);
        let tree_arg = tree.to_string_lossy().into_owned();
        git(
            &root,
            &["worktree", "add", "--quiet", "--detach", &tree_arg, &short],
        )?;
    }
    eprintln!(
        "+ cargo build --release -p mesh-agent (at {short}, in {})",
        tree.display()
    );
    let status = Command::new("cargo")
        .current_dir(&tree)
        .env("CARGO_TARGET_DIR", base.join("target"))
        .args([
            "build",
            "--release",
            "-p",
            "mesh-agent",
            "--bin",
            "mesh-agent",
        ])
        .status()?;
    anyhow::ensure!(status.success(), "building the agent at {short} failed");
    let bin = base.join(format!("mesh-agent-{short}"));
    std::fs::copy(base.join("target/release/mesh-agent"), &bin)
        .with_context(|| format!("setting the agent of {short} aside"))?;
    Ok((short, bin))
}

/// One figure both builds are compared on.
struct Figure {
    what: &'static str,
    get: fn(&Scenario) -> Option<f64>,
    digits: usize,
}

const FIGURES: [Figure; 9] = [
    Figure {
        what: "p50 at the lowest rate, ms",
        get: |s| s.latency.first().map(|l| l.p50_ms),
        digits: 3,
    },
    Figure {
        what: "p99 at the lowest rate, ms",
        get: |s| s.latency.first().map(|l| l.p99_ms),
        digits: 3,
    },
    Figure {
        what: "p99 at the highest rate, ms",
        get: |s| s.latency.last().map(|l| l.p99_ms),
        digits: 3,
    },
    Figure {
        what: "saturation, req/s",
        get: |s| Some(s.saturation_rps),
        digits: 0,
    },
    Figure {
        what: "new connections/s",
        get: |s| Some(s.new_connections_per_s),
        digits: 0,
    },
    Figure {
        what: "proxy vCPU per 1k req/s",
        get: |s| s.proxy_vcpu_per_1k_rps,
        digits: 3,
    },
    Figure {
        what: "machine CPU per request, µs",
        get: |s| s.machine_cpu_us_per_request,
        digits: 0,
    },
    Figure {
        what: "proxy system calls per request",
        get: |s| s.proxy_syscalls_per_request,
        digits: 1,
    },
    Figure {
        what: "proxy context switches per request",
        get: |s| s.proxy_switches_per_request,
        digits: 1,
    },
];

/// The rounds of scenario `name` under one build (`tag` empty for this build), in
/// round order.
fn rounds<'a>(scenarios: &'a [Scenario], name: &str, tag: &str) -> Vec<&'a Scenario> {
    (1..=ROUNDS)
        .filter_map(|r| {
            let want = round_name(&format!("{name}{tag}"), r);
            scenarios.iter().find(|s| s.name == want)
        })
        .collect()
}

fn cell(v: &[f64], digits: usize) -> String {
    let finite: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if finite.is_empty() {
        return "-".into();
    }
    let m = median(&finite);
    match range(&finite) {
        Some((lo, hi)) if finite.len() > 1 => {
            format!("{m:.digits$} [{lo:.digits$}..{hi:.digits$}]")
        }
        _ => format!("{m:.digits$}"),
    }
}

/// The A/B section of the report: for each scenario measured under both builds, each
/// figure's rounds under A and under B and the per-round ratio B/A.
pub fn section(scenarios: &[Scenario], rev: &str, this: &str) -> String {
    let tag = tag(rev);
    let names: Vec<String> = scenarios
        .iter()
        .filter_map(|s| s.name.strip_suffix("#1"))
        .filter(|n| !n.ends_with(&tag))
        .map(str::to_owned)
        .collect();
    let mut md = String::new();
    let _ = writeln!(
        md,
        "\n## A/B: this build (A, {this}) against {rev} (B)\n\n{ROUNDS} rounds, alternating \
         A B, B A, A B; each round is a full measurement of the scenario. The ratio is B/A \
         per round, median [min..max]: below 1 means B is lower (faster, for latency and \
         cost; slower, for throughput). A ratio whose range includes 1 is not a difference \
         this run can show."
    );
    for name in names {
        let a = rounds(scenarios, &name, "");
        let b = rounds(scenarios, &name, &tag);
        if a.is_empty() || b.is_empty() {
            continue;
        }
        let _ = writeln!(
            md,
            "\n### {name}\n\n| figure | A | B | B/A |\n|---|---|---|---|"
        );
        for f in &FIGURES {
            let va: Vec<f64> = a.iter().map(|s| (f.get)(s).unwrap_or(f64::NAN)).collect();
            let vb: Vec<f64> = b.iter().map(|s| (f.get)(s).unwrap_or(f64::NAN)).collect();
            let ratios: Vec<f64> = va
                .iter()
                .zip(&vb)
                .filter(|(x, _)| **x > 0.0)
                .map(|(x, y)| y / x)
                .collect();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} |",
                f.what,
                cell(&va, f.digits),
                cell(&vb, f.digits),
                cell(&ratios, 2)
            );
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(name: &str, saturation: f64, cpu: Option<f64>) -> Scenario {
        Scenario {
            name: name.into(),
            saturation_rps: saturation,
            proxy_vcpu_per_1k_rps: cpu,
            ..Default::default()
        }
    }

    #[test]
    fn rounds_are_paired_and_each_figure_gets_its_ratios() {
        let s = vec![
            scenario("mesh-l7-mtls#1", 100.0, Some(0.5)),
            scenario("mesh-l7-mtls@abc#1", 110.0, Some(0.4)),
            scenario("mesh-l7-mtls@abc#2", 120.0, Some(0.5)),
            scenario("mesh-l7-mtls#2", 100.0, Some(0.5)),
            scenario("mesh-l7-mtls#3", 100.0, None),
            scenario("mesh-l7-mtls@abc#3", 90.0, Some(0.5)),
            scenario("direct", 1000.0, None),
        ];
        let md = section(&s, "abc", "def");
        assert!(md.contains("### mesh-l7-mtls\n"), "{md}");
        assert!(!md.contains("### mesh-l7-mtls@abc"), "{md}");
        assert!(
            md.contains(
                "| saturation, req/s | 100 [100..100] | 110 [90..120] | 1.10 [0.90..1.20] |"
            ),
            "{md}"
        );
        // A round whose figure is missing is left out of the ratios, not counted as 0.
        assert!(
            md.contains("| proxy vCPU per 1k req/s | 0.500 [0.500..0.500] | 0.500 [0.400..0.500] | 0.90 [0.80..1.00] |"),
            "{md}"
        );
    }
}
