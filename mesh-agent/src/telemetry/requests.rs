//! One record per routed HTTP request, when its response has ended: Istio's request
//! metrics (by reporter), the per-route counts behind `meshctl routes`, and a request
//! event for `meshctl observe`. The proxy fills in [`RequestFacts`] as it routes and
//! sends the request, and [`RequestEnd`] when the response body is done.
use std::{collections::BTreeMap, time::Duration};

use prometheus_client::encoding::EncodeLabelSet;

use super::{
    Telemetry,
    conns::{Mode, Peer, Reporter, agent_flow},
    flows::Flow,
    metrics::ResponseFlag,
    request_series::{MAX_REQUEST_SERIES, protocol},
};
use crate::config::NamespacedName;

/// Envoy's default histogram buckets, which Istio's request histograms use.
pub const ISTIO_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's request labels. Unknown values are "unknown", as in Istio.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_canonical_service: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_canonical_service: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    /// "http" (HTTP/1.1 and HTTP/2) or "grpc".
    pub request_protocol: &'static str,
    /// The HTTP status; "0" when no response was sent.
    pub response_code: String,
    /// The gRPC status of a gRPC response, "" otherwise.
    pub grpc_response_status: String,
    pub response_flags: &'static str,
    pub connection_security_policy: &'static str,
}

/// What is known of a request by the time its response starts.
#[derive(Debug, Clone)]
pub struct RequestFacts {
    pub reporter: Reporter,
    /// How the request travelled from this agent (source) or reached it (destination).
    pub mode: Mode,
    pub source: Peer,
    pub destination: Peer,
    pub service: Option<NamespacedName>,
    pub grpc: bool,
    /// "httproute/ns/name" and the rule's name, when a route rule took the request.
    pub route: Option<(String, String)>,
    pub method: String,
    pub authority: String,
    pub path: String,
}

/// How the request ended.
#[derive(Debug, Clone)]
pub struct RequestEnd {
    pub status: u16,
    /// From the trailers or a trailers-only response.
    pub grpc_status: Option<u32>,
    pub flag: ResponseFlag,
    pub duration: Duration,
    pub request_bytes: u64,
    pub response_bytes: u64,
}

/// Requests counted per route rule, for `meshctl routes`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RouteCounts {
    pub requests: u64,
    /// Responses with a 5xx status (or a gRPC status other than OK).
    pub errors: u64,
}

/// Per-(route, rule) counts. The keys come from the config (route names and rule
/// names), so the map is bounded by it.
pub type RouteTable = BTreeMap<(String, String), RouteCounts>;

/// Istio's `grpc_response_status` value and whether the request counts as an error
/// (Kiali's rule: a 5xx status, or a gRPC status other than OK).
pub fn classify(end: &RequestEnd, grpc: bool) -> (String, bool) {
    let grpc_label = match (grpc, end.grpc_status) {
        (true, Some(s)) => s.to_string(),
        // A gRPC request answered without a status: Istio reports what it saw.
        (true, None) | (false, _) => String::new(),
    };
    let error =
        end.status == 0 || end.status >= 500 || (grpc && end.grpc_status.is_some_and(|s| s != 0));
    (grpc_label, error)
}

/// The verdict word of a request event.
pub fn verdict(end: &RequestEnd, error: bool) -> &'static str {
    match end.flag {
        ResponseFlag::Unauthorized => "denied",
        _ if error => "error",
        _ => "forwarded",
    }
}

fn or_unknown(v: Option<String>) -> String {
    v.unwrap_or_else(|| "unknown".to_owned())
}

impl Telemetry {
    pub fn http_labels(&self, facts: &RequestFacts, end: &RequestEnd) -> HttpLabels {
        let workload = |p: &Peer| p.workload.as_ref().map(|w| w.workload.clone());
        let namespace = |p: &Peer| p.workload.as_ref().map(|w| w.namespace.clone());
        let principal = |p: &Peer| p.identity.as_ref().map(ToString::to_string);
        let svc = facts.service.as_ref();
        HttpLabels {
            reporter: facts.reporter.as_str(),
            source_workload: or_unknown(workload(&facts.source)),
            source_workload_namespace: or_unknown(namespace(&facts.source)),
            source_principal: or_unknown(principal(&facts.source)),
            // The canonical service is the workload's metrics name (which already
            // prefers Istio's canonical-name label).
            source_canonical_service: or_unknown(workload(&facts.source)),
            destination_workload: or_unknown(workload(&facts.destination)),
            destination_workload_namespace: or_unknown(namespace(&facts.destination)),
            destination_principal: or_unknown(principal(&facts.destination)),
            destination_canonical_service: or_unknown(workload(&facts.destination)),
            destination_service: or_unknown(
                svc.map(|s| format!("{}.{}.svc.{}", s.name, s.namespace, self.cluster_domain)),
            ),
            destination_service_name: or_unknown(svc.map(|s| s.name.clone())),
            destination_service_namespace: or_unknown(svc.map(|s| s.namespace.clone())),
            request_protocol: protocol(facts.grpc),
            response_code: end.status.to_string(),
            grpc_response_status: classify(end, facts.grpc).0,
            response_flags: end.flag.as_str(),
            connection_security_policy: facts.mode.security(),
        }
    }

    /// Records one finished request.
    pub fn request(&self, facts: &RequestFacts, end: &RequestEnd) {
        self.request_series
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(&self.metrics, facts, end, MAX_REQUEST_SERIES, || {
                self.http_labels(facts, end)
            });
        let (_, error) = classify(end, facts.grpc);
        if let Some(route) = &facts.route {
            let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            // Looked up before inserting: the key is cloned once per route rule, not
            // once per request.
            if !routes.contains_key(route) {
                routes.insert(route.clone(), RouteCounts::default());
            }
            if let Some(c) = routes.get_mut(route) {
                c.requests += 1;
                c.errors += u64::from(error);
            }
        }
        self.flows.publish_with(|| request_flow(facts, end, error));
    }

    /// Requests per route rule so far (source reporter).
    pub fn route_counts(&self) -> RouteTable {
        self.routes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

fn request_flow(facts: &RequestFacts, end: &RequestEnd, error: bool) -> Flow {
    let mut f = agent_flow(
        "request",
        verdict(end, error),
        facts.reporter,
        &facts.source,
        &facts.destination,
        facts.service.as_ref(),
    );
    let route = facts
        .route
        .as_ref()
        .map(|(r, rule)| format!(" {r} rule={rule}"))
        .unwrap_or_default();
    let grpc = match end.grpc_status {
        Some(s) if facts.grpc => format!(" grpc-status={s}"),
        _ => String::new(),
    };
    f.reason = Some(format!(
        "{} {} {}{} -> {}{grpc} flags={} {}ms{route}",
        facts.reporter.as_str(),
        facts.method,
        facts.authority,
        facts.path,
        end.status,
        end.flag.as_str(),
        end.duration.as_millis(),
    ));
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::conns::fixtures;

    fn facts(grpc: bool) -> RequestFacts {
        RequestFacts {
            reporter: Reporter::Source,
            mode: Mode::Hbone,
            source: fixtures::client(),
            destination: Peer::default(),
            service: Some(fixtures::web()),
            grpc,
            route: Some(("httproute/default/web".into(), "0".into())),
            method: "GET".into(),
            authority: "web".into(),
            path: "/".into(),
        }
    }

    fn end(status: u16, grpc_status: Option<u32>) -> RequestEnd {
        RequestEnd {
            status,
            grpc_status,
            flag: ResponseFlag::None,
            duration: Duration::from_millis(3),
            request_bytes: 10,
            response_bytes: 2000,
        }
    }

    #[test]
    fn errors_follow_kialis_rule() {
        assert!(!classify(&end(200, None), false).1);
        assert!(!classify(&end(404, None), false).1);
        assert!(classify(&end(503, None), false).1);
        assert!(classify(&end(0, None), false).1);
        assert_eq!(classify(&end(200, Some(14)), true), ("14".into(), true));
        assert_eq!(classify(&end(200, Some(0)), true), ("0".into(), false));
        // A gRPC status on a plain HTTP request is not a gRPC status.
        assert_eq!(classify(&end(200, Some(14)), false), (String::new(), false));
    }

    #[test]
    fn counts_and_buckets_are_istios() {
        let t = Telemetry::new("cluster.local");
        for _ in 0..3 {
            t.request(&facts(false), &end(200, None));
        }
        t.request(&facts(false), &end(503, None));
        let text = t.metrics.encode();
        let line = |prefix: &str, code: &str| {
            text.lines()
                .find(|l| l.starts_with(prefix) && l.contains(&format!("response_code=\"{code}\"")))
                .unwrap_or_else(|| panic!("{prefix} {code} missing in {text}"))
                .to_owned()
        };
        assert!(line("istio_requests_total{", "200").ends_with(" 3"));
        assert!(line("istio_requests_total{", "503").ends_with(" 1"));
        assert!(line("istio_request_duration_milliseconds_count{", "200").ends_with(" 3"));
        // 3 ms falls in the 5 ms bucket, not the 1 ms one.
        assert!(text.contains("le=\"5.0\""), "{text}");
        assert!(line("istio_request_bytes_sum{", "200").ends_with(" 30.0"));
        assert!(line("istio_response_bytes_sum{", "200").ends_with(" 6000.0"));
        assert!(line("istio_requests_total{", "200").contains(
            "destination_service=\"web.default.svc.cluster.local\",destination_service_name=\"web\",destination_service_namespace=\"default\",request_protocol=\"http\""
        ));
        let routes = t.route_counts();
        assert_eq!(
            routes[&("httproute/default/web".to_owned(), "0".to_owned())],
            RouteCounts {
                requests: 4,
                errors: 1
            }
        );
    }

    #[test]
    fn grpc_requests_carry_their_status() {
        let t = Telemetry::new("cluster.local");
        t.request(&facts(true), &end(200, Some(7)));
        let text = t.metrics.encode();
        assert!(
            text.contains(
                "request_protocol=\"grpc\",response_code=\"200\",grpc_response_status=\"7\""
            ),
            "{text}"
        );
    }
}
