//! Watching the config directory. inotify (through `notify`) gives sub-second reaction;
//! a slow poll of file sizes and mtimes is the safety net for filesystems and editors
//! whose changes inotify misses. A directory that fails to load is logged and counted,
//! and the last good generation keeps serving.
use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};

use super::{load, model::Config};

/// How long to wait for a burst of file events to settle before reloading.
const SETTLE: Duration = Duration::from_millis(100);
/// The safety-net poll.
const POLL: Duration = Duration::from_secs(2);

/// One successfully loaded config.
#[derive(Debug)]
pub struct Generation {
    /// 0 until the first good load, then +1 per applied change.
    pub number: u64,
    pub config: Config,
}

/// Counts what the reload loop did, for readiness and metrics.
#[derive(Debug, Default)]
pub struct ReloadStats {
    pub ok: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
    /// The error of the directory as it is now, if it does not load.
    pub last_error: std::sync::Mutex<Option<String>>,
}

impl ReloadStats {
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_error(&self, e: Option<String>) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = e;
    }
}

pub struct ConfigWatch {
    pub updates: watch::Receiver<Arc<Generation>>,
    pub stats: Arc<ReloadStats>,
}

impl ConfigWatch {
    /// Loads `dir` once and keeps watching it until the returned receiver is dropped.
    pub fn start(dir: PathBuf) -> ConfigWatch {
        let stats = Arc::new(ReloadStats::default());
        let (tx, updates) = watch::channel(Arc::new(Generation {
            number: 0,
            config: Config::default(),
        }));
        let (events_tx, events_rx) = mpsc::unbounded_channel();

        // The watcher lives inside the task so it stops with it.
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
                let _ = events_tx.send(());
            }
        })
        .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot watch config directory; polling every {POLL:?}");
                None
            }
        };
        tokio::spawn(reload_loop(dir, tx, events_rx, stats.clone(), watcher));
        ConfigWatch { updates, stats }
    }
}

async fn reload_loop(
    dir: PathBuf,
    tx: watch::Sender<Arc<Generation>>,
    mut events: mpsc::UnboundedReceiver<()>,
    stats: Arc<ReloadStats>,
    _watcher: Option<notify::RecommendedWatcher>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let mut fingerprint = None;
    let mut last_good: Option<Config> = None;
    let mut last_error: Option<String> = None;
    let mut poll = tokio::time::interval(POLL);
    let mut watching = true;
    loop {
        let now = fingerprint_of(&dir);
        let changed = now != fingerprint || last_good.is_none();
        if changed {
            fingerprint = now;
            match load::load_dir(&dir) {
                Ok(config) if last_good.as_ref() == Some(&config) => {
                    last_error = None;
                    stats.set_error(None);
                }
                Ok(config) => {
                    let number = tx.borrow().number + 1;
                    info!(generation = number, dir = %dir.display(),
                        services = config.services.len(), endpoint_slices = config.endpoint_slices.len(),
                        pods = config.pods.len(), "config loaded");
                    stats.ok.fetch_add(1, Relaxed);
                    last_good = Some(config.clone());
                    last_error = None;
                    stats.set_error(None);
                    if tx.send(Arc::new(Generation { number, config })).is_err() {
                        return; // nobody listens any more
                    }
                }
                Err(e) => {
                    let msg = e.to_string();
                    // Log a persistent error once, not on every poll.
                    if last_error.as_deref() != Some(msg.as_str()) {
                        error!(error = %msg, "config rejected; the last good config keeps serving");
                        stats.failed.fetch_add(1, Relaxed);
                        stats.set_error(Some(msg.clone()));
                        last_error = Some(msg);
                    }
                }
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::select! {
            ev = events.recv(), if watching => {
                if ev.is_none() {
                    watching = false; // the watcher is gone: poll only
                    continue;
                }
                tokio::time::sleep(SETTLE).await;
                while events.try_recv().is_ok() {}
                fingerprint = None; // an event always forces a re-read
            }
            _ = poll.tick() => {}
        }
    }
}

/// Names, sizes and mtimes of the config files: cheap to compute, and it changes
/// whenever a file is written, renamed in or removed.
fn fingerprint_of(dir: &Path) -> Option<Vec<(PathBuf, u64, Option<SystemTime>)>> {
    let files = load::config_files(dir).ok()?;
    Some(
        files
            .into_iter()
            .map(|p| {
                let meta = std::fs::metadata(&p).ok();
                let len = meta.as_ref().map_or(0, |m| m.len());
                let mtime = meta.and_then(|m| m.modified().ok());
                (p, len, mtime)
            })
            .collect(),
    )
}
