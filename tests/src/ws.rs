//! WebSocket echo server and client for the L7 tests (`mesh-testpod ws-serve`,
//! `mesh-testpod ws-get`), on tokio-tungstenite.
use std::net::SocketAddr;

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

/// Echoes every text or binary message back, prefixed with the pod's name.
pub async fn serve(name: String, port: u16) -> anyhow::Result<()> {
    let listener = TcpListener::bind(SocketAddr::from(([0u8; 4], port))).await?;
    eprintln!("listening on {port}");
    loop {
        let (stream, _) = listener.accept().await?;
        let name = name.clone();
        tokio::spawn(async move {
            let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
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

/// Connects to `addr` (speaking to `host`), sends `count` text messages one at a
/// time and reports the echoes.
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
    Ok(json!({ "status": resp.status().as_u16(), "echoes": echoes }))
}
