//! Keeps the set of enrolled pods equal to the local pods in the config.
//!
//! Enrolling a pod: enter its netns, bind the outbound listeners there, start serving,
//! and only then put its netns cookie in the kernel map, so that no connection is ever
//! redirected to a listener that is not there yet. Removing a pod goes the other way.
use std::{collections::HashMap, net::SocketAddr, sync::Arc};

use mesh_common::OUTBOUND_PORT;
use socket2::{Domain, Socket, Type};
use tokio::task::JoinHandle;
use tracing::{Instrument, info, info_span, warn};

use super::netns::{Netns, netns_cookie};
use crate::{
    config::{Config, NamespacedName, Pod},
    proxy::{self, PodContext, ProxyContext},
};

/// Backlog of the outbound listeners: bursts of connects from one pod queue here.
const BACKLOG: i32 = 4096;

struct RunningPod {
    spec: Pod,
    ctx: Arc<PodContext>,
    tasks: Vec<JoinHandle<()>>,
}

pub struct PodManager {
    node: String,
    proxy: Arc<ProxyContext>,
    running: HashMap<NamespacedName, RunningPod>,
    /// Last error per pod that could not be enrolled, so a retry logs only news.
    failing: HashMap<NamespacedName, String>,
}

impl PodManager {
    pub fn new(node: String, proxy: Arc<ProxyContext>) -> Self {
        PodManager {
            node,
            proxy,
            running: HashMap::new(),
            failing: HashMap::new(),
        }
    }

    /// Whether every local pod of `config` is enrolled.
    pub fn all_enrolled(&self, config: &Config) -> bool {
        local_pods(&self.node, config).all(|p| self.running.contains_key(&p.id))
    }

    pub async fn reconcile(&mut self, config: &Config) {
        let desired: HashMap<&NamespacedName, &Pod> =
            local_pods(&self.node, config).map(|p| (&p.id, p)).collect();
        let stale: Vec<NamespacedName> = self
            .running
            .iter()
            .filter(|(id, running)| desired.get(id).is_none_or(|p| **p != running.spec))
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some(pod) = self.running.remove(&id) {
                self.stop(pod);
            }
        }
        self.failing.retain(|id, _| desired.contains_key(id));
        for (id, pod) in desired {
            if self.running.contains_key(id) {
                continue;
            }
            match self.start(pod).await {
                Ok(running) => {
                    self.failing.remove(id);
                    self.running.insert(id.clone(), running);
                }
                Err(e) => {
                    let msg = e.to_string();
                    if self.failing.get(id) != Some(&msg) {
                        warn!(pod = %id, error = %msg, "cannot enroll pod; will retry");
                        self.failing.insert(id.clone(), msg);
                    }
                }
            }
        }
    }

    async fn start(&self, pod: &Pod) -> anyhow::Result<RunningPod> {
        use anyhow::Context as _;
        let path = pod.netns.clone().context("pod has no network namespace")?;
        let netns =
            Netns::enter(&path).with_context(|| format!("entering netns {}", path.display()))?;
        let (listeners, cookie) = netns
            .run(bind_outbound)
            .await?
            .with_context(|| format!("binding the outbound listener in {}", path.display()))?;
        let ctx = Arc::new(PodContext {
            id: pod.id.clone(),
            netns,
            netns_cookie: cookie,
        });
        let mut tasks = Vec::new();
        for std_listener in listeners {
            let addr = std_listener.local_addr()?;
            let listener = tokio::net::TcpListener::from_std(std_listener)?;
            let span = info_span!("outbound", pod = %pod.id, listener = %addr);
            tasks.push(tokio::spawn(
                proxy::serve_outbound(listener, ctx.clone(), self.proxy.clone()).instrument(span),
            ));
        }
        if let Err(e) = self.proxy.maps.enroll(cookie) {
            tasks.iter().for_each(JoinHandle::abort);
            return Err(e.into());
        }
        info!(pod = %pod.id, netns = %path.display(), netns_cookie = cookie, "pod enrolled");
        Ok(RunningPod {
            spec: pod.clone(),
            ctx,
            tasks,
        })
    }

    fn stop(&self, pod: RunningPod) {
        // Unenroll first: from now on new connects go where the application sent them.
        self.proxy.maps.unenroll(pod.ctx.netns_cookie);
        // Closing the listeners; connections already accepted run on their own tasks.
        pod.tasks.iter().for_each(JoinHandle::abort);
        info!(pod = %pod.spec.id, "pod unenrolled");
    }

    pub fn shutdown(&mut self) {
        let running = std::mem::take(&mut self.running);
        for (_, pod) in running {
            self.stop(pod);
        }
    }
}

/// The pods of `config` this node must enroll: on this node, not opted out, and bound
/// to a network namespace.
fn local_pods<'a>(node: &'a str, config: &'a Config) -> impl Iterator<Item = &'a Pod> + 'a {
    config
        .pods
        .iter()
        .filter(move |p| p.enroll && p.node_name.as_deref() == Some(node) && p.netns.is_some())
}

/// Runs on the pod's netns thread: the IPv4 listener (required) and the IPv6 one (when
/// the pod has IPv6), plus the netns cookie that identifies this pod to the kernel.
fn bind_outbound() -> std::io::Result<(Vec<std::net::TcpListener>, u64)> {
    let v4 = listen(SocketAddr::from(([127, 0, 0, 1], OUTBOUND_PORT)))?;
    let cookie = netns_cookie(&v4)?;
    let mut listeners = vec![v4];
    match listen(SocketAddr::from((
        std::net::Ipv6Addr::LOCALHOST,
        OUTBOUND_PORT,
    ))) {
        Ok(v6) => listeners.push(v6),
        Err(e) => tracing::debug!(error = %e, "no IPv6 outbound listener (IPv6 off in this pod?)"),
    }
    Ok((listeners, cookie))
}

fn listen(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let sock = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    sock.set_reuse_address(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(BACKLOG)?;
    Ok(sock.into())
}
