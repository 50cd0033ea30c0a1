//! One object of the config, translated: what every source produces and the store
//! keeps. [`translate`] is the one translation from a Kubernetes object's fields to the
//! agent's model; the directory source feeds it parsed YAML, the API source JSON.
use std::{fmt, sync::Arc};

use serde::Deserializer;

use super::{
    error::FieldError,
    gateway, istio,
    kind::Kind,
    model::{
        AuthorizationPolicy, Config, EndpointSlice, Namespace, NamespacedName, PeerAuthentication,
        Pod, Service,
    },
    route::{Route, RouteKind},
    translate as core,
};

#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Namespace(Arc<Namespace>),
    Service(Arc<Service>),
    EndpointSlice(Arc<EndpointSlice>),
    Pod(Arc<Pod>),
    PeerAuthentication(Arc<PeerAuthentication>),
    AuthorizationPolicy(Arc<AuthorizationPolicy>),
    /// An HTTPRoute or a GRPCRoute (the route says which).
    Route(Arc<Route>),
}

/// What names an object within a source: its kind and namespace/name.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub kind: Kind,
    pub id: NamespacedName,
}

impl fmt::Display for ObjectKey {
    /// `Service default/web` (`Namespace shop`), as errors name objects.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.id.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.id.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.id.namespace, self.id.name)
        }
    }
}

impl Object {
    pub fn id(&self) -> NamespacedName {
        match self {
            Object::Namespace(n) => NamespacedName {
                namespace: String::new(),
                name: n.name.clone(),
            },
            Object::Service(o) => o.id.clone(),
            Object::EndpointSlice(o) => o.id.clone(),
            Object::Pod(o) => o.id.clone(),
            Object::PeerAuthentication(o) => o.id.clone(),
            Object::AuthorizationPolicy(o) => o.id.clone(),
            Object::Route(o) => o.id.clone(),
        }
    }

    pub fn kind(&self) -> Kind {
        match self {
            Object::Namespace(_) => Kind::Namespace,
            Object::Service(_) => Kind::Service,
            Object::EndpointSlice(_) => Kind::EndpointSlice,
            Object::Pod(_) => Kind::Pod,
            Object::PeerAuthentication(_) => Kind::PeerAuthentication,
            Object::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
            Object::Route(r) => match r.kind {
                RouteKind::Http => Kind::HttpRoute,
                RouteKind::Grpc => Kind::GrpcRoute,
            },
        }
    }

    pub fn key(&self) -> ObjectKey {
        ObjectKey {
            kind: self.kind(),
            id: self.id(),
        }
    }
}

/// Translates one object of a known kind, checking every field the data path relies
/// on. The error names the offending field (`spec.ports[0].port`).
pub fn translate<'de, D: Deserializer<'de>>(kind: Kind, object: D) -> Result<Object, FieldError> {
    Ok(match kind {
        Kind::Namespace => Object::Namespace(Arc::new(core::namespace(&typed(object)?)?)),
        Kind::Service => Object::Service(Arc::new(core::service(&typed(object)?)?)),
        Kind::EndpointSlice => {
            Object::EndpointSlice(Arc::new(core::endpoint_slice(&typed(object)?)?))
        }
        Kind::Pod => Object::Pod(Arc::new(core::pod(&typed(object)?)?)),
        Kind::PeerAuthentication => {
            Object::PeerAuthentication(Arc::new(istio::peer_authentication(&typed(object)?)?))
        }
        Kind::AuthorizationPolicy => {
            Object::AuthorizationPolicy(Arc::new(istio::authorization_policy(&typed(object)?)?))
        }
        Kind::HttpRoute => Object::Route(Arc::new(route(object, RouteKind::Http)?)),
        Kind::GrpcRoute => Object::Route(Arc::new(route(object, RouteKind::Grpc)?)),
    })
}

/// A route is read whole only when one of its parents is a Service; otherwise it is
/// another controller's, and only its name is kept.
fn route<'de, D: Deserializer<'de>>(object: D, kind: RouteKind) -> Result<Route, FieldError> {
    let doc: serde_json::Value = typed(object)?;
    if gateway::is_foreign(&doc) {
        gateway::foreign_route(&typed(doc)?, kind)
    } else {
        gateway::route(&typed(doc)?, kind)
    }
}

/// Deserializes into the kind's Kubernetes type, reporting the path of the offending
/// field.
fn typed<'de, T: serde::Deserialize<'de>, D: Deserializer<'de>>(
    object: D,
) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(object).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." {
            "(object)".to_owned()
        } else {
            field
        };
        FieldError::new(field, e.into_inner().to_string())
    })
}

impl Config {
    /// Adds one object to the list of its kind.
    pub fn push(&mut self, object: Object) {
        match object {
            Object::Namespace(n) => self.namespaces.push(n),
            Object::Service(s) => self.services.push(s),
            Object::EndpointSlice(s) => self.endpoint_slices.push(s),
            Object::Pod(p) => self.pods.push(p),
            Object::PeerAuthentication(p) => self.peer_authentications.push(p),
            Object::AuthorizationPolicy(p) => self.authorization_policies.push(p),
            Object::Route(r) => self.routes.push(r),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SERVICE_YAML: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}]
";

    #[test]
    fn yaml_and_json_of_one_object_translate_alike() {
        let yaml: serde_yaml_ng::Value = serde_yaml_ng::from_str(SERVICE_YAML).unwrap();
        let json: serde_json::Value = serde_yaml_ng::from_str(SERVICE_YAML).unwrap();
        let a = translate(Kind::Service, yaml).unwrap();
        let b = translate(Kind::Service, json).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.key().to_string(), "Service shop/web");
    }

    #[test]
    fn a_route_keeps_its_kind_and_a_bad_field_is_named() {
        let route = serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "GRPCRoute",
            "metadata": {"name": "r", "namespace": "shop"},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "web"}],
                "rules": [{"backendRefs": [{"name": "web", "port": 80}]}]
            }
        });
        let o = translate(Kind::GrpcRoute, route).unwrap();
        assert_eq!(o.kind(), Kind::GrpcRoute);
        let bad = serde_json::json!({
            "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
            "spec": {"ports": [{"port": 70000}]}
        });
        let e = translate(Kind::Service, bad).unwrap_err();
        assert!(e.field.starts_with("spec.ports"), "{e}");
    }
}
