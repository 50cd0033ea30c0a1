//! The last step of every inbound path (tunnel, plaintext, same-node): authorize the
//! connection for the destination workload, register it so a policy change can take
//! it back, and connect to the application inside the pod.
//!
//! The application sees the connection come from its own pod IP (the agent connects
//! from inside the pod's namespace); the original source is in the agent's logs. See
//! docs/security.md for why the source address is not preserved.
use std::net::SocketAddr;

use super::{
    InboundError, PodContext, ProxyContext, dial::DialError, dial::dial_from, podhop::PodHop,
};
use crate::{
    authz::{ConnAttrs, LiveGuard},
    telemetry::{Outcome, ResponseFlag},
};

pub struct Delivered {
    pub app: PodHop,
    pub guard: LiveGuard,
    /// The connection's slot under the destination pod's connection cap.
    pub _permit: crate::limits::ConnPermit<u64>,
}

/// Authorizes and connects to the application. `addr` is where the application is
/// reached: the address the client dialled when the kernel handed over plaintext
/// (any address of the pod), otherwise the pod IP at the destination port.
pub async fn deliver(
    pod: &PodContext,
    ctx: &ProxyContext,
    attrs: &ConnAttrs,
    addr: Option<SocketAddr>,
) -> Result<Delivered, InboundError> {
    let addr = match addr {
        Some(a) => a,
        None => SocketAddr::new(pod.ip.ok_or(InboundError::NoPodIp)?, attrs.dest_port),
    };
    // Every stream of a tunnel connection is a connection to the app: each counts.
    let permit = ctx
        .conns
        .try_admit(pod.netns_cookie)
        .map_err(InboundError::Limited)?;
    // Owned: the live-connection registry keeps it for re-checks.
    let workload = pod.meta.load().workload.clone();
    // Registered before the check: a policy change racing with this connection either
    // is seen by the check or re-checks the registered connection.
    let guard = ctx.live.register(workload.clone(), attrs.clone());
    ctx.snapshot
        .load()
        .policy
        .check(&workload, attrs)
        .map_err(InboundError::Denied)?;
    let app = dial_from(&pod.netns, addr, ctx.connect_timeout)
        .await
        .map_err(|e| match e {
            DialError::Io(source) => InboundError::Connect { addr, source },
            DialError::Timeout(_) => InboundError::ConnectTimeout { addr },
        })?;
    // Its own address (an ephemeral port) is asked for only if needed.
    let app = PodHop::new(app, pod.netns_cookie, &ctx.maps).with_addrs(None, Some(addr));
    Ok(Delivered {
        app,
        guard,
        _permit: permit,
    })
}

/// After `deliver` refused a connection: whether its requests may be checked one by
/// one instead (`http::gate`: the refusal rests only on L7 fields), and if so the
/// connection's slot under the pod's cap.
pub fn per_request(
    pod: &PodContext,
    ctx: &ProxyContext,
    attrs: &ConnAttrs,
    refused: &InboundError,
) -> Option<crate::limits::ConnPermit<u64>> {
    if !matches!(refused, InboundError::Denied(_)) {
        return None;
    }
    let decided = ctx
        .snapshot
        .load()
        .policy
        .decided_per_request(&pod.meta.load().workload, attrs);
    if !decided {
        return None;
    }
    ctx.conns.try_admit(pod.netns_cookie).ok()
}

/// How a refusal on the destination side is reported.
pub fn outcome_of(e: &InboundError) -> Outcome {
    match e {
        InboundError::Denied(d) => Outcome {
            flag: ResponseFlag::Unauthorized,
            reason: Some(e.reason()),
            detail: Some(e.to_string()),
            policy: Some(super::deciding_policy(d)),
        },
        _ => Outcome::failed(ResponseFlag::UpstreamFailure, e.reason(), e),
    }
}
