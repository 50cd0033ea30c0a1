//! Writes each HTTPRoute's and GRPCRoute's `status.parents` (`route_status` decides
//! what it says), from one agent of the cluster at a time: the holder of a Lease
//! (`lease`). Every agent computes the same status from the same objects; only the
//! holder writes, so a route change costs one write, not one per node.
//!
//! Writes go through a map of the latest status per route, drained by a task of its
//! own: the source's loop never waits on the API server, a route's newer status
//! replaces an older one not yet written, and the map holds at most one entry per
//! route the API server has. Each write is a merge patch of the status subresource
//! carrying the resourceVersion it was computed from, so a write based on a stale
//! read fails (409) instead of overwriting; the route's next watch event brings the
//! new version and the status is computed again.
use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use k8s_openapi::jiff::Timestamp;
use kube::{
    Api, Client,
    api::{DynamicObject, Patch, PatchParams},
};
use serde_json::{Value, json};
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use super::{
    lease::{self, LeaseSettings},
    resource,
    route_status::{self, RouteMeta, Verdict},
};
use crate::config::{Config, Kind, Object, ObjectKey, RouteProblem, Store};

/// The attachment problems of a config (the agent's own route table decides them).
pub type ProblemsFn = Arc<dyn Fn(&Config) -> Vec<RouteProblem> + Send + Sync>;

const RETRY_FIRST: std::time::Duration = std::time::Duration::from_secs(1);
const RETRY_MAX: std::time::Duration = std::time::Duration::from_secs(30);

type Pending = Arc<Mutex<BTreeMap<ObjectKey, (String, Vec<Value>)>>>;

pub struct RouteStatusWriter {
    leader: watch::Receiver<bool>,
    problems: ProblemsFn,
    metas: BTreeMap<ObjectKey, RouteMeta>,
    pending: Pending,
    wake: Arc<Notify>,
    dirty: bool,
}

impl RouteStatusWriter {
    /// Starts the election and the writing task. Call inside the runtime.
    pub fn start(client: Client, lease: LeaseSettings, problems: ProblemsFn) -> RouteStatusWriter {
        let leader = lease::start(client.clone(), lease);
        let pending: Pending = Arc::default();
        let wake = Arc::new(Notify::new());
        tokio::spawn(drain(client, pending.clone(), wake.clone()));
        RouteStatusWriter {
            leader,
            problems,
            metas: BTreeMap::new(),
            pending,
            wake,
            dirty: true,
        }
    }

    /// A route arrived (or changed) with these metadata.
    pub fn seen(&mut self, key: &ObjectKey, meta: RouteMeta) {
        self.metas.insert(key.clone(), meta);
        self.dirty = true;
    }

    /// Something statuses depend on changed (a Service, a deleted route).
    pub fn touch(&mut self) {
        self.dirty = true;
    }

    /// Resolves when this agent gains or loses the lease.
    pub async fn leadership_changed(&mut self) {
        if self.leader.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        self.dirty = true;
    }

    /// There is something to compute (and this agent would write it).
    pub fn wants_turn(&self) -> bool {
        self.dirty && *self.leader.borrow()
    }

    /// Computes every route's status against `config` (built from `store`) and
    /// queues the ones that differ from what the server holds.
    pub fn write(&mut self, store: &Store, config: &Config) {
        self.metas.retain(|k, _| store.contains(k));
        if !self.wants_turn() {
            return;
        }
        self.dirty = false;
        if self.metas.is_empty() {
            return;
        }
        let problems = (self.problems)(config);
        let now = Timestamp::now();
        let mut queued = 0;
        for (key, meta) in &self.metas {
            let verdict = match (store.rejection(key), store.object(key)) {
                (Some((error, previous_serves)), _) => Verdict::Rejected {
                    error,
                    previous_serves,
                },
                (None, Some(Object::Route(route))) => Verdict::Accepted(route),
                _ => continue,
            };
            let Some(parents) =
                route_status::update(&key.id, meta, verdict, config, &problems, now)
            else {
                continue;
            };
            queued += 1;
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key.clone(), (meta.resource_version.clone(), parents));
        }
        if queued > 0 {
            debug!(routes = queued, "route status queued");
            self.wake.notify_one();
        }
    }
}

/// Writes what is pending; a write that failed for a reason other than a newer
/// version (409) or a deleted route (404) is tried again after a growing pause,
/// unless a newer status for the route has been queued meanwhile.
async fn drain(client: Client, pending: Pending, wake: Arc<Notify>) {
    let mut pause = RETRY_FIRST;
    loop {
        wake.notified().await;
        loop {
            let next = {
                let mut p = pending.lock().unwrap_or_else(|p| p.into_inner());
                p.pop_first()
            };
            let Some((key, (version, parents))) = next else {
                break;
            };
            let api: Api<DynamicObject> = Api::namespaced_with(
                client.clone(),
                &key.id.namespace,
                &resource::api_resource(key.kind),
            );
            let patch = json!({
                "metadata": {"resourceVersion": version},
                "status": {"parents": parents},
            });
            match api
                .patch_status(&key.id.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    info!(route = %key, "route status written");
                    pause = RETRY_FIRST;
                }
                Err(kube::Error::Api(s)) if s.code == 409 || s.code == 404 => {
                    debug!(route = %key, code = s.code, "route changed or gone since; not written")
                }
                Err(e) => {
                    warn!(route = %key, error = %e, retry_in = ?pause, "cannot write the route's status");
                    pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .entry(key)
                        .or_insert((version, parents));
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

/// The kinds whose objects carry a status this writer keeps.
pub fn has_status(kind: Kind) -> bool {
    matches!(kind, Kind::HttpRoute | Kind::GrpcRoute)
}
