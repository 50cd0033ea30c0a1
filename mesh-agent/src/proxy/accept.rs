//! The accept step every pod listener shares: back off on errors (EMFILE) instead of
//! spinning, and admit a connection only within the pod's and the agent's connection
//! caps. Both are counted and warned about at most once per period, not per event.
use std::{net::SocketAddr, time::Duration};

use tokio::net::{TcpListener, TcpStream};
use tracing::warn;

use super::{PodContext, ProxyContext};
use crate::limits::{ConnPermit, Throttle};

static ACCEPT_FAILED: Throttle = Throttle::new(Duration::from_secs(10));
static OVER_LIMIT: Throttle = Throttle::new(Duration::from_secs(10));

/// Waits for the next connection that may be served. One over a cap is closed at once,
/// after `refused` has seen its peer (the outbound listener consumes the connection's
/// original-destination record there, so that a pod over its cap cannot leave records
/// behind that would crowd out other pods' in the shared map).
pub async fn accept(
    listener: &TcpListener,
    pod: &PodContext,
    ctx: &ProxyContext,
    refused: impl Fn(SocketAddr),
) -> (TcpStream, SocketAddr, ConnPermit<u64>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => match ctx.conns.try_admit(pod.netns_cookie) {
                Ok(permit) => return (stream, peer, permit),
                Err(e) => {
                    if let Some(n) = OVER_LIMIT.hit() {
                        warn!(%peer, reason = e.reason(), error = %e, times = n,
                            "connections refused at the connection cap");
                    }
                    refused(peer);
                    drop(stream);
                }
            },
            Err(e) => {
                if let Some(n) = ACCEPT_FAILED.hit() {
                    warn!(error = %e, times = n, "accept failed; backing off");
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}
