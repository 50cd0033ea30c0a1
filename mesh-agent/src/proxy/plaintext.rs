//! Plaintext from outside the mesh to a PERMISSIVE pod: the kernel (sk_lookup) hands it
//! to this listener, still addressed to the pod IP and application port. It gets the
//! same authorization as tunnelled traffic, without a principal.
use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering, time::Instant};

use tokio::net::{TcpListener, TcpStream};
use tracing::{Instrument, info, info_span, warn};

use super::{
    PodContext, ProxyContext,
    deliver::deliver,
    relay::{RelayEnd, relay, reset},
};
use crate::authz::ConnAttrs;

pub async fn serve_plaintext(listener: TcpListener, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let id = ctx.next_conn_id.fetch_add(1, Ordering::Relaxed);
                let span =
                    info_span!("conn", id, dst = %pod.workload.id, peer = %peer, mtls = false);
                tokio::spawn(handle(stream, peer, pod.clone(), ctx.clone()).instrument(span));
            }
            Err(e) => {
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
    // sk_assign keeps the packet's destination: this is the port the client dialled.
    let dest_port = match client.local_addr() {
        Ok(a) => a.port(),
        Err(e) => {
            warn!(error = %e, "no local address");
            return;
        }
    };
    let attrs = ConnAttrs {
        principal: None,
        namespace: None,
        source_ip: peer.ip(),
        dest_port,
    };
    let delivered = match deliver(&pod, &ctx, attrs).await {
        Ok(d) => d,
        Err(e) => {
            warn!(reason = e.reason(), error = %e, port = dest_port, "plaintext connection refused");
            reset(client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let mut app = delivered.app;
    let result = relay(&mut client, &mut app, &delivered.guard.cancelled).await;
    let duration_ms = started.elapsed().as_millis() as u64;
    match result {
        Ok((received, sent)) => info!(
            mtls = false,
            port = dest_port,
            received,
            sent,
            duration_ms,
            "plaintext connection closed"
        ),
        Err(RelayEnd::Revoked) => {
            reset(client);
            reset(app);
            info!(duration_ms, "plaintext connection closed by policy");
        }
        Err(e) => info!(duration_ms, error = %e, "plaintext connection closed with error"),
    }
}
