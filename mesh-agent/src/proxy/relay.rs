//! Copying bytes both ways until both sides are done, or until policy takes the
//! connection back.
use tokio::io::{AsyncRead, AsyncWrite, copy_bidirectional};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum RelayEnd {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("closed by authorization policy")]
    Revoked,
}

/// Returns (bytes a -> b, bytes b -> a).
pub async fn relay<A, B>(
    a: &mut A,
    b: &mut B,
    revoked: &CancellationToken,
) -> Result<(u64, u64), RelayEnd>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::select! {
        r = copy_bidirectional(a, b) => Ok(r?),
        _ = revoked.cancelled() => Err(RelayEnd::Revoked),
    }
}

/// Closes with RST rather than FIN, so the peer sees a failed connection, not an
/// empty response.
pub fn reset(stream: tokio::net::TcpStream) {
    let sock = socket2::SockRef::from(&stream);
    let _ = sock.set_linger(Some(std::time::Duration::ZERO));
    drop(stream);
}
