//! The directory source's memory of its files: each file's fingerprint (size and
//! mtime) and the objects it held when the directory last loaded, beside the store
//! those objects live in. A change re-reads only the files whose fingerprint moved and
//! applies what they now hold to the store, so one endpoint edited in a directory of
//! 100,000 is one small file parsed and one object replaced, not the whole directory
//! read again.
//!
//! The directory is still one unit: every changed file must load, and no object may
//! be defined in two files, or nothing is applied, the error is returned and the last
//! good config keeps serving. A file that failed stays "changed" (its fingerprint is
//! not the one loaded), so it is read again on the next event until it is fixed.
use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, SystemTime},
};

use super::{
    enrollment,
    error::ConfigError,
    load,
    model::Config,
    object::{Object, ObjectKey},
    store::{Change, Store},
};

/// What tells a file changed without reading it.
pub type Fingerprint = (u64, Option<SystemTime>);

/// A file whose mtime is this close to the moment it was read may be written again
/// within the same clock tick (the kernel stamps files with a coarse clock, up to
/// 10 ms a tick) without its mtime moving: it is read again on the next refresh
/// whatever its fingerprint says.
const SAME_TICK: Duration = Duration::from_millis(50);

/// One file as it last loaded.
#[derive(Debug)]
struct Loaded {
    fingerprint: Fingerprint,
    /// Its mtime was far enough before the read that the fingerprint can be trusted.
    settled: bool,
    /// The objects it held; they share their allocations with the store's.
    objects: Vec<Object>,
}

/// The files of one directory as last loaded, and the store of their objects.
#[derive(Debug, Default)]
pub struct DirFiles {
    files: BTreeMap<Arc<Path>, Loaded>,
    store: Store,
}

/// A file read again: what it holds now.
struct Reread {
    path: Arc<Path>,
    fingerprint: Fingerprint,
    settled: bool,
    objects: Vec<Object>,
}

impl DirFiles {
    /// Brings the store up to the directory as it is now: reads the files whose
    /// fingerprint is not the one loaded, checks them, and applies them. Returns
    /// whether any object changed; on an error nothing was applied.
    pub fn refresh(&mut self, dir: &Path) -> Result<bool, ConfigError> {
        let now = fingerprints(dir)?;
        let total: u64 = now.values().map(|f| f.0).sum();
        if total > load::MAX_DIR_BYTES {
            return Err(ConfigError::DirTooLarge {
                path: dir.to_owned(),
                size: total,
                limit: load::MAX_DIR_BYTES,
            });
        }
        let mut reread = Vec::new();
        let read_at = SystemTime::now();
        for (path, fingerprint) in &now {
            if self
                .files
                .get(path.as_ref())
                .is_some_and(|l| l.settled && l.fingerprint == *fingerprint)
            {
                continue;
            }
            let text = load::read_file(path)?;
            let mut objects = Vec::new();
            // Duplicates within the file are caught here, across files below.
            load::parse_text(path, &text, &mut objects, &mut Default::default())?;
            reread.push(Reread {
                path: path.clone(),
                fingerprint: *fingerprint,
                settled: settled(fingerprint.1, read_at),
                objects,
            });
        }
        let removed: Vec<Arc<Path>> = self
            .files
            .keys()
            .filter(|p| !now.contains_key(p.as_ref()))
            .cloned()
            .collect();
        if reread.is_empty() && removed.is_empty() {
            return Ok(false);
        }
        let changes = self.changes(&reread, &removed)?;
        let mut changed = false;
        for change in changes {
            changed |= self.store.apply(change);
        }
        for path in removed {
            self.files.remove(&path);
        }
        for r in reread {
            // Keep the store's allocation of each object: an unchanged object stays
            // the one the store (and the config serving) already holds.
            let objects = r
                .objects
                .into_iter()
                .map(|o| self.store.object(&o.key()).cloned().unwrap_or(o))
                .collect();
            self.files.insert(
                r.path,
                Loaded {
                    fingerprint: r.fingerprint,
                    settled: r.settled,
                    objects,
                },
            );
        }
        Ok(changed)
    }

    /// The store changes that take the loaded files to `reread` (and without
    /// `removed`): deletions of what those files no longer hold, then every object
    /// they hold now (the store ignores one that did not change). Refuses an object
    /// that a file not read again already defines, naming both files in path order.
    fn changes(
        &self,
        reread: &[Reread],
        removed: &[Arc<Path>],
    ) -> Result<Vec<Change>, ConfigError> {
        let before: HashSet<ObjectKey> = reread
            .iter()
            .map(|r| &r.path)
            .chain(removed)
            .filter_map(|p| self.files.get(p.as_ref()))
            .flat_map(|l| l.objects.iter().map(Object::key))
            .collect();
        let mut after: BTreeMap<ObjectKey, &Path> = BTreeMap::new();
        for r in reread {
            for o in &r.objects {
                let key = o.key();
                let elsewhere = match after.get(&key) {
                    Some(first) => Some(first.to_path_buf()),
                    None if !before.contains(&key) && self.store.object(&key).is_some() => {
                        self.owner(&key)
                    }
                    None => None,
                };
                if let Some(other) = elsewhere {
                    let (first, path) = if other.as_path() < r.path.as_ref() {
                        (other, r.path.to_path_buf())
                    } else {
                        (r.path.to_path_buf(), other)
                    };
                    return Err(ConfigError::Duplicate {
                        path,
                        object: key.to_string(),
                        first,
                    });
                }
                after.insert(key, &r.path);
            }
        }
        let mut changes: Vec<Change> = before
            .into_iter()
            .filter(|k| !after.contains_key(k))
            .map(Change::Delete)
            .collect();
        changes.extend(reread.iter().flat_map(|r| {
            r.objects.iter().map(|o| Change::Apply {
                key: o.key(),
                object: Box::new(Ok(o.clone())),
            })
        }));
        Ok(changes)
    }

    /// The loaded file that holds `key` (only on the way to an error: a scan).
    fn owner(&self, key: &ObjectKey) -> Option<PathBuf> {
        self.files
            .iter()
            .find(|(_, l)| l.objects.iter().any(|o| &o.key() == key))
            .map(|(p, _)| p.to_path_buf())
    }

    /// The config of every object loaded.
    pub fn config(&mut self) -> Config {
        self.store.config(enrollment::Default::Enrolled)
    }

    /// Every object loaded, in key order.
    #[cfg(test)]
    pub fn objects(&self) -> Vec<Object> {
        self.store.objects().cloned().collect()
    }
}

/// A file read at `read_at` with mtime `mtime` cannot change unseen any more: its
/// mtime is more than a clock tick old (or in the future, which no write in the same
/// tick can produce). An unknown mtime never settles.
fn settled(mtime: Option<SystemTime>, read_at: SystemTime) -> bool {
    mtime.is_some_and(|m| match read_at.duration_since(m) {
        Ok(age) => age > SAME_TICK,
        Err(_) => true,
    })
}

/// The fingerprint of every config file of `dir`. A file that vanishes between the
/// listing and its `stat` is left out, as if listed a moment later.
pub fn fingerprints(dir: &Path) -> Result<BTreeMap<Arc<Path>, Fingerprint>, ConfigError> {
    Ok(load::config_files(dir)?
        .into_iter()
        .filter_map(|p| {
            let meta = std::fs::metadata(&p).ok()?;
            Some((Arc::from(p), (meta.len(), meta.modified().ok())))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, port: u16) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: shop}}\n\
             spec:\n  clusterIP: 10.96.0.{}\n  ports: [{{port: {port}}}]\n---\n",
            port % 250
        )
    }

    fn ports(files: &DirFiles) -> Vec<(String, u16)> {
        files
            .objects()
            .iter()
            .filter_map(|o| match o {
                Object::Service(s) => Some((s.id.name.clone(), s.ports[0].port)),
                _ => None,
            })
            .collect()
    }

    /// Writes `text` as `name` in `dir` with a new mtime even within one clock tick
    /// (size and mtime are the fingerprint): each write a second later than the last.
    fn write(dir: &Path, name: &str, text: &str) {
        use std::sync::atomic::{AtomicU64, Ordering};
        static WRITES: AtomicU64 = AtomicU64::new(1);
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        let later = Duration::from_secs(WRITES.fetch_add(1, Ordering::Relaxed));
        set_mtime(&path, SystemTime::now() + later);
    }

    fn set_mtime(path: &Path, mtime: SystemTime) {
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
    }

    #[test]
    fn only_changed_files_are_read_and_unchanged_objects_keep_their_allocation() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.yaml",
            &(service("web", 80) + &service("api", 81)),
        );
        write(dir.path(), "b.yaml", &service("db", 82));
        let mut files = DirFiles::default();
        assert!(files.refresh(dir.path()).unwrap());
        let first = files.config();
        assert_eq!(ports(&files).len(), 3);
        // Nothing changed: nothing read, nothing applied.
        assert!(!files.refresh(dir.path()).unwrap());
        // a.yaml rewritten with web changed and api the same: api keeps its allocation.
        write(
            dir.path(),
            "a.yaml",
            &(service("web", 8080) + &service("api", 81)),
        );
        // b.yaml turned to garbage of the same size with its mtime put back: same
        // fingerprint, so it is not read (reading it would fail the refresh).
        let b = dir.path().join("b.yaml");
        let meta = std::fs::metadata(&b).unwrap();
        std::fs::write(&b, "[".repeat(meta.len() as usize)).unwrap();
        set_mtime(&b, meta.modified().unwrap());
        assert!(files.refresh(dir.path()).unwrap());
        let second = files.config();
        let by_name =
            |c: &Config, n: &str| c.services.iter().find(|s| s.id.name == n).cloned().unwrap();
        assert!(Arc::ptr_eq(
            &by_name(&first, "api"),
            &by_name(&second, "api")
        ));
        assert!(!Arc::ptr_eq(
            &by_name(&first, "web"),
            &by_name(&second, "web")
        ));
        assert_eq!(
            ports(&files),
            [("api".into(), 81), ("db".into(), 82), ("web".into(), 8080)]
        );
    }

    #[test]
    fn a_file_written_within_a_clock_tick_of_its_read_is_read_again() {
        let now = SystemTime::now();
        assert!(!settled(Some(now), now));
        assert!(!settled(Some(now - Duration::from_millis(10)), now));
        assert!(settled(Some(now - Duration::from_secs(1)), now));
        assert!(settled(Some(now + Duration::from_secs(1)), now));
        assert!(!settled(None, now));
        // A file just written is read again even with the same size and mtime.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.yaml");
        std::fs::write(&path, service("web", 80)).unwrap();
        let mut files = DirFiles::default();
        files.refresh(dir.path()).unwrap();
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        std::fs::write(&path, service("web", 81)).unwrap();
        set_mtime(&path, mtime);
        assert!(files.refresh(dir.path()).unwrap());
        assert_eq!(ports(&files), [("web".into(), 81)]);
    }

    #[test]
    fn objects_gone_from_a_file_or_with_a_removed_file_are_deleted() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "a.yaml",
            &(service("web", 80) + &service("api", 81)),
        );
        write(dir.path(), "b.yaml", &service("db", 82));
        let mut files = DirFiles::default();
        files.refresh(dir.path()).unwrap();
        write(dir.path(), "a.yaml", &service("web", 80));
        std::fs::remove_file(dir.path().join("b.yaml")).unwrap();
        assert!(files.refresh(dir.path()).unwrap());
        assert_eq!(ports(&files), [("web".into(), 80)]);
        // An object moving from one file to another in one step is kept.
        write(dir.path(), "a.yaml", "");
        write(dir.path(), "c.yaml", &service("web", 80));
        files.refresh(dir.path()).unwrap();
        assert_eq!(ports(&files), [("web".into(), 80)]);
    }

    #[test]
    fn an_error_applies_nothing_and_the_broken_file_is_read_again_until_fixed() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", &service("web", 80));
        write(dir.path(), "b.yaml", &service("db", 82));
        let mut files = DirFiles::default();
        files.refresh(dir.path()).unwrap();
        // One good change and one bad file: neither applies.
        write(dir.path(), "a.yaml", &service("web", 8080));
        write(dir.path(), "b.yaml", &service("db", 0));
        let e = files.refresh(dir.path()).unwrap_err().to_string();
        assert!(e.contains("b.yaml") && e.contains("Service shop/db"), "{e}");
        assert_eq!(ports(&files), [("db".into(), 82), ("web".into(), 80)]);
        // Nothing new on disk: the broken file is read again and refused again.
        assert!(files.refresh(dir.path()).is_err());
        write(dir.path(), "b.yaml", &service("db", 83));
        assert!(files.refresh(dir.path()).unwrap());
        assert_eq!(ports(&files), [("db".into(), 83), ("web".into(), 8080)]);
    }

    #[test]
    fn an_object_in_two_files_is_refused_naming_both_in_path_order() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "b.yaml", &service("web", 80));
        let mut files = DirFiles::default();
        files.refresh(dir.path()).unwrap();
        // A new earlier file defines it again: the unchanged later file is the duplicate.
        write(dir.path(), "a.yaml", &service("web", 81));
        let e = files.refresh(dir.path()).unwrap_err();
        let ConfigError::Duplicate {
            path,
            object,
            first,
        } = e
        else {
            panic!("{e}")
        };
        assert!(path.ends_with("b.yaml") && first.ends_with("a.yaml"));
        assert_eq!(object, "Service shop/web");
        assert_eq!(ports(&files), [("web".into(), 80)]);
        // Two new files at once.
        std::fs::remove_file(dir.path().join("a.yaml")).unwrap();
        write(dir.path(), "c.yaml", &service("api", 1));
        write(dir.path(), "d.yaml", &service("api", 2));
        let e = files.refresh(dir.path()).unwrap_err().to_string();
        assert!(e.contains("d.yaml") && e.contains("c.yaml"), "{e}");
    }
}

/// Where an endpoint change's time goes at 10,000 Services with 10 endpoints each, on
/// the source's side (run by hand: `cargo test -p mesh-agent --release --lib
/// config::files::scale -- --ignored --nocapture`).
#[cfg(test)]
mod scale {
    use super::*;
    use std::{fmt::Write as _, time::Instant};

    fn slice(i: usize, salt: usize) -> String {
        let mut s = format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{i}-a, namespace: scale, labels: {{kubernetes.io/service-name: s{i}}}}}\naddressType: IPv4\nports: [{{name: http, port: 8080}}]\nendpoints:\n"
        );
        for e in 0..10 {
            let n = i * 10 + e + salt;
            let _ = writeln!(
                s,
                "- addresses: [\"10.{}.{}.{}\"]",
                200 + (n >> 16) % 50,
                (n >> 8) % 256,
                n % 256
            );
        }
        s + "---\n"
    }

    #[test]
    #[ignore]
    fn scale() {
        let dir = tempfile::tempdir().unwrap();
        let mut big = String::new();
        for i in 0..10_000 {
            let _ = write!(
                big,
                "apiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: scale}}\nspec:\n  clusterIP: 10.{}.{}.{}\n  ports: [{{name: http, port: 80, targetPort: 8080}}]\n---\n",
                100 + i / 65536,
                (i / 256) % 256,
                i % 256
            );
            if i > 0 {
                big.push_str(&slice(i, 0));
            }
        }
        std::fs::write(dir.path().join("big.yaml"), big).unwrap();
        std::fs::write(dir.path().join("change.yaml"), slice(0, 0)).unwrap();
        let mut files = DirFiles::default();
        let t = Instant::now();
        files.refresh(dir.path()).unwrap();
        let read = t.elapsed();
        let c = files.config();
        println!("whole: refresh {read:?}, config {:?}", t.elapsed() - read);
        let mut keep = vec![c];
        std::thread::sleep(Duration::from_millis(100));
        for n in 1..=5 {
            std::fs::write(dir.path().join("change.yaml"), slice(0, n)).unwrap();
            let t = Instant::now();
            assert!(files.refresh(dir.path()).unwrap());
            let read = t.elapsed();
            let c = files.config();
            let built = t.elapsed() - read;
            let same = *keep.last().unwrap() == c;
            let compared = t.elapsed() - read - built;
            println!("change: refresh {read:?}, config {built:?}, compare {compared:?} ({same})");
            keep.push(c);
            if keep.len() > 2 {
                let t = Instant::now();
                drop(keep.remove(0));
                println!("  drop {:?}", t.elapsed());
            }
        }
    }
}
