//! Numbering config generations and counting reloads: the one place every source
//! hands its config to, so the rest of the agent sees the same generations and
//! statistics whichever source feeds it.
use std::{
    sync::{Arc, atomic::AtomicU64},
    time::Instant,
};

use tokio::sync::watch;
use tracing::{error, info};

use super::model::Config;

/// One successfully loaded config.
#[derive(Debug)]
pub struct Generation {
    /// 0 until the first good load, then +1 per applied change.
    pub number: u64,
    pub config: Config,
    /// When the oldest change this generation carries reached the source (the API
    /// source knows; the directory source does not say): the agent logs how long the
    /// change took to apply.
    pub since: Option<Instant>,
}

/// Counts what the reload loop did, for readiness and metrics.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub ok: AtomicU64,
    pub failed: AtomicU64,
    /// The error of the source as it is now, if it does not load.
    pub last_error: std::sync::Mutex<Option<String>>,
    /// Objects refused one by one (the API source) as they are now, by kind.
    pub rejected_objects: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl ReloadStats {
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Refused objects by kind, as the source last counted them.
    pub fn rejected_objects(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.rejected_objects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }
}

/// A source's way to the agent: new configs become generations, errors are logged
/// and counted once each, and the last good generation keeps serving.
pub struct Publisher {
    tx: watch::Sender<Arc<Generation>>,
    stats: Arc<ReloadStats>,
    /// What feeds it, for the log (`dir /etc/mesh`).
    source: String,
}

impl Publisher {
    pub fn new(
        source: String,
    ) -> (
        Publisher,
        watch::Receiver<Arc<Generation>>,
        Arc<ReloadStats>,
    ) {
        let stats = Arc::new(ReloadStats::default());
        let (tx, rx) = watch::channel(Arc::new(Generation {
            number: 0,
            config: Config::default(),
            since: None,
        }));
        let publisher = Publisher {
            tx,
            stats: stats.clone(),
            source,
        };
        (publisher, rx, stats)
    }

    /// Publishes `config` as the next generation, unless it is the one serving. The
    /// source's error, if it had one, is over either way.
    pub fn publish(&mut self, config: Config) {
        self.publish_since(config, None);
    }

    /// [`Publisher::publish`], for a config whose oldest change reached the source at
    /// `since`.
    pub fn publish_since(&mut self, config: Config, since: Option<Instant>) {
        use std::sync::atomic::Ordering::Relaxed;
        self.stats.set_error(None);
        let current = self.tx.borrow().clone();
        if current.number > 0 && current.config == config {
            return;
        }
        let number = current.number + 1;
        info!(generation = number, source = %self.source,
            services = config.services.len(), endpoint_slices = config.endpoint_slices.len(),
            pods = config.pods.len(), routes = config.routes.len(), "config loaded");
        self.stats.ok.fetch_add(1, Relaxed);
        self.tx.send_replace(Arc::new(Generation {
            number,
            config,
            since,
        }));
    }

    /// The source cannot be read as it is now. Logged and counted once per distinct
    /// error, not on every retry.
    pub fn reject(&mut self, error: String) {
        use std::sync::atomic::Ordering::Relaxed;
        if self.stats.last_error().as_deref() == Some(error.as_str()) {
            return;
        }
        error!(source = %self.source, error = %error,
            "config rejected; the last good config keeps serving");
        self.stats.failed.fetch_add(1, Relaxed);
        self.stats.set_error(Some(error));
    }

    /// The objects the source refuses now, by kind (every kind it reads, zeros too).
    pub fn rejected_objects(&mut self, by_kind: std::collections::BTreeMap<&'static str, u64>) {
        *self
            .stats
            .rejected_objects
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = by_kind;
    }

    /// Nobody listens any more: the source may stop.
    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering::Relaxed;

    #[test]
    fn generations_count_changes_and_errors_count_once() {
        let (mut p, rx, stats) = Publisher::new("test".into());
        // The first good load is generation 1, even when it is empty.
        p.publish(Config::default());
        assert_eq!(rx.borrow().number, 1);
        p.publish(Config::default());
        assert_eq!(
            rx.borrow().number,
            1,
            "the same config is not a new generation"
        );
        p.reject("broken".into());
        p.reject("broken".into());
        assert_eq!(stats.failed.load(Relaxed), 1);
        assert_eq!(stats.last_error().as_deref(), Some("broken"));
        assert_eq!(
            rx.borrow().number,
            1,
            "an error keeps the last good generation"
        );
        let mut c = Config::default();
        c.services.push(std::sync::Arc::new(crate::config::Service {
            id: crate::config::NamespacedName {
                namespace: "default".into(),
                name: "web".into(),
            },
            cluster_ips: vec![],
            ports: vec![],
            fail_open: None,
        }));
        p.publish(c);
        assert_eq!(rx.borrow().number, 2);
        assert_eq!(stats.last_error(), None);
        assert_eq!(stats.ok.load(Relaxed), 2);
    }
}
