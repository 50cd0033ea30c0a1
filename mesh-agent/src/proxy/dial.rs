//! Opening a connection from inside a pod's network namespace, with the bypass mark so
//! the kernel programs leave it alone. Dialing from the pod (not the node) keeps the
//! pod's IP as the source address the peer sees.
use std::{net::SocketAddr, time::Duration};

use mesh_common::BYPASS_MARK;
use socket2::{Domain, Socket};
use tokio::net::{TcpSocket, TcpStream};

use crate::inpod::Netns;

/// Every socket the agent dials from a pod: marked so the kernel programs leave it
/// alone, non-blocking for tokio, and without Nagle (the agent forwards what it reads).
fn prepare(sock: &Socket) -> std::io::Result<()> {
    sock.set_mark(BYPASS_MARK)?;
    sock.set_nonblocking(true)?;
    sock.set_tcp_nodelay(true)
}

#[derive(Debug, thiserror::Error)]
pub enum DialError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

pub async fn dial_from(
    netns: &Netns,
    addr: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, DialError> {
    let sock = netns.tcp_socket(Domain::for_address(addr), prepare).await?;
    let sock = TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
    match tokio::time::timeout(timeout, sock.connect(addr)).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(DialError::Timeout(timeout)),
    }
}
