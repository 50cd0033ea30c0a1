//! The access log: one line per connection when it closes (or is refused), on the
//! `access` target so it can be switched off or formatted apart from diagnostics
//! (`--access-log`, see `logging.rs`).
use std::time::Duration;

use tracing::info;

use super::conns::{ConnInfo, Outcome, Peer};

/// The target access log events use; `logging.rs` routes it.
pub const TARGET: &str = "access";

fn workload(p: &Peer) -> String {
    p.workload
        .as_ref()
        .map(|w| format!("{}/{}", w.namespace, w.pod))
        .unwrap_or_default()
}

fn addr(p: &Peer) -> String {
    p.addr.map(|a| a.to_string()).unwrap_or_default()
}

fn identity(p: &Peer) -> String {
    p.identity
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default()
}

pub fn log(info: &ConnInfo, outcome: &Outcome, received: u64, sent: u64, duration: Duration) {
    info!(
        target: TARGET,
        id = info.id,
        reporter = info.reporter.as_str(),
        mode = info.mode.as_str(),
        src_workload = workload(&info.source),
        src_addr = addr(&info.source),
        src_identity = identity(&info.source),
        orig_dst = info.original_dst.map(|a| a.to_string()).unwrap_or_default(),
        dst_workload = workload(&info.destination),
        dst_addr = addr(&info.destination),
        dst_service = info.service.as_ref().map(ToString::to_string).unwrap_or_default(),
        dst_identity = identity(&info.destination),
        security = info.mode.security(),
        verdict = outcome.verdict(),
        flags = outcome.flag.as_str(),
        reason = outcome.reason.unwrap_or(""),
        policy = outcome.policy.as_deref().unwrap_or(""),
        error = outcome.detail.as_deref().unwrap_or(""),
        received,
        sent,
        duration_ms = duration.as_millis() as u64,
        "connection closed"
    );
}
