//! Reads the kernel's flow event ring buffer and turns each event into a [`Flow`].
//! The programs send events only while someone observes (`settings::FLOW_EVENTS`,
//! switched on by the admin API when an observer subscribes and kept in line with
//! the observers here, every second): otherwise each connect() would pay a ring
//! buffer record and a wake-up of this reader for events nobody reads. The buffer is
//! always drained.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use aya::maps::{MapData, RingBuf};
use mesh_common::{FlowEvent, events};
use tokio::io::unix::AsyncFd;
use tracing::warn;

use super::{
    Telemetry,
    flows::{Flow, Origin},
    metrics::DropLabel,
};
use crate::bpf::from_ip16;

/// Finds the pod an event is about: by netns cookie (connect events) or by pod IP
/// (sk_lookup events). Returns "namespace/name".
pub type PodResolver = Arc<dyn Fn(u64, std::net::IpAddr) -> Option<String> + Send + Sync>;

/// How often the kernel's lost-event counter is checked.
const DROP_CHECK: Duration = Duration::from_secs(1);

fn kind_of(kind: u32) -> Option<(&'static str, &'static str)> {
    Some(match kind {
        events::REDIRECTED => ("redirected", "redirected"),
        events::BYPASSED => ("bypassed", "bypassed"),
        events::REFUSED_STRICT => ("refused_strict", "dropped"),
        events::PLAINTEXT_CAPTURED => ("plaintext_captured", "forwarded"),
        events::NO_LISTENER => ("no_listener", "dropped"),
        events::FAIL_OPEN => ("fail_open", "forwarded"),
        events::AGENT_DOWN => ("agent_down", "dropped"),
        _ => return None,
    })
}

fn to_flow(ev: &FlowEvent, resolve: &PodResolver) -> Option<Flow> {
    let (kind, verdict) = kind_of(ev.kind)?;
    let mut f = Flow::new(Origin::Kernel, kind, verdict);
    let (src, dst) = (from_ip16(ev.src), from_ip16(ev.dst));
    let unspecified = |a: &[u8; 16]| a.iter().all(|b| *b == 0);
    if !unspecified(&ev.src) {
        f.source = Some(SocketAddr::new(src, ev.src_port).to_string());
    }
    f.destination = Some(SocketAddr::new(dst, ev.dst_port).to_string());
    // connect events know the caller's netns; sk_lookup events the pod's address.
    f.pod = resolve(ev.netns_cookie, dst);
    Some(f)
}

fn parse(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() < std::mem::size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: the length is checked; FlowEvent is plain old data (any bytes are valid)
    // and read_unaligned has no alignment requirement.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) })
}

/// Runs until the task is dropped. `dropped_in_kernel` reads the kernel's counter of
/// events lost to a full buffer.
pub async fn run(
    ring: RingBuf<MapData>,
    telemetry: Arc<Telemetry>,
    resolve: PodResolver,
    dropped_in_kernel: Arc<dyn Fn() -> u64 + Send + Sync>,
    switch_events: Arc<dyn Fn(bool) + Send + Sync>,
) {
    // SAFETY: the RingBuf owns its map fd for as long as the AsyncFd owns the RingBuf,
    // and always reports that same fd.
    let mut fd = match unsafe { AsyncFd::register(ring) } {
        Ok(fd) => fd,
        Err(e) => {
            warn!(error = %e, "cannot poll the flow event ring buffer; kernel flow events are off");
            return;
        }
    };
    let mut reported = dropped_in_kernel();
    let mut check = tokio::time::interval(DROP_CHECK);
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = match guard {
                    Ok(g) => g,
                    Err(e) => {
                        warn!(error = %e, "flow event ring buffer failed; kernel flow events are off");
                        return;
                    }
                };
                let ring = guard.get_inner_mut();
                while let Some(item) = ring.next() {
                    if let Some(ev) = parse(&item) {
                        telemetry.flows.publish_with(|| {
                            to_flow(&ev, &resolve)
                                .unwrap_or_else(|| Flow::new(Origin::Kernel, "unknown", "error"))
                        });
                    }
                }
                guard.clear_ready();
            }
            _ = check.tick() => {
                // Off once the last observer has gone (on at once when one comes).
                switch_events(telemetry.flows.observers() > 0);
                let now = dropped_in_kernel();
                if now > reported {
                    let lost = now - reported;
                    reported = now;
                    telemetry
                        .metrics
                        .flow_events_dropped
                        .get_or_create(&DropLabel { stage: "kernel" })
                        .inc_by(lost);
                    telemetry.flows.publish_with(|| {
                        let mut f = Flow::new(Origin::Kernel, "dropped_events", "dropped");
                        f.dropped = lost;
                        f.reason = Some("the kernel ring buffer was full".to_owned());
                        f
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_become_flows_with_their_pod() {
        let ev = FlowEvent {
            kind: events::REFUSED_STRICT,
            _pad: 0,
            netns_cookie: 0,
            src: mesh_common::v4_mapped([10, 0, 0, 1]),
            dst: mesh_common::v4_mapped([10, 0, 0, 2]),
            src_port: 40000,
            dst_port: 8080,
            _pad2: 0,
        };
        let resolve: PodResolver =
            Arc::new(|_, ip| (ip.to_string() == "10.0.0.2").then(|| "default/server".to_owned()));
        let bytes: [u8; 56] = unsafe { std::mem::transmute(ev) };
        let f = to_flow(&parse(&bytes).unwrap(), &resolve).unwrap();
        assert_eq!((f.kind, f.verdict), ("refused_strict", "dropped"));
        assert_eq!(f.source.as_deref(), Some("10.0.0.1:40000"));
        assert_eq!(f.destination.as_deref(), Some("10.0.0.2:8080"));
        assert_eq!(f.pod.as_deref(), Some("default/server"));
        assert!(parse(&bytes[..10]).is_none());
    }
}
