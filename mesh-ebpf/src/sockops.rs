//! `sock_ops`: when a redirected connection is established, re-key its original
//! destination by what the agent sees on the accepted socket (pod netns, client
//! address, client port). The source port is only known once the kernel has bound it,
//! which is why `connect4/6` cannot write this record itself.
//!
//! ACTIVE_ESTABLISHED runs on the client as it processes the SYN-ACK, before it sends
//! the final ACK, so the record exists before the agent can accept the connection.
//!
//! Both ESTABLISHED callbacks also offer the socket to the sockmap (see `sockmap`).
use aya_ebpf::{
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB,
    },
    helpers::generated::bpf_sk_storage_get,
    macros::sock_ops,
    programs::SockOpsContext,
};
use core::ptr::addr_of_mut;
use mesh_common::{AF_INET, AF_INET6, OrigDst, PeerKey, counters};

use crate::{
    addr::read_ip6,
    maps::{MESH_PEER_ORIG_DST, MESH_SOCK_ORIG_DST, count},
};

#[sock_ops]
pub fn mesh_sock_ops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => {
            record_peer(&ctx);
            crate::sockmap::offer(&ctx, true);
        }
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            crate::sockmap::offer(&ctx, false);
        }
        // Only sockets `offer` took ask for state callbacks.
        BPF_SOCK_OPS_STATE_CB => {
            crate::sockmap::forget(&ctx);
        }
        _ => {}
    }
    1
}

#[inline(always)]
fn record_peer(ctx: &SockOpsContext) -> Option<()> {
    // SAFETY: reading the context's socket pointer, which may be null.
    let sk = unsafe { (*ctx.ops).__bindgen_anon_2.sk };
    if sk.is_null() {
        return None;
    }
    // SAFETY: helper valid for sock_ops programs on a non-null socket; no storage is
    // created (flags 0). The map pointer is the map's own definition, as aya's
    // wrappers pass it.
    let slot = unsafe {
        bpf_sk_storage_get(
            core::ptr::from_ref(&MESH_SOCK_ORIG_DST).cast_mut().cast(),
            sk.cast(),
            core::ptr::null_mut(),
            0,
        )
    }
    .cast::<OrigDst>();
    if slot.is_null() {
        return None;
    }
    // SAFETY: non-null storage of this socket, sized for an OrigDst; copied out.
    let orig = unsafe { *slot };
    let addr = match ctx.family() {
        AF_INET => mesh_common::v4_mapped(ctx.local_ip4().to_ne_bytes()),
        // SAFETY: local_ip6 is a readable 4-word field of the context.
        AF_INET6 => read_ip6(unsafe { addr_of_mut!((*ctx.ops).local_ip6) }),
        _ => return None,
    };
    let key = PeerKey {
        netns_cookie: orig.netns_cookie,
        addr,
        port: ctx.local_port() as u16,
        _pad: [0; 6],
    };
    if MESH_PEER_ORIG_DST.insert(&key, &orig, 0).is_err() {
        count(counters::MAP_UPDATE_FAILED);
    }
    Some(())
}
