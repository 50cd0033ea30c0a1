//! Opening the upstream connection from inside the source pod's network namespace,
//! with the bypass mark so the kernel programs leave it alone. Dialing from the pod
//! (not the node) keeps the pod's IP as the source address the backend sees.
use std::{net::SocketAddr, time::Duration};

use mesh_common::BYPASS_MARK;
use socket2::{Domain, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use super::{OutboundError, PodContext};

pub async fn dial(
    pod: &PodContext,
    endpoint: SocketAddr,
    timeout: Duration,
) -> Result<TcpStream, OutboundError> {
    let connect_err = |source| OutboundError::Connect { endpoint, source };
    let sock = pod
        .netns
        .run(move || -> std::io::Result<Socket> {
            let sock = Socket::new(Domain::for_address(endpoint), Type::STREAM, None)?;
            sock.set_mark(BYPASS_MARK)?;
            sock.set_nonblocking(true)?;
            sock.set_tcp_nodelay(true)?;
            Ok(sock)
        })
        .await
        .map_err(connect_err)?
        .map_err(connect_err)?;
    let sock = TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
    match tokio::time::timeout(timeout, sock.connect(endpoint)).await {
        Ok(Ok(stream)) => Ok(stream),
        Ok(Err(source)) => Err(OutboundError::Connect { endpoint, source }),
        Err(_) => Err(OutboundError::ConnectTimeout { endpoint, timeout }),
    }
}
