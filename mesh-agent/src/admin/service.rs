//! The `mesh.admin.v1.Admin` service. Every call reads a snapshot of the agent's state;
//! none of them can change how traffic flows except `SetLogLevel`.
use std::{pin::Pin, sync::Arc, time::UNIX_EPOCH};

use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::{AdminState, Core, views};
use crate::{
    api::admin::{self as pb, admin_server::Admin},
    telemetry::{Flow, FlowFilter, metrics::DropLabel},
};

pub struct AdminService {
    state: Arc<AdminState>,
}

impl AdminService {
    pub fn new(state: Arc<AdminState>) -> AdminService {
        AdminService { state }
    }
    fn core(&self) -> Result<&Core, Status> {
        self.state.core.get().ok_or_else(|| {
            Status::unavailable(format!(
                "the agent is starting: {}",
                self.state
                    .readiness
                    .not_ready_reason()
                    .unwrap_or("not attached yet")
            ))
        })
    }
}

type Reply<T> = Result<Response<T>, Status>;

fn to_pb(f: &Flow) -> pb::FlowEvent {
    let s = |v: &Option<String>| v.clone().unwrap_or_default();
    pb::FlowEvent {
        time_ms: f
            .time
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        origin: f.origin.as_str().to_owned(),
        kind: f.kind.to_owned(),
        verdict: f.verdict.to_owned(),
        pod: s(&f.pod),
        source: s(&f.source),
        destination: s(&f.destination),
        service: s(&f.service),
        source_identity: s(&f.source_identity),
        destination_identity: s(&f.destination_identity),
        reason: s(&f.reason),
        dropped: f.dropped,
    }
}

fn non_empty(s: String) -> Option<String> {
    (!s.trim().is_empty()).then(|| s.trim().to_owned())
}

impl AdminService {
    /// The diagnostics filter and the kernel log level, as they are now.
    fn log_level(&self) -> pb::LogLevel {
        let kernel = self.state.core.get().map_or(0, |c| {
            c.proxy.maps.setting(mesh_common::settings::KERNEL_LOG)
        });
        pb::LogLevel {
            filter: self.state.log.get(),
            kernel: crate::bpf::inspect::kernel_log_name(kernel).to_owned(),
        }
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn status(&self, _: Request<pb::Empty>) -> Reply<pb::StatusReply> {
        Ok(Response::new(views::status(&self.state)))
    }

    async fn workloads(&self, _: Request<pb::Empty>) -> Reply<pb::WorkloadsReply> {
        Ok(Response::new(views::workloads(&self.state, self.core()?)))
    }

    async fn services(&self, _: Request<pb::Empty>) -> Reply<pb::ServicesReply> {
        Ok(Response::new(views::services(self.core()?)))
    }

    async fn endpoints(&self, _: Request<pb::Empty>) -> Reply<pb::EndpointsReply> {
        Ok(Response::new(views::endpoints(self.core()?)))
    }

    async fn policies(&self, _: Request<pb::Empty>) -> Reply<pb::PoliciesReply> {
        Ok(Response::new(views::policies(&self.state, self.core()?)))
    }

    async fn certs(&self, _: Request<pb::Empty>) -> Reply<pb::CertsReply> {
        Ok(Response::new(views::certs(self.core()?)))
    }

    async fn conns(&self, _: Request<pb::Empty>) -> Reply<pb::ConnsReply> {
        Ok(Response::new(views::conns(&self.state)))
    }

    async fn routes(&self, _: Request<pb::Empty>) -> Reply<pb::RoutesReply> {
        Ok(Response::new(views::routes(self.core()?)))
    }

    async fn config_dump(&self, _: Request<pb::Empty>) -> Reply<pb::ConfigDumpReply> {
        Ok(Response::new(views::config_dump(self.core()?)))
    }

    async fn metrics(&self, _: Request<pb::Empty>) -> Reply<pb::MetricsReply> {
        Ok(Response::new(pb::MetricsReply {
            text: views::render_metrics(&self.state),
        }))
    }

    async fn get_log_level(&self, _: Request<pb::Empty>) -> Reply<pb::LogLevel> {
        Ok(Response::new(self.log_level()))
    }

    async fn set_log_level(&self, req: Request<pb::LogLevel>) -> Reply<pb::LogLevel> {
        let pb::LogLevel { filter, kernel } = req.into_inner();
        // Both checked before either changes.
        let kernel = match kernel.trim() {
            "" => None,
            "debug" => Some(mesh_common::settings::KERNEL_LOG_DEBUG),
            "off" => Some(mesh_common::settings::KERNEL_LOG_OFF),
            other => {
                return Err(Status::invalid_argument(format!(
                    "invalid kernel log level {other:?}: expected debug or off"
                )));
            }
        };
        if filter.is_empty() && kernel.is_none() {
            return Err(Status::invalid_argument("nothing to set"));
        }
        if !filter.is_empty() {
            crate::telemetry::check_filter(&filter)
                .map_err(|e| Status::invalid_argument(format!("invalid filter {filter:?}: {e}")))?;
        }
        if let Some(level) = kernel {
            self.core()?
                .proxy
                .maps
                .set_setting(mesh_common::settings::KERNEL_LOG, level)
                .map_err(|e| Status::internal(e.to_string()))?;
            info!(
                kernel = crate::bpf::inspect::kernel_log_name(level),
                "kernel log level changed through the admin API"
            );
        }
        if !filter.is_empty() {
            self.state
                .log
                .set(&filter)
                .map_err(|e| Status::invalid_argument(format!("invalid filter {filter:?}: {e}")))?;
            info!(filter = %filter, "log level changed through the admin API");
        }
        Ok(Response::new(self.log_level()))
    }

    async fn bpf_maps(&self, req: Request<pb::BpfMapsRequest>) -> Reply<pb::BpfMapsReply> {
        let dump = req.into_inner().dump;
        let core = self.core()?;
        views::bpf_maps(core, dump.trim())
            .map(Response::new)
            .map_err(|e| match e {
                crate::bpf::inspect::InspectError::Unknown(_) => Status::not_found(e.to_string()),
                other => Status::internal(other.to_string()),
            })
    }

    type ObserveStream = Pin<Box<dyn Stream<Item = Result<pb::FlowEvent, Status>> + Send>>;

    async fn observe(&self, req: Request<pb::ObserveRequest>) -> Reply<Self::ObserveStream> {
        let r = req.into_inner();
        let filter = FlowFilter {
            pod: non_empty(r.pod),
            service: non_empty(r.service),
            verdict: non_empty(r.verdict),
        };
        let mut rx = self.state.telemetry.flows.subscribe();
        // The programs send their flow events only while someone observes; the flow
        // reader switches them off after the last observer.
        if let Some(c) = self.state.core.get()
            && let Err(e) = c
                .proxy
                .maps
                .set_setting(mesh_common::settings::FLOW_EVENTS, 1)
        {
            warn!(error = %e, "cannot switch the kernel's flow events on");
        }
        let telemetry = self.state.telemetry.clone();
        let stream = async_stream(move |tx| async move {
            loop {
                let received = tokio::select! {
                    r = rx.recv() => r,
                    // The client went away while nothing matched its filter.
                    () = tx.closed() => return,
                };
                let event = match received {
                    Ok(f) if filter.matches(&f) => to_pb(&f),
                    Ok(_) => continue,
                    Err(RecvError::Lagged(n)) => {
                        // This observer fell behind: tell it, and count it.
                        telemetry
                            .metrics
                            .flow_events_dropped
                            .get_or_create(&DropLabel { stage: "observer" })
                            .inc_by(n);
                        pb::FlowEvent {
                            kind: "dropped_events".into(),
                            verdict: "dropped".into(),
                            origin: "agent".into(),
                            reason: "this observer was too slow".into(),
                            dropped: n,
                            ..Default::default()
                        }
                    }
                    Err(RecvError::Closed) => return,
                };
                if tx.send(Ok(event)).await.is_err() {
                    return; // the client went away
                }
            }
        });
        Ok(Response::new(stream))
    }
}

/// A stream fed by a task through a small channel: the task stops when the client
/// disconnects (the receiver is dropped).
fn async_stream<F, Fut>(
    body: F,
) -> Pin<Box<dyn Stream<Item = Result<pb::FlowEvent, Status>> + Send>>
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::FlowEvent, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    tokio::spawn(body(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
