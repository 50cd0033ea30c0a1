//! The tunnel's server side: `:15008` in each enrolled pod. mTLS (TLS 1.3, the pod's
//! own identity, a client certificate from the trust bundle), then HTTP/2, where each
//! CONNECT stream is one connection to the pod's application.
use std::{convert::Infallible, net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_common::MESH_PORTS;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;
use tracing::{Instrument, debug, info_span, warn};

use super::{
    PodContext, ProxyContext,
    deliver::{deliver, per_request},
    http::{
        body::{self, Body},
        gate,
        inbound::Sender,
    },
    relay::{RelayEnd, relay},
    tunnel::{
        CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT,
        MAX_FRAME_SIZE, STREAM_WINDOW, ServedStream, TLS_READ_BUFFER,
    },
};
use crate::{
    authz::ConnAttrs,
    identity::{Identity, peer_identity},
    telemetry::{ConnInfo, Mode, Outcome, Peer, Reporter, ResponseFlag},
};

/// Concurrent CONNECT streams one client connection may hold (the client side opens
/// another pooled connection past its own limit of 100 by default).
pub const MAX_STREAMS: u32 = 256;

static HANDSHAKE_FAILED: crate::limits::Throttle =
    crate::limits::Throttle::new(std::time::Duration::from_secs(10));
static FOREIGN_DOMAIN: crate::limits::Throttle =
    crate::limits::Throttle::new(std::time::Duration::from_secs(10));
static PER_SOURCE_REFUSED: crate::limits::Throttle =
    crate::limits::Throttle::new(std::time::Duration::from_secs(10));
static HANDSHAKE_TIMED_OUT: crate::limits::Throttle =
    crate::limits::Throttle::new(std::time::Duration::from_secs(10));

pub async fn serve_tunnel(
    listener: super::accept::Listener,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
) {
    loop {
        let (stream, peer, permit) = super::accept::accept(&listener, &pod, &ctx, |_| {}).await;
        let id = ctx.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("tunnel_in", id, dst = %pod.id, peer = %peer);
        let source_permit = match pod.tunnel_peers.try_admit(peer.ip().to_canonical()) {
            Ok(p) => p,
            Err(e) => {
                if let Some(n) = PER_SOURCE_REFUSED.hit() {
                    span.in_scope(|| warn!(error = %e, times = n, "tunnel connections refused"));
                }
                continue;
            }
        };
        // Until the pod's first certificate and trust bundle arrive there is
        // nothing to present: the connection is closed (the peer retries).
        let acceptor = match pod.tls_server(&ctx.secrets) {
            Ok(c) => TlsAcceptor::from(c),
            Err(e) => {
                span.in_scope(|| debug!(error = %e, "no TLS identity yet; closing"));
                continue;
            }
        };
        let (pod, ctx) = (pod.clone(), ctx.clone());
        let shards = ctx.shards.clone();
        shards.serve(stream, move |stream| {
            async move {
                let _permits = (permit, source_permit);
                handle(stream, peer, acceptor, pod, ctx).await
            }
            .instrument(span)
        });
    }
}

async fn handle(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
) {
    let _ = stream.set_nodelay(true);
    let stream = tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, stream);
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            if let Some(n) = HANDSHAKE_FAILED.hit() {
                warn!(error = %e, times = n, "TLS handshakes refused");
            }
            return;
        }
        Err(_) => {
            if let Some(n) = HANDSHAKE_TIMED_OUT.hit() {
                warn!(times = n, "TLS handshakes timed out");
            }
            return;
        }
    };
    let source = match tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .map(peer_identity)
    {
        Some(Ok(id)) => id,
        // The verifier already required one; this is defence in depth.
        _ => {
            warn!("peer presented no workload identity");
            return;
        }
    };
    // The bundle may hold roots shared with other SPIFFE trust domains: only this
    // mesh's own domain is a workload here (policy matches namespaces within it).
    if source.trust_domain != pod.identity.trust_domain {
        if let Some(n) = FOREIGN_DOMAIN.hit() {
            warn!(source = %source, times = n, "peer from another trust domain refused");
        }
        return;
    }
    debug!(source = %source, "mTLS established");
    let draining = ctx.draining.clone();
    let service = service_fn(move |req| {
        let (pod, ctx, source) = (pod.clone(), ctx.clone(), source.clone());
        async move { Ok::<_, Infallible>(connect(req, peer, source, pod, ctx).await) }
    });
    let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .max_concurrent_streams(MAX_STREAMS)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        .serve_connection(TokioIo::new(tls), service);
    tokio::pin!(served);
    // Draining (a successor took over): GOAWAY, so the peer agent opens its next
    // streams on a new connection, to the successor; the streams open here go on.
    let result = tokio::select! {
        r = served.as_mut() => r,
        () = draining.cancelled() => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = result {
        debug!(error = %e, "tunnel connection ended with an error");
    }
}

fn status(code: StatusCode) -> Response<Body> {
    let mut r = Response::new(body::empty());
    *r.status_mut() = code;
    r
}

/// Why a CONNECT target is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectRefusal {
    /// Not an `ip:port` of this pod: the tunnel is not a way to reach anything else
    /// from the node.
    NotThisPod,
    /// One of the mesh's own ports: a CONNECT to :15008 would nest tunnels and make
    /// the inner stream come from the pod itself.
    MeshPort(u16),
}

/// The address a CONNECT's authority names, if the pod at `pod_ips` may be reached
/// there.
pub fn connect_target(
    authority: Option<&str>,
    pod_ips: &[std::net::IpAddr],
) -> Result<SocketAddr, ConnectRefusal> {
    let target: SocketAddr = authority
        .and_then(|a| a.parse().ok())
        .ok_or(ConnectRefusal::NotThisPod)?;
    if !pod_ips.contains(&target.ip().to_canonical()) {
        return Err(ConnectRefusal::NotThisPod);
    }
    if MESH_PORTS.contains(&target.port()) {
        return Err(ConnectRefusal::MeshPort(target.port()));
    }
    Ok(target)
}

/// One CONNECT stream: check the target is this pod, authorize, connect to the app,
/// answer 200, then relay once the stream is upgraded.
async fn connect(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    source: Identity,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
) -> Response<Body> {
    if req.method() != Method::CONNECT {
        // A routed request (L7 between agents), not a tunnelled connection.
        return super::http::inbound::serve_request(req, peer, &source, &pod, &ctx).await;
    }
    let target = match connect_target(req.uri().authority().map(|a| a.as_str()), &pod.ips) {
        Ok(t) => t,
        Err(ConnectRefusal::NotThisPod) => {
            warn!(authority = ?req.uri().authority(), "CONNECT target is not this pod");
            return status(StatusCode::BAD_REQUEST);
        }
        Err(ConnectRefusal::MeshPort(port)) => {
            warn!(port, "CONNECT to one of the mesh's own ports refused");
            return status(StatusCode::FORBIDDEN);
        }
    };
    let id = ctx.next_conn_id.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("conn", id, src = %source, peer = %peer, dst = %pod.identity, port = target.port());
    let attrs = ConnAttrs {
        principal: Some(source.principal()),
        namespace: Some(source.namespace.clone()),
        source_ip: peer.ip(),
        dest_port: target.port(),
    };
    let info = ConnInfo {
        id,
        reporter: Reporter::Destination,
        mode: Mode::Inbound,
        source: Peer {
            workload: ctx
                .snapshot
                .load()
                .workloads
                .get(peer.ip())
                .map(|w| w.workload_ref()),
            addr: Some(peer),
            identity: Some(source.clone()),
        },
        destination: Peer {
            workload: Some(pod.workload_ref()),
            addr: Some(target),
            identity: Some(pod.identity.clone()),
        },
        service: None,
        original_dst: None,
    };
    let delivered = match deliver(&pod, &ctx, &attrs, Some(target))
        .instrument(span.clone())
        .await
    {
        Ok(d) => d,
        Err(e) if let Some(permit) = per_request(&pod, &ctx, &attrs, &e) => {
            span.in_scope(|| debug!("the pod's policy decides request by request"));
            let from = Sender {
                identity: source,
                addr: peer,
                workload: info.source.workload,
                mode: Mode::Inbound,
                service: None,
            };
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(
                async move {
                    match on_upgrade.await {
                        Ok(u) => {
                            let stream = ServedStream(TokioIo::new(u));
                            // Not HTTP: the stream ends without a byte from the app.
                            let _ = gate::serve(stream, from, pod, target, ctx, permit).await;
                        }
                        Err(e) => warn!(error = %e, "CONNECT stream was not upgraded"),
                    }
                }
                .instrument(span),
            );
            return status(StatusCode::OK);
        }
        Err(e) => {
            span.in_scope(|| warn!(reason = e.reason(), error = %e, "inbound connection refused"));
            ctx.telemetry
                .refused(&info, &super::deliver::outcome_of(&e));
            return status(e.status());
        }
    };
    let on_upgrade = hyper::upgrade::on(&mut req);
    let conn = ctx.telemetry.open(info);
    tokio::spawn(
        async move {
            let mut app = delivered.app;
            let mut stream = match on_upgrade.await {
                Ok(u) => ServedStream(TokioIo::new(u)),
                Err(e) => {
                    warn!(error = %e, "CONNECT stream was not upgraded");
                    conn.close(Outcome::failed(
                        ResponseFlag::ConnectionTermination,
                        "not_upgraded",
                        e,
                    ));
                    return;
                }
            };
            let result = relay(&mut stream, &mut app, &delivered.guard.cancelled, &[&conn]).await;
            let outcome = match result {
                Ok(_) => Outcome::ok(),
                Err(RelayEnd::Revoked) => {
                    super::relay::reset(app);
                    Outcome {
                        flag: ResponseFlag::Unauthorized,
                        reason: Some("revoked"),
                        detail: Some("closed by a policy change".to_owned()),
                        policy: None,
                    }
                }
                Err(e) => Outcome::failed(ResponseFlag::ConnectionTermination, "io_error", e),
            };
            conn.close(outcome);
        }
        .instrument(span),
    );
    status(StatusCode::OK)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    /// hyper spawns this future for every stream the tunnel server accepts: every
    /// routed request and every tunnelled connection.
    #[test]
    fn a_streams_future_holds_no_rare_step_inline() {
        let size = crate::proxy::future_size::of5(&connect);
        // 4,768 bytes when the app connection's dial was boxed (5,672 before): a
        // budget, not a target.
        assert!(size <= 5 * 1024, "a tunnel stream's future is {size} bytes");
    }

    #[test]
    fn a_connect_reaches_only_this_pods_addresses_and_never_a_mesh_port() {
        let ips = [
            IpAddr::from([10, 244, 1, 5]),
            "fd00::5".parse::<IpAddr>().unwrap(),
        ];
        assert_eq!(
            connect_target(Some("10.244.1.5:8080"), &ips),
            Ok("10.244.1.5:8080".parse().unwrap())
        );
        assert!(connect_target(Some("[fd00::5]:8080"), &ips).is_ok());
        // An IPv4-mapped IPv6 form of the pod's address is the pod's address.
        assert!(connect_target(Some("[::ffff:10.244.1.5]:8080"), &ips).is_ok());
        for other in [
            "10.244.1.6:8080",
            "127.0.0.1:8080",
            "pod:8080",
            "10.244.1.5",
            "",
        ] {
            assert_eq!(
                connect_target(Some(other), &ips),
                Err(ConnectRefusal::NotThisPod),
                "{other}"
            );
        }
        assert_eq!(connect_target(None, &ips), Err(ConnectRefusal::NotThisPod));
        assert_eq!(
            connect_target(Some("10.244.1.5:15008"), &ips),
            Err(ConnectRefusal::MeshPort(15008))
        );
    }
}
