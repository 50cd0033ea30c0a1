//! The benchmark report: JSON (everything), Markdown (the table people read) and SVG
//! charts, each figure also as a ratio to the no-mesh baseline.
use std::{fmt::Write as _, path::Path};

use plotters::prelude::*;
use serde::Serialize;

use super::load::Latency;

#[derive(Debug, Clone, Default, Serialize)]
pub struct Scenario {
    pub name: String,
    pub description: String,
    /// The no-mesh scenario with the same path (same node or across nodes).
    pub baseline: String,
    pub latency: Vec<Latency>,
    /// Median of the runs, and their range.
    pub saturation_rps: f64,
    pub saturation_rps_range: Option<(f64, f64)>,
    pub new_connections_per_s: f64,
    pub new_connections_per_s_range: Option<(f64, f64)>,
    /// The median of the scenario's bulk transfers, and their range.
    pub bulk_gbit_s: f64,
    pub bulk_gbit_s_range: Option<(f64, f64)>,
    /// A fixed rate of new connections, one request each.
    pub churn: Option<Latency>,
    /// What each connection of the churn run cost.
    pub churn_work: Option<ConnWork>,
    /// The whole machine's busy CPU time per request during the lowest fixed rate, in
    /// microseconds: the client, the servers, the proxies and the kernel's work for
    /// them, wherever it runs (so a cost moved out of the proxies into the
    /// applications' system calls or the kernel's workers still shows).
    pub machine_cpu_us_per_request: Option<f64>,
    /// The proxies' CPU and memory with no traffic (rate 0) and at each fixed rate.
    pub proxy_cost: Vec<Cost>,
    /// Proxy CPU (agents or HAProxies) during the lowest fixed rate, per 1,000 req/s.
    pub proxy_vcpu_per_1k_rps: Option<f64>,
    /// The proxies' system calls and context switches per request during the lowest
    /// fixed rate (`perf stat`): work counts, which the machine's noise does not move.
    pub proxy_syscalls_per_request: Option<f64>,
    pub proxy_switches_per_request: Option<f64>,
    /// The proxies' CPU time (user + system, every proxy on the path) per GiB of the
    /// bulk transfer.
    pub bulk_proxy_cpu_s_per_gib: Option<f64>,
    /// The proxies' system calls per MiB of the bulk transfer.
    pub bulk_proxy_syscalls_per_mib: Option<f64>,
    pub proxy_peak_rss_mib: Option<f64>,
    /// Anonymous resident memory at the end of the scenario (no shared code pages).
    pub proxy_anon_rss_mib: Option<f64>,
    pub errors: Vec<String>,
}

/// The cost of one new connection (with its one request) in the churn run.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ConnWork {
    /// The proxies' CPU time, microseconds (none on a path without proxies).
    pub proxy_cpu_us: Option<f64>,
    /// The whole machine's busy CPU time, microseconds (see
    /// [`Scenario::machine_cpu_us_per_request`]).
    pub machine_cpu_us: f64,
    /// The proxies' system calls and context switches (`perf stat`).
    pub proxy_syscalls: Option<f64>,
    pub proxy_switches: Option<f64>,
}

/// What the proxies on a path cost at one offered rate.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Cost {
    /// The offered rate in req/s; 0 is idle.
    pub rate: u32,
    pub achieved_rps: f64,
    /// User plus system CPU of every proxy on the path, in cores.
    pub vcpu: f64,
    pub anon_rss_mib: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Scale {
    pub services: usize,
    pub endpoints: usize,
    pub config_bytes: u64,
    /// From agent start until the config was applied to the kernel maps.
    pub apply_secs: f64,
    /// The same as the agent counted it: from its config source's start to the kernel
    /// map and its tables holding the config (reading, parsing and building included).
    pub apply_agent_secs: f64,
    pub services_in_kernel_map: u64,
    pub agent_rss_mib: f64,
    /// One endpoint changed: until the new generation was applied, as the bench saw
    /// it (its polling of the agent's log included); median and slowest of the changes.
    pub endpoint_change_secs: f64,
    pub endpoint_change_max_secs: f64,
    /// The same as the agent counted it: from the first file event to the kernel map
    /// and the agent's tables updated (the wait for the write to settle included).
    pub endpoint_change_agent_secs: f64,
    pub endpoint_change_agent_max_secs: f64,
    /// The agent's work once the new config is built (tables and kernel map), median.
    pub endpoint_change_apply_secs: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub generated_at: String,
    pub commit: String,
    pub kernel: String,
    pub cpu: String,
    pub cores: usize,
    pub memory_gib: f64,
    pub quick: bool,
    /// Whether the kernel offers TLS offload (`TCP_ULP` "tls"), which the kTLS
    /// exploration needs.
    pub kernel_tls: String,
    pub scenarios: Vec<Scenario>,
    pub scale: Option<Scale>,
    pub kernel_log: Option<super::kernel_log::KernelLog>,
    /// With `--against`: the A/B section (`against::section`).
    pub comparison: Option<String>,
    pub notes: Vec<String>,
}

fn ratio(v: f64, base: f64) -> String {
    if base > 0.0 && v.is_finite() && base.is_finite() {
        format!("{:.2}×", v / base)
    } else {
        "-".into()
    }
}

/// `median [min..max]`, the median alone without a range, `-` when not measured.
fn median_range(median: f64, range: Option<(f64, f64)>, digits: usize) -> String {
    match (median.is_finite(), range) {
        (true, Some((lo, hi))) => format!("{median:.digits$} [{lo:.digits$}..{hi:.digits$}]"),
        (true, None) => format!("{median:.digits$}"),
        (false, _) => "-".into(),
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

impl Report {
    fn scenario(&self, name: &str) -> Option<&Scenario> {
        self.scenarios.iter().find(|s| s.name == name)
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# Benchmark report\n");
        let _ = writeln!(
            md,
            "Generated by `cargo xtask bench{}` at {} from commit `{}`.\n\n\
             Machine: {} ({} cores, {:.0} GiB), kernel {}. Every scenario ran in the same \
             run, on the same simulated cluster (network namespaces, veth, a bridge), with \
             the client load generator (oha) in the client pod. Ratios are to the no-mesh \
             baseline of the same path (`direct-local` for same-node, `direct` across \
             nodes). The machine is small and shared: expect a few percent of noise. \
             Kernel TLS: {}.\n",
            if self.quick { " --quick" } else { "" },
            self.generated_at,
            self.commit,
            self.cpu,
            self.cores,
            self.memory_gib,
            self.kernel,
            self.kernel_tls
        );
        let rates: Vec<u32> = self
            .scenarios
            .first()
            .map(|s| s.latency.iter().map(|l| l.rate).collect())
            .unwrap_or_default();
        for rate in &rates {
            let heading = format!(
                "## Latency at {rate} req/s (1 KiB request and response, keep-alive, coordinated omission corrected)"
            );
            self.latency_table(&mut md, &heading, "achieved req/s", |s| {
                s.latency.iter().find(|l| l.rate == *rate)
            });
        }
        let heading = format!(
            "## Connection churn at {} new connections/s (one 1 KiB request per connection, coordinated omission corrected)",
            self.scenarios
                .iter()
                .find_map(|s| s.churn.as_ref().map(|l| l.rate))
                .unwrap_or_default()
        );
        self.latency_table(&mut md, &heading, "achieved conn/s", |s| s.churn.as_ref());
        self.cost_table(&mut md);
        let _ = writeln!(md, "## Throughput and cost\n");
        let _ = writeln!(
            md,
            "| scenario | saturation req/s (median [range]) | vs baseline | new conn/s (median [range]) | vs baseline | bulk Gbit/s (1 conn, median [range]) | vs baseline | proxy vCPU per 1k req/s | proxy peak RSS MiB | proxy anon RSS MiB |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        for s in &self.scenarios {
            let b = self.scenario(&s.baseline);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.name,
                median_range(s.saturation_rps, s.saturation_rps_range, 0),
                b.map_or("-".into(), |b| ratio(s.saturation_rps, b.saturation_rps)),
                median_range(s.new_connections_per_s, s.new_connections_per_s_range, 0),
                b.map_or("-".into(), |b| ratio(
                    s.new_connections_per_s,
                    b.new_connections_per_s
                )),
                median_range(s.bulk_gbit_s, s.bulk_gbit_s_range, 2),
                b.map_or("-".into(), |b| ratio(s.bulk_gbit_s, b.bulk_gbit_s)),
                opt(s.proxy_vcpu_per_1k_rps, 3),
                opt(s.proxy_peak_rss_mib, 1),
                opt(s.proxy_anon_rss_mib, 1),
            );
        }
        md.push('\n');
        self.work_table(&mut md);
        self.l7_table(&mut md);
        self.sockmap_table(&mut md);
        let _ = writeln!(md, "## Scenarios\n");
        for s in &self.scenarios {
            let _ = writeln!(md, "- `{}`: {}", s.name, s.description);
            for e in &s.errors {
                let _ = writeln!(md, "  - problem: {e}");
            }
        }
        if let Some(sc) = &self.scale {
            let _ = writeln!(
                md,
                "\n## Scale\n\n| services | endpoints | config size | applied after agent start (of it, the agent's config work) | services in kernel map | agent RSS | one endpoint change, agent: file event to applied, median / max | of it, applying the built config | as the bench saw it, median / max |\n|---|---|---|---|---|---|---|---|---|\n| {} | {} | {:.1} MiB | {:.2} s ({:.2} s) | {} | {:.1} MiB | {:.1} / {:.1} ms | {:.1} ms | {:.0} / {:.0} ms |",
                sc.services,
                sc.endpoints,
                sc.config_bytes as f64 / 1048576.0,
                sc.apply_secs,
                sc.apply_agent_secs,
                sc.services_in_kernel_map,
                sc.agent_rss_mib,
                sc.endpoint_change_agent_secs * 1e3,
                sc.endpoint_change_agent_max_secs * 1e3,
                sc.endpoint_change_apply_secs * 1e3,
                sc.endpoint_change_secs * 1e3,
                sc.endpoint_change_max_secs * 1e3,
            );
        }
        if let Some(k) = &self.kernel_log {
            kernel_log_table(&mut md, k);
        }
        if let Some(ab) = &self.comparison {
            md.push_str(ab);
        }
        if !self.notes.is_empty() {
            let _ = writeln!(md, "\n## Notes\n");
            for n in &self.notes {
                let _ = writeln!(md, "- {n}");
            }
        }
        let _ = writeln!(
            md,
            "\n![p99 latency](p99-latency.svg)\n\n![throughput vs baseline](throughput.svg)"
        );
        md
    }

    /// One latency row per scenario that has the figure `pick` chooses, with its ratio
    /// to the scenario's baseline.
    fn latency_table(
        &self,
        md: &mut String,
        heading: &str,
        achieved: &str,
        pick: impl Fn(&Scenario) -> Option<&Latency>,
    ) {
        if !self.scenarios.iter().any(|s| pick(s).is_some()) {
            return;
        }
        let _ = writeln!(md, "{heading}\n");
        let runs = self
            .scenarios
            .iter()
            .filter_map(&pick)
            .map(|l| l.runs)
            .max()
            .unwrap_or(1);
        if runs > 1 {
            let _ = writeln!(
                md,
                "Each figure is the median of {runs} runs (in rounds over the rates); p50 and p99 give the runs' range in brackets.\n"
            );
        }
        let _ = writeln!(
            md,
            "| scenario | p50 ms | p90 ms | p99 ms | p99.9 ms | p99 vs baseline | p99 added ms | {achieved} |\n|---|---|---|---|---|---|---|---|"
        );
        for s in &self.scenarios {
            let Some(l) = pick(s) else {
                continue;
            };
            let base = self.scenario(&s.baseline).and_then(&pick);
            let _ = writeln!(
                md,
                "| {} | {} | {:.3} | {} | {:.3} | {} | {} | {:.0} |",
                s.name,
                median_range(l.p50_ms, l.p50_range, 3),
                l.p90_ms,
                median_range(l.p99_ms, l.p99_range, 3),
                l.p999_ms,
                base.map_or("-".into(), |b| ratio(l.p99_ms, b.p99_ms)),
                base.map_or("-".into(), |b| format!("{:+.3}", l.p99_ms - b.p99_ms)),
                l.achieved_rps
            );
        }
        md.push('\n');
    }

    /// The proxies' CPU and anonymous memory idle and at each fixed rate.
    fn cost_table(&self, md: &mut String) {
        let rows: Vec<_> = self
            .scenarios
            .iter()
            .filter(|s| !s.proxy_cost.is_empty())
            .collect();
        let Some(first) = rows.first() else {
            return;
        };
        let rates: Vec<u32> = first.proxy_cost.iter().map(|c| c.rate).collect();
        let _ = writeln!(
            md,
            "## Proxy cost by load\n\nCPU (cores, user plus system) and anonymous resident memory (MiB) of every proxy on the path, idle and at each fixed rate (keep-alive, 16 connections). A rate above a path's saturation is reported at what it achieved.\n"
        );
        let mut head = "| scenario |".to_owned();
        let mut rule = "|---|".to_owned();
        for r in &rates {
            let _ = write!(head, " vCPU at {r} | MiB at {r} |");
            rule += "---|---|";
        }
        let _ = writeln!(md, "{head}\n{rule}");
        for s in rows {
            let mut row = format!("| {} |", s.name);
            for r in &rates {
                match s.proxy_cost.iter().find(|c| c.rate == *r) {
                    Some(c) if c.rate > 0 && c.achieved_rps < f64::from(c.rate) * 0.95 => {
                        let _ = write!(
                            row,
                            " {:.3} ({:.0} req/s) | {:.1} |",
                            c.vcpu, c.achieved_rps, c.anon_rss_mib
                        );
                    }
                    Some(c) => {
                        let _ = write!(row, " {:.3} | {:.1} |", c.vcpu, c.anon_rss_mib);
                    }
                    None => row += " - | - |",
                }
            }
            let _ = writeln!(md, "{row}");
        }
        md.push('\n');
    }

    /// Per-request kernel work of the proxies: counts, not times, so two runs on a noisy
    /// machine agree where latencies do not.
    fn work_table(&self, md: &mut String) {
        let rows: Vec<_> = self
            .scenarios
            .iter()
            .filter(|s| s.machine_cpu_us_per_request.is_some())
            .collect();
        if rows.is_empty() {
            return;
        }
        let rate = self
            .scenarios
            .iter()
            .find_map(|s| s.latency.first().map(|l| l.rate));
        let _ = writeln!(
            md,
            "## Work per request, per connection and per byte\n\nPer request, during the {} req/s run: the whole machine's busy CPU time (client, servers, proxies and the kernel's work for all of them), and the proxies' system calls and context switches (all threads of every proxy process on the path, both nodes, counted with `perf stat`). Per connection, during the churn run (one request on each): the proxies' and the machine's CPU time, the proxies' system calls and context switches. For the bulk transfer, the proxies' CPU time per GiB and system calls per MiB.\n\n| scenario | machine CPU µs per request | syscalls per request | context switches per request | churn: machine CPU µs per connection | churn: proxy CPU µs per connection | churn: syscalls per connection | churn: context switches per connection | bulk: proxy CPU s per GiB | bulk: syscalls per MiB |\n|---|---|---|---|---|---|---|---|---|---|",
            rate.unwrap_or_default()
        );
        for s in rows {
            let churn = s.churn_work.as_ref();
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                s.name,
                opt(s.machine_cpu_us_per_request, 0),
                opt(s.proxy_syscalls_per_request, 1),
                opt(s.proxy_switches_per_request, 1),
                opt(churn.map(|w| w.machine_cpu_us), 0),
                opt(churn.and_then(|w| w.proxy_cpu_us), 0),
                opt(churn.and_then(|w| w.proxy_syscalls), 1),
                opt(churn.and_then(|w| w.proxy_switches), 1),
                opt(s.bulk_proxy_cpu_s_per_gib, 2),
                opt(s.bulk_proxy_syscalls_per_mib, 1),
            );
        }
        md.push('\n');
    }

    /// Each mesh scenario with sockmap on, as a ratio to the same scenario with it off.
    /// The L7 aims: the routed mTLS path against the L4 one and against HAProxy in
    /// HTTP mode, at the first fixed rate.
    fn l7_table(&self, md: &mut String) {
        let (Some(l7), Some(l4), Some(direct)) = (
            self.scenario("mesh-l7-mtls"),
            self.scenario("mesh-mtls"),
            self.scenario("direct"),
        ) else {
            return;
        };
        let first = |s: &Scenario| s.latency.first().cloned();
        let added = |s: &Scenario| match (first(s), first(direct)) {
            (Some(a), Some(d)) => a.p99_ms - d.p99_ms,
            _ => f64::NAN,
        };
        let rate = first(direct).map_or(0, |l| l.rate);
        let _ = writeln!(
            md,
            "## L7\n\nAdded p99 at {rate} req/s (over `direct`) and saturation, for the routed mTLS path against the L4 mTLS path and HAProxy in HTTP mode.\n\n| | added p99 ms | saturation req/s |\n|---|---|---|"
        );
        let mut rows = vec![l7, l4];
        rows.extend(self.scenario("haproxy-http"));
        for s in rows {
            let _ = writeln!(
                md,
                "| {} | {:+.3} | {:.0} |",
                s.name,
                added(s),
                s.saturation_rps
            );
        }
        let _ = writeln!(
            md,
            "\nmesh-l7-mtls / mesh-mtls added p99: {}; saturation: {}.",
            ratio(added(l7), added(l4)),
            ratio(l7.saturation_rps, l4.saturation_rps)
        );
        if let Some(h) = self.scenario("haproxy-http") {
            let _ = writeln!(
                md,
                "mesh-l7-mtls / haproxy-http added p99: {}; saturation: {}.",
                ratio(added(l7), added(h)),
                ratio(l7.saturation_rps, h.saturation_rps)
            );
        }
        md.push('\n');
    }

    fn sockmap_table(&self, md: &mut String) {
        let pairs: Vec<(&Scenario, &Scenario)> = self
            .scenarios
            .iter()
            .filter_map(|on| {
                let off = on.name.strip_suffix("-sockmap")?;
                Some((self.scenario(off)?, on))
            })
            .collect();
        if pairs.is_empty() {
            return;
        }
        let rates: Vec<u32> = pairs[0].0.latency.iter().map(|l| l.rate).collect();
        let mut head = String::from("| scenario |");
        for r in &rates {
            let _ = write!(head, " p50 @{r} | p99 @{r} |");
        }
        head += " saturation req/s | new conn/s | bulk | proxy vCPU per 1k req/s |\n|---|";
        head += &"---|".repeat(rates.len() * 2 + 4);
        let _ = writeln!(
            md,
            "## sockmap on vs off\n\nThe same scenario with sockmap on, as a ratio to it off (below 1.00× is faster for latency, above 1.00× is better for throughput).\n\n{head}"
        );
        for (off, on) in pairs {
            let mut row = format!("| {} |", off.name);
            for r in &rates {
                let lat = |s: &Scenario| s.latency.iter().find(|l| l.rate == *r).cloned();
                let (p50, p99) = match (lat(on), lat(off)) {
                    (Some(n), Some(o)) => (ratio(n.p50_ms, o.p50_ms), ratio(n.p99_ms, o.p99_ms)),
                    _ => ("-".into(), "-".into()),
                };
                let _ = write!(row, " {p50} | {p99} |");
            }
            let vcpu = match (on.proxy_vcpu_per_1k_rps, off.proxy_vcpu_per_1k_rps) {
                (Some(n), Some(o)) => ratio(n, o),
                _ => "-".into(),
            };
            let _ = writeln!(
                md,
                "{row} {} | {} | {} | {vcpu} |",
                ratio(on.saturation_rps, off.saturation_rps),
                ratio(on.new_connections_per_s, off.new_connections_per_s),
                ratio(on.bulk_gbit_s, off.bulk_gbit_s),
            );
        }
        md.push('\n');
    }

    pub fn charts(&self, dir: &Path) -> anyhow::Result<()> {
        let low = self
            .scenarios
            .first()
            .and_then(|s| s.latency.first())
            .map_or(0, |l| l.rate);
        let p99: Vec<(String, f64)> = self
            .scenarios
            .iter()
            .filter_map(|s| {
                let l = s.latency.iter().find(|l| l.rate == low)?;
                Some((s.name.clone(), l.p99_ms))
            })
            .collect();
        bar_chart(
            &dir.join("p99-latency.svg"),
            &format!("p99 latency at {low} req/s (ms, lower is better)"),
            &p99,
        )?;
        let tput: Vec<(String, f64)> = self
            .scenarios
            .iter()
            .filter_map(|s| {
                let b = self.scenario(&s.baseline)?;
                (b.saturation_rps > 0.0)
                    .then(|| (s.name.clone(), s.saturation_rps / b.saturation_rps))
            })
            .collect();
        bar_chart(
            &dir.join("throughput.svg"),
            "saturation req/s as a ratio to the baseline (higher is better)",
            &tput,
        )
    }
}

/// Horizontal bars, one per item, labelled with name and value.
fn bar_chart(path: &Path, title: &str, items: &[(String, f64)]) -> anyhow::Result<()> {
    let height = 80 + 40 * items.len().max(1) as u32;
    let root = SVGBackend::new(path, (760, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
    let max = items
        .iter()
        .map(|(_, v)| *v)
        .filter(|v| v.is_finite())
        .fold(0.0_f64, f64::max)
        .max(1e-9)
        * 1.25;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(30)
        .y_label_area_size(150)
        .build_cartesian_2d(0.0..max, 0..items.len())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .disable_y_mesh()
        .y_labels(items.len())
        .y_label_formatter(&|i| items.get(*i).map(|(n, _)| n.clone()).unwrap_or_default())
        .draw()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .draw_series(items.iter().enumerate().map(|(i, (_, v))| {
            let v = if v.is_finite() { *v } else { 0.0 };
            Rectangle::new([(0.0, i), (v, i + 1)], BLUE.mix(0.5).filled())
        }))
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    chart
        .draw_series(
            items.iter().enumerate().map(|(i, (_, v))| {
                Text::new(format!("{v:.3}"), (v.max(0.0), i), ("sans-serif", 13))
            }),
        )
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(())
}

/// The kernel log section: each variant against the one with the log compiled out.
/// ` [min..max]` of the finite values, or nothing.
fn spread(values: &[f64]) -> String {
    let (lo, hi) = values
        .iter()
        .filter(|x| x.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), x| {
            (lo.min(*x), hi.max(*x))
        });
    if lo.is_finite() {
        format!(" [{lo:.0}..{hi:.0}]")
    } else {
        String::new()
    }
}

fn kernel_log_table(md: &mut String, k: &super::kernel_log::KernelLog) {
    let _ = writeln!(
        md,
        "\n## Kernel log and flow event cost\n\nNew connections through the node's agent (ClusterIP, same node, \
         sockmap off) as fast as they go, {} rounds of {} s per variant in a rotating order; \
         run time per program from the kernel's own accounting (`kernel.bpf_stats_enabled`). \
         Ratios are to the programs built with the log compiled out; a program's ns/run is \
         over all rounds, with the rounds' range in brackets.\n",
        k.rounds, k.secs_per_round
    );
    let Some(reference) = k.variants.first() else {
        return;
    };
    let programs: Vec<&String> = reference.programs.keys().collect();
    let mut head = "| variant | new connections/s [each round] | ratio |".to_owned();
    let mut rule = "|---|---|---|".to_owned();
    for p in &programs {
        let _ = write!(head, " `{p}` ns/run | ratio |");
        rule.push_str("---|---|");
    }
    let _ = writeln!(md, "{head}\n{rule}");
    for v in &k.variants {
        let rounds: Vec<String> = v
            .new_connections_samples
            .iter()
            .map(|x| format!("{x:.0}"))
            .collect();
        let mut row = format!(
            "| {} | {:.0} [{}] | {} |",
            v.name,
            v.new_connections_per_s,
            rounds.join(", "),
            ratio(v.new_connections_per_s, reference.new_connections_per_s)
        );
        for p in &programs {
            let cost = v.programs.get(*p);
            let ns = cost.map_or(f64::NAN, |c| c.ns_per_run);
            let base = reference
                .programs
                .get(*p)
                .map_or(f64::NAN, |c| c.ns_per_run);
            let range = cost.map_or(String::new(), |c| spread(&c.ns_per_run_rounds));
            let _ = write!(row, " {ns:.0}{range} | {} |", ratio(ns, base));
        }
        let _ = writeln!(md, "{row}");
    }
    let _ = writeln!(md);
    for v in &k.variants {
        let _ = writeln!(md, "- `{}`: {}", v.name, v.description);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(name: &str, p99: f64, sat: f64) -> Scenario {
        Scenario {
            name: name.into(),
            baseline: "direct-local".into(),
            latency: vec![Latency {
                rate: 1000,
                p50_ms: p99 / 2.0,
                p99_ms: p99,
                ..Default::default()
            }],
            saturation_rps: sat,
            new_connections_per_s: 100.0,
            bulk_gbit_s: 1.0,
            ..Default::default()
        }
    }

    #[test]
    fn sockmap_rows_compare_each_scenario_with_its_own_off_run() {
        let report = Report {
            scenarios: vec![
                scenario("direct-local", 0.1, 1000.0),
                scenario("mesh-l4-local", 0.4, 500.0),
                scenario("mesh-l4-local-sockmap", 0.3, 600.0),
            ],
            ..Default::default()
        };
        let mut md = String::new();
        report.sockmap_table(&mut md);
        let row = md
            .lines()
            .find(|l| l.starts_with("| mesh-l4-local |"))
            .unwrap_or_else(|| panic!("no row in {md}"));
        assert_eq!(
            row,
            "| mesh-l4-local | 0.75× | 0.75× | 1.20× | 1.00× | 1.00× | - |"
        );
        assert!(md.contains("| scenario | p50 @1000 | p99 @1000 |"), "{md}");

        let mut none = String::new();
        Report {
            scenarios: vec![scenario("direct-local", 0.1, 1.0)],
            ..Default::default()
        }
        .sockmap_table(&mut none);
        assert!(none.is_empty());
    }

    #[test]
    fn latency_rows_give_the_runs_range_beside_the_median() {
        let mut mesh = scenario("mesh-l4-local", 0.4, 500.0);
        mesh.latency[0].runs = 3;
        mesh.latency[0].p50_range = Some((0.15, 0.25));
        mesh.latency[0].p99_range = Some((0.3, 0.9));
        let report = Report {
            scenarios: vec![scenario("direct-local", 0.1, 1000.0), mesh],
            ..Default::default()
        };
        let mut md = String::new();
        report.latency_table(&mut md, "## Latency", "achieved", |s| s.latency.first());
        assert!(md.contains("median of 3 runs"), "{md}");
        let row = md
            .lines()
            .find(|l| l.starts_with("| mesh-l4-local |"))
            .unwrap_or_else(|| panic!("no row in {md}"));
        assert!(
            row.starts_with(
                "| mesh-l4-local | 0.200 [0.150..0.250] | 0.000 | 0.400 [0.300..0.900] |"
            ),
            "{row}"
        );
        assert!(row.contains("| 4.00× | +0.300 |"), "{row}");
    }
}
