//! Watching the config directory. inotify (through `notify`) gives sub-second reaction
//! to writes, renames and removals (never to reads: the agent's own reads must not
//! wake it); a slow poll of file sizes and mtimes is the safety net for filesystems
//! whose changes inotify misses. Files are read only when that fingerprint changed, so
//! an idle agent reads no config file, and they are parsed on a blocking thread, off
//! the runtime that carries traffic. A directory that fails to load is logged and
//! counted, and the last good generation keeps serving.
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
/// The safety-net poll while inotify watches.
const POLL: Duration = Duration::from_secs(30);
/// The poll when inotify cannot watch the directory.
const POLL_UNWATCHED: Duration = Duration::from_secs(2);

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
            if res.is_ok_and(|e| is_change(&e.kind)) {
                let _ = events_tx.send(());
            }
        })
        .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                warn!(dir = %dir.display(), error = %e, "cannot watch config directory; polling every {POLL_UNWATCHED:?}");
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
    let mut poll = tokio::time::interval(if _watcher.is_some() {
        POLL
    } else {
        POLL_UNWATCHED
    });
    let mut watching = _watcher.is_some();
    loop {
        let now = fingerprint_of(&dir);
        let changed = now != fingerprint || last_good.is_none();
        if changed {
            fingerprint = now;
            let d = dir.clone();
            let loaded = match tokio::task::spawn_blocking(move || load::load_dir(&d)).await {
                Ok(r) => r,
                Err(e) => {
                    error!(error = %e, "config loader task failed");
                    continue;
                }
            };
            match loaded {
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
            }
            _ = poll.tick() => {}
        }
    }
}

/// Writes, renames and removals; not opens, reads or attribute changes.
fn is_change(kind: &notify::EventKind) -> bool {
    use notify::{EventKind, event::ModifyKind};
    match kind {
        EventKind::Create(_) | EventKind::Remove(_) => true,
        EventKind::Modify(ModifyKind::Metadata(_)) => false,
        EventKind::Modify(_) => true,
        EventKind::Access(_) | EventKind::Any | EventKind::Other => false,
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

#[cfg(test)]
mod tests {
    use super::*;
    use notify::{
        EventKind,
        event::{AccessKind, CreateKind, DataChange, MetadataKind, ModifyKind, RenameMode},
    };

    #[test]
    fn only_writes_renames_and_removals_wake_the_watcher() {
        assert!(is_change(&EventKind::Create(CreateKind::File)));
        assert!(is_change(&EventKind::Modify(ModifyKind::Data(
            DataChange::Content
        ))));
        assert!(is_change(&EventKind::Modify(ModifyKind::Name(
            RenameMode::To
        ))));
        assert!(is_change(&EventKind::Remove(
            notify::event::RemoveKind::File
        )));
        assert!(!is_change(&EventKind::Access(AccessKind::Read)));
        assert!(!is_change(&EventKind::Modify(ModifyKind::Metadata(
            MetadataKind::AccessTime
        ))));
    }

    #[tokio::test]
    async fn a_broken_file_next_to_a_valid_change_applies_neither() {
        let dir = tempfile::tempdir().unwrap();
        let svc = |name: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{}}\n")
        };
        std::fs::write(dir.path().join("a.yaml"), svc("one")).unwrap();
        let mut w = ConfigWatch::start(dir.path().to_owned());
        tokio::time::timeout(
            Duration::from_secs(5),
            w.updates.wait_for(|g| g.number == 1),
        )
        .await
        .unwrap()
        .unwrap();
        // A valid change and a broken file land together: the last good generation
        // keeps serving, the valid change is not applied on its own.
        std::fs::write(dir.path().join("a.yaml"), svc("two")).unwrap();
        std::fs::write(dir.path().join("b.yaml"), "apiVersion: v1\nkind: [").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while w.stats.last_error().is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "the broken file was not seen"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let g = w.updates.borrow_and_update().clone();
        assert_eq!(g.number, 1);
        assert_eq!(g.config.services[0].id.name, "one");
        assert!(w.stats.last_error().unwrap().contains("b.yaml"));
        // Fixed: both apply as one new generation.
        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            w.updates.wait_for(|g| g.number == 2),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(w.updates.borrow().config.services[0].id.name, "two");
    }
}
