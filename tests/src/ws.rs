//! WebSocket echo server and client for the L7 tests (`mesh-testpod ws-serve`,
//! `mesh-testpod ws-get`), on tokio-tungstenite.
use std::net::SocketAddr;

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::{
    Message,
    handshake::server::{ErrorResponse, Request, Response},
};

/// Echoes every text or binary message back, prefixed with the pod's name.
pub async fn serve(name: String, port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from(([0u8; 4], port))).await?;
    eprintln!("listening on {port}");
    loop {
        let (stream, _) = listener.accept().await?;
        let name = name.clone();
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, tell_client_cert).await
            else {
                return;
            };
            while let Some(Ok(msg)) = ws.next().await {
                let reply = match msg {
                    Message::Text(t) => Message::text(format!("{name}: {t}")),
                    Message::Binary(b) => Message::binary(b),
                    Message::Close(_) => break,
                    _ => continue,
                };
                if ws.send(reply).await.is_err() {
                    break;
                }
            }
        });
    }
}

/// The client identity the mesh told this server goes back in the 101.
// The error type is tungstenite's own (a whole HTTP response), not ours to shrink.
#[allow(clippy::result_large_err)]
fn tell_client_cert(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    if let Some(v) = req.headers().get("x-forwarded-client-cert") {
        resp.headers_mut().insert("x-seen-client-cert", v.clone());
    }
    Ok(resp)
}

/// Connects to `addr` (speaking to `host`), sends `count` text messages one at a
/// time and reports the echoes and the client identity the server was told.
pub async fn get(addr: SocketAddr, host: &str, path: &str, count: usize) -> anyhow::Result<Value> {
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("connecting to {addr}"))?;
    let (mut ws, resp) = tokio_tungstenite::client_async(format!("ws://{host}{path}"), tcp)
        .await
        .context("WebSocket handshake")?;
    let mut echoes = Vec::new();
    for i in 0..count {
        ws.send(Message::text(format!("message {i}"))).await?;
        match ws.next().await {
            Some(Ok(Message::Text(t))) => echoes.push(t.to_string()),
            other => anyhow::bail!("no echo for message {i}: {other:?}"),
        }
    }
    ws.close(None).await?;
    let client_cert = resp
        .headers()
        .get("x-seen-client-cert")
        .and_then(|v| v.to_str().ok());
    Ok(json!({ "status": resp.status().as_u16(), "echoes": echoes, "client_cert": client_cert }))
}
