//! Which sockets join the sockmap, and under which key.
//!
//! Only the two hops between an application and the agent inside a pod's network
//! namespace are accelerated, never traffic the mesh does not own:
//!   outbound: the app's socket to 127.0.0.1:15001 and the agent's accepted end;
//!   delivery: the agent's socket (bypass mark) to the app on the pod IP, and the
//!             app's accepted end (local and remote address both the pod IP).
//! Both ends of one connection share a network namespace, so `sk_msg` finds the peer
//! by swapping the ends of the key.
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_SOCK_OPS_STATE_CB_FLAG, BPF_TCP_CLOSE},
    helpers::bpf_get_netns_cookie,
    programs::SockOpsContext,
};
use core::ptr::addr_of_mut;
use mesh_common::{
    AF_INET, AF_INET6, BYPASS_MARK, OUTBOUND_PORT, SockKey, SockSending, counters, is_loopback16,
    remote_port_from_ctx, settings,
};

use crate::{
    addr::read_ip6,
    maps::{
        MESH_ENROLLED_NETNS, MESH_SOCK_FALLBACK, MESH_SOCK_IDS, MESH_SOCK_SENDING,
        MESH_SOCK_UNREAD, MESH_SOCKETS, count, enabled,
    },
};

/// Puts an established socket into `MESH_SOCKETS` when it is one end of a pod-agent hop.
#[inline(always)]
pub fn offer(ctx: &SockOpsContext, active: bool) -> Option<()> {
    if !enabled(settings::SOCKMAP) {
        return None;
    }
    let key = key_of(ctx)?;
    // SAFETY: read-only lookup.
    unsafe { MESH_ENROLLED_NETNS.get(&key.netns_cookie) }?;
    let loopback = is_loopback16(&key.local_addr) && is_loopback16(&key.remote_addr);
    if !is_mesh_hop(ctx, &key, loopback, active) {
        return None;
    }
    // Which end is the agent's: it accepts the loopback hop and dials the pod IP one.
    let agent = loopback != active;
    // Marks left by an earlier connection with the same four-tuple, or an earlier
    // socket at the same address, must not keep this one off the fast path.
    let _ = MESH_SOCK_FALLBACK.remove(&key);
    // SAFETY: `sk` is a (nullable) socket pointer field of bpf_sock_ops.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // The socket's address names it for the unread and sending counts (see skmsg);
    // counts left by an earlier socket at the same address start over.
    let id = sk as u64;
    let _ = MESH_SOCK_UNREAD.remove(&id);
    // Its records must die with it (`forget`): the guards run on every socket of the
    // node, and a socket that is not a mesh hop, allocated later at this address,
    // would otherwise charge a stale receiver with all it sends, or drain a stale count
    // with all it reads.
    if ctx
        .set_cb_flags(ctx.cb_flags() as i32 | BPF_SOCK_OPS_STATE_CB_FLAG as i32)
        .is_err()
    {
        count(counters::SOCKMAP_ADD_FAILED);
        return None;
    }
    let sending = SockSending {
        charged: 0,
        receiver: 0,
        paced: u32::from(agent),
        _pad: 0,
    };
    if MESH_SOCK_SENDING.insert(&id, &sending, 0).is_err() {
        count(counters::SOCKMAP_ADD_FAILED);
        return None;
    }
    if MESH_SOCK_IDS.insert(&key, &id, 0).is_err() {
        count(counters::SOCKMAP_ADD_FAILED);
        return None;
    }
    let mut key = key;
    // SAFETY: `ops` is the context the kernel passed to this sock_ops program.
    match MESH_SOCKETS.update(&mut key, unsafe { &mut *ctx.ops }, u64::from(BPF_ANY)) {
        Ok(()) => count(counters::SOCKMAP_ADDED),
        Err(_) => count(counters::SOCKMAP_ADD_FAILED),
    }
    Some(())
}

/// A socket that joined the sockmap closes (state callback, asked for by `offer`):
/// its sending and unread records, and its key's id and fallback mark, go with it.
/// Before this, they outlived it, and the node-wide send and receive guards applied
/// them to whatever socket the kernel allocated at the same address next: a bulk
/// sender there charged a live receiver with every byte it sent (an unread count of
/// +2^29 that never came down, and the agent waiting on it), a reader drained a count
/// it was never charged (-2^28).
#[inline(always)]
pub fn forget(ctx: &SockOpsContext) -> Option<()> {
    if ctx.arg(1) != BPF_TCP_CLOSE {
        return None;
    }
    // SAFETY: `sk` is a (nullable) socket pointer field of bpf_sock_ops.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    let id = sk as u64;
    let _ = MESH_SOCK_SENDING.remove(&id);
    let _ = MESH_SOCK_UNREAD.remove(&id);
    let key = key_of(ctx)?;
    // A newer socket with the same four-tuple keeps its own entry.
    // SAFETY: read-only lookup; the value is copied out.
    if unsafe { MESH_SOCK_IDS.get(&key) }.copied() == Some(id) {
        let _ = MESH_SOCK_IDS.remove(&key);
        let _ = MESH_SOCK_FALLBACK.remove(&key);
    }
    Some(())
}

#[inline(always)]
fn is_mesh_hop(ctx: &SockOpsContext, key: &SockKey, loopback: bool, active: bool) -> bool {
    if loopback {
        // The app dialled the agent's outbound listener, or the agent accepted it.
        return if active {
            key.remote_port == OUTBOUND_PORT
        } else {
            key.local_port == OUTBOUND_PORT
        };
    }
    if key.local_addr != key.remote_addr {
        return false;
    }
    // Pod IP to pod IP: the agent's delivery dial carries the bypass mark; the app's
    // accepted end cannot tell who dialled it, but its peer is only in the map when
    // it is the agent, so anything else simply stays on the TCP path.
    !active || has_bypass_mark(ctx)
}

#[inline(always)]
fn has_bypass_mark(ctx: &SockOpsContext) -> bool {
    // SAFETY: `sk` is a (nullable) socket pointer field of bpf_sock_ops; `mark` is a
    // readable field of bpf_sock.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: checked for null above.
    unsafe { (*sk).mark == BYPASS_MARK }
}

#[inline(always)]
fn key_of(ctx: &SockOpsContext) -> Option<SockKey> {
    // SAFETY: helper valid for sock_ops programs (5.15+).
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let (local_addr, remote_addr) = match ctx.family() {
        AF_INET => (
            mesh_common::v4_mapped(ctx.local_ip4().to_ne_bytes()),
            mesh_common::v4_mapped(ctx.remote_ip4().to_ne_bytes()),
        ),
        // SAFETY: local_ip6 and remote_ip6 are readable 4-word fields of the context.
        AF_INET6 => unsafe {
            (
                read_ip6(addr_of_mut!((*ctx.ops).local_ip6)),
                read_ip6(addr_of_mut!((*ctx.ops).remote_ip6)),
            )
        },
        _ => return None,
    };
    Some(SockKey {
        netns_cookie,
        local_addr,
        remote_addr,
        local_port: ctx.local_port() as u16,
        remote_port: remote_port_from_ctx(ctx.remote_port()),
        _pad: 0,
    })
}
