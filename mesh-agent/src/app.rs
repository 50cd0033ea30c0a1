//! Wires the agent together: kernel programs, config, pods, proxies, readiness; and
//! takes it apart again on SIGTERM so that nothing is left in the kernel.
use std::{
    path::PathBuf,
    sync::{Arc, OnceLock, atomic::AtomicU64, atomic::Ordering},
    time::{Duration, Instant, SystemTime},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use mesh_common::counters;

use crate::{
    admin::{AdminServer, AdminState, Core},
    authz::{LiveConns, PolicySet},
    bpf::{self, Datapath, DatapathOptions, Heartbeat},
    cli::RunArgs,
    cli::Source,
    config::{ApiSource, ConfigWatch, Directory, Generation, LeaseSettings},
    handover::{
        PreviousAgent, PreviousAgentStatus, PreviousState, drain, give, take, wire::NodeListener,
    },
    identity::{CaClient, SecretManager},
    inpod::PodManager,
    proxy::{ConfigParts, Pool, ProxyContext, SnapshotCell},
    state::{HttpRoutes, RouteTable, WorkloadIndex},
    telemetry::{LogControl, Readiness, Telemetry, kernel_flows, serve_readiness},
};

/// How often pods that could not be enrolled (netns not there yet) are retried.
const RETRY_PODS: Duration = Duration::from_secs(1);
/// The Lease whose holder writes route status (one agent of the cluster).
const ROUTE_STATUS_LEASE: &str = "mesh-route-status";

pub async fn run(args: RunArgs, log: Arc<LogControl>) -> anyhow::Result<()> {
    crate::limits::raise_fd_limit();
    let started = Instant::now();
    // Before anything is bound: an agent running on this node hands its listeners over.
    let inherited = {
        let path = args.handover_socket.clone();
        tokio::task::spawn_blocking(move || take::take_over(&path))
            .await
            .context("handover thread")?
            .context("taking over from the running agent")?
    };
    let (mut node_inherited, pods_inherited, previous) = match inherited {
        Some(i) => (i.node, i.pods, Some(i.previous)),
        None => Default::default(),
    };
    let taking_over = previous.is_some();
    let readiness = Arc::new(Readiness::default());
    let readiness_listener = match node_inherited.remove(&NodeListener::Readiness) {
        Some(l) => l,
        None => crate::telemetry::bind_node_listener(args.readiness_addr)
            .with_context(|| format!("binding the readiness endpoint {}", args.readiness_addr))?,
    };
    let metrics_listener = match node_inherited.remove(&NodeListener::Metrics) {
        Some(l) => l,
        None => crate::telemetry::bind_node_listener(args.metrics_addr)
            .with_context(|| format!("binding the metrics endpoint {}", args.metrics_addr))?,
    };
    // Kept to hand to a successor.
    let node_listeners = vec![
        (
            NodeListener::Readiness,
            std::os::fd::OwnedFd::from(readiness_listener.try_clone()?),
        ),
        (
            NodeListener::Metrics,
            std::os::fd::OwnedFd::from(metrics_listener.try_clone()?),
        ),
    ];
    let readiness_task = tokio::spawn({
        let readiness = readiness.clone();
        async move {
            if let Err(e) = serve_readiness(readiness_listener, readiness).await {
                error!(error = %e, "readiness endpoint failed");
            }
        }
    });
    let telemetry = Telemetry::new(&args.cluster_domain);
    let previous_status = Arc::new(PreviousAgentStatus::default());
    if let Some(p) = &previous {
        previous_status.set(|s| {
            *s = Some(PreviousAgent {
                pid: p.pid,
                version: p.version.clone(),
                state: PreviousState::HandingOver,
                connections: 0,
                deadline: None,
            })
        });
    }
    let admin_state = Arc::new(AdminState {
        node: args.node_name.clone(),
        started,
        readiness: readiness.clone(),
        log,
        telemetry: telemetry.clone(),
        trust_domain: args.identity.trust_domain.clone(),
        root_namespace: args.root_namespace.clone(),
        core: OnceLock::new(),
        previous_agent: previous_status.clone(),
    });
    let mut admin = AdminServer::start(
        &args.admin_socket,
        metrics_listener,
        taking_over,
        admin_state.clone(),
    )
    .context("starting the admin API")?;

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let previous_pid = previous.as_ref().map(|p| p.pid);
    let Some(mut datapath) = attach(&args, previous_pid, &mut sigterm, &mut sigint).await? else {
        admin.stop();
        return Ok(());
    };
    let maps = datapath.maps.clone();
    readiness.programs_attached.store(true, Ordering::Relaxed);
    // The kernel BTF parsed while loading is the largest allocation the agent ever makes.
    crate::memory::release_free_heap();

    let id_args = &args.identity;
    let ca_root = std::fs::read_to_string(&id_args.ca_root)
        .with_context(|| format!("reading the CA root {}", id_args.ca_root.display()))?;
    // Read once here so a missing token fails the start; the client reads it again for
    // every request (a projected token rotates).
    std::fs::read_to_string(&id_args.ca_token_file)
        .with_context(|| format!("reading the node token {}", id_args.ca_token_file.display()))?;
    let ca = CaClient::new(
        &id_args.ca_addr,
        &id_args.ca_server_name,
        &ca_root,
        id_args.ca_token_file.clone(),
    )
    .context("CA client")?;
    let secrets = SecretManager::new(Arc::new(ca), id_args.cert_ttl);
    let pool = Pool::new(
        args.tunnel.tunnel_stream_limit,
        args.tunnel.tunnel_idle_timeout,
    );

    let workers = args.worker_threads.map_or_else(
        || std::thread::available_parallelism().map_or(1, usize::from),
        usize::from,
    );
    let shards = Arc::new(crate::proxy::shards::Shards::start(workers).context("worker threads")?);
    info!(
        worker_threads = shards.count(),
        "connections run on one runtime per worker thread"
    );
    let proxy = Arc::new(ProxyContext {
        snapshot: SnapshotCell::default(),
        loads: Arc::new(crate::proxy::http::Loads::default()),
        app_conns: Arc::new(crate::proxy::http::AppConns::default()),
        detect_timeout: args.detect_timeout,
        server_first_ports: args.server_first_ports.clone(),
        live: Arc::new(LiveConns::default()),
        secrets: secrets.clone(),
        pool: pool.clone(),
        maps: maps.clone(),
        connect_timeout: args.connect_timeout,
        next_conn_id: AtomicU64::new(1),
        telemetry: telemetry.clone(),
        conns: {
            let budget = crate::limits::FdBudget::for_limit(crate::limits::nofile());
            info!(
                data_path_connections = budget.data_path,
                per_pod = args.tunnel.max_connections_per_pod,
                "connection caps"
            );
            crate::limits::ConnLimits::new(
                "data path",
                budget.data_path,
                args.tunnel.max_connections_per_pod as usize,
            )
        },
        shards,
        draining: tokio_util::sync::CancellationToken::new(),
    });
    let mut background = Background(vec![
        tokio::spawn(reap_pool(proxy.clone(), args.tunnel.tunnel_idle_timeout)),
        tokio::spawn({
            let proxy = proxy.clone();
            crate::memory::trim_after_falls(move || proxy.conns.open(), Duration::from_secs(10))
        }),
        tokio::spawn(crate::telemetry::map_fill::watch(
            maps.clone(),
            Duration::from_secs(10),
        )),
    ]);
    // The programs' own log names pods by their netns.
    let _ = datapath.kernel_log_pods.set({
        let resolve = pod_resolver(&proxy);
        Arc::new(move |cookie| resolve(cookie, std::net::IpAddr::from([0, 0, 0, 0])))
    });
    if let Some(l) = datapath.kernel_log.take() {
        background
            .0
            .push(tokio::spawn(crate::telemetry::kernel_log::run(l)));
    }
    if let Some(ring) = datapath.events.take() {
        background.0.push(tokio::spawn(kernel_flows::run(
            ring,
            telemetry.clone(),
            pod_resolver(&proxy),
            {
                let maps = maps.clone();
                Arc::new(move || maps.counters()[counters::EVENTS_DROPPED as usize])
            },
            {
                let maps = maps.clone();
                Arc::new(move |on| {
                    if let Err(e) = maps.set_setting(mesh_common::settings::FLOW_EVENTS, on.into())
                    {
                        warn!(error = %e, "cannot switch the kernel's flow events");
                    }
                })
            },
        )));
    }
    // The CNI plugin's namespaces, and its way to wake the pod manager.
    let cni_netns = Arc::new(crate::inpod::cni::CniNetns::default());
    let kick = Arc::new(tokio::sync::Notify::new());
    let mut pods = PodManager::new(
        args.node_name.clone(),
        id_args.trust_domain.clone(),
        proxy.clone(),
        datapath.inbound.clone(),
        args.host_proc.clone(),
        cni_netns.clone(),
        // Taking over: the running agent accepts on the shared listeners until this
        // one is ready.
        !taking_over,
    );
    pods.inherit(pods_inherited);
    let cni_ctx = crate::inpod::cni::CniContext {
        netns: cni_netns.clone(),
        kick: kick.clone(),
        states: pods.states(),
        timeout: args.cni_timeout,
    };
    let mut cni_server = match &args.cni_socket {
        Some(path) => Some(crate::inpod::cni::start(
            path,
            cni_ctx.clone(),
            taking_over,
        )?),
        None => None,
    };
    // This agent's own successor, some day. Without the socket it still runs; it
    // just cannot hand over (a restart is then a cold one).
    let mut successors = match give::serve(&args.handover_socket) {
        Ok(rx) => rx,
        Err(e) => {
            warn!(error = %e, "no handover socket; a restart of this agent will not be hitless");
            tokio::sync::mpsc::channel(1).1
        }
    };
    let mut previous = previous;
    let settings = Settings {
        trust_domain: id_args.trust_domain.clone(),
        root_namespace: args.root_namespace.clone(),
        server_first_ports: args.server_first_ports.clone(),
    };
    let source = args.source.source();
    let mut config = match &source {
        Source::Directory(dir) => ConfigWatch::start(Directory::new(dir.clone())),
        Source::Kubernetes(kubeconfig) => {
            let (client, server) = crate::config::api_client(kubeconfig.as_deref()).await?;
            pods.set_annotator(crate::config::PodAnnotator::start(client.clone()));
            let mut api = ApiSource::new(client, server).report_events(args.node_name.clone());
            if args.route_status.is_on() {
                let server_first = args.server_first_ports.clone();
                api = api.write_route_status(
                    LeaseSettings::new(
                        args.namespace.clone(),
                        ROUTE_STATUS_LEASE.to_owned(),
                        args.node_name.clone(),
                    ),
                    Arc::new(move |c: &crate::config::Config| {
                        HttpRoutes::build(c, &server_first).problems
                    }),
                );
            }
            ConfigWatch::start(api)
        }
    };
    let mut current: Arc<Generation> = config.updates.borrow().clone();
    let _ = admin_state.core.set(Core {
        proxy: proxy.clone(),
        programs: datapath.programs.clone(),
        map_dir: datapath.map_dir(),
        config: config.updates.clone(),
        reloads: config.stats.clone(),
    });

    let mut retry = tokio::time::interval(RETRY_PODS);
    info!(node = %args.node_name, source = ?source, "agent running");
    // Set once a successor is ready: this agent drains instead of tearing down.
    let mut handed_over = None;
    // Beats once this agent serves (its first config applied); see `bpf::Heartbeat`.
    let mut heartbeat: Option<Heartbeat> = None;
    // SIGTERM came while a successor was taking over: stop when that ends.
    let mut stop_requested = false;
    // A successor died before it was ready, holding the handover socket's path.
    let mut retake_handover = false;
    loop {
        tokio::select! {
            changed = config.updates.changed() => {
                if changed.is_err() {
                    error!("config watcher stopped");
                    break;
                }
                let next = config.updates.borrow_and_update().clone();
                let previous = std::mem::replace(&mut current, next);
                apply(&current, &previous, &settings, &proxy, &mut pods).await;
                readiness.config_loaded.store(current.number > 0, Ordering::Relaxed);
            }
            _ = kick.notified() => {
                let policy = proxy.snapshot.load().policy.clone();
                pods.reconcile(&current.config, &policy).await;
            }
            _ = retry.tick() => {
                if !pods.all_enrolled(&current.config) {
                    let policy = proxy.snapshot.load().policy.clone();
                    pods.reconcile(&current.config, &policy).await;
                }
            }
            Some(event) = successors.recv() => match event {
                give::Event::Successor { pid, version, reply } => {
                    info!(successor_pid = pid, successor_version = %version,
                        "handing the listeners over to a successor");
                    readiness.handing_over.store(true, Ordering::Relaxed);
                    let offer = give::Offer {
                        node: dup_all(&node_listeners),
                        pods: pods.handover_offer(),
                    };
                    let _ = reply.send(offer);
                }
                give::Event::Gone { error } => {
                    warn!(%error, "the successor left before it was ready; serving on");
                    readiness.handing_over.store(false, Ordering::Relaxed);
                    // It may have written its id as the agent's before it died.
                    if let Err(e) = maps.reclaim_agent_id() {
                        warn!(error = %e, "cannot write the agent's id back");
                    }
                    // It took the admin and CNI socket paths when it started: without
                    // them back, meshctl and new pods would find a dead socket.
                    let metrics = node_listeners
                        .iter()
                        .find(|(k, _)| *k == NodeListener::Metrics)
                        .and_then(|(_, fd)| fd.try_clone().ok())
                        .map(std::net::TcpListener::from);
                    match metrics.map(|m| admin.take_path_back(m, admin_state.clone())) {
                        Some(Ok(())) => {}
                        Some(Err(e)) => warn!(error = %e, "cannot take the admin socket back"),
                        None => warn!("cannot take the admin socket back: no metrics listener"),
                    }
                    retake_handover = true;
                    if let (Some(path), Some(old)) = (&args.cni_socket, cni_server.take()) {
                        old.abort();
                        match crate::inpod::cni::start(path, cni_ctx.clone(), true) {
                            Ok(h) => cni_server = Some(h),
                            Err(e) => warn!(error = %e, "cannot take the CNI socket back"),
                        }
                    }
                    if stop_requested {
                        break;
                    }
                }
                give::Event::Ready { reports } => {
                    handed_over = Some(reports);
                    break;
                }
            },
            _ = sigterm.recv() => {
                if readiness.handing_over.load(Ordering::Relaxed) {
                    info!("SIGTERM while a successor takes over: stopping once it is ready");
                    stop_requested = true;
                    continue;
                }
                info!("SIGTERM: shutting down");
                break;
            }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
        }
        if std::mem::take(&mut retake_handover) {
            // The next successor must find this agent, or its restart is not hitless.
            match give::serve(&args.handover_socket) {
                Ok(rx) => successors = rx,
                Err(e) => warn!(error = %e,
                    "cannot take the handover socket back; the next restart will not be hitless"),
            }
        }
        readiness
            .pods_enrolled
            .store(pods.all_enrolled(&current.config), Ordering::Relaxed);
        let now = SystemTime::now();
        let certs_valid = secrets
            .snapshot()
            .iter()
            .all(|(_, c)| c.as_ref().is_some_and(|c| c.is_valid_at(now)));
        readiness.certs_valid.store(certs_valid, Ordering::Relaxed);
        // Serving from the first config on: the pods enrolled so far have their
        // listeners (one that cannot be enrolled must not keep the others closed).
        if heartbeat.is_none() && readiness.config_loaded.load(Ordering::Relaxed) {
            match Heartbeat::start(maps.clone()) {
                Ok(h) => heartbeat = Some(h),
                Err(e) => warn!(error = %e, "cannot start the heartbeat thread"),
            }
        }
        if readiness.not_ready_reason().is_none()
            && let Some(p) = previous.take()
        {
            // Both agents accept for a moment, then the previous one stops.
            pods.start_serving();
            let maps = maps.clone();
            let pid = p.pid;
            let told = p.ready(previous_status.clone(), move || {
                // Its id must not exempt whatever process gets it next.
                if let Err(e) = maps.set_previous_agent(0) {
                    warn!(error = %e, "cannot clear the previous agent's id");
                }
            });
            if let Err(e) = told {
                warn!(previous_pid = pid, error = %e, "cannot tell the previous agent this one is ready");
            }
        }
    }

    // A successor beats from now on; one that stops is a node without an agent.
    if let Some(h) = heartbeat.take() {
        h.stop();
    }
    if let Some(reports) = handed_over {
        readiness_task.abort();
        admin.stop_serving();
        pods.stop_accepting();
        proxy.draining.cancel();
        drain::run(
            &proxy,
            &reports,
            args.drain_timeout,
            &mut sigterm,
            &mut sigint,
        )
        .await;
        // Every pin stays for the successor: the datapath is dropped, not shut down.
        pods.shutdown();
        background.stop();
        secrets.shutdown();
        drop(proxy);
        drop(datapath);
        info!("handed over; agent stopped");
        return Ok(());
    }

    readiness.programs_attached.store(false, Ordering::Relaxed);
    admin.stop();
    pods.shutdown();
    background.stop();
    secrets.shutdown();
    let failed = config.stats.failed.load(Ordering::Relaxed);
    drop(proxy);
    datapath.shutdown();
    info!(config_reloads_failed = failed, "agent stopped");
    Ok(())
}

/// How often attaching is retried while it fails.
const RETRY_ATTACH: Duration = Duration::from_secs(1);

/// Loads and attaches the programs, retrying while the kernel side is not there yet
/// (a cgroup not created yet at boot, bpffs not mounted): the agent stays up and
/// not-ready instead of crash-looping. `None` when told to stop first.
async fn attach(
    args: &RunArgs,
    previous_agent: Option<u32>,
    sigterm: &mut tokio::signal::unix::Signal,
    sigint: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<Option<Datapath>> {
    let mut last_error = String::new();
    loop {
        let attempt = (|| -> anyhow::Result<Datapath> {
            let cgroup = match &args.cgroup {
                Some(c) => c.clone(),
                None => {
                    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")
                        .context("reading /proc/self/mountinfo")?;
                    bpf::cgroup2_mount(&mountinfo)
                        .context("no cgroup v2 mount found: the mesh needs cgroup v2")?
                }
            };
            bpf::ensure_bpffs(&args.bpffs)
                .with_context(|| format!("mounting bpffs at {}", args.bpffs.display()))?;
            let pin_dir: PathBuf = args.bpffs.join("mesh").join(&args.node_name);
            Datapath::load(
                &cgroup,
                &pin_dir,
                DatapathOptions {
                    sockmap: args.sockmap.is_on(),
                    sockmap_unread_limit: args.sockmap_unread_limit,
                    previous_agent,
                    sizes: crate::bpf::MapSizes::from_args(&args.bpf_map_sizes),
                },
            )
            .context("attaching the eBPF programs")
        })();
        match attempt {
            Ok(d) => return Ok(Some(d)),
            Err(e) => {
                let msg = format!("{e:#}");
                if msg != last_error {
                    warn!(error = %msg, retry_in = ?RETRY_ATTACH, "cannot attach the eBPF programs yet; not ready");
                    last_error = msg;
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_ATTACH) => {}
            _ = sigterm.recv() => { info!("SIGTERM before the programs were attached"); return Ok(None); }
            _ = sigint.recv() => { info!("SIGINT before the programs were attached"); return Ok(None); }
        }
    }
}

/// Duplicates of the node listeners, to hand over. A dup fails only when the agent
/// is out of descriptors; the successor then tries to bind that listener itself, and
/// says why it cannot.
fn dup_all(
    listeners: &[(NodeListener, std::os::fd::OwnedFd)],
) -> Vec<(NodeListener, std::os::fd::OwnedFd)> {
    listeners
        .iter()
        .filter_map(|(k, fd)| fd.try_clone().ok().map(|d| (*k, d)))
        .collect()
}

/// Names the pod a kernel event is about, from the pods this agent serves.
fn pod_resolver(proxy: &Arc<ProxyContext>) -> kernel_flows::PodResolver {
    let proxy = proxy.clone();
    Arc::new(move |cookie, ip| {
        let snap = proxy.snapshot.load();
        let local = &snap.local;
        let by_ip = local.get(&ip.to_canonical());
        let pod = by_ip.or_else(|| {
            local
                .values()
                .find(|p| p.netns_cookie == cookie && cookie != 0)
        });
        pod.map(|p| p.id.to_string())
    })
}

/// The same objects, allocation for allocation.
fn same<T>(a: &[Arc<T>], b: &[Arc<T>]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| Arc::ptr_eq(x, y))
}

/// Agent settings that shape how config is read.
struct Settings {
    trust_domain: String,
    root_namespace: String,
    /// Ports never held for protocol detection (the server speaks first).
    server_first_ports: Vec<u16>,
}

/// Applies one config generation: routes, workloads and policy first (so a captured
/// connection always finds its service), then open connections are re-checked against
/// the new policy, then the kernel's service map, then the pods.
///
/// A part whose objects are the same allocations as in `previous` (the config shares
/// unchanged objects between generations) is kept as it is: an endpoint change
/// rebuilds the route tables, not the workload index or the policy, and re-checks no
/// open connection.
async fn apply(
    generation: &Generation,
    previous: &Generation,
    settings: &Settings,
    proxy: &ProxyContext,
    pods: &mut PodManager,
) {
    let started = std::time::Instant::now();
    let (now, before) = (&generation.config, &previous.config);
    let snap = proxy.snapshot.load();
    // The snapshot's parts were built from `previous`, or nothing may be kept.
    let keep = |unchanged: bool| unchanged && snap.generation == previous.number;
    let policy_kept = keep(
        same(&now.peer_authentications, &before.peer_authentications)
            && same(&now.authorization_policies, &before.authorization_policies),
    );
    let policy = if policy_kept {
        snap.policy.clone()
    } else {
        PolicySet::build(now, &settings.root_namespace)
    };
    // A namespace's `mesh.dev/fail-open` is its Services' default.
    let namespaces_kept = same(&now.namespaces, &before.namespaces);
    let endpoints_kept = keep(
        same(&now.services, &before.services)
            && same(&now.endpoint_slices, &before.endpoint_slices)
            && namespaces_kept,
    );
    let routes = if endpoints_kept {
        snap.routes.clone()
    } else if snap.generation == previous.number && namespaces_kept {
        Arc::new(RouteTable::rebuild(before, now, &snap.routes))
    } else {
        Arc::new(RouteTable::build(now))
    };
    // The kernel's service map holds the ClusterIP:ports of the Services alone.
    let services_kept = keep(same(&now.services, &before.services) && namespaces_kept);
    let http = if endpoints_kept && same(&now.routes, &before.routes) {
        snap.http.clone()
    } else {
        let http = HttpRoutes::build(now, &settings.server_first_ports);
        for p in &http.problems {
            warn!(route = %p.route, kind = %p.kind, reason = p.reason, "{}", p.message);
        }
        Arc::new(http)
    };
    let workloads = if keep(same(&now.pods, &before.pods)) {
        snap.workloads.clone()
    } else {
        Arc::new(WorkloadIndex::build(now, &settings.trust_domain))
    };
    // The endpoints of fail-open services are in the kernel too.
    let kernel_kept = services_kept && (endpoints_kept || !routes.any_fail_open());
    let entries = (!kernel_kept).then(|| routes.service_entries());
    proxy.snapshot.publish_config(ConfigParts {
        generation: generation.number,
        routes,
        http,
        workloads,
        policy: policy.clone(),
    });
    if !policy_kept {
        let closed = proxy.live.reevaluate(&policy);
        if closed > 0 {
            info!(closed, "policy change closed open connections");
        }
    }
    let synced = match &entries {
        Some(entries) => proxy.maps.sync_services(entries),
        None => Ok(Default::default()),
    };
    match synced {
        Ok(sync) => {
            if sync.left_out_services > 0 || sync.left_out_backends > 0 {
                error!(
                    left_out_service_ports = sync.left_out_services,
                    left_out_backends = sync.left_out_backends,
                    "a kernel service map is full: the service ports left out are still \
                     captured and routed by the agent, but cannot fail open (raise \
                     --bpf-map-size services=N or backends=N)"
                );
            }
            info!(
                generation = generation.number,
                services = now.services.len(),
                added = sync.added,
                removed = sync.removed,
                // The agent's own work, and the whole way from the change's arrival at
                // the source (batching included), when the source knows it.
                apply_ms = started.elapsed().as_secs_f64() * 1e3,
                latency_ms = generation.since.map(|t| t.elapsed().as_secs_f64() * 1e3),
                "config applied"
            );
        }
        Err(e) => {
            error!(generation = generation.number, error = %e, "cannot update the kernel's service map")
        }
    }
    pods.reconcile(&generation.config, &policy).await;
}

/// The agent's background tasks (pool reaper, heap trimmer, kernel log and flow
/// readers), stopped together on either way out.
struct Background(Vec<tokio::task::JoinHandle<()>>);

impl Background {
    fn stop(self) {
        for t in self.0 {
            t.abort();
        }
    }
}

/// Closes idle tunnel connections, and those to an address whose expected identity
/// changed.
async fn reap_pool(proxy: Arc<ProxyContext>, idle_timeout: Duration) {
    let every = (idle_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(15));
    loop {
        tokio::time::sleep(every).await;
        proxy.app_conns.reap();
        let snap = proxy.snapshot.load();
        let workloads = &snap.workloads;
        let closed = proxy
            .pool
            .reap(|key| {
                workloads
                    .get(key.addr.ip())
                    .is_some_and(|w| w.meshed && w.identity == key.dest)
            })
            .await;
        if closed > 0 {
            tracing::debug!(
                closed,
                open = proxy.pool.connections(),
                "tunnel connections closed"
            );
        }
    }
}
