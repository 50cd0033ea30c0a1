//! `connect4` / `connect6`: hand every TCP connection of an enrolled pod to the agent's
//! outbound listener in the pod's own network namespace.
//!
//! Whatever the pod dials is captured (a ClusterIP, another pod's IP, anything else):
//! the agent decides per connection what the destination is. Left alone are only
//! loopback, the pod's own addresses, and the agent's own sockets, which are known by
//! the bypass mark *and* the calling process being the agent (its thread group id, in
//! `MESH_SETTINGS`): a process in the pod that sets the mark is captured anyway. The
//! decision itself is `mesh_common::connect_verdict`, tested on the host.
//!
//! The original destination is recorded under the socket cookie (a stable id, not a
//! kernel pointer) for `getpeername` and for `sock_ops`, which re-keys it for the agent.
//! If it cannot be recorded the connect() is refused: an uncaptured connection would
//! be a way out of the mesh.
use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{
        bpf_get_current_pid_tgid, bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_ktime_get_ns,
    },
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use core::ptr::addr_of_mut;
use mesh_common::{
    AgentDown, BYPASS_MARK, BackendKey, ConnectVerdict, FlowEvent, OUTBOUND_PORT, OrigDst,
    PROTO_TCP, ServiceKey, agent_down, connect_verdict, counters, events, settings,
};

use aya_log_ebpf::debug;

use crate::{
    addr::{LOOPBACK_V4_MAPPED, LOOPBACK_V6, is_v4_mapped, read_ip6, write_ip6},
    klog,
    maps::{
        MESH_BACKENDS, MESH_ENROLLED_NETNS, MESH_HEARTBEAT, MESH_SERVICES, MESH_SOCK_ORIG_DST,
        count, emit, setting,
    },
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

/// The connect() goes ahead (rewritten or not).
const ALLOW: i32 = 1;
/// The connect() fails with EPERM.
const REFUSE: i32 = 0;

/// What to do with one connect().
enum Action {
    Leave,
    Redirect,
    Refuse,
    /// No agent serves the node and the destination is a fail-open service: connect
    /// straight to this endpoint (16-byte address, host-order port).
    Direct([u8; 16], u16),
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: `sa` is the context the kernel passed; fields are read as the verifier allows.
    let (ip, port) = unsafe { ((*sa).user_ip4, (*sa).user_port) };
    let dst = mesh_common::v4_mapped(ip.to_ne_bytes());
    match capture(&ctx, dst, port) {
        Action::Leave => ALLOW,
        Action::Refuse => REFUSE,
        Action::Redirect => {
            // SAFETY: user_ip4 and user_port are writable in connect4.
            unsafe {
                (*sa).user_ip4 = u32::from_ne_bytes([127, 0, 0, 1]);
                (*sa).user_port = u32::from(OUTBOUND_PORT.to_be());
            }
            ALLOW
        }
        // An IPv4 socket can only go to an IPv4 endpoint.
        Action::Direct(addr, port) if is_v4_mapped(&addr) => {
            // SAFETY: as above.
            unsafe {
                (*sa).user_ip4 = u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
                (*sa).user_port = u32::from(port.to_be());
            }
            ALLOW
        }
        Action::Direct(..) => REFUSE,
    }
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    // SAFETY: as above.
    let (dst, port) = unsafe { (read_ip6(addr_of_mut!((*sa).user_ip6)), (*sa).user_port) };
    match capture(&ctx, dst, port) {
        Action::Leave => ALLOW,
        Action::Refuse => REFUSE,
        Action::Redirect => {
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
            ALLOW
        }
        Action::Direct(addr, port) => {
            // SAFETY: as above.
            unsafe {
                write_ip6(addr_of_mut!((*sa).user_ip6), &addr);
                (*sa).user_port = u32::from(port.to_be());
            }
            ALLOW
        }
    }
}

/// Decides whether to redirect and, if so, records the original destination.
/// `dst` is 16 bytes in network order, `port_field` the raw `user_port` (network order).
#[inline(always)]
fn capture(ctx: &SockAddrContext, dst: [u8; 16], port_field: u32) -> Action {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: reading context fields the verifier allows for sock_addr programs.
    let protocol = unsafe { (*sa).protocol };
    if protocol != u32::from(PROTO_TCP) {
        return Action::Leave;
    }
    // SAFETY: helper valid for sock_addr programs (5.7+).
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: read-only lookup, read in place (no copy of the value on the stack).
    let Some(enrolled) = (unsafe { MESH_ENROLLED_NETNS.get(&netns) }) else {
        return Action::Leave;
    };

    // SAFETY: `sk` is always a valid socket pointer in sock_addr programs; `mark` is a
    // readable field of bpf_sock.
    let mark = unsafe { (*(*sa).__bindgen_anon_1.sk).mark };
    // The calling process (in the node's pid namespace), which a pod cannot choose.
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let port = u16::from_be(port_field as u16);
    match connect_verdict(
        enrolled,
        &dst,
        mark == BYPASS_MARK,
        tgid,
        [
            setting(settings::AGENT_TGID),
            setting(settings::PREVIOUS_AGENT_TGID),
        ],
    ) {
        ConnectVerdict::Agent => {
            count(counters::BYPASS_MARK);
            emit(&event(events::BYPASSED, netns, dst, port));
            if klog::on() {
                debug!(
                    ctx,
                    "netns={} bypass dst={:i} port={} (the agent's own)", netns, dst, port
                );
            }
            return Action::Leave;
        }
        ConnectVerdict::InPod => {
            count(counters::IN_POD);
            return Action::Leave;
        }
        ConnectVerdict::Capture { forged_mark } => {
            if forged_mark {
                count(counters::BYPASS_MARK_FORGED);
            }
        }
    }

    let key = ServiceKey {
        addr: dst,
        port,
        proto: PROTO_TCP,
        _pad: 0,
    };
    // SAFETY: read-only lookup, read in place.
    let service = unsafe { MESH_SERVICES.get(&key) };
    if service.is_none() {
        count(counters::NOT_A_SERVICE);
    }
    // SAFETY: helpers valid in sock_addr programs.
    let (now, random) = unsafe { (bpf_ktime_get_ns(), bpf_get_prandom_u32()) };
    let heartbeat = MESH_HEARTBEAT.get(0).copied().unwrap_or(0);
    match agent_down(heartbeat, now, service, random) {
        AgentDown::No => {}
        AgentDown::Open { index } => {
            let key = BackendKey {
                service: key,
                index,
            };
            // SAFETY: read-only lookup.
            if let Some(b) = unsafe { MESH_BACKENDS.get(&key) } {
                count(counters::FAIL_OPEN);
                emit(&event(events::FAIL_OPEN, netns, dst, port));
                if klog::on() {
                    debug!(
                        ctx,
                        "netns={} fail_open dst={:i} port={} (no agent)", netns, dst, port
                    );
                }
                return Action::Direct(b.addr, b.port);
            }
            count(counters::AGENT_DOWN_REFUSED);
            emit(&event(events::AGENT_DOWN, netns, dst, port));
            return Action::Refuse;
        }
        AgentDown::Closed => {
            // Fail closed: refused at once (EPERM) rather than sent to a listener
            // that is gone or does not accept.
            count(counters::AGENT_DOWN_REFUSED);
            emit(&event(events::AGENT_DOWN, netns, dst, port));
            if klog::on() {
                debug!(
                    ctx,
                    "netns={} refuse dst={:i} port={} reason=agent_down", netns, dst, port
                );
            }
            return Action::Refuse;
        }
    }

    let mut orig = OrigDst {
        netns_cookie: netns,
        addr: dst,
        port,
        _pad: [0; 6],
    };
    // SAFETY: `sk` of a sock_addr context is a full socket. A socket that connects
    // again (after a failed attempt) keeps its storage: overwrite it.
    let slot = unsafe { MESH_SOCK_ORIG_DST.get_or_insert_ptr_mut(ctx, Some(&mut orig)) };
    if slot.is_null() {
        // Without a record the agent could not route the connection, and letting it
        // out uncaptured would be a bypass: refuse it.
        count(counters::MAP_UPDATE_FAILED);
        if klog::on() {
            debug!(
                ctx,
                "netns={} refuse dst={:i} port={} reason=no_record", netns, dst, port
            );
        }
        return Action::Refuse;
    }
    // SAFETY: non-null storage of this socket, sized for an OrigDst.
    unsafe { *slot = orig };
    count(counters::REDIRECTED);
    emit(&event(events::REDIRECTED, netns, dst, port));
    if klog::on() {
        debug!(ctx, "netns={} redirect dst={:i} port={}", netns, dst, port);
    }
    Action::Redirect
}
