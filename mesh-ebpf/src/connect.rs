//! `connect4` / `connect6`: hand an enrolled pod's connection to a mesh service over to
//! the agent's outbound listener in the pod's own network namespace.
//!
//! A socket is redirected only when all hold: it is TCP, its netns is enrolled, it does
//! not carry the agent's bypass mark, and (ClusterIP, port, TCP) is a mesh service. The
//! original destination is recorded under the socket cookie (a stable id, not a kernel
//! pointer) for `getpeername` and for `sock_ops`, which re-keys it for the agent.
use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use core::ptr::addr_of_mut;
use mesh_common::{
    BYPASS_MARK, FlowEvent, OUTBOUND_PORT, OrigDst, PROTO_TCP, ServiceKey, counters, events,
};

use crate::{
    addr::{LOOPBACK_V4_MAPPED, LOOPBACK_V6, is_v4_mapped, read_ip6, write_ip6},
    maps::{MESH_ENROLLED_NETNS, MESH_SERVICES, MESH_SOCK_ORIG_DST, count, emit},
};

#[inline(always)]
fn event(kind: u32, netns_cookie: u64, dst: [u8; 16], dst_port: u16) -> FlowEvent {
    FlowEvent {
        kind,
        _pad: 0,
        netns_cookie,
        src: [0; 16],
        dst,
        src_port: 0,
        dst_port,
        _pad2: 0,
    }
}

/// Returned by every program here: the connect() goes ahead (rewritten or not).
const ALLOW: i32 = 1;

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context the kernel passed; fields are read as the verifier allows.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let dst = mesh_common::v4_mapped(ip.to_ne_bytes());
    if capture(&ctx, dst, port).is_some() {
        // SAFETY: user_ip4 and user_port are writable in connect4.
        unsafe {
            (*sa).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
            (*sa).user_port = u32::from(OUTBOUND_PORT.to_be());
        }
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as above.
    let (dst, port) = unsafe { (read_ip6(addr_of_mut!((*sa).user_ip6)), (*sa).user_port) };
    if capture(&ctx, dst, port).is_some() {
        // An IPv4-mapped destination goes out as IPv4, so it must land on the IPv4
        // listener; a real IPv6 destination lands on the [::1] listener.
        let lo = if is_v4_mapped(&dst) {
            &LOOPBACK_V4_MAPPED
        } else {
            &LOOPBACK_V6
        };
        // SAFETY: user_ip6 and user_port are writable in connect6.
        unsafe {
            write_ip6(addr_of_mut!((*sa).user_ip6), lo);
            (*sa).user_port = u32::from(OUTBOUND_PORT.to_be());
        }
    }
    ALLOW
}

/// Decides whether to redirect and, if so, records the original destination.
/// `dst` is 16 bytes in network order, `port_field` the raw `user_port` (network order).
#[inline(always)]
fn capture(ctx: &SockAddrContext, dst: [u8; 16], port_field: u32) -> Option<()> {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: reading context fields the verifier allows for sock_addr programs.
    let protocol = unsafe { (*sa).protocol };
    if protocol != u32::from(PROTO_TCP) {
        return None;
    }
    // SAFETY: helper valid for sock_addr programs (5.7+).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup; the value is not kept past this call.
    unsafe { MESH_ENROLLED_NETNS.get(&netns) }?;

    // SAFETY: `sk` is always a valid socket pointer in sock_addr programs; `mark` is a
    // readable field of bpf_sock.
    let mark = unsafe { (*(*sa).__bindgen_anon_1.sk).mark };
    let port = u16::from_be(port_field as u16);
    if mark == BYPASS_MARK {
        count(counters::BYPASS_MARK);
        emit(&event(events::BYPASSED, netns, dst, port));
        return None;
    }

    let key = ServiceKey {
        addr: dst,
        port,
        proto: PROTO_TCP,
        _pad: 0,
    };
    // SAFETY: read-only lookup.
    if unsafe { MESH_SERVICES.get(&key) }.is_none() {
        count(counters::NOT_A_SERVICE);
        return None;
    }

    // SAFETY: helper valid for sock_addr programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let orig = OrigDst {
        netns_cookie: netns,
        addr: dst,
        port,
        _pad: [0; 6],
    };
    if MESH_SOCK_ORIG_DST.insert(&cookie, &orig, 0).is_err() {
        // Without a record the agent could not route the connection: leave it alone
        // rather than hand the agent a connection it must refuse.
        count(counters::MAP_UPDATE_FAILED);
        return None;
    }
    count(counters::REDIRECTED);
    emit(&event(events::REDIRECTED, netns, dst, port));
    Some(())
}
