//! The series a finished request is recorded in: one lookup per request, and a
//! bounded number of them.
//!
//! A request updates four families (its count, duration, request and response bytes)
//! under the same 17 labels. Asked one by one, each family hashes and compares the
//! labels again; here the four handles are kept together under their labels, so a
//! request pays one hash and one comparison.
//!
//! The number of label sets is capped. The labels come from the config (workloads,
//! Services, identities) and from the traffic (a status, a gRPC status, the Service
//! a peer agent names for its request), so a node far busier than expected, or a peer
//! that names a new Service with each request, would otherwise grow the agent's
//! memory without end. Past the cap, a request with a new label set is counted in an
//! overflow series (every label `overflow` but the reporter and the protocol), and
//! the agent says so once in its log.
use foldhash::HashMap;
use prometheus_client::metrics::{counter::Counter, histogram::Histogram};
use tracing::warn;

use super::{
    metrics::Metrics,
    requests::{HttpLabels, RequestEnd},
};

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

/// The label set a request is counted under once the table is full.
fn overflow(labels: &HttpLabels) -> HttpLabels {
    let o = || OVERFLOW.to_owned();
    HttpLabels {
        reporter: labels.reporter,
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
        request_protocol: labels.request_protocol,
        response_code: o(),
        grpc_response_status: o(),
        response_flags: OVERFLOW,
        connection_security_policy: OVERFLOW,
    }
}

#[derive(Default)]
pub struct SeriesTable {
    by_labels: HashMap<HttpLabels, Series>,
    overflowed: bool,
}

impl SeriesTable {
    /// Records a finished request under `labels`, or in the overflow series when
    /// `limit` label sets are kept already and these are new.
    pub fn record(&mut self, m: &Metrics, labels: HttpLabels, end: &RequestEnd, limit: usize) {
        if let Some(s) = self.by_labels.get(&labels) {
            s.record(end);
            return;
        }
        let labels = if self.by_labels.len() < limit {
            labels
        } else {
            if !self.overflowed {
                self.overflowed = true;
                warn!(
                    limit,
                    "request metrics: too many label sets; new ones are counted with the labels \"{OVERFLOW}\""
                );
            }
            overflow(&labels)
        };
        self.by_labels
            .entry(labels)
            .or_insert_with_key(|l| Series::of(m, l))
            .record(end);
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::telemetry::ResponseFlag;

    fn labels(service: &str) -> HttpLabels {
        let s = |v: &str| v.to_owned();
        HttpLabels {
            reporter: "source",
            source_workload: s("client"),
            source_workload_namespace: s("default"),
            source_principal: s("spiffe://cluster.local/ns/default/sa/client"),
            source_canonical_service: s("client"),
            destination_workload: s("web"),
            destination_workload_namespace: s("default"),
            destination_principal: s("spiffe://cluster.local/ns/default/sa/web"),
            destination_canonical_service: s("web"),
            destination_service: format!("{service}.default.svc.cluster.local"),
            destination_service_name: s(service),
            destination_service_namespace: s("default"),
            request_protocol: "http",
            response_code: s("200"),
            grpc_response_status: String::new(),
            response_flags: "-",
            connection_security_policy: "mutual_tls",
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

    #[test]
    fn requests_under_one_label_set_share_its_four_series() {
        let m = Metrics::default();
        let mut t = SeriesTable::default();
        for _ in 0..3 {
            t.record(&m, labels("web"), &end(), 10);
        }
        let text = m.encode();
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
    fn past_the_limit_new_label_sets_go_to_one_overflow_series() {
        let m = Metrics::default();
        let mut t = SeriesTable::default();
        // A peer naming a new Service with every request.
        for i in 0..100 {
            t.record(&m, labels(&format!("svc-{i}")), &end(), 10);
        }
        // A label set kept before the limit still counts under its own labels.
        t.record(&m, labels("svc-0"), &end(), 10);
        let text = m.encode();
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
