//! Bodies that count: the request body's bytes as they go up, and the response body's
//! bytes, gRPC status and end, at which the request is reported once (Istio counts a
//! request when its response is complete). A response dropped before its end (the
//! client went away) is reported with the `DC` flag.
use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll, ready},
    time::Instant,
};

use bytes::Bytes;
use http::{HeaderMap, Response};
use http_body_util::BodyExt;
use hyper::body::{Body as HttpBody, Frame, SizeHint};

use super::body::{Body, BodyError};
use crate::telemetry::{RequestEnd, RequestFacts, ResponseFlag, Telemetry};

/// A request body that adds what passes to `count`.
struct Counted {
    inner: Body,
    count: Arc<AtomicU64>,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let frame = ready!(Pin::new(&mut self.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame
            && let Some(d) = f.data_ref()
        {
            self.count.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Wraps a request body; the counter reads its bytes so far.
pub fn count(body: Body) -> (Body, Arc<AtomicU64>) {
    let count = Arc::new(AtomicU64::new(0));
    let body = Counted {
        inner: body,
        count: count.clone(),
    };
    (body.boxed(), count)
}

/// What to report when the response ends.
pub struct Report {
    pub telemetry: Arc<Telemetry>,
    pub facts: RequestFacts,
    pub start: Instant,
    pub request_bytes: Arc<AtomicU64>,
    /// The flag of a response the agent made itself (an error), else `None`.
    pub flag: ResponseFlag,
}

struct Metered {
    inner: Body,
    status: u16,
    bytes: u64,
    grpc_status: Option<u32>,
    report: Option<Report>,
}

/// The most a gRPC status can be (UNAUTHENTICATED); the gRPC spec reserves the rest.
const LAST_GRPC_STATUS: u32 = 16;
/// What a client makes of a status it does not know (the gRPC spec): UNKNOWN.
const GRPC_UNKNOWN: u32 = 2;

/// The response's gRPC status. It becomes a metric label, and the value comes from the
/// application (or a peer): a server that answered with a new number each time would
/// otherwise make four new metric series per request, without bound. A status outside
/// 0-16, or one that is not a number, is UNKNOWN, as gRPC clients read it.
fn grpc_status(h: &HeaderMap) -> Option<u32> {
    let raw = h.get("grpc-status")?;
    let known = raw
        .to_str()
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok())
        .filter(|s| *s <= LAST_GRPC_STATUS);
    Some(known.unwrap_or(GRPC_UNKNOWN))
}

impl Metered {
    fn finish(&mut self, flag: Option<ResponseFlag>) {
        let Some(r) = self.report.take() else {
            return;
        };
        let end = RequestEnd {
            status: self.status,
            grpc_status: self.grpc_status,
            flag: flag.unwrap_or(r.flag),
            duration: r.start.elapsed(),
            request_bytes: r.request_bytes.load(Ordering::Relaxed),
            response_bytes: self.bytes,
        };
        r.telemetry.request(&r.facts, &end);
    }
}

impl HttpBody for Metered {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(d) = f.data_ref() {
                    this.bytes += d.len() as u64;
                } else if let Some(t) = f.trailers_ref()
                    && let Some(s) = grpc_status(t)
                {
                    this.grpc_status = Some(s);
                }
                // hyper stops polling a body that says it has ended.
                if this.inner.is_end_stream() {
                    this.finish(None);
                }
            }
            Some(Err(_)) => this.finish(Some(ResponseFlag::ConnectionTermination)),
            None => this.finish(None),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Metered {
    fn drop(&mut self) {
        let flag = (!self.inner.is_end_stream()).then_some(ResponseFlag::DownstreamTermination);
        self.finish(flag);
    }
}

/// Wraps a response so that the request is reported when the response ends.
pub fn report(resp: Response<Body>, report: Report) -> Response<Body> {
    let status = resp.status().as_u16();
    let (parts, inner) = resp.into_parts();
    let body = Metered {
        inner,
        status,
        bytes: 0,
        // A trailers-only gRPC response carries its status in the headers.
        grpc_status: grpc_status(&parts.headers),
        report: Some(report),
    };
    Response::from_parts(parts, body.boxed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{Mode, Peer, Reporter};

    fn a_report(t: &Arc<Telemetry>, requested: &Arc<AtomicU64>) -> Report {
        Report {
            telemetry: t.clone(),
            facts: RequestFacts {
                reporter: Reporter::Source,
                mode: Mode::Local,
                source: Peer::default(),
                destination: Peer::default(),
                service: None,
                grpc: true,
                route: None,
                method: "POST".into(),
                authority: "a".into(),
                path: "/p".into(),
            },
            start: Instant::now(),
            request_bytes: requested.clone(),
            flag: ResponseFlag::None,
        }
    }

    #[tokio::test]
    async fn a_response_is_reported_once_at_its_end_with_its_trailers() {
        let t = Telemetry::new("cluster.local");
        let (req, requested) = count(super::super::body::full("12345"));
        assert_eq!(
            req.collect().await.ok().map(|c| c.to_bytes().len()),
            Some(5)
        );
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", http::HeaderValue::from_static("5"));
        let frames: Vec<Result<Frame<Bytes>, BodyError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"abc"))),
            Ok(Frame::trailers(trailers)),
        ];
        let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
        let resp = report(Response::new(body.boxed()), a_report(&t, &requested));
        let got = resp.into_body().collect().await.ok().map(|c| c.to_bytes());
        assert_eq!(got.as_deref(), Some(&b"abc"[..]));
        let text = t.metrics.encode();
        assert!(text.contains("grpc_response_status=\"5\""), "{text}");
        assert!(text.contains("istio_request_bytes_sum{"), "{text}");
        let count_line = text
            .lines()
            .find(|l| l.starts_with("istio_requests_total{"))
            .unwrap_or_default();
        assert!(count_line.ends_with(" 1"), "{text}");
        assert!(
            text.contains("istio_response_bytes_sum{") && text.contains("} 3.0"),
            "{text}"
        );
    }

    #[test]
    fn a_grpc_status_outside_the_spec_is_unknown() {
        let status = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("grpc-status", http::HeaderValue::from_static(v));
            grpc_status(&h)
        };
        assert_eq!(status("0"), Some(0));
        assert_eq!(status(" 16 "), Some(16));
        for odd in ["17", "4000000000", "99999999999", "-1", "x", ""] {
            assert_eq!(status(odd), Some(GRPC_UNKNOWN), "{odd:?}");
        }
        assert_eq!(grpc_status(&HeaderMap::new()), None);
    }

    #[tokio::test]
    async fn a_server_cannot_grow_the_metrics_with_made_up_grpc_statuses() {
        let t = Telemetry::new("cluster.local");
        let requested = Arc::new(AtomicU64::new(0));
        for status in 0..1_000u32 {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", http::HeaderValue::from(status));
            let frames: Vec<Result<Frame<Bytes>, BodyError>> = vec![Ok(Frame::trailers(trailers))];
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            let resp = report(Response::new(body.boxed()), a_report(&t, &requested));
            let _ = resp.into_body().collect().await;
        }
        let text = t.metrics.encode();
        let series = text
            .lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .count();
        // 0-16, and everything else as UNKNOWN (2).
        assert_eq!(series, 17, "{text}");
        let unknown = text
            .lines()
            .find(|l| {
                l.starts_with("istio_requests_total{") && l.contains("grpc_response_status=\"2\"")
            })
            .unwrap_or_default();
        assert!(unknown.ends_with(" 984"), "{unknown}");
    }

    #[tokio::test]
    async fn a_response_dropped_before_its_end_is_a_downstream_termination() {
        let t = Telemetry::new("cluster.local");
        let requested = Arc::new(AtomicU64::new(0));
        let body = http_body_util::StreamBody::new(futures_util::stream::pending::<
            Result<Frame<Bytes>, BodyError>,
        >());
        drop(report(
            Response::new(body.boxed()),
            a_report(&t, &requested),
        ));
        assert!(t.metrics.encode().contains("response_flags=\"DC\""));
    }
}
