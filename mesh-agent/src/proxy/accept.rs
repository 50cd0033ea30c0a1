//! The accept step every pod listener shares: back off on errors (EMFILE) instead of
//! spinning, and admit a connection only within the pod's and the agent's connection
//! caps. Both are counted and warned about at most once per period, not per event.
//!
//! The listener waits on the main runtime, but an accepted socket is not registered
//! with that runtime's reactor: it is handed to a shard (see `shards`), which registers
//! it with its own. Accepting through tokio's `TcpListener` registered every connection
//! with the main reactor only to deregister it again at once, two `epoll_ctl` calls per
//! connection for nothing.
use std::{
    io,
    net::{SocketAddr, TcpListener as StdTcpListener, TcpStream as StdTcpStream},
    time::Duration,
};

use socket2::SockRef;
use tokio::io::{Interest, unix::AsyncFd};
use tracing::warn;

use super::{PodContext, ProxyContext};
use crate::limits::{ConnPermit, Throttle};

static ACCEPT_FAILED: Throttle = Throttle::new(Duration::from_secs(10));
static OVER_LIMIT: Throttle = Throttle::new(Duration::from_secs(10));

/// A pod's listening socket, waited on by the runtime that made it.
pub struct Listener(AsyncFd<StdTcpListener>);

impl Listener {
    /// Must be called on a runtime (the listener registers with its reactor).
    pub fn new(listener: StdTcpListener) -> io::Result<Listener> {
        listener.set_nonblocking(true)?;
        // SAFETY: the `TcpListener` owns its descriptor for as long as it lives, and
        // the `AsyncFd` owns the listener: the descriptor it registers stays open and
        // the same until the `AsyncFd` is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(listener, Interest::READABLE) }?;
        Ok(Listener(fd))
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.get_ref().local_addr()
    }

    /// The next connection, non-blocking and close-on-exec, with its peer.
    async fn accept(&self) -> io::Result<(StdTcpStream, SocketAddr)> {
        loop {
            let mut ready = self.0.readable().await?;
            // `WouldBlock` clears the readiness and waits again; anything else is
            // the answer.
            if let Ok(result) = ready.try_io(|l| accept_nonblocking(l.get_ref())) {
                return result;
            }
        }
    }
}

fn accept_nonblocking(listener: &StdTcpListener) -> io::Result<(StdTcpStream, SocketAddr)> {
    let (socket, addr) =
        SockRef::from(listener).accept4(libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC)?;
    let peer = addr
        .as_socket()
        .ok_or_else(|| io::Error::other("a connection from a peer that is not an IP address"))?;
    Ok((socket.into(), peer))
}

/// Waits for the next connection that may be served. One over a cap is closed at once,
/// after `refused` has seen its peer (the outbound listener consumes the connection's
/// original-destination record there, so that a pod over its cap cannot leave records
/// behind that would crowd out other pods' in the shared map).
pub async fn accept(
    listener: &Listener,
    pod: &PodContext,
    ctx: &ProxyContext,
    refused: impl Fn(SocketAddr),
) -> (StdTcpStream, SocketAddr, ConnPermit<u64>) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read as _, Write as _};

    #[tokio::test]
    async fn an_accepted_connection_is_non_blocking_and_names_its_peer() {
        let listener =
            Listener::new(StdTcpListener::bind("127.0.0.1:0").expect("bind")).expect("listener");
        let addr = listener.local_addr().expect("addr");
        let mut client = StdTcpStream::connect(addr).expect("connect");
        let (mut served, peer) = listener.accept().await.expect("accept");
        assert_eq!(peer, client.local_addr().expect("client addr"));
        // Non-blocking: nothing to read is `WouldBlock`, not a wait.
        let mut buf = [0u8; 4];
        let err = served.read(&mut buf).expect_err("nothing was sent");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        client.write_all(b"ping").expect("write");
        // A second connection waits on the listener's readiness again.
        let second = StdTcpStream::connect(addr).expect("connect");
        let (_, peer) = listener.accept().await.expect("accept");
        assert_eq!(peer, second.local_addr().expect("addr"));
        served.set_nonblocking(false).expect("blocking");
        served.read_exact(&mut buf).expect("read");
        assert_eq!(&buf, b"ping");
    }
}
