//! Keeps the set of enrolled pods equal to the local pods in the config.
//!
//! Enrolling a pod: get its workload certificate, enter its netns, bind the agent's
//! listeners there (outbound :15001, tunnel :15008, plaintext :15006), start serving,
//! register the plaintext listener and the pod's mTLS mode with the kernel, attach the
//! inbound program to the netns, and only then put the netns cookie in the enrolled
//! map, so that no connection is ever redirected to a listener that is not there yet.
//! Removing a pod goes the other way.
use std::{
    collections::{HashMap, HashSet},
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use mesh_common::{INBOUND_PLAINTEXT_PORT, INBOUND_TUNNEL_PORT, OUTBOUND_PORT};
use socket2::{Domain, Socket, Type};
use tokio::task::JoinHandle;
use tracing::{Instrument, info, info_span, warn};

use super::netns::{Netns, netns_cookie};
use crate::{
    authz::{PolicySet, Workload},
    bpf::{InboundHook, InboundMode, PodInboundLink},
    config::{Config, MtlsMode, NamespacedName, Pod},
    identity::{Identity, server_config},
    proxy::{self, PodContext, ProxyContext},
};

/// Backlog of the listeners: bursts of connects from one pod queue here.
const BACKLOG: i32 = 4096;
/// How long enrolling waits for the pod's first certificate before retrying later.
const CERT_WAIT: Duration = Duration::from_secs(5);

struct RunningPod {
    spec: Pod,
    ctx: Arc<PodContext>,
    tasks: Vec<JoinHandle<()>>,
    inbound: Option<Inbound>,
}

/// The pod's kernel-side inbound enforcement.
struct Inbound {
    ip: IpAddr,
    mode: InboundMode,
    /// The sk_lookup program on the pod's netns; pinned, so it must be detached
    /// explicitly when the pod leaves the mesh.
    link: PodInboundLink,
}

pub struct PodManager {
    node: String,
    trust_domain: String,
    proxy: Arc<ProxyContext>,
    hook: Arc<InboundHook>,
    running: HashMap<NamespacedName, RunningPod>,
    /// Last error per pod that could not be enrolled, so a retry logs only news.
    failing: HashMap<NamespacedName, String>,
}

/// The listeners of one pod, bound on its netns thread.
struct Listeners {
    outbound: Vec<std::net::TcpListener>,
    tunnel: Vec<std::net::TcpListener>,
    plaintext_v4: std::net::TcpListener,
    plaintext_v6: Option<std::net::TcpListener>,
    cookie: u64,
}

fn mode_of(m: MtlsMode) -> InboundMode {
    match m {
        MtlsMode::Strict => InboundMode::Strict,
        MtlsMode::Permissive => InboundMode::Permissive,
    }
}

impl PodManager {
    pub fn new(
        node: String,
        trust_domain: String,
        proxy: Arc<ProxyContext>,
        hook: Arc<InboundHook>,
    ) -> Self {
        PodManager {
            node,
            trust_domain,
            proxy,
            hook,
            running: HashMap::new(),
            failing: HashMap::new(),
        }
    }

    /// Whether every local pod of `config` is enrolled.
    pub fn all_enrolled(&self, config: &Config) -> bool {
        local_pods(&self.node, config).all(|p| self.running.contains_key(&p.id))
    }

    fn identity(&self, pod: &Pod) -> Identity {
        Identity::new(&self.trust_domain, &pod.id.namespace, &pod.service_account)
    }

    pub async fn reconcile(&mut self, config: &Config, policy: &PolicySet) {
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
        let identities: HashSet<Identity> = desired.values().map(|p| self.identity(p)).collect();
        for id in &identities {
            self.proxy.secrets.ensure(id);
        }
        self.proxy.secrets.retain(&identities);
        for (id, pod) in desired {
            if self.running.contains_key(id) {
                continue;
            }
            match self.start(pod, policy).await {
                Ok(running) => {
                    self.failing.remove(id);
                    self.running.insert(id.clone(), running);
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    if self.failing.get(id) != Some(&msg) {
                        warn!(pod = %id, error = %msg, "cannot enroll pod; will retry");
                        self.failing.insert(id.clone(), msg);
                    }
                }
            }
        }
        self.update_modes(policy);
        self.publish_local();
    }

    /// Applies the PeerAuthentication mode of each running pod to the kernel; running
    /// pods switch between STRICT and PERMISSIVE without a restart.
    fn update_modes(&mut self, policy: &PolicySet) {
        for pod in self.running.values_mut() {
            let Some(inbound) = pod.inbound.as_mut() else {
                continue;
            };
            let mode = mode_of(policy.mtls_mode(&pod.ctx.workload));
            if mode != inbound.mode {
                match self.proxy.maps.set_inbound(inbound.ip, mode) {
                    Ok(()) => {
                        info!(pod = %pod.spec.id, ?mode, "inbound mTLS mode changed");
                        inbound.mode = mode;
                    }
                    Err(e) => warn!(pod = %pod.spec.id, error = %e, "cannot change inbound mode"),
                }
            }
        }
    }

    /// Same-node delivery finds local pods by IP here.
    fn publish_local(&self) {
        let local = self
            .running
            .values()
            .filter_map(|p| Some((p.ctx.ip?, p.ctx.clone())))
            .collect();
        self.proxy.local.store(Arc::new(local));
    }

    async fn start(&self, pod: &Pod, policy: &PolicySet) -> anyhow::Result<RunningPod> {
        let path = pod.netns.clone().context("pod has no network namespace")?;
        let identity = self.identity(pod);
        self.proxy
            .secrets
            .wait(&identity, CERT_WAIT)
            .await
            .with_context(|| format!("no certificate for {identity} yet"))?;
        let tls_server = server_config(&self.proxy.secrets, &identity)?;
        let netns_file =
            File::open(&path).with_context(|| format!("opening netns {}", path.display()))?;
        let netns =
            Netns::enter(&path).with_context(|| format!("entering netns {}", path.display()))?;
        let l = netns
            .run(bind_all)
            .await?
            .with_context(|| format!("binding the agent's listeners in {}", path.display()))?;
        let workload = Workload {
            id: pod.id.clone(),
            labels: pod.labels.clone(),
        };
        let ctx = Arc::new(PodContext {
            workload: workload.clone(),
            workload_name: pod.workload.clone(),
            ip: pod.ip,
            identity: identity.clone(),
            netns,
            netns_cookie: l.cookie,
            tls_server,
        });
        let maps = &self.proxy.maps;
        let mut tasks = Vec::new();
        let result = (|| -> anyhow::Result<Option<Inbound>> {
            let inbound = match pod.ip {
                Some(ip) => {
                    let plaintext = match (ip, &l.plaintext_v6) {
                        (IpAddr::V6(_), Some(v6)) => v6,
                        _ => &l.plaintext_v4,
                    };
                    maps.set_plaintext_listener(ip, plaintext)?;
                    let mode = mode_of(policy.mtls_mode(&workload));
                    maps.set_inbound(ip, mode)?;
                    let link = self.hook.attach(&netns_file, l.cookie)?;
                    Some(Inbound { ip, mode, link })
                }
                None => None,
            };
            Ok(inbound)
        })();
        let inbound = match result {
            Ok(i) => i,
            Err(e) => {
                if let Some(ip) = pod.ip {
                    maps.remove_inbound(ip);
                    maps.remove_plaintext_listener(ip);
                }
                return Err(e);
            }
        };
        let spawn = |tasks: &mut Vec<JoinHandle<()>>,
                     kind: &'static str,
                     listener: std::net::TcpListener|
         -> anyhow::Result<()> {
            let addr = listener.local_addr()?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            let span = info_span!("listener", kind, pod = %pod.id, addr = %addr);
            let (c, p) = (ctx.clone(), self.proxy.clone());
            tasks.push(match kind {
                "outbound" => tokio::spawn(proxy::serve_outbound(listener, c, p).instrument(span)),
                "tunnel" => tokio::spawn(proxy::serve_tunnel(listener, c, p).instrument(span)),
                _ => tokio::spawn(proxy::serve_plaintext(listener, c, p).instrument(span)),
            });
            Ok(())
        };
        let Listeners {
            outbound,
            tunnel,
            plaintext_v4,
            plaintext_v6,
            cookie,
        } = l;
        let spawned = (|| -> anyhow::Result<()> {
            for x in tunnel {
                spawn(&mut tasks, "tunnel", x)?;
            }
            spawn(&mut tasks, "plaintext", plaintext_v4)?;
            if let Some(x) = plaintext_v6 {
                spawn(&mut tasks, "plaintext", x)?;
            }
            for x in outbound {
                spawn(&mut tasks, "outbound", x)?;
            }
            maps.enroll(cookie)?;
            Ok(())
        })();
        if let Err(e) = spawned {
            tasks.iter().for_each(JoinHandle::abort);
            if let Some(i) = inbound {
                i.link.detach();
            }
            if let Some(ip) = pod.ip {
                maps.remove_inbound(ip);
                maps.remove_plaintext_listener(ip);
            }
            return Err(e);
        }
        info!(pod = %pod.id, %identity, netns = %path.display(), netns_cookie = cookie,
            mode = ?inbound.as_ref().map(|i| i.mode), "pod enrolled");
        Ok(RunningPod {
            spec: pod.clone(),
            ctx,
            tasks,
            inbound,
        })
    }

    fn stop(&self, pod: RunningPod) {
        // Unenroll first: from now on new connects go where the application sent them.
        self.proxy.maps.unenroll(pod.ctx.netns_cookie);
        if let Some(inbound) = pod.inbound {
            inbound.link.detach();
            self.proxy.maps.remove_inbound(inbound.ip);
            self.proxy.maps.remove_plaintext_listener(inbound.ip);
        }
        // Closing the listeners; connections already accepted run on their own tasks.
        pod.tasks.iter().for_each(JoinHandle::abort);
        info!(pod = %pod.spec.id, "pod unenrolled");
    }

    pub fn shutdown(&mut self) {
        let running = std::mem::take(&mut self.running);
        for (_, pod) in running {
            self.stop(pod);
        }
        self.publish_local();
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

/// Runs on the pod's netns thread. IPv4 listeners are required, IPv6 ones are bound when
/// the pod has IPv6.
fn bind_all() -> std::io::Result<Listeners> {
    let v4_out = listen(SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)))?;
    let cookie = netns_cookie(&v4_out)?;
    let mut outbound = vec![v4_out];
    let mut tunnel = vec![listen(SocketAddr::from((
        Ipv4Addr::UNSPECIFIED,
        INBOUND_TUNNEL_PORT,
    )))?];
    let plaintext_v4 = listen(SocketAddr::from((
        Ipv4Addr::LOCALHOST,
        INBOUND_PLAINTEXT_PORT,
    )))?;
    let mut plaintext_v6 = None;
    match listen(SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT))) {
        Ok(v6) => {
            outbound.push(v6);
            tunnel.push(listen(SocketAddr::from((
                Ipv6Addr::UNSPECIFIED,
                INBOUND_TUNNEL_PORT,
            )))?);
            plaintext_v6 = Some(listen(SocketAddr::from((
                Ipv6Addr::LOCALHOST,
                INBOUND_PLAINTEXT_PORT,
            )))?);
        }
        Err(e) => tracing::debug!(error = %e, "no IPv6 listeners (IPv6 off in this pod?)"),
    }
    Ok(Listeners {
        outbound,
        tunnel,
        plaintext_v4,
        plaintext_v6,
        cookie,
    })
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
