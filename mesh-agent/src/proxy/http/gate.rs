//! A connection into a pod whose policy can only be decided request by request: its
//! L4 check failed only because of L7 fields (`methods`, `paths`, request headers...)
//! that a connection cannot show, and read the other way they would allow it
//! (`PolicySet::decided_per_request`). Refusing it, as the L4 path must, would block
//! every client of a pod that has, say, a DENY on `POST /admin/*` but no route
//! attached, or that is reached by its pod IP. So when the connection speaks HTTP
//! (detected on its first bytes), the destination agent serves it as HTTP here and
//! checks the policy for each request, exactly as for a routed request
//! (`inbound::deliver`: normalized path, 403 for a denied request, the connection
//! stays open, Istio request metrics as the destination). A connection that is not
//! HTTP is refused, as before.
//!
//! The requests reach the application over the agent's pooled connections to it, as
//! routed requests do. An upgrade (WebSocket) is not carried on such a connection: a
//! client that needs one under an L7 policy goes through a route.
use std::{convert::Infallible, net::SocketAddr, sync::Arc};

use http::{Method, Request};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, warn};

use super::{
    Wire, client_server,
    detect::{Detected, Prefixed, detect},
    errors::Failure,
    inbound::{PodTarget, Sender, deliver, for_delivery},
};
use crate::proxy::{PodContext, ProxyContext};

/// Why a connection was not served request by request.
#[derive(Debug, thiserror::Error)]
#[error("the pod's policy decides request by request and the connection is not HTTP")]
pub struct NotHttp;

/// How a connection ended: served (however it ended), or refused as not HTTP, with
/// the connection handed back so that the caller can reset it.
pub enum Served<IO> {
    Done,
    NotHttp(IO),
}

/// Serves `io`, a connection from `from` to `target` in `pod`, request by request.
/// `permit` is the connection's slot under the pod's connection cap. A connection that
/// is not HTTP is refused and handed back.
pub async fn serve<IO>(
    mut io: IO,
    from: Sender,
    pod: Arc<PodContext>,
    target: SocketAddr,
    ctx: Arc<ProxyContext>,
    permit: crate::limits::ConnPermit<u64>,
) -> Served<IO>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _permit = permit;
    // A server-first port (MySQL, Redis, memcached, SMTP...) is never taken for HTTP:
    // HTTP-shaped bytes sent there would reach a protocol that may act on them.
    if ctx.server_first_ports.contains(&target.port()) {
        warn!(source = %from.identity, port = target.port(), error = %NotHttp, "connection refused (a server-first port)");
        return Served::NotHttp(io);
    }
    let (wire, prefix) = match detect(&mut io, ctx.detect_timeout).await {
        Ok((Detected::Http1, prefix)) => (Wire::Http1, prefix),
        Ok((Detected::Http2, prefix)) => (Wire::Http2, prefix),
        Ok((Detected::Opaque, _)) => {
            warn!(source = %from.identity, port = target.port(), error = %NotHttp, "connection refused");
            return Served::NotHttp(io);
        }
        Err(e) => {
            debug!(error = %e, "connection failed during detection");
            return Served::Done;
        }
    };
    let draining = ctx.draining.clone();
    let service = service_fn(move |req: Request<hyper::body::Incoming>| {
        let (from, pod, ctx) = (from.clone(), pod.clone(), ctx.clone());
        async move {
            // A tunnel inside the connection would carry bytes past the per-request
            // check (upgrades are stripped as hop-by-hop headers, so they reach the
            // application as plain requests).
            if req.method() == Method::CONNECT {
                let f = Failure::BadRequest(
                    "CONNECT on a connection whose policy decides each request".to_owned(),
                );
                return Ok::<_, Infallible>(f.response(false));
            }
            let (req, authority, pq) = for_delivery(req, target);
            let snap = ctx.snapshot.load();
            let into = PodTarget {
                pod: &pod,
                target,
                wire,
                authority: &authority,
                path_and_query: &pq,
            };
            Ok(deliver(&ctx, &snap, from, into, req).await)
        }
    });
    let builder = client_server();
    let served = builder.serve_connection(TokioIo::new(Prefixed::new(prefix, io)), service);
    tokio::pin!(served);
    let result = tokio::select! {
        r = served.as_mut() => r,
        () = draining.cancelled() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "connection served request by request ended with an error");
    }
    Served::Done
}
