//! What an HTTPRoute's or GRPCRoute's `status.parents` should say about each of its
//! Service parents, as Gateway API defines it: one entry per parentRef with this
//! controller's name and two conditions, `Accepted` and `ResolvedRefs`, with the
//! reason from Gateway API's list and the route generation they describe.
//!
//! Pure: the writer (`status_writer`) decides nothing. Entries of other controllers
//! (a gateway's, for a route that is also attached to a Gateway) are kept as they
//! are, and a status that already says the same is not written again.
use k8s_openapi::jiff::Timestamp;
use kube::api::DynamicObject;
use serde_json::{Value, json};

use crate::config::{
    Config, NamespacedName, Protocol, Route, RouteProblem, error::FieldError, gateway,
};

/// `status.parents[].controllerName` of this mesh's entries.
pub const CONTROLLER_NAME: &str = "mesh.dev/agent";
/// Gateway API caps `status.parents` at 32 entries.
const MAX_PARENTS: usize = 32;
/// Condition messages are kept short (the API allows 32 KiB).
const MESSAGE_LIMIT: usize = 1024;

/// The parts of a watched route the status is made from, and what it says now.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RouteMeta {
    pub generation: i64,
    pub resource_version: String,
    /// `spec.parentRefs` as written: a status entry repeats its parentRef.
    pub parent_refs: Vec<Value>,
    /// `status.parents` as the server holds it, every controller's.
    pub status_parents: Vec<Value>,
}

impl RouteMeta {
    pub fn of(object: &DynamicObject) -> RouteMeta {
        let list = |v: &Value| v.as_array().cloned().unwrap_or_default();
        RouteMeta {
            generation: object.metadata.generation.unwrap_or(0),
            resource_version: object.metadata.resource_version.clone().unwrap_or_default(),
            parent_refs: list(&object.data["spec"]["parentRefs"]),
            status_parents: list(&object.data["status"]["parents"]),
        }
    }
}

/// What the agent made of the route's current generation.
#[derive(Debug, Clone, Copy)]
pub enum Verdict<'a> {
    Accepted(&'a Route),
    Rejected {
        error: &'a FieldError,
        previous_serves: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Condition {
    kind: &'static str,
    status: &'static str,
    reason: &'static str,
    message: String,
}

impl Condition {
    fn new(
        kind: &'static str,
        status: &'static str,
        reason: &'static str,
        message: String,
    ) -> Self {
        let mut message = message;
        if message.len() > MESSAGE_LIMIT {
            let mut cut = MESSAGE_LIMIT;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
        }
        Condition {
            kind,
            status,
            reason,
            message,
        }
    }
}

/// The whole `status.parents` to write for a route, or `None` when what the server
/// holds already says it. `problems` are the attachment problems of the current
/// config (every route's); `now` stamps conditions whose status changed.
pub fn update(
    id: &NamespacedName,
    meta: &RouteMeta,
    verdict: Verdict<'_>,
    config: &Config,
    problems: &[RouteProblem],
    now: Timestamp,
) -> Option<Vec<Value>> {
    let current: Vec<&Value> = meta
        .status_parents
        .iter()
        .filter(|p| p["controllerName"] == CONTROLLER_NAME)
        .collect();
    let ours: Vec<Value> = meta
        .parent_refs
        .iter()
        .filter(|p| gateway::is_mesh_parent_doc(p))
        .map(|parent_ref| {
            let service = NamespacedName {
                namespace: parent_ref["namespace"]
                    .as_str()
                    .unwrap_or(&id.namespace)
                    .to_owned(),
                name: parent_ref["name"].as_str().unwrap_or_default().to_owned(),
            };
            let conditions = conditions(id, &service, verdict, config, problems);
            let before = current
                .iter()
                .find(|c| &c["parentRef"] == parent_ref)
                .map(|c| &c["conditions"]);
            json!({
                "parentRef": parent_ref,
                "controllerName": CONTROLLER_NAME,
                "conditions": conditions
                    .iter()
                    .map(|c| condition_json(c, meta.generation, before, now))
                    .collect::<Vec<_>>(),
            })
        })
        .collect();
    if ours.len() == current.len() && ours.iter().zip(&current).all(|(a, b)| a == *b) {
        return None;
    }
    let mut parents: Vec<Value> = meta
        .status_parents
        .iter()
        .filter(|p| p["controllerName"] != CONTROLLER_NAME)
        .cloned()
        .collect();
    parents.extend(ours);
    parents.truncate(MAX_PARENTS);
    Some(parents)
}

/// A condition as the API holds it; its transition time is the one it had when its
/// status was the same before.
fn condition_json(c: &Condition, generation: i64, before: Option<&Value>, now: Timestamp) -> Value {
    let since = before
        .and_then(Value::as_array)
        .and_then(|cs| cs.iter().find(|b| b["type"] == c.kind))
        .filter(|b| b["status"] == c.status)
        .and_then(|b| b["lastTransitionTime"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| now.strftime("%Y-%m-%dT%H:%M:%SZ").to_string());
    json!({
        "type": c.kind,
        "status": c.status,
        "reason": c.reason,
        "message": c.message,
        "observedGeneration": generation,
        "lastTransitionTime": since,
    })
}

/// `Accepted` and `ResolvedRefs` for one parent Service.
fn conditions(
    id: &NamespacedName,
    service: &NamespacedName,
    verdict: Verdict<'_>,
    config: &Config,
    problems: &[RouteProblem],
) -> [Condition; 2] {
    let route = match verdict {
        Verdict::Rejected {
            error,
            previous_serves,
        } => {
            let serves = if previous_serves {
                "; its last accepted generation keeps serving"
            } else {
                ""
            };
            let accepted = Condition::new(
                "Accepted",
                "False",
                "UnsupportedValue",
                format!("field {}: {}{serves}", error.field, error.message),
            );
            let refs = if error.field.contains("backendRefs")
                && (error.field.ends_with(".kind") || error.field.ends_with(".group"))
            {
                Condition::new(
                    "ResolvedRefs",
                    "False",
                    "InvalidKind",
                    error.message.clone(),
                )
            } else {
                Condition::new(
                    "ResolvedRefs",
                    "Unknown",
                    "Pending",
                    "not resolved: the route was not accepted".to_owned(),
                )
            };
            return [accepted, refs];
        }
        Verdict::Accepted(route) => route,
    };
    let accepted = match problems
        .iter()
        .find(|p| &p.route == id && p.kind == route.kind && &p.service == service)
    {
        Some(p) => Condition::new("Accepted", "False", p.reason, p.message.clone()),
        None => Condition::new(
            "Accepted",
            "True",
            "Accepted",
            format!("attached to Service {service}"),
        ),
    };
    [accepted, resolved_refs(route, config)]
}

/// Every backendRef and mirror names a Service port that exists.
fn resolved_refs(route: &Route, config: &Config) -> Condition {
    let refs = route.rules.iter().flat_map(|r| {
        r.backends
            .iter()
            .map(|b| (&b.service, b.port))
            .chain(r.filters.iter().filter_map(|f| match f {
                crate::config::Filter::Mirror(m) => Some((&m.service, m.port)),
                _ => None,
            }))
    });
    for (service, port) in refs {
        let found = config.services.iter().find(|s| &s.id == service);
        let missing = match found {
            None => Some(format!("backendRef Service {service} does not exist")),
            Some(s)
                if !s
                    .ports
                    .iter()
                    .any(|p| p.port == port && p.protocol == Protocol::Tcp) =>
            {
                Some(format!(
                    "backendRef Service {service} has no TCP port {port}"
                ))
            }
            Some(_) => None,
        };
        if let Some(message) = missing {
            return Condition::new("ResolvedRefs", "False", "BackendNotFound", message);
        }
    }
    Condition::new(
        "ResolvedRefs",
        "True",
        "ResolvedRefs",
        "every backendRef resolved".to_owned(),
    )
}

#[cfg(test)]
mod tests;
