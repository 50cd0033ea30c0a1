//! Prometheus metrics (`:15020/metrics`). The TCP families use Istio's names and
//! labels, so dashboards built for Istio work unchanged; the agent's own families are
//! prefixed `mesh_`. Every label takes values from a bounded set: workloads, services
//! and identities of the config (never pod names, ports or addresses), policies, map
//! names, and small enums; the request metrics' labels also carry statuses and the
//! Service a peer names, so their label sets are capped (`request_series`). See
//! docs/observability.md.
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use super::requests::{HttpLabels, ISTIO_BUCKETS};

/// A histogram family with Istio's buckets.
pub type Histograms = Family<HttpLabels, Histogram, fn() -> Histogram>;

fn istio_histogram() -> Histogram {
    Histogram::new(ISTIO_BUCKETS)
}

/// Istio's TCP labels. Unknown values are "unknown", as in Istio.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// "source" (the client's node) or "destination" (the server's node).
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_service: String,
    pub destination_principal: String,
    /// "mutual_tls" or "none".
    pub connection_security_policy: &'static str,
    /// "-" when nothing went wrong; see [`ResponseFlag`].
    pub response_flags: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// A config object kind, as Kubernetes spells it.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabel {
    pub map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabel {
    pub identity: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    pub reporter: &'static str,
    /// "namespace/name" of the deciding policy, or "-" when no ALLOW policy matched.
    pub policy: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    pub event: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DropLabel {
    /// "kernel" (the ring buffer was full) or "observer" (a slow `meshctl observe`).
    pub stage: &'static str,
}

/// Envoy-style response flags, the subset that means something at L4 here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResponseFlag {
    None,
    /// No route: the ClusterIP/port is not a mesh service, or no original destination.
    NoRoute,
    /// No healthy upstream: the service has no ready endpoints.
    NoHealthyUpstream,
    /// Upstream connection failure: connect refused or timed out, tunnel failed.
    UpstreamFailure,
    /// Denied by authorization policy (the local one, or the peer's).
    Unauthorized,
    /// Ended with an I/O error after it was established.
    ConnectionTermination,
    /// HTTP: the request or backend timeout expired.
    UpstreamTimeout,
    /// HTTP: the rule's backend does not exist.
    NoCluster,
    /// HTTP: the client went away before the response ended.
    DownstreamTermination,
    /// HTTP: the request cannot be served as sent (a malformed path, a lower-case
    /// method).
    DownstreamProtocolError,
}

impl ResponseFlag {
    pub fn as_str(self) -> &'static str {
        match self {
            ResponseFlag::None => "-",
            ResponseFlag::NoRoute => "NR",
            ResponseFlag::NoHealthyUpstream => "UH",
            ResponseFlag::UpstreamFailure => "UF",
            ResponseFlag::Unauthorized => "UAEX",
            ResponseFlag::ConnectionTermination => "UC",
            ResponseFlag::UpstreamTimeout => "UT",
            ResponseFlag::NoCluster => "NC",
            ResponseFlag::DownstreamTermination => "DC",
            ResponseFlag::DownstreamProtocolError => "DPE",
        }
    }
}

pub struct Metrics {
    pub registry: Registry,
    pub tcp_opened: Family<TcpLabels, Counter>,
    pub tcp_closed: Family<TcpLabels, Counter>,
    pub tcp_sent_bytes: Family<TcpLabels, Counter>,
    pub tcp_received_bytes: Family<TcpLabels, Counter>,
    pub requests: Family<HttpLabels, Counter>,
    pub request_duration: Histograms,
    pub request_bytes: Histograms,
    pub response_bytes: Histograms,
    pub config_reloads: Family<ResultLabel, Counter>,
    pub config_generation: Gauge,
    pub config_rejected_objects: Family<KindLabel, Gauge>,
    pub map_entries: Family<MapLabel, Gauge>,
    pub map_capacity: Family<MapLabel, Gauge>,
    pub cert_expiry: Family<IdentityLabel, Gauge>,
    pub policy_denials: Family<DenialLabels, Counter>,
    pub kernel_events: Family<EventLabel, Gauge>,
    /// Reload counts already exported (the watcher counts; scrapes add the difference).
    pub reloads_seen: std::sync::Mutex<(u64, u64)>,
    pub flow_events_dropped: Family<DropLabel, Counter>,
    pub tunnel_connections: Gauge,
    pub live_connections: Gauge,
    pub flow_observers: Gauge,
    pub relay_buffers_grown: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let tcp_opened = Family::default();
        let tcp_closed = Family::default();
        let tcp_sent_bytes = Family::default();
        let tcp_received_bytes = Family::default();
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened",
            tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed",
            tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent in responses (server to client), as Istio counts them",
            tcp_sent_bytes.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received in requests (client to server), as Istio counts them",
            tcp_received_bytes.clone(),
        );
        let requests = Family::default();
        registry.register(
            "istio_requests",
            "HTTP and gRPC requests, counted when the response ends",
            requests.clone(),
        );
        let request_duration: Histograms = Family::new_with_constructor(istio_histogram);
        registry.register(
            "istio_request_duration_milliseconds",
            "From the request's arrival to the end of the response",
            request_duration.clone(),
        );
        let request_bytes: Histograms = Family::new_with_constructor(istio_histogram);
        registry.register(
            "istio_request_bytes",
            "Request body bytes",
            request_bytes.clone(),
        );
        let response_bytes: Histograms = Family::new_with_constructor(istio_histogram);
        registry.register(
            "istio_response_bytes",
            "Response body bytes",
            response_bytes.clone(),
        );
        let config_reloads = Family::default();
        registry.register(
            "mesh_config_reloads",
            "Config directory loads by result (ok, failed)",
            config_reloads.clone(),
        );
        let config_rejected_objects = Family::default();
        registry.register(
            "mesh_config_rejected_objects",
            "Objects from the Kubernetes API refused as invalid, by kind, as they are now (the rest of the config applies)",
            config_rejected_objects.clone(),
        );
        let config_generation = Gauge::default();
        registry.register(
            "mesh_config_generation",
            "Number of the config generation being served",
            config_generation.clone(),
        );
        let map_entries = Family::default();
        registry.register(
            "mesh_bpf_map_entries",
            "Entries in use in each eBPF map",
            map_entries.clone(),
        );
        let map_capacity = Family::default();
        registry.register(
            "mesh_bpf_map_capacity",
            "max_entries of each eBPF map",
            map_capacity.clone(),
        );
        let cert_expiry = Family::default();
        registry.register(
            "mesh_certificate_expiry_timestamp_seconds",
            "Unix time at which the newest certificate of each local identity expires",
            cert_expiry.clone(),
        );
        let policy_denials = Family::default();
        registry.register(
            "mesh_policy_denials",
            "Connections denied by authorization policy",
            policy_denials.clone(),
        );
        let kernel_events = Family::default();
        registry.register(
            "mesh_kernel_events",
            "Decisions of the kernel programs since they were loaded (per-CPU counters, summed)",
            kernel_events.clone(),
        );
        let flow_events_dropped = Family::default();
        registry.register(
            "mesh_flow_events_dropped",
            "Flow events lost: the kernel ring buffer was full, or an observer was too slow",
            flow_events_dropped.clone(),
        );
        let tunnel_connections = Gauge::default();
        registry.register(
            "mesh_tunnel_connections",
            "Open pooled mTLS tunnel connections",
            tunnel_connections.clone(),
        );
        let live_connections = Gauge::default();
        registry.register(
            "mesh_connections_open",
            "Proxied connections open now",
            live_connections.clone(),
        );
        let flow_observers = Gauge::default();
        registry.register(
            "mesh_flow_observers",
            "Clients streaming flow events (meshctl observe)",
            flow_observers.clone(),
        );
        let relay_buffers_grown = Gauge::default();
        registry.register(
            "mesh_relay_buffer_grown_bytes",
            "Bytes the relay buffers of busy connections hold above their base size (bounded by an agent-wide budget)",
            relay_buffers_grown.clone(),
        );
        Metrics {
            registry,
            flow_observers,
            relay_buffers_grown,
            tcp_opened,
            tcp_closed,
            tcp_sent_bytes,
            tcp_received_bytes,
            requests,
            request_duration,
            request_bytes,
            response_bytes,
            config_reloads,
            config_generation,
            config_rejected_objects,
            map_entries,
            map_capacity,
            cert_expiry,
            policy_denials,
            kernel_events,
            reloads_seen: std::sync::Mutex::new((0, 0)),
            flow_events_dropped,
            tunnel_connections,
            live_connections,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition of every family.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_names_and_labels_are_exported() {
        let m = Metrics::default();
        let labels = TcpLabels {
            reporter: "source",
            source_workload: "client".into(),
            source_workload_namespace: "default".into(),
            source_principal: "spiffe://cluster.local/ns/default/sa/client".into(),
            destination_workload: "web".into(),
            destination_workload_namespace: "default".into(),
            destination_service: "web.default.svc.cluster.local".into(),
            destination_principal: "spiffe://cluster.local/ns/default/sa/web".into(),
            connection_security_policy: "mutual_tls",
            response_flags: ResponseFlag::None.as_str(),
        };
        m.tcp_opened.get_or_create(&labels).inc();
        m.tcp_received_bytes.get_or_create(&labels).inc_by(42);
        let text = m.encode();
        assert!(
            text.contains(
                "istio_tcp_connections_opened_total{reporter=\"source\",source_workload=\"client\""
            ),
            "{text}"
        );
        assert!(text.contains("response_flags=\"-\"} 42"), "{text}");
    }
}
