//! The destination side of L7 between nodes: an HTTP/2 request (not CONNECT) on a
//! pod's `:15008`, from a peer agent that proved its source identity with mTLS. The
//! request names the application's address in the pod (`x-mesh-dst`, which must be
//! this pod and not one of the mesh's ports) and what the client spoke
//! (`x-mesh-orig-proto`): it is authorized for this pod, turned back into HTTP/1.1 if
//! that is what the client spoke, and sent to the application.
use std::net::SocketAddr;

use http::{Request, Response, Version};
use mesh_common::MESH_PORTS;
use tracing::warn;

use super::{
    DST_HEADER, PROTO_HEADER, Wire, authority_of,
    body::{self, Body},
    errors::Failure,
    is_grpc, strip_headers,
    upstream::shape,
};
use crate::{
    authz::ConnAttrs,
    identity::Identity,
    proxy::{PodContext, ProxyContext, Snapshot, deciding_policy},
};

/// Checks the destination pod's policy for a request; audit policies are logged.
pub fn authorize(snap: &Snapshot, dest: &PodContext, attrs: &ConnAttrs) -> Result<(), Failure> {
    snap.policy
        .check(&dest.workload(), attrs)
        .map_err(|d| Failure::Denied(deciding_policy(&d)))
}

/// One routed request that arrived through the tunnel.
pub async fn serve_request(
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    source: &Identity,
    pod: &PodContext,
    ctx: &ProxyContext,
) -> Response<Body> {
    let grpc = is_grpc(req.headers());
    match handle(req, peer, source, pod, ctx).await {
        Ok(r) => r,
        Err(f) => {
            warn!(error = %f, source = %source, "routed request refused");
            f.response(grpc)
        }
    }
}

async fn handle(
    req: Request<hyper::body::Incoming>,
    peer: SocketAddr,
    source: &Identity,
    pod: &PodContext,
    ctx: &ProxyContext,
) -> Result<Response<Body>, Failure> {
    let target: Option<SocketAddr> = req
        .headers()
        .get(DST_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let Some(target) = target.filter(|t| pod.ips.contains(&t.ip().to_canonical())) else {
        return Err(Failure::Upstream(format!(
            "{DST_HEADER} does not name an address of this pod"
        )));
    };
    if MESH_PORTS.contains(&target.port()) {
        return Err(Failure::Denied("(the mesh's own port)".to_owned()));
    }
    let wire = match req.headers().get(PROTO_HEADER).map(|v| v.as_bytes()) {
        Some(b"HTTP/1.1") => Wire::Http1,
        _ => Wire::Http2,
    };
    let snap = ctx.snapshot.load();
    let attrs = ConnAttrs {
        principal: Some(source.principal()),
        namespace: Some(source.namespace.clone()),
        source_ip: peer.ip(),
        dest_port: target.port(),
    };
    authorize(&snap, pod, &attrs)?;
    let authority = authority_of(&req).unwrap_or_else(|| target.to_string());
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/".to_owned(), |p| p.as_str().to_owned());
    let (mut parts, incoming) = req.into_parts();
    strip_headers(&mut parts.headers);
    let mut req = Request::from_parts(parts, body::incoming(incoming));
    shape(&mut req, wire, &authority, &pq);
    let resp = ctx
        .app_conns
        .send(
            &pod.netns,
            pod.netns_cookie,
            target,
            wire,
            ctx.connect_timeout,
            req,
        )
        .await
        .map_err(|e| Failure::Upstream(e.to_string()))?;
    let mut resp = resp.map(body::incoming);
    *resp.version_mut() = Version::default();
    Ok(resp)
}
