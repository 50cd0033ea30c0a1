//! Plain HTTP connections the agent keeps to applications: from a destination pod's
//! namespace to its own app (delivery), or from a source pod's namespace to a server
//! outside the mesh (passthrough). HTTP/1.1 connections are reused one request at a
//! time; an HTTP/2 connection carries every request to its address at once.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hyper::{
    Request, Response,
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tracing::{Instrument, debug, debug_span};

use super::body::Body;
use crate::{
    inpod::Netns,
    proxy::dial::{DialError, dial_from},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Wire {
    Http1,
    Http2,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    netns_cookie: u64,
    addr: SocketAddr,
    wire: Wire,
    /// Each worker thread keeps its own connections (see `shards`).
    shard: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error("connecting to {addr}: {source}")]
    Connect { addr: SocketAddr, source: DialError },
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

impl SendError {
    /// A request that failed before it was sent may go to another endpoint.
    pub fn before_sending(&self) -> bool {
        match self {
            SendError::Connect { .. } | SendError::Handshake { .. } => true,
            SendError::Http(e) => e.is_canceled(),
        }
    }
}

/// HTTP/1.1 connections pooled per address (idle, or finishing a response).
const MAX_IDLE_PER_ADDR: usize = 32;
/// A connection pooled longer than this is not reused (servers close idle ones too).
const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// Pooled HTTP/1.1 connections of one address, with when each was last used.
type Idle = Vec<(http1::SendRequest<Body>, Instant)>;

#[derive(Default)]
pub struct AppConns {
    idle: Mutex<HashMap<Key, Idle>>,
    h2: Mutex<HashMap<Key, http2::SendRequest<Body>>>,
}

impl AppConns {
    pub async fn send(
        self: &Arc<Self>,
        netns: &Netns,
        netns_cookie: u64,
        addr: SocketAddr,
        wire: Wire,
        connect_timeout: Duration,
        req: Request<Body>,
    ) -> Result<Response<Incoming>, SendError> {
        let key = Key {
            netns_cookie,
            addr,
            wire,
            shard: crate::proxy::shards::current(),
        };
        match wire {
            Wire::Http2 => {
                let existing = self
                    .h2
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&key)
                    .filter(|s| !s.is_closed())
                    .cloned();
                let mut sender = match existing {
                    Some(s) => s,
                    None => {
                        let s = Box::pin(dial_h2(netns, addr, connect_timeout)).await?;
                        self.h2
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(key, s.clone());
                        s
                    }
                };
                sender.ready().await?;
                Ok(sender.send_request(req).await?)
            }
            Wire::Http1 => {
                let mut sender = match self.take_idle(&key) {
                    Some(s) => s,
                    // Boxed: a dial is rare, and its future held inline would
                    // grow every request's.
                    None => Box::pin(dial_h1(netns, addr, connect_timeout)).await?,
                };
                let resp = sender.send_request(req).await?;
                // Pooled at once, and taken again only once it is ready (this
                // response's body read): no task per request waits for that.
                self.put_idle(key, sender);
                Ok(resp)
            }
        }
    }

    /// A pooled connection with no request in flight. Those still reading a response
    /// stay pooled for later; closed and stale ones are dropped.
    fn take_idle(&self, key: &Key) -> Option<http1::SendRequest<Body>> {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(key)?;
        list.retain(|(s, since)| usable(s, *since, now));
        let ready = list.iter().rposition(|(s, _)| s.is_ready())?;
        Some(list.swap_remove(ready).0)
    }

    fn put_idle(&self, key: Key, sender: http1::SendRequest<Body>) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(key).or_default();
        list.retain(|(s, since)| usable(s, *since, now));
        if list.len() < MAX_IDLE_PER_ADDR {
            list.push((sender, now));
        }
    }

    /// Drops idle and closed connections; called periodically.
    pub fn reap(&self) {
        let now = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|_, list| {
            list.retain(|(s, since)| usable(s, *since, now));
            !list.is_empty()
        });
        drop(idle);
        self.h2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, s| !s.is_closed());
    }
}

/// An idle connection that may still be reused at `now` (one clock read per pool
/// visit, not one per pooled connection).
fn usable(s: &http1::SendRequest<Body>, since: Instant, now: Instant) -> bool {
    !s.is_closed() && now.saturating_duration_since(since) < IDLE_TIMEOUT
}

async fn connect(
    netns: &Netns,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TokioIo<tokio::net::TcpStream>, SendError> {
    dial_from(netns, addr, timeout)
        .await
        .map(TokioIo::new)
        .map_err(|source| SendError::Connect { addr, source })
}

async fn dial_h1(
    netns: &Netns,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<http1::SendRequest<Body>, SendError> {
    let io = connect(netns, addr, timeout).await?;
    let (sender, conn) = http1::Builder::new()
        .handshake(io)
        .await
        .map_err(|source| SendError::Handshake { addr, source })?;
    tokio::spawn(
        async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(error = %e, "app connection ended with an error");
            }
        }
        .instrument(debug_span!("app_h1", %addr)),
    );
    Ok(sender)
}

async fn dial_h2(
    netns: &Netns,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<http2::SendRequest<Body>, SendError> {
    let io = connect(netns, addr, timeout).await?;
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(crate::proxy::tunnel::KEEPALIVE_INTERVAL)
        .keep_alive_timeout(crate::proxy::tunnel::KEEPALIVE_TIMEOUT)
        .handshake(io)
        .await
        .map_err(|source| SendError::Handshake { addr, source })?;
    tokio::spawn(
        async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "app connection ended with an error");
            }
        }
        .instrument(debug_span!("app_h2", %addr)),
    );
    Ok(sender)
}
