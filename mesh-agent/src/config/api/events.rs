//! Each refused object reported as a Kubernetes Event on the object itself (type
//! Warning, reason `Rejected`), so `kubectl describe` and `kubectl get events` show
//! what the agent refused and which field, next to the object. Published by kube-rs's
//! event `Recorder` (events.k8s.io/v1; a repeat becomes a series, not a new Event) on a
//! task of its own, from a bounded queue: an Event that cannot be queued is dropped
//! (the refusal is still logged and counted).
use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::config::{Kind, ObjectKey, error::FieldError};

/// The Events' reporting controller.
pub const CONTROLLER: &str = "mesh.dev/agent";
/// The API caps an Event's note at 1 KiB.
const NOTE_LIMIT: usize = 1000;
const QUEUE: usize = 64;

pub struct RejectionEvents {
    tx: mpsc::Sender<(Event, ObjectReference)>,
}

impl RejectionEvents {
    /// `instance` tells reporters apart (the node's name, or the CA's).
    pub fn start(client: Client, instance: String) -> RejectionEvents {
        let (tx, mut rx) = mpsc::channel::<(Event, ObjectReference)>(QUEUE);
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: CONTROLLER.to_owned(),
                instance: Some(instance),
            },
        );
        tokio::spawn(async move {
            while let Some((event, regarding)) = rx.recv().await {
                match recorder.publish(&event, &regarding).await {
                    Ok(()) => debug!(object = ?regarding.name, "rejection reported as an Event"),
                    Err(e) => {
                        warn!(object = ?regarding.name, error = %e, "cannot report the rejection as an Event")
                    }
                }
            }
        });
        RejectionEvents { tx }
    }

    pub fn report(&self, key: &ObjectKey, error: &FieldError, previous_serves: bool) {
        if self
            .tx
            .try_send(event_of(key, error, previous_serves))
            .is_err()
        {
            debug!(object = %key, "Event queue full; the rejection is only logged");
        }
    }
}

/// The Event for one refused object, and the object it is about.
pub fn event_of(
    key: &ObjectKey,
    error: &FieldError,
    previous_serves: bool,
) -> (Event, ObjectReference) {
    let serves = if previous_serves {
        "the last accepted version keeps serving"
    } else {
        "nothing of it is applied"
    };
    let mut note = format!("field {}: {}; {serves}", error.field, error.message);
    if note.len() > NOTE_LIMIT {
        let mut cut = NOTE_LIMIT;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
    }
    let event = Event {
        type_: EventType::Warning,
        reason: "Rejected".to_owned(),
        note: Some(note),
        action: "Validate".to_owned(),
        secondary: None,
    };
    let regarding = ObjectReference {
        api_version: Some(key.kind.api_versions()[0].to_owned()),
        kind: Some(key.kind.name().to_owned()),
        name: Some(key.id.name.clone()),
        namespace: (key.kind != Kind::Namespace).then(|| key.id.namespace.clone()),
        ..Default::default()
    };
    (event, regarding)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::NamespacedName;

    #[test]
    fn the_event_names_the_object_the_field_and_what_serves() {
        let key = ObjectKey {
            kind: Kind::HttpRoute,
            id: NamespacedName {
                namespace: "shop".into(),
                name: "web".into(),
            },
        };
        let error = FieldError::new("spec.rules[0].matches[0].path.value", "is not a path");
        let (event, regarding) = event_of(&key, &error, true);
        assert_eq!(event.reason, "Rejected");
        assert!(matches!(event.type_, EventType::Warning));
        let note = event.note.unwrap();
        assert!(
            note.contains("spec.rules[0].matches[0].path.value: is not a path"),
            "{note}"
        );
        assert!(
            note.contains("last accepted version keeps serving"),
            "{note}"
        );
        assert_eq!(regarding.kind.as_deref(), Some("HTTPRoute"));
        assert_eq!(
            regarding.api_version.as_deref(),
            Some("gateway.networking.k8s.io/v1")
        );
        assert_eq!(regarding.namespace.as_deref(), Some("shop"));
        // A long message is cut to the API's limit, on a character boundary.
        let long = FieldError::new("f", "é".repeat(2000));
        let (event, _) = event_of(&key, &long, false);
        assert!(event.note.unwrap().len() <= NOTE_LIMIT);
        // A Namespace is cluster-scoped.
        let ns = ObjectKey {
            kind: Kind::Namespace,
            id: NamespacedName {
                namespace: String::new(),
                name: "shop".into(),
            },
        };
        assert_eq!(event_of(&ns, &error, false).1.namespace, None);
    }
}
