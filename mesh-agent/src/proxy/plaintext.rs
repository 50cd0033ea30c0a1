//! Plaintext from outside the mesh to a PERMISSIVE pod: the kernel (sk_lookup) hands it
//! to this listener, still addressed to the pod IP and application port. It gets the
//! same authorization as tunnelled traffic, without a principal.
use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering};

use tokio::net::TcpStream;
use tracing::{Instrument, info_span, warn};

use super::{
    InboundError, PodContext, ProxyContext,
    deliver::{deliver, outcome_of},
    relay::{RelayEnd, relay, reset},
};
use crate::{
    authz::ConnAttrs,
    telemetry::{ConnInfo, Mode, Outcome, Peer, Reporter, ResponseFlag},
};

pub async fn serve_plaintext(
    listener: super::accept::Listener,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
) {
    loop {
        let (stream, peer, permit) = super::accept::accept(&listener, &pod, &ctx, |_| {}).await;
        let id = ctx.next_conn_id.fetch_add(1, Ordering::Relaxed);
        let span = info_span!("conn", id, dst = %pod.id, peer = %peer, mtls = false);
        let (pod, ctx) = (pod.clone(), ctx.clone());
        let shards = ctx.shards.clone();
        shards.serve(stream, move |stream| {
            async move {
                let _permit = permit;
                handle(id, stream, peer, pod, ctx).await
            }
            .instrument(span)
        });
    }
}

async fn handle(
    id: u64,
    mut client: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
) {
    // sk_assign keeps the packet's destination: this is the address the client dialled.
    let target = match client.local_addr() {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "no local address");
            return;
        }
    };
    let attrs = ConnAttrs {
        principal: None,
        namespace: None,
        source_ip: peer.ip(),
        dest_port: target.port(),
    };
    let source = ctx.snapshot.load().workloads.get(peer.ip()).cloned();
    let info = ConnInfo {
        id,
        reporter: Reporter::Destination,
        mode: Mode::Plaintext,
        source: Peer {
            workload: source.as_ref().map(|w| w.workload_ref()),
            addr: Some(peer),
            identity: None,
        },
        destination: Peer {
            workload: Some(pod.workload_ref()),
            addr: Some(target),
            identity: Some(pod.identity.clone()),
        },
        service: None,
        original_dst: None,
    };
    // A meshed pod's connections all leave through its agent, over mTLS: plaintext
    // from its address can only be a bypass (or a spoof), in every mode. Except to a
    // fail-open Service's endpoint: that is how a client whose node has no agent
    // reaches it (`mesh.dev/fail-open`; a STRICT pod refuses it in the kernel).
    let fail_open = || {
        ctx.snapshot
            .load()
            .routes
            .is_fail_open_endpoint(SocketAddr::new(target.ip().to_canonical(), target.port()))
    };
    if let Some(w) = source.as_ref().filter(|w| w.meshed && !fail_open()) {
        let e = InboundError::PlaintextFromMeshed {
            workload: w.id.clone(),
        };
        warn!(reason = e.reason(), error = %e, "plaintext connection refused");
        ctx.telemetry.refused(&info, &outcome_of(&e));
        reset(client);
        return;
    }
    let delivered = match deliver(&pod, &ctx, &attrs, Some(target)).await {
        Ok(d) => d,
        Err(e) => {
            warn!(reason = e.reason(), error = %e, port = target.port(), "plaintext connection refused");
            ctx.telemetry.refused(&info, &outcome_of(&e));
            reset(client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let conn = ctx.telemetry.open(info);
    let mut app = delivered.app;
    let result = relay(&mut client, &mut app, &delivered.guard.cancelled, &[&conn]).await;
    let outcome = match result {
        Ok(_) => Outcome::ok(),
        Err(RelayEnd::Revoked) => {
            reset(client);
            reset(app);
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
