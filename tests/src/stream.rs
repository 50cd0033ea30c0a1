//! Streaming cases of the L7 tests, on the echo server's port:
//!
//! - a bidirectional stream shaped as gRPC (`x-echo-stream: 1`, HTTP/2,
//!   `application/grpc`): the server sends back each request chunk as it arrives,
//!   and answers the request's trailers with trailers of its own (`grpc-status: 0`,
//!   `x-echo-trailer` repeating the client's `x-client-trailer`). The client waits
//!   for each echo before it sends the next chunk, so any buffering on the way
//!   stalls it;
//! - a large upload streamed from a generator, its SHA-256 compared with the one the
//!   echo server computed.
use std::{convert::Infallible, net::SocketAddr};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, body::Frame, body::Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::{net::TcpStream, sync::mpsc};
use tokio_stream::wrappers::ReceiverStream;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type EchoBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// The server side of the bidirectional stream.
pub fn answer(name: &str, req: Request<Incoming>) -> Response<EchoBody> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
    let mut body = req.into_body();
    tokio::spawn(async move {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return };
            let out = match frame.into_data() {
                Ok(d) => Frame::data(d),
                Err(frame) => {
                    let Ok(t) = frame.into_trailers() else {
                        continue;
                    };
                    let mut out = hyper::HeaderMap::new();
                    out.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
                    if let Some(v) = t.get("x-client-trailer") {
                        out.insert("x-echo-trailer", v.clone());
                    }
                    Frame::trailers(out)
                }
            };
            if tx.send(Ok(out)).await.is_err() {
                return;
            }
        }
    });
    let mut r = Response::new(StreamBody::new(ReceiverStream::new(rx)).boxed_unsync());
    let h = r.headers_mut();
    h.insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/grpc"),
    );
    if let Ok(v) = hyper::header::HeaderValue::from_str(name) {
        h.insert("x-echo-pod", v);
    }
    r
}

async fn h2(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http2::SendRequest<BoxBody<Bytes, Infallible>>> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (s, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(s)
}

/// The client side: `count` chunks, each echoed before the next is sent, then
/// trailers.
pub async fn bidi(addr: SocketAddr, host: &str, path: &str, count: usize) -> anyhow::Result<Value> {
    let mut sender = h2(addr).await?;
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let req = Request::builder()
        .method("POST")
        .uri(format!("http://{host}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("x-echo-stream", "1")
        .body(StreamBody::new(ReceiverStream::new(rx)).boxed())?;
    sender.ready().await?;
    let first = format!("chunk 0 of {count}");
    tx.send(Ok(Frame::data(Bytes::from(first)))).await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let pod = resp
        .headers()
        .get("x-echo-pod")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let mut body = resp.into_body();
    let mut echoed = 0;
    let mut trailers = serde_json::Map::new();
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        match frame.into_data() {
            Ok(d) => {
                anyhow::ensure!(
                    d == format!("chunk {echoed} of {count}").as_bytes(),
                    "echo {echoed} was {d:?}"
                );
                echoed += 1;
                if echoed < count {
                    tx.send(Ok(Frame::data(Bytes::from(format!(
                        "chunk {echoed} of {count}"
                    )))))
                    .await?;
                } else {
                    let mut t = hyper::HeaderMap::new();
                    t.insert(
                        "x-client-trailer",
                        hyper::header::HeaderValue::from_static("done"),
                    );
                    tx.send(Ok(Frame::trailers(t))).await?;
                }
            }
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    for (k, v) in &t {
                        trailers.insert(k.to_string(), json!(v.to_str().unwrap_or("")));
                    }
                }
            }
        }
    }
    Ok(json!({ "status": status, "pod": pod, "echoed": echoed, "trailers": trailers }))
}

/// Streams `mib` MiB (a fixed pattern, generated as it goes) as a POST body and
/// reports both checksums.
pub async fn upload(
    addr: SocketAddr,
    host: &str,
    mib: usize,
    http2: bool,
) -> anyhow::Result<Value> {
    let chunk: Bytes = (0..1024 * 1024)
        .map(|i| (i % 251) as u8)
        .collect::<Vec<u8>>()
        .into();
    let mut hasher = Sha256::new();
    for _ in 0..mib {
        hasher.update(&chunk);
    }
    let sent_sha: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let frames = futures_util::stream::iter(
        (0..mib).map(move |_| Ok::<_, Infallible>(Frame::data(chunk.clone()))),
    );
    let body = StreamBody::new(frames).boxed();
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let resp = if http2 {
        let mut s = h2(addr).await?;
        drop(tcp);
        let req = Request::builder()
            .method("POST")
            .uri(format!("http://{host}/upload"))
            .body(body)?;
        s.ready().await?;
        s.send_request(req).await?
    } else {
        let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method("POST")
            .uri("/upload")
            .header("host", host)
            .body(body)?;
        s.ready().await?;
        s.send_request(req).await?
    };
    let status = resp.status().as_u16();
    let got = resp.into_body().collect().await?.to_bytes();
    let server: Value = serde_json::from_slice(&got).unwrap_or(Value::Null);
    Ok(json!({
        "status": status,
        "sent_sha": sent_sha,
        "sent_len": (mib as u64) * 1024 * 1024,
        "server_sha": server["body_sha"],
        "server_len": server["body_len"],
        "pod": server["pod"],
    }))
}
