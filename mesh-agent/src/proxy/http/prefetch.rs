//! A small body's first bytes, awaited before its headers are sent on: so that the
//! headers and the body leave in one HTTP/2 write (one TLS record, one TCP segment)
//! instead of two.
//!
//! Why it helps: hyper hands a body's data over only once the receiving side asks for
//! it, so a request forwarded at once leaves as a HEADERS frame, flushed alone, and a
//! DATA frame a task wake-up later. Each write costs the sender a system call and the
//! receiver a wake-up. The benchmark's work counts showed it: 5.6 writes per routed
//! request across the two agents where 4 carry it.
//!
//! Only bodies with a declared length up to [`MAX_LEN`] wait, and at most
//! [`WAIT`]: nothing streaming (gRPC sets no length), nothing large, and a body that
//! is slow to come is then streamed as before. The body is never buffered whole: what
//! was awaited is sent first, then the rest streams through.
use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderMap, header};
use http_body_util::BodyExt as _;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::body::{Body, BodyError};

/// Bodies declared longer than this are streamed at once.
pub const MAX_LEN: u64 = 64 * 1024;
/// How long the first bytes are awaited.
pub const WAIT: Duration = Duration::from_millis(50);

/// Whether the headers declare a body worth awaiting.
pub fn worth_awaiting(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .is_some_and(|n| n > 0 && n <= MAX_LEN)
}

/// The body with its first frame already read, when the headers declare a small body
/// and it comes within [`WAIT`]; else the body as it was.
pub async fn first_frame(headers: &HeaderMap, mut body: Body) -> Body {
    if !worth_awaiting(headers) || body.is_end_stream() {
        return body;
    }
    match tokio::time::timeout(WAIT, body.frame()).await {
        Ok(first) => Prefetched { first, rest: body }.boxed(),
        // Slow to come: streamed as it arrives, as without this step.
        Err(_) => body,
    }
}

/// A body whose first frame (or its end, or its error) was read ahead.
struct Prefetched {
    first: Option<Result<Frame<Bytes>, BodyError>>,
    rest: Body,
}

impl HttpBody for Prefetched {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.first.take() {
            Some(f) => Poll::Ready(Some(f)),
            None => Pin::new(&mut self.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let ahead = match &self.first {
            Some(Ok(f)) => f.data_ref().map_or(0, |d| d.len() as u64),
            _ => 0,
        };
        let rest = self.rest.size_hint();
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower() + ahead);
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper + ahead);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn declared(n: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_LENGTH,
            HeaderValue::from_str(n).expect("value"),
        );
        h
    }

    #[test]
    fn only_small_declared_bodies_are_awaited() {
        assert!(worth_awaiting(&declared("1024")));
        assert!(worth_awaiting(&declared("65536")));
        assert!(!worth_awaiting(&declared("65537")));
        assert!(!worth_awaiting(&declared("0")));
        assert!(!worth_awaiting(&declared("nonsense")));
        assert!(!worth_awaiting(&HeaderMap::new()), "no length: a stream");
    }

    #[tokio::test]
    async fn the_first_frame_is_sent_first_then_the_rest_and_nothing_is_lost() {
        let frames: Vec<Result<Frame<Bytes>, BodyError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello "))),
            Ok(Frame::data(Bytes::from_static(b"world"))),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed();
        let body = first_frame(&declared("11"), body).await;
        let got = body.collect().await.ok().map(|c| c.to_bytes());
        assert_eq!(got.as_deref(), Some(&b"hello world"[..]));
    }

    #[tokio::test]
    async fn a_body_slow_to_come_is_not_held() {
        let body = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, BodyError>,
        >())
        .boxed();
        let t0 = tokio::time::Instant::now();
        let body = first_frame(&declared("100"), body).await;
        assert!(t0.elapsed() < WAIT * 4, "held for {:?}", t0.elapsed());
        assert!(!body.is_end_stream());
    }

    #[tokio::test]
    async fn a_whole_small_body_ends_with_its_first_frame() {
        let body = super::super::body::full("12345");
        let body = first_frame(&declared("5"), body).await;
        // Read ahead: the end is known before the data is taken, so HTTP/2 can send
        // the data with END_STREAM.
        let mut body = body;
        let first = body.frame().await.and_then(Result::ok);
        assert_eq!(
            first.and_then(|f| f.into_data().ok()).as_deref(),
            Some(&b"12345"[..])
        );
        assert!(body.is_end_stream());
    }
}
