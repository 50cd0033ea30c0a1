//! Keeps the set of enrolled pods equal to the local pods in the config.
//!
//! Enrolling a pod: enter its netns, bind the agent's listeners there (outbound
//! :15001, tunnel :15008, plaintext :15006), start serving, register the plaintext
//! listeners with the kernel, put the netns in the enrolled map with its mode and
//! addresses (from then on `connect4/6` capture in it, so the listeners are already
//! there), and attach the inbound program to the netns. The pod's certificate is not
//! waited for: a STRICT pod is STRICT from the first moment, and its tunnel accepts
//! connections once the certificate arrives (fetched in the background).
//!
//! A change to a running pod's labels, owner or probed ports is applied in place. Only a change of
//! its addresses, identity or network namespace re-enrolls it, and when the netns
//! stays the same the kernel entry and the inbound program are kept throughout, so
//! enforcement never lapses. Removing a pod goes the other way.
use std::{
    collections::{HashMap, HashSet},
    fs::File,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::OwnedFd,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use anyhow::Context as _;
use arc_swap::{ArcSwap, ArcSwapOption};
use mesh_common::{INBOUND_PLAINTEXT_PORT, INBOUND_TUNNEL_PORT, OUTBOUND_PORT};
use socket2::{Domain, Socket, Type};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{Instrument, info, info_span, warn};

use super::{
    cni::{CniNetns, PodStates},
    discover,
    netns::{Netns, netns_cookie},
};
use crate::{
    authz::{PolicySet, Workload},
    bpf::{InboundHook, InboundMode, PodInboundLink, Probes},
    config::{Config, MtlsMode, NamespacedName, Pod},
    handover::wire::PodListener,
    identity::Identity,
    proxy::{self, PodContext, PodMeta, ProxyContext},
};

/// Backlog of the listeners: bursts of connects from one pod queue here.
const BACKLOG: i32 = 4096;

struct RunningPod {
    spec: Pod,
    ctx: Arc<PodContext>,
    tasks: Vec<JoinHandle<()>>,
    mode: InboundMode,
    /// The kubelet's probes, as written to the kernel entry.
    probes: Probes,
    /// The sk_lookup program on the pod's netns; pinned, so it must be detached
    /// explicitly when the pod leaves the mesh.
    link: PodInboundLink,
    /// Duplicates of the pod's listening sockets, to hand to a successor.
    listeners: Vec<(PodListener, OwnedFd)>,
}

pub struct PodManager {
    node: String,
    trust_domain: String,
    proxy: Arc<ProxyContext>,
    hook: Arc<InboundHook>,
    running: HashMap<NamespacedName, RunningPod>,
    /// The host's /proc, scanned for pods no annotation places.
    proc_dir: PathBuf,
    /// The namespaces the container runtime named through the CNI plugin.
    cni: Arc<CniNetns>,
    /// What the CNI server waits on: published after each reconcile.
    states: watch::Sender<Arc<PodStates>>,
    /// Last error per pod that could not be enrolled, so a retry logs only news.
    failing: HashMap<NamespacedName, String>,
    /// With the API source: records on each local pod whether it is enrolled.
    annotator: Option<Arc<crate::config::PodAnnotator>>,
    /// Listeners handed over by the previous agent, by netns cookie, until the pod
    /// they belong to is enrolled.
    inherited: Mutex<HashMap<u64, Vec<(PodListener, std::net::TcpListener)>>>,
    /// The pods were handed to a successor: their kernel state is its now.
    handed_over: bool,
    /// Whether the pods' listeners are accepted on. Closed while this agent takes over
    /// from a running one: that one serves the shared listeners until this one is
    /// ready (certificates, config, every pod enrolled and published), so no
    /// connection meets a half-started agent.
    serving: watch::Sender<bool>,
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

/// How a running pod must follow a change to its object.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    None,
    /// Labels, owner or probed ports: swapped into the running pod (probes into its
    /// kernel entry, overwritten in place).
    InPlace,
    /// Addresses, identity or enrollment: listeners rebound. `same_netns`: the kernel
    /// entry and the inbound program stay in place meanwhile.
    Reenroll {
        same_netns: bool,
    },
}

fn change_of(old: &Pod, new: &Pod) -> Change {
    if old == new {
        return Change::None;
    }
    let identity_changed = old.id != new.id || old.service_account != new.service_account;
    if old.ips != new.ips || identity_changed || old.netns != new.netns {
        return Change::Reenroll {
            same_netns: old.netns == new.netns,
        };
    }
    Change::InPlace
}

fn meta_of(pod: &Pod) -> PodMeta {
    PodMeta {
        workload: Workload {
            id: pod.id.clone(),
            labels: pod.labels.clone(),
        },
        workload_name: pod.workload.clone(),
    }
}

impl PodManager {
    pub fn new(
        node: String,
        trust_domain: String,
        proxy: Arc<ProxyContext>,
        hook: Arc<InboundHook>,
        proc_dir: PathBuf,
        cni: Arc<CniNetns>,
        serving: bool,
    ) -> Self {
        PodManager {
            node,
            trust_domain,
            proxy,
            hook,
            proc_dir,
            cni,
            states: watch::Sender::new(Arc::default()),
            running: HashMap::new(),
            failing: HashMap::new(),
            annotator: None,
            inherited: Mutex::new(HashMap::new()),
            handed_over: false,
            serving: watch::Sender::new(serving),
        }
    }

    /// Starts accepting on every pod's listeners (see `serving`); idempotent.
    pub fn start_serving(&self) {
        self.serving
            .send_if_modified(|open| !std::mem::replace(open, true));
    }

    /// Listeners the previous agent handed over: a pod whose netns they belong to
    /// is enrolled with them instead of binding its own (which would fail while the
    /// previous agent holds them, and would leave connections in their queues behind).
    pub fn inherit(&mut self, pods: HashMap<u64, Vec<(PodListener, std::net::TcpListener)>>) {
        *self.inherited.lock().unwrap_or_else(|p| p.into_inner()) = pods;
    }

    /// Closes the handed-over listeners no pod claimed (its pod left meanwhile).
    fn drop_unclaimed(&self) {
        let mut inherited = self.inherited.lock().unwrap_or_else(|p| p.into_inner());
        if !inherited.is_empty() {
            info!(
                netns = inherited.len(),
                "closing handed-over listeners of pods no longer here"
            );
            inherited.clear();
        }
    }

    /// Duplicates of every enrolled pod's listeners, by netns cookie, for a successor.
    pub fn handover_offer(&self) -> Vec<(u64, Vec<(PodListener, OwnedFd)>)> {
        self.running
            .values()
            .filter_map(|p| {
                let dups: std::io::Result<Vec<_>> = p
                    .listeners
                    .iter()
                    .map(|(k, fd)| Ok((*k, fd.try_clone()?)))
                    .collect();
                match dups {
                    Ok(d) => Some((p.ctx.netns_cookie, d)),
                    Err(e) => {
                        warn!(pod = %p.spec.id, error = %e, "cannot duplicate the pod's listeners; the successor binds its own");
                        None
                    }
                }
            })
            .collect()
    }

    /// A successor serves the pods now: stop accepting on their listeners (the
    /// connections already accepted go on) and leave their kernel state, which the
    /// successor has taken over, as it is.
    pub fn stop_accepting(&mut self) {
        self.handed_over = true;
        for pod in self.running.values_mut() {
            pod.tasks.iter().for_each(JoinHandle::abort);
            pod.tasks.clear();
            pod.listeners.clear();
        }
        info!(
            pods = self.running.len(),
            "stopped accepting; the successor serves the pods"
        );
    }

    /// Records each local pod's enrollment on the pod object (the API source).
    pub fn set_annotator(&mut self, annotator: Arc<crate::config::PodAnnotator>) {
        self.annotator = Some(annotator);
    }

    /// Asks the annotator to make every pod of this node say whether it is enrolled.
    fn record_status(&self, config: &Config) {
        let Some(annotator) = &self.annotator else {
            return;
        };
        let here = config
            .pods
            .iter()
            .filter(|p| !p.finished && p.node_name.as_deref() == Some(self.node.as_str()));
        for p in here {
            annotator.record(
                &p.id,
                p.mesh_status.as_deref(),
                self.running.contains_key(&p.id),
            );
        }
    }

    /// Whether every local pod of `config` is enrolled.
    pub fn all_enrolled(&self, config: &Config) -> bool {
        enrollable(&self.node, &self.cni, config).all(|p| self.running.contains_key(&p.id))
    }

    fn identity(&self, pod: &Pod) -> Identity {
        Identity::new(&self.trust_domain, &pod.id.namespace, &pod.service_account)
    }

    pub async fn reconcile(&mut self, config: &Config, policy: &PolicySet) {
        if self.handed_over {
            return;
        }
        let (node, cni) = (self.node.clone(), self.cni.clone());
        let desired: HashMap<&NamespacedName, &Pod> = enrollable(&node, &cni, config)
            .map(|p| (&p.id, p))
            .collect();
        let mut keep_kernel = HashSet::new();
        let ids: Vec<NamespacedName> = self.running.keys().cloned().collect();
        for id in ids {
            let change = match (desired.get(&id), self.running.get(&id)) {
                (Some(new), Some(running)) => change_of(&running.spec, new),
                _ => Change::Reenroll { same_netns: false },
            };
            match change {
                Change::None => {}
                Change::InPlace => {
                    if let (Some(new), Some(running)) =
                        (desired.get(&id), self.running.get_mut(&id))
                    {
                        running.ctx.meta.store(Arc::new(meta_of(new)));
                        running.spec = (*new).clone();
                        let probes = probes_of(new);
                        if probes != running.probes {
                            match self
                                .proxy
                                .maps
                                .set_probes(running.ctx.netns_cookie, &probes)
                            {
                                Ok(()) => running.probes = probes,
                                Err(e) => warn!(pod = %id, error = %e, "cannot change probes"),
                            }
                        }
                        info!(pod = %id, "pod updated in place");
                    }
                }
                Change::Reenroll { same_netns } => {
                    if let Some(pod) = self.running.remove(&id) {
                        if same_netns {
                            keep_kernel.insert(pod.ctx.netns_cookie);
                        }
                        self.stop(pod, same_netns);
                    }
                }
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
                    keep_kernel.remove(&running.ctx.netns_cookie);
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
        self.clean_adopted(config);
        self.publish_states(config);
        self.record_status(config);
    }

    /// Tells the CNI server where each pod stands.
    fn publish_states(&self, config: &Config) {
        // Built from every pod of the cluster only when there is something to prune.
        if self.cni.has_deleted() {
            let known: HashSet<&NamespacedName> = config.pods.iter().map(|p| &p.id).collect();
            self.cni.retain_deleted(|id| known.contains(id));
        }
        let mine: HashSet<&NamespacedName> =
            local_pods(&self.node, config).map(|p| &p.id).collect();
        // Only this node's kubelet creates sandboxes here, for pods bound to this
        // node: the CNI plugin never asks about another node's pods, so they are not
        // listed (at 20,000 pods the list cost more than the rest of a config change).
        let node = Some(self.node.as_str());
        let states = PodStates {
            running: self.running.keys().cloned().collect(),
            not_here: config
                .pods
                .iter()
                .filter(|p| p.node_name.as_deref() == node && !mine.contains(&p.id))
                .map(|p| p.id.clone())
                .collect(),
            failing: self.failing.clone(),
        };
        self.states.send_if_modified(|s| {
            let changed = **s != states;
            if changed {
                *s = Arc::new(states);
            }
            changed
        });
    }

    /// What the CNI server waits on.
    pub fn states(&self) -> watch::Receiver<Arc<PodStates>> {
        self.states.subscribe()
    }

    /// Once every local pod runs under this agent, removes what an earlier agent (or
    /// an earlier enrollment) left in the kernel for netns no pod here has any more.
    /// Until then it keeps being enforced: a pod not yet taken over stays STRICT.
    fn clean_adopted(&mut self, config: &Config) {
        if !self.all_enrolled(config) {
            return;
        }
        self.drop_unclaimed();
        let live: HashSet<u64> = self.running.values().map(|p| p.ctx.netns_cookie).collect();
        let maps = &self.proxy.maps;
        let mut removed = 0;
        for (cookie, _) in maps.enrolled() {
            if !live.contains(&cookie) {
                maps.unenroll(cookie);
                maps.remove_plaintext_listeners(cookie);
                removed += 1;
            }
        }
        removed += self.hook.remove_stale(&live);
        if removed > 0 {
            info!(removed, "removed kernel state of pods no longer here");
        }
    }

    /// Applies the PeerAuthentication mode of each running pod to the kernel; running
    /// pods switch between STRICT and PERMISSIVE in place.
    fn update_modes(&mut self, policy: &PolicySet) {
        for pod in self.running.values_mut() {
            let mode = mode_of(policy.mtls_mode(&pod.ctx.meta.load().workload));
            if mode != pod.mode {
                match self.proxy.maps.set_mode(pod.ctx.netns_cookie, mode) {
                    Ok(()) => {
                        info!(pod = %pod.spec.id, ?mode, "inbound mTLS mode changed");
                        pod.mode = mode;
                    }
                    Err(e) => warn!(pod = %pod.spec.id, error = %e, "cannot change inbound mode"),
                }
            }
        }
    }

    /// Same-node delivery finds local pods by any of their IPs here.
    fn publish_local(&self) {
        let local = self
            .running
            .values()
            .flat_map(|p| {
                p.ctx
                    .ips
                    .iter()
                    .map(|ip| (ip.to_canonical(), p.ctx.clone()))
            })
            .collect();
        self.proxy.snapshot.publish_local(local);
    }

    async fn start(&self, pod: &Pod, policy: &PolicySet) -> anyhow::Result<RunningPod> {
        let identity = self.identity(pod);
        // Opened once: the listeners, the kernel hook and everything after work from
        // this fd, never from the path again.
        let (netns_file, path) = open_netns(pod, &self.cni, &self.proc_dir)?;
        let netns = Netns::enter_file(netns_file.try_clone()?, &pod.id.name)
            .with_context(|| format!("entering netns {path}"))?;
        let handed = if self.inherited_any() {
            let cookie = netns
                .run(probe_cookie)
                .await?
                .with_context(|| format!("reading the cookie of netns {path}"))?;
            self.take_inherited(cookie)
        } else {
            None
        };
        let l = match handed {
            Some(l) => {
                info!(pod = %pod.id, netns_cookie = l.cookie, "serving the listeners the previous agent handed over");
                l
            }
            None => netns
                .run(bind_all)
                .await?
                .with_context(|| format!("binding the agent's listeners in {path}"))?,
        };
        let dups = l
            .dups()
            .context("duplicating the listeners (kept for a successor)")?;
        let meta = meta_of(pod);
        let mode = mode_of(policy.mtls_mode(&meta.workload));
        let probes = probes_of(pod);
        let ctx = Arc::new(PodContext {
            id: pod.id.clone(),
            meta: ArcSwap::from_pointee(meta),
            ip: pod.ip,
            ips: pod.ips.iter().map(|ip| ip.to_canonical()).collect(),
            identity: identity.clone(),
            netns,
            netns_cookie: l.cookie,
            tls_server: ArcSwapOption::empty(),
            tunnel_peers: crate::limits::ConnLimits::new(
                "tunnel",
                usize::MAX,
                proxy::TUNNEL_PER_SOURCE,
            ),
        });
        let maps = &self.proxy.maps;
        let mut tasks = Vec::new();
        let spawn = |tasks: &mut Vec<JoinHandle<()>>,
                     kind: &'static str,
                     listener: std::net::TcpListener|
         -> anyhow::Result<()> {
            let addr = listener.local_addr()?;
            let listener = proxy::Listener::new(listener)?;
            let span = info_span!("listener", kind, pod = %pod.id, addr = %addr);
            let (c, p) = (ctx.clone(), self.proxy.clone());
            let mut serving = self.serving.subscribe();
            tasks.push(tokio::spawn(
                async move {
                    // The sender lives as long as the manager, which aborts this task.
                    if serving.wait_for(|open| *open).await.is_err() {
                        return;
                    }
                    match kind {
                        "outbound" => proxy::serve_outbound(listener, c, p).await,
                        "tunnel" => proxy::serve_tunnel(listener, c, p).await,
                        _ => proxy::serve_plaintext(listener, c, p).await,
                    }
                }
                .instrument(span),
            ));
            Ok(())
        };
        let Listeners {
            outbound,
            tunnel,
            plaintext_v4,
            plaintext_v6,
            cookie,
        } = l;
        let enrolled = (|| -> anyhow::Result<PodInboundLink> {
            maps.set_plaintext_listener(cookie, false, &plaintext_v4)?;
            if let Some(v6) = &plaintext_v6 {
                maps.set_plaintext_listener(cookie, true, v6)?;
            }
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
            // Capture starts here: every listener it needs is up.
            maps.enroll(cookie, mode, &ctx.ips, &probes)?;
            Ok(self.hook.attach(&netns_file, cookie)?)
        })();
        let link = match enrolled {
            Ok(link) => link,
            Err(e) => {
                tasks.iter().for_each(JoinHandle::abort);
                maps.unenroll(cookie);
                maps.remove_plaintext_listeners(cookie);
                return Err(e);
            }
        };
        info!(pod = %pod.id, %identity, netns = %path, netns_cookie = cookie,
            ?mode, probe_src = ?probes.source, probe_ports = ?probes.ports, "pod enrolled");
        Ok(RunningPod {
            spec: pod.clone(),
            ctx,
            tasks,
            mode,
            probes,
            link,
            listeners: dups,
        })
    }

    fn inherited_any(&self) -> bool {
        !self
            .inherited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_empty()
    }

    /// The handed-over listeners of the netns `cookie`, as one pod's set.
    fn take_inherited(&self, cookie: u64) -> Option<Listeners> {
        let set = self
            .inherited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&cookie)?;
        match Listeners::from_handed(cookie, set) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(netns_cookie = cookie, error = %e, "handed-over listeners incomplete; binding anew");
                None
            }
        }
    }

    /// Takes a pod out of the mesh. `keep_kernel`: it is about to be enrolled again
    /// in the same netns, so its kernel entry and inbound program stay (STRICT holds;
    /// outbound connects meanwhile are refused, as no listener is there).
    fn stop(&self, pod: RunningPod, keep_kernel: bool) {
        if !keep_kernel {
            // Unenroll first: from now on new connects go where the application sent them.
            self.proxy.maps.unenroll(pod.ctx.netns_cookie);
            pod.link.detach();
            self.proxy
                .maps
                .remove_plaintext_listeners(pod.ctx.netns_cookie);
        }
        // Closing the listeners; connections already accepted run on their own tasks.
        pod.tasks.iter().for_each(JoinHandle::abort);
        info!(pod = %pod.spec.id, keep_kernel, "pod unenrolled");
    }

    pub fn shutdown(&mut self) {
        if self.handed_over {
            // The kernel state is the successor's: nothing is unenrolled or detached.
            self.running.clear();
            return;
        }
        let running = std::mem::take(&mut self.running);
        for (_, pod) in running {
            self.stop(pod, false);
        }
        self.publish_local();
    }
}

/// The kubelet's probes of `pod`: from the node's address toward the pod IP, to the
/// ports its spec probes. No probed port: no source either, so nothing passes.
fn probes_of(pod: &Pod) -> Probes {
    if pod.probe_ports.is_empty() {
        return Probes::default();
    }
    if pod.probe_ports.len() > mesh_common::MAX_PROBE_PORTS {
        warn!(pod = %pod.id, ports = ?pod.probe_ports, kept = mesh_common::MAX_PROBE_PORTS,
            "the pod probes more ports than the kernel entry holds; the first are kept");
    }
    let source = pod.ip.and_then(|ip| match node_source_toward(ip) {
        Ok(src) => Some(src),
        Err(e) => {
            warn!(pod = %pod.id, error = %e, "no route from the node to the pod; its probes will be refused");
            None
        }
    });
    Probes {
        source,
        ports: pod.probe_ports.clone(),
    }
}

/// The source address the node's routing picks toward `ip`, which is where the
/// kubelet's probes come from: the agent runs in the node's netns, so a UDP connect
/// (which sends nothing) asks the kernel the same question the kubelet's TCP connect
/// does.
fn node_source_toward(ip: std::net::IpAddr) -> std::io::Result<std::net::IpAddr> {
    let bind: SocketAddr = if ip.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = std::net::UdpSocket::bind(bind)?;
    sock.connect((ip, 9))?;
    Ok(sock.local_addr()?.ip().to_canonical())
}

/// The pods of `config` this node must enroll: on this node, not opted out, and bound
/// to a network namespace.
fn local_pods<'a>(node: &'a str, config: &'a Config) -> impl Iterator<Item = &'a Pod> + 'a {
    config
        .pods
        .iter()
        .filter(move |p| p.enroll && !p.finished && p.node_name.as_deref() == Some(node))
        .map(|p| &**p)
}

/// The pods this agent enrolls: this node's pods in the mesh whose netns it can find,
/// except those whose sandbox the runtime deleted.
fn enrollable<'a>(
    node: &'a str,
    cni: &'a CniNetns,
    config: &'a Config,
) -> impl Iterator<Item = &'a Pod> + 'a {
    local_pods(node, config)
        .filter(move |p| !cni.is_deleted(&p.id) && (findable(p) || cni.get(&p.id).is_some()))
}

/// Whether the agent can find the pod's netns: named by the annotation, or found by
/// its UID in the host's `/proc`.
pub fn findable(pod: &Pod) -> bool {
    pod.netns.is_some() || pod.uid.is_some()
}

/// The pod's netns, opened, and how it was found (for messages): the one the runtime
/// named through the CNI plugin (if it holds one of the pod's IPs), else the
/// annotation's path, else the `/proc` scan by UID confirmed by the pod's IPs.
fn open_netns(
    pod: &Pod,
    cni: &CniNetns,
    proc_dir: &std::path::Path,
) -> anyhow::Result<(File, String)> {
    if let Some(file) = cni.get(&pod.id) {
        let file = file.context("the netns the CNI plugin named")?;
        anyhow::ensure!(
            discover::holds_any(&file, &pod.ips),
            "the netns the CNI plugin named holds none of the pod's IPs {:?}",
            pod.ips
        );
        return Ok((file, "named by the CNI plugin".to_owned()));
    }
    if let Some(path) = &pod.netns {
        let file = File::open(path).with_context(|| format!("opening netns {}", path.display()))?;
        return Ok((file, path.display().to_string()));
    }
    let uid = pod.uid.as_deref().context("pod has no network namespace")?;
    let file = discover::netns_of(proc_dir, uid, &pod.ips)?;
    Ok((
        file,
        format!("of pod UID {uid} (found in {})", proc_dir.display()),
    ))
}

impl Listeners {
    /// Duplicates of every listener, to hand to a successor.
    fn dups(&self) -> std::io::Result<Vec<(PodListener, OwnedFd)>> {
        let mut out = Vec::new();
        let mut add = |kind, l: &std::net::TcpListener| -> std::io::Result<()> {
            out.push((kind, OwnedFd::from(l.try_clone()?)));
            Ok(())
        };
        for l in &self.outbound {
            add(PodListener::Outbound, l)?;
        }
        for l in &self.tunnel {
            add(PodListener::Tunnel, l)?;
        }
        add(PodListener::Plaintext, &self.plaintext_v4)?;
        if let Some(l) = &self.plaintext_v6 {
            add(PodListener::Plaintext, l)?;
        }
        Ok(out)
    }

    /// One pod's set from handed-over sockets: an IPv4 listener of each kind is
    /// required, as when binding.
    fn from_handed(
        cookie: u64,
        set: Vec<(PodListener, std::net::TcpListener)>,
    ) -> std::io::Result<Listeners> {
        let (mut outbound, mut tunnel) = (Vec::new(), Vec::new());
        let (mut plaintext_v4, mut plaintext_v6) = (None, None);
        for (kind, l) in set {
            l.set_nonblocking(true)?;
            let v4 = l.local_addr()?.is_ipv4();
            match kind {
                PodListener::Outbound => outbound.push(l),
                PodListener::Tunnel => tunnel.push(l),
                PodListener::Plaintext if v4 => plaintext_v4 = Some(l),
                PodListener::Plaintext => plaintext_v6 = Some(l),
            }
        }
        let plaintext_v4 =
            plaintext_v4.ok_or_else(|| std::io::Error::other("no IPv4 plaintext listener"))?;
        let has_v4 = |ls: &[std::net::TcpListener]| {
            ls.iter().any(|l| l.local_addr().is_ok_and(|a| a.is_ipv4()))
        };
        if !has_v4(&outbound) || !has_v4(&tunnel) {
            return Err(std::io::Error::other("no IPv4 outbound or tunnel listener"));
        }
        Ok(Listeners {
            outbound,
            tunnel,
            plaintext_v4,
            plaintext_v6,
            cookie,
        })
    }
}

/// Runs on the pod's netns thread: the netns cookie, from a socket that is never bound.
fn probe_cookie() -> std::io::Result<u64> {
    let sock = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    netns_cookie(&sock)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;

    fn pod() -> Pod {
        Pod {
            id: NamespacedName {
                namespace: "ns".into(),
                name: "p".into(),
            },
            uid: None,
            node_name: Some("n1".into()),
            ip: Some(IpAddr::from([10, 244, 1, 2])),
            ips: vec![IpAddr::from([10, 244, 1, 2])],
            finished: false,
            service_account: "sa".into(),
            netns: Some("/run/netns/p".into()),
            dataplane: Default::default(),
            enroll: true,
            labels: Default::default(),
            workload: "p".into(),
            probe_ports: vec![],
            mesh_status: None,
        }
    }

    #[test]
    fn labels_and_owner_change_in_place() {
        let old = pod();
        let mut new = pod();
        new.labels.insert("version".into(), "v2".into());
        new.workload = "other".into();
        assert_eq!(change_of(&old, &new), Change::InPlace);
        assert_eq!(change_of(&old, &old.clone()), Change::None);
    }

    #[test]
    fn addresses_identity_and_netns_re_enroll() {
        let old = pod();
        let mut ip = pod();
        ip.ips.push(IpAddr::from([0xfd00, 0, 0, 0, 0, 0, 0, 1]));
        assert_eq!(change_of(&old, &ip), Change::Reenroll { same_netns: true });
        let mut sa = pod();
        sa.service_account = "other".into();
        assert_eq!(change_of(&old, &sa), Change::Reenroll { same_netns: true });
        let mut netns = pod();
        netns.netns = Some("/run/netns/q".into());
        assert_eq!(
            change_of(&old, &netns),
            Change::Reenroll { same_netns: false }
        );
    }

    #[test]
    fn probes_change_in_place_and_a_pod_without_probes_has_no_source() {
        let old = pod();
        let mut new = pod();
        new.probe_ports = vec![8080];
        assert_eq!(change_of(&old, &new), Change::InPlace);
        assert_eq!(probes_of(&old), Probes::default());
    }

    #[test]
    fn the_probe_source_is_the_nodes_own_address_toward_the_pod() {
        // Toward loopback the kernel picks loopback: the question is the routing
        // table's, asked without sending anything.
        let src = node_source_toward(IpAddr::from([127, 0, 0, 1])).unwrap();
        assert!(src.is_loopback(), "{src}");
    }

    #[test]
    fn finished_pods_are_not_enrolled() {
        let mut done = pod();
        done.finished = true;
        let config = Config {
            pods: vec![pod().into(), done.into()],
            ..Default::default()
        };
        assert_eq!(local_pods("n1", &config).count(), 1);
    }
}
