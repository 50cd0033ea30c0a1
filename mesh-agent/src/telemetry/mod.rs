//! What the agent tells operators: logs (diagnostics and the access log), metrics,
//! readiness, open connections and flow events.
pub mod access;
pub mod conns;
pub mod flows;
mod http;
pub mod kernel_flows;
pub mod kernel_log;
mod log_gate;
mod log_writer;
mod logging;
pub mod map_fill;
pub mod metrics;
mod readiness;
mod request_series;
pub mod requests;

pub use conns::{ConnHandle, ConnInfo, Mode, Outcome, Peer, Reporter, Telemetry, WorkloadRef};
pub use flows::{Flow, FlowFilter, FlowHub, Origin};
pub use http::{bind_node_listener, serve_metrics, serve_readiness};
pub use logging::{AccessLog, LogControl, LogFormat, check_filter, init_logging};
pub use metrics::{Metrics, ResponseFlag};
pub use readiness::Readiness;
pub use requests::{RequestEnd, RequestFacts};
