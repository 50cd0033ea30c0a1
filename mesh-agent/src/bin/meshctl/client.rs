//! Connecting to an agent's admin socket, with errors that say what to do.
use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use mesh_agent::api::admin::admin_client::AdminClient;
use tonic::transport::{Channel, Endpoint, Uri};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no agent at {0}: is mesh-agent running on this node? (--socket or MESH_ADMIN_SOCKET picks another)"
    )]
    NotRunning(PathBuf),
    #[error("permission denied on {0}: the admin socket is for root only; run meshctl as root")]
    Permission(PathBuf),
    #[error("{0} exists but nobody answers on it: the agent is not running (a stale socket)")]
    Stale(PathBuf),
    #[error("connecting to {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the agent at {path} does not speak the admin API: {message}")]
    Protocol { path: PathBuf, message: String },
}

/// Tries the socket once with a plain connect, because tonic's transport error hides
/// the reason (missing, permission, refused) that tells the user what to do.
fn preflight(path: &Path) -> Result<(), ClientError> {
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Ok(()),
        Err(e) => Err(match e.kind() {
            std::io::ErrorKind::NotFound => ClientError::NotRunning(path.to_owned()),
            std::io::ErrorKind::PermissionDenied => ClientError::Permission(path.to_owned()),
            std::io::ErrorKind::ConnectionRefused => ClientError::Stale(path.to_owned()),
            _ => ClientError::Io {
                path: path.to_owned(),
                source: e,
            },
        }),
    }
}

pub async fn connect(path: &Path) -> Result<AdminClient<Channel>, ClientError> {
    preflight(path)?;
    let socket = path.to_owned();
    // The URI is required by the API and ignored: the connector dials the socket.
    let channel = Endpoint::from_static("http://admin.sock")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(
                    tokio::net::UnixStream::connect(socket).await?,
                ))
            }
        }))
        .await
        .map_err(|e| ClientError::Protocol {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    Ok(AdminClient::new(channel))
}

/// A gRPC error in words; permission errors from the agent's own check included.
pub fn status_message(path: &Path, s: &tonic::Status) -> String {
    match s.code() {
        tonic::Code::PermissionDenied => ClientError::Permission(path.to_owned()).to_string(),
        tonic::Code::Unavailable if s.message().contains("starting") => {
            format!("the agent is not ready for this yet: {}", s.message())
        }
        _ => s.message().to_owned(),
    }
}
