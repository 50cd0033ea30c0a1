//! The objects of one source, by key, and the ones it refused. A source that sends
//! whole sets (the directory) replaces everything at once; a source that sends one
//! object at a time (the Kubernetes API) applies each change on its own, and a bad
//! object is refused alone: its last accepted version, if any, keeps serving, and
//! the refusal is kept for the operator (and, with the API source, for the object's
//! status) until the object is fixed or deleted.
use std::collections::BTreeMap;

use super::{
    enrollment,
    error::FieldError,
    model::Config,
    object::{Object, ObjectKey},
};

/// One change at an incremental source.
#[derive(Debug, Clone)]
pub enum Change {
    /// An object added or modified: translated, or refused with the field at fault.
    Apply {
        key: ObjectKey,
        object: Box<Result<Object, FieldError>>,
    },
    Delete(ObjectKey),
}

/// An object the source holds but the agent refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub key: ObjectKey,
    pub error: FieldError,
    /// An earlier accepted version of the object is what serves.
    pub previous_serves: bool,
}

#[derive(Debug, Default)]
pub struct Store {
    objects: BTreeMap<ObjectKey, Object>,
    rejected: BTreeMap<ObjectKey, FieldError>,
}

impl Store {
    /// Applies one change; true when the accepted objects changed.
    pub fn apply(&mut self, change: Change) -> bool {
        match change {
            Change::Apply { key, object } => match *object {
                Ok(object) => {
                    self.rejected.remove(&key);
                    // An equal object keeps the allocation the configs already share.
                    if self.objects.get(&key) == Some(&object) {
                        return false;
                    }
                    self.objects.insert(key, object);
                    true
                }
                Err(error) => {
                    self.rejected.insert(key, error);
                    false
                }
            },
            Change::Delete(key) => {
                self.rejected.remove(&key);
                self.objects.remove(&key).is_some()
            }
        }
    }

    /// Replaces every object (a source that only knows whole sets). The set was
    /// accepted whole, so nothing stays refused.
    pub fn replace(&mut self, objects: impl IntoIterator<Item = Object>) {
        self.objects = objects.into_iter().map(|o| (o.key(), o)).collect();
        self.rejected.clear();
    }

    /// The config of the accepted objects, in key order (the same objects give the
    /// same config whatever order they arrived in), with each pod's enrollment
    /// resolved against its namespace and the source's `default`. The config shares
    /// the store's objects; a pod whose enrollment resolved differently is copied once
    /// and kept here resolved, so the next config shares it again.
    pub fn config(&mut self, default: enrollment::Default) -> Config {
        let mut config = Config::default();
        for o in self.objects.values() {
            config.push(o.clone());
        }
        config.resolve_enrollment(default);
        // Pods are pushed in key order, as they are stored.
        let stored = self.objects.values_mut().filter_map(|o| match o {
            Object::Pod(p) => Some(p),
            _ => None,
        });
        for (stored, resolved) in stored.zip(&config.pods) {
            if !std::sync::Arc::ptr_eq(stored, resolved) {
                *stored = resolved.clone();
            }
        }
        config
    }

    /// Every key of `kind` the source holds, accepted or refused.
    pub fn keys(&self, kind: super::kind::Kind) -> Vec<ObjectKey> {
        let mut keys: Vec<ObjectKey> = self
            .objects
            .keys()
            .chain(self.rejected.keys())
            .filter(|k| k.kind == kind)
            .cloned()
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    /// The source holds the object, accepted or refused.
    pub fn contains(&self, key: &ObjectKey) -> bool {
        self.objects.contains_key(key) || self.rejected.contains_key(key)
    }

    /// Every accepted object, in key order.
    pub fn objects(&self) -> impl Iterator<Item = &Object> {
        self.objects.values()
    }

    /// The accepted version of an object.
    pub fn object(&self, key: &ObjectKey) -> Option<&Object> {
        self.objects.get(key)
    }

    /// Why the object's current version is refused, and whether an earlier accepted
    /// version serves.
    pub fn rejection(&self, key: &ObjectKey) -> Option<(&FieldError, bool)> {
        self.rejected
            .get(key)
            .map(|e| (e, self.objects.contains_key(key)))
    }

    pub fn rejected(&self) -> Vec<Rejection> {
        self.rejected
            .iter()
            .map(|(key, error)| Rejection {
                key: key.clone(),
                error: error.clone(),
                previous_serves: self.objects.contains_key(key),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{kind::Kind, object::translate};

    fn service(name: &str, port: i64) -> (ObjectKey, Result<Object, FieldError>) {
        let key = ObjectKey {
            kind: Kind::Service,
            id: crate::config::NamespacedName {
                namespace: "shop".into(),
                name: name.into(),
            },
        };
        let json = serde_json::json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": "shop"},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": port}]}
        });
        (key, translate(Kind::Service, json))
    }

    fn apply(store: &mut Store, (key, object): (ObjectKey, Result<Object, FieldError>)) -> bool {
        store.apply(Change::Apply {
            key,
            object: Box::new(object),
        })
    }

    fn ports(store: &mut Store) -> Vec<(String, u16)> {
        store
            .config(enrollment::Default::Enrolled)
            .services
            .iter()
            .map(|s| (s.id.name.clone(), s.ports[0].port))
            .collect()
    }

    #[test]
    fn a_bad_object_is_refused_alone_and_its_last_good_version_serves() {
        let mut store = Store::default();
        assert!(apply(&mut store, service("web", 80)));
        // A bad update of web: refused, web keeps port 80.
        assert!(!apply(&mut store, service("web", 0)));
        // A good object beside it still applies.
        assert!(apply(&mut store, service("api", 81)));
        assert_eq!(ports(&mut store), [("api".into(), 81), ("web".into(), 80)]);
        let r = store.rejected();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].key.to_string(), "Service shop/web");
        assert!(r[0].error.field.contains("port"), "{:?}", r[0].error);
        assert!(r[0].previous_serves);
        // A new object that is bad never applies, and nothing serves for it.
        assert!(!apply(&mut store, service("new", 0)));
        let new = store
            .rejected()
            .into_iter()
            .find(|r| r.key.id.name == "new");
        assert!(!new.unwrap().previous_serves);
        // Fixed: applied, and no longer refused.
        assert!(apply(&mut store, service("web", 8080)));
        assert_eq!(ports(&mut store)[1], ("web".into(), 8080));
        assert_eq!(store.rejected().len(), 1);
        // Deleted: gone, refusal and all.
        let (new_key, _) = service("new", 0);
        assert!(!store.apply(Change::Delete(new_key)));
        assert!(store.rejected().is_empty());
        let (web_key, _) = service("web", 0);
        assert!(store.apply(Change::Delete(web_key)));
        assert_eq!(ports(&mut store), [("api".into(), 81)]);
    }

    #[test]
    fn the_same_object_again_is_no_change_and_order_of_arrival_does_not_matter() {
        let mut a = Store::default();
        assert!(apply(&mut a, service("web", 80)));
        assert!(!apply(&mut a, service("web", 80)));
        apply(&mut a, service("api", 81));
        let mut b = Store::default();
        apply(&mut b, service("api", 81));
        apply(&mut b, service("web", 80));
        assert_eq!(
            a.config(enrollment::Default::Enrolled),
            b.config(enrollment::Default::Enrolled)
        );
    }

    #[test]
    fn generations_share_unchanged_objects_and_a_resolved_pod_is_copied_once() {
        let mut store = Store::default();
        apply(&mut store, service("web", 80));
        let pod = serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "app", "namespace": "shop"},
            "spec": {"nodeName": "node-1"},
            "status": {"podIP": "10.244.1.5"}
        });
        let key = ObjectKey {
            kind: Kind::Pod,
            id: crate::config::NamespacedName {
                namespace: "shop".into(),
                name: "app".into(),
            },
        };
        apply(&mut store, (key, translate(Kind::Pod, pod)));
        let first = store.config(enrollment::Default::Enrolled);
        // Translated not enrolled, resolved enrolled by the default: one copy.
        assert!(first.pods[0].enroll);
        let second = store.config(enrollment::Default::Enrolled);
        use std::sync::Arc;
        assert!(Arc::ptr_eq(&first.services[0], &second.services[0]));
        assert!(
            Arc::ptr_eq(&first.pods[0], &second.pods[0]),
            "the resolved pod is kept and shared"
        );
        // A changed object is the only new allocation.
        apply(&mut store, service("web", 8080));
        let third = store.config(enrollment::Default::Enrolled);
        assert!(!Arc::ptr_eq(&second.services[0], &third.services[0]));
        assert!(Arc::ptr_eq(&second.pods[0], &third.pods[0]));
        assert_ne!(second, third);
    }
}
