//! The agent's internal state, turned into the admin API's protobuf messages. This is
//! the edge: nothing outside `admin/` sees the generated types.
use std::{
    sync::atomic::Ordering,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use super::{AdminState, Core};
use crate::{
    api::admin as pb,
    authz::Workload,
    bpf::inspect,
    config::{AuthzAction, MtlsMode, Rule, Selector, TargetPort},
    identity::Identity,
    state::PortProtocol,
    telemetry::metrics::{EventLabel, IdentityLabel, KindLabel, MapLabel, ResultLabel},
};

pub const VERSION: &str = env!("CARGO_PKG_VERSION");

fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs() as i64;
    time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()
        .and_then(|d| {
            d.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn mode_name(m: MtlsMode) -> &'static str {
    match m {
        MtlsMode::Strict => "STRICT",
        MtlsMode::Permissive => "PERMISSIVE",
    }
}

pub fn status(state: &AdminState) -> pb::StatusReply {
    let core = state.core.get();
    let reason = state.readiness.not_ready_reason();
    pb::StatusReply {
        version: VERSION.to_owned(),
        node: state.node.clone(),
        uptime_seconds: state.started.elapsed().as_secs(),
        programs: core
            .map(|c| c.programs.iter().map(|p| (*p).to_owned()).collect())
            .unwrap_or_default(),
        config_generation: core.map_or(0, |c| c.config.borrow().number),
        ready: reason.is_none(),
        not_ready_reason: reason.unwrap_or_default().to_owned(),
        config_reloads_failed: core.map_or(0, |c| c.reloads.failed.load(Ordering::Relaxed)),
        config_error: core
            .and_then(|c| c.reloads.last_error())
            .unwrap_or_default(),
        previous_agent: state.previous_agent.get().map(|p| pb::PreviousAgent {
            pid: p.pid,
            version: p.version,
            state: p.state.name().to_owned(),
            connections: p.connections,
            deadline_unix_ms: p.deadline.map_or(0, crate::handover::unix_ms),
        }),
        maps: core.map_or_else(Vec::new, |c| map_fill(&c.proxy.maps)),
    }
}

/// The bounded maps' fill, with what the agent left out of them.
fn map_fill(maps: &crate::bpf::MeshMaps) -> Vec<pb::MapFill> {
    use crate::bpf::fill::Level;
    maps.fill()
        .into_iter()
        .map(|f| pb::MapFill {
            map: f.map.name().to_owned(),
            entries: f.entries,
            capacity: f.capacity,
            level: f.level(Level::Normal).name().to_owned(),
            left_out: f.left_out,
        })
        .collect()
}

pub fn workloads(state: &AdminState, core: &Core) -> pb::WorkloadsReply {
    let generation = core.config.borrow().clone();
    let snap = core.proxy.snapshot.load();
    let (local, policy) = (&snap.local, &snap.policy);
    let mut workloads: Vec<pb::Workload> = generation
        .config
        .pods
        .iter()
        .map(|p| {
            let enrolled =
                p.ip.is_some_and(|ip| local.get(&ip).is_some_and(|c| c.id == p.id));
            let on_node = p.node_name.as_deref() == Some(state.node.as_str());
            let mtls_mode = if on_node && p.enroll {
                mode_name(policy.mtls_mode(&Workload {
                    id: p.id.clone(),
                    labels: p.labels.clone(),
                }))
            } else {
                ""
            };
            pb::Workload {
                namespace: p.id.namespace.clone(),
                name: p.id.name.clone(),
                node: p.node_name.clone().unwrap_or_default(),
                ip: p.ip.map(|i| i.to_string()).unwrap_or_default(),
                identity: Identity::new(&state.trust_domain, &p.id.namespace, &p.service_account)
                    .to_string(),
                meshed: p.enroll && crate::inpod::findable(p),
                enrolled,
                mtls_mode: mtls_mode.to_owned(),
                workload_name: p.workload.clone(),
            }
        })
        .collect();
    workloads.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    pb::WorkloadsReply { workloads }
}

pub fn services(core: &Core) -> pb::ServicesReply {
    let generation = core.config.borrow().clone();
    let mut services: Vec<pb::Service> = generation
        .config
        .services
        .iter()
        .map(|s| pb::Service {
            namespace: s.id.namespace.clone(),
            name: s.id.name.clone(),
            cluster_ips: s.cluster_ips.iter().map(ToString::to_string).collect(),
            ports: s
                .ports
                .iter()
                .map(|p| pb::ServicePort {
                    name: p.name.clone().unwrap_or_default(),
                    port: u32::from(p.port),
                    target_port: match &p.target_port {
                        TargetPort::Number(n) => n.to_string(),
                        TargetPort::Name(n) => n.clone(),
                    },
                    protocol: format!("{:?}", p.protocol).to_uppercase(),
                })
                .collect(),
        })
        .collect();
    services.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    pb::ServicesReply { services }
}

/// Routed frontends, and the requests per rule: every rule attached somewhere, with
/// zero counts until used, then any counted rule that has since been removed.
pub fn routes(core: &Core) -> pb::RoutesReply {
    let snap = core.proxy.snapshot.load();
    let mut counts = core.proxy.telemetry.route_counts();
    let mut rules = std::collections::BTreeSet::new();
    let frontends = snap
        .http
        .frontends()
        .into_iter()
        .map(|(frontend, consumer, routes)| {
            rules.extend(routes.rules());
            pb::RoutedFrontend {
                service: format!("{}:{}", routes.service, routes.port),
                frontend: frontend.to_string(),
                consumer_namespace: consumer.unwrap_or_default(),
                protocol: match routes.protocol {
                    PortProtocol::Http => "http",
                    PortProtocol::Http2 => "http2",
                    PortProtocol::Opaque => "opaque",
                    PortProtocol::Detect => "detect",
                }
                .to_owned(),
                routes: routes.route_names(),
            }
        })
        .collect();
    for key in rules {
        counts.entry(key).or_default();
    }
    let rules = counts
        .into_iter()
        .map(|((route, rule), c)| pb::RouteRuleCounts {
            route,
            rule,
            requests: c.requests,
            errors: c.errors,
        })
        .collect();
    let problems = snap
        .http
        .problems
        .iter()
        .map(|p| format!("{} {}: {} ({})", p.kind, p.route, p.message, p.reason))
        .collect();
    pb::RoutesReply {
        frontends,
        rules,
        problems,
    }
}

pub fn endpoints(core: &Core) -> pb::EndpointsReply {
    let snap = core.proxy.snapshot.load();
    let (routes, workloads) = (&snap.routes, &snap.workloads);
    let services = routes
        .targets()
        .into_iter()
        .map(|(frontend, target)| pb::ServiceEndpoints {
            service: target.service.to_string(),
            frontend: frontend.to_string(),
            endpoints: target
                .endpoints
                .iter()
                .map(|e| {
                    let w = workloads.get(e.ip());
                    pb::Endpoint {
                        address: e.to_string(),
                        node: w.and_then(|w| w.node.clone()).unwrap_or_default(),
                        workload: w.map(|w| w.id.to_string()).unwrap_or_default(),
                        identity: w
                            .filter(|w| w.meshed)
                            .map(|w| w.identity.to_string())
                            .unwrap_or_default(),
                    }
                })
                .collect(),
        })
        .collect();
    pb::EndpointsReply { services }
}

fn scope(namespace: &str, selector: Option<&Selector>, root: &str) -> String {
    match selector {
        Some(s) => format!(
            "selector: {}",
            s.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(",")
        ),
        None if namespace == root => "mesh-wide".to_owned(),
        None => "namespace".to_owned(),
    }
}

fn rule_summary(r: &Rule) -> String {
    let list =
        |name: &str, v: &[String]| (!v.is_empty()).then(|| format!("{name}={}", v.join("|")));
    let nets = |name: &str, v: &[ipnet::IpNet]| {
        (!v.is_empty()).then(|| {
            format!(
                "{name}={}",
                v.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("|")
            )
        })
    };
    let ports = |name: &str, v: &[u16]| {
        (!v.is_empty()).then(|| {
            format!(
                "{name}={}",
                v.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("|")
            )
        })
    };
    let from: Vec<String> = r
        .from
        .iter()
        .map(|s| {
            [
                list("principals", &s.principals),
                list("notPrincipals", &s.not_principals),
                list("namespaces", &s.namespaces),
                list("notNamespaces", &s.not_namespaces),
                nets("ipBlocks", &s.ip_blocks),
                nets("notIpBlocks", &s.not_ip_blocks),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" ")
        })
        .collect();
    let to: Vec<String> =
        r.to.iter()
            .map(|o| {
                [ports("ports", &o.ports), ports("notPorts", &o.not_ports)]
                    .into_iter()
                    .flatten()
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .collect();
    let side = |v: Vec<String>| {
        if v.is_empty() {
            "any".to_owned()
        } else {
            v.join(" or ")
        }
    };
    format!("from {} to {}", side(from), side(to))
}

pub fn policies(state: &AdminState, core: &Core) -> pb::PoliciesReply {
    let generation = core.config.borrow().clone();
    let root = &state.root_namespace;
    let mut policies: Vec<pb::Policy> = Vec::new();
    for p in &generation.config.peer_authentications {
        policies.push(pb::Policy {
            kind: "PeerAuthentication".into(),
            namespace: p.id.namespace.clone(),
            name: p.id.name.clone(),
            scope: scope(&p.id.namespace, p.selector.as_ref(), root),
            action: p.mode.map_or("UNSET", mode_name).to_owned(),
            rules: 0,
            summary: Vec::new(),
        });
    }
    for p in &generation.config.authorization_policies {
        policies.push(pb::Policy {
            kind: "AuthorizationPolicy".into(),
            namespace: p.id.namespace.clone(),
            name: p.id.name.clone(),
            scope: scope(&p.id.namespace, p.selector.as_ref(), root),
            action: match p.action {
                AuthzAction::Allow => "ALLOW",
                AuthzAction::Deny => "DENY",
                AuthzAction::Audit => "AUDIT",
            }
            .to_owned(),
            rules: p.rules.len() as u32,
            summary: p.rules.iter().map(rule_summary).collect(),
        });
    }
    policies
        .sort_by(|a, b| (&a.kind, &a.namespace, &a.name).cmp(&(&b.kind, &b.namespace, &b.name)));
    pb::PoliciesReply { policies }
}

pub fn certs(core: &Core) -> pb::CertsReply {
    let secrets = &core.proxy.secrets;
    let now = SystemTime::now();
    let certs = secrets
        .snapshot()
        .into_iter()
        .map(|(id, cert)| match cert {
            Some(c) => pb::Cert {
                identity: id.to_string(),
                serial: c.serial.clone(),
                not_before: rfc3339(c.not_before),
                not_after: rfc3339(c.not_after),
                next_rotation: rfc3339(c.refresh_at()),
                valid: c.is_valid_at(now),
            },
            None => pb::Cert {
                identity: id.to_string(),
                ..Default::default()
            },
        })
        .collect();
    pb::CertsReply {
        certs,
        trust_anchors: secrets.trust_anchors() as u32,
    }
}

pub fn conns(state: &AdminState) -> pb::ConnsReply {
    let opt = |v: Option<String>| v.unwrap_or_default();
    let conns = state
        .telemetry
        .live()
        .into_iter()
        .map(|c| {
            let i = &c.info;
            let workload = |p: &crate::telemetry::Peer| {
                opt(p
                    .workload
                    .as_ref()
                    .map(|w| format!("{}/{}", w.namespace, w.pod)))
            };
            pb::Conn {
                id: i.id,
                reporter: i.reporter.as_str().to_owned(),
                source_workload: workload(&i.source),
                source_address: opt(i.source.addr.map(|a| a.to_string())),
                source_identity: opt(i.source.identity.as_ref().map(ToString::to_string)),
                destination_workload: workload(&i.destination),
                destination_address: opt(i.destination.addr.map(|a| a.to_string())),
                destination_service: opt(i.service.as_ref().map(ToString::to_string)),
                destination_identity: opt(i.destination.identity.as_ref().map(ToString::to_string)),
                mode: i.mode.as_str().to_owned(),
                bytes_received: c.received.load(Ordering::Relaxed),
                bytes_sent: c.sent.load(Ordering::Relaxed),
                age_ms: c.started.elapsed().as_millis() as u64,
            }
        })
        .collect();
    pb::ConnsReply { conns }
}

pub fn config_dump(core: &Core) -> pb::ConfigDumpReply {
    let generation = core.config.borrow().clone();
    pb::ConfigDumpReply {
        generation: generation.number,
        json: serde_json::to_string_pretty(&generation.config).unwrap_or_default(),
    }
}

pub fn bpf_maps(core: &Core, dump: &str) -> Result<pb::BpfMapsReply, inspect::InspectError> {
    let maps = inspect::summarize(&core.map_dir)?
        .into_iter()
        .map(|m| pb::BpfMap {
            name: m.name,
            kind: m.kind,
            max_entries: m.max_entries,
            entries: m.entries,
        })
        .collect();
    let entries = if dump.is_empty() {
        Vec::new()
    } else {
        inspect::dump(&core.map_dir, dump)?
            .into_iter()
            .map(|(key, value)| pb::BpfEntry { key, value })
            .collect()
    };
    Ok(pb::BpfMapsReply { maps, entries })
}

/// Refreshes the gauges that are read, not counted, then renders every metric.
pub fn render_metrics(state: &AdminState) -> String {
    let m = &state.telemetry.metrics;
    m.flow_observers
        .set(state.telemetry.flows.observers() as i64);
    m.relay_buffers_grown
        .set(crate::proxy::relay_buffers_grown() as i64);
    if let Some(core) = state.core.get() {
        if let Ok(maps) = inspect::summarize(&core.map_dir) {
            for map in maps {
                let name: &'static str = match mesh_common_map_name(&map.name) {
                    Some(n) => n,
                    None => continue,
                };
                let label = MapLabel { map: name };
                m.map_entries.get_or_create(&label).set(map.entries as i64);
                m.map_capacity
                    .get_or_create(&label)
                    .set(i64::from(map.max_entries));
            }
        }
        m.cert_expiry.clear();
        for (id, cert) in core.proxy.secrets.snapshot() {
            if let Some(c) = cert {
                let at = c
                    .not_after
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or(Duration::ZERO)
                    .as_secs() as i64;
                m.cert_expiry
                    .get_or_create(&IdentityLabel {
                        identity: id.to_string(),
                    })
                    .set(at);
            }
        }
        for (i, v) in core.proxy.maps.counters().iter().enumerate() {
            let name = inspect::counter_name(i as u32);
            if !name.starts_with("slot ") {
                m.kernel_events
                    .get_or_create(&EventLabel { event: name })
                    .set(*v as i64);
            }
        }
        m.tunnel_connections
            .set(core.proxy.pool.connections() as i64);
        m.config_generation.set(core.config.borrow().number as i64);
        for (kind, n) in core.reloads.rejected_objects() {
            m.config_rejected_objects
                .get_or_create(&KindLabel { kind })
                .set(n as i64);
        }
        let ok = core.reloads.ok.load(Ordering::Relaxed);
        let failed = core.reloads.failed.load(Ordering::Relaxed);
        let mut seen = m.reloads_seen.lock().unwrap_or_else(|p| p.into_inner());
        if ok > seen.0 {
            m.config_reloads
                .get_or_create(&ResultLabel { result: "ok" })
                .inc_by(ok - seen.0);
        }
        if failed > seen.1 {
            m.config_reloads
                .get_or_create(&ResultLabel { result: "failed" })
                .inc_by(failed - seen.1);
        }
        *seen = (ok.max(seen.0), failed.max(seen.1));
    }
    m.encode()
}

/// Map names are a fixed set: labels stay bounded and `'static`.
fn mesh_common_map_name(name: &str) -> Option<&'static str> {
    mesh_common::maps::ALL.into_iter().find(|n| *n == name)
}
