//! Wires the agent together: kernel programs, config, pods, proxies, readiness; and
//! takes it apart again on SIGTERM so that nothing is left in the kernel.
use std::{
    path::PathBuf,
    sync::{Arc, atomic::AtomicU64, atomic::Ordering},
    time::Duration,
};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    bpf::{self, Datapath},
    cli::RunArgs,
    config::{ConfigWatch, Generation},
    inpod::PodManager,
    proxy::ProxyContext,
    state::RouteTable,
    telemetry::{Readiness, serve_readiness},
};

/// How often pods that could not be enrolled (netns not there yet) are retried.
const RETRY_PODS: Duration = Duration::from_secs(1);

pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    raise_fd_limit();
    let readiness = Arc::new(Readiness::default());
    tokio::spawn({
        let readiness = readiness.clone();
        let addr = args.readiness_addr;
        async move {
            if let Err(e) = serve_readiness(addr, readiness).await {
                error!(%addr, error = %e, "readiness endpoint failed");
            }
        }
    });

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
    let datapath = Datapath::load(&cgroup, &pin_dir).context("attaching the eBPF programs")?;
    let maps = datapath.maps.clone();
    readiness.programs_attached.store(true, Ordering::Relaxed);

    let proxy = Arc::new(ProxyContext {
        routes: ArcSwap::from_pointee(RouteTable::default()),
        maps,
        connect_timeout: args.connect_timeout,
        next_conn_id: AtomicU64::new(1),
    });
    let mut pods = PodManager::new(args.node_name.clone(), proxy.clone());
    let mut config = ConfigWatch::start(args.config_dir.clone());
    let mut current: Arc<Generation> = config.updates.borrow().clone();

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut retry = tokio::time::interval(RETRY_PODS);
    info!(node = %args.node_name, config_dir = %args.config_dir.display(), "agent running");
    loop {
        tokio::select! {
            changed = config.updates.changed() => {
                if changed.is_err() {
                    error!("config watcher stopped");
                    break;
                }
                current = config.updates.borrow_and_update().clone();
                apply(&current, &proxy, &mut pods).await;
                readiness.config_loaded.store(current.number > 0, Ordering::Relaxed);
            }
            _ = retry.tick() => {
                if !pods.all_enrolled(&current.config) {
                    pods.reconcile(&current.config).await;
                }
            }
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
        }
        readiness
            .pods_enrolled
            .store(pods.all_enrolled(&current.config), Ordering::Relaxed);
    }

    readiness.programs_attached.store(false, Ordering::Relaxed);
    pods.shutdown();
    let failed = config.stats.failed.load(Ordering::Relaxed);
    drop(proxy);
    datapath.shutdown();
    info!(config_reloads_failed = failed, "agent stopped");
    Ok(())
}

/// Applies one config generation: routes first (so a captured connection always finds
/// its service), then the kernel's service map, then the pods.
async fn apply(generation: &Generation, proxy: &ProxyContext, pods: &mut PodManager) {
    let routes = RouteTable::build(&generation.config);
    let addrs = routes.service_addrs();
    proxy.routes.store(Arc::new(routes));
    match proxy.maps.sync_services(&addrs) {
        Ok((added, removed)) => info!(
            generation = generation.number,
            services = addrs.len(),
            added,
            removed,
            "config applied"
        ),
        Err(e) => {
            error!(generation = generation.number, error = %e, "cannot update the kernel's service map")
        }
    }
    pods.reconcile(&generation.config).await;
}

/// One connection costs the agent two fds (client and upstream); the default soft
/// limit of 1024 would cap it near 500 connections.
fn raise_fd_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                warn!(error = %e, "cannot raise the open file limit");
            }
        }
        Ok(_) => {}
        Err(e) => warn!(error = %e, "cannot read the open file limit"),
    }
}
