//! The series a finished request is recorded in: one lookup per request, and a
//! bounded number of them.
//!
//! A request updates four families (its count, duration, request and response bytes)
//! under the same 17 labels. Asked one by one, each family would hash and compare the
//! labels again, and the labels themselves are 15 strings built per request (two
//! SPIFFE ids and a Service FQDN formatted among them). Here the four handles are kept
//! together under what the labels are made of, borrowed from the request's facts:
//! a request hashes and compares those, and the labels are built only for a label set
//! not seen before.
//!
//! The number of label sets is capped. The labels come from the config (workloads,
//! Services, identities) and from the traffic (a status, a gRPC status, the Service
//! a peer agent names for its request), so a node far busier than expected, or a peer
//! that names a new Service with each request, would otherwise grow the agent's
//! memory without end. Past the cap, a request with a new label set is counted in an
//! overflow series (every label `overflow` but the reporter and the protocol), and
//! the agent says so once in its log.
use std::hash::BuildHasher as _;

use hashbrown::HashTable;
use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
use tracing::warn;

use super::{
    conns::Peer,
    metrics::Metrics,
    requests::{HttpLabels, RequestEnd, RequestFacts},
};
use crate::identity::Identity;

/// Request label sets kept, per agent. At about 4 KiB a set (the labels, held by
/// each family, and three histograms) this is at most about 20 MiB.
pub const MAX_REQUEST_SERIES: usize = 5_000;

/// The label value of the overflow series.
pub const OVERFLOW: &str = "overflow";

/// The four metrics of one label set.
struct Series {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

impl Series {
    fn of(m: &Metrics, labels: &HttpLabels) -> Series {
        Series {
            requests: m.requests.get_or_create(labels).clone(),
            duration: m.request_duration.get_or_create(labels).clone(),
            request_bytes: m.request_bytes.get_or_create(labels).clone(),
            response_bytes: m.response_bytes.get_or_create(labels).clone(),
        }
    }

    fn record(&self, end: &RequestEnd) {
        self.requests.inc();
        self.duration.observe(end.duration.as_secs_f64() * 1000.0);
        self.request_bytes.observe(end.request_bytes as f64);
        self.response_bytes.observe(end.response_bytes as f64);
    }
}

/// The `request_protocol` label.
pub fn protocol(grpc: bool) -> &'static str {
    if grpc { "grpc" } else { "http" }
}

/// The label set a request is counted under once the table is full.
fn overflow(reporter: &'static str, request_protocol: &'static str) -> HttpLabels {
    let o = || OVERFLOW.to_owned();
    HttpLabels {
        reporter,
        source_workload: o(),
        source_workload_namespace: o(),
        source_principal: o(),
        source_canonical_service: o(),
        destination_workload: o(),
        destination_workload_namespace: o(),
        destination_principal: o(),
        destination_canonical_service: o(),
        destination_service: o(),
        destination_service_name: o(),
        destination_service_namespace: o(),
        request_protocol,
        response_code: o(),
        grpc_response_status: o(),
        response_flags: OVERFLOW,
        connection_security_policy: OVERFLOW,
    }
}

/// What one end of a request contributes to its labels.
#[derive(Hash, PartialEq, Eq)]
struct PeerInputs<'a> {
    /// The workload's metrics name and namespace.
    workload: Option<(&'a str, &'a str)>,
    identity: Option<&'a Identity>,
}

impl<'a> PeerInputs<'a> {
    fn of(p: &'a Peer) -> Self {
        PeerInputs {
            workload: p
                .workload
                .as_ref()
                .map(|w| (w.workload.as_str(), w.namespace.as_str())),
            identity: p.identity.as_ref(),
        }
    }
}

/// Everything a request's labels are made of (`Telemetry::http_labels`), borrowed:
/// two requests with equal inputs have equal labels.
#[derive(Hash, PartialEq, Eq)]
struct Inputs<'a> {
    reporter: &'static str,
    security: &'static str,
    source: PeerInputs<'a>,
    destination: PeerInputs<'a>,
    /// Name and namespace.
    service: Option<(&'a str, &'a str)>,
    grpc: bool,
    status: u16,
    grpc_status: Option<u32>,
    flag: &'static str,
}

impl<'a> Inputs<'a> {
    fn of(facts: &'a RequestFacts, end: &RequestEnd) -> Self {
        Inputs {
            reporter: facts.reporter.as_str(),
            security: facts.mode.security(),
            source: PeerInputs::of(&facts.source),
            destination: PeerInputs::of(&facts.destination),
            service: facts
                .service
                .as_ref()
                .map(|s| (s.name.as_str(), s.namespace.as_str())),
            grpc: facts.grpc,
            status: end.status,
            grpc_status: end.grpc_status,
            flag: end.flag.as_str(),
        }
    }
}

/// [`Inputs`], owned, as the table keeps them.
struct OwnedPeer {
    workload: Option<(String, String)>,
    identity: Option<Identity>,
}

struct Key {
    reporter: &'static str,
    security: &'static str,
    source: OwnedPeer,
    destination: OwnedPeer,
    service: Option<(String, String)>,
    grpc: bool,
    status: u16,
    grpc_status: Option<u32>,
    flag: &'static str,
}

fn owned_peer(p: &PeerInputs<'_>) -> OwnedPeer {
    OwnedPeer {
        workload: p.workload.map(|(w, n)| (w.to_owned(), n.to_owned())),
        identity: p.identity.cloned(),
    }
}

fn peer_view(p: &OwnedPeer) -> PeerInputs<'_> {
    PeerInputs {
        workload: p.workload.as_ref().map(|(w, n)| (w.as_str(), n.as_str())),
        identity: p.identity.as_ref(),
    }
}

impl Key {
    fn of(i: &Inputs<'_>) -> Key {
        Key {
            reporter: i.reporter,
            security: i.security,
            source: owned_peer(&i.source),
            destination: owned_peer(&i.destination),
            service: i.service.map(|(n, ns)| (n.to_owned(), ns.to_owned())),
            grpc: i.grpc,
            status: i.status,
            grpc_status: i.grpc_status,
            flag: i.flag,
        }
    }

    fn view(&self) -> Inputs<'_> {
        Inputs {
            reporter: self.reporter,
            security: self.security,
            source: peer_view(&self.source),
            destination: peer_view(&self.destination),
            service: self
                .service
                .as_ref()
                .map(|(n, ns)| (n.as_str(), ns.as_str())),
            grpc: self.grpc,
            status: self.status,
            grpc_status: self.grpc_status,
            flag: self.flag,
        }
    }
}

#[derive(Default)]
pub struct SeriesTable {
    by_inputs: HashTable<(Key, Series)>,
    /// Randomly seeded: some inputs come from peers (the Service a peer agent names),
    /// and the table's cap bounds what colliding keys could cost a lookup.
    hasher: foldhash::fast::RandomState,
    /// The overflow series, by reporter and protocol.
    overflow: Vec<((&'static str, &'static str), Series)>,
}

impl SeriesTable {
    /// Records a finished request under its labels (`labels` builds them, for a label
    /// set not seen before), or in the overflow series when `limit` label sets are
    /// kept already and these are new.
    pub fn record(
        &mut self,
        m: &Metrics,
        facts: &RequestFacts,
        end: &RequestEnd,
        limit: usize,
        labels: impl FnOnce() -> HttpLabels,
    ) {
        let inputs = Inputs::of(facts, end);
        let hash = self.hasher.hash_one(&inputs);
        if let Some((_, s)) = self.by_inputs.find(hash, |(k, _)| k.view() == inputs) {
            s.record(end);
            return;
        }
        if self.by_inputs.len() < limit {
            let series = Series::of(m, &labels());
            series.record(end);
            let hasher = &self.hasher;
            self.by_inputs
                .insert_unique(hash, (Key::of(&inputs), series), |(k, _)| {
                    hasher.hash_one(k.view())
                });
            return;
        }
        let which = (facts.reporter.as_str(), protocol(facts.grpc));
        if let Some((_, s)) = self.overflow.iter().find(|(w, _)| *w == which) {
            s.record(end);
            return;
        }
        warn!(
            limit,
            "request metrics: too many label sets; new ones are counted with the labels \"{OVERFLOW}\""
        );
        let series = Series::of(m, &overflow(which.0, which.1));
        series.record(end);
        self.overflow.push((which, series));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        config::NamespacedName,
        telemetry::{Mode, Reporter, ResponseFlag, Telemetry, WorkloadRef},
    };

    fn peer(workload: &str) -> Peer {
        Peer {
            workload: Some(WorkloadRef {
                namespace: "default".into(),
                workload: workload.into(),
                pod: format!("{workload}-1"),
            }),
            addr: None,
            identity: Some(Identity::new("cluster.local", "default", workload)),
        }
    }

    fn facts(service: &str) -> RequestFacts {
        RequestFacts {
            reporter: Reporter::Source,
            mode: Mode::Hbone,
            source: peer("client"),
            destination: peer("web"),
            service: Some(NamespacedName {
                namespace: "default".into(),
                name: service.into(),
            }),
            grpc: false,
            route: None,
            method: "GET".into(),
            authority: "web".into(),
            path: "/".into(),
        }
    }

    fn end() -> RequestEnd {
        RequestEnd {
            status: 200,
            grpc_status: None,
            flag: ResponseFlag::None,
            duration: Duration::from_millis(2),
            request_bytes: 10,
            response_bytes: 20,
        }
    }

    fn count_lines(text: &str) -> Vec<&str> {
        text.lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .collect()
    }

    /// Records through a table with room for `limit` label sets.
    fn record(
        t: &Telemetry,
        table: &mut SeriesTable,
        f: &RequestFacts,
        e: &RequestEnd,
        limit: usize,
    ) {
        table.record(&t.metrics, f, e, limit, || t.http_labels(f, e));
    }

    #[test]
    fn requests_under_one_label_set_share_its_four_series() {
        let t = Telemetry::new("cluster.local");
        let mut table = SeriesTable::default();
        for _ in 0..3 {
            record(&t, &mut table, &facts("web"), &end(), 10);
        }
        let text = t.metrics.encode();
        let counts = count_lines(&text);
        assert_eq!(counts.len(), 1, "{text}");
        assert!(counts[0].ends_with(" 3"), "{text}");
        assert!(
            text.lines().any(
                |l| l.starts_with("istio_request_duration_milliseconds_count{")
                    && l.ends_with(" 3")
            ),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.starts_with("istio_response_bytes_sum{") && l.ends_with(" 60.0")),
            "{text}"
        );
    }

    #[test]
    fn every_input_of_the_labels_tells_series_apart_and_nothing_else_does() {
        let t = Telemetry::new("cluster.local");
        let mut table = SeriesTable::default();
        let base = facts("web");
        // What the labels do not show: the pod, the address, the request line.
        let mut same = base.clone();
        if let Some(w) = same.source.workload.as_mut() {
            w.pod = "client-2".into();
        }
        same.destination.addr = Some("10.0.0.9:80".parse().expect("addr"));
        same.method = "POST".into();
        same.path = "/other".into();
        // What they do show, one at a time.
        let mut variants = Vec::new();
        let mut f = base.clone();
        f.reporter = Reporter::Destination;
        variants.push((f, end()));
        let mut f = base.clone();
        f.mode = Mode::Local;
        variants.push((f, end()));
        let mut f = base.clone();
        f.source = peer("other");
        variants.push((f, end()));
        let mut f = base.clone();
        f.source.identity = None;
        variants.push((f, end()));
        let mut f = base.clone();
        if let Some(w) = f.destination.workload.as_mut() {
            w.namespace = "prod".into();
        }
        variants.push((f, end()));
        let mut f = base.clone();
        f.destination.identity = Some(Identity::new("cluster.local", "default", "x"));
        variants.push((f, end()));
        variants.push((facts("api"), end()));
        let mut f = base.clone();
        f.service = None;
        variants.push((f, end()));
        let mut f = base.clone();
        f.grpc = true;
        variants.push((f, end()));
        let mut e = end();
        e.status = 503;
        variants.push((base.clone(), e));
        let mut f = base.clone();
        f.grpc = true;
        let mut e = end();
        e.grpc_status = Some(14);
        variants.push((f, e));
        let mut e = end();
        e.flag = ResponseFlag::DownstreamTermination;
        variants.push((base.clone(), e));

        record(&t, &mut table, &base, &end(), 100);
        record(&t, &mut table, &same, &end(), 100);
        assert_eq!(count_lines(&t.metrics.encode()).len(), 1);
        for (n, (f, e)) in variants.iter().enumerate() {
            record(&t, &mut table, f, e, 100);
            let text = t.metrics.encode();
            assert_eq!(count_lines(&text).len(), n + 2, "variant {n}: {text}");
        }
        // Each series got its own count: the base two, every variant one.
        let text = t.metrics.encode();
        let counts = count_lines(&text);
        assert_eq!(
            counts.iter().filter(|l| l.ends_with(" 2")).count(),
            1,
            "{text}"
        );
        assert_eq!(
            counts.iter().filter(|l| l.ends_with(" 1")).count(),
            variants.len(),
            "{text}"
        );
    }

    #[test]
    fn past_the_limit_new_label_sets_go_to_one_overflow_series() {
        let t = Telemetry::new("cluster.local");
        let mut table = SeriesTable::default();
        // A peer naming a new Service with every request.
        for i in 0..100 {
            record(&t, &mut table, &facts(&format!("svc-{i}")), &end(), 10);
        }
        // A label set kept before the limit still counts under its own labels.
        record(&t, &mut table, &facts("svc-0"), &end(), 10);
        let text = t.metrics.encode();
        let counts = count_lines(&text);
        // Ten label sets and the overflow series.
        assert_eq!(counts.len(), 11, "{text}");
        let overflow = counts
            .iter()
            .find(|l| l.contains("destination_service_name=\"overflow\""))
            .unwrap_or_else(|| panic!("no overflow series in {text}"));
        assert!(overflow.ends_with(" 90"), "{overflow}");
        assert!(overflow.contains("reporter=\"source\""), "{overflow}");
        let first = counts
            .iter()
            .find(|l| l.contains("destination_service_name=\"svc-0\""))
            .unwrap_or_else(|| panic!("svc-0 missing in {text}"));
        assert!(first.ends_with(" 2"), "{first}");
    }
}
