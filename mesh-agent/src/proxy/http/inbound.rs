//! The destination side of a routed request: authorized for the destination pod, sent
//! to its application, and reported as the destination. Requests reach it two ways:
//!
//! - through the tunnel: an HTTP/2 request (not CONNECT) on a pod's `:15008`, from a
//!   peer agent that proved its source identity with mTLS. The request names the
//!   application's address in the pod (`x-mesh-dst`, which must be this pod and not
//!   one of the mesh's ports), what the client spoke (`x-mesh-orig-proto`; HTTP/1.1
//!   is turned back into HTTP/1.1 here) and the Service it was sent to (`x-mesh-svc`,
//!   for the metrics);
//! - from this agent's own source side, when the chosen endpoint is a pod on this node.
use std::{net::SocketAddr, sync::Arc, time::Instant};

use http::{Request, Response, Version};
use mesh_common::MESH_PORTS;
use tracing::warn;

use super::{
    DST_HEADER, PROTO_HEADER, SVC_HEADER, Wire, authority_of,
    body::{self, Body},
    errors::Failure,
    is_grpc,
    metered::{self, Report},
    request_target, strip_headers,
    upstream::shape,
};
use crate::{
    authz::{ConnAttrs, RequestAttrs},
    config::NamespacedName,
    identity::Identity,
    proxy::{PodContext, ProxyContext, Snapshot, deciding_policy},
    telemetry::{Mode, Peer, Reporter, RequestFacts, ResponseFlag, WorkloadRef},
};

/// Checks the destination pod's policy, L4 and L7, for one request; audit policies
/// are logged. The pod's workload (its labels as of now) is borrowed, not copied.
fn authorize(
    snap: &Snapshot,
    dest: &PodContext,
    attrs: &ConnAttrs,
    req: &RequestAttrs<'_>,
) -> Result<(), Failure> {
    snap.policy
        .check_request(&dest.meta.load().workload, attrs, Some(req))
        .map_err(|d| Failure::Denied(deciding_policy(&d)))
}

/// Who sent a request to a destination pod.
#[derive(Clone)]
pub struct Sender {
    pub identity: Identity,
    pub addr: SocketAddr,
    pub workload: Option<WorkloadRef>,
    /// `Inbound` through the tunnel, `Local` from this node.
    pub mode: Mode,
    pub service: Option<NamespacedName>,
}

/// Where in the destination pod a request goes, and how.
pub struct PodTarget<'a> {
    pub pod: &'a PodContext,
    pub target: SocketAddr,
    pub wire: Wire,
    pub authority: &'a str,
    pub path_and_query: &'a str,
}

/// Delivers one request to an application in a pod this agent serves, and reports it
/// as the destination. A denial is a 403 (gRPC PERMISSION_DENIED) for this request
/// only: the client's connection stays open for the next.
pub async fn deliver(
    ctx: &ProxyContext,
    snap: &Snapshot,
    from: Sender,
    into: PodTarget<'_>,
    req: Request<Body>,
) -> Response<Body> {
    let start = Instant::now();
    let grpc = is_grpc(req.headers());
    let (mut req, request_bytes) = {
        let (parts, b) = req.into_parts();
        let (b, n) = metered::count(b);
        (Request::from_parts(parts, b), n)
    };
    let attrs = ConnAttrs {
        principal: Some(from.identity.principal()),
        namespace: Some(from.identity.namespace.clone()),
        source_ip: from.addr.ip(),
        dest_port: into.target.port(),
    };
    let facts = RequestFacts {
        reporter: Reporter::Destination,
        mode: from.mode,
        source: Peer {
            workload: from.workload,
            addr: Some(from.addr),
            identity: Some(from.identity),
        },
        destination: Peer {
            workload: Some(into.pod.workload_ref()),
            addr: Some(into.target),
            identity: Some(into.pod.identity.clone()),
        },
        service: from.service,
        grpc,
        route: None,
        method: req.method().to_string(),
        authority: into.authority.to_owned(),
        path: req.uri().path().to_owned(),
    };
    // Whatever the sender did, the path is normalized here, where the policy is
    // checked, and the application gets the path the policy saw.
    let target = request_target::check_method(req.method())
        .and_then(|()| request_target::normalize(into.path_and_query));
    let allowed = match target {
        Ok(pq) => {
            let request =
                RequestAttrs::new(req.method().as_str(), &pq, into.authority, req.headers());
            let allowed = authorize(snap, into.pod, &attrs, &request);
            shape(&mut req, into.wire, into.authority, &pq);
            allowed
        }
        Err(f) => Err(f),
    };
    let sent = match allowed {
        Ok(()) => ctx
            .app_conns
            .send(
                &into.pod.netns,
                into.pod.netns_cookie,
                into.target,
                into.wire,
                ctx.connect_timeout,
                req,
            )
            .await
            .map_err(|e| Failure::Upstream(e.to_string())),
        Err(f) => Err(f),
    };
    let (resp, flag) = match sent {
        Ok(resp) => {
            let mut resp = resp.map(body::incoming);
            *resp.version_mut() = Version::default();
            (resp, ResponseFlag::None)
        }
        Err(f) => {
            let source = facts.source.identity.as_ref().map(tracing::field::display);
            warn!(error = %f, source, "routed request refused");
            (f.response(grpc), f.flag())
        }
    };
    metered::report(
        resp,
        Report {
            telemetry: ctx.telemetry.clone(),
            facts,
            start,
            request_bytes,
            flag,
        },
    )
}

/// A request as `deliver` takes it: its authority (the target's address if it names
/// none), its path and query as sent, and the request without the headers only agents
/// may set and the hop-by-hop ones.
pub fn for_delivery(
    req: Request<hyper::body::Incoming>,
    target: SocketAddr,
) -> (Request<Body>, String, String) {
    let authority = authority_of(req.uri(), req.headers()).unwrap_or_else(|| target.to_string());
    let pq = req
        .uri()
        .path_and_query()
        .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned());
    let (mut parts, incoming) = req.into_parts();
    strip_headers(&mut parts.headers);
    (
        Request::from_parts(parts, body::incoming(incoming)),
        authority,
        pq,
    )
}

/// One routed request that arrived through the tunnel.
pub async fn serve_request(
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    source: &Identity,
    pod: &Arc<PodContext>,
    ctx: &ProxyContext,
) -> Response<Body> {
    let grpc = is_grpc(req.headers());
    let target: Option<SocketAddr> = req
        .headers()
        .get(DST_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let Some(target) = target.filter(|t| pod.ips.contains(&t.ip().to_canonical())) else {
        let f = Failure::Upstream(format!("{DST_HEADER} does not name an address of this pod"));
        warn!(error = %f, source = %source, "routed request refused");
        return f.response(grpc);
    };
    if MESH_PORTS.contains(&target.port()) {
        let f = Failure::Denied("(the mesh's own port)".to_owned());
        warn!(error = %f, source = %source, "routed request refused");
        return f.response(grpc);
    }
    let wire = match req.headers().get(PROTO_HEADER).map(|v| v.as_bytes()) {
        Some(b"HTTP/1.1") => Wire::Http1,
        _ => Wire::Http2,
    };
    // Telemetry only: a peer agent that lies here mislabels its own requests.
    let service = req
        .headers()
        .get(SVC_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once('/'))
        .map(|(namespace, name)| NamespacedName {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        });
    let snap = ctx.snapshot.load();
    let (req, authority, pq) = for_delivery(req, target);
    let from = Sender {
        identity: source.clone(),
        addr: peer,
        workload: snap.workloads.get(peer.ip()).map(|w| w.workload_ref()),
        mode: Mode::Inbound,
        service,
    };
    let into = PodTarget {
        pod,
        target,
        wire,
        authority: &authority,
        path_and_query: &pq,
    };
    deliver(ctx, &snap, from, into, req).await
}
