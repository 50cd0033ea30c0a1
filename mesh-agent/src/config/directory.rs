//! The directory source: every `*.yaml`/`*.yml` file of a directory, watched. inotify
//! (through `notify`) gives sub-second reaction to writes, renames and removals (never
//! to reads: the agent's own reads must not wake it); a slow poll of file sizes and
//! mtimes is the safety net for filesystems whose changes inotify misses. Only the
//! files whose size or mtime changed are read again (`files`), so an idle agent reads
//! no config file and one edited file costs its own parse, not the directory's; they
//! are parsed on a blocking thread, off the runtime that carries traffic.
//!
//! The directory is one unit: either every changed file loads and the whole set
//! replaces the last one, or the first error is reported and the last good config
//! keeps serving (an operator editing files expects an edit to apply whole or not at
//! all).
use std::{path::PathBuf, time::Duration};

use notify::{RecursiveMode, Watcher as _};
use tokio::{sync::mpsc, time::Instant};
use tracing::{error, warn};

use super::{files::DirFiles, publish::Publisher, watch::ConfigSource};

/// The longest wait for a write in progress to finish before the files are read.
const SETTLE: Duration = Duration::from_millis(100);
/// After an event that completes a write (a close after writing, a rename, a
/// removal), how long the events must be quiet before reading: a burst the kernel
/// reports in one go (a Kubernetes ConfigMap update creates a directory, swaps a link
/// to it and removes the old one, within microseconds) is read once. Longer only adds
/// to every change's latency (it was most of it at 5 ms).
const QUIET: Duration = Duration::from_millis(2);
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
            if let Ok(e) = res
                && let Some(step) = step_of(&e.kind)
            {
                let _ = events_tx.send(step);
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
        let mut files = DirFiles::default();
        let mut loaded_once = false;
        // When the change being read reached the agent (the first event of it).
        let mut since = Instant::now();
        loop {
            let d = dir.clone();
            let mut f = std::mem::take(&mut files);
            match tokio::task::spawn_blocking(move || {
                let r = f.refresh(&d);
                (f, r)
            })
            .await
            {
                Ok((f, result)) => {
                    files = f;
                    match result {
                        Ok(changed) if changed || !loaded_once => {
                            publisher.publish_since(files.config(), Some(since.into_std()));
                            loaded_once = true;
                        }
                        Ok(_) => {}
                        Err(e) => publisher.reject(e.to_string()),
                    }
                }
                // What was loaded is lost with the task: the next round reads all.
                Err(e) => error!(error = %e, "config loader task failed"),
            }
            if publisher.is_closed() {
                return;
            }
            tokio::select! {
                ev = events.recv(), if watching => {
                    let Some(step) = ev else {
                        watching = false; // the watcher is gone: poll only
                        continue;
                    };
                    since = Instant::now();
                    if !settle(&mut events, step, since + SETTLE).await {
                        watching = false;
                    }
                }
                _ = poll.tick() => since = Instant::now(),
            }
        }
    }
}

/// What a file event says about the write it belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// More may follow (a file created, data written): wait for its end.
    InProgress,
    /// A write is complete (closed after writing, renamed in, removed).
    Complete,
}

/// Writes, renames, removals, closes after writing and lost events; not opens, reads
/// or attribute changes (the agent's own reads must not wake it).
fn step_of(kind: &notify::EventKind) -> Option<Step> {
    use notify::{
        EventKind,
        event::{AccessKind, AccessMode, ModifyKind},
    };
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => Some(Step::Complete),
        EventKind::Remove(_) | EventKind::Modify(ModifyKind::Name(_)) => Some(Step::Complete),
        EventKind::Create(_) => Some(Step::InProgress),
        EventKind::Modify(ModifyKind::Metadata(_)) => None,
        EventKind::Modify(_) => Some(Step::InProgress),
        // inotify's queue overflowed: events were lost, so read as after a write.
        EventKind::Other => Some(Step::Complete),
        EventKind::Access(_) | EventKind::Any => None,
    }
}

/// Waits for a burst of events to end: [`QUIET`] after the last event when that one
/// completed a write, else until `deadline`. False when the watcher is gone.
async fn settle(
    events: &mut mpsc::UnboundedReceiver<Step>,
    mut last: Step,
    deadline: Instant,
) -> bool {
    loop {
        let until = match last {
            Step::Complete => (Instant::now() + QUIET).min(deadline),
            Step::InProgress => deadline,
        };
        match tokio::time::timeout_at(until, events.recv()).await {
            Ok(Some(step)) => last = step,
            Ok(None) => return false,
            Err(_) => return true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigWatch;
    use notify::{
        EventKind,
        event::{
            AccessKind, AccessMode, CreateKind, DataChange, MetadataKind, ModifyKind, RenameMode,
        },
    };

    /// Waits up to 5 s for generation `n` to be published.
    async fn generation(w: &mut ConfigWatch, n: u64) {
        tokio::time::timeout(
            Duration::from_secs(5),
            w.updates.wait_for(|g| g.number == n),
        )
        .await
        .unwrap()
        .unwrap();
    }

    #[test]
    fn writes_renames_and_removals_wake_the_watcher_and_only_their_ends_end_a_burst() {
        use Step::*;
        let step = |k| step_of(&k);
        assert_eq!(step(EventKind::Create(CreateKind::File)), Some(InProgress));
        assert_eq!(
            step(EventKind::Modify(ModifyKind::Data(DataChange::Content))),
            Some(InProgress)
        );
        assert_eq!(
            step(EventKind::Access(AccessKind::Close(AccessMode::Write))),
            Some(Complete)
        );
        assert_eq!(
            step(EventKind::Modify(ModifyKind::Name(RenameMode::To))),
            Some(Complete)
        );
        assert_eq!(
            step(EventKind::Remove(notify::event::RemoveKind::File)),
            Some(Complete)
        );
        assert_eq!(step(EventKind::Other), Some(Complete), "a queue overflow");
        // The agent's own reads never wake it.
        assert_eq!(step(EventKind::Access(AccessKind::Read)), None);
        assert_eq!(
            step(EventKind::Access(AccessKind::Close(AccessMode::Read))),
            None
        );
        assert_eq!(
            step(EventKind::Modify(ModifyKind::Metadata(
                MetadataKind::AccessTime
            ))),
            None
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_is_read_once_quiet_after_a_complete_write_and_at_the_deadline_otherwise() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        // A completed write with nothing after it: read after QUIET.
        let start = Instant::now();
        assert!(settle(&mut rx, Step::Complete, start + SETTLE).await);
        assert_eq!(start.elapsed(), QUIET);
        // A write in progress that never completes: read at the deadline.
        let start = Instant::now();
        assert!(settle(&mut rx, Step::InProgress, start + SETTLE).await);
        assert_eq!(start.elapsed(), SETTLE);
        // In progress, then completed: read QUIET after the completion.
        let start = Instant::now();
        let feeder = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(30)).await;
            tx.send(Step::Complete).unwrap();
            tx
        });
        assert!(settle(&mut rx, Step::InProgress, start + SETTLE).await);
        assert_eq!(start.elapsed(), Duration::from_millis(30) + QUIET);
        // The watcher gone.
        drop(feeder.await.unwrap());
        assert!(!settle(&mut rx, Step::InProgress, Instant::now() + SETTLE).await);
    }

    #[tokio::test]
    async fn a_broken_file_next_to_a_valid_change_applies_neither() {
        let dir = tempfile::tempdir().unwrap();
        let svc = |name: &str| {
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{}}\n")
        };
        std::fs::write(dir.path().join("a.yaml"), svc("one")).unwrap();
        let mut w = ConfigWatch::start(Directory::new(dir.path().to_owned()));
        generation(&mut w, 1).await;
        // A broken file, then a valid change beside it: the last good generation keeps
        // serving, the valid change is not applied on its own (however the two writes
        // fall into the agent's reads).
        std::fs::write(dir.path().join("b.yaml"), "apiVersion: v1\nkind: [").unwrap();
        std::fs::write(dir.path().join("a.yaml"), svc("two")).unwrap();
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
        generation(&mut w, 2).await;
        assert_eq!(w.updates.borrow().config.services[0].id.name, "two");
    }

    /// A Kubernetes ConfigMap volume: each file a symlink through `..data` to a hidden
    /// timestamped directory; an update writes a new directory and swaps `..data` in
    /// one rename. The swap alone must be seen, and applied whole.
    #[tokio::test]
    async fn a_configmap_style_symlink_swap_applies_both_files_at_once() {
        use std::os::unix::fs::symlink;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let svc = |name: &str, port: u16| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\n\
                 spec: {{ports: [{{port: {port}}}]}}\n"
            )
        };
        let version = |v: &str, port: u16| {
            std::fs::create_dir(d.join(v)).unwrap();
            std::fs::write(d.join(v).join("a.yaml"), svc("a", port)).unwrap();
            std::fs::write(d.join(v).join("b.yaml"), svc("b", port)).unwrap();
        };
        version("..v1", 80);
        symlink("..v1", d.join("..data")).unwrap();
        symlink("..data/a.yaml", d.join("a.yaml")).unwrap();
        symlink("..data/b.yaml", d.join("b.yaml")).unwrap();
        let mut w = ConfigWatch::start(Directory::new(d.to_owned()));
        generation(&mut w, 1).await;
        assert_eq!(w.updates.borrow().config.services.len(), 2);
        version("..v2", 81);
        symlink("..v2", d.join("..data_tmp")).unwrap();
        std::fs::rename(d.join("..data_tmp"), d.join("..data")).unwrap();
        std::fs::remove_dir_all(d.join("..v1")).unwrap();
        generation(&mut w, 2).await;
        let g = w.updates.borrow().clone();
        let ports: Vec<u16> = g.config.services.iter().map(|s| s.ports[0].port).collect();
        assert_eq!(ports, [81, 81], "both files of the swap, in one generation");
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
        let mut files = DirFiles::default();
        files.refresh(dir.path()).unwrap();
        files.config()
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
