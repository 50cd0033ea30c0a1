//! The admin thread: its own runtime, the Unix socket (mode 0600, root's peers only)
//! and the metrics listener.
use std::{
    net::SocketAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    sync::Arc,
    thread::JoinHandle,
};

use tokio::sync::oneshot;
use tokio_stream::wrappers::UnixListenerStream;
use tracing::{error, info, warn};

use super::{AdminState, service::AdminService};
use crate::{api::admin::admin_server::AdminServer as AdminGrpc, telemetry::serve_metrics};

#[derive(Debug, thiserror::Error)]
pub enum AdminServerError {
    #[error("admin socket {path}: {source}")]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin socket {0}: another agent is serving it")]
    InUse(PathBuf),
    #[error("metrics address {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("admin thread: {0}")]
    Thread(std::io::Error),
}

pub struct AdminServer {
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
    path: PathBuf,
}

/// Binds the socket so that it is never reachable by anyone but root, even for the
/// instant between bind and chmod.
/// `take_over`: the agent answering there is handing over to this one, which takes
/// the path (the old agent stops using it).
pub(crate) fn bind_socket(
    path: &Path,
    take_over: bool,
) -> Result<std::os::unix::net::UnixListener, AdminServerError> {
    let err = |source| AdminServerError::Socket {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    if path.exists() {
        if !take_over && std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(AdminServerError::InUse(path.to_owned()));
        }
        // Left by an agent that did not stop cleanly.
        std::fs::remove_file(path).map_err(err)?;
    }
    let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o177));
    let listener = std::os::unix::net::UnixListener::bind(path);
    nix::sys::stat::umask(old);
    let listener = listener.map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    listener.set_nonblocking(true).map_err(err)?;
    Ok(listener)
}

/// Only root (or the agent's own user) may use the API. The socket's mode already
/// says so; this holds even if someone loosens it.
fn authorize(req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
    let uid = req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| c.uid());
    let me = nix::unistd::geteuid().as_raw();
    match uid {
        Some(0) => Ok(req),
        Some(u) if u == me => Ok(req),
        _ => Err(tonic::Status::permission_denied(
            "the admin API is for root only",
        )),
    }
}

impl AdminServer {
    /// `metrics`: the metrics listener, already bound (or handed over). `take_over`:
    /// see [`bind_socket`].
    pub fn start(
        socket: &Path,
        metrics: std::net::TcpListener,
        take_over: bool,
        state: Arc<AdminState>,
    ) -> Result<AdminServer, AdminServerError> {
        let listener = bind_socket(socket, take_over)?;
        let metrics_addr = metrics
            .local_addr()
            .map_err(|source| AdminServerError::Socket {
                path: socket.to_owned(),
                source,
            })?;
        let (tx, rx) = oneshot::channel::<()>();
        let path = socket.to_owned();
        let thread = std::thread::Builder::new()
            .name("mesh-admin".into())
            .spawn({
                let path = path.clone();
                move || run(listener, metrics, state, rx, &path)
            })
            .map_err(AdminServerError::Thread)?;
        info!(socket = %socket.display(), metrics = %metrics_addr, "admin API and metrics serving");
        Ok(AdminServer {
            shutdown: Some(tx),
            thread: Some(thread),
            path,
        })
    }

    pub fn stop(self) {
        let path = self.path.clone();
        self.stop_serving();
        let _ = std::fs::remove_file(&path);
    }

    /// Binds the socket path again and serves there: a successor took the path when
    /// it started, then died before it was ready, and this agent serves on.
    pub fn take_path_back(
        &mut self,
        metrics: std::net::TcpListener,
        state: Arc<AdminState>,
    ) -> Result<(), AdminServerError> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        *self = AdminServer::start(&self.path, metrics, true, state)?;
        Ok(())
    }

    /// Stops serving and leaves the socket path to the successor that took it.
    pub fn stop_serving(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    listener: std::os::unix::net::UnixListener,
    metrics: std::net::TcpListener,
    state: Arc<AdminState>,
    shutdown: oneshot::Receiver<()>,
    path: &Path,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the admin runtime; admin API and metrics are off");
            return;
        }
    };
    runtime.block_on(async move {
        let render = {
            let state = state.clone();
            Arc::new(move || super::views::render_metrics(&state))
        };
        match tokio::net::TcpListener::from_std(metrics) {
            Ok(l) => {
                tokio::spawn(async move {
                    if let Err(e) = serve_metrics(l, render).await {
                        warn!(error = %e, "metrics endpoint failed");
                    }
                });
            }
            Err(e) => warn!(error = %e, "metrics endpoint failed"),
        }
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                error!(socket = %path.display(), error = %e, "admin socket failed");
                return;
            }
        };
        let service = AdminGrpc::with_interceptor(AdminService::new(state), authorize);
        let result = tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                let _ = shutdown.await;
            })
            .await;
        if let Err(e) = result {
            error!(socket = %path.display(), error = %e, "admin API stopped");
        }
    });
}
