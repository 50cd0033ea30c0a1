//! The directory source: every `*.yaml`/`*.yml` file of a directory, watched. inotify
//! (through `notify`) gives sub-second reaction to writes, renames and removals (never
//! to reads: the agent's own reads must not wake it); a slow poll of file sizes and
//! mtimes is the safety net for filesystems whose changes inotify misses. Files are
//! read only when that fingerprint changed, so an idle agent reads no config file, and
//! they are parsed on a blocking thread, off the runtime that carries traffic.
//!
//! The directory is one unit: either every file loads and the whole set replaces the
//! last one, or the first error is reported and the last good config keeps serving
//! (an operator editing files expects an edit to apply whole or not at all).
use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use notify::{RecursiveMode, Watcher as _};
use tokio::sync::mpsc;
use tracing::{error, warn};

use super::{enrollment, load, publish::Publisher, store::Store, watch::ConfigSource};

/// How long to wait for a burst of file events to settle before reloading.
const SETTLE: Duration = Duration::from_millis(100);
/// The safety-net poll while inotify watches.
const POLL: Duration = Duration::from_secs(30);
/// The poll when inotify cannot watch the directory.
const POLL_UNWATCHED: Duration = Duration::from_secs(2);

pub struct Directory {
    dir: PathBuf,
}

impl Directory {
    pub fn new(dir: PathBuf) -> Directory {
        Directory { dir }
    }
}

impl ConfigSource for Directory {
    fn describe(&self) -> String {
        format!("dir {}", self.dir.display())
    }

    async fn run(self, mut publisher: Publisher) {
        let dir = self.dir;
        let (events_tx, mut events) = mpsc::unbounded_channel();
        // The watcher lives in this task so it stops with it.
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
        let mut watching = watcher.is_some();
        let mut poll = tokio::time::interval(if watching { POLL } else { POLL_UNWATCHED });
        let mut store = Store::default();
        let mut fingerprint = None;
        let mut loaded_once = false;
        loop {
            let now = fingerprint_of(&dir);
            if now != fingerprint || !loaded_once {
                fingerprint = now;
                let d = dir.clone();
                match tokio::task::spawn_blocking(move || load::load_dir(&d)).await {
                    Ok(Ok(objects)) => {
                        store.replace(objects);
                        publisher.publish(store.config(enrollment::Default::Enrolled));
                        loaded_once = true;
                    }
                    Ok(Err(e)) => publisher.reject(e.to_string()),
                    Err(e) => error!(error = %e, "config loader task failed"),
                }
            }
            if publisher.is_closed() {
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
    use crate::config::ConfigWatch;
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
        let mut w = ConfigWatch::start(Directory::new(dir.path().to_owned()));
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

#[cfg(test)]
mod order_tests {
    use super::*;

    fn svc(name: &str) -> String {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{}}\n")
    }

    fn config_of(files: &[(&str, String)]) -> crate::config::Config {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let mut store = Store::default();
        store.replace(load::load_dir(dir.path()).unwrap());
        store.config(enrollment::Default::Enrolled)
    }

    #[test]
    fn the_same_objects_in_other_files_are_the_same_config() {
        let split = config_of(&[("b.yaml", svc("a")), ("a.yaml", svc("b"))]);
        let one = config_of(&[("all.yaml", format!("{}---\n{}", svc("b"), svc("a")))]);
        assert_eq!(split, one);
        // Key order, not file order.
        let names: Vec<&str> = split.services.iter().map(|s| s.id.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
    }
}
