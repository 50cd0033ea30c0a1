//! Inbound enforcement for enrolled pods, attached to each pod's network namespace.
//!
//! A new TCP connection to a pod IP that did not come in over loopback (that is, from
//! outside the pod) and is not for the mTLS tunnel port is plaintext from outside the
//! mesh. STRICT refuses it (the kernel answers with a reset); PERMISSIVE hands it to the
//! agent's plaintext listener in the pod, which authorizes and counts it. Connections
//! from inside the pod (the agent delivering tunnelled traffic, the app to itself)
//! arrive over loopback and pass untouched.
use aya_ebpf::{
    bindings::{sk_action::SK_DROP, sk_action::SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use mesh_common::{
    INBOUND_TUNNEL_PORT, InboundKey, MODE_PERMISSIVE, MODE_STRICT, PROTO_TCP, counters,
    v4_mapped,
};

use crate::{
    addr::read_ip6,
    maps::{MESH_INBOUND, MESH_PLAINTEXT_LISTENERS, count},
};

/// The loopback device's ifindex, the same in every network namespace.
const LOOPBACK_IFINDEX: u32 = 1;
const AF_INET: u32 = 2;

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands a valid context for the program's lifetime.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != PROTO_TCP as u32
        || lookup.ingress_ifindex == LOOPBACK_IFINDEX
        || lookup.local_port == INBOUND_TUNNEL_PORT as u32
    {
        return SK_PASS;
    }
    let addr = if lookup.family == AF_INET {
        v4_mapped(lookup.local_ip4.to_ne_bytes())
    } else {
        read_ip6(&lookup.local_ip6)
    };
    let key = InboundKey { addr };
    // SAFETY: read-only lookup of a plain value.
    let Some(policy) = (unsafe { MESH_INBOUND.get(&key) }) else {
        return SK_PASS;
    };
    match policy.mode {
        MODE_STRICT => {
            count(counters::INBOUND_STRICT_REFUSED);
            SK_DROP
        }
        MODE_PERMISSIVE => match MESH_PLAINTEXT_LISTENERS.redirect_sk_lookup(&ctx, key, 0) {
            Ok(()) => {
                count(counters::INBOUND_PLAINTEXT_CAPTURED);
                SK_PASS
            }
            Err(_) => {
                count(counters::INBOUND_NO_LISTENER);
                SK_DROP
            }
        },
        _ => SK_PASS,
    }
}
