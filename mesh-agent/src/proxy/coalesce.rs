//! Writes to a tunnel connection gathered for one scheduler turn, the way an event
//! loop writes what its handlers produced at the end of an iteration.
//!
//! Why: the HTTP/2 client queues a new stream's HEADERS and only then lets the task
//! that pipes the request body learn it may send. The connection task would write the
//! HEADERS at once, and the body's DATA a moment later: two TLS records, two TCP
//! segments, and at the peer two wake-ups, two reads and (HTTP/1.1 at the destination)
//! two writes to the application, for a request that arrived in one read. Holding the
//! first small write of a burst back for one turn of the (single-threaded) runtime lets
//! the tasks already woken add their frames first, and the burst leaves in one write.
//!
//! A burst is what the connection task writes between two times it finds nothing more
//! to read: an HTTP/2 connection reads until its socket is empty and then writes what
//! is queued, so a read that comes back empty starts a new burst. Only the first write
//! of a burst is held, once: the connection writes one frame at a time when frames
//! carry large payloads, and holding each of them would send the task to the back of
//! the queue once per frame under load.
//!
//! The cost is one more poll of the connection task per burst, with no timer and no
//! system call. A write that is already large (a bulk transfer's frames) is not held:
//! there is nothing to gain by waiting.
use std::{
    io::{self, IoSlice},
    pin::Pin,
    task::{Context, Poll},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A first write of at least this many bytes goes out at once.
pub const HOLD_BELOW: usize = 16 * 1024;

/// Where the current burst of writes is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Burst {
    /// Nothing written since a read found the socket empty.
    Idle,
    /// The first write was held back for one turn; the next goes out, whatever
    /// happens in between (the task reads again when it comes back).
    Held,
    /// Writing: everything goes out until a read finds the socket empty.
    Open,
}

/// Decides what to do with a write of `len` bytes: hold it back (`false`) or write it
/// now (`true`), and the burst's next state.
fn admit(state: Burst, len: usize) -> (bool, Burst) {
    match state {
        Burst::Idle if len < HOLD_BELOW => (false, Burst::Held),
        Burst::Idle | Burst::Held | Burst::Open => (true, Burst::Open),
    }
}

/// The burst after a read that found nothing: a new one, unless a held write has yet
/// to go out.
fn read_empty(state: Burst) -> Burst {
    match state {
        Burst::Open | Burst::Idle => Burst::Idle,
        Burst::Held => Burst::Held,
    }
}

/// An I/O stream whose first small write of a burst waits one scheduler turn.
pub struct Coalesced<T> {
    inner: T,
    burst: Burst,
}

impl<T> Coalesced<T> {
    pub fn new(inner: T) -> Coalesced<T> {
        Coalesced {
            inner,
            burst: Burst::Idle,
        }
    }

    /// Whether a write of `len` bytes goes out now; if not, the task is woken to come
    /// back after the tasks already queued have run.
    fn admits(&mut self, cx: &Context<'_>, len: usize) -> bool {
        let (now, next) = admit(self.burst, len);
        self.burst = next;
        if !now {
            cx.waker().wake_by_ref();
        }
        now
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if read.is_pending() {
            self.burst = read_empty(self.burst);
        }
        read
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if !self.admits(cx, buf.len()) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let len = bufs.iter().map(|b| b.len()).sum();
        if !self.admits(cx, len) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::{Wake, Waker},
    };

    use super::*;

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Records every write it is given; its socket has nothing to read.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<usize>,
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            Poll::Pending
        }
    }

    fn read(io: &mut Coalesced<Recorder>, cx: &mut Context<'_>) {
        let mut space = [0u8; 16];
        let mut buf = ReadBuf::new(&mut space);
        assert!(Pin::new(io).poll_read(cx, &mut buf).is_pending());
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.push(buf.len());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[test]
    fn a_small_first_write_waits_one_turn_and_a_large_one_does_not() {
        assert_eq!(admit(Burst::Idle, 75), (false, Burst::Held));
        assert_eq!(admit(Burst::Held, 75), (true, Burst::Open));
        assert_eq!(admit(Burst::Open, 10), (true, Burst::Open));
        assert_eq!(admit(Burst::Idle, HOLD_BELOW), (true, Burst::Open));
        assert_eq!(read_empty(Burst::Open), Burst::Idle);
        assert_eq!(read_empty(Burst::Held), Burst::Held);
    }

    #[test]
    fn a_burst_goes_out_in_one_write_and_the_next_burst_waits_again() {
        let wakes = Arc::new(Wakes::default());
        let waker = Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut io = Coalesced::new(Recorder::default());
        read(&mut io, &mut cx);
        // The HEADERS alone: held, and the task asked to come back.
        let first = Pin::new(&mut io).poll_write(&mut cx, &[0; 75]);
        assert!(first.is_pending());
        assert_eq!(wakes.0.load(Ordering::Relaxed), 1);
        assert!(io.inner.writes.is_empty());
        // Back after the body's task ran, the connection reads first (nothing), then
        // writes HEADERS and DATA together.
        read(&mut io, &mut cx);
        let second = Pin::new(&mut io).poll_write(&mut cx, &[0; 1130]);
        assert!(matches!(second, Poll::Ready(Ok(1130))));
        // More of the same burst goes out at once, flushes or not.
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        assert!(Pin::new(&mut io).poll_write(&mut cx, &[0; 1033]).is_ready());
        assert!(Pin::new(&mut io).poll_flush(&mut cx).is_ready());
        assert!(Pin::new(&mut io).poll_write(&mut cx, &[0; 9]).is_ready());
        assert_eq!(io.inner.writes, vec![1130, 1033, 9]);
        // A new burst after the socket was found empty is held again.
        read(&mut io, &mut cx);
        assert!(Pin::new(&mut io).poll_write(&mut cx, &[0; 75]).is_pending());
        assert_eq!(wakes.0.load(Ordering::Relaxed), 2);
        // A large first write is not.
        let mut bulk = Coalesced::new(Recorder::default());
        let big = vec![0; HOLD_BELOW];
        assert!(Pin::new(&mut bulk).poll_write(&mut cx, &big).is_ready());
        assert_eq!(bulk.inner.writes, vec![HOLD_BELOW]);
        assert_eq!(wakes.0.load(Ordering::Relaxed), 2);
    }
}
