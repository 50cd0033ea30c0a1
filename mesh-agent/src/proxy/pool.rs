//! Pooled, multiplexed tunnel connections. A connection is shared only by streams with
//! the same key: source pod, source identity, destination identity and address. The
//! destination identity being in the key means a connection made to an address while
//! it was one identity is never reused once the config says it is another.
use std::{
    hash::BuildHasher as _,
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use hashbrown::HashTable;
use hyper::client::conn::http2::SendRequest;

use super::http::body::Body;
use tracing::debug;

use crate::identity::Identity;

/// A pool's key, owned: kept in the pool for as long as its slot is.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// A pool's key as a stream looks it up: borrowed from the request, so that a lease
/// neither clones the two identities nor hashes them twice (once per request on the
/// routed path, where that was a dozen allocations).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyRef<'a> {
    pub source_pod: u64,
    pub source: &'a Identity,
    pub dest: &'a Identity,
    pub addr: SocketAddr,
    pub shard: usize,
}

impl PoolKey {
    pub fn as_ref(&self) -> KeyRef<'_> {
        KeyRef {
            source_pod: self.source_pod,
            source: &self.source,
            dest: &self.dest,
            addr: self.addr,
            shard: self.shard,
        }
    }
}

impl KeyRef<'_> {
    fn to_owned(self) -> PoolKey {
        PoolKey {
            source_pod: self.source_pod,
            source: self.source.clone(),
            dest: self.dest.clone(),
            addr: self.addr,
            shard: self.shard,
        }
    }
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

/// The slots by key. Hashed with foldhash: the keys come from the config (identities,
/// addresses), not from what a pod sends.
#[derive(Default)]
struct Slots {
    table: HashTable<(PoolKey, Slot)>,
    hasher: foldhash::fast::RandomState,
}

impl Slots {
    /// The slot of `key`, made when there is none. An owned key hashes as its
    /// borrowed form, so both find the same entry.
    fn get_or_insert(&mut self, key: KeyRef<'_>) -> Slot {
        let Slots { table, hasher } = self;
        let hash = hasher.hash_one(key);
        if let Some((_, slot)) = table.find(hash, |(k, _)| k.as_ref() == key) {
            return slot.clone();
        }
        let slot = Slot::default();
        table.insert_unique(hash, (key.to_owned(), slot.clone()), |(k, _)| {
            hasher.hash_one(k.as_ref())
        });
        slot
    }
}

pub struct Pool {
    slots: Mutex<Slots>,
    stream_limit: usize,
    idle_timeout: Duration,
}

impl Pool {
    pub fn new(stream_limit: u32, idle_timeout: Duration) -> Arc<Pool> {
        Arc::new(Pool {
            slots: Mutex::new(Slots::default()),
            stream_limit: stream_limit.max(1) as usize,
            idle_timeout,
        })
    }

    fn slot(&self, key: KeyRef<'_>) -> Slot {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert(key)
    }

    /// A stream on a pooled connection with room, or on a new one from `dial`. Dials
    /// for one key are serialized, so a burst of connections shares one handshake.
    pub async fn lease<F, Fut, E>(&self, key: KeyRef<'_>, dial: F) -> Result<Lease, E>
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
            let mut slots = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            slots
                .table
                .retain(|(k, s)| keep(k) || Arc::strong_count(s) > 1);
            slots
                .table
                .iter()
                .map(|(k, s)| (k.clone(), s.clone()))
                .collect()
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
            .table
            .retain(|(_, s)| Arc::strong_count(s) > 1 || s.try_lock().is_ok_and(|c| !c.is_empty()));
        closed
    }

    pub fn connections(&self) -> usize {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .table
            .iter()
            .map(|(_, s)| s.try_lock().map(|c| c.len()).unwrap_or(0))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key<'a>(source: &'a Identity, dest: &'a Identity, port: u16) -> KeyRef<'a> {
        KeyRef {
            source_pod: 7,
            source,
            dest,
            addr: SocketAddr::from(([10, 0, 0, 1], port)),
            shard: 1,
        }
    }

    #[test]
    fn a_borrowed_key_finds_the_slot_its_owned_copy_holds_and_only_that_one() {
        let a = Identity::new("cluster.local", "ns", "a");
        let b = Identity::new("cluster.local", "ns", "b");
        let mut slots = Slots::default();
        let first = slots.get_or_insert(key(&a, &b, 15008));
        // The same key, made of other allocations with equal contents.
        let (a2, b2) = (a.clone(), b.clone());
        assert!(Arc::ptr_eq(
            &first,
            &slots.get_or_insert(key(&a2, &b2, 15008))
        ));
        assert_eq!(slots.table.len(), 1);
        // Each part of the key tells slots apart: another destination identity (the
        // config now expects another workload at the address), another source, another
        // address, another pod, another shard.
        let others = [
            key(&a, &a, 15008),
            key(&b, &b, 15008),
            key(&a, &b, 15009),
            KeyRef {
                source_pod: 8,
                ..key(&a, &b, 15008)
            },
            KeyRef {
                shard: 0,
                ..key(&a, &b, 15008)
            },
        ];
        for k in others {
            assert!(!Arc::ptr_eq(&first, &slots.get_or_insert(k)), "{k:?}");
        }
        assert_eq!(slots.table.len(), 6);
        let kept = slots
            .table
            .iter()
            .filter(|(k, _)| k.as_ref() == key(&a, &b, 15008));
        assert_eq!(kept.count(), 1);
    }
}
