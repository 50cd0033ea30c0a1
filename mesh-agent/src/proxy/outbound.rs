//! Outbound L4: a connection the kernel redirected from a pod to the agent's listener
//! in that pod is carried to an endpoint of the service the pod dialled.
//!
//! The path of one connection: accept (the listener tells the source pod) -> original
//! destination from the kernel map -> service -> endpoint (round robin) -> dial from the
//! pod's netns with the bypass mark -> copy both ways until both sides have closed.
use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering, time::Instant};

use tokio::{
    io::copy_bidirectional,
    net::{TcpListener, TcpStream},
};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{OutboundError, PodContext, ProxyContext, dial::dial};

pub async fn serve_outbound(listener: TcpListener, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    loop {
        match listener.accept().await {
            Ok((stream, client)) => {
                let id = ctx.next_conn_id.fetch_add(1, Ordering::Relaxed);
                let span = info_span!("conn", id, src = %pod.id, client = %client);
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

async fn handle(
    mut client: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
) {
    let started = Instant::now();
    let (mut upstream, dst, endpoint, service) = match route(&peer, &pod, &ctx).await {
        Ok(r) => r,
        Err(e) => {
            warn!(reason = e.reason(), error = %e, "connection refused; resetting client");
            reset(client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    debug!(%dst, %endpoint, %service, "connected");
    let (sent, received, error) = match copy_bidirectional(&mut client, &mut upstream).await {
        Ok((to_upstream, to_client)) => (to_upstream, to_client, None),
        Err(e) => (0, 0, Some(e)),
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    match error {
        None => info!(%dst, %service, %endpoint, sent, received, duration_ms, "connection closed"),
        Some(e) => {
            info!(%dst, %service, %endpoint, duration_ms, error = %e, "connection closed with error")
        }
    }
}

async fn route(
    peer: &SocketAddr,
    pod: &PodContext,
    ctx: &ProxyContext,
) -> Result<(TcpStream, SocketAddr, SocketAddr, String), OutboundError> {
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
    let upstream = dial(pod, endpoint, ctx.connect_timeout).await?;
    Ok((upstream, dst, endpoint, target.service.to_string()))
}

/// Closes with RST rather than FIN, so the client sees a failed connection, not an
/// empty response.
fn reset(stream: TcpStream) {
    let sock = socket2::SockRef::from(&stream);
    let _ = sock.set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
