//! The connect step as a tower `Service`: one request to one endpoint, the way the
//! plan says that endpoint is reached. Everything per request above it (the rule,
//! filters, retries, mirrors, the balancer's choice) is decided before; this only
//! carries the request:
//!
//! - `Local`: delivered to the pod on this node through the destination side
//!   (`inbound::deliver`: the pod's policy, L4 and L7, and the destination's report);
//! - `Hbone`: an HTTP/2 stream on the pooled mTLS tunnel connection to the endpoint's
//!   agent, which does the same there;
//! - `Passthrough`: a plain HTTP connection from the source pod.
use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http::{HeaderValue, Request, Response};

use super::{
    Conn, SVC_HEADER, Wire,
    body::{self, Body},
    errors::Failure,
    inbound::{PodTarget, Sender, deliver},
    upstream::shape,
};
use crate::{
    config::NamespacedName,
    proxy::{Snapshot, plan::Way, tunnel},
    telemetry::Mode,
};

/// One request for one endpoint.
pub struct Dispatch {
    pub endpoint: SocketAddr,
    pub way: Way,
    pub req: Request<Body>,
    /// What the application at the endpoint is to hear.
    pub wire: Wire,
    pub authority: String,
    pub path_and_query: String,
    /// The Service the request was routed to (for the destination's metrics).
    pub service: NamespacedName,
}

/// How telemetry names a way.
pub fn mode_of(way: &Way) -> Mode {
    match way {
        Way::Local(_) => Mode::Local,
        Way::Hbone(_) => Mode::Hbone,
        Way::Passthrough => Mode::Passthrough,
    }
}

/// The connect step of one client connection, at one config snapshot.
#[derive(Clone)]
pub struct Connect {
    pub conn: Arc<Conn>,
    pub snap: Arc<Snapshot>,
}

type Answer = Pin<Box<dyn Future<Output = Result<Response<Body>, Failure>> + Send>>;

impl tower::Service<Dispatch> for Connect {
    type Response = Response<Body>;
    type Error = Failure;
    type Future = Answer;

    /// Always ready: the pools behind it (tunnel connections, app connections) bound
    /// themselves and answer with an error rather than wait.
    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Failure>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, d: Dispatch) -> Answer {
        let (conn, snap) = (self.conn.clone(), self.snap.clone());
        Box::pin(async move { carry(&conn, &snap, d).await })
    }
}

async fn carry(conn: &Conn, snap: &Snapshot, d: Dispatch) -> Result<Response<Body>, Failure> {
    let ctx = &conn.ctx;
    let Dispatch {
        endpoint,
        way,
        mut req,
        wire,
        authority,
        path_and_query,
        service,
    } = d;
    match &way {
        Way::Local(dest) => {
            let from = Sender {
                identity: conn.pod.identity.clone(),
                addr: conn.client,
                workload: Some(conn.pod.workload_ref()),
                mode: Mode::Local,
                service: Some(service),
            };
            let into = PodTarget {
                pod: dest,
                target: endpoint,
                wire,
                authority: &authority,
                path_and_query: &path_and_query,
            };
            Ok(deliver(ctx, snap, from, into, req).await)
        }
        Way::Hbone(identity) => {
            shape(&mut req, Wire::Http2, &authority, &path_and_query);
            if let Ok(v) = HeaderValue::from_str(&service.to_string()) {
                req.headers_mut().insert(SVC_HEADER, v);
            }
            // A denial at the destination comes back as its 403 response.
            tunnel::send_request(&conn.pod, ctx, identity, endpoint, wire, req)
                .await
                .map(|r| r.map(body::incoming))
                .map_err(|e| Failure::Upstream(e.to_string()))
        }
        Way::Passthrough => {
            shape(&mut req, wire, &authority, &path_and_query);
            ctx.app_conns
                .send(
                    &conn.pod.netns,
                    conn.pod.netns_cookie,
                    endpoint,
                    wire,
                    ctx.connect_timeout,
                    req,
                )
                .await
                .map(|r| r.map(body::incoming))
                .map_err(|e| Failure::Upstream(e.to_string()))
        }
    }
}
