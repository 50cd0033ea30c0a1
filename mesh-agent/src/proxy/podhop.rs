//! The agent's end of a pod-agent hop (the application's connection it accepted, or
//! the one it dialled to deliver), as sockmap acceleration needs it to be handled.
//!
//! With sockmap on, a socket has two receive queues: the sockmap queue (bytes the
//! other end's `sk_msg` put there) and TCP's own (bytes and the FIN that came by
//! TCP/IP). A read takes from one of them only, so a short read does not mean
//! "drained". Three rules follow:
//!   - the agent reads until the kernel says EAGAIN, never taking a short read for
//!     "drained" (tokio's own `poll_read` does, and would then wait for an edge that
//!     has already come: bytes or a FIN that arrived by TCP behind the sockmap
//!     bytes). This costs one extra read per burst;
//!   - the agent bounds what it leaves unread in the application's sockmap queue
//!     itself: it sends up to its credit (the unread limit), then looks up how much
//!     the application has not read yet, and while that is more than half the limit
//!     it waits, polling. One map lookup per limit's worth of bytes sent, none for
//!     small exchanges;
//!   - the agent's FIN goes by TCP, so it could overtake what the application has
//!     not read yet from the sockmap queue and meet the same short-read trap in the
//!     application (most event loops take a short read for "drained"). Before it
//!     shuts its side down, the agent waits until the application has read
//!     everything it sent (none of that wait when it already has). The wait lasts
//!     while the application makes progress and gives up after [`DRAIN_STALL`]
//!     without any: an unread count that never comes down (an application that
//!     closed without reading, or a count the kernel left behind) must not hold the
//!     connection open for ever (under load, 16 of 400 connections were seen held
//!     that way), but a FIN sent while a slow reader still has bytes queued hangs
//!     that reader (a fixed 500 ms cap did that to a client reading 10 MB on a
//!     loaded machine).
//!
//! With sockmap acceleration off this is a plain `TcpStream`.
use std::{
    io,
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Duration,
};

use mesh_common::SockKey;
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Sleep,
};

use crate::{
    bpf::{MeshMaps, ip16},
    limits::Throttle,
};

/// Where the agent learns how far behind the other end of one of its hops is: the
/// kernel's unread counts (`MeshMaps`), or a stand-in in tests.
pub trait UnreadGauge: Send + Sync {
    /// Bytes the other end of `own` has not read, if it is in the sockmap.
    fn unread_by_peer(&self, own: &SockKey) -> Option<i64>;
    /// Sends `own`'s later messages by TCP; false if that could not be arranged.
    fn send_by_tcp(&self, own: &SockKey) -> bool;
}

impl UnreadGauge for MeshMaps {
    fn unread_by_peer(&self, own: &SockKey) -> Option<i64> {
        MeshMaps::unread_by_peer(self, own)
    }

    fn send_by_tcp(&self, own: &SockKey) -> bool {
        MeshMaps::send_by_tcp(self, own)
    }
}

/// How long the first wait for a lagging receiver is; it doubles up to [`MAX_WAIT`].
const FIRST_WAIT: Duration = Duration::from_millis(1);
const MAX_WAIT: Duration = Duration::from_millis(16);
/// Hops sent to TCP because their receiver's count stopped coming down.
static COUNT_DISTRUSTED: Throttle = Throttle::new(Duration::from_secs(10));

/// How long the agent waits, before its FIN goes, for an application that reads
/// nothing more of what the agent sent (a reader that keeps up drains in
/// microseconds; one that is reading is waited for as long as it reads).
const DRAIN_STALL: Duration = Duration::from_secs(1);

pub struct PodHop {
    io: TcpStream,
    /// Present when sockmap acceleration is on (boxed: the plain hop stays small).
    pacing: Option<Box<Pacing>>,
}

struct Pacing {
    gauge: Arc<dyn UnreadGauge>,
    netns_cookie: u64,
    limit: i64,
    /// Bytes the agent may still send before it looks at the receiver again.
    credit: i64,
    /// This socket's key, worked out on the first look.
    key: Option<SockKey>,
    /// Its addresses where the caller already knew them (the accepted peer, the
    /// listener's address, the address dialled): each one known is a system call the
    /// first look does not make. Most connections look once, before their FIN.
    local: Option<SocketAddr>,
    peer: Option<SocketAddr>,
    wait: Option<Pin<Box<Sleep>>>,
    next_wait: Duration,
    /// The wait before the FIN (set on its first look).
    drain: Option<DrainWatch>,
    /// The receiver's progress while the agent waits for credit.
    stall: Option<DrainWatch>,
    /// The agent stopped pacing by the receiver's count and sends by TCP.
    on_tcp: bool,
}

impl PodHop {
    pub fn new(io: TcpStream, netns_cookie: u64, maps: &Arc<MeshMaps>) -> Self {
        let gauge: Arc<dyn UnreadGauge> = maps.clone();
        Self::with_gauge(io, netns_cookie, maps.sockmap_limit(), gauge)
    }

    /// `limit` is the sockmap's unread limit, `None` when sockmap acceleration is off.
    fn with_gauge(
        io: TcpStream,
        netns_cookie: u64,
        limit: Option<u32>,
        gauge: Arc<dyn UnreadGauge>,
    ) -> Self {
        let pacing = limit.map(|limit| {
            Box::new(Pacing {
                gauge,
                netns_cookie,
                limit: i64::from(limit),
                credit: i64::from(limit),
                key: None,
                local: None,
                peer: None,
                wait: None,
                next_wait: FIRST_WAIT,
                drain: None,
                stall: None,
                on_tcp: false,
            })
        });
        PodHop { io, pacing }
    }

    /// The socket's own address and its peer's, where the caller knows them; what it
    /// does not know is asked of the kernel when (if ever) it is needed.
    pub fn with_addrs(mut self, local: Option<SocketAddr>, peer: Option<SocketAddr>) -> Self {
        if let Some(p) = self.pacing.as_mut() {
            (p.local, p.peer) = (local, peer);
        }
        self
    }
}

impl From<PodHop> for TcpStream {
    fn from(hop: PodHop) -> TcpStream {
        hop.io
    }
}

/// What the wait before the agent's FIN does after a look at the receiver.
#[derive(Debug, PartialEq, Eq)]
enum Drain {
    /// The receiver has read everything: the FIN can go.
    Done,
    /// The receiver is behind but reading (or not yet stalled for long): look again.
    Wait,
    /// The receiver has read nothing for [`DRAIN_STALL`]: the FIN goes anyway.
    GiveUp,
}

/// The receiver's progress during the wait before the FIN: the lowest unread count
/// seen and when it last came down.
#[derive(Debug)]
struct DrainWatch {
    lowest: i64,
    since: tokio::time::Instant,
}

impl DrainWatch {
    fn new(unread: i64, now: tokio::time::Instant) -> Self {
        DrainWatch {
            lowest: unread,
            since: now,
        }
    }

    fn step(&mut self, unread: i64, now: tokio::time::Instant) -> Drain {
        if unread <= 0 {
            return Drain::Done;
        }
        if unread < self.lowest {
            self.lowest = unread;
            self.since = now;
            return Drain::Wait;
        }
        if now.duration_since(self.since) >= DRAIN_STALL {
            Drain::GiveUp
        } else {
            Drain::Wait
        }
    }
}

impl Pacing {
    fn key_of(&mut self, io: &TcpStream) -> io::Result<SockKey> {
        if let Some(k) = self.key {
            return Ok(k);
        }
        let local = match self.local {
            Some(a) => a,
            None => io.local_addr()?,
        };
        let peer = match self.peer {
            Some(a) => a,
            None => io.peer_addr()?,
        };
        let key = SockKey {
            netns_cookie: self.netns_cookie,
            local_addr: ip16(local.ip()),
            remote_addr: ip16(peer.ip()),
            local_port: local.port(),
            remote_port: peer.port(),
            _pad: 0,
        };
        self.key = Some(key);
        Ok(key)
    }

    /// Looks at the receiver once the credit is used up: new credit, or a wait while
    /// it is more than half the limit behind. A receiver that is not in the maps
    /// (it closed, or its socket is not accelerated) gets a full credit.
    ///
    /// A count that does not come down for [`DRAIN_STALL`] while the agent waits is
    /// not trusted further: the agent's sends on this hop go by TCP from then on, where
    /// the receive window holds it back as it would without the mesh. A safety net:
    /// the kernel's counts were once wrong (records of closed sockets applied to the
    /// next socket at their address, fixed in the kernel programs), which left counts
    /// that never came down and a bulk transfer that waited for ever after its first
    /// 4 MiB; a count wrong for a reason not yet known must not hang a connection
    /// either. A receiver that really stopped reading loses nothing by the switch: TCP
    /// bounds what it is sent.
    fn refill(&mut self, io: &TcpStream) -> io::Result<()> {
        let key = self.key_of(io)?;
        let unread = self.gauge.unread_by_peer(&key).unwrap_or(0);
        if unread > self.limit / 2 {
            let now = tokio::time::Instant::now();
            let watch = self
                .stall
                .get_or_insert_with(|| DrainWatch::new(unread, now));
            if watch.step(unread, now) == Drain::GiveUp && self.gauge.send_by_tcp(&key) {
                if let Some(n) = COUNT_DISTRUSTED.hit() {
                    tracing::warn!(
                        unread,
                        times = n,
                        "an application's unread count did not come down while the agent waited; its hop goes by TCP"
                    );
                }
                self.on_tcp = true;
                self.stall = None;
                return Ok(());
            }
            self.wait = Some(Box::pin(tokio::time::sleep(self.next_wait)));
            self.next_wait = (self.next_wait * 2).min(MAX_WAIT);
        } else {
            self.stall = None;
            self.credit = self.limit - unread;
            self.next_wait = FIRST_WAIT;
        }
        Ok(())
    }

    /// Ready once the receiver has read everything sent to it (or is not in the maps),
    /// or once it has read nothing more for [`DRAIN_STALL`].
    fn poll_drained(&mut self, io: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if let Some(wait) = self.wait.as_mut() {
                ready!(wait.as_mut().poll(cx));
                self.wait = None;
            }
            let key = self.key_of(io)?;
            let unread = self.gauge.unread_by_peer(&key).unwrap_or(0);
            let now = tokio::time::Instant::now();
            let watch = self
                .drain
                .get_or_insert_with(|| DrainWatch::new(unread, now));
            match watch.step(unread, now) {
                Drain::Done => {
                    self.next_wait = FIRST_WAIT;
                    return Poll::Ready(Ok(()));
                }
                Drain::GiveUp => {
                    tracing::debug!(
                        unread,
                        "the application has read nothing of what the agent sent for a while; closing anyway"
                    );
                    return Poll::Ready(Ok(()));
                }
                Drain::Wait => {
                    self.wait = Some(Box::pin(tokio::time::sleep(self.next_wait)));
                    self.next_wait = (self.next_wait * 2).min(MAX_WAIT);
                }
            }
        }
    }

    /// Ready once there is credit to send with (at once when the hop went to TCP).
    fn poll_credit(&mut self, io: &TcpStream, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.on_tcp {
                return Poll::Ready(Ok(()));
            }
            if let Some(wait) = self.wait.as_mut() {
                ready!(wait.as_mut().poll(cx));
                self.wait = None;
            } else if self.credit > 0 {
                return Poll::Ready(Ok(()));
            }
            self.refill(io)?;
        }
    }
}

impl AsyncRead for PodHop {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pacing.is_none() {
            return Pin::new(&mut this.io).poll_read(cx, buf);
        }
        // try_read leaves the readiness set after a short read; only EAGAIN clears it.
        loop {
            ready!(this.io.poll_read_ready(cx))?;
            match this.io.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }
}

impl AsyncWrite for PodHop {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let Some(pacing) = this.pacing.as_mut() else {
            return Pin::new(&mut this.io).poll_write(cx, buf);
        };
        ready!(pacing.poll_credit(&this.io, cx))?;
        let n = ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        pacing.credit -= n as i64;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(pacing) = this.pacing.as_mut() {
            ready!(pacing.poll_drained(&this.io, cx))?;
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Mutex,
        atomic::{AtomicI64, AtomicUsize, Ordering},
    };

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpListener,
    };

    use super::*;

    /// A receiver whose unread count the test sets; it records the keys asked about.
    #[derive(Default)]
    struct FakeGauge {
        unread: AtomicI64,
        looks: AtomicUsize,
        keys: Mutex<Vec<SockKey>>,
        to_tcp: AtomicUsize,
    }

    impl UnreadGauge for FakeGauge {
        fn unread_by_peer(&self, own: &SockKey) -> Option<i64> {
            self.looks.fetch_add(1, Ordering::SeqCst);
            if let Ok(mut keys) = self.keys.lock() {
                keys.push(*own);
            }
            Some(self.unread.load(Ordering::SeqCst))
        }

        fn send_by_tcp(&self, _own: &SockKey) -> bool {
            self.to_tcp.fetch_add(1, Ordering::SeqCst);
            true
        }
    }

    const LIMIT: u32 = 16 * 1024;

    async fn pair(
        gauge: Arc<FakeGauge>,
        limit: Option<u32>,
    ) -> (PodHop, TcpStream, std::net::SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let hop = PodHop::with_gauge(client.unwrap(), 7, limit, gauge);
        (hop, accepted.unwrap().0, addr)
    }

    /// The key of the one look a hop makes before its FIN (nothing unread).
    async fn key_at_shutdown(hop: PodHop, gauge: &FakeGauge) -> SockKey {
        let mut hop = hop;
        hop.shutdown().await.unwrap();
        let keys = gauge.keys.lock().unwrap();
        assert_eq!(keys.len(), 1, "one look before the FIN");
        keys[0]
    }

    #[tokio::test]
    async fn addresses_the_caller_knows_are_used_and_the_others_asked_for() {
        let gauge = Arc::new(FakeGauge::default());
        let (hop, _peer, addr) = pair(gauge.clone(), Some(LIMIT)).await;
        let local = hop.io.local_addr().unwrap();
        let looked_up = key_at_shutdown(hop, &gauge).await;
        assert_eq!(looked_up.local_port, local.port());
        assert_eq!(looked_up.remote_port, addr.port());

        // Both known: the same key as the kernel's addresses give.
        let gauge = Arc::new(FakeGauge::default());
        let (hop, _peer, addr) = pair(gauge.clone(), Some(LIMIT)).await;
        let local = hop.io.local_addr().unwrap();
        let hop = hop.with_addrs(Some(local), Some(addr));
        let known = key_at_shutdown(hop, &gauge).await;
        assert_eq!(
            (known.local_port, known.remote_port),
            (local.port(), addr.port())
        );
        assert_eq!(
            (known.local_addr, known.remote_addr),
            (looked_up.local_addr, looked_up.remote_addr)
        );

        // Only the peer known: it is taken as given (not asked for), the own address
        // is asked for.
        let gauge = Arc::new(FakeGauge::default());
        let (hop, _peer, _) = pair(gauge.clone(), Some(LIMIT)).await;
        let local = hop.io.local_addr().unwrap();
        let given: SocketAddr = "127.0.0.9:4242".parse().unwrap();
        let key = key_at_shutdown(hop.with_addrs(None, Some(given)), &gauge).await;
        assert_eq!((key.remote_addr, key.remote_port), (ip16(given.ip()), 4242));
        assert_eq!(key.local_port, local.port());
    }

    #[tokio::test]
    async fn small_exchanges_never_look_at_the_receiver() {
        let gauge = Arc::new(FakeGauge::default());
        let (mut hop, mut peer, _) = pair(gauge.clone(), Some(LIMIT)).await;
        for _ in 0..8 {
            hop.write_all(&[1u8; 1024]).await.unwrap();
            let mut buf = [0u8; 1024];
            peer.read_exact(&mut buf).await.unwrap();
            peer.write_all(&buf).await.unwrap();
            hop.read_exact(&mut buf).await.unwrap();
        }
        assert_eq!(gauge.looks.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn the_agent_waits_while_its_receiver_is_behind() {
        let gauge = Arc::new(FakeGauge::default());
        let (mut hop, _peer, addr) = pair(gauge.clone(), Some(LIMIT)).await;
        // The whole credit goes without a look.
        hop.write_all(&vec![0u8; LIMIT as usize]).await.unwrap();
        assert_eq!(gauge.looks.load(Ordering::SeqCst), 0);

        // The receiver has read nothing: the next send waits, looking again and again.
        gauge.unread.store(i64::from(LIMIT), Ordering::SeqCst);
        let blocked = tokio::time::timeout(Duration::from_millis(100), hop.write(&[0u8; 512]));
        assert!(blocked.await.is_err(), "sent to a receiver a limit behind");
        assert!(gauge.looks.load(Ordering::SeqCst) >= 3);
        let key = gauge.keys.lock().unwrap()[0];
        assert_eq!(key.netns_cookie, 7);
        assert_eq!(key.remote_port, addr.port());
        assert_eq!(key.remote_addr, ip16(addr.ip()));

        // Still more than half the limit behind: still waiting.
        gauge
            .unread
            .store(i64::from(LIMIT / 2) + 1, Ordering::SeqCst);
        let blocked = tokio::time::timeout(Duration::from_millis(60), hop.write(&[0u8; 512]));
        assert!(
            blocked.await.is_err(),
            "sent to a receiver over half the limit behind"
        );

        // Caught up to half: the send goes, and the credit is what the receiver has room for.
        gauge.unread.store(i64::from(LIMIT / 4), Ordering::SeqCst);
        let n = tokio::time::timeout(Duration::from_secs(2), hop.write(&[0u8; 512]))
            .await
            .expect("still waiting once the receiver caught up")
            .unwrap();
        assert_eq!(n, 512);
        let credit = hop.pacing.as_ref().map(|p| p.credit);
        assert_eq!(credit, Some(i64::from(LIMIT - LIMIT / 4) - 512));
    }

    #[tokio::test]
    async fn a_count_that_never_comes_down_sends_the_hop_to_tcp_instead_of_waiting_for_ever() {
        let gauge = Arc::new(FakeGauge::default());
        let (mut hop, mut peer, _) = pair(gauge.clone(), Some(LIMIT)).await;
        let reader = tokio::spawn(async move {
            let mut got = 0usize;
            let mut buf = vec![0u8; 64 * 1024];
            while got < 3 * LIMIT as usize {
                match peer.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got += n,
                }
            }
            got
        });
        hop.write_all(&vec![0u8; LIMIT as usize]).await.unwrap();
        // The receiver reads everything, but its count says a limit behind for ever.
        gauge.unread.store(i64::from(LIMIT), Ordering::SeqCst);
        let started = std::time::Instant::now();
        tokio::time::timeout(
            DRAIN_STALL * 4,
            hop.write_all(&vec![0u8; 2 * LIMIT as usize]),
        )
        .await
        .expect("the agent waited for ever on a count that never came down")
        .unwrap();
        assert!(started.elapsed() >= DRAIN_STALL, "{:?}", started.elapsed());
        assert_eq!(gauge.to_tcp.load(Ordering::SeqCst), 1);
        assert_eq!(reader.await.unwrap(), 3 * LIMIT as usize);
    }

    #[tokio::test]
    async fn a_receiver_that_is_reading_is_waited_for_without_leaving_the_sockmap() {
        let gauge = Arc::new(FakeGauge::default());
        let (mut hop, _peer, _) = pair(gauge.clone(), Some(LIMIT)).await;
        hop.write_all(&vec![0u8; LIMIT as usize]).await.unwrap();
        gauge.unread.store(i64::from(LIMIT), Ordering::SeqCst);
        // The count comes down slowly, never stalling a full DRAIN_STALL.
        let g = gauge.clone();
        let draining = tokio::spawn(async move {
            for i in 1..=6 {
                tokio::time::sleep(DRAIN_STALL / 3).await;
                g.unread
                    .store(i64::from(LIMIT) - i * 1024, Ordering::SeqCst);
            }
            g.unread.store(0, Ordering::SeqCst);
        });
        hop.write_all(&[0u8; 512]).await.unwrap();
        draining.await.unwrap();
        assert_eq!(gauge.to_tcp.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn the_fin_waits_until_the_receiver_has_read_everything() {
        let gauge = Arc::new(FakeGauge::default());
        let (mut hop, mut peer, _) = pair(gauge.clone(), Some(LIMIT)).await;
        hop.write_all(b"tail").await.unwrap();
        gauge.unread.store(4, Ordering::SeqCst);
        let held = tokio::time::timeout(Duration::from_millis(80), hop.shutdown());
        assert!(held.await.is_err(), "shut down before the receiver read");
        gauge.unread.store(0, Ordering::SeqCst);
        tokio::time::timeout(Duration::from_secs(2), hop.shutdown())
            .await
            .expect("still holding the FIN once the receiver read everything")
            .unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"tail");
    }

    #[tokio::test]
    async fn a_count_that_never_drains_holds_the_fin_only_for_the_stall_limit() {
        let gauge = Arc::new(FakeGauge::default());
        let (mut hop, mut peer, _) = pair(gauge.clone(), Some(LIMIT)).await;
        hop.write_all(b"WHO\n").await.unwrap();
        // The receiver read (or closed), but the count says 4 for ever.
        gauge.unread.store(4, Ordering::SeqCst);
        let started = std::time::Instant::now();
        tokio::time::timeout(DRAIN_STALL * 4, hop.shutdown())
            .await
            .expect("the FIN was held for ever by a count that never came down")
            .unwrap();
        assert!(started.elapsed() >= DRAIN_STALL, "{:?}", started.elapsed());
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"WHO\n");
    }

    #[test]
    fn a_slow_reader_is_waited_for_as_long_as_it_reads() {
        let t0 = tokio::time::Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut watch = DrainWatch::new(1_000_000, t0);
        // Reading, slowly: well past the stall limit in all, never stalled that long.
        let step = DRAIN_STALL.as_millis() as u64 / 2;
        let mut unread = 1_000_000;
        for i in 1..=10 {
            unread -= 50_000;
            assert_eq!(watch.step(unread, at(i * step)), Drain::Wait);
        }
        // Then it stops reading: a stall limit later the FIN goes.
        assert_eq!(watch.step(unread, at(10 * step + step)), Drain::Wait);
        assert_eq!(
            watch.step(unread + 10, at(10 * step + 2 * step)),
            Drain::GiveUp
        );
        // A reader that catches up is done at once, stalled or not.
        assert_eq!(watch.step(0, at(40 * step)), Drain::Done);
        assert_eq!(DrainWatch::new(0, t0).step(0, t0), Drain::Done);
    }

    #[tokio::test]
    async fn a_short_read_does_not_hide_what_came_behind_it() {
        let gauge = Arc::new(FakeGauge::default());
        let (mut hop, mut peer, _) = pair(gauge, Some(LIMIT)).await;
        // Bytes and the FIN are both queued before the first read.
        peer.write_all(b"last bytes").await.unwrap();
        peer.shutdown().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut buf = [0u8; 64];
        let n = hop.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"last bytes");
        let eof = tokio::time::timeout(Duration::from_secs(2), hop.read(&mut buf)).await;
        assert_eq!(
            eof.expect("the FIN behind a short read was not seen")
                .unwrap(),
            0
        );
    }

    #[tokio::test]
    async fn without_sockmap_it_is_the_plain_stream() {
        let gauge = Arc::new(FakeGauge::default());
        gauge.unread.store(i64::MAX, Ordering::SeqCst);
        let (mut hop, mut peer, _) = pair(gauge.clone(), None).await;
        hop.write_all(&vec![3u8; 4 * LIMIT as usize]).await.unwrap();
        hop.shutdown().await.unwrap();
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(got.len(), 4 * LIMIT as usize);
        assert_eq!(gauge.looks.load(Ordering::SeqCst), 0);
    }
}
