//! The gRPC echo services of the L7 tests (tonic), served on the echo server's port
//! (requests with `content-type: application/grpc`) and called by
//! `mesh-testpod grpc-call`. Every answer names the pod that served it; the
//! `x-echo-slow-pod: NAME` metadata makes only pod NAME wait 100 ms.
use std::{collections::BTreeMap, net::SocketAddr, pin::Pin, time::Duration};

use anyhow::Context as _;
use futures_util::{Stream, StreamExt as _};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

pub mod pb {
    tonic::include_proto!("echo");
}

use pb::{
    Msg,
    echo_client::EchoClient,
    echo_server::{Echo, EchoServer},
    weighted_client::WeightedClient,
    weighted_server::{Weighted, WeightedServer},
};

#[derive(Clone)]
pub struct Svc {
    name: String,
}

impl Svc {
    async fn answer(&self, req: Request<Msg>) -> Result<Response<Msg>, Status> {
        let metadata: std::collections::HashMap<String, String> = req
            .metadata()
            .iter()
            .filter_map(|kv| match kv {
                tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                    Some((k.to_string(), v.to_str().unwrap_or("").to_owned()))
                }
                tonic::metadata::KeyAndValueRef::Binary(..) => None,
            })
            .collect();
        if metadata.get("x-echo-slow-pod") == Some(&self.name) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(Response::new(Msg {
            text: req.into_inner().text,
            pod: self.name.clone(),
            metadata,
        }))
    }
}

type MsgStream = Pin<Box<dyn Stream<Item = Result<Msg, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for Svc {
    async fn get(&self, req: Request<Msg>) -> Result<Response<Msg>, Status> {
        self.answer(req).await
    }

    async fn delete(&self, req: Request<Msg>) -> Result<Response<Msg>, Status> {
        self.answer(req).await
    }

    type StreamStream = MsgStream;

    async fn stream(&self, req: Request<Streaming<Msg>>) -> Result<Response<MsgStream>, Status> {
        let name = self.name.clone();
        let out = req.into_inner().map(move |m| {
            m.map(|m| Msg {
                text: m.text,
                pod: name.clone(),
                metadata: Default::default(),
            })
        });
        Ok(Response::new(Box::pin(out)))
    }
}

#[tonic::async_trait]
impl Weighted for Svc {
    async fn call(&self, req: Request<Msg>) -> Result<Response<Msg>, Status> {
        self.answer(req).await
    }
}

/// Both services, ready to serve requests handed over by the echo server.
pub fn routes(name: &str) -> tonic::service::Routes {
    let svc = Svc {
        name: name.to_owned(),
    };
    tonic::service::Routes::new(EchoServer::new(svc.clone())).add_service(WeightedServer::new(svc))
}

/// What `grpc-call` does.
pub struct CallArgs<'a> {
    pub addr: SocketAddr,
    /// The `:authority`.
    pub host: &'a str,
    /// `get`, `delete`, `weighted` (unary, `count` calls, `concurrency` at once, on
    /// one HTTP/2 connection) or `stream` (one bidirectional stream of `count`
    /// messages, each answered before the next is sent).
    pub method: &'a str,
    pub count: usize,
    pub concurrency: usize,
    pub metadata: &'a [(String, String)],
}

fn with_metadata<T>(msg: T, metadata: &[(String, String)]) -> anyhow::Result<Request<T>> {
    let mut req = Request::new(msg);
    for (k, v) in metadata {
        let key: tonic::metadata::MetadataKey<tonic::metadata::Ascii> = k.parse()?;
        req.metadata_mut().insert(key, v.parse()?);
    }
    Ok(req)
}

pub async fn call(a: CallArgs<'_>) -> anyhow::Result<Value> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", a.addr))?
        .origin(format!("http://{}", a.host).parse()?)
        .connect()
        .await
        .with_context(|| format!("connecting to {}", a.addr))?;
    if a.method == "stream" {
        let mut client = EchoClient::new(channel);
        let (tx, rx) = mpsc::channel(1);
        let msg = |i: usize| Msg {
            text: format!("message {i}"),
            ..Default::default()
        };
        tx.send(msg(0)).await?;
        let mut inbound = client
            .stream(with_metadata(ReceiverStream::new(rx), a.metadata)?)
            .await?
            .into_inner();
        let mut pod = String::new();
        for i in 0..a.count {
            let m = inbound.message().await?.context("the stream ended early")?;
            anyhow::ensure!(
                m.text == format!("message {i}"),
                "echo {i} was {:?}",
                m.text
            );
            pod = m.pod;
            if i + 1 < a.count {
                tx.send(msg(i + 1)).await?;
            }
        }
        drop(tx);
        // The end of the stream carries the status (trailers): OK.
        let end = inbound.message().await;
        return Ok(json!({
            "echoed": a.count,
            "pod": pod,
            "end": match end { Ok(None) => "ok".to_owned(), Ok(Some(_)) => "more".to_owned(), Err(s) => format!("{:?}", s.code()) },
        }));
    }
    let lanes = a.concurrency.max(1);
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..lanes {
        let n = a.count / lanes + usize::from(lane < a.count % lanes);
        let (channel, method, metadata) =
            (channel.clone(), a.method.to_owned(), a.metadata.to_vec());
        tasks.spawn(async move {
            let mut out = Vec::new();
            for _ in 0..n {
                let req = with_metadata(Msg::default(), &metadata)?;
                let res = match method.as_str() {
                    "get" => EchoClient::new(channel.clone()).get(req).await,
                    "delete" => EchoClient::new(channel.clone()).delete(req).await,
                    "weighted" => WeightedClient::new(channel.clone()).call(req).await,
                    other => anyhow::bail!("no such method {other}"),
                };
                out.push(res.map(|r| {
                    let headers: BTreeMap<String, String> = r
                        .metadata()
                        .iter()
                        .filter_map(|kv| match kv {
                            tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                                Some((k.to_string(), v.to_str().unwrap_or("").to_owned()))
                            }
                            tonic::metadata::KeyAndValueRef::Binary(..) => None,
                        })
                        .collect();
                    (r.into_inner(), headers)
                }));
            }
            anyhow::Ok(out)
        });
    }
    let mut pods: BTreeMap<String, u64> = BTreeMap::new();
    let mut codes: BTreeMap<String, u64> = BTreeMap::new();
    let mut last = Value::Null;
    while let Some(done) = tasks.join_next().await {
        for r in done?? {
            match r {
                Ok((m, headers)) => {
                    *codes.entry("0".into()).or_default() += 1;
                    *pods.entry(m.pod.clone()).or_default() += 1;
                    last = json!({ "pod": m.pod, "metadata": m.metadata, "response_metadata": headers });
                }
                Err(s) => {
                    *codes.entry((s.code() as i32).to_string()).or_default() += 1;
                }
            }
        }
    }
    Ok(json!({ "pods": pods, "codes": codes, "last": last }))
}
