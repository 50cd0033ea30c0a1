//! Service names inside demo pods: each pod's own hosts file.
//!
//! `ip netns exec NAME` bind-mounts every file of `/etc/netns/NAME/` over `/etc/`, so a
//! hosts file there is what the resolver of any program started that way (curl,
//! redis-cli) reads first. The demo writes one per pod from the Services of the config
//! directory and rewrites it when they change. This is the demo's choice, not the
//! mesh's: on Kubernetes the cluster DNS answers these names.
use std::{net::IpAddr, path::Path};

use serde_yaml_ng::Value;

/// A Service as the hosts file names it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServiceName {
    pub name: String,
    pub namespace: String,
    pub ip: IpAddr,
}

/// The Services (with a ClusterIP) of every YAML file in `dir`. A file that does not
/// parse is skipped: the agents report it, and the names it had stay out until fixed.
pub fn services_in(dir: &Path) -> Vec<ServiceName> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for path in entries.filter_map(Result::ok).map(|e| e.path()) {
        let yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'));
        if !yaml || hidden {
            continue;
        }
        if let Ok(text) = std::fs::read_to_string(&path) {
            out.extend(services_of(&text));
        }
    }
    out.sort();
    out
}

/// The Services of one YAML stream; an empty list when any document is not YAML.
pub fn services_of(text: &str) -> Vec<ServiceName> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let Ok(v) = <Value as serde::Deserialize>::deserialize(doc) else {
            return Vec::new();
        };
        if v["kind"].as_str() != Some("Service") {
            continue;
        }
        let (Some(name), Some(ip)) = (
            v["metadata"]["name"].as_str(),
            v["spec"]["clusterIP"]
                .as_str()
                .and_then(|ip| ip.parse::<IpAddr>().ok()),
        ) else {
            continue;
        };
        out.push(ServiceName {
            name: name.to_owned(),
            namespace: v["metadata"]["namespace"]
                .as_str()
                .unwrap_or("default")
                .to_owned(),
            ip,
        });
    }
    out
}

/// The hosts file of a pod in `namespace`: every Service as `<svc>.<ns>`,
/// `<svc>.<ns>.svc` and `<svc>.<ns>.svc.cluster.local`, and as `<svc>` alone when it is
/// in the pod's own namespace (as the search path of a Kubernetes pod resolves it).
pub fn hosts_file(services: &[ServiceName], namespace: &str) -> String {
    let mut out = String::from(
        "# Written by `cargo xtask demo` from the Services of its config directory.\n\
         127.0.0.1 localhost\n::1 localhost\n",
    );
    for s in services {
        let (n, ns) = (&s.name, &s.namespace);
        let short = if ns == namespace {
            format!(" {n}")
        } else {
            String::new()
        };
        out += &format!(
            "{}{short} {n}.{ns} {n}.{ns}.svc {n}.{ns}.svc.cluster.local\n",
            s.ip
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_get_every_kubernetes_form_of_their_name() {
        let yaml = "kind: Pod\nmetadata: {name: x}\n---\n\
                    kind: Service\nmetadata: {name: web, namespace: default}\nspec: {clusterIP: 10.96.0.10}\n---\n\
                    kind: Service\nmetadata: {name: db, namespace: data}\nspec: {clusterIP: \"fd00::10\"}\n---\n\
                    kind: Service\nmetadata: {name: headless}\nspec: {clusterIP: None}\n";
        let services = services_of(yaml);
        assert_eq!(services.len(), 2, "{services:?}");
        let hosts = hosts_file(&services, "default");
        assert!(hosts.contains(
            "10.96.0.10 web web.default web.default.svc web.default.svc.cluster.local\n"
        ));
        // Another namespace's Service has no short name.
        assert!(hosts.contains("fd00::10 db.data db.data.svc db.data.svc.cluster.local\n"));
        assert!(!hosts.contains("headless"));
        assert!(hosts.contains("127.0.0.1 localhost\n"));
    }

    #[test]
    fn a_broken_file_names_nothing() {
        assert!(services_of("kind: Service\nmetadata: {name: [").is_empty());
    }
}
