//! `cargo xtask bench [--quick]`: every scenario side by side in one run on one
//! simulated cluster, then a report in docs/benchmarks/ (JSON, Markdown, SVG).
//!
//! Scenarios, all from the same client pod on node-1 to an HTTP server answering 1 KiB:
//!   direct-local   to a server pod on node-1, no mesh (the limit for same-node)
//!   direct         to a server pod on node-2, no mesh (the limit across nodes)
//!   mesh-l4-local  through the agent to the node-1 server (ClusterIP)
//!   mesh-mtls      through both agents and the mTLS tunnel to the node-2 server
//!   mesh-mtls-podip the same, dialling the server's pod IP instead of a ClusterIP
//!   each mesh scenario twice: agents with `--sockmap off`, then `-sockmap` with it on
//!   mesh-l7-local  through the agent, an HTTPRoute attached: each request routed
//!   mesh-l7-mtls   the same across nodes: HTTP/2 on the pooled mTLS tunnel
//!   haproxy        a per-node HAProxy on each node with mutual TLS between them
//!   haproxy-http   the same in HTTP mode (requests parsed, HTTP/2 between nodes)
//! The L7 scenarios run with sockmap off only, and have no bulk figure (the bulk
//! server does not speak HTTP).
//!
//! Each scenario: the proxies' cost idle, latency at fixed rates (1k, 4k, 10k req/s),
//! saturation, new connections/s, churn (a fixed rate of new connections), and three
//! bulk transfers.
//!
//! Then `kernel-log` (full runs, or `--only kernel-log`): what the kernel programs'
//! run-time log switch costs when off, against a build with the log compiled out (see
//! `kernel_log`).
mod against;
mod haproxy;
mod kernel_log;
mod load;
mod report;
mod rounds;
mod scale;
mod work;

use std::{
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use load::{Oha, anon_rss_mib, bulk, cpu_seconds, peak_rss_mib};
use mesh_tests::{Cluster, Pod, yaml};
use report::{ConnWork, Cost, Report, Scenario};
use rounds::Tally;

use crate::{root, sh};

const PORT: u16 = 8080;
/// The bulk (SINK) server in the same pods.
const BULK_PORT: u16 = 9090;
const LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 200);
const REMOTE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 201);
const LOCAL_BULK_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 202);
const REMOTE_BULK_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 203);
const L7_LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 204);
const L7_REMOTE_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 205);

/// Bulk transfers per scenario: the report gives their median and range, one
/// transfer being the figure the machine's noise moves most.
const BULK_RUNS: usize = 3;

/// New connections per second in the churn run: below every path's connection rate
/// on this machine (HAProxy's mTLS handshakes top out near 600/s), so each path's
/// latency is compared at a load it sustains.
const CHURN_RATE: u32 = 300;

/// How long and how hard each measurement runs.
struct Plan {
    rates: Vec<u32>,
    rate_secs: u64,
    /// New connections per second in the churn run.
    churn_rate: u32,
    connections: u32,
    max_secs: u64,
    bulk_bytes: u64,
    scale_services: usize,
    scale_endpoints_per_service: usize,
    /// Only the scenarios whose name contains one of these (and the baselines);
    /// empty: all of them.
    only: Vec<String>,
    /// A git revision whose agent is measured beside this build's, in alternating
    /// rounds (`against`).
    against: Option<String>,
    /// Record the proxies' CPU profile (`perf record -e cpu-clock`, DWARF call graphs) during each
    /// saturation run and each scenario's bulk transfers.
    profile: bool,
    quick: bool,
}

impl Plan {
    /// Whether this run measures the scenario (the baselines always: the ratios need
    /// them).
    fn wants(&self, name: &str) -> bool {
        name.starts_with("direct")
            || self.only.is_empty()
            || self.only.iter().any(|o| name.contains(o.as_str()))
    }

    /// Whether any of `names` is measured.
    fn wants_any(&self, names: &[String]) -> bool {
        names.iter().any(|n| self.wants(n))
    }

    /// Whether to measure the kernel log's cost: it builds the agent a second time, so
    /// a quick run does it only when asked (`--only kernel-log`).
    fn wants_kernel_log(&self) -> bool {
        if self.quick {
            self.only.iter().any(|o| o == "kernel-log")
        } else {
            self.wants("kernel-log")
        }
    }

    /// A partial run (some scenarios) is a developer's measurement: it does not
    /// replace the committed report.
    fn partial(&self) -> bool {
        !self.only.is_empty() || self.profile || self.against.is_some()
    }

    /// How long each of the [`RATE_RUNS`] saturation and new-connection runs lasts:
    /// together as long as one run used to be, so a full run takes no longer.
    fn rate_run_secs(&self) -> u64 {
        (self.max_secs / RATE_RUNS as u64).max(1)
    }

    /// How long each of the [`rounds::RUNS`] runs of a fixed-rate figure lasts:
    /// together as long as one run used to be.
    fn paced_run_secs(&self) -> u64 {
        (self.rate_secs / rounds::RUNS).max(1)
    }

    /// How long the proxies' idle cost is measured.
    fn idle_secs(&self) -> u64 {
        self.rate_secs.min(5)
    }

    /// How long to profile a bulk transfer: about as long as it takes through the
    /// mesh (perf's recording length is fixed when it starts).
    fn bulk_profile_secs(&self) -> u64 {
        ((BULK_RUNS as u64 * self.bulk_bytes) >> 28).max(1)
    }

    fn new(quick: bool) -> Plan {
        if quick {
            Plan {
                rates: vec![1000, 4000, 10_000],
                rate_secs: 3,
                churn_rate: CHURN_RATE,
                connections: 16,
                max_secs: 3,
                bulk_bytes: 256 << 20,
                scale_services: 10_000,
                scale_endpoints_per_service: 10,
                only: Vec::new(),
                against: None,
                profile: false,
                quick,
            }
        } else {
            Plan {
                rates: vec![1000, 4000, 10_000],
                rate_secs: 12,
                churn_rate: CHURN_RATE,
                connections: 16,
                max_secs: 10,
                bulk_bytes: 1 << 30,
                scale_services: 10_000,
                scale_endpoints_per_service: 10,
                only: Vec::new(),
                against: None,
                profile: false,
                quick,
            }
        }
    }
}

/// An error on one line: tools' stderr (with backtraces) stays out of the report.
fn first_line(e: &anyhow::Error) -> String {
    format!("{e:#}").lines().next().unwrap_or("").to_owned()
}

fn progress(msg: &str) {
    eprintln!("bench: {msg}");
}

/// One scenario: where the client sends, and which processes are the proxy.
#[derive(Clone, Copy)]
struct Target<'a> {
    name: &'a str,
    description: &'a str,
    baseline: &'a str,
    addr: &'a str,
    /// Where the bulk transfer goes (a SINK server on the same path), if anywhere.
    bulk: Option<&'a str>,
    /// Whose CPU and memory count as the mesh's (empty for the baselines).
    proxies: &'a [u32],
}

/// Where the mesh scenarios send their traffic.
struct MeshAddrs {
    local_vip: String,
    remote_vip: String,
    local_vip_bulk: String,
    remote_vip_bulk: String,
    remote_addr: String,
    remote_bulk: String,
    l7_local_vip: String,
    l7_remote_vip: String,
}

/// What the L4 mesh scenarios are, with `how` (the sockmap mode) added.
fn l4_descriptions(how: &str) -> [String; 3] {
    [
        format!(
            "ClusterIP through the node's agent to a pod on the same node (policy checked, not encrypted); {how}"
        ),
        format!(
            "ClusterIP through both agents and the mTLS (HBONE) tunnel to a pod on the other node; {how}"
        ),
        format!(
            "the server's pod IP (no ClusterIP), captured and carried through both agents and the mTLS tunnel; {how}"
        ),
    ]
}

/// The mesh scenarios, named by `names` (L4 local, mTLS, mTLS by pod IP, L7 local,
/// L7 mTLS), through the running agents `agents`.
fn mesh_targets<'a>(
    names: &'a [String; 5],
    l4: &'a [String; 3],
    agents: &'a [u32],
    a: &'a MeshAddrs,
) -> Vec<Target<'a>> {
    vec![
        Target {
            name: &names[0],
            description: &l4[0],
            baseline: "direct-local",
            addr: &a.local_vip,
            bulk: Some(&a.local_vip_bulk),
            proxies: &agents[..1],
        },
        Target {
            name: &names[1],
            description: &l4[1],
            baseline: "direct",
            addr: &a.remote_vip,
            bulk: Some(&a.remote_vip_bulk),
            proxies: agents,
        },
        Target {
            name: &names[2],
            description: &l4[2],
            baseline: "direct",
            addr: &a.remote_addr,
            bulk: Some(&a.remote_bulk),
            proxies: agents,
        },
        Target {
            name: &names[3],
            description: "ClusterIP with an HTTPRoute: each request parsed, routed and balanced by the node's agent to a pod on the same node",
            baseline: "direct-local",
            addr: &a.l7_local_vip,
            bulk: None,
            proxies: &agents[..1],
        },
        Target {
            name: &names[4],
            description: "ClusterIP with an HTTPRoute: each request routed by the client's agent and sent as HTTP/2 on the pooled mTLS tunnel to the other node's agent",
            baseline: "direct",
            addr: &a.l7_remote_vip,
            bulk: None,
            proxies: agents,
        },
    ]
}

/// Everything one scenario measures.
fn measure(c: &mut Cluster, oha: &Oha, plan: &Plan, client: &Pod, t: Target<'_>) -> Scenario {
    let Target {
        name,
        description,
        baseline,
        addr: target,
        bulk: bulk_addr,
        proxies,
    } = t;
    let url = format!("http://{target}/");
    let mut s = Scenario {
        name: name.into(),
        description: description.into(),
        baseline: baseline.into(),
        ..Default::default()
    };
    // A short warm-up: pooled tunnels, caches, the first certificate use.
    let _ = oha.fixed_rate(c, client, &url, 200, 4, 1);
    if !proxies.is_empty() {
        // What the proxies cost with no traffic at all (timers, health, config).
        let cpu0: f64 = proxies.iter().map(|p| cpu_seconds(*p)).sum();
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_secs(plan.idle_secs()));
        let cpu = proxies.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu0;
        s.proxy_cost.push(Cost {
            rate: 0,
            achieved_rps: 0.0,
            vcpu: cpu / t0.elapsed().as_secs_f64(),
            anon_rss_mib: proxies.iter().map(|p| anon_rss_mib(*p)).sum(),
        });
    }
    let secs = plan.paced_run_secs();
    let mut tallies: Vec<Tally> = plan.rates.iter().map(|_| Tally::default()).collect();
    for round in 1..=rounds::RUNS {
        for (i, (rate, tally)) in plan.rates.iter().zip(&mut tallies).enumerate() {
            progress(&format!(
                "{name}: {rate} req/s for {secs}s (round {round} of {})",
                rounds::RUNS
            ));
            // At the lowest rate each request pays its wake-ups alone: where that
            // time goes is not where it goes at saturation, so it is profiled too.
            let recording = (plan.profile && i == 0 && round == 1 && !proxies.is_empty())
                .then(|| profile(&format!("{name}-{rate}"), proxies, secs, FINE_HZ))
                .flatten();
            tally.run(proxies, i == 0, secs, || {
                oha.fixed_rate(c, client, &url, *rate, plan.connections, secs)
            });
            if let Some(mut perf) = recording {
                let _ = perf.wait();
            }
        }
    }
    for (i, (rate, tally)) in plan.rates.iter().zip(tallies).enumerate() {
        for e in &tally.errors {
            s.errors.push(format!("{rate} req/s: {e}"));
        }
        let Some(l) = tally.latency() else {
            continue;
        };
        if !proxies.is_empty() {
            s.proxy_cost.push(Cost {
                rate: *rate,
                achieved_rps: l.achieved_rps,
                vcpu: tally.proxy_cpu_s / tally.secs,
                anon_rss_mib: tally.anon_rss_mib,
            });
        }
        if i == 0 {
            s.machine_cpu_us_per_request = Some(tally.per_request(tally.machine_busy_s) * 1e6);
            if !proxies.is_empty() {
                s.proxy_vcpu_per_1k_rps = Some(vcpu_per_1k(&s.proxy_cost, *rate));
            }
            if let Some(w) = &tally.work {
                s.proxy_syscalls_per_request = Some(tally.per_request(w.syscalls));
                s.proxy_switches_per_request = Some(tally.per_request(w.switches));
            }
        }
        s.latency
            .push(judged(l, &format!("{rate} req/s"), &mut s.errors));
    }
    progress(&format!(
        "{name}: saturation, {RATE_RUNS} runs of {}s",
        plan.rate_run_secs()
    ));
    let recording = (plan.profile && !proxies.is_empty())
        .then(|| profile(name, proxies, plan.max_secs, COARSE_HZ))
        .flatten();
    let saturation = repeated(|| {
        oha.max_rate(
            c,
            client,
            &url,
            plan.connections * 2,
            plan.rate_run_secs(),
            false,
        )
    });
    if let Some(mut perf) = recording {
        let _ = perf.wait();
    }
    match saturation {
        Ok(r) => (s.saturation_rps, s.saturation_rps_range) = r.judged("saturation", &mut s.errors),
        Err(e) => s.errors.push(format!("saturation: {}", first_line(&e))),
    }
    progress(&format!(
        "{name}: new connections, {RATE_RUNS} runs of {}s",
        plan.rate_run_secs()
    ));
    // New connections cost the kernel as much as the proxies (sockets, and with
    // sockmap each socket's psock set up and torn down, partly in kernel workers), so
    // this profile is of the whole machine.
    let recording = (plan.profile && !proxies.is_empty())
        .then(|| profile(&format!("{name}-newconn"), &[], plan.max_secs, COARSE_HZ))
        .flatten();
    let new_connections = repeated(|| {
        oha.max_rate(
            c,
            client,
            &url,
            plan.connections,
            plan.rate_run_secs(),
            true,
        )
    });
    if let Some(mut perf) = recording {
        let _ = perf.wait();
    }
    match new_connections {
        Ok(r) => {
            (s.new_connections_per_s, s.new_connections_per_s_range) =
                r.judged("new connections", &mut s.errors)
        }
        Err(e) => s
            .errors
            .push(format!("new connections: {}", first_line(&e))),
    }
    progress(&format!(
        "{name}: {} new connections/s, {} runs of {secs}s",
        plan.churn_rate,
        rounds::RUNS
    ));
    let mut churn = Tally::default();
    for _ in 0..rounds::RUNS {
        churn.run(proxies, true, secs, || {
            oha.churn(c, client, &url, plan.churn_rate, plan.connections, secs)
        });
    }
    for e in &churn.errors {
        s.errors.push(format!("churn: {e}"));
    }
    if let Some(l) = churn.latency() {
        s.churn_work = Some(ConnWork {
            proxy_cpu_us: (!proxies.is_empty()).then(|| churn.per_request(churn.proxy_cpu_s) * 1e6),
            machine_cpu_us: churn.per_request(churn.machine_busy_s) * 1e6,
            proxy_syscalls: churn.work.as_ref().map(|w| churn.per_request(w.syscalls)),
            proxy_switches: churn.work.as_ref().map(|w| churn.per_request(w.switches)),
        });
        s.churn = Some(judged(l, "churn", &mut s.errors));
    }
    s.bulk_gbit_s = f64::NAN;
    if let Some(bulk_addr) = bulk_addr {
        progress(&format!(
            "{name}: bulk {} MiB on one connection, {} times",
            plan.bulk_bytes >> 20,
            BULK_RUNS
        ));
        let cpu0: f64 = proxies.iter().map(|p| cpu_seconds(*p)).sum();
        let counting = (!proxies.is_empty())
            .then(|| work::count_until_stopped(proxies))
            .flatten();
        let recording = (plan.profile && !proxies.is_empty())
            .then(|| {
                profile(
                    &format!("{name}-bulk"),
                    proxies,
                    plan.bulk_profile_secs(),
                    COARSE_HZ,
                )
            })
            .flatten();
        let mut rates = Vec::new();
        for _ in 0..BULK_RUNS {
            match bulk(c, client, bulk_addr, plan.bulk_bytes) {
                Ok(g) => rates.push(g),
                Err(e) => {
                    s.errors.push(format!("bulk: {}", first_line(&e)));
                    break;
                }
            }
        }
        let cpu = proxies.iter().map(|p| cpu_seconds(*p)).sum::<f64>() - cpu0;
        let work = counting.and_then(work::Counting::stop);
        if let Some(mut perf) = recording {
            let _ = perf.wait();
        }
        if rates.len() == BULK_RUNS {
            s.bulk_gbit_s = median(&rates);
            s.bulk_gbit_s_range = range(&rates);
            let gib = (BULK_RUNS as u64 * plan.bulk_bytes) as f64 / f64::from(1u32 << 30);
            if !proxies.is_empty() {
                s.bulk_proxy_cpu_s_per_gib = Some(cpu / gib);
            }
            if let Some(w) = work {
                s.bulk_proxy_syscalls_per_mib = Some(w.syscalls / (gib * 1024.0));
            }
        }
    }
    if !proxies.is_empty() {
        s.proxy_peak_rss_mib = Some(proxies.iter().map(|p| peak_rss_mib(*p)).sum());
        s.proxy_anon_rss_mib = Some(proxies.iter().map(|p| anon_rss_mib(*p)).sum());
    }
    s
}

/// A fixed-rate run's latencies as reported: a success rate under 1 is named in
/// `errors` as a problem of `what`, and under 0.99 the latencies become NaN (the
/// latencies of failures mean nothing; they are not reported as the path's).
fn judged(mut l: load::Latency, what: &str, errors: &mut Vec<String>) -> load::Latency {
    if l.success_rate < 1.0 {
        errors.push(format!("{what}: success rate {:.4}", l.success_rate));
    }
    if l.success_rate < 0.99 {
        (l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms) = (f64::NAN, f64::NAN, f64::NAN, f64::NAN);
    }
    l
}

/// The proxies' vCPU per 1,000 req/s at `rate`, from the costs measured.
fn vcpu_per_1k(costs: &[Cost], rate: u32) -> f64 {
    costs
        .iter()
        .find(|c| c.rate == rate)
        .map_or(f64::NAN, |c| c.vcpu * 1000.0 / c.achieved_rps.max(1.0))
}

/// Samples per second where the proxies are busy (saturation, bulk, new connections).
const COARSE_HZ: u32 = 499;
/// Samples per second at the lowest fixed rate, where the proxies are mostly idle: a
/// 4-s run at the coarse rate gives too few samples to tell the costs of a request apart.
const FINE_HZ: u32 = 3997;

/// Starts `perf record` on the proxies (no proxies: on the whole machine) for `secs`,
/// `hz` samples per second; the data goes to target/bench/perf-NAME.data
/// (`perf report -i` reads it).
fn profile(name: &str, proxies: &[u32], secs: u64, hz: u32) -> Option<std::process::Child> {
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir).ok()?;
    let pids: Vec<String> = proxies.iter().map(u32::to_string).collect();
    let target = if pids.is_empty() {
        vec!["-a".to_string()]
    } else {
        vec!["-p".to_string(), pids.join(",")]
    };
    let out = dir.join(format!("perf-{name}.data"));
    progress(&format!("{name}: profiling into {}", out.display()));
    std::process::Command::new("perf")
        .args([
            "record",
            "-e",
            "cpu-clock",
            "-F",
            &hz.to_string(),
            "--call-graph",
            "dwarf,8192",
            "-q",
            "-o",
        ])
        .arg(&out)
        .args(&target)
        .args(["--", "sleep", &secs.to_string()])
        .stdout(std::process::Stdio::null())
        .spawn()
        .map_err(|e| progress(&format!("perf did not start: {e}")))
        .ok()
}

fn text(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// The commit a report is made from, with `-dirty` if tracked files changed.
pub fn commit() -> String {
    let mut commit = text("git", &["rev-parse", "--short", "HEAD"]);
    if !text("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty() {
        commit.push_str("-dirty");
    }
    commit
}

/// Builds the agent, meshctl and the workload in release and returns where they are.
pub fn build_release_bins() -> anyhow::Result<std::path::PathBuf> {
    build_release_bins_with(&[])
}

/// As [`build_release_bins`], with these cargo features on.
fn build_release_bins_with(features: &[&str]) -> anyhow::Result<std::path::PathBuf> {
    std::env::set_current_dir(root())?;
    let mut args = vec![
        "build",
        "--release",
        "-p",
        "mesh-agent",
        "-p",
        "mesh-tests",
        "--bins",
    ];
    let features = features.join(",");
    if !features.is_empty() {
        args.extend(["--features", &features]);
    }
    sh("cargo", &args)?;
    Ok(root().join("target/release"))
}

fn machine(report: &mut Report) {
    report.kernel = text("uname", &["-r"]);
    report.commit = commit();
    report.generated_at = text("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    report.cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("unknown")
        .trim()
        .to_owned();
    report.cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    report.memory_gib = std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1048576.0);
    report.kernel_tls = kernel_tls();
}

/// Whether this kernel can take over the TLS record layer (`TCP_ULP` "tls"): the ULP
/// is listed once its module is loaded; otherwise the kernel's config says whether it
/// exists at all.
fn kernel_tls() -> String {
    let ulps = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp").unwrap_or_default();
    if ulps.split_whitespace().any(|u| u == "tls") {
        return "available (the tls ULP is loaded)".into();
    }
    let config = text(
        "sh",
        &[
            "-c",
            "zcat /proc/config.gz 2>/dev/null | grep -E '^(# )?CONFIG_TLS[ =]'",
        ],
    );
    match config.as_str() {
        "" => format!(
            "not loaded (ULPs: {}); the kernel config is not readable",
            ulps.trim()
        ),
        line => format!("not available (ULPs: {}; {line})", ulps.trim()),
    }
}

pub fn run(
    quick: bool,
    only: Vec<String>,
    profile: bool,
    against: Option<String>,
) -> anyhow::Result<()> {
    let plan = Plan {
        only,
        profile,
        against,
        ..Plan::new(quick)
    };
    // Before the normal build, which overwrites the agent binary.
    if plan.wants_kernel_log() {
        kernel_log::build_reference()?;
    }
    let other = match &plan.against {
        Some(rev) => Some(against::build(rev)?),
        None => None,
    };
    let target = build_release_bins()?;
    let oha = Oha {
        bin: crate::setup::oha_path().context("oha is not installed (cargo xtask setup)")?,
    };
    let started = Instant::now();
    let mut report = Report {
        quick,
        ..Default::default()
    };
    machine(&mut report);

    let mut c = Cluster::with_prefix(
        "mesh-bench",
        &["node-1", "node-2"],
        &target.join("mesh-agent"),
        &target.join("mesh-testpod"),
    )?;
    let client = c.add_pod("node-1", "client")?;
    let local = c.add_pod("node-1", "server-local")?;
    let remote = c.add_pod("node-2", "server-remote")?;
    for server in [&local, &remote] {
        let mut child = c.spawn(server, &["http", "--port", &PORT.to_string()])?;
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().context("server stdout")?),
            &mut line,
        )?;
        anyhow::ensure!(line.trim() == "listening", "HTTP server: {line}");
        c.start_server(server, BULK_PORT)?;
    }
    let cfg = c.pod_yaml(&client, true)
        + &c.pod_yaml(&local, true)
        + &c.pod_yaml(&remote, true)
        + &yaml::service("bench-local", IpAddr::V4(LOCAL_VIP), 80, PORT)
        + &yaml::endpoint_slice("bench-local", PORT, &[local.ip])
        + &yaml::service("bench-remote", IpAddr::V4(REMOTE_VIP), 80, PORT)
        + &yaml::endpoint_slice("bench-remote", PORT, &[remote.ip])
        + &yaml::service("bulk-local", IpAddr::V4(LOCAL_BULK_VIP), 80, BULK_PORT)
        + &yaml::endpoint_slice("bulk-local", BULK_PORT, &[local.ip])
        + &yaml::service("bulk-remote", IpAddr::V4(REMOTE_BULK_VIP), 80, BULK_PORT)
        + &yaml::endpoint_slice("bulk-remote", BULK_PORT, &[remote.ip])
        + &yaml::routed_service(
            "bench-l7-local",
            IpAddr::V4(L7_LOCAL_VIP),
            PORT,
            &[local.ip],
        )
        + &yaml::routed_service(
            "bench-l7-remote",
            IpAddr::V4(L7_REMOTE_VIP),
            PORT,
            &[remote.ip],
        );
    c.write_config("bench.yaml", &cfg)?;

    // Baselines first, with no agent running at all.
    let local_addr = format!("{}:{PORT}", local.ip);
    let remote_addr = format!("{}:{PORT}", remote.ip);
    let local_bulk = format!("{}:{BULK_PORT}", local.ip);
    let remote_bulk = format!("{}:{BULK_PORT}", remote.ip);
    let local_vip_bulk = format!("{LOCAL_BULK_VIP}:80");
    let remote_vip_bulk = format!("{REMOTE_BULK_VIP}:80");
    let run = |c: &mut Cluster, report: &mut Report, targets: &[Target<'_>]| {
        for t in targets.iter().filter(|t| plan.wants(t.name)) {
            report.scenarios.push(measure(c, &oha, &plan, &client, *t));
        }
    };
    run(
        &mut c,
        &mut report,
        &[
            Target {
                name: "direct-local",
                description: "client pod to a server pod on the same node, no mesh",
                baseline: "direct-local",
                addr: &local_addr,
                bulk: Some(&local_bulk),
                proxies: &[],
            },
            Target {
                name: "direct",
                description: "client pod to a server pod on the other node, no mesh",
                baseline: "direct",
                addr: &remote_addr,
                bulk: Some(&remote_bulk),
                proxies: &[],
            },
        ],
    );

    let (local_vip, remote_vip) = (format!("{LOCAL_VIP}:80"), format!("{REMOTE_VIP}:80"));
    let addrs = MeshAddrs {
        local_vip,
        remote_vip,
        local_vip_bulk,
        remote_vip_bulk,
        remote_addr,
        remote_bulk,
        l7_local_vip: format!("{L7_LOCAL_VIP}:80"),
        l7_remote_vip: format!("{L7_REMOTE_VIP}:80"),
    };
    // This build's agent, and the other revision's with `--against`: then each
    // scenario is measured in alternating rounds, named `NAME#ROUND` and
    // `NAME@REV#ROUND`.
    let mut builds = vec![(String::new(), target.join("mesh-agent"))];
    if let Some((rev, bin)) = &other {
        builds.push((against::tag(rev), bin.clone()));
    }
    let rounds = if other.is_some() { against::ROUNDS } else { 1 };
    for sockmap in [false, true] {
        let (suffix, how) = if sockmap {
            ("-sockmap", "sockmap on: the pod-agent hops skip TCP/IP")
        } else {
            ("", "sockmap off: every hop is TCP")
        };
        for round in 1..=rounds {
            for k in 0..builds.len() {
                // A B, then B A, ...: neither build always goes first.
                let (tag, bin) = &builds[(k + round - 1) % builds.len()];
                let named = |base: String| {
                    let name = format!("{base}{tag}");
                    if other.is_some() {
                        against::round_name(&name, round)
                    } else {
                        name
                    }
                };
                let names = [
                    named(format!("mesh-l4-local{suffix}")),
                    named(format!("mesh-mtls{suffix}")),
                    named(format!("mesh-mtls-podip{suffix}")),
                    named("mesh-l7-local".to_owned()),
                    named("mesh-l7-mtls".to_owned()),
                ];
                // L7 does not use sockmap (the agent reads every request): measured once.
                let measured = if sockmap { &names[..3] } else { &names[..] };
                if !plan.wants_any(measured) {
                    continue;
                }
                progress(&format!("starting the agents{tag}, {how}"));
                c.agent_bin = bin.clone();
                c.agent_args = vec![
                    "--sockmap".into(),
                    if sockmap { "on" } else { "off" }.into(),
                ];
                c.start_agent("node-1")?;
                c.start_agent("node-2")?;
                let agents: Vec<u32> = ["node-1", "node-2"]
                    .iter()
                    .filter_map(|n| c.agent_pid(n))
                    .collect();
                let descriptions = l4_descriptions(how);
                let targets = mesh_targets(&names, &descriptions, &agents, &addrs);
                run(&mut c, &mut report, &targets[..measured.len()]);
                c.stop_agent("node-1")?;
                c.stop_agent("node-2")?;
            }
        }
    }
    c.agent_bin = target.join("mesh-agent");
    c.agent_args.clear();

    if plan.wants_kernel_log() {
        progress("kernel log: compiled out, off, debug");
        match kernel_log::run(
            &mut c,
            &oha,
            &plan,
            &client,
            &format!("http://{}/", addrs.local_vip),
        ) {
            Ok(k) => report.kernel_log = Some(k),
            Err(e) => report
                .notes
                .push(format!("kernel log measurement failed: {e:#}")),
        }
    }

    let haproxy = if ["haproxy", "haproxy-http"].iter().any(|n| plan.wants(n)) {
        progress("starting HAProxy on both nodes");
        Some(haproxy::run(
            &mut c,
            "node-1",
            "node-2",
            (remote.ip, PORT),
            BULK_PORT,
        ))
    } else {
        None
    };
    match haproxy {
        None => {}
        Some(Ok((proxies, paths))) => {
            run(
                &mut c,
                &mut report,
                &[
                    Target {
                        name: "haproxy",
                        description: "HAProxy 2.6 per node (2 threads), plain TCP from the pod, mutual TLS 1.3 between the nodes",
                        baseline: "direct",
                        addr: &paths.tcp,
                        bulk: Some(&paths.bulk),
                        proxies: &proxies.pids,
                    },
                    Target {
                        name: "haproxy-http",
                        description: "HAProxy 2.6 per node (2 threads) in HTTP mode: requests parsed and kept alive, HTTP/2 over mutual TLS 1.3 between the nodes",
                        baseline: "direct",
                        addr: &paths.http,
                        bulk: None,
                        proxies: &proxies.pids,
                    },
                ],
            );
            proxies.stop();
        }
        Some(Err(e)) => report.notes.push(format!("haproxy did not run: {e:#}")),
    }
    drop(c);

    if plan.wants("scale") {
        progress("scale: generating the config and starting an agent on it");
        match scale::run(
            &target,
            plan.scale_services,
            plan.scale_endpoints_per_service,
        ) {
            Ok(s) => report.scale = Some(s),
            Err(e) => report.notes.push(format!("scale test failed: {e:#}")),
        }
    }

    if let Some((rev, _)) = &other {
        report.comparison = Some(against::section(&report.scenarios, rev, &report.commit));
    }
    let dir = if plan.partial() {
        root().join("target/bench")
    } else {
        root().join("docs/benchmarks")
    };
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    let md = report.markdown();
    std::fs::write(dir.join("README.md"), &md)?;
    report.charts(&dir)?;
    println!("{md}");
    progress(&format!(
        "done in {:.0}s; report in {}",
        started.elapsed().as_secs_f64(),
        dir.display()
    ));
    Ok(())
}

/// Saturation and new connections per second are each measured this many times, for a
/// median and a spread (this machine's run-to-run noise is tens of percent).
const RATE_RUNS: usize = 3;

/// The runs of one throughput figure: requests per second and success rate of each.
struct Repeated(Vec<(f64, f64)>);

/// Runs `f` [`RATE_RUNS`] times; the first error ends it.
fn repeated(mut f: impl FnMut() -> anyhow::Result<(f64, f64)>) -> anyhow::Result<Repeated> {
    (0..RATE_RUNS)
        .map(|_| f())
        .collect::<anyhow::Result<_>>()
        .map(Repeated)
}

impl Repeated {
    /// The median rate and the runs' range; NaN when any run's success rate was under
    /// 99% (a failing path's rate is not a throughput), with the worst rate noted in
    /// `errors` whenever a run was not clean.
    fn judged(&self, what: &str, errors: &mut Vec<String>) -> (f64, Option<(f64, f64)>) {
        let worst = self.0.iter().map(|r| r.1).fold(f64::INFINITY, f64::min);
        if worst < 1.0 {
            errors.push(format!("{what}: success rate {worst:.4} in the worst run"));
        }
        let rates: Vec<f64> = self.0.iter().map(|r| r.0).collect();
        if worst < 0.99 || rates.is_empty() {
            return (f64::NAN, None);
        }
        (median(&rates), range(&rates))
    }
}

/// The smallest and largest of the finite values, none when there are none.
fn range(v: &[f64]) -> Option<(f64, f64)> {
    v.iter()
        .copied()
        .filter(|x| x.is_finite())
        .fold(None, |r, x| match r {
            None => Some((x, x)),
            Some((lo, hi)) => Some((f64::min(lo, x), f64::max(hi, x))),
        })
}

/// The median of the finite values (the mean of the middle two for an even count), or
/// NaN when there are none.
fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let mid = v.len() / 2;
    if v.len() % 2 == 1 {
        v[mid]
    } else {
        (v[mid - 1] + v[mid]) / 2.0
    }
}

#[cfg(test)]
mod repeated_tests {
    use super::*;

    #[test]
    fn the_median_and_range_of_clean_runs_and_nan_for_a_failing_one() {
        let mut errors = Vec::new();
        let r = Repeated(vec![(300.0, 1.0), (100.0, 1.0), (200.0, 1.0)]);
        assert_eq!(r.judged("x", &mut errors), (200.0, Some((100.0, 300.0))));
        assert!(errors.is_empty());
        let r = Repeated(vec![(300.0, 1.0), (100.0, 0.98), (200.0, 1.0)]);
        let (rate, range) = r.judged("saturation", &mut errors);
        assert!(rate.is_nan() && range.is_none());
        assert_eq!(errors, ["saturation: success rate 0.9800 in the worst run"]);
    }

    #[test]
    fn the_range_is_of_the_finite_values() {
        assert_eq!(range(&[2.0, f64::NAN, 1.0, 3.0]), Some((1.0, 3.0)));
        assert_eq!(range(&[f64::NAN]), None);
        assert_eq!(range(&[]), None);
    }
}
