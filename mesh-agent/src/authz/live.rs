//! Open connections that authorization allowed, so that a policy change can take back
//! what it no longer allows: each one is re-checked and the denied ones cancelled.
use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{ConnAttrs, PolicySet, Workload};

struct Live {
    workload: Workload,
    attrs: ConnAttrs,
    cancel: CancellationToken,
}

#[derive(Default)]
pub struct LiveConns {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Live>>,
}

/// Keeps a connection registered; dropping it (when the connection ends) unregisters.
pub struct LiveGuard {
    id: u64,
    conns: Arc<LiveConns>,
    pub cancelled: CancellationToken,
}

impl Drop for LiveGuard {
    fn drop(&mut self) {
        self.conns.lock().remove(&self.id);
    }
}

impl LiveConns {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Live>> {
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(self: &Arc<Self>, workload: Workload, attrs: ConnAttrs) -> LiveGuard {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        self.lock().insert(
            id,
            Live {
                workload,
                attrs,
                cancel: cancel.clone(),
            },
        );
        LiveGuard {
            id,
            conns: self.clone(),
            cancelled: cancel,
        }
    }

    /// Cancels every open connection `policy` no longer allows; returns how many.
    pub fn reevaluate(&self, policy: &PolicySet) -> usize {
        let conns = self.lock();
        let mut closed = 0;
        for live in conns.values() {
            let verdict = policy.evaluate(&live.workload, &live.attrs);
            if !verdict.decision.allowed() && !live.cancel.is_cancelled() {
                info!(
                    workload = %live.workload.id,
                    source = live.attrs.principal.as_deref().unwrap_or("(plaintext)"),
                    source_ip = %live.attrs.source_ip,
                    port = live.attrs.dest_port,
                    decision = ?verdict.decision,
                    "open connection no longer allowed by policy; closing it"
                );
                live.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }
}
