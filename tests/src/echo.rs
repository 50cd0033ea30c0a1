//! The HTTP echo server and client of the L7 tests (`mesh-testpod echo-serve`,
//! `mesh-testpod echo-get`).
//!
//! Requests with `content-type: application/grpc` go to the tonic echo services
//! (`grpc.rs`); every other request (HTTP/1.1 or h2c, on the same port) gets a JSON body
//! saying what it received: the pod that answered, method, path with query, host
//! (`Host` or `:authority`), protocol and headers. Request headers steer it:
//! `x-echo-status: N` answers with status N, `x-echo-delay-ms: N` waits first;
//! with `x-echo-fail-first: N` and `x-echo-key: K`, only the first N requests with key
//! K get that status (default 500) and the later ones 200 (a backend that recovers,
//! for retries); `x-echo-slow-pod: NAME` makes only the pod NAME wait 100 ms. The
//! response carries `x-echo-pod`. A request body is read to the end and its length
//! and SHA-256 reported.
//!
//! The client sends `count` requests one after another on one connection and prints
//! a JSON summary: statuses and answering pods counted, the last answer's body and
//! headers.
use std::{collections::BTreeMap, convert::Infallible, net::SocketAddr, time::Duration};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Request, Response, body::Incoming, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::net::{TcpListener, TcpStream};

pub async fn serve(name: String, port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from(([0u8; 16], port)))
        .await
        .or(TcpListener::bind(SocketAddr::from(([0u8; 4], port))).await)?;
    eprintln!("listening on {port}");
    let grpc = crate::grpc::routes(&name);
    loop {
        let (stream, _) = listener.accept().await?;
        let name = name.clone();
        let grpc = grpc.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (name, mut grpc) = (name.clone(), grpc.clone());
                async move {
                    let is_grpc = req
                        .headers()
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .is_some_and(|v| v.starts_with("application/grpc"));
                    let r = if req.headers().contains_key("x-echo-stream") {
                        crate::stream::answer(&name, req)
                    } else if is_grpc {
                        use tower::Service as _;
                        match grpc.call(req).await {
                            Ok(r) => {
                                r.map(|b| b.map_err(crate::stream::BoxError::from).boxed_unsync())
                            }
                            Err(never) => match never {},
                        }
                    } else {
                        answer(&name, req)
                            .await
                            .map(|b| b.map_err(|never| match never {}).boxed_unsync())
                    };
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Requests seen per `x-echo-key`.
static SEEN: std::sync::Mutex<BTreeMap<String, u64>> = std::sync::Mutex::new(BTreeMap::new());

async fn answer(name: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let header = |k: &str| {
        req.headers()
            .get(k)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut status: u16 = header("x-echo-status")
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    if let Some(n) = header("x-echo-fail-first").and_then(|s| s.parse::<u64>().ok()) {
        let key = header("x-echo-key").unwrap_or_default();
        let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
        let count = seen.entry(key).or_default();
        *count += 1;
        status = if *count <= n {
            header("x-echo-status")
                .and_then(|s| s.parse().ok())
                .unwrap_or(500)
        } else {
            200
        };
    }
    let mut delay: u64 = header("x-echo-delay-ms")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    // One slow endpoint among several: only the pod named here waits 100 ms.
    if header("x-echo-slow-pod").as_deref() == Some(name) {
        delay = delay.max(100);
    }
    let mut headers: BTreeMap<String, String> = BTreeMap::new();
    for (k, v) in req.headers() {
        let v = v.to_str().unwrap_or("(binary)");
        headers
            .entry(k.as_str().to_owned())
            .and_modify(|e| {
                e.push(',');
                e.push_str(v);
            })
            .or_insert_with(|| v.to_owned());
    }
    let host = req
        .uri()
        .authority()
        .map(|a| a.to_string())
        .or_else(|| header("host"))
        .unwrap_or_default();
    let proto = format!("{:?}", req.version());
    let method = req.method().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let mut hasher = Sha256::new();
    let mut len = 0u64;
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Some(d) = frame.data_ref() {
            len += d.len() as u64;
            hasher.update(d);
        }
    }
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let sha: String = hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let out = json!({
        "pod": name, "method": method, "path": path, "host": host, "proto": proto,
        "headers": headers, "body_len": len, "body_sha": sha,
    });
    let mut r = Response::new(Full::new(Bytes::from(out.to_string())));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    r.headers_mut().insert(
        "x-echo-pod",
        hyper::header::HeaderValue::from_str(name)
            .unwrap_or(hyper::header::HeaderValue::from_static("?")),
    );
    r.headers_mut().insert(
        "content-type",
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

#[derive(Clone)]
enum Sender {
    H1(std::sync::Arc<tokio::sync::Mutex<hyper::client::conn::http1::SendRequest<Full<Bytes>>>>),
    H2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

/// One answer: status, headers, body.
type Answer = (u16, BTreeMap<String, String>, Value);

async fn once(sender: &Sender, req: Request<Full<Bytes>>) -> anyhow::Result<Answer> {
    let resp = match sender {
        Sender::H1(s) => {
            let mut s = s.lock().await;
            s.ready().await?;
            let resp = s.send_request(req).await?;
            let status = resp.status().as_u16();
            let headers = headers_of(resp.headers());
            let body = resp.into_body().collect().await?.to_bytes();
            return Ok((status, headers, parse(&body)));
        }
        Sender::H2(s) => {
            let mut s = s.clone();
            s.ready().await?;
            s.send_request(req).await?
        }
    };
    let status = resp.status().as_u16();
    let headers = headers_of(resp.headers());
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, headers, parse(&body)))
}

fn headers_of(h: &hyper::HeaderMap) -> BTreeMap<String, String> {
    h.iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
        .collect()
}

fn parse(body: &[u8]) -> Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

/// What `get` is to send.
pub struct GetArgs<'a> {
    pub addr: SocketAddr,
    pub path: &'a str,
    pub h2: bool,
    pub count: usize,
    /// Requests in flight at once (HTTP/2 only; HTTP/1.1 is one at a time).
    pub concurrency: usize,
    pub method: &'a str,
    pub host: Option<&'a str>,
    pub headers: &'a [(String, String)],
    /// (method, path): sent after the others on the same connection.
    pub then: &'a [(String, String)],
    /// A request body of this many bytes (0: none).
    pub body_bytes: usize,
}

/// `count` requests on one connection, and a summary of the answers.
pub async fn get(a: GetArgs<'_>) -> anyhow::Result<Value> {
    let tcp = TcpStream::connect(a.addr)
        .await
        .with_context(|| format!("connecting to {}", a.addr))?;
    let io = TokioIo::new(tcp);
    let sender = if a.h2 {
        let (s, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
        tokio::spawn(conn);
        Sender::H2(s)
    } else {
        let (s, conn) = hyper::client::conn::http1::handshake(io).await?;
        tokio::spawn(conn.with_upgrades());
        Sender::H1(std::sync::Arc::new(tokio::sync::Mutex::new(s)))
    };
    let authority = a
        .host
        .map(str::to_owned)
        .unwrap_or_else(|| a.addr.to_string());
    let body = Bytes::from(vec![b'x'; a.body_bytes]);
    let make_for = |method: &str, path: &str| -> anyhow::Result<Request<Full<Bytes>>> {
        let mut b = Request::builder().method(method);
        b = if a.h2 {
            b.uri(format!("http://{authority}{path}"))
        } else {
            b.uri(path).header("host", &authority)
        };
        for (k, v) in a.headers {
            b = b.header(k, v);
        }
        Ok(b.body(Full::new(body.clone()))?)
    };
    let make = || make_for(a.method, a.path);
    let lanes = if a.h2 { a.concurrency.max(1) } else { 1 };
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..lanes {
        let n = a.count / lanes + usize::from(lane < a.count % lanes);
        let reqs = (0..n).map(|_| make()).collect::<anyhow::Result<Vec<_>>>()?;
        let sender = sender.clone();
        tasks.spawn(async move {
            let mut out = Vec::new();
            for r in reqs {
                out.push(once(&sender, r).await?);
            }
            anyhow::Ok(out)
        });
    }
    let mut statuses: BTreeMap<String, u64> = BTreeMap::new();
    let mut pods: BTreeMap<String, u64> = BTreeMap::new();
    let mut last: Option<Answer> = None;
    while let Some(done) = tasks.join_next().await {
        for (status, headers, body) in done?? {
            *statuses.entry(status.to_string()).or_default() += 1;
            let pod = headers.get("x-echo-pod").cloned().unwrap_or_default();
            *pods.entry(pod).or_default() += 1;
            last = Some((status, headers, body));
        }
    }
    let mut then = Vec::new();
    for (method, path) in a.then {
        let (status, _, _) = once(&sender, make_for(method, path)?).await?;
        then.push(status);
    }
    let (_, last_headers, last) = last.unwrap_or_default();
    Ok(json!({
        "statuses": statuses, "pods": pods, "last": last, "last_headers": last_headers,
        "then": then,
    }))
}

/// Connects, sends nothing for `wait`, then one GET on the same connection.
pub async fn silent_get(addr: SocketAddr, host: &str, wait: Duration) -> anyhow::Result<Value> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    tokio::time::sleep(wait).await;
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("/silent")
        .header("host", host)
        .body(Full::new(Bytes::new()))?;
    let resp = s.send_request(req).await?;
    let status = resp.status().as_u16();
    let pod = resp
        .headers()
        .get("x-echo-pod")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    Ok(json!({ "status": status, "pod": pod }))
}
