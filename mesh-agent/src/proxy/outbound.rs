//! Outbound: a connection the kernel redirected from a pod to the agent's listener in
//! that pod is carried to an endpoint of the service the pod dialled.
//!
//! The path of one connection: accept (the listener tells the source pod, hence its
//! identity) -> original destination from the kernel map -> service -> endpoint (round
//! robin) -> one of three ways to the endpoint:
//!   local       the endpoint is a pod of this node: authorized and delivered here;
//!   hbone       a meshed pod on another node: the mTLS tunnel to its `:15008`;
//!   passthrough a workload outside the mesh: a plain connection, as the app asked.
use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering, time::Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info, info_span, warn};

use super::{
    OutboundError, PodContext, ProxyContext,
    deliver::deliver,
    dial::{DialError, dial_from},
    relay::{RelayEnd, relay, reset},
    tunnel,
};
use crate::{authz::ConnAttrs, identity::Identity};

pub async fn serve_outbound(listener: TcpListener, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    loop {
        match listener.accept().await {
            Ok((stream, client)) => {
                let id = ctx.next_conn_id.fetch_add(1, Ordering::Relaxed);
                let span = info_span!("conn", id, src = %pod.workload.id, client = %client);
                tokio::spawn(handle(stream, client, pod.clone(), ctx.clone()).instrument(span));
            }
            Err(e) => {
                // Usually EMFILE/ENFILE: back off instead of spinning; accepted
                // connections keep running.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

/// The upstream side of a connection, however it is reached.
enum Upstream {
    Local {
        app: TcpStream,
        guard: crate::authz::LiveGuard,
        dst_identity: Identity,
    },
    Tunnel {
        stream: tunnel::TunnelStream,
        dst_identity: Identity,
    },
    Passthrough(TcpStream),
}

async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
) {
    let started = Instant::now();
    let (upstream, dst, endpoint, service) = match route(&peer, &pod, &ctx).await {
        Ok(r) => r,
        Err(e) => {
            warn!(reason = e.reason(), error = %e, "connection refused; resetting client");
            reset(client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let never = CancellationToken::new();
    let (mode, dst_identity, result) = match upstream {
        Upstream::Local {
            mut app,
            guard,
            dst_identity,
        } => {
            let r = relay(&mut client, &mut app, &guard.cancelled).await;
            if matches!(r, Err(RelayEnd::Revoked)) {
                reset(app);
            }
            ("local", Some(dst_identity), r)
        }
        Upstream::Tunnel {
            mut stream,
            dst_identity,
        } => {
            let r = relay(&mut client, &mut stream.io, &never).await;
            ("hbone", Some(dst_identity), r)
        }
        Upstream::Passthrough(mut up) => (
            "passthrough",
            None,
            relay(&mut client, &mut up, &never).await,
        ),
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    let src_identity = pod.identity.to_string();
    let dst_identity = dst_identity.map(|i| i.to_string()).unwrap_or_default();
    match result {
        Ok((sent, received)) => info!(
            %dst, %service, %endpoint, mode, src_identity, dst_identity,
            sent, received, duration_ms, "connection closed"
        ),
        Err(e) => {
            // The client must see a failure, not a clean end of stream.
            reset(client);
            info!(%dst, %service, %endpoint, mode, src_identity, dst_identity,
                duration_ms, error = %e, "connection closed with error")
        }
    }
}

async fn route(
    peer: &SocketAddr,
    pod: &PodContext,
    ctx: &ProxyContext,
) -> Result<(Upstream, SocketAddr, SocketAddr, String), OutboundError> {
    let dst = ctx
        .maps
        .take_orig_dst(pod.netns_cookie, *peer)
        .ok_or(OutboundError::NoOriginalDst { client: *peer })?;
    let target = ctx
        .routes
        .load()
        .get(dst)
        .ok_or(OutboundError::UnknownService { dst })?;
    let endpoint = target.pick().ok_or_else(|| OutboundError::NoEndpoints {
        service: target.service.clone(),
        port: target.port,
    })?;
    let upstream = connect(pod, ctx, endpoint).await?;
    Ok((upstream, dst, endpoint, target.service.to_string()))
}

async fn connect(
    pod: &PodContext,
    ctx: &ProxyContext,
    endpoint: SocketAddr,
) -> Result<Upstream, OutboundError> {
    let local = ctx.local.load().get(&endpoint.ip().to_canonical()).cloned();
    if let Some(dest) = local {
        // Same node: the same identity and policy checks as across nodes, without
        // encryption (the bytes never leave the node; see docs/security.md).
        let attrs = ConnAttrs {
            principal: Some(pod.identity.principal()),
            namespace: Some(pod.identity.namespace.clone()),
            source_ip: pod.ip.unwrap_or(endpoint.ip()),
            dest_port: endpoint.port(),
        };
        let delivered = deliver(&dest, ctx, attrs)
            .await
            .map_err(|source| OutboundError::Local { endpoint, source })?;
        return Ok(Upstream::Local {
            app: delivered.app,
            guard: delivered.guard,
            dst_identity: dest.identity.clone(),
        });
    }
    let remote = ctx
        .workloads
        .load()
        .get(endpoint.ip())
        .filter(|w| w.meshed)
        .map(|w| w.identity.clone());
    if let Some(identity) = remote {
        let stream = tunnel::open(pod, ctx, &identity, endpoint)
            .await
            .map_err(|source| OutboundError::Tunnel {
                endpoint,
                identity: identity.clone(),
                source,
            })?;
        return Ok(Upstream::Tunnel {
            stream,
            dst_identity: identity,
        });
    }
    let up = dial_from(&pod.netns, endpoint, ctx.connect_timeout)
        .await
        .map_err(|e| match e {
            DialError::Io(source) => OutboundError::Connect { endpoint, source },
            DialError::Timeout(timeout) => OutboundError::ConnectTimeout { endpoint, timeout },
        })?;
    Ok(Upstream::Passthrough(up))
}
