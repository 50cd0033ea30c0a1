//! Writes the agent's word on each local pod back to the API: the annotation
//! `mesh.dev/status: enrolled` once the pod is enrolled, removed once it is not, as
//! istio-cni records its redirection. Through `pods/status` (a merge patch of the
//! metadata), the least privilege that can do it.
//!
//! The decision is `wanted`: what the pod object says against what the agent did. The
//! writes run on a task of their own with a bounded queue; one that fails is simply
//! asked again at the next reconcile (the pod object still disagrees).
use std::collections::HashSet;

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::config::{NamespacedName, STATUS_ANNOTATION, STATUS_ENROLLED};

/// Writes queued; past this a write waits for the next reconcile.
const QUEUE: usize = 256;

/// One annotation to write: `Some(value)` sets it, `None` removes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mark {
    pub pod: NamespacedName,
    pub value: Option<&'static str>,
}

/// What to write for a pod whose object says `current`, given whether the agent has
/// it enrolled; `None` when the object already says it.
pub fn wanted(current: Option<&str>, enrolled: bool) -> Option<Option<&'static str>> {
    match (current, enrolled) {
        (Some(STATUS_ENROLLED), true) | (None, false) => None,
        (_, true) => Some(Some(STATUS_ENROLLED)),
        (Some(_), false) => Some(None),
    }
}

pub struct PodAnnotator {
    tx: mpsc::Sender<Mark>,
    /// Marks sent and not yet seen in the pod object: not sent twice meanwhile.
    pending: std::sync::Mutex<HashSet<(NamespacedName, Option<&'static str>)>>,
}

impl PodAnnotator {
    pub fn start(client: Client) -> std::sync::Arc<PodAnnotator> {
        let (tx, mut rx) = mpsc::channel::<Mark>(QUEUE);
        let me = std::sync::Arc::new(PodAnnotator {
            tx,
            pending: Default::default(),
        });
        let weak = std::sync::Arc::downgrade(&me);
        tokio::spawn(async move {
            while let Some(mark) = rx.recv().await {
                let result = write(&client, &mark).await;
                if let Err(e) = &result {
                    warn!(pod = %mark.pod, error = %e, "cannot record the mesh status on the pod; retried at the next reconcile");
                } else {
                    debug!(pod = %mark.pod, value = ?mark.value, "mesh status recorded on the pod");
                }
                if let Some(me) = weak.upgrade() {
                    me.pending
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&(mark.pod.clone(), mark.value));
                }
            }
        });
        me
    }

    /// Records `enrolled` on `pod` unless its object already says so (`current`).
    pub fn record(&self, pod: &NamespacedName, current: Option<&str>, enrolled: bool) {
        let Some(value) = wanted(current, enrolled) else {
            return;
        };
        let key = (pod.clone(), value);
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if pending.contains(&key) {
            return;
        }
        if self
            .tx
            .try_send(Mark {
                pod: pod.clone(),
                value,
            })
            .is_ok()
        {
            pending.insert(key);
        }
    }
}

async fn write(client: &Client, mark: &Mark) -> Result<(), kube::Error> {
    let api: Api<Pod> = Api::namespaced(client.clone(), &mark.pod.namespace);
    let patch = serde_json::json!({"metadata": {"annotations": {STATUS_ANNOTATION: mark.value}}});
    api.patch_status(
        &mark.pod.name,
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await
    .map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_disagreement_is_written() {
        assert_eq!(wanted(None, true), Some(Some(STATUS_ENROLLED)));
        assert_eq!(wanted(Some(STATUS_ENROLLED), true), None);
        assert_eq!(wanted(Some(STATUS_ENROLLED), false), Some(None));
        assert_eq!(wanted(None, false), None);
        // A value the agent does not write is put right either way.
        assert_eq!(wanted(Some("garbage"), true), Some(Some(STATUS_ENROLLED)));
        assert_eq!(wanted(Some("garbage"), false), Some(None));
    }
}
