//! Inbound enforcement for enrolled pods, attached to each pod's network namespace.
//!
//! The decision is per network namespace, not per address: the program knows the
//! netns it is attached to and applies that pod's mode to every new TCP
//! connection, whatever local address it is for (each pod IP, IPv6 link-local, an
//! address added later). STRICT refuses plaintext from outside the pod (the kernel
//! answers with a reset); PERMISSIVE hands it to the agent's plaintext listener in the
//! pod, which authorizes and counts it. The tunnel port and traffic from inside the
//! pod (the agent delivering, the app to itself) pass. The decision is
//! `mesh_common::inbound_verdict`, tested on the host.
//!
//! sk_lookup programs cannot call `bpf_get_netns_cookie`, so the agent loads one
//! instance of this program per pod with the pod's netns cookie set in
//! [`NETNS_COOKIE`] (a load-time constant); every instance shares the pinned maps.
use aya_ebpf::{
    bindings::{sk_action::SK_DROP, sk_action::SK_PASS},
    macros::sk_lookup,
    programs::SkLookupContext,
};
use mesh_common::{
    AF_INET, FlowEvent, InboundVerdict, ListenerKey, PROTO_TCP, counters, events, inbound_verdict,
    v4_mapped,
};

use aya_log_ebpf::debug;

use crate::{
    addr::read_ip6,
    klog,
    maps::{MESH_ENROLLED_NETNS, MESH_PLAINTEXT_LISTENERS, count, emit},
};

/// The cookie of the netns this instance is attached to, set by the agent at load.
#[unsafe(no_mangle)]
static NETNS_COOKIE: u64 = 0;

#[sk_lookup]
pub fn mesh_sk_lookup(ctx: SkLookupContext) -> u32 {
    // SAFETY: the kernel hands a valid context for the program's lifetime.
    let lookup = unsafe { &*ctx.lookup };
    if lookup.protocol != PROTO_TCP as u32 {
        return SK_PASS;
    }
    // SAFETY: a plain read of a constant; volatile so the compiler does not fold the
    // placeholder 0 in, as the loader writes the real value.
    let netns = unsafe { core::ptr::read_volatile(&NETNS_COOKIE) };
    // SAFETY: read-only lookup. The value is read in place, not copied: a 72-byte copy
    // on the stack next to the addresses would crowd the 512-byte BPF stack.
    let Some(enrolled) = (unsafe { MESH_ENROLLED_NETNS.get(&netns) }) else {
        // Attached but not enrolled: the pod is leaving the mesh (unenrolled first,
        // detached next).
        return SK_PASS;
    };
    let (local, remote) = if lookup.family == AF_INET {
        (
            v4_mapped(lookup.local_ip4.to_ne_bytes()),
            v4_mapped(lookup.remote_ip4.to_ne_bytes()),
        )
    } else {
        (read_ip6(&lookup.local_ip6), read_ip6(&lookup.remote_ip6))
    };
    let local_port = lookup.local_port as u16;
    let verdict = inbound_verdict(enrolled, &local, &remote, local_port);
    let event = |kind| FlowEvent {
        kind,
        _pad: 0,
        netns_cookie: netns,
        src: remote,
        dst: local,
        // remote_port is network byte order, local_port host order.
        src_port: u16::from_be(lookup.remote_port),
        dst_port: local_port,
        _pad2: 0,
    };
    match verdict {
        InboundVerdict::Pass => SK_PASS,
        InboundVerdict::Refuse => {
            count(counters::INBOUND_STRICT_REFUSED);
            emit(&event(events::REFUSED_STRICT));
            if klog::on() {
                debug!(
                    &ctx,
                    "netns={} refuse src={:i} port={} reason=strict", netns, remote, local_port
                );
            }
            SK_DROP
        }
        InboundVerdict::Capture => {
            let key = ListenerKey {
                netns_cookie: netns,
                family: lookup.family,
                _pad: 0,
            };
            match MESH_PLAINTEXT_LISTENERS.redirect_sk_lookup(&ctx, key, 0) {
                Ok(()) => {
                    count(counters::INBOUND_PLAINTEXT_CAPTURED);
                    emit(&event(events::PLAINTEXT_CAPTURED));
                    if klog::on() {
                        debug!(
                            &ctx,
                            "netns={} plaintext src={:i} port={} to the agent",
                            netns,
                            remote,
                            local_port
                        );
                    }
                    SK_PASS
                }
                Err(_) => {
                    count(counters::INBOUND_NO_LISTENER);
                    emit(&event(events::NO_LISTENER));
                    if klog::on() {
                        debug!(
                            &ctx,
                            "netns={} refuse src={:i} port={} reason=no_listener",
                            netns,
                            remote,
                            local_port
                        );
                    }
                    SK_DROP
                }
            }
        }
    }
}
