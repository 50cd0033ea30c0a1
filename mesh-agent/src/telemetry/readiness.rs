//! `GET /healthz/ready` on the node: 200 only when the programs are attached, a config
//! has been loaded and every local pod of it is enrolled; 503 (with the reason) before.
use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Incoming, server::conn::http1, service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{debug, warn};

#[derive(Debug, Default)]
pub struct Readiness {
    pub programs_attached: AtomicBool,
    pub config_loaded: AtomicBool,
    pub pods_enrolled: AtomicBool,
}

impl Readiness {
    /// `None` when ready, else what is missing.
    pub fn not_ready_reason(&self) -> Option<&'static str> {
        if !self.programs_attached.load(Ordering::Relaxed) {
            Some("eBPF programs not attached")
        } else if !self.config_loaded.load(Ordering::Relaxed) {
            Some("no valid config loaded")
        } else if !self.pods_enrolled.load(Ordering::Relaxed) {
            Some("local pods not all enrolled")
        } else {
            None
        }
    }
}

pub async fn serve_readiness(addr: SocketAddr, readiness: Arc<Readiness>) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "readiness accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let readiness = readiness.clone();
                async move { Ok::<_, Infallible>(respond(&req, &readiness)) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(error = %e, "readiness connection ended with an error");
            }
        });
    }
}

fn respond(req: &Request<Incoming>, readiness: &Readiness) -> Response<Full<Bytes>> {
    let (status, body) = match req.uri().path() {
        "/healthz/ready" => match readiness.not_ready_reason() {
            None => (StatusCode::OK, "ready\n".to_owned()),
            Some(why) => (
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: {why}\n"),
            ),
        },
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp
}
