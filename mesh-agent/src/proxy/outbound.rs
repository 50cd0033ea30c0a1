//! Outbound: a connection the kernel redirected from a pod to the agent's listener in
//! that pod is carried to an endpoint of the service the pod dialled.
//!
//! The kernel captures every TCP connection of the pod, so the original destination
//! can be anything. The path of one connection: accept (the listener tells the source
//! pod, hence its identity) -> original destination from the kernel map -> a ClusterIP
//! is a service, whose endpoint is picked (round robin); any other address is its own
//! endpoint (a pod IP, or something outside the mesh) -> one of three ways to it:
//!   local       the endpoint is a pod of this node: authorized and delivered here;
//!   hbone       a meshed pod on another node: the mTLS tunnel to its `:15008`;
//!   passthrough a workload outside the mesh: a plain connection, as the app asked.
use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use super::{
    InboundError, OutboundError, PodContext, ProxyContext, TunnelError,
    deliver::deliver,
    dial::{DialError, dial_from},
    podhop::PodHop,
    relay::{RelayEnd, relay, reset},
    tunnel,
};
use crate::{
    authz::ConnAttrs,
    telemetry::{ConnHandle, ConnInfo, Mode, Outcome, Peer, Reporter, ResponseFlag},
};

pub async fn serve_outbound(listener: TcpListener, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    loop {
        let (stream, client, permit) = super::accept::accept(&listener, &pod, &ctx).await;
        let id = ctx.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", id, src = %pod.id, client = %client);
        let (pod, ctx) = (pod.clone(), ctx.clone());
        tokio::spawn(
            async move {
                let _permit = permit;
                handle(id, stream, client, pod, ctx).await
            }
            .instrument(span),
        );
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
}

async fn handle(
    id: u64,
    client: TcpStream,
    peer: SocketAddr,
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
    let mut dest_view = None;
    let upstream = match route(&peer, &pod, &ctx, &mut info, &mut dest_view).await {
        Ok(u) => u,
        Err(e) => {
            warn!(reason = e.reason(), error = %e, "connection refused; resetting client");
            let (outcome, deciding) = outcome_of(&e);
            ctx.telemetry.refused(&info, &outcome);
            if let Some(mut dest) = dest_view {
                dest.mode = Mode::Local;
                let mut o = outcome.clone();
                o.policy = deciding;
                ctx.telemetry.refused(&dest, &o);
            }
            reset(client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let mut client = PodHop::new(client, pod.netns_cookie, &ctx.maps);
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
        reset(client);
    }
    if let Some(d) = dest_conn {
        d.close(outcome.clone());
    }
    conn.close(outcome);
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

async fn route(
    peer: &SocketAddr,
    pod: &PodContext,
    ctx: &ProxyContext,
    info: &mut ConnInfo,
    dest_view: &mut Option<ConnInfo>,
) -> Result<Upstream, OutboundError> {
    let dst = ctx
        .maps
        .take_orig_dst(pod.netns_cookie, *peer)
        .ok_or(OutboundError::NoOriginalDst { client: *peer })?;
    info.original_dst = Some(dst);
    let target = ctx.routes.load().get(dst);
    let endpoint = match target {
        Some(target) => {
            info.service = Some(target.service.clone());
            target.pick().ok_or_else(|| OutboundError::NoEndpoints {
                service: target.service.clone(),
                port: target.port,
            })?
        }
        // Not a ClusterIP: the address is the endpoint. A meshed pod's IP takes the
        // same path as a service endpoint of that pod (local delivery or the tunnel,
        // with both identities and the destination's policy), without a service.
        None => dst,
    };
    info.destination.addr = Some(endpoint);
    if let Some(w) = ctx.workloads.load().get(endpoint.ip()) {
        info.destination.workload = Some(w.workload_ref());
        if w.meshed {
            info.destination.identity = Some(w.identity.clone());
        }
    }
    connect(pod, ctx, endpoint, info, dest_view).await
}

async fn connect(
    pod: &PodContext,
    ctx: &ProxyContext,
    endpoint: SocketAddr,
    info: &mut ConnInfo,
    dest_view: &mut Option<ConnInfo>,
) -> Result<Upstream, OutboundError> {
    let local = ctx.local.load().get(&endpoint.ip().to_canonical()).cloned();
    if let Some(dest) = local {
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
        let delivered = deliver(&dest, ctx, attrs, Some(endpoint))
            .await
            .map_err(|source| OutboundError::Local { endpoint, source })?;
        return Ok(Upstream::Local {
            app: delivered.app,
            guard: delivered.guard,
            _permit: delivered._permit,
        });
    }
    let remote = ctx
        .workloads
        .load()
        .get(endpoint.ip())
        .filter(|w| w.meshed)
        .map(|w| w.identity.clone());
    if let Some(identity) = remote {
        info.mode = Mode::Hbone;
        let stream = tunnel::open(pod, ctx, &identity, endpoint)
            .await
            .map_err(|source| OutboundError::Tunnel {
                endpoint,
                identity: identity.clone(),
                source,
            })?;
        return Ok(Upstream::Tunnel(stream));
    }
    info.mode = Mode::Passthrough;
    let up = dial_from(&pod.netns, endpoint, ctx.connect_timeout)
        .await
        .map_err(|e| match e {
            DialError::Io(source) => OutboundError::Connect { endpoint, source },
            DialError::Timeout(timeout) => OutboundError::ConnectTimeout { endpoint, timeout },
        })?;
    Ok(Upstream::Passthrough(up))
}
