//! What the watch of each kind has delivered, applied to the store: the decisions of
//! the API source, kept free of I/O so they are tested without a server.
//!
//! Each kind goes Waiting -> Listing -> Synced. A (re-)list starts with `Init`, sends
//! every object, and ends with `InitDone`; an object the store holds that the list did
//! not send was deleted while the watch was away (a 410 Gone re-list after a gap), so
//! it is removed then. A kind whose resource the server does not serve (a CRD not
//! installed) is Absent: it holds no objects, and counts as synced so the agent can
//! become ready; the watch keeps retrying and lists it once it appears.
use std::collections::{BTreeMap, HashSet};

use super::route_status::RouteMeta;
use crate::config::{Change, Kind, Object, ObjectKey, Store, error::FieldError};

/// What one kind's watch sends the source's loop.
#[derive(Debug)]
pub enum Input {
    /// A (re-)list begins.
    Init(Kind),
    /// An object, from the list (`listed`) or from the watch after it.
    Applied {
        key: ObjectKey,
        object: Box<Result<Object, FieldError>>,
        listed: bool,
        /// A route's parentRefs, generation and status, for its status.
        route: Option<Box<RouteMeta>>,
    },
    Deleted(ObjectKey),
    /// The list is complete.
    InitDone(Kind),
    /// The server does not serve the kind (404).
    Absent(Kind),
    /// The watch failed; it retries with backoff.
    Failed(Kind, String),
    /// The server compacted the history the watch would resume from (410 Gone): the
    /// watch re-lists, which is routine.
    Expired(Kind),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KindState {
    Waiting,
    Listing { seen: HashSet<ObjectKey> },
    Synced,
    Absent,
}

#[derive(Debug)]
pub struct Tracker {
    kinds: BTreeMap<Kind, KindState>,
}

impl Tracker {
    pub fn new(kinds: &[Kind]) -> Tracker {
        Tracker {
            kinds: kinds.iter().map(|k| (*k, KindState::Waiting)).collect(),
        }
    }

    /// Every kind has been listed once (or is absent): the config is whole.
    pub fn ready(&self) -> bool {
        self.kinds
            .values()
            .all(|s| matches!(s, KindState::Synced | KindState::Absent))
    }

    #[cfg(test)]
    pub fn state(&self, kind: Kind) -> Option<&KindState> {
        self.kinds.get(&kind)
    }

    /// Applies `input` to `store`; true when the accepted objects changed.
    pub fn apply(&mut self, input: Input, store: &mut Store) -> bool {
        match input {
            Input::Init(kind) => {
                self.kinds.insert(
                    kind,
                    KindState::Listing {
                        seen: HashSet::new(),
                    },
                );
                false
            }
            Input::Applied {
                key,
                object,
                listed,
                ..
            } => {
                if listed && let Some(KindState::Listing { seen }) = self.kinds.get_mut(&key.kind) {
                    seen.insert(key.clone());
                }
                store.apply(Change::Apply { key, object })
            }
            Input::Deleted(key) => store.apply(Change::Delete(key)),
            Input::InitDone(kind) => {
                let seen = match self.kinds.insert(kind, KindState::Synced) {
                    Some(KindState::Listing { seen }) => seen,
                    _ => HashSet::new(),
                };
                remove_unseen(store, kind, &seen)
            }
            Input::Absent(kind) => {
                let was = self.kinds.insert(kind, KindState::Absent);
                // Only a kind that held objects loses them: a failed re-list of a
                // served kind is reported as Failed, never as Absent.
                was != Some(KindState::Absent) && remove_unseen(store, kind, &HashSet::new())
            }
            Input::Failed(..) | Input::Expired(_) => false,
        }
    }
}

fn remove_unseen(store: &mut Store, kind: Kind, seen: &HashSet<ObjectKey>) -> bool {
    let mut changed = false;
    for key in store.keys(kind) {
        if !seen.contains(&key) {
            changed |= store.apply(Change::Delete(key));
        }
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{NamespacedName, enrollment, translate};

    fn key(kind: Kind, name: &str) -> ObjectKey {
        ObjectKey {
            kind,
            id: NamespacedName {
                namespace: if kind == Kind::Namespace {
                    String::new()
                } else {
                    "shop".into()
                },
                name: name.into(),
            },
        }
    }

    fn service(name: &str, port: u16, listed: bool) -> Input {
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": port}]}
        });
        Input::Applied {
            key: key(Kind::Service, name),
            object: Box::new(translate(Kind::Service, json)),
            listed,
            route: None,
        }
    }

    fn names(store: &mut Store) -> Vec<String> {
        store
            .config(enrollment::Default::NotEnrolled)
            .services
            .iter()
            .map(|s| s.id.name.clone())
            .collect()
    }

    #[test]
    fn ready_only_once_every_kind_is_listed_or_absent() {
        let mut t = Tracker::new(&[Kind::Service, Kind::HttpRoute]);
        let mut store = Store::default();
        assert!(!t.ready());
        t.apply(Input::Init(Kind::Service), &mut store);
        t.apply(service("web", 80, true), &mut store);
        t.apply(Input::InitDone(Kind::Service), &mut store);
        assert!(!t.ready(), "HTTPRoute not listed yet");
        t.apply(Input::Failed(Kind::HttpRoute, "timeout".into()), &mut store);
        assert!(!t.ready(), "a failure is not a list");
        t.apply(Input::Absent(Kind::HttpRoute), &mut store);
        assert!(t.ready());
        assert_eq!(names(&mut store), ["web"]);
    }

    #[test]
    fn a_relist_removes_what_was_deleted_while_the_watch_was_away() {
        let mut t = Tracker::new(&[Kind::Service]);
        let mut store = Store::default();
        t.apply(Input::Init(Kind::Service), &mut store);
        for n in ["a", "b", "c"] {
            t.apply(service(n, 80, true), &mut store);
        }
        t.apply(Input::InitDone(Kind::Service), &mut store);
        // 410 Gone: the watcher re-lists; b was deleted and d added in the gap.
        t.apply(Input::Init(Kind::Service), &mut store);
        assert_eq!(
            names(&mut store),
            ["a", "b", "c"],
            "the old set serves meanwhile"
        );
        for n in ["a", "c", "d"] {
            t.apply(service(n, 80, true), &mut store);
        }
        assert!(t.apply(Input::InitDone(Kind::Service), &mut store));
        assert_eq!(names(&mut store), ["a", "c", "d"]);
        // A watch event after the list is applied at once.
        assert!(t.apply(Input::Deleted(key(Kind::Service, "a")), &mut store));
        assert_eq!(names(&mut store), ["c", "d"]);
    }

    #[test]
    fn a_rejected_object_listed_again_is_kept_rejected_not_deleted() {
        let mut t = Tracker::new(&[Kind::Service]);
        let mut store = Store::default();
        t.apply(Input::Init(Kind::Service), &mut store);
        t.apply(service("web", 80, true), &mut store);
        t.apply(Input::InitDone(Kind::Service), &mut store);
        // A bad update: refused alone, port 80 serves.
        t.apply(service("web", 0, false), &mut store);
        assert_eq!(names(&mut store), ["web"]);
        assert_eq!(store.rejected().len(), 1);
        // Re-listed, still bad: still refused, and the last good version still serves.
        t.apply(Input::Init(Kind::Service), &mut store);
        t.apply(service("web", 0, true), &mut store);
        t.apply(Input::InitDone(Kind::Service), &mut store);
        assert_eq!(names(&mut store), ["web"]);
        assert!(store.rejected()[0].previous_serves);
    }

    #[test]
    fn a_crd_that_goes_away_takes_its_objects_and_comes_back_with_a_list() {
        let mut t = Tracker::new(&[Kind::Service]);
        let mut store = Store::default();
        t.apply(Input::Init(Kind::Service), &mut store);
        t.apply(service("web", 80, true), &mut store);
        t.apply(Input::InitDone(Kind::Service), &mut store);
        assert!(t.apply(Input::Absent(Kind::Service), &mut store));
        assert!(names(&mut store).is_empty());
        assert!(t.ready());
        assert!(!t.apply(Input::Absent(Kind::Service), &mut store));
        t.apply(Input::Init(Kind::Service), &mut store);
        assert!(!t.ready());
        t.apply(service("web", 80, true), &mut store);
        t.apply(Input::InitDone(Kind::Service), &mut store);
        assert_eq!(names(&mut store), ["web"]);
        assert_eq!(t.state(Kind::Service), Some(&KindState::Synced));
    }
}
