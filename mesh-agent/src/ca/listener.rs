//! The CA's own accept loop. Pods can reach the CA's port, so nothing here trusts the
//! peer to be quick or few: a TLS handshake must finish within [`HANDSHAKE_TIMEOUT`],
//! connections are capped in total and per source address, a failing accept (EMFILE)
//! backs off instead of spinning, and warnings are counted, not repeated. Only
//! finished handshakes reach the gRPC server.
use std::{
    net::IpAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::mpsc,
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tracing::{debug, warn};

use crate::limits::{ConnLimits, ConnPermit, Throttle};

/// Time a client has to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections the CA holds at once (handshaking or served).
pub const MAX_CONNECTIONS: usize = 4096;
/// ... of which one source address may hold (a node's agent needs one).
pub const PER_SOURCE: usize = 16;

static ACCEPT_FAILED: Throttle = Throttle::new(Duration::from_secs(10));
static REFUSED: Throttle = Throttle::new(Duration::from_secs(10));
static HANDSHAKE_FAILED: Throttle = Throttle::new(Duration::from_secs(10));

/// A TLS connection admitted under the caps; its slot is freed when it closes.
pub struct Admitted {
    io: TlsStream<TcpStream>,
    _permit: ConnPermit<IpAddr>,
}

impl Connected for Admitted {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.io.get_ref().0.connect_info()
    }
}

impl AsyncRead for Admitted {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Admitted {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

/// Accepts on `listener` and yields connections whose handshake finished in time.
pub fn incoming(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
) -> ReceiverStream<Result<Admitted, std::io::Error>> {
    let (tx, rx) = mpsc::channel(64);
    let limits = ConnLimits::new("CA", MAX_CONNECTIONS, PER_SOURCE);
    let acceptor = TlsAcceptor::from(tls);
    tokio::spawn(async move {
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(s) => s,
                Err(e) => {
                    if let Some(n) = ACCEPT_FAILED.hit() {
                        warn!(error = %e, times = n, "CA accept failed; backing off");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let permit = match limits.try_admit(peer.ip().to_canonical()) {
                Ok(p) => p,
                Err(e) => {
                    if let Some(n) = REFUSED.hit() {
                        warn!(%peer, error = %e, times = n, "CA connections refused");
                    }
                    continue;
                }
            };
            let (acceptor, out) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                    Ok(Ok(io)) => {
                        let _ = out
                            .send(Ok(Admitted {
                                io,
                                _permit: permit,
                            }))
                            .await;
                    }
                    Ok(Err(e)) => {
                        if let Some(n) = HANDSHAKE_FAILED.hit() {
                            warn!(%peer, error = %e, times = n, "CA TLS handshakes failed");
                        }
                    }
                    Err(_) => {
                        if let Some(n) = HANDSHAKE_FAILED.hit() {
                            debug!(%peer, times = n, "CA TLS handshakes timed out");
                        }
                    }
                }
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// The CA's server TLS settings: its serving chain, ALPN h2, no session resumption.
pub fn server_config(chain_pem: &str, key_pem: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_no_client_auth()
    .with_single_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}
