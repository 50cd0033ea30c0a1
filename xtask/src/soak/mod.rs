//! `cargo xtask soak [--minutes N]`: builds the release binaries, runs the soak and
//! chaos run of `mesh_tests::soak` on them, and writes its report (JSON) and charts
//! (SVG) to `docs/benchmarks/soak/` (or `--out`). Exits non-zero if the run failed.
mod plot;

use std::path::{Path, PathBuf};

use crate::{
    bench::{build_release_bins, commit},
    root,
};

pub fn run(
    minutes: u64,
    connections: usize,
    cert_ttl: String,
    out: Option<PathBuf>,
) -> anyhow::Result<()> {
    let target = build_release_bins()?;
    let out = out.unwrap_or_else(|| root().join("docs/benchmarks/soak"));
    std::fs::create_dir_all(&out)?;
    let plan = mesh_tests::soak::Plan {
        minutes,
        connections,
        every_ms: 5_000,
        chunk: 512,
        cert_ttl,
        agent_bin: target.join("mesh-agent"),
        testpod_bin: target.join("mesh-testpod"),
    };
    let report = mesh_tests::soak::run(plan)?;
    let mut json = serde_json::to_value(&report)?;
    json["commit"] = serde_json::Value::String(commit());
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    plot::charts(&report, &out)?;
    print_summary(&report, &out);
    anyhow::ensure!(
        report.passed,
        "the soak failed:\n  {}",
        report.failures.join("\n  ")
    );
    Ok(())
}

fn print_summary(r: &mesh_tests::soak::Report, out: &Path) {
    let s = &r.streams;
    let n = &r.new_connections;
    println!(
        "soak: {} min; long-lived connections {} opened, {} intact, {} failed ({} MiB echoed)",
        r.plan.minutes,
        s.opened,
        s.intact,
        s.failed,
        s.bytes_echoed >> 20
    );
    println!(
        "soak: new connections {} attempted, {} answered, {} failed while an agent was stopped, {} failed otherwise",
        n.attempted, n.answered, n.excused, n.failed
    );
    println!(
        "soak: churn: {} config writes, {} pods added, {} removed, {} certificates issued",
        r.churn.config_writes,
        r.churn.pods_added,
        r.churn.pods_removed,
        r.churn.certificates_issued
    );
    for i in &r.injections {
        println!(
            "soak: {:>7.1}s {:?}: {}",
            i.at_ms as f64 / 1000.0,
            i.event,
            i.outcome
        );
    }
    for l in &r.leaks {
        println!(
            "soak: {}: descriptors {} before, {} after; anon RSS {} KiB before, {} KiB after",
            l.node, l.before.fds, l.after.fds, l.before.anon_kib, l.after.anon_kib
        );
    }
    println!(
        "soak: report in {} ({})",
        out.display(),
        if r.passed { "passed" } else { "FAILED" }
    );
}
