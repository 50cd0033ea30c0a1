//! One record per proxied connection, from open to close. The live table behind
//! `meshctl conns`, the byte counters, Istio's TCP metrics, the access log line and the
//! agent's flow events all come from this record, so they cannot disagree.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Instant, SystemTime},
};

use prometheus_client::metrics::counter::Counter;

use super::{
    access,
    flows::{Flow, FlowHub, Origin},
    metrics::{DenialLabels, Metrics, ResponseFlag, TcpLabels},
};
use crate::{config::NamespacedName, identity::Identity};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reporter {
    /// This agent is on the client's node.
    Source,
    /// This agent is on the server's node.
    Destination,
}

impl Reporter {
    pub fn as_str(self) -> &'static str {
        match self {
            Reporter::Source => "source",
            Reporter::Destination => "destination",
        }
    }
}

/// How the bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Through the mTLS tunnel to another node.
    Hbone,
    /// Delivered on this node.
    Local,
    /// To a destination outside the mesh.
    Passthrough,
    /// Arrived through the tunnel.
    Inbound,
    /// Arrived as plaintext (PERMISSIVE).
    Plaintext,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Hbone => "hbone",
            Mode::Local => "local",
            Mode::Passthrough => "passthrough",
            Mode::Inbound => "inbound",
            Mode::Plaintext => "plaintext",
        }
    }

    /// Istio's `connection_security_policy`. Same-node delivery is not encrypted (see
    /// docs/security.md), so it is reported as "none" even though identity and policy
    /// were checked.
    pub fn security(self) -> &'static str {
        match self {
            Mode::Hbone | Mode::Inbound => "mutual_tls",
            Mode::Local | Mode::Passthrough | Mode::Plaintext => "none",
        }
    }
}

/// A pod as metrics and logs name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadRef {
    pub namespace: String,
    /// The metrics name (Deployment or other owner).
    pub workload: String,
    pub pod: String,
}

/// One end of a connection, as far as it is known.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    pub workload: Option<WorkloadRef>,
    pub addr: Option<SocketAddr>,
    pub identity: Option<Identity>,
}

#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub id: u64,
    pub reporter: Reporter,
    pub mode: Mode,
    pub source: Peer,
    pub destination: Peer,
    pub service: Option<NamespacedName>,
    /// What the client dialled (the ClusterIP and port), for outbound connections.
    pub original_dst: Option<SocketAddr>,
}

/// Why a connection ended (or never started), for metrics, logs and flows.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub flag: ResponseFlag,
    /// A short stable reason (`connect_failed`, `denied`, ...), when not clean.
    pub reason: Option<&'static str>,
    /// The error in words.
    pub detail: Option<String>,
    /// The AuthorizationPolicy that denied it, "ns/name" (or "-" for no ALLOW match).
    pub policy: Option<String>,
}

impl Outcome {
    pub fn ok() -> Outcome {
        Outcome {
            flag: ResponseFlag::None,
            reason: None,
            detail: None,
            policy: None,
        }
    }

    pub fn failed(flag: ResponseFlag, reason: &'static str, detail: impl ToString) -> Outcome {
        Outcome {
            flag,
            reason: Some(reason),
            detail: Some(detail.to_string()),
            policy: None,
        }
    }

    /// The verdict word of logs and flow events.
    pub fn verdict(&self) -> &'static str {
        match self.flag {
            ResponseFlag::None => "forwarded",
            ResponseFlag::Unauthorized => "denied",
            _ => "error",
        }
    }
}

/// An open connection: its description and its byte counts so far.
pub struct LiveConn {
    pub info: ConnInfo,
    pub started: Instant,
    /// Client -> server.
    pub received: AtomicU64,
    /// Server -> client.
    pub sent: AtomicU64,
}

/// The per-connection view of the telemetry: counts bytes as they pass and reports
/// once when closed (or dropped).
pub struct ConnHandle {
    live: Arc<LiveConn>,
    telemetry: Arc<Telemetry>,
    labels: TcpLabels,
    received_metric: Counter,
    sent_metric: Counter,
    closed: AtomicBool,
}

/// Counts bytes in one direction of one connection.
pub struct Tally<'a> {
    live: &'a AtomicU64,
    metric: &'a Counter,
}

impl Tally<'_> {
    pub fn add(&self, n: u64) {
        self.live.fetch_add(n, Ordering::Relaxed);
        self.metric.inc_by(n);
    }
}

impl ConnHandle {
    pub fn info(&self) -> &ConnInfo {
        &self.live.info
    }

    /// (client -> server, server -> client).
    pub fn tallies(&self) -> (Tally<'_>, Tally<'_>) {
        (
            Tally {
                live: &self.live.received,
                metric: &self.received_metric,
            },
            Tally {
                live: &self.live.sent,
                metric: &self.sent_metric,
            },
        )
    }

    pub fn bytes(&self) -> (u64, u64) {
        (
            self.live.received.load(Ordering::Relaxed),
            self.live.sent.load(Ordering::Relaxed),
        )
    }

    pub fn close(self, outcome: Outcome) {
        self.finish(&outcome);
    }

    fn finish(&self, outcome: &Outcome) {
        if self.closed.swap(true, Ordering::Relaxed) {
            return;
        }
        let t = &self.telemetry;
        t.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.live.info.id);
        t.metrics.live_connections.dec();
        let mut labels = self.labels.clone();
        labels.response_flags = outcome.flag.as_str();
        t.metrics.tcp_closed.get_or_create(&labels).inc();
        let (received, sent) = self.bytes();
        let duration = self.live.started.elapsed();
        access::log(&self.live.info, outcome, received, sent, duration);
        t.publish(&self.live.info, outcome);
    }
}

impl Drop for ConnHandle {
    /// A connection task that ends without reporting (aborted with its listener) is
    /// still counted as closed.
    fn drop(&mut self) {
        if !self.closed.load(Ordering::Relaxed) {
            self.finish(&Outcome::failed(
                ResponseFlag::ConnectionTermination,
                "aborted",
                "the connection task ended without a report",
            ));
        }
    }
}

/// A flow event of the agent's about a connection or a request between `source` and
/// `destination`, as seen by `reporter`'s side (whose pod it is about).
pub(super) fn agent_flow(
    kind: &'static str,
    verdict: &'static str,
    reporter: Reporter,
    source: &Peer,
    destination: &Peer,
    service: Option<&NamespacedName>,
) -> Flow {
    let mut f = Flow::new(Origin::Agent, kind, verdict);
    let local = match reporter {
        Reporter::Source => source,
        Reporter::Destination => destination,
    };
    f.time = SystemTime::now();
    f.pod = local
        .workload
        .as_ref()
        .map(|w| format!("{}/{}", w.namespace, w.pod));
    f.source = source.addr.map(|a| a.to_string());
    f.destination = destination.addr.map(|a| a.to_string());
    f.service = service.map(ToString::to_string);
    f.source_identity = source.identity.as_ref().map(ToString::to_string);
    f.destination_identity = destination.identity.as_ref().map(ToString::to_string);
    f
}

/// The agent's telemetry: metrics, open connections and flow events.
pub struct Telemetry {
    pub metrics: Metrics,
    pub flows: FlowHub,
    /// Kubernetes cluster domain, for Istio's FQDN service names.
    pub cluster_domain: String,
    live: Mutex<HashMap<u64, Arc<LiveConn>>>,
    /// Requests per route rule (`meshctl routes`).
    pub(super) routes: Mutex<super::requests::RouteTable>,
    /// The request metrics' series by label set (`request_series`).
    pub(super) request_series: Mutex<super::request_series::SeriesTable>,
}

fn or_unknown(v: Option<String>) -> String {
    v.unwrap_or_else(|| "unknown".to_owned())
}

impl Telemetry {
    pub fn new(cluster_domain: &str) -> Arc<Telemetry> {
        Arc::new(Telemetry {
            metrics: Metrics::default(),
            flows: FlowHub::default(),
            cluster_domain: cluster_domain.to_owned(),
            live: Mutex::new(HashMap::new()),
            routes: Mutex::new(Default::default()),
            request_series: Mutex::new(Default::default()),
        })
    }

    fn labels(&self, info: &ConnInfo, flag: ResponseFlag) -> TcpLabels {
        let workload = |p: &Peer| p.workload.as_ref().map(|w| w.workload.clone());
        let namespace = |p: &Peer| p.workload.as_ref().map(|w| w.namespace.clone());
        let principal = |p: &Peer| p.identity.as_ref().map(ToString::to_string);
        TcpLabels {
            reporter: info.reporter.as_str(),
            source_workload: or_unknown(workload(&info.source)),
            source_workload_namespace: or_unknown(namespace(&info.source)),
            source_principal: or_unknown(principal(&info.source)),
            destination_workload: or_unknown(workload(&info.destination)),
            destination_workload_namespace: or_unknown(namespace(&info.destination)),
            destination_service: or_unknown(
                info.service
                    .as_ref()
                    .map(|s| format!("{}.{}.svc.{}", s.name, s.namespace, self.cluster_domain)),
            ),
            destination_principal: or_unknown(principal(&info.destination)),
            connection_security_policy: info.mode.security(),
            response_flags: flag.as_str(),
        }
    }

    /// Registers an established connection.
    pub fn open(self: &Arc<Self>, info: ConnInfo) -> ConnHandle {
        let labels = self.labels(&info, ResponseFlag::None);
        self.metrics.tcp_opened.get_or_create(&labels).inc();
        self.metrics.live_connections.inc();
        let live = Arc::new(LiveConn {
            info,
            started: Instant::now(),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
        });
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(live.info.id, live.clone());
        ConnHandle {
            received_metric: self.metrics.tcp_received_bytes.get_or_create_owned(&labels),
            sent_metric: self.metrics.tcp_sent_bytes.get_or_create_owned(&labels),
            live,
            telemetry: self.clone(),
            labels,
            closed: AtomicBool::new(false),
        }
    }

    /// A connection that was refused before any byte was carried.
    pub fn refused(&self, info: &ConnInfo, outcome: &Outcome) {
        let labels = self.labels(info, outcome.flag);
        self.metrics.tcp_opened.get_or_create(&labels).inc();
        self.metrics.tcp_closed.get_or_create(&labels).inc();
        if let Some(policy) = &outcome.policy {
            let dst = info.destination.workload.as_ref();
            self.metrics
                .policy_denials
                .get_or_create(&DenialLabels {
                    reporter: info.reporter.as_str(),
                    policy: policy.clone(),
                    destination_workload: or_unknown(dst.map(|w| w.workload.clone())),
                    destination_workload_namespace: or_unknown(dst.map(|w| w.namespace.clone())),
                })
                .inc();
        }
        access::log(info, outcome, 0, 0, std::time::Duration::ZERO);
        self.publish(info, outcome);
    }

    fn publish(&self, info: &ConnInfo, outcome: &Outcome) {
        self.flows.publish_with(|| {
            let verdict = outcome.verdict();
            let kind = match verdict {
                "forwarded" => "forwarded",
                "denied" => "denied",
                _ => "failed",
            };
            let mut f = agent_flow(
                kind,
                verdict,
                info.reporter,
                &info.source,
                &info.destination,
                info.service.as_ref(),
            );
            f.reason = outcome
                .reason
                .map(|r| match &outcome.policy {
                    Some(p) => format!("{r} (policy {p})"),
                    None => r.to_owned(),
                })
                .or_else(|| Some(info.mode.as_str().to_owned()));
            f
        });
    }

    /// The open connections, oldest first.
    pub fn live(&self) -> Vec<Arc<LiveConn>> {
        let mut all: Vec<_> = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect();
        all.sort_by_key(|c| c.info.id);
        all
    }
}

/// What the telemetry tests share: a client pod and the Service it calls.
#[cfg(test)]
pub mod fixtures {
    use super::{NamespacedName, Peer, WorkloadRef};

    pub fn client() -> Peer {
        Peer {
            workload: Some(WorkloadRef {
                namespace: "default".into(),
                workload: "client".into(),
                pod: "client-1".into(),
            }),
            addr: None,
            identity: None,
        }
    }

    pub fn web() -> NamespacedName {
        NamespacedName {
            namespace: "default".into(),
            name: "web".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: u64) -> ConnInfo {
        ConnInfo {
            id,
            reporter: Reporter::Source,
            mode: Mode::Hbone,
            source: fixtures::client(),
            destination: Peer::default(),
            service: Some(fixtures::web()),
            original_dst: None,
        }
    }

    #[test]
    fn bytes_and_connections_are_counted_once() {
        let t = Telemetry::new("cluster.local");
        let h = t.open(info(1));
        assert_eq!(t.live().len(), 1);
        let (rx, tx) = h.tallies();
        rx.add(100);
        rx.add(23);
        tx.add(7);
        h.close(Outcome::ok());
        assert!(t.live().is_empty());
        let text = t.metrics.encode();
        let line = |name: &str| {
            text.lines()
                .find(|l| {
                    l.starts_with(name)
                        && l.contains("destination_service=\"web.default.svc.cluster.local\"")
                })
                .unwrap_or_else(|| panic!("{name} missing in {text}"))
                .to_owned()
        };
        assert!(line("istio_tcp_received_bytes_total").ends_with(" 123"));
        assert!(line("istio_tcp_sent_bytes_total").ends_with(" 7"));
        assert!(line("istio_tcp_connections_opened_total").ends_with(" 1"));
        assert!(line("istio_tcp_connections_closed_total").ends_with(" 1"));
    }

    #[test]
    fn a_dropped_handle_still_reports_its_close() {
        let t = Telemetry::new("cluster.local");
        drop(t.open(info(2)));
        assert!(t.live().is_empty());
        assert!(t.metrics.encode().contains("response_flags=\"UC\"} 1"));
    }
}
