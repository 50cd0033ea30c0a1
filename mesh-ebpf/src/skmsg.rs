//! `sk_msg`: runs on every send of a socket in `MESH_SOCKETS` and puts the bytes
//! straight into the receive queue of the other end of the hop, skipping TCP/IP.
//!
//! A send is never dropped here: without a redirect the message takes the TCP path.
//! The receiver drains its sockmap queue before its TCP queue, so going from the
//! sockmap to TCP keeps bytes in order, and going back is safe only once the receiver
//! has read everything. Two things put a socket on TCP:
//!   - it writes before the kernel has finished the other end of the handshake. Those
//!     bytes were never counted, so it stays on TCP for good (`MESH_SOCK_FALLBACK`);
//!   - its receiver has more than the unread limit waiting (`MESH_SOCK_UNREAD`). The
//!     kernel puts no bound on a sockmap receive queue, so without this a reader that
//!     stalls would let its writer fill the node's TCP memory; on the TCP path the
//!     receive window pushes back as it always does. Every byte sent by either path
//!     is counted, so once the receiver's unread count is back to zero nothing is in
//!     flight and the socket returns to the sockmap.
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    helpers::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
};
use core::ptr::addr_of_mut;
use mesh_common::{SockFlow, SockKey, counters, remote_port_from_ctx, settings};

use crate::{
    addr::read_ip6,
    maps::{
        MESH_SOCK_FALLBACK, MESH_SOCK_IDS, MESH_SOCK_UNREAD, MESH_SOCKETS, add, count, setting,
    },
};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;

#[sk_msg]
pub fn mesh_sk_msg(ctx: SkMsgContext) -> u32 {
    let _ = redirect(&ctx);
    SK_PASS
}

#[inline(always)]
fn redirect(ctx: &SkMsgContext) -> Option<()> {
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
        let _ = MESH_SOCK_FALLBACK.insert(&own, &1, 0);
        count(counters::SOCKMAP_FALLBACK);
        return None;
    };
    let Some(flow) = flow_of(id, size) else {
        let _ = MESH_SOCK_FALLBACK.insert(&own, &1, 0);
        count(counters::SOCKMAP_FALLBACK);
        return None;
    };
    if !choose_sockmap(flow, size) {
        return None;
    }
    if MESH_SOCKETS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        count(counters::SOCKMAP_REDIRECTED);
        add(counters::SOCKMAP_REDIRECTED_BYTES, size as u64);
    } else {
        // The peer left the map (it closed): the bytes go by TCP, as charged.
        let _ = MESH_SOCK_FALLBACK.insert(&own, &1, 0);
        count(counters::SOCKMAP_FALLBACK);
    }
    Some(())
}

/// The receiver's flow record, charged with `size` (created on the first send).
#[inline(always)]
fn flow_of(id: u64, size: i64) -> Option<*mut SockFlow> {
    if let Some(flow) = MESH_SOCK_UNREAD.get_ptr_mut(&id) {
        // SAFETY: `unread` is the 8-byte aligned first field of a map value; the
        // receiver's guard subtracts from another CPU, hence the atomic add.
        unsafe { crate::atomic::add_i64(core::ptr::addr_of_mut!((*flow).unread), size) };
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

/// Whether this message (already charged) goes by the sockmap. Only this socket's
/// sends, serialised by its socket lock, write `on_tcp`.
#[inline(always)]
fn choose_sockmap(flow: *mut SockFlow, size: i64) -> bool {
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
            return true;
        }
        return false;
    }
    if unread > limit {
        // SAFETY: as above.
        unsafe { (*flow).on_tcp = 1 };
        count(counters::SOCKMAP_BACKPRESSURE);
        return false;
    }
    true
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
