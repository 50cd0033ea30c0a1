//! Flow events: what happened to connections, from the kernel (redirects, bypasses,
//! STRICT refusals, read from the ring buffer) and from the agent (forwarded, denied,
//! failed), merged into one stream for `meshctl observe`.
//!
//! Nothing is dropped silently: a full kernel ring buffer is counted by the kernel and
//! reported here as a `dropped_events` flow; an observer that falls behind the
//! broadcast channel is told how many events it missed.
use std::{sync::Arc, time::SystemTime};

use tokio::sync::broadcast;

/// Events buffered per observer before it counts as lagging.
const CAPACITY: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Kernel,
    Agent,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Kernel => "kernel",
            Origin::Agent => "agent",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Flow {
    pub time: SystemTime,
    pub origin: Origin,
    /// What happened: redirected, bypassed, refused_strict, plaintext_captured,
    /// no_listener, forwarded, denied, failed, dropped_events.
    pub kind: &'static str,
    /// The outcome class observers filter on: redirected, bypassed, forwarded, denied,
    /// dropped, error.
    pub verdict: &'static str,
    /// The enrolled pod the event is about, "namespace/name".
    pub pod: Option<String>,
    pub source: Option<String>,
    pub destination: Option<String>,
    /// "namespace/name".
    pub service: Option<String>,
    pub source_identity: Option<String>,
    pub destination_identity: Option<String>,
    pub reason: Option<String>,
    pub dropped: u64,
}

impl Flow {
    pub fn new(origin: Origin, kind: &'static str, verdict: &'static str) -> Flow {
        Flow {
            time: SystemTime::now(),
            origin,
            kind,
            verdict,
            pod: None,
            source: None,
            destination: None,
            service: None,
            source_identity: None,
            destination_identity: None,
            reason: None,
            dropped: 0,
        }
    }
}

/// What an observer wants to see. Empty fields match everything.
#[derive(Debug, Clone, Default)]
pub struct FlowFilter {
    pub pod: Option<String>,
    pub service: Option<String>,
    pub verdict: Option<String>,
}

/// "ns/name" matches exactly; a bare "name" matches that name in any namespace.
fn name_matches(want: &str, have: Option<&str>) -> bool {
    let Some(have) = have else { return false };
    if want.contains('/') {
        want == have
    } else {
        have.rsplit('/').next() == Some(want)
    }
}

impl FlowFilter {
    pub fn matches(&self, f: &Flow) -> bool {
        // Loss reports reach every observer: a filtered view must still show gaps.
        if f.kind == "dropped_events" {
            return true;
        }
        self.pod
            .as_deref()
            .is_none_or(|p| name_matches(p, f.pod.as_deref()))
            && self
                .service
                .as_deref()
                .is_none_or(|s| name_matches(s, f.service.as_deref()))
            && self.verdict.as_deref().is_none_or(|v| v == f.verdict)
    }
}

#[derive(Clone)]
pub struct FlowHub {
    tx: broadcast::Sender<Arc<Flow>>,
}

impl Default for FlowHub {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(CAPACITY);
        FlowHub { tx }
    }
}

impl FlowHub {
    /// Cheap when nobody observes: the event is built only if someone listens.
    pub fn publish_with(&self, build: impl FnOnce() -> Flow) {
        if self.tx.receiver_count() > 0 {
            let _ = self.tx.send(Arc::new(build()));
        }
    }

    pub fn subscribe(&self) -> broadcast::Receiver<Arc<Flow>> {
        self.tx.subscribe()
    }

    /// How many observers are streaming now.
    pub fn observers(&self) -> usize {
        self.tx.receiver_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_by_pod_service_and_verdict() {
        let mut f = Flow::new(Origin::Agent, "denied", "denied");
        f.pod = Some("default/server".into());
        f.service = Some("default/web".into());
        let by = |pod: Option<&str>, service: Option<&str>, verdict: Option<&str>| FlowFilter {
            pod: pod.map(Into::into),
            service: service.map(Into::into),
            verdict: verdict.map(Into::into),
        };
        assert!(by(None, None, None).matches(&f));
        assert!(by(Some("server"), Some("default/web"), Some("denied")).matches(&f));
        assert!(!by(Some("other/server"), None, None).matches(&f));
        assert!(!by(None, Some("api"), None).matches(&f));
        assert!(!by(None, None, Some("forwarded")).matches(&f));
        let dropped = Flow::new(Origin::Kernel, "dropped_events", "dropped");
        assert!(by(Some("server"), None, Some("denied")).matches(&dropped));
    }

    #[tokio::test]
    async fn a_slow_observer_learns_how_many_it_missed() {
        let hub = FlowHub::default();
        let mut rx = hub.subscribe();
        for _ in 0..CAPACITY + 10 {
            hub.publish_with(|| Flow::new(Origin::Agent, "forwarded", "forwarded"));
        }
        match rx.recv().await {
            Err(broadcast::error::RecvError::Lagged(n)) => assert_eq!(n, 10),
            other => panic!("expected a lag report, got {other:?}"),
        }
    }
}
