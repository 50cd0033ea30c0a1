//! Why a request got no answer from a backend, and the response the client gets
//! instead: an HTTP status, or for gRPC the status as a trailers-only response (HTTP
//! 200 with `grpc-status`), as gRPC clients expect.
use http::{HeaderValue, Response, StatusCode, header};

use super::body::{self, Body};
use crate::telemetry::ResponseFlag;

#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("no route rule matches the request")]
    NotFound,
    #[error("the redirect's Location is not a valid header value")]
    BadRedirect,
    #[error("the rule has no backend with a weight above 0")]
    NoBackend,
    #[error("the backend Service or port does not exist")]
    InvalidBackend,
    #[error("the backend has no ready endpoint")]
    NoEndpoint,
    #[error("denied by authorization policy {0}")]
    Denied(String),
    #[error("timed out")]
    Timeout,
    #[error("upstream failed: {0}")]
    Upstream(String),
}

/// Whether a response is an agent's own 502: the endpoint could not be reached, or
/// reset the request (from this agent's delivery on the same node, or from the
/// destination's agent). The balancer and retries treat it as a connection failure.
pub fn unreachable_endpoint<B>(r: &Response<B>) -> bool {
    r.status() == StatusCode::BAD_GATEWAY && r.headers().contains_key(ERROR_HEADER)
}

/// Marks the answers agents make themselves.
pub const ERROR_HEADER: &str = "x-mesh-error";

impl Failure {
    pub fn status(&self) -> StatusCode {
        match self {
            Failure::BadRequest(_) => StatusCode::BAD_REQUEST,
            Failure::NotFound => StatusCode::NOT_FOUND,
            Failure::BadRedirect | Failure::NoBackend | Failure::InvalidBackend => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
            Failure::NoEndpoint => StatusCode::SERVICE_UNAVAILABLE,
            Failure::Denied(_) => StatusCode::FORBIDDEN,
            Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Failure::Upstream(_) => StatusCode::BAD_GATEWAY,
        }
    }

    /// Envoy's response flag for the failure, as Istio's metrics report it.
    pub fn flag(&self) -> ResponseFlag {
        match self {
            Failure::BadRequest(_) => ResponseFlag::DownstreamProtocolError,
            Failure::NotFound => ResponseFlag::NoRoute,
            Failure::BadRedirect => ResponseFlag::None,
            Failure::NoBackend | Failure::InvalidBackend => ResponseFlag::NoCluster,
            Failure::NoEndpoint => ResponseFlag::NoHealthyUpstream,
            Failure::Denied(_) => ResponseFlag::Unauthorized,
            Failure::Timeout => ResponseFlag::UpstreamTimeout,
            Failure::Upstream(_) => ResponseFlag::UpstreamFailure,
        }
    }

    /// The gRPC status code for the same failure.
    pub fn grpc_status(&self) -> u16 {
        match self {
            Failure::NotFound => 12,                             // UNIMPLEMENTED
            Failure::Denied(_) => 7,                             // PERMISSION_DENIED
            Failure::Timeout => 4,                               // DEADLINE_EXCEEDED
            Failure::BadRedirect | Failure::BadRequest(_) => 13, // INTERNAL
            Failure::NoBackend
            | Failure::InvalidBackend
            | Failure::NoEndpoint
            | Failure::Upstream(_) => 14, // UNAVAILABLE
        }
    }

    pub fn response(&self, grpc: bool) -> Response<Body> {
        let mut r = if grpc {
            let mut r = Response::new(body::empty());
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(self.grpc_status()));
            if let Ok(v) = HeaderValue::from_str(&self.to_string()) {
                h.insert("grpc-message", v);
            }
            r
        } else {
            let mut r = Response::new(body::full(format!("{self}\n")));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            );
            *r.status_mut() = self.status();
            r
        };
        r.headers_mut()
            .insert(ERROR_HEADER, HeaderValue::from_static("1"));
        r
    }
}
