//! Inbound enforcement for enrolled pods, attached to each pod's network namespace.
//!
//! A new TCP connection to a pod IP from another address (that is, from outside the
//! pod) that is not for the mTLS tunnel port is plaintext from outside the mesh. STRICT
//! refuses it (the kernel answers with a reset); PERMISSIVE hands it to the agent's
//! plaintext listener in the pod, which authorizes and counts it. Connections from
//! inside the pod (the agent delivering tunnelled traffic, the app to itself) come
//! from the pod's own address and pass untouched. (`ingress_ifindex` cannot tell: a
//! packet to a local address reports the device that address is on, not `lo`.)
use aya_ebpf::{
    bindings::{sk_action::SK_DROP, sk_action::SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use mesh_common::{
    FlowEvent, INBOUND_TUNNEL_PORT, InboundKey, MODE_PERMISSIVE, MODE_STRICT, PROTO_TCP, counters,
    events, v4_mapped,
};

use crate::{
    addr::read_ip6,
    maps::{MESH_INBOUND, MESH_PLAINTEXT_LISTENERS, count, emit},
};

const AF_INET: u32 = 2;

/// 127.0.0.0/8 (v4-mapped) or ::1.
#[inline(always)]
fn is_loopback(a: &[u8; 16]) -> bool {
    let mapped_127 =
        a[..10].iter().all(|b| *b == 0) && a[10] == 0xff && a[11] == 0xff && a[12] == 127;
    let v6_one = a[..15].iter().all(|b| *b == 0) && a[15] == 1;
    mapped_127 || v6_one
}

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands a valid context for the program's lifetime.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != PROTO_TCP as u32 || lookup.local_port == INBOUND_TUNNEL_PORT as u32 {
        return SK_PASS;
    }
    let (addr, remote) = if lookup.family == AF_INET {
        (
            v4_mapped(lookup.local_ip4.to_ne_bytes()),
            v4_mapped(lookup.remote_ip4.to_ne_bytes()),
        )
    } else {
        (read_ip6(&lookup.local_ip6), read_ip6(&lookup.remote_ip6))
    };
    if addr == remote || is_loopback(&remote) {
        return SK_PASS;
    }
    let key = InboundKey { addr };
    // SAFETY: read-only lookup of a plain value.
    let Some(policy) = (unsafe { MESH_INBOUND.get(&key) }) else {
        return SK_PASS;
    };
    let event = |kind| FlowEvent {
        kind,
        _pad: 0,
        netns_cookie: 0,
        src: remote,
        dst: addr,
        // remote_port is network byte order, local_port host order.
        src_port: u16::from_be(lookup.remote_port),
        dst_port: lookup.local_port as u16,
        _pad2: 0,
    };
    match policy.mode {
        MODE_STRICT => {
            count(counters::INBOUND_STRICT_REFUSED);
            emit(&event(events::REFUSED_STRICT));
            SK_DROP
        }
        MODE_PERMISSIVE => match MESH_PLAINTEXT_LISTENERS.redirect_sk_lookup(&ctx, key, 0) {
            Ok(()) => {
                count(counters::INBOUND_PLAINTEXT_CAPTURED);
                emit(&event(events::PLAINTEXT_CAPTURED));
                SK_PASS
            }
            Err(_) => {
                count(counters::INBOUND_NO_LISTENER);
                emit(&event(events::NO_LISTENER));
                SK_DROP
            }
        },
        _ => SK_PASS,
    }
}
