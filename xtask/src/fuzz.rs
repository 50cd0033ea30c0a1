//! `cargo xtask fuzz [--seconds N] [--target NAME]`: every fuzz target in `fuzz/`
//! (cargo-fuzz, libFuzzer, nightly) for N seconds each, starting from the seed corpus
//! in `fuzz/corpus/<target>`. New inputs go to `target/fuzz/corpus/<target>` (the repo's
//! corpus only changes by hand); a crash leaves its reproducer in
//! `fuzz/artifacts/<target>` and fails the command. CI runs it with `--seconds 5`.
use std::{path::Path, process::Command};

use anyhow::Context as _;

use crate::root;

/// Every target, as named in `fuzz/Cargo.toml`.
pub const TARGETS: [&str; 6] = [
    "config_yaml",
    "api_object",
    "detect",
    "hbone_connect",
    "admin_request",
    "request_path",
];

const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Runs this short or shorter are smokes (see `run`).
const SMOKE_SECONDS: u64 = 60;

pub fn run(seconds: u64, only: &[String]) -> anyhow::Result<()> {
    let root = root();
    ensure_cargo_fuzz()?;
    let targets: Vec<&str> = TARGETS
        .iter()
        .copied()
        .filter(|t| only.is_empty() || only.iter().any(|o| t.contains(o.as_str())))
        .collect();
    anyhow::ensure!(!targets.is_empty(), "no fuzz target matches {only:?}");
    // A smoke (CI) builds fast: debug (overflow checks on), no sanitizer (the code is
    // safe Rust; a build with AddressSanitizer takes three times as long). A real run
    // builds optimized, with AddressSanitizer.
    let build: &[&str] = if seconds <= SMOKE_SECONDS {
        &["--dev", "--sanitizer", "none"]
    } else {
        &["-O"]
    };
    // One build for all of them.
    let status = cargo_fuzz(&root)
        .arg("build")
        .args(build)
        .args(["--fuzz-dir", "fuzz"])
        .status()?;
    anyhow::ensure!(status.success(), "building the fuzz targets failed");
    let mut report = Vec::new();
    for t in targets {
        let scratch = root.join("target/fuzz/corpus").join(t);
        std::fs::create_dir_all(&scratch)?;
        let seeds = root.join("fuzz/corpus").join(t);
        println!("==> fuzz {t} for {seconds} s");
        let out = cargo_fuzz(&root)
            .arg("run")
            .args(build)
            .args(["--fuzz-dir", "fuzz", t])
            .arg(&scratch)
            .arg(&seeds)
            .args([
                "--",
                &format!("-max_total_time={seconds}"),
                "-print_final_stats=1",
                "-rss_limit_mb=4096",
                "-timeout=10",
            ])
            .output()
            .with_context(|| format!("running cargo fuzz run {t}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let execs = stat(&log, "stat::number_of_executed_units:");
        let peak = stat(&log, "stat::peak_rss_mb:");
        if !out.status.success() {
            // The end of libFuzzer's report names the input it kept.
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            anyhow::bail!(
                "fuzz target {t} failed after {execs:?} executions:\n{}",
                tail.join("\n")
            );
        }
        println!(
            "fuzz {t}: {seconds} s clean, {} executions, peak RSS {} MiB",
            execs.map_or("?".to_owned(), |n| n.to_string()),
            peak.map_or("?".to_owned(), |n| n.to_string()),
        );
        report.push((t, execs));
    }
    println!("==> fuzz summary ({seconds} s per target)");
    for (t, execs) in report {
        println!(
            "  {t:<14} {:>12} executions, no crash",
            execs.map_or("?".to_owned(), |n| n.to_string())
        );
    }
    Ok(())
}

fn cargo_fuzz(root: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(root).args(["+nightly", "fuzz"]);
    cmd
}

/// `stat::name: N` from libFuzzer's final stats.
fn stat(log: &str, name: &str) -> Option<u64> {
    log.lines()
        .rev()
        .find_map(|l| l.strip_prefix(name))
        .and_then(|v| v.trim().parse().ok())
}

fn ensure_cargo_fuzz() -> anyhow::Result<()> {
    let ok = Command::new("cargo")
        .args(["+nightly", "fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        eprintln!("setup: cargo-fuzz ok");
        return Ok(());
    }
    eprintln!("setup: building cargo-fuzz {CARGO_FUZZ_VERSION} (a minute or two, once)");
    let status = Command::new("cargo")
        .args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ])
        .status()?;
    anyhow::ensure!(status.success(), "installing cargo-fuzz failed");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_libfuzzer_final_stats() {
        let log = "INFO: seed\nstat::number_of_executed_units: 123456\nstat::peak_rss_mb: 88\n";
        assert_eq!(
            super::stat(log, "stat::number_of_executed_units:"),
            Some(123456)
        );
        assert_eq!(super::stat(log, "stat::peak_rss_mb:"), Some(88));
        assert_eq!(super::stat(log, "stat::nothing:"), None);
    }

    #[test]
    fn every_target_has_a_source_and_a_seed_corpus() {
        let root = crate::root();
        let manifest = std::fs::read_to_string(root.join("fuzz/Cargo.toml")).unwrap();
        for t in super::TARGETS {
            assert!(manifest.contains(&format!("name = \"{t}\"")), "{t}");
            assert!(
                root.join(format!("fuzz/fuzz_targets/{t}.rs")).exists(),
                "{t}"
            );
            let seeds = std::fs::read_dir(root.join(format!("fuzz/corpus/{t}"))).unwrap();
            assert!(seeds.count() > 0, "{t} has no seed");
        }
    }
}
