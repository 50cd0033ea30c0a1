//! Where each kind lives in the Kubernetes API, and how a watched object becomes the
//! input of the one translation (`object::translate`).
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::{api::DynamicObject, discovery::ApiResource};

use crate::config::{Kind, NamespacedName, ObjectKey};

/// The API resource the source watches for `kind`: the kind's first apiVersion.
pub fn api_resource(kind: Kind) -> ApiResource {
    let api_version = kind.api_versions()[0];
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let plural = match kind {
        Kind::Namespace => "namespaces",
        Kind::Service => "services",
        Kind::EndpointSlice => "endpointslices",
        Kind::Pod => "pods",
        Kind::PeerAuthentication => "peerauthentications",
        Kind::AuthorizationPolicy => "authorizationpolicies",
        Kind::HttpRoute => "httproutes",
        Kind::GrpcRoute => "grpcroutes",
    };
    ApiResource {
        group: group.to_owned(),
        version: version.to_owned(),
        api_version: api_version.to_owned(),
        kind: kind.name().to_owned(),
        plural: plural.to_owned(),
    }
}

/// The key of an object as the store knows it (`Object::key`): cluster-scoped kinds
/// have an empty namespace, namespaced ones default to `default` as the translation
/// does. `None` for an object with no name (the API never sends one).
pub fn key_of(kind: Kind, meta: &ObjectMeta) -> Option<ObjectKey> {
    let name = meta.name.clone().filter(|n| !n.is_empty())?;
    let namespace = match kind {
        Kind::Namespace => String::new(),
        _ => meta
            .namespace
            .clone()
            .unwrap_or_else(|| "default".to_owned()),
    };
    Some(ObjectKey {
        kind,
        id: NamespacedName { namespace, name },
    })
}

/// The object as one JSON document for `translate`. A list's items carry no
/// apiVersion and kind, so both are set from the resource watched; managedFields
/// (often the largest part of an object, and never read) are dropped first.
pub fn to_json(kind: Kind, object: DynamicObject) -> serde_json::Value {
    let DynamicObject {
        mut metadata, data, ..
    } = object;
    metadata.managed_fields = None;
    let mut doc = match data {
        serde_json::Value::Object(map) => map,
        _ => serde_json::Map::new(),
    };
    doc.insert(
        "apiVersion".to_owned(),
        kind.api_versions()[0].to_owned().into(),
    );
    doc.insert("kind".to_owned(), kind.name().to_owned().into());
    doc.insert(
        "metadata".to_owned(),
        serde_json::to_value(&metadata).unwrap_or_default(),
    );
    serde_json::Value::Object(doc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::translate;

    #[test]
    fn every_kind_has_its_resource_path() {
        let ar = api_resource(Kind::Pod);
        assert_eq!((ar.group.as_str(), ar.version.as_str()), ("", "v1"));
        assert_eq!(ar.plural, "pods");
        let ar = api_resource(Kind::HttpRoute);
        assert_eq!(ar.group, "gateway.networking.k8s.io");
        assert_eq!(ar.version, "v1");
        assert_eq!(ar.kind, "HTTPRoute");
        let ar = api_resource(Kind::AuthorizationPolicy);
        assert_eq!(ar.api_version, "security.istio.io/v1");
        assert_eq!(ar.plural, "authorizationpolicies");
        for k in Kind::ALL {
            let ar = api_resource(k);
            assert_eq!(ar.kind, k.name());
            assert!(ar.plural.ends_with('s'), "{}", ar.plural);
        }
    }

    #[test]
    fn a_list_item_without_type_fields_translates_and_keys_alike() {
        // As a list returns it: no apiVersion/kind, managedFields present.
        let item: DynamicObject = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop", "resourceVersion": "7",
                "managedFields": [{"manager": "kubectl", "operation": "Apply"}]},
            "spec": {"clusterIP": "10.96.0.10", "ports": [{"port": 80}]}
        }))
        .unwrap();
        let key = key_of(Kind::Service, &item.metadata).unwrap();
        let doc = to_json(Kind::Service, item);
        assert!(doc["metadata"].get("managedFields").is_none(), "{doc}");
        let object = translate(Kind::Service, doc).unwrap();
        assert_eq!(object.key(), key);
    }

    #[test]
    fn a_namespace_key_has_no_namespace() {
        let meta = ObjectMeta {
            name: Some("shop".into()),
            ..Default::default()
        };
        let key = key_of(Kind::Namespace, &meta).unwrap();
        assert_eq!(key.to_string(), "Namespace shop");
        let doc = to_json(
            Kind::Namespace,
            DynamicObject {
                types: None,
                metadata: meta,
                data: serde_json::json!({}),
            },
        );
        assert_eq!(translate(Kind::Namespace, doc).unwrap().key(), key);
        assert!(key_of(Kind::Pod, &ObjectMeta::default()).is_none());
    }
}
