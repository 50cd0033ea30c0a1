//! The maps, named as in `mesh_common::maps` (the static's name is the map's name).
use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray, RingBuf, SockHash},
};
use mesh_common::{
    EnrolledNetns, FlowEvent, InboundKey, InboundPolicy, OrigDst, PeerKey, ServiceKey,
    ServiceValue, counters, limits,
};

#[map]
pub static MESH_ENROLLED_NETNS: HashMap<u64, EnrolledNetns> =
    HashMap::with_max_entries(limits::ENROLLED_NETNS, 0);

#[map]
pub static MESH_SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::with_max_entries(limits::SERVICES, 0);

#[map]
pub static MESH_SOCK_ORIG_DST: LruHashMap<u64, OrigDst> =
    LruHashMap::with_max_entries(limits::SOCK_ORIG_DST, 0);

#[map]
pub static MESH_PEER_ORIG_DST: LruHashMap<PeerKey, OrigDst> =
    LruHashMap::with_max_entries(limits::PEER_ORIG_DST, 0);

#[map]
pub static MESH_INBOUND: HashMap<InboundKey, InboundPolicy> =
    HashMap::with_max_entries(limits::INBOUND, 0);

#[map]
pub static MESH_PLAINTEXT_LISTENERS: SockHash<InboundKey> =
    SockHash::with_max_entries(limits::INBOUND, 0);

#[map]
pub static MESH_COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::LEN, 0);

#[inline(always)]
pub fn count(index: u32) {
    if let Some(slot) = MESH_COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot; programs do not migrate while running.
        unsafe { *slot += 1 };
    }
}

#[map]
pub static MESH_EVENTS: RingBuf = RingBuf::with_byte_size(limits::EVENTS_BYTES, 0);

/// Sends a flow event to the agent; a full buffer is counted, never silent.
#[inline(always)]
pub fn emit(event: &FlowEvent) {
    if MESH_EVENTS.output::<FlowEvent>(event, 0).is_err() {
        count(counters::EVENTS_DROPPED);
    }
}
