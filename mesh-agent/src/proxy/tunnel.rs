//! The tunnel's client side: one HTTP/2 CONNECT stream to the destination pod's
//! `:15008`, over a pooled mTLS connection that presents the source workload's
//! certificate and accepts only the destination identity the config expects.
use std::{
    net::SocketAddr,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use hyper::{
    Method, Request, Response, StatusCode, body::Incoming, client::conn::http2::SendRequest,
    upgrade::Upgraded,
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_common::INBOUND_TUNNEL_PORT;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::TlsConnector;
use tracing::{Instrument, debug, debug_span};

use super::{
    PodContext, ProxyContext, TunnelError,
    dial::{DialError, dial_from},
    http::{
        DST_HEADER, PROTO_HEADER, Wire,
        body::{self, Body},
    },
    pool::{KeyRef, Lease},
};
use crate::identity::{Identity, client_config};

/// The server side's bound on a client's TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 PING on every pooled connection, idle or not, and how long an answer may
/// take: a peer that stops answering is found within their sum. The answer may take
/// as long as unacknowledged data may (TCP_USER_TIMEOUT): a peer agent that stalls
/// for a few seconds (a CPU-starved node, a SIGSTOP, a long GC-like pause in a
/// neighbour) must not cost every connection it carries. The soak stops a peer
/// agent for 10 s and checks that none ends.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);
/// Kernel keepalive probes on an idle tunnel socket: the peer's kernel answers them
/// even while its agent is stopped, so they only find a dead host or link.
const TCP_PROBE_INTERVAL: Duration = Duration::from_secs(5);
/// Unacknowledged data on a tunnel socket for this long ends it (TCP_USER_TIMEOUT).
pub const TCP_USER_TIMEOUT: Duration = Duration::from_secs(20);
/// Flow-control windows: large enough that one stream can fill a fast link, small
/// enough to bound what a peer can make the agent hold. The connection window is the
/// bound per tunnel connection: a peer can never have more than it sent and unread.
pub const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
pub const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// The largest HTTP/2 frame each side accepts (RFC 9113 §6.5.2; the default is
/// 16 KiB): a relay's 64 KiB write crosses as one DATA frame, not four. A frame is
/// held whole before it is passed on, so this is also the most one frame makes a
/// side buffer.
pub const MAX_FRAME_SIZE: u32 = 64 * 1024;
/// The most one write hands to an HTTP/2 stream. hyper copies each write into one
/// allocation; at 128 KiB and more glibc maps and unmaps each one (the threshold is
/// fixed in `memory.rs`), and a bulk transfer then spent a tenth of its agents' CPU
/// in page faults. A larger write is taken in several, with no system call between.
pub const MAX_STREAM_WRITE: usize = 64 * 1024;
/// A read buffer under TLS on every tunnel socket: rustls asks its transport for at
/// most 4 KiB at a time, so without it a 16 KiB record costs four `read` calls. One
/// buffer per tunnel connection (they are pooled and few), not per stream.
pub const TLS_READ_BUFFER: usize = 64 * 1024;

/// An open CONNECT stream; holds its pool lease for as long as it lives.
pub struct TunnelStream {
    pub io: TokioIo<Upgraded>,
    _lease: Lease,
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_read(cx, buf)
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, capped(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// At most [`MAX_STREAM_WRITE`] of `buf`.
fn capped(buf: &[u8]) -> &[u8] {
    &buf[..buf.len().min(MAX_STREAM_WRITE)]
}

/// The server side of a CONNECT stream, with writes capped as [`TunnelStream`]'s are.
pub struct ServedStream(pub TokioIo<Upgraded>);

impl AsyncRead for ServedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ServedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, capped(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

async fn lease(
    pod: &PodContext,
    ctx: &ProxyContext,
    dest: &Identity,
    target: SocketAddr,
) -> Result<Lease, TunnelError> {
    let addr = SocketAddr::new(target.ip(), INBOUND_TUNNEL_PORT);
    let key = KeyRef {
        source_pod: pod.netns_cookie,
        source: &pod.identity,
        dest,
        addr,
        shard: super::shards::current(),
    };
    // The handshake's future is boxed: it is large (TLS and HTTP/2 setup) and rarely
    // needed, and held inline it would make every request's and every connection's
    // future that much larger, which each spawn and move copies.
    ctx.pool
        .lease(key, || Box::pin(dial(pod, ctx, dest, addr)))
        .await
}

/// Whether the peer cannot have acted on a stream that failed with `e`, so that it may
/// be opened again on another connection: the request never left this agent (the
/// pooled connection closed first), or the peer's GOAWAY excluded it (RFC 9113 §6.8:
/// streams above its last stream id were not processed), or the peer refused it
/// (REFUSED_STREAM, §8.7). A peer agent that hands over to a successor sends GOAWAY
/// on every tunnel connection, and the first stream opened on each after that fails
/// this way; without a second try that stream's client would be reset.
pub fn not_processed(e: &hyper::Error) -> bool {
    if e.is_canceled() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h2) = s.downcast_ref::<h2::Error>() {
            return (h2.is_go_away() && h2.is_remote())
                || h2.reason() == Some(h2::Reason::REFUSED_STREAM);
        }
        source = s.source();
    }
    false
}

/// One HTTP request to `target` in the destination pod, as an HTTP/2 stream on the
/// pooled tunnel connection (the same connection CONNECT streams use: no new TCP or
/// TLS handshake per request). `req` is already in HTTP/2 form; `app` is what the
/// destination agent speaks to the application. A request the peer never processed
/// (see [`not_processed`]) and that comes back whole is sent once more on another
/// connection.
pub async fn send_request(
    pod: &PodContext,
    ctx: &ProxyContext,
    dest: &Identity,
    target: SocketAddr,
    app: Wire,
    mut req: Request<Body>,
) -> Result<Response<Incoming>, TunnelError> {
    let h = req.headers_mut();
    h.insert(
        DST_HEADER,
        http::HeaderValue::from_str(&target.to_string())
            .map_err(|e| TunnelError::Request(http::Error::from(e)))?,
    );
    h.insert(
        PROTO_HEADER,
        http::HeaderValue::from_static(match app {
            Wire::Http1 => "HTTP/1.1",
            Wire::Http2 => "HTTP/2",
        }),
    );
    let mut retried = false;
    loop {
        let lease = lease(pod, ctx, dest, target).await?;
        let mut sender = lease.sender();
        match tokio::time::timeout(ctx.connect_timeout, sender.ready()).await {
            Ok(Ok(())) => {}
            // Nothing was sent on a connection that is not ready: always safe to retry.
            Ok(Err(_)) if !retried => {
                lease.mark_dead();
                retried = true;
                continue;
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                lease.mark_dead();
                return Err(TunnelError::StreamTimeout(ctx.connect_timeout));
            }
        }
        match sender.try_send_request(req).await {
            Ok(resp) => return Ok(resp),
            Err(mut e) => match e.take_message() {
                Some(back) if !retried && not_processed(e.error()) => {
                    debug!(error = %e.error(), "the peer did not take the request; sending it on another connection");
                    lease.mark_dead();
                    retried = true;
                    req = back;
                }
                _ => return Err(e.into_error().into()),
            },
        }
    }
}

/// Opens a CONNECT stream to `target`, once more on another connection if the peer
/// did not process the first (see [`not_processed`]).
pub async fn open(
    pod: &PodContext,
    ctx: &ProxyContext,
    dest: &Identity,
    target: SocketAddr,
) -> Result<TunnelStream, TunnelError> {
    let mut retried = false;
    loop {
        let lease = lease(pod, ctx, dest, target).await?;
        match open_on(&lease, target, ctx.connect_timeout).await {
            Ok(upgraded) => {
                return Ok(TunnelStream {
                    io: TokioIo::new(upgraded),
                    _lease: lease,
                });
            }
            Err(Attempt { error, retry }) if retry && !retried => {
                debug!(%error, "the peer did not take the stream; opening it on another connection");
                // It takes no new streams; those it carries go on.
                lease.mark_dead();
                retried = true;
            }
            Err(Attempt { error, .. }) => return Err(error),
        }
    }
}

/// A failed attempt to open a stream, and whether another connection may be tried.
struct Attempt {
    error: TunnelError,
    retry: bool,
}

/// One CONNECT stream on `lease`'s connection.
async fn open_on(
    lease: &Lease,
    target: SocketAddr,
    timeout: Duration,
) -> Result<Upgraded, Attempt> {
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(target.to_string())
        .body(body::empty())
        .map_err(|e| Attempt {
            error: TunnelError::Request(e),
            retry: false,
        })?;
    let mut sender = lease.sender();
    // A pooled connection to a peer that went silent would take the stream and never
    // answer: opening a stream has the connect timeout, and a connection that misses
    // it takes no more streams.
    let opened = tokio::time::timeout(timeout, async {
        // Nothing was sent when the connection is not ready: always safe to retry.
        sender.ready().await.map_err(|e| Attempt {
            error: e.into(),
            retry: true,
        })?;
        let sent = async {
            let resp = sender.send_request(req).await?;
            if resp.status() != StatusCode::OK {
                return Err(TunnelError::Status(resp.status()));
            }
            Ok(hyper::upgrade::on(resp).await?)
        };
        sent.await.map_err(|error| Attempt {
            retry: matches!(&error, TunnelError::Http(e) if not_processed(e)),
            error,
        })
    })
    .await;
    match opened {
        Ok(r) => r,
        Err(_) => {
            lease.mark_dead();
            Err(Attempt {
                error: TunnelError::StreamTimeout(timeout),
                retry: false,
            })
        }
    }
}

async fn dial(
    pod: &PodContext,
    ctx: &ProxyContext,
    dest: &Identity,
    addr: SocketAddr,
) -> Result<SendRequest<Body>, TunnelError> {
    if ctx.secrets.current(&pod.identity).is_none() {
        return Err(TunnelError::NoCertificate);
    }
    let config = client_config(&ctx.secrets, &pod.identity, dest)?;
    let tcp = dial_from(&pod.netns, addr, ctx.connect_timeout)
        .await
        .map_err(|e| match e {
            DialError::Io(e) => TunnelError::Connect(e),
            DialError::Timeout(t) => TunnelError::ConnectTimeout(t),
        })?;
    // Dead peers are found by the kernel too: keepalive probes on an idle socket, and
    // the user timeout on data that is never acknowledged.
    let sock = socket2::SockRef::from(&tcp);
    let _ = sock.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_INTERVAL)
            .with_interval(TCP_PROBE_INTERVAL)
            .with_retries(3),
    );
    let _ = sock.set_tcp_user_timeout(Some(TCP_USER_TIMEOUT));
    let tls = tokio::time::timeout(
        ctx.connect_timeout,
        TlsConnector::from(config).connect(
            ServerName::IpAddress(addr.ip().into()),
            tokio::io::BufReader::with_capacity(TLS_READ_BUFFER, tcp),
        ),
    )
    .await
    .map_err(|_| TunnelError::Handshake(std::io::ErrorKind::TimedOut.into()))?
    .map_err(|e| TunnelError::Handshake(readable(e)))?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME_SIZE)
        // A request's HEADERS and its body's DATA leave in one write (see `coalesce`).
        .handshake(TokioIo::new(super::coalesce::Coalesced::new(tls)))
        .await?;
    let span = debug_span!("tunnel_out", dest = %dest, %addr);
    tokio::spawn(
        async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "tunnel connection ended with an error");
            }
        }
        .instrument(span),
    );
    Ok(sender)
}

/// rustls shows a custom verifier's error with `Debug`; say it in words instead.
fn readable(e: std::io::Error) -> std::io::Error {
    use rustls::{CertificateError, Error, OtherError};
    let words = match e.get_ref().and_then(|inner| inner.downcast_ref::<Error>()) {
        Some(Error::InvalidCertificate(CertificateError::Other(OtherError(other)))) => {
            Some(format!("invalid peer certificate: {other}"))
        }
        _ => None,
    };
    match words {
        Some(w) => std::io::Error::new(e.kind(), w),
        None => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::service::service_fn;
    use tokio::sync::oneshot;

    /// Every tunnelled request and connection awaits a lease; the handshake it may
    /// need is rare and large, and held inline it grew each of them by its size.
    #[test]
    fn a_lease_does_not_hold_the_handshake_inline() {
        let lease = crate::proxy::future_size::of4(&lease);
        let dial = crate::proxy::future_size::of4(&dial);
        // 480 and 5,784 bytes when the handshake was boxed.
        assert!(
            lease <= 1024 && lease * 4 < dial,
            "a lease's future is {lease} bytes, a handshake's {dial}"
        );
    }

    /// An HTTP/2 server on loopback for one connection: `/fail` makes its service fail
    /// (the stream is reset after the server took it); a message on the returned
    /// channel shuts it down gracefully (GOAWAY), as a draining agent does.
    async fn server() -> (SocketAddr, oneshot::Sender<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let service = service_fn(|req: Request<Incoming>| async move {
                if req.uri().path() == "/fail" {
                    Err(std::io::Error::other("the service failed"))
                } else {
                    Ok(Response::new(body::empty()))
                }
            });
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = rx => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
        (addr, tx)
    }

    async fn client(addr: SocketAddr) -> SendRequest<Body> {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
            .handshake(TokioIo::new(tcp))
            .await
            .unwrap();
        tokio::spawn(conn);
        sender
    }

    fn get(path: &str) -> Request<Body> {
        Request::builder()
            .uri(format!("http://peer{path}"))
            .body(body::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn a_stream_the_peer_took_is_processed_and_one_after_its_goaway_is_not() {
        let (addr, shutdown) = server().await;
        let mut sender = client(addr).await;
        sender.ready().await.unwrap();
        assert!(sender.send_request(get("/")).await.is_ok());
        // The server took the stream and its service failed: not to be sent again.
        let e = sender.send_request(get("/fail")).await.unwrap_err();
        assert!(!not_processed(&e), "{e:?}");
        // A long-lived stream (its request body never ends) keeps the connection open
        // through the server's drain, as a relayed connection does.
        let never: Body = http_body_util::BodyExt::boxed(http_body_util::StreamBody::new(
            futures_util::stream::pending::<
                Result<hyper::body::Frame<bytes::Bytes>, body::BodyError>,
            >(),
        ));
        let held = Request::post("http://peer/hold").body(never).unwrap();
        let _held = sender.send_request(held).await.unwrap();
        // The server goes away (GOAWAY). Whether hyper has seen it when the next
        // request comes (then it hands the request back unsent) or not (then the
        // peer's GOAWAY refuses the stream), the request was not processed.
        shutdown.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let e = sender
            .try_send_request(get("/"))
            .await
            .expect_err("the peer went away");
        assert!(not_processed(e.error()), "{:?}", e.error());
    }
}
