//! The admin API (`proto/admin.proto`) on a Unix socket, for `meshctl`, and the
//! Prometheus endpoint. Both run on their own thread and single-threaded runtime: a
//! slow or hostile client, or an expensive scrape, competes with nothing on the data
//! path's runtime.
pub(crate) mod server;
mod service;
mod views;

use std::{
    path::PathBuf,
    sync::{Arc, OnceLock},
    time::Instant,
};

use tokio::sync::watch;

pub use server::{AdminServer, AdminServerError};
pub use views::VERSION;

use crate::{
    config::{Generation, ReloadStats},
    proxy::ProxyContext,
    telemetry::{LogControl, Readiness, Telemetry},
};

/// What the admin API can see. The parts that exist only once the programs are
/// attached are in `core`.
pub struct AdminState {
    pub node: String,
    pub started: Instant,
    pub readiness: Arc<Readiness>,
    pub log: Arc<LogControl>,
    pub telemetry: Arc<Telemetry>,
    pub trust_domain: String,
    pub root_namespace: String,
    pub core: OnceLock<Core>,
    /// The agent this one took over from, while it drains.
    pub previous_agent: Arc<crate::handover::PreviousAgentStatus>,
}

pub struct Core {
    pub proxy: Arc<ProxyContext>,
    pub programs: Vec<&'static str>,
    pub map_dir: PathBuf,
    pub config: watch::Receiver<Arc<Generation>>,
    pub reloads: Arc<ReloadStats>,
}
