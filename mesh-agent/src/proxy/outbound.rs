//! Outbound: a connection the kernel redirected from a pod to the agent's listener in
//! that pod is carried to an endpoint of the service the pod dialled.
//!
//! The kernel captures every TCP connection of the pod, so the original destination
//! can be anything. The path of one connection: accept (the listener tells the source
//! pod, hence its identity) -> original destination from the kernel map -> `plan()`:
//! a ClusterIP with routes attached is HTTP (`http/`, routed per request, after
//! protocol detection when the port does not declare it); another ClusterIP is a
//! service, whose endpoint is picked (round robin); any other address is its own
//! endpoint (a pod IP, or something outside the mesh) -> one of three ways to it:
//!   local       the endpoint is a pod of this node: authorized and delivered here;
//!   hbone       a meshed pod on another node: the mTLS tunnel to its `:15008`;
//!   passthrough a workload outside the mesh: a plain connection, as the app asked.
use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use bytes::Bytes;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use super::{
    InboundError, OutboundError, PodContext, ProxyContext, TunnelError,
    deliver::{deliver, per_request},
    dial::{DialError, dial_from},
    http::{
        detect::{Detected, Prefixed, detect},
        gate,
        inbound::Sender,
    },
    plan::{Hop, Plan, TcpPlan, Way, plan},
    podhop::PodHop,
    relay::{RelayEnd, relay, reset},
    tunnel,
};
use crate::state::PortProtocol;
use crate::{
    authz::ConnAttrs,
    telemetry::{ConnHandle, ConnInfo, Mode, Outcome, Peer, Reporter, ResponseFlag},
};

pub async fn serve_outbound(
    listener: super::accept::Listener,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
) {
    // Bound to one loopback address: every accepted connection's own address.
    let local = listener.local_addr().ok();
    loop {
        let (stream, client, permit) = super::accept::accept(&listener, &pod, &ctx, |peer| {
            let _ = ctx.maps.take_orig_dst(pod.netns_cookie, peer);
        })
        .await;
        let id = ctx.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", id, src = %pod.id, client = %client);
        let (pod, ctx) = (pod.clone(), ctx.clone());
        let shards = ctx.shards.clone();
        shards.serve(stream, move |stream| {
            async move {
                let _permit = permit;
                handle(id, stream, (local, client), pod, ctx).await
            }
            .instrument(span)
        });
    }
}

/// The upstream side of a connection, however it is reached.
enum Upstream {
    Local {
        app: PodHop,
        guard: crate::authz::LiveGuard,
        _permit: crate::limits::ConnPermit<u64>,
    },
    Tunnel(tunnel::TunnelStream),
    Passthrough(TcpStream),
    /// A pod of this node whose policy decides each request (`http::gate`).
    PerRequest {
        dest: Arc<PodContext>,
        permit: crate::limits::ConnPermit<u64>,
    },
}

/// `addrs`: the accepted connection's own address (when known) and its peer's.
async fn handle(
    id: u64,
    client: TcpStream,
    (local, peer): (Option<SocketAddr>, SocketAddr),
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
) {
    // The client dialled through loopback (the redirect); its real address is the pod's.
    let src_addr = SocketAddr::new(pod.ip.unwrap_or(peer.ip()), peer.port());
    let mut info = ConnInfo {
        id,
        reporter: Reporter::Source,
        mode: Mode::Passthrough,
        source: Peer {
            workload: Some(pod.workload_ref()),
            addr: Some(src_addr),
            identity: Some(pod.identity.clone()),
        },
        destination: Peer::default(),
        service: None,
        original_dst: None,
    };
    let planned = match ctx.maps.take_orig_dst(pod.netns_cookie, peer) {
        Some(dst) => {
            info.original_dst = Some(dst);
            // One snapshot for the whole decision.
            let snap = ctx.snapshot.load();
            plan(&snap, &pod, dst).map(|p| (p, snap, dst))
        }
        None => Err(OutboundError::NoOriginalDst { client: peer }),
    };
    let (planned, _snap, dst) = match planned {
        Ok(p) => p,
        Err(e) => return refuse(&ctx, &info, None, client, e),
    };
    let _ = client.set_nodelay(true);
    let mut client = PodHop::new(client, pod.netns_cookie, &ctx.maps).with_addrs(local, Some(peer));
    let (tcp, prefix) = match planned {
        Plan::Tcp(t) => (t, Bytes::new()),
        Plan::Http(h) => {
            let (l7, prefix) = match h.routes.protocol {
                PortProtocol::Http | PortProtocol::Http2 => (true, Bytes::new()),
                PortProtocol::Opaque => (false, Bytes::new()),
                PortProtocol::Detect => match detect(&mut client, ctx.detect_timeout).await {
                    Ok((Detected::Opaque, prefix)) => {
                        debug!(read = prefix.len(), "detected: not HTTP, carried as TCP");
                        (false, prefix)
                    }
                    Ok((d, prefix)) => {
                        debug!(detected = ?d, "detected HTTP");
                        (true, prefix)
                    }
                    Err(e) => {
                        debug!(error = %e, "client connection failed during detection");
                        return;
                    }
                },
            };
            if l7 {
                let io = Prefixed::new(prefix, client);
                super::http::serve(io, h, dst, src_addr, pod, ctx, id).await;
                return;
            }
            // Not HTTP after all: the Service's endpoints, per connection.
            let Some(hop) = h.fallback else {
                let e = OutboundError::NoEndpoints {
                    service: h.service.clone(),
                    port: h.port,
                };
                return refuse(&ctx, &info, None, client.into(), e);
            };
            let t = TcpPlan {
                service: Some((h.service, h.port)),
                hop,
            };
            (t, prefix)
        }
    };
    info.service = tcp.service.as_ref().map(|(s, _)| s.clone());
    info.destination.addr = Some(tcp.hop.endpoint);
    if let Some(w) = &tcp.hop.workload {
        info.destination.workload = Some(w.workload_ref());
        if w.meshed {
            info.destination.identity = Some(w.identity.clone());
        }
    }
    let mut dest_view = None;
    let upstream = match connect(&pod, &ctx, &tcp.hop, &mut info, &mut dest_view).await {
        Ok(u) => u,
        Err(e) => return refuse(&ctx, &info, dest_view, client.into(), e),
    };
    let mut client = Prefixed::new(prefix, client);
    let conn = ctx.telemetry.open(info);
    let never = CancellationToken::new();
    let (result, dest_conn) = match upstream {
        Upstream::Local {
            mut app,
            guard,
            _permit,
        } => {
            // Same node: the destination's view is reported here too.
            let dest = dest_view.map(|d| ctx.telemetry.open(d));
            let views: Vec<&ConnHandle> = std::iter::once(&conn).chain(dest.as_ref()).collect();
            let r = relay(&mut client, &mut app, &guard.cancelled, &views).await;
            if matches!(r, Err(RelayEnd::Revoked)) {
                reset(app);
            }
            (r, dest)
        }
        Upstream::Tunnel(mut stream) => (
            relay(&mut client, &mut stream.io, &never, &[&conn]).await,
            None,
        ),
        Upstream::Passthrough(mut up) => {
            (relay(&mut client, &mut up, &never, &[&conn]).await, None)
        }
        Upstream::PerRequest { dest, permit } => {
            // Same node: the destination's view is its requests, which the gate
            // reports one by one.
            let from = Sender {
                identity: pod.identity.clone(),
                addr: src_addr,
                workload: Some(pod.workload_ref()),
                mode: Mode::Local,
                service: tcp.service.map(|(s, _)| s),
            };
            let endpoint = tcp.hop.endpoint;
            let served = gate::serve(client, from, dest, endpoint, ctx.clone(), permit).await;
            let outcome = match served {
                gate::Served::Done => Outcome::ok(),
                gate::Served::NotHttp(client) => {
                    let (_, hop) = client.into_parts();
                    reset(hop);
                    Outcome::failed(ResponseFlag::Unauthorized, "not_http", gate::NotHttp)
                }
            };
            conn.close(outcome);
            return;
        }
    };
    let outcome = match &result {
        Ok(_) => Outcome::ok(),
        Err(RelayEnd::Revoked) => Outcome {
            flag: ResponseFlag::Unauthorized,
            reason: Some("revoked"),
            detail: Some("closed by a policy change".to_owned()),
            policy: None,
        },
        Err(e) => Outcome::failed(ResponseFlag::ConnectionTermination, "io_error", e),
    };
    if result.is_err() {
        // The client must see a failure, not a clean end of stream.
        let (_, hop) = client.into_parts();
        reset(hop);
    }
    if let Some(d) = dest_conn {
        d.close(outcome.clone());
    }
    conn.close(outcome);
}

/// Reports a refused connection (by the source and, same-node, the destination
/// view) and resets the client.
fn refuse(
    ctx: &ProxyContext,
    info: &ConnInfo,
    dest_view: Option<ConnInfo>,
    client: TcpStream,
    e: OutboundError,
) {
    warn!(reason = e.reason(), error = %e, "connection refused; resetting client");
    let (outcome, deciding) = outcome_of(&e);
    ctx.telemetry.refused(info, &outcome);
    if let Some(mut dest) = dest_view {
        dest.mode = Mode::Local;
        let mut o = outcome.clone();
        o.policy = deciding;
        ctx.telemetry.refused(&dest, &o);
    }
    reset(client);
}

/// The response flag and reason of a refusal, and the deciding policy when a local
/// policy denied it (reported by the destination view).
fn outcome_of(e: &OutboundError) -> (Outcome, Option<String>) {
    let flag = match e {
        OutboundError::NoOriginalDst { .. } => ResponseFlag::NoRoute,
        OutboundError::NoEndpoints { .. } => ResponseFlag::NoHealthyUpstream,
        OutboundError::Tunnel {
            source: TunnelError::Status(s),
            ..
        } if *s == http::StatusCode::FORBIDDEN => ResponseFlag::Unauthorized,
        OutboundError::Local {
            source: InboundError::Denied(_),
            ..
        } => ResponseFlag::Unauthorized,
        _ => ResponseFlag::UpstreamFailure,
    };
    let deciding = match e {
        OutboundError::Local {
            source: InboundError::Denied(d),
            ..
        } => Some(super::deciding_policy(d)),
        _ => None,
    };
    (Outcome::failed(flag, e.reason(), e), deciding)
}

async fn connect(
    pod: &PodContext,
    ctx: &ProxyContext,
    hop: &Hop,
    info: &mut ConnInfo,
    dest_view: &mut Option<ConnInfo>,
) -> Result<Upstream, OutboundError> {
    let endpoint = hop.endpoint;
    match &hop.way {
        Way::Local(dest) => {
            // Same node: the same identity and policy checks as across nodes, without
            // encryption (the bytes never leave the node; see docs/security.md).
            info.mode = Mode::Local;
            info.destination.identity = Some(dest.identity.clone());
            *dest_view = Some(ConnInfo {
                reporter: Reporter::Destination,
                ..info.clone()
            });
            let attrs = ConnAttrs {
                principal: Some(pod.identity.principal()),
                namespace: Some(pod.identity.namespace.clone()),
                source_ip: pod.ip.unwrap_or(endpoint.ip()),
                dest_port: endpoint.port(),
            };
            let delivered = match deliver(dest, ctx, &attrs, Some(endpoint)).await {
                Ok(d) => d,
                Err(e) => {
                    return match per_request(dest, ctx, &attrs, &e) {
                        Some(permit) => Ok(Upstream::PerRequest {
                            dest: dest.clone(),
                            permit,
                        }),
                        None => Err(OutboundError::Local {
                            endpoint,
                            source: e,
                        }),
                    };
                }
            };
            Ok(Upstream::Local {
                app: delivered.app,
                guard: delivered.guard,
                _permit: delivered._permit,
            })
        }
        Way::Hbone(identity) => {
            info.mode = Mode::Hbone;
            let stream = tunnel::open(pod, ctx, identity, endpoint)
                .await
                .map_err(|source| OutboundError::Tunnel {
                    endpoint,
                    identity: identity.clone(),
                    source,
                })?;
            Ok(Upstream::Tunnel(stream))
        }
        Way::Passthrough => {
            info.mode = Mode::Passthrough;
            let up = dial_from(&pod.netns, endpoint, ctx.connect_timeout)
                .await
                .map_err(|e| match e {
                    DialError::Io(source) => OutboundError::Connect { endpoint, source },
                    DialError::Timeout(timeout) => {
                        OutboundError::ConnectTimeout { endpoint, timeout }
                    }
                })?;
            Ok(Upstream::Passthrough(up))
        }
    }
}
