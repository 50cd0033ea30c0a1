//! Loading, attaching and pinning the kernel programs, and taking them away again.
//!
//! Layout under the per-node pin directory:
//!   <pin_dir>/maps/<MAP>     every map, so bpftool and a restarted agent can see them
//!   <pin_dir>/links/<prog>   every cgroup link
//!   <pin_dir>/links/mesh_sk_lookup-<netns cookie>   the inbound program of each enrolled pod
//!   <pin_dir>/layout-<hash>/ an empty directory naming the map layout of the pins
//!                            (bpffs holds no regular files)
//! A clean shutdown removes all of it, which detaches the programs (a link lives as long
//! as a pin or an fd refers to it). After a crash or a restart the new agent *adopts*
//! what is pinned: it opens the same maps (so every enrolled netns keeps its mode and
//! STRICT never lapses), attaches its own programs next to the old ones and only then
//! replaces the old links' pins. Pins of another map layout (an incompatible upgrade)
//! are removed first, and that is logged.
use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, RingBuf, SockHash},
    programs::{
        CgroupAttachMode, CgroupSockAddr, RawTracePoint, SkLookup, SkMsg, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use mesh_common::{SockKey, counters, programs, settings};
use tracing::{debug, info, warn};

use super::maps::MeshMaps;
use crate::telemetry::kernel_log::{KernelLog, PodByNetns};

#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("cannot open cgroup {}: {source}", path.display())]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot prepare pin directory {}: {source}", path.display())]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("program {name}: link: {source}")]
    Link {
        name: &'static str,
        source: aya::programs::links::LinkError,
    },
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("pinning {what}: {source}")]
    Pin {
        what: String,
        source: aya::pin::PinError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("map {name} of the eBPF object is not in mesh_common::maps::ALL")]
    UnlistedMap { name: String },
}

/// The kernel object, as compiled by build.rs from `mesh-ebpf`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

const SOCK_ADDR_PROGRAMS: [&str; 4] = [
    programs::CONNECT4,
    programs::CONNECT6,
    programs::GETPEERNAME4,
    programs::GETPEERNAME6,
];

/// Choices made when the programs are loaded.
#[derive(Debug, Clone, Copy)]
pub struct DatapathOptions {
    /// Accelerate the pod-agent hops with sock_ops + sk_msg (see mesh-ebpf `sockmap`).
    pub sockmap: bool,
    /// Unread bytes a receiver may hold from sk_msg before its sender moves to TCP.
    pub sockmap_unread_limit: u32,
    /// The agent this one takes over from (its pid), still running: its sockets stay
    /// exempt from capture until it exits.
    pub previous_agent: Option<u32>,
    /// Entries of the bounded maps.
    pub sizes: super::MapSizes,
}

/// The loaded and attached data path. Dropping it without [`Datapath::shutdown`] leaves
/// the pins (and so the programs) in place, as after a crash.
pub struct Datapath {
    /// Owns the program and map fds; also attaches the per-pod inbound program.
    pub inbound: std::sync::Arc<InboundHook>,
    links: Vec<PinnedLink>,
    pin_dir: PathBuf,
    pub maps: std::sync::Arc<MeshMaps>,
    /// The flow event ring buffer, for the one reader that takes it.
    pub events: Option<RingBuf<MapData>>,
    /// Names of the programs attached to the cgroup, and the per-pod one.
    pub programs: Vec<&'static str>,
    /// The programs' own log records, for the one reader that takes them.
    pub kernel_log: Option<aya_log::EbpfLogger<KernelLog>>,
    /// How that reader names the pod of a record (set once the pods are known).
    pub kernel_log_pods: std::sync::Arc<std::sync::OnceLock<PodByNetns>>,
}

/// The inbound enforcement program (sk_lookup), one instance per enrolled pod's
/// network namespace: the program cannot ask which netns it runs in, so each
/// instance is loaded with its pod's netns cookie as a constant. Every instance uses
/// the pinned maps. Each link is pinned like the cgroup links, so a crashed agent
/// leaves STRICT pods refusing plaintext (fail closed) until it is back.
pub struct InboundHook {
    /// The main object: owns the fds of the maps and the cgroup programs.
    _main: std::sync::Mutex<Ebpf>,
    map_dir: PathBuf,
    link_dir: PathBuf,
    /// One load of the object at a time (each opens every pinned map).
    loading: std::sync::Mutex<()>,
    sizes: super::MapSizes,
}

/// The sk_lookup program attached to one pod's netns, held through its pin.
pub struct PodInboundLink {
    link: PinnedLink,
}

impl PodInboundLink {
    /// Removes the pin; the program detaches once the last fd (this one) is dropped.
    pub fn detach(self) {
        match self.link.unpin() {
            Ok(fd_link) => drop(fd_link),
            Err(e) => warn!(error = %e, "cannot unpin the inbound link"),
        }
    }
}

impl InboundHook {
    /// Attaches the inbound program to a pod's netns and pins the link. A link an
    /// earlier agent pinned for the same netns is replaced only once the new one is
    /// attached: the netns is never without enforcement.
    pub fn attach(&self, netns: &File, netns_cookie: u64) -> Result<PodInboundLink, DatapathError> {
        let name = programs::SK_LOOKUP;
        let prog_err = |source| DatapathError::Program { name, source };
        let _one = self.loading.lock().unwrap_or_else(|p| p.into_inner());
        // No kernel BTF: sk_lookup needs no relocation, and the parse is the largest
        // allocation the agent would make.
        let mut loader = EbpfLoader::new();
        loader
            .btf(None)
            .override_global(programs::SK_LOOKUP_NETNS_GLOBAL, &netns_cookie, true);
        for map in mesh_common::maps::ALL {
            loader.map_pin_path(map, self.map_dir.join(map));
        }
        for (map, n) in self.sizes.max_entries() {
            loader.map_max_entries(map, n);
        }
        let mut ebpf = loader.load(OBJECT)?;
        let prog: &mut SkLookup = ebpf
            .program_mut(name)
            .ok_or(DatapathError::MissingProgram { name })?
            .try_into()
            .map_err(prog_err)?;
        prog.load().map_err(prog_err)?;
        let id = prog.attach(netns).map_err(prog_err)?;
        let link = FdLink::from(prog.take_link(id).map_err(prog_err)?);
        let pin = self.link_dir.join(format!("{name}-{netns_cookie}"));
        let link = replace_pin(link, &pin)?;
        Ok(PodInboundLink { link })
    }

    /// Removes the pinned inbound links of netns not in `live` (left by an earlier
    /// agent for pods that are gone). Returns how many.
    pub fn remove_stale(&self, live: &std::collections::HashSet<u64>) -> usize {
        let prefix = format!("{}-", programs::SK_LOOKUP);
        let Ok(entries) = std::fs::read_dir(&self.link_dir) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name();
            let Some(cookie) = name
                .to_str()
                .and_then(|n| n.strip_prefix(&prefix))
                .and_then(|c| c.parse::<u64>().ok())
            else {
                continue;
            };
            if !live.contains(&cookie) && std::fs::remove_file(entry.path()).is_ok() {
                removed += 1;
            }
        }
        removed
    }
}

/// Pins `link` at `pin`, replacing (and so detaching) whatever link was pinned there
/// only after the new one is attached.
fn replace_pin(link: FdLink, pin: &Path) -> Result<PinnedLink, DatapathError> {
    let pin_err = |source| DatapathError::Pin {
        what: format!("link {}", pin.display()),
        source,
    };
    // bpffs refuses names with a dot.
    let mut fresh = pin.as_os_str().to_owned();
    fresh.push("_new");
    let fresh = PathBuf::from(fresh);
    let _ = std::fs::remove_file(&fresh);
    let pinned = link.pin(&fresh).map_err(pin_err)?;
    // rename(2) on bpffs swaps the pins atomically; the old link loses its last
    // reference and detaches.
    std::fs::rename(&fresh, pin).map_err(|source| DatapathError::PinDir {
        path: pin.to_owned(),
        source,
    })?;
    // The PinnedLink remembers the path it was pinned at; open the final one.
    drop(pinned);
    PinnedLink::from_pin(pin).map_err(|source| DatapathError::Link {
        name: programs::SK_LOOKUP,
        source,
    })
}

impl Datapath {
    pub fn load(
        cgroup: &Path,
        pin_dir: &Path,
        options: DatapathOptions,
    ) -> Result<Datapath, DatapathError> {
        let pin_err = |path: &Path| {
            let path = path.to_owned();
            move |source| DatapathError::PinDir { path, source }
        };
        let layout = pin_dir.join(format!("layout-{:016x}", layout_hash(&options.sizes)));
        if layout.is_dir() {
            info!(pins = %pin_dir.display(), "adopting the kernel state an earlier agent left");
        } else {
            if pin_dir.exists() {
                warn!(pins = %pin_dir.display(),
                    "pinned maps have another layout (or none); starting from empty maps");
            }
            remove_pins(pin_dir).map_err(pin_err(pin_dir))?;
        }
        let link_dir = pin_dir.join("links");
        let map_dir = pin_dir.join("maps");
        std::fs::create_dir_all(&link_dir).map_err(pin_err(&link_dir))?;
        std::fs::create_dir_all(&map_dir).map_err(pin_err(&map_dir))?;
        std::fs::create_dir_all(&layout).map_err(pin_err(&layout))?;

        let cgroup_file = File::open(cgroup).map_err(|source| DatapathError::Cgroup {
            path: cgroup.to_owned(),
            source,
        })?;
        // EbpfLoader::new() reads the kernel's BTF once; Ebpf::load would read a second
        // copy while the first is still alive, and that peak stays in the agent's RSS.
        // Every map is opened from its pin when there is one, else created and pinned.
        let mut loader = EbpfLoader::new();
        let pins: Vec<(&'static str, PathBuf)> = mesh_common::maps::ALL
            .iter()
            .map(|name| (*name, map_dir.join(name)))
            .collect();
        for (name, path) in &pins {
            loader.map_pin_path(name, path.as_path());
        }
        for (map, n) in options.sizes.max_entries() {
            loader.map_max_entries(map, n);
        }
        let mut ebpf = loader.load(OBJECT)?;
        // A map missing from the list would be created anew by every per-pod load.
        if let Some((name, _)) = ebpf
            .maps()
            .find(|(n, _)| !n.starts_with('.') && !mesh_common::maps::ALL.contains(n))
        {
            return Err(DatapathError::UnlistedMap {
                name: name.to_owned(),
            });
        }

        // aya attaches through bpf_link (kernel 5.7+). A cgroup link always coexists
        // with other programs on the same cgroup (systemd's, a CNI's) and the kernel
        // rejects any attach flag on it, so the mode must be the default (flags 0).
        let mode = CgroupAttachMode::Single;
        let mut links = Vec::new();
        let mut attached = Vec::new();
        // The recvmsg guard and sk_msg go in before sock_ops can put any socket into
        // the map (a socket takes the map's programs when it joins, not later), and
        // the switch is turned on last. Without the guard there is no bound on what a
        // stalled receiver queues, so no guard means no sockmap.
        let mut sockmap = false;
        if options.sockmap {
            let guards = [
                (programs::RECV_GUARD, programs::RECV_GUARD_TARGET),
                (programs::SEND_GUARD, programs::SEND_GUARD_TARGET),
            ];
            let mut guard_links = Vec::new();
            for (name, target) in guards {
                match attach_guard(&mut ebpf, name, target) {
                    Ok(link) => guard_links.push((name, link)),
                    Err(e) => {
                        warn!(error = %e,
                            "sockmap acceleration off: an unread-bytes guard cannot attach");
                        break;
                    }
                }
            }
            if guard_links.len() == guards.len() {
                for (name, link) in guard_links {
                    links.push(pin_link(link, &link_dir, name)?);
                    attached.push(name);
                }
                attach_sk_msg(&mut ebpf)?;
                attached.push(programs::SK_MSG);
                sockmap = true;
            }
        }
        write_settings(
            &mut ebpf,
            sockmap,
            options.sockmap_unread_limit,
            options.previous_agent.unwrap_or(0),
        )?;
        for name in SOCK_ADDR_PROGRAMS {
            let prog_err = |source| DatapathError::Program { name, source };
            let prog: &mut CgroupSockAddr = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram { name })?
                .try_into()
                .map_err(prog_err)?;
            prog.load().map_err(prog_err)?;
            let id = prog.attach(&cgroup_file, mode).map_err(prog_err)?;
            let link = FdLink::try_from(prog.take_link(id).map_err(prog_err)?)
                .map_err(|source| DatapathError::Link { name, source })?;
            links.push(pin_link(link, &link_dir, name)?);
            attached.push(name);
        }
        {
            let name = programs::SOCK_OPS;
            let prog_err = |source| DatapathError::Program { name, source };
            let prog: &mut SockOps = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram { name })?
                .try_into()
                .map_err(prog_err)?;
            prog.load().map_err(prog_err)?;
            let id = prog.attach(&cgroup_file, mode).map_err(prog_err)?;
            let link = FdLink::try_from(prog.take_link(id).map_err(prog_err)?)
                .map_err(|source| DatapathError::Link { name, source })?;
            links.push(pin_link(link, &link_dir, name)?);
            attached.push(name);
        }

        {
            let name = programs::SK_LOOKUP;
            let prog_err = |source| DatapathError::Program { name, source };
            let prog: &mut SkLookup = ebpf
                .program_mut(name)
                .ok_or(DatapathError::MissingProgram { name })?
                .try_into()
                .map_err(prog_err)?;
            prog.load().map_err(prog_err)?;
        }

        let kernel_log_pods = std::sync::Arc::new(std::sync::OnceLock::new());
        let kernel_log = match aya_log::EbpfLogger::init_with_logger(
            &mut ebpf,
            KernelLog::new(kernel_log_pods.clone()),
        ) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!(error = %e, "no kernel log (AYA_LOGS)");
                None
            }
        };
        let limit = sockmap.then_some(options.sockmap_unread_limit);
        let maps = std::sync::Arc::new(MeshMaps::take(&mut ebpf, limit, options.sizes)?);
        let events = match ebpf.take_map(mesh_common::maps::EVENTS) {
            Some(m) => Some(RingBuf::try_from(m).map_err(|source| DatapathError::Map {
                name: mesh_common::maps::EVENTS,
                source,
            })?),
            None => None,
        };
        attached.push(programs::SK_LOOKUP);
        info!(cgroup = %cgroup.display(), pins = %pin_dir.display(), programs = ?attached,
            "eBPF programs attached");
        Ok(Datapath {
            inbound: std::sync::Arc::new(InboundHook {
                _main: std::sync::Mutex::new(ebpf),
                map_dir: map_dir.clone(),
                link_dir,
                loading: std::sync::Mutex::new(()),
                sizes: options.sizes,
            }),
            links,
            pin_dir: pin_dir.to_owned(),
            maps,
            events,
            programs: attached,
            kernel_log,
            kernel_log_pods,
        })
    }

    /// Where the maps are pinned (for read-only inspection).
    pub fn map_dir(&self) -> PathBuf {
        self.pin_dir.join("maps")
    }

    /// Detaches every program and removes every pin and the pin directory.
    pub fn shutdown(self) {
        let Datapath {
            inbound,
            links,
            pin_dir,
            maps,
            events,
            programs: _,
            kernel_log,
            kernel_log_pods: _,
        } = self;
        drop(kernel_log);
        drop(events);
        let c = maps.counters();
        let summary: Vec<String> = counters::NAMES
            .iter()
            .zip(c.iter())
            .map(|(name, n)| format!("{name}={n}"))
            .collect();
        info!(counters = %summary.join(" "), "kernel counters");
        for link in links {
            match link.unpin() {
                // Dropping the last fd of an unpinned link detaches the program.
                Ok(fd_link) => drop(fd_link),
                Err(e) => warn!(error = %e, "cannot unpin link"),
            }
        }
        drop(maps);
        drop(inbound);
        if let Err(e) = remove_pins(&pin_dir) {
            warn!(dir = %pin_dir.display(), error = %e, "cannot remove pins");
        }
        info!(pins = %pin_dir.display(), "eBPF programs detached and unpinned");
    }
}

/// Writes the switches the programs read from `MESH_SETTINGS`.
fn write_settings(
    ebpf: &mut Ebpf,
    sockmap: bool,
    unread_limit: u32,
    previous_agent: u32,
) -> Result<(), DatapathError> {
    let name = mesh_common::maps::SETTINGS;
    let map_err = |source| DatapathError::Map { name, source };
    let mut map: Array<&mut MapData, u32> = ebpf
        .map_mut(name)
        .ok_or(DatapathError::MissingMap { name })?
        .try_into()
        .map_err(map_err)?;
    map.set(settings::SOCKMAP_UNREAD_LIMIT, unread_limit, 0)
        .map_err(map_err)?;
    // The one process whose marked sockets are not captured: this agent.
    // The previous agent first: from the moment this agent's id replaces its own,
    // both must be exempt.
    map.set(settings::PREVIOUS_AGENT_TGID, previous_agent, 0)
        .map_err(map_err)?;
    map.set(settings::AGENT_TGID, std::process::id(), 0)
        .map_err(map_err)?;
    map.set(settings::SOCKMAP, u32::from(sockmap), 0)
        .map_err(map_err)
}

/// Loads and attaches one of the raw tracepoints that keep the sockmap's unread
/// counts true: what receivers read, what senders really sent.
fn attach_guard(
    ebpf: &mut Ebpf,
    name: &'static str,
    target: &str,
) -> Result<FdLink, DatapathError> {
    let prog_err = |source| DatapathError::Program { name, source };
    let prog: &mut RawTracePoint = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?
        .try_into()
        .map_err(prog_err)?;
    prog.load().map_err(prog_err)?;
    let id = prog.attach(target).map_err(prog_err)?;
    Ok(prog.take_link(id).map_err(prog_err)?.into())
}

/// Attaches sk_msg to `MESH_SOCKETS`. The attachment belongs to the map: it goes when
/// the map goes (a clean shutdown, or the next start replacing the pins).
fn attach_sk_msg(ebpf: &mut Ebpf) -> Result<(), DatapathError> {
    let name = programs::SK_MSG;
    let map_name = mesh_common::maps::SOCKETS;
    let prog_err = |source| DatapathError::Program { name, source };
    let map_fd = {
        let map: SockHash<&MapData, SockKey> = ebpf
            .map(map_name)
            .ok_or(DatapathError::MissingMap { name: map_name })?
            .try_into()
            .map_err(|source| DatapathError::Map {
                name: map_name,
                source,
            })?;
        map.fd().try_clone().map_err(|e| DatapathError::Program {
            name,
            source: aya::programs::ProgramError::IOError(e),
        })?
    };
    let prog: &mut SkMsg = ebpf
        .program_mut(name)
        .ok_or(DatapathError::MissingProgram { name })?
        .try_into()
        .map_err(prog_err)?;
    prog.load().map_err(prog_err)?;
    prog.attach(&map_fd).map_err(prog_err)?;
    Ok(())
}

fn pin_link(link: FdLink, dir: &Path, name: &'static str) -> Result<PinnedLink, DatapathError> {
    replace_pin(link, &dir.join(name))
}

/// Names the layout of every map: pins made with another layout cannot be adopted.
/// FNV-1a over the map names, the sizes of every key and value type and the limits.
fn layout_hash(entries: &super::MapSizes) -> u64 {
    use mesh_common::*;
    use std::mem::size_of;
    let sizes = [
        size_of::<EnrolledNetns>(),
        size_of::<ListenerKey>(),
        size_of::<ServiceKey>(),
        size_of::<ServiceValue>(),
        size_of::<BackendKey>(),
        size_of::<BackendValue>(),
        size_of::<OrigDst>(),
        size_of::<PeerKey>(),
        size_of::<SockKey>(),
        size_of::<SockFlow>(),
        size_of::<SockSending>(),
        size_of::<FlowEvent>(),
    ];
    let limits = [
        limits::ENROLLED_NETNS,
        limits::SERVICES,
        limits::PEER_ORIG_DST,
        limits::PLAINTEXT_LISTENERS,
        limits::EVENTS_BYTES,
        limits::SOCKETS,
        limits::BACKENDS,
        counters::LEN,
        settings::LEN,
    ];
    let text = format!(
        "v3 maps={} sizes={sizes:?} limits={limits:?} entries={:?}",
        mesh_common::maps::ALL.join(","),
        entries.max_entries()
    );
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Removes a pin directory tree. On bpffs, unlinking a pin drops the kernel reference:
/// a stale link pin removed here detaches the program it held.
fn remove_pins(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {
            debug!(dir = %dir.display(), "removed pins");
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}
