//! `meshctl`: inspect a node's mesh agent over its admin socket, and check whether a
//! node can run the mesh at all.
#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod check;
mod client;
mod table;

use std::{
    io::Write as _,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Parser, Subcommand, ValueEnum};
use mesh_agent::api::admin::{self as pb, admin_client::AdminClient};
use table::{Table, or_dash};
use tonic::transport::Channel;

#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about = "Inspect the node's mesh agent")]
struct Cli {
    /// The agent's admin socket.
    #[arg(
        long,
        global = true,
        env = "MESH_ADMIN_SOCKET",
        default_value = "/run/mesh/admin.sock"
    )]
    socket: PathBuf,

    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value = "table")]
    output: Output,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Version, uptime, programs attached, config generation, readiness.
    Status,
    /// Pods in the config: identity, node, enrollment, inbound mTLS mode.
    Workloads,
    /// Services in the config.
    Services,
    /// What each ClusterIP:port resolves to.
    Endpoints,
    /// PeerAuthentication and AuthorizationPolicy objects.
    Policies,
    /// This node's workload certificates.
    Certs,
    /// Connections open right now.
    Conns,
    /// HTTPRoutes and GRPCRoutes by Service port, and requests per route rule.
    Routes,
    /// The applied config.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Flow events as they happen (Ctrl-C to stop).
    Observe {
        /// Only events about this pod ("ns/name" or "name").
        #[arg(long)]
        pod: Option<String>,
        /// Only events for this service ("ns/name" or "name").
        #[arg(long)]
        service: Option<String>,
        /// Only this verdict: forwarded, denied, dropped, error, redirected, bypassed.
        #[arg(long)]
        verdict: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<u64>,
    },
    /// The agent's Prometheus metrics.
    Metrics,
    /// The diagnostics log filter.
    LogLevel {
        #[command(subcommand)]
        command: LogLevelCommand,
    },
    /// The eBPF maps.
    Bpf {
        #[command(subcommand)]
        command: BpfCommand,
    },
    /// Can this node run the mesh? (Runs locally; no agent needed.)
    Check {
        /// Where bpffs is (or will be) mounted.
        #[arg(long, default_value = "/sys/fs/bpf")]
        bpffs: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// The applied config generation as the agent understood it.
    Dump,
}

#[derive(Debug, Subcommand)]
enum LogLevelCommand {
    Get,
    /// An EnvFilter directive, for example `debug` or `info,mesh_agent::proxy=debug`;
    /// and/or the kernel programs' log.
    Set {
        #[arg(required_unless_present = "kernel")]
        filter: Option<String>,
        /// The kernel programs' own log of each decision (redirect, bypass, refusal
        /// and why), shown in the agent's log with the pod: `debug` or `off`.
        #[arg(long, value_parser = ["debug", "off"])]
        kernel: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum BpfCommand {
    /// Each map: kind, capacity, entries in use.
    Maps {
        /// Also list the entries of this map.
        #[arg(long)]
        dump: Option<String>,
    },
}

/// What a command failed with, already in words.
struct Failure(String);

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(e.to_string())
    }
}

fn print_structured<T: serde::Serialize>(output: Output, value: &T) -> Result<(), Failure> {
    let text = match output {
        Output::Yaml => serde_yaml_ng::to_string(value)?,
        _ => serde_json::to_string_pretty(value)? + "\n",
    };
    print!("{text}");
    Ok(())
}

/// Prints `value` as JSON/YAML, or as the table `render` makes of it.
fn show<T: serde::Serialize>(
    output: Output,
    value: &T,
    render: impl FnOnce(&T) -> String,
) -> Result<(), Failure> {
    match output {
        Output::Table => {
            print!("{}", render(value));
            Ok(())
        }
        _ => print_structured(output, value),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Check { bpffs } = &cli.command {
        return run_check(cli.output, bpffs, &cli.socket);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("meshctl: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(msg)) => {
            eprintln!("meshctl: {msg}");
            ExitCode::FAILURE
        }
    }
}

fn run_check(output: Output, bpffs: &Path, socket: &Path) -> ExitCode {
    let mut checks = check::run(bpffs);
    checks.push(map_check(socket));
    let failed = checks
        .iter()
        .filter(|c| c.outcome == check::Outcome::Fail)
        .count();
    let shown = show(output, &checks, |checks| {
        let mut t = Table::new(&["CHECK", "RESULT", "DETAIL"]);
        for c in checks {
            let result = match c.outcome {
                check::Outcome::Pass => "ok",
                check::Outcome::Warn => "warn",
                check::Outcome::Fail => "FAIL",
            };
            t.row(vec![c.name.clone(), result.into(), c.detail.clone()]);
        }
        let mut out = t.render();
        out.push_str(&if failed == 0 {
            "\nthis node can run the mesh\n".to_owned()
        } else {
            format!("\n{failed} check(s) failed: this node cannot run the mesh\n")
        });
        out
    });
    if let Err(Failure(msg)) = shown {
        eprintln!("meshctl: {msg}");
        return ExitCode::FAILURE;
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// When an agent runs on this node: are its bounded kernel maps below 80%? A full
/// one fails the check (something is being turned away or left out).
fn map_check(socket: &Path) -> check::Check {
    let name = "kernel map capacity";
    let status = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            rt.block_on(async {
                let fetch = async {
                    let mut c = client::connect(socket).await.map_err(|e| e.to_string())?;
                    c.status(pb::Empty {})
                        .await
                        .map(|r| r.into_inner())
                        .map_err(|e| e.message().to_owned())
                };
                tokio::time::timeout(std::time::Duration::from_secs(3), fetch)
                    .await
                    .map_err(|_| "the agent did not answer within 3 s".to_owned())?
            })
        });
    match status {
        Err(e) => check::Check {
            name: name.into(),
            outcome: check::Outcome::Pass,
            detail: format!("no agent to ask ({e})"),
        },
        Ok(r) => {
            let warnings = map_warnings(&r.maps);
            let outcome = if r.maps.iter().any(|m| m.level == "full") {
                check::Outcome::Fail
            } else if warnings.is_empty() {
                check::Outcome::Pass
            } else {
                check::Outcome::Warn
            };
            check::Check {
                name: name.into(),
                outcome,
                detail: if warnings.is_empty() {
                    map_summary(&r.maps)
                } else {
                    warnings.join("; ")
                },
            }
        }
    }
}

async fn run(cli: &Cli) -> Result<(), Failure> {
    let mut c = client::connect(&cli.socket).await?;
    let sock = cli.socket.as_path();
    let call_err = |s: tonic::Status| Failure(client::status_message(sock, &s));
    let out = cli.output;
    match &cli.command {
        Command::Status => {
            let r = c.status(pb::Empty {}).await.map_err(call_err)?.into_inner();
            show(out, &r, render_status)
        }
        Command::Workloads => {
            let r = c
                .workloads(pb::Empty {})
                .await
                .map_err(call_err)?
                .into_inner();
            show(out, &r, |r| {
                let mut t = Table::new(&[
                    "NAMESPACE",
                    "NAME",
                    "NODE",
                    "IP",
                    "IDENTITY",
                    "MESHED",
                    "ENROLLED",
                    "MTLS",
                ]);
                for w in &r.workloads {
                    t.row(vec![
                        w.namespace.clone(),
                        w.name.clone(),
                        or_dash(&w.node),
                        or_dash(&w.ip),
                        w.identity.clone(),
                        w.meshed.to_string(),
                        w.enrolled.to_string(),
                        or_dash(&w.mtls_mode),
                    ]);
                }
                t.render()
            })
        }
        Command::Services => {
            let r = c
                .services(pb::Empty {})
                .await
                .map_err(call_err)?
                .into_inner();
            show(out, &r, |r| {
                let mut t = Table::new(&["NAMESPACE", "NAME", "CLUSTER-IPS", "PORTS"]);
                for s in &r.services {
                    let ports: Vec<String> = s
                        .ports
                        .iter()
                        .map(|p| format!("{}->{}/{}", p.port, p.target_port, p.protocol))
                        .collect();
                    t.row(vec![
                        s.namespace.clone(),
                        s.name.clone(),
                        or_dash(&s.cluster_ips.join(",")),
                        ports.join(","),
                    ]);
                }
                t.render()
            })
        }
        Command::Endpoints => {
            let r = c
                .endpoints(pb::Empty {})
                .await
                .map_err(call_err)?
                .into_inner();
            show(out, &r, |r| {
                let mut t =
                    Table::new(&["SERVICE", "FRONTEND", "ENDPOINT", "POD", "NODE", "IDENTITY"]);
                for s in &r.services {
                    if s.endpoints.is_empty() {
                        t.row(vec![
                            s.service.clone(),
                            s.frontend.clone(),
                            "(none)".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                        ]);
                    }
                    for e in &s.endpoints {
                        t.row(vec![
                            s.service.clone(),
                            s.frontend.clone(),
                            e.address.clone(),
                            or_dash(&e.workload),
                            or_dash(&e.node),
                            or_dash(&e.identity),
                        ]);
                    }
                }
                t.render()
            })
        }
        Command::Policies => {
            let r = c
                .policies(pb::Empty {})
                .await
                .map_err(call_err)?
                .into_inner();
            show(out, &r, |r| {
                let mut t = Table::new(&["KIND", "NAMESPACE", "NAME", "SCOPE", "ACTION", "RULES"]);
                for p in &r.policies {
                    t.row(vec![
                        p.kind.clone(),
                        p.namespace.clone(),
                        p.name.clone(),
                        p.scope.clone(),
                        p.action.clone(),
                        if p.summary.is_empty() {
                            "-".into()
                        } else {
                            p.summary.join("; ")
                        },
                    ]);
                }
                t.render()
            })
        }
        Command::Certs => {
            let r = c.certs(pb::Empty {}).await.map_err(call_err)?.into_inner();
            show(out, &r, |r| {
                let mut t =
                    Table::new(&["IDENTITY", "SERIAL", "NOT-AFTER", "NEXT-ROTATION", "VALID"]);
                for c in &r.certs {
                    t.row(vec![
                        c.identity.clone(),
                        or_dash(&c.serial),
                        or_dash(&c.not_after),
                        or_dash(&c.next_rotation),
                        c.valid.to_string(),
                    ]);
                }
                format!("{}\ntrust anchors: {}\n", t.render(), r.trust_anchors)
            })
        }
        Command::Conns => {
            let r = c.conns(pb::Empty {}).await.map_err(call_err)?.into_inner();
            show(out, &r, |r| {
                let mut t = Table::new(&[
                    "ID",
                    "REPORTER",
                    "MODE",
                    "SOURCE",
                    "DESTINATION",
                    "SERVICE",
                    "SRC-IDENTITY",
                    "DST-IDENTITY",
                    "BYTES-IN",
                    "BYTES-OUT",
                    "AGE",
                ]);
                for c in &r.conns {
                    t.row(vec![
                        c.id.to_string(),
                        c.reporter.clone(),
                        c.mode.clone(),
                        format!("{} {}", or_dash(&c.source_workload), c.source_address),
                        format!(
                            "{} {}",
                            or_dash(&c.destination_workload),
                            c.destination_address
                        ),
                        or_dash(&c.destination_service),
                        or_dash(&c.source_identity),
                        or_dash(&c.destination_identity),
                        c.bytes_received.to_string(),
                        c.bytes_sent.to_string(),
                        format!("{:.1}s", c.age_ms as f64 / 1000.0),
                    ]);
                }
                t.render()
            })
        }
        Command::Routes => {
            let r = c.routes(pb::Empty {}).await.map_err(call_err)?.into_inner();
            show(out, &r, render_routes)
        }
        Command::Config {
            command: ConfigCommand::Dump,
        } => {
            let r = c
                .config_dump(pb::Empty {})
                .await
                .map_err(call_err)?
                .into_inner();
            let config: serde_json::Value = serde_json::from_str(&r.json)?;
            let doc = serde_json::json!({ "generation": r.generation, "config": config });
            match out {
                Output::Yaml => print_structured(out, &doc),
                _ => print_structured(Output::Json, &doc),
            }
        }
        Command::Metrics => {
            let r = c
                .metrics(pb::Empty {})
                .await
                .map_err(call_err)?
                .into_inner();
            match out {
                Output::Table => {
                    print!("{}", r.text);
                    Ok(())
                }
                _ => print_structured(out, &r),
            }
        }
        Command::LogLevel { command } => {
            let r = match command {
                LogLevelCommand::Get => c.get_log_level(pb::Empty {}).await,
                LogLevelCommand::Set { filter, kernel } => {
                    c.set_log_level(pb::LogLevel {
                        filter: filter.clone().unwrap_or_default(),
                        kernel: kernel.clone().unwrap_or_default(),
                    })
                    .await
                }
            }
            .map_err(call_err)?
            .into_inner();
            show(out, &r, |r| format!("{}\nkernel: {}\n", r.filter, r.kernel))
        }
        Command::Bpf {
            command: BpfCommand::Maps { dump },
        } => {
            let r = c
                .bpf_maps(pb::BpfMapsRequest {
                    dump: dump.clone().unwrap_or_default(),
                })
                .await
                .map_err(call_err)?
                .into_inner();
            show(out, &r, |r| {
                let mut t = Table::new(&["NAME", "KIND", "MAX-ENTRIES", "ENTRIES"]);
                for m in &r.maps {
                    t.row(vec![
                        m.name.clone(),
                        m.kind.clone(),
                        m.max_entries.to_string(),
                        m.entries.to_string(),
                    ]);
                }
                let mut text = t.render();
                if dump.is_some() {
                    let mut e = Table::new(&["KEY", "VALUE"]);
                    for row in &r.entries {
                        e.row(vec![row.key.clone(), row.value.clone()]);
                    }
                    text.push('\n');
                    text.push_str(&e.render());
                }
                text
            })
        }
        Command::Observe {
            pod,
            service,
            verdict,
            count,
        } => observe(&mut c, sock, out, pod, service, verdict, *count).await,
        Command::Check { .. } => Ok(()),
    }
}

fn render_routes(r: &pb::RoutesReply) -> String {
    let mut t = Table::new(&["SERVICE", "FRONTEND", "CLIENTS", "PROTOCOL", "ROUTES"]);
    for f in &r.frontends {
        t.row(vec![
            f.service.clone(),
            f.frontend.clone(),
            if f.consumer_namespace.is_empty() {
                "*".to_owned()
            } else {
                format!("ns {}", f.consumer_namespace)
            },
            f.protocol.clone(),
            f.routes.join(","),
        ]);
    }
    let mut rules = Table::new(&["ROUTE", "RULE", "REQUESTS", "ERRORS"]);
    for c in &r.rules {
        rules.row(vec![
            c.route.clone(),
            c.rule.clone(),
            c.requests.to_string(),
            c.errors.to_string(),
        ]);
    }
    let mut out = format!("{}\n{}", t.render(), rules.render());
    for p in &r.problems {
        out.push_str(&format!("problem: {p}\n"));
    }
    out
}

fn render_status(r: &pb::StatusReply) -> String {
    let mut t = Table::new(&["FIELD", "VALUE"]);
    let ready = if r.ready {
        "yes".to_owned()
    } else {
        format!("no: {}", r.not_ready_reason)
    };
    for (k, v) in [
        ("version", r.version.clone()),
        ("node", r.node.clone()),
        ("uptime", format!("{}s", r.uptime_seconds)),
        ("ready", ready),
        ("programs", or_dash(&r.programs.join(", "))),
        ("config generation", r.config_generation.to_string()),
        ("config reloads failed", r.config_reloads_failed.to_string()),
        ("config error", or_dash(&r.config_error)),
        (
            "previous agent",
            r.previous_agent
                .as_ref()
                .map_or_else(|| "-".to_owned(), previous_agent),
        ),
        ("kernel maps", map_summary(&r.maps)),
    ] {
        t.row(vec![k.to_owned(), v]);
    }
    let mut out = t.render();
    for w in map_warnings(&r.maps) {
        out.push_str(&format!("warning: {w}\n"));
    }
    out
}

/// `ok` when every bounded map is below 80%, else the ones that are not.
fn map_summary(maps: &[pb::MapFill]) -> String {
    let high: Vec<String> = maps
        .iter()
        .filter(|m| m.level != "ok")
        .map(|m| format!("{} {}/{} ({})", m.map, m.entries, m.capacity, m.level))
        .collect();
    if maps.is_empty() {
        "-".to_owned()
    } else if high.is_empty() {
        "ok (every bounded map below 80%)".to_owned()
    } else {
        high.join(", ")
    }
}

/// One line per map at 80% or more, saying what to do.
pub fn map_warnings(maps: &[pb::MapFill]) -> Vec<String> {
    maps.iter()
        .filter(|m| m.level != "ok")
        .map(|m| {
            let mut w = format!(
                "kernel map {} is {} ({} of {} entries",
                m.map,
                if m.level == "full" {
                    "full"
                } else {
                    "above 80%"
                },
                m.entries,
                m.capacity
            );
            if m.left_out > 0 {
                w.push_str(&format!(", {} left out", m.left_out));
            }
            w.push_str(&format!(
                "); raise it with the agent's --bpf-map-size {}=N",
                m.map
            ));
            w
        })
        .collect()
}

/// The agent this one took over from: `pid 812 (0.1.0) draining: 3 connections left, closes them in 21s`.
fn previous_agent(p: &pb::PreviousAgent) -> String {
    let mut s = format!("pid {} ({}) {}", p.pid, p.version, p.state);
    if p.state == "draining" {
        s.push_str(&format!(": {} connections left", p.connections));
        if p.deadline_unix_ms > 0 {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64);
            let left = p.deadline_unix_ms.saturating_sub(now) / 1000;
            s.push_str(&format!(", closes them in {left}s"));
        }
    }
    s
}

async fn observe(
    c: &mut AdminClient<Channel>,
    sock: &Path,
    out: Output,
    pod: &Option<String>,
    service: &Option<String>,
    verdict: &Option<String>,
    count: Option<u64>,
) -> Result<(), Failure> {
    let mut stream = c
        .observe(pb::ObserveRequest {
            pod: pod.clone().unwrap_or_default(),
            service: service.clone().unwrap_or_default(),
            verdict: verdict.clone().unwrap_or_default(),
        })
        .await
        .map_err(|s| Failure(client::status_message(sock, &s)))?
        .into_inner();
    let mut seen = 0;
    let mut stdout = std::io::stdout();
    while count.is_none_or(|n| seen < n) {
        let Some(ev) = stream
            .message()
            .await
            .map_err(|s| Failure(client::status_message(sock, &s)))?
        else {
            return Err(Failure("the agent closed the stream".into()));
        };
        let line = match out {
            Output::Table => render_flow(&ev),
            Output::Json => serde_json::to_string(&ev)?,
            Output::Yaml => format!("---\n{}", serde_yaml_ng::to_string(&ev)?),
        };
        writeln!(stdout, "{line}")?;
        // Line by line: observe is often piped into grep or a test.
        stdout.flush()?;
        seen += 1;
    }
    Ok(())
}

fn render_flow(ev: &pb::FlowEvent) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ev.time_ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::macros::format_description!(
                "[hour]:[minute]:[second].[subsecond digits:3]"
            ))
            .ok()
        })
        .unwrap_or_default();
    if ev.kind == "dropped_events" {
        return format!("{at} !! {} events lost: {}", ev.dropped, ev.reason);
    }
    let ids = if ev.source_identity.is_empty() && ev.destination_identity.is_empty() {
        String::new()
    } else {
        format!(
            " [{} -> {}]",
            or_dash(&ev.source_identity),
            or_dash(&ev.destination_identity)
        )
    };
    format!(
        "{at} {:<6} {:<10} {:<18} pod={} {} -> {}{}{}{}",
        ev.origin,
        ev.verdict.to_uppercase(),
        ev.kind,
        or_dash(&ev.pod),
        or_dash(&ev.source),
        or_dash(&ev.destination),
        if ev.service.is_empty() {
            String::new()
        } else {
            format!(" svc={}", ev.service)
        },
        ids,
        if ev.reason.is_empty() {
            String::new()
        } else {
            format!(" ({})", ev.reason)
        },
    )
}
