//! Kubernetes objects (k8s-openapi types) -> the agent's model, checking every field the
//! data path relies on. The same functions will serve objects from the Kubernetes API.
use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use k8s_openapi::{
    api::{core::v1 as core, discovery::v1 as discovery},
    apimachinery::pkg::{apis::meta::v1::ObjectMeta, util::intstr::IntOrString},
};

use super::{
    enrollment,
    error::FieldError,
    model::{
        Endpoint, EndpointSlice, FAIL_OPEN_ANNOTATION, NETNS_ANNOTATION, Namespace, NamespacedName,
        Pod, Protocol, SERVICE_NAME_LABEL, STATUS_ANNOTATION, Service, ServicePort, SlicePort,
        TargetPort,
    },
};

type Result<T> = std::result::Result<T, FieldError>;

pub fn object_id(meta: &ObjectMeta) -> Result<NamespacedName> {
    let name = match meta.name.as_deref() {
        Some(n) if !n.is_empty() => n.to_owned(),
        _ => return Err(FieldError::new("metadata.name", "is required")),
    };
    let namespace = meta
        .namespace
        .clone()
        .unwrap_or_else(|| "default".to_owned());
    Ok(NamespacedName { namespace, name })
}

fn port(value: i32, field: String) -> Result<u16> {
    match u16::try_from(value) {
        Ok(p) if p != 0 => Ok(p),
        _ => Err(FieldError::new(
            field,
            format!("{value} is not a port number (1-65535)"),
        )),
    }
}

fn protocol(value: Option<&str>, field: String) -> Result<Protocol> {
    match value.unwrap_or("TCP") {
        "TCP" => Ok(Protocol::Tcp),
        "UDP" => Ok(Protocol::Udp),
        "SCTP" => Ok(Protocol::Sctp),
        other => Err(FieldError::new(
            field,
            format!("unknown protocol {other:?} (TCP, UDP or SCTP)"),
        )),
    }
}

fn ip(value: &str, field: String) -> Result<IpAddr> {
    value
        .parse()
        .map_err(|_| FieldError::new(field, format!("{value:?} is not an IP address")))
}

pub fn service(svc: &core::Service) -> Result<Service> {
    let id = object_id(&svc.metadata)?;
    let spec = svc
        .spec
        .as_ref()
        .ok_or_else(|| FieldError::new("spec", "is required"))?;

    let mut cluster_ips = Vec::new();
    match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => {
            for (i, v) in ips.iter().enumerate() {
                if v != "None" {
                    cluster_ips.push(ip(v, format!("spec.clusterIPs[{i}]"))?);
                }
            }
        }
        (_, Some(v)) if v != "None" && !v.is_empty() => {
            cluster_ips.push(ip(v, "spec.clusterIP".to_owned())?)
        }
        _ => {}
    }

    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        let svc_port = port(p.port, format!("spec.ports[{i}].port"))?;
        let target_port = match &p.target_port {
            None => TargetPort::Number(svc_port),
            Some(IntOrString::Int(n)) => {
                TargetPort::Number(port(*n, format!("spec.ports[{i}].targetPort"))?)
            }
            Some(IntOrString::String(s)) if s.is_empty() => {
                return Err(FieldError::new(
                    format!("spec.ports[{i}].targetPort"),
                    "is empty",
                ));
            }
            Some(IntOrString::String(s)) => TargetPort::Name(s.clone()),
        };
        ports.push(ServicePort {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port: svc_port,
            target_port,
            protocol: protocol(p.protocol.as_deref(), format!("spec.ports[{i}].protocol"))?,
            app_protocol: p.app_protocol.clone().filter(|a| !a.is_empty()),
        });
    }
    Ok(Service {
        id,
        cluster_ips,
        ports,
        fail_open: fail_open(&svc.metadata)?,
    })
}

/// `metadata.annotations["mesh.dev/fail-open"]`: `"true"`, `"false"` or absent.
fn fail_open(meta: &ObjectMeta) -> Result<Option<bool>> {
    match annotation(meta, FAIL_OPEN_ANNOTATION) {
        None => Ok(None),
        Some("true") => Ok(Some(true)),
        Some("false") => Ok(Some(false)),
        Some(other) => Err(FieldError::new(
            format!("metadata.annotations[{FAIL_OPEN_ANNOTATION}]"),
            format!("{other:?}: expected \"true\" or \"false\""),
        )),
    }
}

pub fn endpoint_slice(slice: &discovery::EndpointSlice) -> Result<EndpointSlice> {
    let id = object_id(&slice.metadata)?;
    let service_name = slice
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(SERVICE_NAME_LABEL))
        .cloned()
        .ok_or_else(|| {
            FieldError::new(
                format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
                "is required: it names the Service this slice belongs to",
            )
        })?;
    match slice.address_type.as_str() {
        "IPv4" | "IPv6" => {}
        other => {
            return Err(FieldError::new(
                "addressType",
                format!("{other:?} is not supported (IPv4 or IPv6)"),
            ));
        }
    }

    let mut ports = Vec::with_capacity(slice.ports.as_ref().map_or(0, Vec::len));
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        let Some(n) = p.port else {
            return Err(FieldError::new(format!("ports[{i}].port"), "is required"));
        };
        ports.push(SlicePort {
            name: p.name.clone().filter(|n| !n.is_empty()),
            port: port(n, format!("ports[{i}].port"))?,
            protocol: protocol(p.protocol.as_deref(), format!("ports[{i}].protocol"))?,
        });
    }

    let mut endpoints = Vec::with_capacity(slice.endpoints.len());
    for (i, e) in slice.endpoints.iter().enumerate() {
        let mut first = None;
        for (j, a) in e.addresses.iter().enumerate() {
            let a = ip(a, format!("endpoints[{i}].addresses[{j}]"))?;
            first.get_or_insert(a);
        }
        let Some(address) = first else {
            return Err(FieldError::new(
                format!("endpoints[{i}].addresses"),
                "is empty",
            ));
        };
        let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
        endpoints.push(Endpoint {
            address,
            ready,
            node_name: e.node_name.clone(),
        });
    }
    Ok(EndpointSlice {
        id,
        service_name,
        ports,
        endpoints,
    })
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations
        .as_ref()
        .and_then(|a: &BTreeMap<String, String>| a.get(key))
        .map(String::as_str)
}

/// A namespace: its name and what its labels say about the mesh.
pub fn namespace(ns: &core::Namespace) -> Result<Namespace> {
    let name = match ns.metadata.name.as_deref() {
        Some(n) if !n.is_empty() => n.to_owned(),
        _ => return Err(FieldError::new("metadata.name", "is required")),
    };
    let labels = ns.metadata.labels.clone().unwrap_or_default();
    Ok(Namespace {
        name,
        dataplane: enrollment::mode_of(&labels)?,
        fail_open: fail_open(&ns.metadata)?,
    })
}

pub fn pod(pod: &core::Pod) -> Result<Pod> {
    let id = object_id(&pod.metadata)?;
    let spec = pod.spec.as_ref();
    let status = pod.status.as_ref();
    let mut ips = Vec::new();
    if let Some(v) = status.and_then(|s| s.pod_ip.as_deref()) {
        ips.push(ip(v, "status.podIP".to_owned())?);
    }
    for (i, entry) in status
        .and_then(|s| s.pod_ips.as_deref())
        .unwrap_or_default()
        .iter()
        .enumerate()
    {
        let addr = ip(&entry.ip, format!("status.podIPs[{i}].ip"))?;
        if !ips.contains(&addr) {
            ips.push(addr);
        }
    }
    // A pod that has run to completion keeps its status but no longer owns its IP:
    // the address may already belong to a new pod.
    let finished = matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    );
    if finished {
        ips.clear();
    }
    let ip = ips.first().copied();
    let netns = match annotation(&pod.metadata, NETNS_ANNOTATION) {
        Some(p) if p.starts_with('/') => Some(PathBuf::from(p)),
        Some(p) => {
            return Err(FieldError::new(
                format!("metadata.annotations[{NETNS_ANNOTATION}]"),
                format!("{p:?} is not an absolute path to a network namespace"),
            ));
        }
        None => None,
    };
    let no_map = BTreeMap::new();
    let dataplane = enrollment::pod_mode(
        pod.metadata.labels.as_ref().unwrap_or(&no_map),
        pod.metadata.annotations.as_ref().unwrap_or(&no_map),
    )?;
    let pod_name = id.name.clone();
    Ok(Pod {
        id,
        uid: pod.metadata.uid.clone().filter(|u| !u.is_empty()),
        node_name: spec.and_then(|s| s.node_name.clone()),
        ip,
        ips,
        finished,
        service_account: spec
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".to_owned()),
        netns,
        dataplane,
        // Until `Config::resolve_enrollment` weighs the namespace: the pod's word, or
        // the directory's default.
        enroll: enrollment::enrolled(
            dataplane,
            enrollment::DataplaneMode::Unset,
            enrollment::Default::Enrolled,
        ),
        labels: pod.metadata.labels.clone().unwrap_or_default().into(),
        workload: workload_name(&pod.metadata, &pod_name),
        probe_ports: super::probes::probe_ports(spec),
        mesh_status: annotation(&pod.metadata, STATUS_ANNOTATION).map(str::to_owned),
    })
}

/// The name metrics and logs group a pod under, stable across its restarts and
/// rollouts (pod names are not): the canonical-name label if set, else the owning
/// Deployment (from its ReplicaSet, minus the template hash) or other controller,
/// else the pod's own name.
fn workload_name(meta: &ObjectMeta, pod_name: &str) -> String {
    let label = |k: &str| meta.labels.as_ref().and_then(|l| l.get(k)).cloned();
    if let Some(name) = label("service.istio.io/canonical-name") {
        return name;
    }
    let owner = meta
        .owner_references
        .iter()
        .flatten()
        .find(|o| o.controller == Some(true))
        .or_else(|| meta.owner_references.iter().flatten().next());
    match owner {
        Some(o) if o.kind == "ReplicaSet" => match label("pod-template-hash") {
            Some(hash) => o
                .name
                .strip_suffix(&format!("-{hash}"))
                .unwrap_or(&o.name)
                .to_owned(),
            None => o.name.clone(),
        },
        Some(o) => o.name.clone(),
        None => pod_name.to_owned(),
    }
}
