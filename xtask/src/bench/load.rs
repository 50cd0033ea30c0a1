//! Driving load from inside the client pod and reading what it cost: oha for HTTP
//! (fixed rate with coordinated-omission correction, saturation, new connections),
//! mesh-testpod for bulk throughput, /proc for CPU and memory.
use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use mesh_tests::{Cluster, Pod};
use serde::Serialize;

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Latency {
    pub rate: u32,
    pub achieved_rps: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub success_rate: f64,
    /// How many runs the figures combine, and the range of their p50 and p99 (none
    /// for a single run).
    pub runs: usize,
    pub p50_range: Option<(f64, f64)>,
    pub p99_range: Option<(f64, f64)>,
}

impl Latency {
    /// Runs at the same rate as one figure: each percentile and the achieved rate the
    /// median of the runs', with the range of p50 and p99 across them, and the worst
    /// run's success rate (a run that failed must not hide behind two that did not).
    pub fn combined(runs: &[Latency]) -> Option<Latency> {
        let first = runs.first()?;
        let med = |f: fn(&Latency) -> f64| super::median(&runs.iter().map(f).collect::<Vec<_>>());
        let range = |f: fn(&Latency) -> f64| {
            (runs.len() > 1)
                .then(|| super::range(&runs.iter().map(f).collect::<Vec<_>>()))
                .flatten()
        };
        Some(Latency {
            rate: first.rate,
            achieved_rps: med(|l| l.achieved_rps),
            p50_ms: med(|l| l.p50_ms),
            p90_ms: med(|l| l.p90_ms),
            p99_ms: med(|l| l.p99_ms),
            p999_ms: med(|l| l.p999_ms),
            success_rate: runs
                .iter()
                .map(|l| l.success_rate)
                .fold(f64::INFINITY, f64::min),
            runs: runs.len(),
            p50_range: range(|l| l.p50_ms),
            p99_range: range(|l| l.p99_ms),
        })
    }
}

/// A 1 KiB request body: the server answers each request with 1 KiB too.
fn body_file(work: &Path) -> anyhow::Result<PathBuf> {
    let path = work.join("bench-body-1k");
    std::fs::write(&path, vec![b'b'; 1024])?;
    Ok(path)
}

pub struct Oha {
    pub bin: PathBuf,
}

fn seconds(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

impl Oha {
    fn run(
        &self,
        c: &Cluster,
        pod: &Pod,
        url: &str,
        args: &[String],
    ) -> anyhow::Result<serde_json::Value> {
        let body = body_file(&c.work_dir)?;
        let mut cmd = c.command_in_pod(pod, &self.bin)?;
        cmd.args(["--no-tui", "--output-format", "json", "-m", "POST", "-D"])
            .arg(&body)
            .args(args)
            .arg(url);
        let out = cmd
            .output()
            .with_context(|| format!("running {}", self.bin.display()))?;
        if !out.status.success() {
            bail!(
                "oha {args:?} {url} failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "oha printed no JSON: {}",
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `rate` requests/s over `connections` keep-alive connections for `secs`, with
    /// latency measured from when each request was due (coordinated omission).
    pub fn fixed_rate(
        &self,
        c: &Cluster,
        pod: &Pod,
        url: &str,
        rate: u32,
        connections: u32,
        secs: u64,
    ) -> anyhow::Result<Latency> {
        self.paced(c, pod, url, rate, connections, secs, true)
    }

    /// A fixed rate of new connections, one request on each (`--disable-keepalive`):
    /// connection churn, with each connection's setup in the request's latency.
    pub fn churn(
        &self,
        c: &Cluster,
        pod: &Pod,
        url: &str,
        rate: u32,
        connections: u32,
        secs: u64,
    ) -> anyhow::Result<Latency> {
        self.paced(c, pod, url, rate, connections, secs, false)
    }

    #[allow(clippy::too_many_arguments)]
    fn paced(
        &self,
        c: &Cluster,
        pod: &Pod,
        url: &str,
        rate: u32,
        connections: u32,
        secs: u64,
        keepalive: bool,
    ) -> anyhow::Result<Latency> {
        let mut args = vec![
            "-q".into(),
            rate.to_string(),
            "--latency-correction".into(),
            "-c".into(),
            connections.to_string(),
            "-z".into(),
            format!("{secs}s"),
        ];
        if !keepalive {
            args.push("--disable-keepalive".into());
        }
        let v = self.run(c, pod, url, &args)?;
        let p = &v["latencyPercentiles"];
        Ok(Latency {
            rate,
            achieved_rps: seconds(&v["summary"]["requestsPerSec"]),
            p50_ms: seconds(&p["p50"]) * 1e3,
            p90_ms: seconds(&p["p90"]) * 1e3,
            p99_ms: seconds(&p["p99"]) * 1e3,
            p999_ms: seconds(&p["p99.9"]) * 1e3,
            success_rate: seconds(&v["summary"]["successRate"]),
            runs: 1,
            p50_range: None,
            p99_range: None,
        })
    }

    /// Requests/s with no rate limit: keep-alive (saturation) or a new connection per
    /// request (connection rate).
    pub fn max_rate(
        &self,
        c: &Cluster,
        pod: &Pod,
        url: &str,
        connections: u32,
        secs: u64,
        new_connections: bool,
    ) -> anyhow::Result<(f64, f64)> {
        let mut args = vec![
            "-c".into(),
            connections.to_string(),
            "-z".into(),
            format!("{secs}s"),
        ];
        if new_connections {
            args.push("--disable-keepalive".into());
        }
        let v = self.run(c, pod, url, &args)?;
        Ok((
            seconds(&v["summary"]["requestsPerSec"]),
            seconds(&v["summary"]["successRate"]),
        ))
    }
}

/// One connection, `bytes` from client to server, Gbit/s.
pub fn bulk(c: &mut Cluster, pod: &Pod, addr: &str, bytes: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let out = c.run_in(
        pod,
        &["sink", "--addr", addr, "--bytes", &bytes.to_string()],
        Duration::from_secs(300),
    )?;
    let secs = started.elapsed().as_secs_f64();
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    anyhow::ensure!(v["sent"] == bytes, "bulk transfer incomplete: {v}");
    Ok(bytes as f64 * 8.0 / secs / 1e9)
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15 of /proc/PID/stat, 11 and 12 after ")".
    (ticks(11) + ticks(12)) / clock_ticks()
}

/// CPU time the whole machine spent busy (every core: user, system, interrupts), in
/// seconds: a path's cost wherever it is paid, in the proxies, in the applications'
/// system calls or in the kernel's softirqs and workers.
pub fn machine_busy_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    busy_ticks(&stat) / clock_ticks()
}

/// The busy ticks of /proc/stat's `cpu` line: everything but idle, iowait and steal
/// (time the hypervisor gave to someone else is not work done here).
fn busy_ticks(stat: &str) -> f64 {
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return f64::NAN;
    };
    line.split_whitespace()
        .skip(1)
        .take(8)
        .enumerate()
        .filter(|(i, _)| ![3, 4, 7].contains(i))
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum()
}

/// USER_HZ, the unit of /proc CPU times.
fn clock_ticks() -> f64 {
    static HZ: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *HZ.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Peak resident memory of a process, MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "VmHWM:")
}

/// Resident anonymous memory (heap, stacks): what the process itself holds, without
/// the pages of its executable, which the page cache shares.
pub fn anon_rss_mib(pid: u32) -> f64 {
    status_mib(pid, "RssAnon:")
}

fn status_mib(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::{Latency, busy_ticks};

    fn run(p50: f64, p99: f64, success_rate: f64) -> Latency {
        Latency {
            rate: 1000,
            achieved_rps: 1000.0 - p50,
            p50_ms: p50,
            p90_ms: p50 * 2.0,
            p99_ms: p99,
            p999_ms: p99 * 2.0,
            success_rate,
            runs: 1,
            ..Default::default()
        }
    }

    #[test]
    fn runs_combine_into_medians_with_ranges_and_the_worst_success_rate() {
        let l = Latency::combined(&[run(0.3, 1.0, 1.0), run(0.1, 3.0, 0.98), run(0.2, 2.0, 1.0)])
            .expect("three runs");
        assert_eq!(
            (l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms),
            (0.2, 0.4, 2.0, 4.0)
        );
        assert_eq!(l.achieved_rps, 999.8);
        assert_eq!(
            (l.p50_range, l.p99_range),
            (Some((0.1, 0.3)), Some((1.0, 3.0)))
        );
        assert_eq!((l.runs, l.success_rate), (3, 0.98));
        let one = Latency::combined(&[run(0.3, 1.0, 1.0)]).expect("one run");
        assert_eq!((one.p99_ms, one.p99_range, one.runs), (1.0, None, 1));
        assert!(Latency::combined(&[]).is_none());
    }

    #[test]
    fn busy_ticks_leave_out_idle_and_iowait() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let stat = "cpu  100 2 30 5000 40 6 7 8 9 10\ncpu0 50 1 15 2500 20 3 3 4 4 5\n";
        assert_eq!(busy_ticks(stat), 100.0 + 2.0 + 30.0 + 6.0 + 7.0);
        assert!(busy_ticks("intr 1 2 3\n").is_nan());
    }
}
