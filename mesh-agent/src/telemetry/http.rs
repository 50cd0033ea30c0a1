//! The node's plain HTTP endpoints: readiness (`:15021/healthz/ready`) and Prometheus
//! metrics (`:15020/metrics`). HTTP/1.1 only, GET only, tiny responses.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, warn};

use super::Readiness;

type Handler = Arc<dyn Fn(&str) -> (StatusCode, &'static str, String) + Send + Sync>;

async fn serve(listener: TcpListener, handler: Handler) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let handler = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (status, content_type, body) = handler(req.uri().path());
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() = status;
                if let Ok(v) = http::HeaderValue::from_str(content_type) {
                    resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
                }
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

const TEXT: &str = "text/plain; charset=utf-8";
const NOT_FOUND: (StatusCode, &str, &str) = (StatusCode::NOT_FOUND, TEXT, "not found\n");

pub async fn serve_readiness(addr: SocketAddr, readiness: Arc<Readiness>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
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
