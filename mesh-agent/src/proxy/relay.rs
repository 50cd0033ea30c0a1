//! Copying bytes both ways until both sides are done, or until policy takes the
//! connection back, counting them as they pass (live for `meshctl conns`, and into the
//! Istio byte counters).
pub mod pipe;

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;

use self::pipe::Pipe;

use crate::telemetry::{ConnHandle, conns::Tally};

#[derive(Debug, thiserror::Error)]
pub enum RelayEnd {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("closed by authorization policy")]
    Revoked,
}

/// A stream whose reads are counted into every tally given.
struct Counted<'a, S: ?Sized> {
    inner: &'a mut S,
    tallies: Vec<Tally<'a>>,
}

impl<S: AsyncRead + Unpin + ?Sized> AsyncRead for Counted<'_, S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut *self.inner).poll_read(cx, buf))?;
        let n = (buf.filled().len() - before) as u64;
        if n > 0 {
            self.tallies.iter().for_each(|t| t.add(n));
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin + ?Sized> AsyncWrite for Counted<'_, S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut *self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut *self.inner).poll_shutdown(cx)
    }
}

/// Relays between `client` and `server`. Every handle in `conns` counts the bytes (a
/// same-node connection is reported by both its source and its destination view).
/// Returns (bytes client -> server, bytes server -> client).
pub async fn relay<A, B>(
    client: &mut A,
    server: &mut B,
    revoked: &CancellationToken,
    conns: &[&ConnHandle],
) -> Result<(u64, u64), RelayEnd>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut up, mut down) = (Vec::new(), Vec::new());
    for c in conns {
        let (u, d) = c.tallies();
        up.push(u);
        down.push(d);
    }
    let mut client = Counted {
        inner: client,
        tallies: up,
    };
    let mut server = Counted {
        inner: server,
        tallies: down,
    };
    tokio::select! {
        r = bidirectional(&mut client, &mut server) => Ok(r?),
        _ = revoked.cancelled() => Err(RelayEnd::Revoked),
    }
}

/// One direction's progress: copying, then shutting the writer down (FIN), then done.
enum Half {
    Copying(Pipe),
    ShuttingDown(u64),
    Done(u64),
}

impl Half {
    fn poll<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<std::io::Result<u64>>
    where
        R: AsyncRead + Unpin + ?Sized,
        W: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            match self {
                Half::Copying(pipe) => {
                    let n = ready!(pipe.poll_copy(cx, Pin::new(&mut *r), Pin::new(&mut *w)))?;
                    *self = Half::ShuttingDown(n);
                }
                Half::ShuttingDown(n) => {
                    let n = *n;
                    ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                    *self = Half::Done(n);
                }
                Half::Done(n) => return Poll::Ready(Ok(*n)),
            }
        }
    }
}

/// Copies both ways until both sides have ended (each end's FIN passed on as a
/// shutdown of the other), as tokio's `copy_bidirectional` does, through [`Pipe`]s.
pub async fn bidirectional<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let (mut up, mut down) = (
        Half::Copying(Pipe::default()),
        Half::Copying(Pipe::default()),
    );
    std::future::poll_fn(|cx| {
        let up = up.poll(cx, a, b)?;
        let down = down.poll(cx, b, a)?;
        let (Poll::Ready(up), Poll::Ready(down)) = (up, down) else {
            return Poll::Pending;
        };
        Poll::Ready(Ok((up, down)))
    })
    .await
}

/// Closes with RST rather than FIN, so the peer sees a failed connection, not an
/// empty response.
pub fn reset(stream: impl Into<tokio::net::TcpStream>) {
    let stream = stream.into();
    let sock = socket2::SockRef::from(&stream);
    let _ = sock.set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
