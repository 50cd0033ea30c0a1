//! The node's plain HTTP endpoints: readiness (`:15021/healthz/ready`) and Prometheus
//! metrics (`:15020/metrics`). HTTP/1.1 only, GET only, tiny responses.
//!
//! Any pod can reach them, so they are bounded: a request's headers must arrive within
//! [`HEADER_TIMEOUT`], each connection carries one request (no keep-alive), the whole
//! request is over within [`REQUEST_DEADLINE`], and the two listeners together hold at
//! most [`crate::limits::NODE_LISTENER_CONNS`] connections, [`PER_SOURCE`] per source
//! address; more are closed at once. The data path's fds are budgeted apart.
use std::{
    convert::Infallible,
    net::{IpAddr, SocketAddr},
    sync::{Arc, OnceLock},
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use super::Readiness;
use crate::limits::{ConnLimits, FdBudget, Throttle};

/// Time a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(3);
/// Time a connection may live at all (one small request and its answer).
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(10);
/// Connections from one address to the node listeners together.
pub const PER_SOURCE: usize = 32;

/// The caps shared by both node listeners, sized from the fd limit.
fn limits() -> &'static Arc<ConnLimits<IpAddr>> {
    static LIMITS: OnceLock<Arc<ConnLimits<IpAddr>>> = OnceLock::new();
    LIMITS.get_or_init(|| {
        let budget = FdBudget::for_limit(crate::limits::nofile());
        ConnLimits::new("node listeners", budget.node_listeners, PER_SOURCE)
    })
}

static REFUSED: Throttle = Throttle::new(Duration::from_secs(10));
static ACCEPT_FAILED: Throttle = Throttle::new(Duration::from_secs(10));

type Handler = Arc<dyn Fn(&str) -> (StatusCode, &'static str, String) + Send + Sync>;

async fn serve(listener: TcpListener, handler: Handler) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                if let Some(n) = ACCEPT_FAILED.hit() {
                    warn!(error = %e, times = n, "accept failed; backing off");
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let permit = match limits().try_admit(peer.ip().to_canonical()) {
            Ok(p) => p,
            Err(e) => {
                if let Some(n) = REFUSED.hit() {
                    warn!(%peer, error = %e, times = n, "node listener connections refused");
                }
                drop(stream);
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let svc = service_fn(move |req: Request<Incoming>| {
                let (status, content_type, body) = handler(req.uri().path());
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() = status;
                if let Ok(v) = http::HeaderValue::from_str(content_type) {
                    resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
                }
                async move { Ok::<_, Infallible>(resp) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), svc);
            match tokio::time::timeout(REQUEST_DEADLINE, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(error = %e, "HTTP connection ended with an error"),
                Err(_) => debug!("HTTP connection closed at its deadline"),
            }
        });
    }
}

/// The accept queue of a node listener (the kernel caps it at `net.core.somaxconn`).
/// A pod flooding one of them with connects must not fill the queue faster than the
/// accept loop drains it: a full queue drops SYNs, and the kubelet's probe (1 s
/// timeout by default) would wait out a retransmission. Rust's default is 128.
const NODE_BACKLOG: i32 = 4096;

/// Binds a node listener (readiness, metrics), non-blocking, with [`NODE_BACKLOG`].
pub fn bind_node_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(NODE_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

const TEXT: &str = "text/plain; charset=utf-8";
const NOT_FOUND: (StatusCode, &str, &str) = (StatusCode::NOT_FOUND, TEXT, "not found\n");

/// Serves `GET /healthz/ready` on `listener` (bound by [`bind_node_listener`], or
/// handed over by the previous agent).
pub async fn serve_readiness(
    listener: std::net::TcpListener,
    readiness: Arc<Readiness>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = TcpListener::from_std(listener)?;
    serve(
        listener,
        Arc::new(move |path| match path {
            "/healthz/ready" => match readiness.not_ready_reason() {
                None => (StatusCode::OK, TEXT, "ready\n".to_owned()),
                Some(why) => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("not ready: {why}\n"),
                ),
            },
            _ => (NOT_FOUND.0, NOT_FOUND.1, NOT_FOUND.2.to_owned()),
        }),
    )
    .await;
    Ok(())
}

/// `render` produces the exposition text (refreshing gauges first).
pub async fn serve_metrics(
    listener: TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
) -> std::io::Result<()> {
    serve(
        listener,
        Arc::new(move |path| match path {
            "/metrics" | "/stats/prometheus" => (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                render(),
            ),
            _ => (NOT_FOUND.0, NOT_FOUND.1, NOT_FOUND.2.to_owned()),
        }),
    )
    .await;
    Ok(())
}
