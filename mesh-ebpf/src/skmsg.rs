//! `sk_msg`: runs on every send of a socket in `MESH_SOCKETS` and puts the bytes
//! straight into the receive queue of the other end of the hop, skipping TCP/IP.
//!
//! A send is never dropped here: without a peer the message takes the normal TCP path.
//! Once one message of a socket has taken the TCP path, every later one does too
//! (`MESH_SOCK_FALLBACK`): the receiver drains its sockmap queue before its TCP queue,
//! so switching paths mid-stream could reorder bytes. That happens only when an app
//! writes before the kernel has finished the other end of the handshake.
use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    helpers::bpf_get_netns_cookie,
    macros::sk_msg,
    programs::SkMsgContext,
};
use core::ptr::addr_of_mut;
use mesh_common::{SockKey, counters, remote_port_from_ctx};

use crate::{
    addr::read_ip6,
    maps::{MESH_SOCK_FALLBACK, MESH_SOCKETS, add, count},
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
    let size = ctx.size();
    let mut peer = own.peer();
    if MESH_SOCKETS.redirect_msg(ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        count(counters::SOCKMAP_REDIRECTED);
        add(counters::SOCKMAP_REDIRECTED_BYTES, u64::from(size));
    } else {
        let _ = MESH_SOCK_FALLBACK.insert(&own, &1, 0);
        count(counters::SOCKMAP_FALLBACK);
    }
    Some(())
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
