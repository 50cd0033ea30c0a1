//! Why an outbound connection was not carried. Each variant is a reason an operator can
//! act on; the client is reset in every case.
use std::{net::SocketAddr, time::Duration};

use crate::config::NamespacedName;

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error("no original destination recorded for client {client} (not a redirected connection)")]
    NoOriginalDst { client: SocketAddr },
    #[error("{dst} is not a known service (removed from config?)")]
    UnknownService { dst: SocketAddr },
    #[error("service {service} port {port} has no ready endpoints")]
    NoEndpoints { service: NamespacedName, port: u16 },
    #[error("connecting to endpoint {endpoint}: {source}")]
    Connect {
        endpoint: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to endpoint {endpoint}: timed out after {timeout:?}")]
    ConnectTimeout {
        endpoint: SocketAddr,
        timeout: Duration,
    },
}

impl OutboundError {
    /// A short stable label for logs and, later, metrics (`response_flags`).
    pub fn reason(&self) -> &'static str {
        match self {
            OutboundError::NoOriginalDst { .. } => "no_orig_dst",
            OutboundError::UnknownService { .. } => "unknown_service",
            OutboundError::NoEndpoints { .. } => "no_endpoints",
            OutboundError::Connect { .. } => "connect_failed",
            OutboundError::ConnectTimeout { .. } => "connect_timeout",
        }
    }
}
