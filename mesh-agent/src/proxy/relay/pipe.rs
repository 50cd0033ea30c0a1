//! One direction of a relay. It reads into a buffer that grows while the source keeps
//! filling it and shrinks back when reads come in small, so a bulk transfer moves in
//! few large reads and writes (fewer system calls, TLS records and HTTP/2 frames per
//! byte) while an idle or chatty connection holds a small buffer. What the buffers
//! grow beyond their first size comes from one budget for the whole agent, so ten
//! thousand connections that all send at full speed cannot make the agent hold more
//! than the budget on top of their base buffers.
use std::{
    io,
    pin::Pin,
    sync::atomic::{AtomicUsize, Ordering},
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Every connection's first buffer, per direction (tokio's default for a copy).
pub const BASE: usize = 8 * 1024;
/// The largest a buffer grows: a read this large takes what a fast sender put in a
/// socket's receive queue at once.
pub const MAX: usize = 256 * 1024;
/// What all buffers together may hold above their base size.
pub const BUDGET: usize = 64 * 1024 * 1024;

/// What relay buffers may hold above their base size, together.
pub struct Budget {
    used: AtomicUsize,
    limit: usize,
}

impl Budget {
    pub const fn new(limit: usize) -> Budget {
        Budget {
            used: AtomicUsize::new(0),
            limit,
        }
    }

    /// The bytes held above base size now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `extra` bytes; false (and nothing taken) if that would pass the limit.
    fn take(&self, extra: usize) -> bool {
        self.used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |u| {
                u.checked_add(extra).filter(|t| *t <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// The agent's one budget for every relay.
pub static AGENT_BUDGET: Budget = Budget::new(BUDGET);

/// The bytes all relay buffers hold above their base size (a gauge on `/metrics`).
pub fn grown() -> usize {
    AGENT_BUDGET.used()
}

/// The size for the next read, from the current size and what the last read got:
/// a read that filled the buffer doubles it, one that got under a quarter of it
/// halves it, anything between keeps it.
pub fn next_size(current: usize, last_read: usize) -> usize {
    if last_read >= current {
        (current * 2).min(MAX)
    } else if last_read < current / 4 {
        (current / 2).max(BASE)
    } else {
        current
    }
}

/// A copy from one stream to another, in the manner of tokio's `copy`, with a
/// buffer that changes size between reads (never while it holds data).
pub struct Pipe {
    budget: &'static Budget,
    buf: Vec<u8>,
    /// Unwritten data is `buf[pos..end]`.
    pos: usize,
    end: usize,
    /// What the last read got: decides the next buffer size.
    last_read: usize,
    read_done: bool,
    need_flush: bool,
    copied: u64,
}

impl Pipe {
    /// A pipe whose growth comes from `budget`.
    pub fn new(budget: &'static Budget) -> Pipe {
        Pipe {
            budget,
            buf: vec![0; BASE],
            pos: 0,
            end: 0,
            last_read: 0,
            read_done: false,
            need_flush: false,
            copied: 0,
        }
    }
}

impl Default for Pipe {
    fn default() -> Self {
        Pipe::new(&AGENT_BUDGET)
    }
}

impl Drop for Pipe {
    fn drop(&mut self) {
        self.budget.give_back(self.buf.len() - BASE);
    }
}

impl Pipe {
    /// The buffer's size now.
    #[cfg(test)]
    fn size(&self) -> usize {
        self.buf.len()
    }

    /// Resizes the (empty) buffer for the next read.
    fn resize(&mut self) {
        let (now, want) = (self.buf.len(), next_size(self.buf.len(), self.last_read));
        if want > now {
            if self.budget.take(want - now) {
                self.buf.resize(want, 0);
            }
        } else if want < now {
            self.buf.truncate(want);
            self.buf.shrink_to_fit();
            self.budget.give_back(now - want);
        }
    }

    /// Copies until the reader ends and everything read is written and flushed;
    /// returns the bytes copied.
    pub fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        mut reader: Pin<&mut R>,
        mut writer: Pin<&mut W>,
    ) -> Poll<io::Result<u64>>
    where
        R: AsyncRead + ?Sized,
        W: AsyncWrite + ?Sized,
    {
        loop {
            if self.pos == self.end && !self.read_done {
                self.pos = 0;
                self.end = 0;
                self.resize();
                // Read while the source has data at hand, until the buffer is full: a
                // source that yields small pieces (an HTTP/2 stream gives one DATA
                // frame per read) is still written on in large writes. A socket that
                // returned a short read answers the next one from tokio's readiness
                // state, without a system call.
                loop {
                    let mut rb = ReadBuf::new(&mut self.buf[self.end..]);
                    match reader.as_mut().poll_read(cx, &mut rb) {
                        Poll::Ready(Ok(())) => {
                            let n = rb.filled().len();
                            self.end += n;
                            if n == 0 {
                                self.read_done = true;
                                break;
                            }
                            if self.end == self.buf.len() {
                                break;
                            }
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending if self.end > 0 => break,
                        Poll::Pending => {
                            // Nothing more to read now: what was written must leave
                            // before this side waits (a TLS or HTTP/2 writer buffers).
                            if self.need_flush {
                                ready!(writer.as_mut().poll_flush(cx))?;
                                self.need_flush = false;
                            }
                            return Poll::Pending;
                        }
                    }
                }
                self.last_read = self.end;
            }
            while self.pos < self.end {
                let n = ready!(
                    writer
                        .as_mut()
                        .poll_write(cx, &self.buf[self.pos..self.end])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.pos += n;
                self.copied += n as u64;
                self.need_flush = true;
            }
            if self.read_done {
                ready!(writer.as_mut().poll_flush(cx))?;
                return Poll::Ready(Ok(self.copied));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_read_doubles_the_buffer_up_to_the_maximum() {
        assert_eq!(next_size(BASE, BASE), 2 * BASE);
        assert_eq!(next_size(MAX / 2, MAX / 2), MAX);
        assert_eq!(next_size(MAX, MAX), MAX);
    }

    #[test]
    fn a_small_read_halves_it_down_to_the_base() {
        assert_eq!(next_size(MAX, 100), MAX / 2);
        assert_eq!(next_size(2 * BASE, 100), BASE);
        assert_eq!(next_size(BASE, 1), BASE);
        assert_eq!(next_size(BASE, 0), BASE);
    }

    #[test]
    fn a_read_between_a_quarter_and_full_keeps_it() {
        assert_eq!(next_size(MAX, MAX / 4), MAX);
        assert_eq!(next_size(MAX, MAX - 1), MAX);
    }

    #[test]
    fn the_budget_is_never_exceeded() {
        let budget = Budget::new(100);
        assert!(budget.take(60));
        assert!(!budget.take(41));
        assert!(budget.take(40));
        assert_eq!(budget.used(), 100);
        budget.give_back(100);
        assert!(!budget.take(usize::MAX));
        assert_eq!(budget.used(), 0);
    }

    /// What [`copy_through`] saw.
    struct Copied {
        copied: u64,
        got: Vec<u8>,
        /// The largest the pipe's buffer was, and the most its budget lent at once.
        biggest: usize,
        peak_lent: usize,
    }

    /// Copies `data` through a pipe on `budget` between two in-memory streams, then
    /// drops the pipe.
    async fn copy_through(budget: &'static Budget, data: Vec<u8>) -> Copied {
        let mut pipe = Pipe::new(budget);
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let (mut c, mut d) = tokio::io::duplex(1 << 20);
        let writer = tokio::spawn(async move {
            a.write_all(&data).await?;
            a.shutdown().await
        });
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            d.read_to_end(&mut got).await.map(|_| got)
        });
        let (mut biggest, mut peak_lent) = (0, 0);
        let copied = std::future::poll_fn(|cx| {
            let r = pipe.poll_copy(cx, Pin::new(&mut b), Pin::new(&mut c));
            biggest = biggest.max(pipe.size());
            peak_lent = peak_lent.max(budget.used());
            r
        })
        .await
        .expect("copy");
        drop(c);
        writer.await.expect("join").expect("write");
        let got = reader.await.expect("join").expect("read");
        Copied {
            copied,
            got,
            biggest,
            peak_lent,
        }
    }

    /// A bulk copy through in-memory streams grows the buffer, and every byte
    /// arrives in order; the pipe gives its growth back when it ends.
    #[tokio::test]
    async fn a_bulk_copy_grows_the_buffer_and_loses_nothing() {
        static BUDGET: Budget = Budget::new(3 * BASE);
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        let out = copy_through(&BUDGET, data.clone()).await;
        assert_eq!(out.copied, data.len() as u64);
        assert!(out.got == data, "the copy changed or lost bytes");
        assert!(out.biggest > BASE, "a bulk copy never grew the buffer");
        assert!(out.peak_lent <= 3 * BASE);
        // `copy_through` dropped the pipe.
        assert_eq!(BUDGET.used(), 0, "a pipe kept its growth after it ended");
    }

    /// With the budget spent, a busy pipe keeps its size and still copies.
    #[tokio::test]
    async fn a_spent_budget_leaves_pipes_at_their_size() {
        static SPENT: Budget = Budget::new(0);
        let out = copy_through(&SPENT, vec![7u8; 1 << 20]).await;
        assert_eq!(out.copied, 1 << 20);
        assert_eq!(out.got.len(), 1 << 20);
        assert_eq!(out.biggest, BASE);
    }

    /// A source that yields 1 KiB per read (as an HTTP/2 stream yields a frame).
    struct Trickle {
        left: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let n = self.left.min(1024).min(buf.remaining());
            buf.put_slice(&vec![1; n]);
            self.left -= n;
            Poll::Ready(Ok(()))
        }
    }

    /// A sink that records the size of every write.
    #[derive(Default)]
    struct Sizes(Vec<usize>);

    impl AsyncWrite for Sizes {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.push(buf.len());
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn small_pieces_at_hand_leave_in_large_writes() {
        static OWN: Budget = Budget::new(BUDGET);
        let mut source = Trickle { left: 1 << 20 };
        let mut sink = Sizes::default();
        let mut pipe = Pipe::new(&OWN);
        let copied = std::future::poll_fn(|cx| {
            pipe.poll_copy(cx, Pin::new(&mut source), Pin::new(&mut sink))
        })
        .await
        .expect("copy");
        assert_eq!(copied, 1 << 20);
        assert_eq!(sink.0.iter().sum::<usize>(), 1 << 20);
        assert_eq!(
            sink.0.first(),
            Some(&BASE),
            "the first write is one full buffer"
        );
        assert_eq!(
            sink.0.iter().max(),
            Some(&MAX),
            "the buffer grew to its maximum"
        );
    }
}
