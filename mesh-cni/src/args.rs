//! What the runtime gives the plugin: `CNI_ARGS` and the network config on stdin.
use std::net::IpAddr;

use serde::Deserialize;

/// The pod's identity from `CNI_ARGS` (`K8S_POD_NAMESPACE=..;K8S_POD_NAME=..;...`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct PodArgs {
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub uid: Option<String>,
}

pub fn pod_args(cni_args: &str) -> PodArgs {
    let mut out = PodArgs::default();
    for pair in cni_args.split(';') {
        let Some((k, v)) = pair.split_once('=') else {
            continue;
        };
        let v = (!v.is_empty()).then(|| v.to_owned());
        match k {
            "K8S_POD_NAMESPACE" => out.namespace = v,
            "K8S_POD_NAME" => out.name = v,
            "K8S_POD_UID" => out.uid = v,
            _ => {}
        }
    }
    out
}

/// The plugin's own part of the network config.
#[derive(Debug, Deserialize)]
pub struct NetConf {
    #[serde(rename = "cniVersion")]
    pub cni_version: String,
    /// The agent's socket.
    #[serde(default = "default_socket")]
    pub agent_socket: String,
    /// How long ADD waits for the agent before failing the sandbox (the kubelet
    /// retries it).
    #[serde(default = "default_timeout")]
    pub timeout_seconds: u64,
    /// The result of the plugins before this one, passed on unchanged.
    #[serde(rename = "prevResult")]
    pub prev_result: Option<serde_json::Value>,
}

pub const DEFAULT_SOCKET: &str = "/var/run/mesh/cni.sock";

fn default_socket() -> String {
    DEFAULT_SOCKET.to_owned()
}

fn default_timeout() -> u64 {
    30
}

/// The pod's IPs in a CNI result (`ips[].address`, CIDR notation).
pub fn result_ips(result: &serde_json::Value) -> Vec<IpAddr> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str())
        .filter_map(|cidr| cidr.split('/').next()?.parse().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_identity_comes_from_cni_args() {
        let a = pod_args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=1f2e",
        );
        assert_eq!(a.namespace.as_deref(), Some("shop"));
        assert_eq!(a.name.as_deref(), Some("web-0"));
        assert_eq!(a.uid.as_deref(), Some("1f2e"));
        assert_eq!(pod_args(""), PodArgs::default());
        assert_eq!(pod_args("K8S_POD_NAME=;junk").name, None);
    }

    #[test]
    fn ips_come_from_the_previous_result() {
        let r = serde_json::json!({
            "cniVersion": "1.0.0",
            "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1"},
                    {"address": "fd00::5/64"}, {"address": "bogus"}]
        });
        assert_eq!(
            result_ips(&r),
            [
                "10.244.1.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert!(result_ips(&serde_json::json!({})).is_empty());
    }
}
