//! The kinds of object the agent reads, whatever the source (a directory of YAML or,
//! later, the Kubernetes API). The list is closed: a kind the agent does not know is
//! refused with its name, never parsed as a kind it does.
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// Cluster-scoped: its key's namespace is empty.
    Namespace,
    Service,
    EndpointSlice,
    Pod,
    PeerAuthentication,
    AuthorizationPolicy,
    HttpRoute,
    GrpcRoute,
}

impl Kind {
    pub const ALL: [Kind; 8] = [
        Kind::Namespace,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
        Kind::HttpRoute,
        Kind::GrpcRoute,
    ];

    /// The `kind` field, as Kubernetes spells it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Service => "Service",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Pod => "Pod",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::HttpRoute => "HTTPRoute",
            Kind::GrpcRoute => "GRPCRoute",
        }
    }

    /// The `apiVersion`s accepted for the kind; the first is the one the API source
    /// watches.
    pub fn api_versions(self) -> &'static [&'static str] {
        match self {
            Kind::Namespace | Kind::Service | Kind::Pod => &["v1"],
            Kind::EndpointSlice => &["discovery.k8s.io/v1"],
            Kind::PeerAuthentication | Kind::AuthorizationPolicy => &["security.istio.io/v1"],
            // v1beta1 HTTPRoutes are still served by clusters on Gateway API 1.0 and
            // 1.1, with the same schema for everything the mesh reads.
            Kind::HttpRoute => &[
                "gateway.networking.k8s.io/v1",
                "gateway.networking.k8s.io/v1beta1",
            ],
            Kind::GrpcRoute => &["gateway.networking.k8s.io/v1"],
        }
    }

    /// The kind an object's `apiVersion` and `kind` name, if the agent reads it.
    pub fn of(api_version: &str, kind: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == kind && k.api_versions().contains(&api_version))
    }

    /// Every accepted `apiVersion/kind`, for the error that refuses another.
    pub fn accepted() -> String {
        let all: Vec<String> = Kind::ALL
            .iter()
            .flat_map(|k| {
                k.api_versions()
                    .iter()
                    .map(move |v| format!("{v}/{}", k.name()))
            })
            .collect();
        all.join(", ")
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_found_by_each_of_its_api_versions_and_nothing_else_is() {
        for k in Kind::ALL {
            for v in k.api_versions() {
                assert_eq!(Kind::of(v, k.name()), Some(k));
            }
        }
        assert_eq!(Kind::of("v1", "ConfigMap"), None);
        // The right kind under the wrong group is not that kind.
        assert_eq!(
            Kind::of("networking.istio.io/v1", "AuthorizationPolicy"),
            None
        );
        assert_eq!(
            Kind::of("gateway.networking.k8s.io/v1beta1", "GRPCRoute"),
            None
        );
        assert_eq!(Kind::of("v1", "service"), None);
    }
}
