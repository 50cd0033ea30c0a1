//! Protocol detection on a client's first bytes, for a routed Service port that does
//! not declare its protocol: the HTTP/2 preface, an HTTP/1 request line, or anything
//! else (opaque TCP). At most `MAX_PEEK` bytes are read, for at most the timeout; a
//! client that sends nothing by then (it waits for the server to speak first) is
//! carried as opaque TCP, its bytes untouched. What was read is replayed to whoever
//! takes the connection next (`Prefixed`).
use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// Linkerd reads up to 1 KiB to decide.
pub const MAX_PEEK: usize = 1024;
/// How long the first bytes may take before the connection is taken for opaque TCP.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    Opaque,
}

/// The protocol of a connection that begins with `buf`, or `None` if more bytes
/// are needed to tell.
pub fn classify(buf: &[u8]) -> Option<Detected> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Some(Detected::Http2)
        } else {
            None
        };
    }
    // `METHOD SP request-target SP HTTP/1.x CRLF`; the method is a token.
    let line_end = buf.iter().position(|&b| b == b'\n');
    let line = &buf[..line_end.unwrap_or(buf.len())];
    let method_len = line.iter().take_while(|b| is_token(**b)).count();
    if method_len == 0 || method_len > 32 {
        return Some(Detected::Opaque);
    }
    if method_len < line.len() && line[method_len] != b' ' {
        return Some(Detected::Opaque);
    }
    let Some(end) = line_end else {
        return if buf.len() >= MAX_PEEK {
            Some(Detected::Opaque)
        } else {
            None
        };
    };
    let line = buf[..end].strip_suffix(b"\r").unwrap_or(&buf[..end]);
    let is_http1 = line.len() > method_len + 1
        && line[method_len] == b' '
        && (line.ends_with(b" HTTP/1.1") || line.ends_with(b" HTTP/1.0"));
    Some(if is_http1 {
        Detected::Http1
    } else {
        Detected::Opaque
    })
}

fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Reads until the protocol is known, `MAX_PEEK` bytes, the end of the stream or the
/// timeout, whichever comes first. Returns what it decided and the bytes it read.
pub async fn detect<IO: AsyncRead + Unpin>(
    io: &mut IO,
    timeout: Duration,
) -> io::Result<(Detected, Bytes)> {
    let mut buf = BytesMut::with_capacity(MAX_PEEK);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(d) = classify(&buf) {
            return Ok((d, buf.freeze()));
        }
        if buf.len() >= MAX_PEEK {
            return Ok((Detected::Opaque, buf.freeze()));
        }
        let mut chunk = [0u8; MAX_PEEK];
        let room = MAX_PEEK - buf.len();
        match tokio::time::timeout_at(deadline, io.read(&mut chunk[..room])).await {
            Ok(Ok(0)) | Err(_) => return Ok((Detected::Opaque, buf.freeze())),
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// A stream whose first bytes were already read: they are read again first.
pub struct Prefixed<IO> {
    prefix: Bytes,
    io: IO,
}

impl<IO> Prefixed<IO> {
    pub fn new(prefix: Bytes, io: IO) -> Self {
        Prefixed { prefix, io }
    }

    pub fn into_parts(self) -> (Bytes, IO) {
        (self.prefix, self.io)
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Prefixed<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Prefixed<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b""), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(classify(H2_PREFACE), Some(Detected::Http2));
        assert_eq!(
            classify(b"GET / HTTP/1.1\r\nHost: x\r\n"),
            Some(Detected::Http1)
        );
        assert_eq!(classify(b"POST /a?b HTTP/1.0\r\n"), Some(Detected::Http1));
        assert_eq!(classify(b"GET / HT"), None);
        // redis, TLS, a MySQL handshake answer, SSH: opaque at once.
        assert_eq!(classify(b"*1\r\n$4\r\nPING\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(&[0x16, 0x03, 0x01]), Some(Detected::Opaque));
        assert_eq!(classify(b"SSH-2.0-x\r\n"), Some(Detected::Opaque));
        assert_eq!(classify(b"PING\r\n"), Some(Detected::Opaque));
        // A token with no end of line within the limit is not HTTP.
        assert_eq!(classify(&[b'A'; MAX_PEEK]), Some(Detected::Opaque));
    }

    #[tokio::test]
    async fn a_silent_client_is_opaque_after_the_timeout_and_its_bytes_are_replayed() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut server = server;
        let (d, prefix) = detect(&mut server, Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!((d, prefix.len()), (Detected::Opaque, 0));

        tokio::io::AsyncWriteExt::write_all(&mut client, b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let (d, prefix) = detect(&mut server, Duration::from_secs(1)).await.unwrap();
        assert_eq!(d, Detected::Http1);
        let mut again = Prefixed::new(prefix, server);
        let mut line = vec![0u8; 17];
        again.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"GET /x HTTP/1.1\r\n");
    }
}
