//! The maps, named as in `mesh_common::maps` (the static's name is the map's name).
use aya_ebpf::{
    btf_maps::SkStorage,
    macros::{btf_map, map},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use mesh_common::{
    BackendKey, BackendValue, EnrolledNetns, FlowEvent, ListenerKey, OrigDst, PeerKey, ServiceKey,
    ServiceValue, SockFlow, SockKey, SockSending, counters, limits, settings,
};

#[map]
pub static MESH_ENROLLED_NETNS: HashMap<u64, EnrolledNetns> =
    HashMap::with_max_entries(limits::ENROLLED_NETNS, 0);

#[map]
pub static MESH_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(limits::SERVICES, 0);

/// Socket-local storage: the record lives and dies with the socket, so no other pod's
/// churn can push it out (an LRU shared by the node's pods could), and nothing is left
/// behind when the socket closes.
#[btf_map]
pub static MESH_SOCK_ORIG_DST: SkStorage<OrigDst> = SkStorage::new();

#[map]
pub static MESH_PEER_ORIG_DST: LruHashMap<PeerKey, OrigDst> =
    LruHashMap::with_max_entries(limits::PEER_ORIG_DST, 0);

#[map]
pub static MESH_PLAINTEXT_LISTENERS: SockHash<ListenerKey> =
    SockHash::with_max_entries(limits::PLAINTEXT_LISTENERS, 0);

#[map]
pub static MESH_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::LEN, 0);

#[inline(always)]
pub fn count(index: u32) {
    add(index, 1);
}

#[inline(always)]
pub fn add(index: u32, n: u64) {
    if let Some(slot) = MESH_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; programs do not migrate while running.
        unsafe { *slot += n };
    }
}

#[map]
pub static MESH_SOCKETS: SockHash<SockKey> = SockHash::with_max_entries(limits::SOCKETS, 0);

#[map]
pub static MESH_SOCK_FALLBACK: LruHashMap<SockKey, u8> =
    LruHashMap::with_max_entries(limits::SOCK_FALLBACK, 0);

#[map]
pub static MESH_SOCK_IDS: LruHashMap<SockKey, u64> =
    LruHashMap::with_max_entries(limits::SOCKETS, 0);

#[map]
pub static MESH_SOCK_UNREAD: LruHashMap<u64, SockFlow> =
    LruHashMap::with_max_entries(limits::SOCK_UNREAD, 0);

/// Adds `delta` to the unread count of the receiving socket `id`, if it has a record,
/// and returns the record.
#[inline(always)]
pub fn add_unread(id: u64, delta: i64) -> Option<*mut SockFlow> {
    let flow = MESH_SOCK_UNREAD.get_ptr_mut(&id)?;
    // SAFETY: `unread` is the 8-byte aligned first field of a live map value. Atomic:
    // senders add and the receiver's guard subtracts, from different CPUs.
    unsafe { crate::atomic::add_i64(core::ptr::addr_of_mut!((*flow).unread), delta) };
    Some(flow)
}

#[map]
pub static MESH_SOCK_SENDING: LruHashMap<u64, SockSending> =
    LruHashMap::with_max_entries(limits::SOCK_SENDING, 0);

#[map]
pub static MESH_SETTINGS: Array<u32> = Array::with_max_entries(settings::LEN, 0);

#[map]
pub static MESH_BACKENDS: HashMap<BackendKey, BackendValue> =
    HashMap::with_max_entries(limits::BACKENDS, 0);

#[map]
pub static MESH_HEARTBEAT: Array<u64> = Array::with_max_entries(1, 0);

/// A value from [`MESH_SETTINGS`] (0 when unset).
#[inline(always)]
pub fn setting(index: u32) -> u32 {
    MESH_SETTINGS.get(index).copied().unwrap_or(0)
}

/// Whether a switch in [`MESH_SETTINGS`] is on (the agent writes them before it
/// attaches anything).
#[inline(always)]
pub fn enabled(index: u32) -> bool {
    MESH_SETTINGS.get(index).is_some_and(|v| *v != 0)
}

#[map]
pub static MESH_EVENTS: RingBuf = RingBuf::with_byte_size(limits::EVENTS_BYTES, 0);

/// Sends a flow event to the agent while someone observes (`settings::FLOW_EVENTS`);
/// a full buffer is counted, never silent.
#[inline(always)]
pub fn emit(event: &FlowEvent) {
    if !enabled(settings::FLOW_EVENTS) {
        return;
    }
    if MESH_EVENTS.output::<FlowEvent>(event, 0).is_err() {
        count(counters::EVENTS_DROPPED);
    }
}
