//! Typed access to the maps the agent owns. Each map sits behind its own lock: the
//! per-connection lookup must not wait for a config sync of the services map.
use std::{
    net::{IpAddr, SocketAddr},
    os::fd::AsRawFd,
    sync::Mutex,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray, SockHash},
};
use mesh_common::{
    AF_INET, AF_INET6, BackendKey, BackendValue, EnrolledNetns, ListenerKey, MAX_PROBE_PORTS,
    MODE_PERMISSIVE, MODE_STRICT, OrigDst, PROTO_TCP, PeerKey, SERVICE_FAIL_OPEN, ServiceKey,
    ServiceValue, SockFlow, SockKey, counters, limits, maps,
};

use std::sync::atomic::Ordering;

use super::datapath::DatapathError;

/// A (ClusterIP, port) the mesh captures; TCP only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ServiceAddr(pub SocketAddr);

impl ServiceAddr {
    fn key(&self) -> ServiceKey {
        ServiceKey {
            addr: ip16(self.0.ip()),
            port: self.0.port(),
            proto: PROTO_TCP,
            _pad: 0,
        }
    }
}

/// The 16-byte map form of an address (IPv4 mapped).
pub fn ip16(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// What the kernel knows of one service port: whether it fails open, and then the
/// endpoints it may connect to while no agent serves the node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServiceEntry {
    pub fail_open: bool,
    /// Ready endpoints (only written for a fail-open service; the first
    /// `limits::BACKENDS_PER_SERVICE`).
    pub backends: Vec<SocketAddr>,
}

/// The kernel's share of the services: what goes in the two maps, and how many
/// service ports and backends did not fit.
#[derive(Debug, Default)]
struct KernelServices {
    services: foldhash::HashMap<ServiceKey, ServiceValue>,
    backends: foldhash::HashMap<BackendKey, BackendValue>,
    left_out_services: usize,
    left_out_backends: usize,
}

/// The map entries of `desired` within the maps' sizes: service values, and the
/// backends of fail-open ones. When more service ports than `services_cap` are
/// wanted, the fail-open ones go first (the kernel entry is what lets them fail open;
/// any other service port is captured and routed by the agent all the same, in the map
/// or not), then in address order, so the same config always leaves out the same
/// ones. A fail-open service whose backends no longer fit keeps the ones that do.
fn service_entries(
    desired: &foldhash::HashMap<ServiceAddr, ServiceEntry>,
    services_cap: usize,
    backends_cap: usize,
) -> KernelServices {
    let mut out = KernelServices::default();
    let wanted_backends: usize = desired
        .values()
        .filter(|e| e.fail_open)
        .map(|e| e.backends.len().min(limits::BACKENDS_PER_SERVICE as usize))
        .sum();
    let mut order: Vec<(&ServiceAddr, &ServiceEntry)> = desired.iter().collect();
    if desired.len() > services_cap || wanted_backends > backends_cap {
        order.sort_by_key(|(addr, e)| (!e.fail_open, addr.0));
    }
    for (addr, entry) in order {
        if out.services.len() >= services_cap {
            out.left_out_services += 1;
            continue;
        }
        let key = addr.key();
        let mut n = 0u32;
        if entry.fail_open {
            for (i, b) in entry
                .backends
                .iter()
                .take(limits::BACKENDS_PER_SERVICE as usize)
                .enumerate()
            {
                if out.backends.len() >= backends_cap {
                    out.left_out_backends += 1;
                    continue;
                }
                out.backends.insert(
                    BackendKey {
                        service: key,
                        index: i as u32,
                    },
                    BackendValue {
                        addr: ip16(b.ip()),
                        port: b.port(),
                        _pad: [0; 6],
                    },
                );
                n += 1;
            }
        }
        let flags = if entry.fail_open {
            SERVICE_FAIL_OPEN
        } else {
            0
        };
        out.services
            .insert(key, ServiceValue { flags, backends: n });
    }
    out
}

/// The address back from its map form (IPv4-mapped becomes IPv4 again).
pub fn from_ip16(raw: [u8; 16]) -> IpAddr {
    IpAddr::V6(raw.into()).to_canonical()
}

/// Where the kubelet's probes of a pod come from and go to: plaintext that passes
/// to the application in either mode (see `mesh_common::is_probe`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Probes {
    /// The node's address toward the pod; `None`: no probe passes.
    pub source: Option<IpAddr>,
    /// The probed ports; the first [`MAX_PROBE_PORTS`] are kept.
    pub ports: Vec<u16>,
}

impl Probes {
    /// The map fields: (probe_src, probe_ports).
    fn raw(&self) -> ([u8; 16], [u16; MAX_PROBE_PORTS]) {
        let mut ports = [0u16; MAX_PROBE_PORTS];
        if self.source.is_none() {
            return ([0; 16], ports);
        }
        for (slot, p) in ports.iter_mut().zip(&self.ports) {
            *slot = *p;
        }
        (self.source.map(ip16).unwrap_or_default(), ports)
    }
}

/// The enrolled-netns entry of a pod.
fn enrolled_value(mode: InboundMode, own: &[IpAddr], probes: &Probes) -> EnrolledNetns {
    let mut slots = [[0u8; 16]; 2];
    for (slot, ip) in slots.iter_mut().zip(own) {
        *slot = ip16(*ip);
    }
    let (probe_src, probe_ports) = probes.raw();
    EnrolledNetns {
        mode: mode.raw(),
        _pad: 0,
        own: slots,
        probe_src,
        probe_ports,
    }
}

type Locked<K, V> = Mutex<HashMap<MapData, K, V>>;

/// Entries of a map, by walking its keys.
fn counted<K: aya::Pod, V: aya::Pod>(map: &Locked<K, V>) -> u64 {
    map.lock().unwrap_or_else(|p| p.into_inner()).keys().count() as u64
}

/// Entries of a map the agent alone writes: what it last wrote, or (before its
/// first sync) by walking the keys.
fn synced_or_counted<K: aya::Pod, V: aya::Pod>(
    synced: &Mutex<Option<foldhash::HashMap<K, V>>>,
    map: &Locked<K, V>,
) -> u64 {
    match &*synced.lock().unwrap_or_else(|p| p.into_inner()) {
        Some(s) => s.len() as u64,
        None => counted(map),
    }
}

pub struct MeshMaps {
    enrolled: Locked<u64, EnrolledNetns>,
    services: Locked<ServiceKey, ServiceValue>,
    /// What the services map holds, as the agent last wrote it (`None` until the
    /// first sync, which reads the kernel: a restarted agent adopts a pinned map).
    /// Only the agent writes that map, so a sync with the same set needs no system
    /// call, and a change touches only what changed (reading 10,000 keys back from
    /// the kernel on every config change cost more than the rest of the change).
    services_synced: Mutex<Option<foldhash::HashMap<ServiceKey, ServiceValue>>>,
    backends: Locked<BackendKey, BackendValue>,
    backends_synced: Mutex<Option<foldhash::HashMap<BackendKey, BackendValue>>>,
    heartbeat: Mutex<Array<MapData, u64>>,
    settings: Mutex<Array<MapData, u32>>,
    peers: Locked<PeerKey, OrigDst>,
    plaintext_listeners: Mutex<SockHash<MapData, ListenerKey>>,
    /// Read only: how many sockets are accelerated (for the fill report).
    sockets: SockHash<MapData, SockKey>,
    counters: PerCpuArray<MapData, u64>,
    /// Read only, to see whether a receiver the agent sends to has caught up.
    sock_ids: HashMap<MapData, SockKey, u64>,
    sock_unread: HashMap<MapData, u64, SockFlow>,
    /// Written only to send one of the agent's own sockets by TCP for good.
    sock_fallback: Locked<SockKey, u8>,
    /// The unread limit when sockmap acceleration is on.
    sockmap_limit: Option<u32>,
    /// The bounded maps' sizes.
    sizes: super::MapSizes,
    /// Service ports and backends the last sync left out, for the report.
    left_out: [std::sync::atomic::AtomicU64; 2],
}

/// How the kernel treats plaintext arriving at an enrolled pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InboundMode {
    /// Refused in the kernel.
    Strict,
    /// Handed to the agent's plaintext listener in the pod.
    Permissive,
}

impl InboundMode {
    fn raw(self) -> u32 {
        match self {
            InboundMode::Strict => MODE_STRICT,
            InboundMode::Permissive => MODE_PERMISSIVE,
        }
    }

    /// Anything but PERMISSIVE is STRICT, as the kernel reads it.
    fn from_raw(raw: u32) -> InboundMode {
        if raw == MODE_PERMISSIVE {
            InboundMode::Permissive
        } else {
            InboundMode::Strict
        }
    }
}

fn listener_key(netns_cookie: u64, ipv6: bool) -> ListenerKey {
    ListenerKey {
        netns_cookie,
        family: if ipv6 { AF_INET6 } else { AF_INET },
        _pad: 0,
    }
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, DatapathError>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let map = ebpf
        .take_map(name)
        .ok_or(DatapathError::MissingMap { name })?;
    T::try_from(map).map_err(|source| DatapathError::Map { name, source })
}

/// What a services sync did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ServiceSync {
    pub added: usize,
    pub removed: usize,
    /// Service ports the services map has no room for (still routed by the agent;
    /// they cannot fail open).
    pub left_out_services: usize,
    /// Fail-open backends the backends map has no room for.
    pub left_out_backends: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("map {map}: {source}")]
pub struct MapUpdateError {
    map: &'static str,
    source: aya::maps::MapError,
}

impl MeshMaps {
    pub(super) fn take(
        ebpf: &mut Ebpf,
        sockmap_limit: Option<u32>,
        sizes: super::MapSizes,
    ) -> Result<Self, DatapathError> {
        Ok(MeshMaps {
            enrolled: Mutex::new(take(ebpf, maps::ENROLLED_NETNS)?),
            services: Mutex::new(take(ebpf, maps::SERVICES)?),
            services_synced: Mutex::new(None),
            backends: Mutex::new(take(ebpf, maps::BACKENDS)?),
            backends_synced: Mutex::new(None),
            heartbeat: Mutex::new(take(ebpf, maps::HEARTBEAT)?),
            settings: Mutex::new(take(ebpf, maps::SETTINGS)?),
            peers: Mutex::new(take(ebpf, maps::PEER_ORIG_DST)?),
            plaintext_listeners: Mutex::new(take(ebpf, maps::PLAINTEXT_LISTENERS)?),
            sockets: take(ebpf, maps::SOCKETS)?,
            counters: take(ebpf, maps::COUNTERS)?,
            sock_ids: take(ebpf, maps::SOCK_IDS)?,
            sock_unread: take(ebpf, maps::SOCK_UNREAD)?,
            sock_fallback: Mutex::new(take(ebpf, maps::SOCK_FALLBACK)?),
            sockmap_limit,
            sizes,
            left_out: Default::default(),
        })
    }

    /// Enrolls the netns `netns_cookie`: from now on `connect4/6` capture in it and
    /// `sk_lookup` applies `mode` to every address of it. `own` are the pod's
    /// addresses (the first two are kept; connects to them stay in the pod), `probes`
    /// the kubelet's probes that pass to the application.
    pub fn enroll(
        &self,
        netns_cookie: u64,
        mode: InboundMode,
        own: &[IpAddr],
        probes: &Probes,
    ) -> Result<(), MapUpdateError> {
        let value = enrolled_value(mode, own, probes);
        let mut m = self.enrolled.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(netns_cookie, value, 0)
            .map_err(|source| MapUpdateError {
                map: maps::ENROLLED_NETNS,
                source,
            })
    }

    /// Changes the inbound mode of an enrolled netns in place (no window: the entry
    /// is overwritten, never removed).
    pub fn set_mode(&self, netns_cookie: u64, mode: InboundMode) -> Result<(), MapUpdateError> {
        let mut m = self.enrolled.lock().unwrap_or_else(|p| p.into_inner());
        let err = |source| MapUpdateError {
            map: maps::ENROLLED_NETNS,
            source,
        };
        let mut value = m.get(&netns_cookie, 0).map_err(err)?;
        value.mode = mode.raw();
        m.insert(netns_cookie, value, 0).map_err(err)
    }

    /// Changes the probes of an enrolled netns in place, as [`Self::set_mode`].
    pub fn set_probes(&self, netns_cookie: u64, probes: &Probes) -> Result<(), MapUpdateError> {
        let mut m = self.enrolled.lock().unwrap_or_else(|p| p.into_inner());
        let err = |source| MapUpdateError {
            map: maps::ENROLLED_NETNS,
            source,
        };
        let mut value = m.get(&netns_cookie, 0).map_err(err)?;
        (value.probe_src, value.probe_ports) = probes.raw();
        m.insert(netns_cookie, value, 0).map_err(err)
    }

    pub fn unenroll(&self, netns_cookie: u64) {
        let mut m = self.enrolled.lock().unwrap_or_else(|p| p.into_inner());
        // Not found is fine: the goal is that it is not there.
        let _ = m.remove(&netns_cookie);
    }

    /// The enrolled netns cookies and their modes (after a restart: what the previous
    /// agent left, which keeps being enforced until this one takes over).
    pub fn enrolled(&self) -> Vec<(u64, InboundMode)> {
        let m = self.enrolled.lock().unwrap_or_else(|p| p.into_inner());
        m.iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, InboundMode::from_raw(v.mode)))
            .collect()
    }

    /// Makes the services map hold exactly `desired`, as much of it as fits (see
    /// [`service_entries`]).
    pub fn sync_services(
        &self,
        desired: &foldhash::HashMap<ServiceAddr, ServiceEntry>,
    ) -> Result<ServiceSync, MapUpdateError> {
        use super::sizes::Sized;
        let fit = service_entries(
            desired,
            self.sizes.get(Sized::Services) as usize,
            self.sizes.get(Sized::Backends) as usize,
        );
        self.left_out[0].store(fit.left_out_services as u64, Ordering::Relaxed);
        self.left_out[1].store(fit.left_out_backends as u64, Ordering::Relaxed);
        let (want, want_backends) = (fit.services, fit.backends);
        let mut m = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let mut synced = self
            .services_synced
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // Forgotten until this sync completes: a failure half-way re-reads the kernel.
        let have: foldhash::HashMap<ServiceKey, ServiceValue> = match synced.take() {
            Some(have) => have,
            None => m.iter().filter_map(Result::ok).collect(),
        };
        // Removals first: a change that swaps service ports never needs room for
        // both, so a map sized for the config always takes it.
        let mut removed = 0;
        for key in have.keys().filter(|k| !want.contains_key(*k)) {
            let _ = m.remove(key);
            removed += 1;
        }
        // Backends next: a service's count never points past its entries (the
        // backends of services about to go are removed at the end).
        drop((m, synced));
        self.sync_backends(&want_backends, false)?;
        let mut m = self.services.lock().unwrap_or_else(|p| p.into_inner());
        let mut synced = self
            .services_synced
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut added = 0;
        for (key, value) in &want {
            if have.get(key) == Some(value) {
                continue;
            }
            m.insert(*key, *value, 0).map_err(|source| MapUpdateError {
                map: maps::SERVICES,
                source,
            })?;
            if !have.contains_key(key) {
                added += 1;
            }
        }
        *synced = Some(want);
        drop((m, synced));
        // Then the backends no service counts any more.
        self.sync_backends(&want_backends, true)?;
        Ok(ServiceSync {
            added,
            removed,
            left_out_services: fit.left_out_services,
            left_out_backends: fit.left_out_backends,
        })
    }

    /// Service ports and fail-open backends the last sync could not fit in the
    /// kernel's maps.
    fn left_out(&self) -> (u64, u64) {
        (
            self.left_out[0].load(Ordering::Relaxed),
            self.left_out[1].load(Ordering::Relaxed),
        )
    }

    /// Writes `want`'s backends that differ; with `remove`, also removes the others.
    fn sync_backends(
        &self,
        want: &foldhash::HashMap<BackendKey, BackendValue>,
        remove: bool,
    ) -> Result<(), MapUpdateError> {
        let mut m = self.backends.lock().unwrap_or_else(|p| p.into_inner());
        let mut synced = self
            .backends_synced
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut have: foldhash::HashMap<BackendKey, BackendValue> = match synced.take() {
            Some(have) => have,
            None => m.iter().filter_map(Result::ok).collect(),
        };
        for (key, value) in want {
            if have.get(key) != Some(value) {
                m.insert(*key, *value, 0).map_err(|source| MapUpdateError {
                    map: maps::BACKENDS,
                    source,
                })?;
                have.insert(*key, *value);
            }
        }
        if remove {
            have.retain(|key, _| {
                let keep = want.contains_key(key);
                if !keep {
                    let _ = m.remove(key);
                }
                keep
            });
        }
        *synced = Some(have);
        Ok(())
    }

    /// Writes one of `mesh_common::settings` (written first at load, before anything
    /// is attached; these are the changes at run time).
    pub fn set_setting(&self, index: u32, value: u32) -> Result<(), MapUpdateError> {
        self.settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set(index, value, 0)
            .map_err(|source| MapUpdateError {
                map: maps::SETTINGS,
                source,
            })
    }

    /// One of `mesh_common::settings` (0 if it cannot be read).
    pub fn setting(&self, index: u32) -> u32 {
        self.settings
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&index, 0)
            .unwrap_or(0)
    }

    /// Writes the thread group of the agent being taken over from (0 once it exited:
    /// its id must not exempt whatever process gets it next).
    pub fn set_previous_agent(&self, tgid: u32) -> Result<(), MapUpdateError> {
        self.set_setting(mesh_common::settings::PREVIOUS_AGENT_TGID, tgid)
    }

    /// A successor that took over this agent's listeners died before it was ready:
    /// this agent is the only one again, and the dead one's id exempts nothing.
    pub fn reclaim_agent_id(&self) -> Result<(), MapUpdateError> {
        self.set_setting(mesh_common::settings::AGENT_TGID, std::process::id())?;
        self.set_previous_agent(0)
    }

    /// Says the agent serves the node (see `mesh_common::agent_down`): now, on the
    /// clock `bpf_ktime_get_ns` reads.
    pub fn beat(&self) -> Result<(), MapUpdateError> {
        use nix::time::{ClockId, clock_gettime};
        // CLOCK_MONOTONIC does not fail on Linux; if it ever did, this beat is skipped
        // (the next one comes well within the kernel's staleness limit).
        let Ok(ts) = clock_gettime(ClockId::CLOCK_MONOTONIC) else {
            return Ok(());
        };
        let now = (ts.tv_sec() as u64) * 1_000_000_000 + ts.tv_nsec() as u64;
        self.heartbeat
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .set(0, now, 0)
            .map_err(|source| MapUpdateError {
                map: maps::HEARTBEAT,
                source,
            })
    }

    /// How full each sized map is, with what the last services sync left out. The
    /// maps the agent writes are counted from what it wrote; the ones the kernel
    /// writes (orig-dst, sockets) by walking their keys, which costs a system call per
    /// entry: sampled every few seconds, not per connection.
    pub fn fill(&self) -> Vec<super::fill::MapFill> {
        use super::sizes::Sized;
        let (services_left_out, backends_left_out) = self.left_out();
        [
            (
                Sized::Services,
                synced_or_counted(&self.services_synced, &self.services),
                services_left_out,
            ),
            (
                Sized::Backends,
                synced_or_counted(&self.backends_synced, &self.backends),
                backends_left_out,
            ),
            (Sized::OrigDst, counted(&self.peers), 0),
            (Sized::Sockets, self.sockets.keys().count() as u64, 0),
            (Sized::Pods, counted(&self.enrolled), 0),
        ]
        .into_iter()
        .map(|(map, entries, left_out)| super::fill::MapFill {
            map,
            entries,
            capacity: u64::from(self.sizes.get(map)),
            left_out,
        })
        .collect()
    }

    /// The original destination of a connection the agent accepted from `client` on a
    /// listener in the netns `netns_cookie`. The record is consumed.
    pub fn take_orig_dst(&self, netns_cookie: u64, client: SocketAddr) -> Option<SocketAddr> {
        let key = PeerKey {
            netns_cookie,
            addr: ip16(client.ip()),
            port: client.port(),
            _pad: [0; 6],
        };
        let mut m = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        let orig = m.get(&key, 0).ok()?;
        let _ = m.remove(&key);
        Some(SocketAddr::new(from_ip16(orig.addr), orig.port))
    }

    /// Registers the agent's plaintext listener in the netns `netns_cookie` for one
    /// address family. The kernel drops the entry by itself when the socket closes.
    pub fn set_plaintext_listener(
        &self,
        netns_cookie: u64,
        ipv6: bool,
        listener: &impl AsRawFd,
    ) -> Result<(), MapUpdateError> {
        let mut m = self
            .plaintext_listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        m.insert(listener_key(netns_cookie, ipv6), listener.as_raw_fd(), 0)
            .map_err(|source| MapUpdateError {
                map: maps::PLAINTEXT_LISTENERS,
                source,
            })
    }

    pub fn remove_plaintext_listeners(&self, netns_cookie: u64) {
        let mut m = self
            .plaintext_listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        for ipv6 in [false, true] {
            let _ = m.remove(&listener_key(netns_cookie, ipv6));
        }
    }

    /// The unread limit, when sockmap acceleration is on.
    pub fn sockmap_limit(&self) -> Option<u32> {
        self.sockmap_limit
    }

    /// Sends every later message of the agent's socket `own` by TCP (the `sk_msg`
    /// program passes a socket in `MESH_SOCK_FALLBACK` on at once). False if the map
    /// refused the entry.
    pub fn send_by_tcp(&self, own: &SockKey) -> bool {
        self.sock_fallback
            .lock()
            .map(|mut m| m.insert(own, 1, 0).is_ok())
            .unwrap_or(false)
    }

    /// Bytes the other end of the hop `own` (one of the agent's sockets) has not read
    /// yet, when both ends are in the sockmap.
    pub fn unread_by_peer(&self, own: &SockKey) -> Option<i64> {
        let id = self.sock_ids.get(&own.peer(), 0).ok()?;
        self.sock_unread.get(&id, 0).ok().map(|f| f.unread)
    }

    /// Kernel counters summed over CPUs, indexed by `mesh_common::counters`.
    pub fn counters(&self) -> [u64; counters::LEN as usize] {
        let mut out = [0u64; counters::LEN as usize];
        for (i, slot) in out.iter_mut().enumerate() {
            if let Ok(values) = self.counters.get(&(i as u32), 0) {
                *slot = values.iter().sum();
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(fail_open: bool, backends: usize) -> ServiceEntry {
        ServiceEntry {
            fail_open,
            backends: (0..backends)
                .map(|i| SocketAddr::from(([10, 244, 1, 10 + i as u8], 8080)))
                .collect(),
        }
    }

    fn addr(last: u8, port: u16) -> ServiceAddr {
        ServiceAddr(SocketAddr::from(([10, 96, 0, last], port)))
    }

    #[test]
    fn services_that_do_not_fit_are_left_out_fail_open_ones_last_and_always_the_same() {
        let mut desired = foldhash::HashMap::default();
        for i in 0..10u8 {
            desired.insert(addr(i, 80), entry(false, 0));
        }
        desired.insert(addr(200, 80), entry(true, 3));
        desired.insert(addr(201, 80), entry(true, 3));
        // Room for everything: nothing left out.
        let all = service_entries(&desired, 100, 100);
        assert_eq!((all.services.len(), all.backends.len()), (12, 6));
        assert_eq!((all.left_out_services, all.left_out_backends), (0, 0));
        // Room for 4 service ports: both fail-open ones, then the lowest addresses.
        let fit = service_entries(&desired, 4, 100);
        assert_eq!(fit.services.len(), 4);
        assert_eq!(fit.left_out_services, 8);
        for k in [addr(200, 80), addr(201, 80), addr(0, 80), addr(1, 80)] {
            assert!(fit.services.contains_key(&k.key()), "{k:?}");
        }
        let again = service_entries(&desired, 4, 100);
        assert_eq!(again.services, fit.services);
        // Room for 4 backends: the first service keeps 3, the second 1, counted so.
        let fit = service_entries(&desired, 100, 4);
        assert_eq!(fit.backends.len(), 4);
        assert_eq!(fit.left_out_backends, 2);
        let counts: Vec<u32> = [addr(200, 80), addr(201, 80)]
            .iter()
            .map(|a| fit.services[&a.key()].backends)
            .collect();
        assert_eq!(counts, [3, 1]);
        // Every count points at entries that exist.
        for (key, v) in &fit.services {
            for index in 0..v.backends {
                assert!(fit.backends.contains_key(&BackendKey {
                    service: *key,
                    index
                }));
            }
        }
    }

    #[test]
    fn the_entry_keeps_two_own_addresses_and_the_first_probe_ports() {
        let own: Vec<IpAddr> = ["10.244.1.5", "fd00::5", "10.9.9.9"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let probes = Probes {
            source: Some("10.244.1.1".parse().unwrap()),
            ports: (1..=10).collect(),
        };
        let v = enrolled_value(InboundMode::Strict, &own, &probes);
        assert_eq!(v.mode, MODE_STRICT);
        assert_eq!(v.own, [ip16(own[0]), ip16(own[1])]);
        assert_eq!(from_ip16(v.probe_src), probes.source.unwrap());
        assert_eq!(v.probe_ports, [1, 2, 3, 4, 5, 6, 7, 8]);
        // Without a source no port is kept: nothing can match a zero source anyway,
        // and the entry says plainly that no probe passes.
        let none = Probes {
            source: None,
            ports: vec![8080],
        };
        let v = enrolled_value(InboundMode::Permissive, &own[..1], &none);
        assert_eq!(v.probe_src, [0; 16]);
        assert_eq!(v.probe_ports, [0; MAX_PROBE_PORTS]);
        assert_eq!(v.own[1], [0; 16]);
    }
}
