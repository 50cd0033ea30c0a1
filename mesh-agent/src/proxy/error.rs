//! Why a connection was not carried. Each variant is a reason an operator can act on;
//! `reason()` is the short stable label for logs and, later, metrics.
use std::{net::SocketAddr, time::Duration};

use crate::{authz::Decision, config::NamespacedName, identity::Identity};

#[derive(Debug, thiserror::Error)]
pub enum OutboundError {
    #[error(
        "no original destination recorded for client {client} (not a redirected connection, \
         or its record was pushed out of a full orig-dst map)"
    )]
    NoOriginalDst { client: SocketAddr },
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
    #[error("tunnel to {endpoint} ({identity}): {source}")]
    Tunnel {
        endpoint: SocketAddr,
        identity: Identity,
        source: TunnelError,
    },
    #[error("local delivery to {endpoint}: {source}")]
    Local {
        endpoint: SocketAddr,
        source: InboundError,
    },
}

impl OutboundError {
    pub fn reason(&self) -> &'static str {
        match self {
            OutboundError::NoOriginalDst { .. } => "no_orig_dst",
            OutboundError::NoEndpoints { .. } => "no_endpoints",
            OutboundError::Connect { .. } => "connect_failed",
            OutboundError::ConnectTimeout { .. } => "connect_timeout",
            OutboundError::Tunnel { source, .. } => source.reason(),
            OutboundError::Local { source, .. } => source.reason(),
        }
    }
}

/// The client side of the tunnel.
#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("no certificate for the source workload yet")]
    NoCertificate,
    #[error("TLS settings: {0}")]
    Config(#[from] crate::identity::TlsConfigError),
    #[error("connecting: {0}")]
    Connect(std::io::Error),
    #[error("connecting: timed out after {0:?}")]
    ConnectTimeout(Duration),
    #[error("TLS handshake: {0}")]
    Handshake(std::io::Error),
    #[error("HTTP/2: {0}")]
    Http(#[from] hyper::Error),
    #[error("peer answered CONNECT with {0}")]
    Status(http::StatusCode),
    #[error("building the CONNECT request: {0}")]
    Request(http::Error),
    #[error("the peer did not open a stream within {0:?}; its connection takes no new streams")]
    StreamTimeout(Duration),
}

impl TunnelError {
    pub fn reason(&self) -> &'static str {
        match self {
            TunnelError::NoCertificate | TunnelError::Config(_) => "no_certificate",
            TunnelError::Connect(_) => "tunnel_connect_failed",
            TunnelError::ConnectTimeout(_) => "tunnel_connect_timeout",
            TunnelError::Handshake(_) => "tls_handshake_failed",
            TunnelError::Http(_) => "tunnel_protocol_error",
            TunnelError::Status(s) if *s == http::StatusCode::FORBIDDEN => "denied_by_peer",
            TunnelError::Status(_) => "tunnel_refused",
            TunnelError::Request(_) => "tunnel_request_invalid",
            TunnelError::StreamTimeout(_) => "tunnel_stream_timeout",
        }
    }
}

/// The server side: why a connection to a local workload was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("denied by authorization policy: {0}")]
    Denied(Decision),
    #[error("the pod has no IP")]
    NoPodIp,
    #[error("{0}")]
    Limited(crate::limits::LimitError),
    #[error("plaintext from {workload}, a meshed workload: only a bypass of its agent sends that")]
    PlaintextFromMeshed { workload: NamespacedName },
    #[error("connecting to the application at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("connecting to the application at {addr}: timed out")]
    ConnectTimeout { addr: SocketAddr },
}

impl InboundError {
    pub fn reason(&self) -> &'static str {
        match self {
            InboundError::Denied(_) => "denied",
            InboundError::NoPodIp => "no_pod_ip",
            InboundError::Limited(e) => e.reason(),
            InboundError::PlaintextFromMeshed { .. } => "plaintext_from_meshed",
            InboundError::Connect { .. } => "app_connect_failed",
            InboundError::ConnectTimeout { .. } => "app_connect_timeout",
        }
    }

    pub fn status(&self) -> http::StatusCode {
        match self {
            InboundError::Denied(_) | InboundError::PlaintextFromMeshed { .. } => {
                http::StatusCode::FORBIDDEN
            }
            _ => http::StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}
