//! A request body that can be sent again, for retries. Each attempt gets its own
//! [`Replay`] body over one shared recording: it replays what the earlier attempts
//! already read from the client, then goes on reading the client's body (recording
//! it too), so nothing waits for the whole body before the first attempt starts (a
//! gRPC stream that waits for an answer before it sends more is not stalled).
//!
//! The recording is bounded ([`MAX_RECORDED`]): once a body is longer, the recording
//! is dropped, the attempts in flight go on streaming, and the request cannot be
//! retried any more.
//!
//! A [`Recording::follower`] (a mirrored copy) only replays what the attempts have
//! read, and waits for them for the rest: it never reads the client's body itself,
//! so a slow or failing mirror cannot hold or break the real request. It fails when
//! the recording it needs was dropped.
use std::{
    collections::VecDeque,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::HeaderMap;
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::body::{Body, BodyError};

/// A request body longer than this is not retried (Linkerd's limit).
pub const MAX_RECORDED: usize = 64 * 1024;

const TOO_LONG: &str = "the request body was too long to send again";

#[derive(Clone)]
enum Recorded {
    Data(Bytes),
    Trailers(HeaderMap),
}

impl Recorded {
    fn frame(&self) -> Frame<Bytes> {
        match self {
            Recorded::Data(d) => Frame::data(d.clone()),
            Recorded::Trailers(t) => Frame::trailers(t.clone()),
        }
    }
}

struct Shared {
    /// The client's body, until it has ended (or failed).
    inner: Option<Body>,
    /// Every frame read from `inner` so far, unless `overflowed`.
    frames: VecDeque<Recorded>,
    /// Frames read from `inner` so far.
    seen: usize,
    recorded_bytes: usize,
    cap: usize,
    overflowed: bool,
    failed: bool,
    ended: bool,
    /// Readers waiting for a frame another reader is reading (the inner body keeps
    /// only one waker).
    waiters: Vec<std::task::Waker>,
}

impl Shared {
    /// Wakes this reader when another one reads the next frame.
    fn wait(&mut self, cx: &Context<'_>) {
        if !self.waiters.iter().any(|w| w.will_wake(cx.waker())) {
            self.waiters.push(cx.waker().clone());
        }
    }
}

/// The shared recording of one request body.
#[derive(Clone)]
pub struct Recording(Arc<Mutex<Shared>>);

/// One attempt's view of the body.
struct Replay {
    shared: Recording,
    /// Frames this attempt has sent.
    pos: usize,
    /// Only replays the recording (a mirror): never reads the client's body.
    follower: bool,
}

impl Recording {
    pub fn new(body: Body) -> Recording {
        Recording::with_cap(body, MAX_RECORDED)
    }

    fn with_cap(body: Body, cap: usize) -> Recording {
        let ended = body.is_end_stream();
        Recording(Arc::new(Mutex::new(Shared {
            inner: (!ended).then_some(body),
            frames: VecDeque::new(),
            seen: 0,
            recorded_bytes: 0,
            cap,
            overflowed: false,
            failed: false,
            ended,
            waiters: Vec::new(),
        })))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A body for the next attempt.
    pub fn attempt(&self) -> Body {
        Replay {
            shared: self.clone(),
            pos: 0,
            follower: false,
        }
        .boxed()
    }

    /// A body that replays what the attempts read, as they read it.
    pub fn follower(&self) -> Body {
        Replay {
            shared: self.clone(),
            pos: 0,
            follower: true,
        }
        .boxed()
    }

    /// Whether another attempt can send the whole body again.
    pub fn can_retry(&self) -> bool {
        let s = self.lock();
        !s.overflowed && !s.failed
    }
}

impl HttpBody for Replay {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let shared = self.shared.clone();
        let mut s = shared.lock();
        if self.pos < s.seen {
            if s.overflowed {
                return Poll::Ready(Some(Err(TOO_LONG.into())));
            }
            let frame = s.frames[self.pos].frame();
            self.pos += 1;
            return Poll::Ready(Some(Ok(frame)));
        }
        if s.failed {
            return Poll::Ready(Some(Err("the client's request body failed".into())));
        }
        if s.overflowed && self.follower {
            return Poll::Ready(Some(Err(TOO_LONG.into())));
        }
        let Some(inner) = s.inner.as_mut() else {
            return Poll::Ready(None);
        };
        // A follower never reads the client's body; an attempt that finds it not
        // ready waits beside the others (the inner body keeps only one waker).
        let polled = if self.follower {
            None
        } else {
            match Pin::new(inner).poll_frame(cx) {
                Poll::Pending => None,
                Poll::Ready(p) => Some(p),
            }
        };
        let Some(polled) = polled else {
            s.wait(cx);
            return Poll::Pending;
        };
        for w in s.waiters.drain(..) {
            w.wake();
        }
        match polled {
            None => {
                s.inner = None;
                s.ended = true;
                Poll::Ready(None)
            }
            Some(Err(e)) => {
                s.inner = None;
                s.failed = true;
                Poll::Ready(Some(Err(e)))
            }
            Some(Ok(frame)) => {
                s.seen += 1;
                self.pos = s.seen;
                let len = frame.data_ref().map_or(0, Bytes::len);
                if !s.overflowed {
                    if s.recorded_bytes + len > s.cap {
                        s.overflowed = true;
                        s.frames = VecDeque::new();
                    } else {
                        s.recorded_bytes += len;
                        let r = match frame.data_ref() {
                            Some(d) => Some(Recorded::Data(d.clone())),
                            None => frame.trailers_ref().cloned().map(Recorded::Trailers),
                        };
                        // A frame of an unknown kind is not kept: replaying without
                        // it would send a different body.
                        match r {
                            Some(r) => s.frames.push_back(r),
                            None => {
                                s.overflowed = true;
                                s.frames = VecDeque::new();
                            }
                        }
                    }
                }
                if s.inner.as_ref().is_some_and(HttpBody::is_end_stream) {
                    s.inner = None;
                    s.ended = true;
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.shared.lock();
        s.ended && self.pos >= s.seen
    }

    fn size_hint(&self) -> SizeHint {
        let s = self.shared.lock();
        let replayed: u64 = if s.overflowed {
            0
        } else {
            s.frames
                .iter()
                .skip(self.pos)
                .map(|f| match f {
                    Recorded::Data(d) => d.len() as u64,
                    Recorded::Trailers(_) => 0,
                })
                .sum()
        };
        let inner = s
            .inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), HttpBody::size_hint);
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + replayed);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + replayed);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::http::body;

    async fn read(b: Body) -> Result<Vec<u8>, BodyError> {
        Ok(b.collect().await?.to_bytes().to_vec())
    }

    fn chunks(parts: &[&'static [u8]]) -> Body {
        let frames: Vec<Result<Frame<Bytes>, BodyError>> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        http_body_util::StreamBody::new(futures_util::stream::iter(frames)).boxed()
    }

    #[tokio::test]
    async fn every_attempt_sends_the_whole_body() {
        let r = Recording::new(chunks(&[b"ab", b"cd", b"e"]));
        assert_eq!(read(r.attempt()).await.ok(), Some(b"abcde".to_vec()));
        assert!(r.can_retry());
        assert_eq!(read(r.attempt()).await.ok(), Some(b"abcde".to_vec()));
        let empty = Recording::new(body::empty());
        assert_eq!(read(empty.attempt()).await.ok(), Some(Vec::new()));
        assert!(empty.can_retry());
    }

    #[tokio::test]
    async fn a_second_attempt_picks_up_where_the_first_stopped() {
        let r = Recording::new(chunks(&[b"ab", b"cd", b"e"]));
        let mut first = r.attempt();
        let f = first.frame().await;
        assert_eq!(
            f.and_then(|f| f.ok())
                .and_then(|f| f.into_data().ok())
                .as_deref(),
            Some(&b"ab"[..])
        );
        drop(first);
        assert_eq!(read(r.attempt()).await.ok(), Some(b"abcde".to_vec()));
    }

    #[tokio::test]
    async fn a_follower_replays_what_the_attempt_reads_and_never_reads_itself() {
        let r = Recording::new(chunks(&[b"ab", b"cd"]));
        let follower = tokio::spawn(read(r.follower()));
        tokio::task::yield_now().await;
        assert!(!follower.is_finished(), "the follower read on its own");
        assert_eq!(read(r.attempt()).await.ok(), Some(b"abcd".to_vec()));
        let got = follower.await.ok().and_then(|r| r.ok());
        assert_eq!(got, Some(b"abcd".to_vec()));
        // Over the cap: the follower fails, the attempt is whole.
        let r = Recording::with_cap(chunks(&[b"abcd", b"efgh"]), 6);
        let follower = tokio::spawn(read(r.follower()));
        assert_eq!(read(r.attempt()).await.ok(), Some(b"abcdefgh".to_vec()));
        assert!(matches!(follower.await, Ok(Err(_))));
    }

    #[tokio::test]
    async fn a_body_over_the_cap_streams_once_and_is_not_retried() {
        let r = Recording::with_cap(chunks(&[b"abcd", b"efgh"]), 6);
        assert_eq!(read(r.attempt()).await.ok(), Some(b"abcdefgh".to_vec()));
        assert!(!r.can_retry());
        assert!(read(r.attempt()).await.is_err());
    }
}
