//! Pooled, multiplexed tunnel connections. A connection is shared only by streams with
//! the same key: source pod, source identity, destination identity and address. The
//! destination identity being in the key means a connection made to an address while
//! it was one identity is never reused once the config says it is another.
use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hyper::client::conn::http2::SendRequest;

use super::http::body::Body;
use tracing::debug;

use crate::identity::Identity;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PoolKey {
    /// The source pod's netns cookie: a connection leaves from one pod's namespace, so
    /// it carries only that pod's traffic (the destination sees the right source IP).
    pub source_pod: u64,
    pub source: Identity,
    pub dest: Identity,
    pub addr: SocketAddr,
    /// The worker thread (`shards::current`): each keeps its own connections, so a
    /// request never wakes another thread to reach its tunnel.
    pub shard: usize,
}

pub struct PooledConn {
    pub sender: SendRequest<Body>,
    active: AtomicUsize,
    idle_since: Mutex<Instant>,
    /// A stream could not be opened in time: the peer is wedged. No new stream goes
    /// on this connection; the ones open finish or fail on their own.
    dead: std::sync::atomic::AtomicBool,
}

impl PooledConn {
    fn usable(&self) -> bool {
        !self.sender.is_closed() && !self.dead.load(Ordering::Acquire)
    }
}

/// One stream's claim on a pooled connection; released on drop.
pub struct Lease {
    conn: Arc<PooledConn>,
}

impl Lease {
    pub fn sender(&self) -> SendRequest<Body> {
        self.conn.sender.clone()
    }

    /// Takes the connection out of the pool for new streams.
    pub fn mark_dead(&self) {
        self.conn.dead.store(true, Ordering::Release);
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        if self.conn.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self
                .conn
                .idle_since
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Instant::now();
        }
    }
}

type Slot = Arc<tokio::sync::Mutex<Vec<Arc<PooledConn>>>>;

pub struct Pool {
    slots: Mutex<HashMap<PoolKey, Slot>>,
    stream_limit: usize,
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(stream_limit: u32, idle_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            slots: Mutex::new(HashMap::new()),
            stream_limit: stream_limit.max(1) as usize,
            idle_timeout,
        })
    }

    fn slot(&self, key: &PoolKey) -> Slot {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// A stream on a pooled connection with room, or on a new one from `dial`. Dials
    /// for one key are serialized, so a burst of connections shares one handshake.
    pub async fn lease<F, Fut, E>(&self, key: &PoolKey, dial: F) -> Result<Lease, E>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<SendRequest<Body>, E>>,
    {
        let slot = self.slot(key);
        let mut conns = slot.lock().await;
        conns.retain(|c| c.usable());
        if let Some(conn) = conns
            .iter()
            .find(|c| c.active.load(Ordering::Acquire) < self.stream_limit)
        {
            conn.active.fetch_add(1, Ordering::AcqRel);
            return Ok(Lease { conn: conn.clone() });
        }
        let sender = dial().await?;
        let conn = Arc::new(PooledConn {
            sender,
            active: AtomicUsize::new(1),
            idle_since: Mutex::new(Instant::now()),
            dead: std::sync::atomic::AtomicBool::new(false),
        });
        conns.push(conn.clone());
        debug!(dest = %key.dest, addr = %key.addr, conns = conns.len(), "new tunnel connection");
        Ok(Lease { conn })
    }

    /// Closes connections idle for longer than the idle timeout, and those whose key
    /// `keep` rejects (the config no longer expects that identity at that address).
    pub async fn reap(&self, keep: impl Fn(&PoolKey) -> bool) -> usize {
        let slots: Vec<(PoolKey, Slot)> = {
            let mut map = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            map.retain(|k, s| keep(k) || Arc::strong_count(s) > 1);
            map.iter().map(|(k, s)| (k.clone(), s.clone())).collect()
        };
        let mut closed = 0;
        for (key, slot) in slots {
            let wanted = keep(&key);
            let mut conns = slot.lock().await;
            let before = conns.len();
            conns.retain(|c| {
                let idle = c.active.load(Ordering::Acquire) == 0
                    && c.idle_since
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .elapsed()
                        >= self.idle_timeout;
                // Streams already open on an unwanted connection finish; no new ones.
                wanted && !idle && c.usable()
            });
            closed += before - conns.len();
        }
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, s| Arc::strong_count(s) > 1 || s.try_lock().is_ok_and(|c| !c.is_empty()));
        closed
    }

    pub fn connections(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|s| s.try_lock().map(|c| c.len()).unwrap_or(0))
            .sum()
    }
}
