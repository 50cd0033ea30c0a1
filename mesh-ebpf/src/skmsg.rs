//! `sk_msg`: runs on every send of a socket in `MESH_SOCKETS` and puts the bytes
//! straight into the receive queue of the other end of the hop, skipping TCP/IP.
//!
//! The kernel puts no bound on a sockmap receive queue, so a reader that stalls would
//! let its writer fill the node's memory. Every byte sent by either path is counted
//! against the receiver (`MESH_SOCK_UNREAD`: charged here, set to what the call
//! really sent by the send guard, taken off by the recvmsg guard as it is read), and
//! a receiver more than the unread limit behind holds its sender back:
//!   - the agent's own socket stays on the sockmap: the agent holds itself back (it
//!     sends at most the limit before it looks up this count, and waits while the
//!     receiver is behind). Its bytes never take the TCP path behind bytes still in
//!     the sockmap queue: a reader that takes a short read for "drained" (tokio,
//!     nginx) would not be woken for the TCP bytes behind them;
//!   - an application's socket cannot be made to wait, so it moves to TCP, where the
//!     receive window pushes back. The receiver (the agent) drains its sockmap queue
//!     before its TCP queue and reads until EAGAIN, so bytes stay in order, and the
//!     socket returns to the sockmap once the receiver has read everything.
//!
//! A socket that writes before the kernel has finished the other end of the handshake
//! has bytes that were never counted, so it stays on TCP for good
//! (`MESH_SOCK_FALLBACK`).
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    helpers::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
};
use core::ptr::addr_of_mut;
use mesh_common::{AF_INET, AF_INET6, SockFlow, SockKey, counters, remote_port_from_ctx, settings};

use crate::{
    addr::read_ip6,
    maps::{
        MESH_SOCK_FALLBACK, MESH_SOCK_IDS, MESH_SOCK_SENDING, MESH_SOCK_UNREAD, MESH_SOCKETS, add,
        add_unread, count, setting,
    },
};

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    // SK_DROP is never returned: the kernel keeps a drop verdict for every later send
    // of the socket, so refusing one send would refuse them all.
    let _ = redirect(&ctx);
    SK_PASS
}

/// Where one message goes.
enum Path {
    /// Straight into the receiver's queue.
    Sockmap,
    /// Through TCP/IP, as without the mesh.
    Tcp,
}

#[inline(always)]
fn redirect(ctx: &SkMsgContext) -> Option<Path> {
    let own = key_of(ctx)?;
    // SAFETY: read-only lookup.
    if unsafe { MESH_SOCK_FALLBACK.get(&own) }.is_some() {
        return None;
    }
    let size = i64::from(ctx.size());
    let mut peer = own.peer();
    // SAFETY: read-only lookup; the value is copied out.
    let Some(id) = (unsafe { MESH_SOCK_IDS.get(&peer) }).copied() else {
        // The other end is not established yet (or never joined): TCP for good.
        return fall_back(&own);
    };
    // Without its own records (evicted) a socket cannot have its charges corrected
    // after the call, so its receiver could never be seen caught up: TCP for good.
    // SAFETY: read-only lookup; the value is copied out.
    let Some(own_id) = (unsafe { MESH_SOCK_IDS.get(&own) }).copied() else {
        return fall_back(&own);
    };
    let Some(sending) = MESH_SOCK_SENDING.get_ptr_mut(&own_id) else {
        return fall_back(&own);
    };
    let Some(flow) = flow_of(id, size) else {
        return fall_back(&own);
    };
    // SAFETY: a live map value. `charged` is its 8-byte aligned first field; the send
    // guard takes it back from another context, hence the atomic add. A socket has
    // one peer for its life, so `receiver` is written with the same value each time.
    let paced = unsafe {
        crate::atomic::add_i64(core::ptr::addr_of_mut!((*sending).charged), size);
        (*sending).receiver = id;
        (*sending).paced != 0
    };
    let path = choose(flow, size, paced);
    if !matches!(path, Path::Sockmap) {
        return Some(path);
    }
    if MESH_SOCKETS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        count(counters::SOCKMAP_REDIRECTED);
        add(counters::SOCKMAP_REDIRECTED_BYTES, size as u64);
        Some(Path::Sockmap)
    } else {
        // The peer left the map (it closed): the bytes go by TCP, as charged.
        fall_back(&own)
    }
}

#[inline(always)]
fn fall_back(own: &SockKey) -> Option<Path> {
    let _ = MESH_SOCK_FALLBACK.insert(own, &1, 0);
    count(counters::SOCKMAP_FALLBACK);
    Some(Path::Tcp)
}

/// The receiver's flow record, charged with `size` (created on the first send).
#[inline(always)]
fn flow_of(id: u64, size: i64) -> Option<*mut SockFlow> {
    if let Some(flow) = add_unread(id, size) {
        return Some(flow);
    }
    let first = SockFlow {
        unread: size,
        on_tcp: 0,
        _pad: 0,
    };
    MESH_SOCK_UNREAD.insert(&id, &first, 0).ok()?;
    MESH_SOCK_UNREAD.get_ptr_mut(&id)
}

/// The path of this message (already charged). Only this socket's sends, serialised
/// by its socket lock, write `on_tcp`.
#[inline(always)]
fn choose(flow: *mut SockFlow, size: i64, paced: bool) -> Path {
    let limit = i64::from(setting(settings::SOCKMAP_UNREAD_LIMIT));
    // SAFETY: a live map value; `unread` may change under us (the receiver reads),
    // which can only make this check a message late.
    let (unread, on_tcp) = unsafe {
        (
            core::ptr::read_volatile(core::ptr::addr_of!((*flow).unread)),
            (*flow).on_tcp,
        )
    };
    if on_tcp != 0 {
        // Everything sent before this message has been read: no byte is in flight on
        // either path, so the sockmap cannot overtake the TCP queue.
        if unread - size <= 0 {
            // SAFETY: as above.
            unsafe { (*flow).on_tcp = 0 };
            count(counters::SOCKMAP_RESUMED);
            return Path::Sockmap;
        }
        return Path::Tcp;
    }
    if paced {
        // The agent sends up to the limit, then looks up this count and waits while
        // its receiver is more than half the limit behind.
        if unread > limit / 2 {
            count(counters::SOCKMAP_PACED);
        }
        return Path::Sockmap;
    }
    if unread > limit {
        // SAFETY: as above.
        unsafe { (*flow).on_tcp = 1 };
        count(counters::SOCKMAP_BACKPRESSURE);
        return Path::Tcp;
    }
    Path::Sockmap
}

#[inline(always)]
fn key_of(ctx: &SkMsgContext) -> Option<SockKey> {
    let md = ctx.msg;
    // SAFETY: helper valid for sk_msg programs (5.15+).
    let netns_cookie = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    // SAFETY: reading fields of the sk_msg_md context the verifier allows.
    let (family, lport, rport) = unsafe { ((*md).family, (*md).local_port, (*md).remote_port) };
    let (local_addr, remote_addr) = match family {
        // SAFETY: as above.
        AF_INET => unsafe {
            (
                mesh_common::v4_mapped((*md).local_ip4.to_ne_bytes()),
                mesh_common::v4_mapped((*md).remote_ip4.to_ne_bytes()),
            )
        },
        // SAFETY: 4-word fields of the context.
        AF_INET6 => unsafe {
            (
                read_ip6(addr_of_mut!((*md).local_ip6)),
                read_ip6(addr_of_mut!((*md).remote_ip6)),
            )
        },
        _ => return None,
    };
    Some(SockKey {
        netns_cookie,
        local_addr,
        remote_addr,
        local_port: lport as u16,
        remote_port: remote_port_from_ctx(rport),
        _pad: 0,
    })
}
