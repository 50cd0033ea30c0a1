//! HTTP/1.1 upgrades (WebSocket, or any `Connection: upgrade` protocol) through a
//! routed port. The upgrade request is routed like any other (rule, filters, a
//! backend endpoint by P2C, policy at the destination) and then carried on a stream
//! of its own to the endpoint: the app on this node, a CONNECT stream through the
//! tunnel to the endpoint's node, or a plain connection. hyper speaks HTTP/1.1 on
//! that stream; once the endpoint answers 101, the two upgraded connections are
//! copied into each other until either side closes.
use std::net::SocketAddr;

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, Version, header};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_util::either::Either;
use tracing::{Instrument, debug, info_span};

use super::{
    Conn, RequestLog, Wire,
    body::{self, Body},
    errors::Failure,
    upstream::{pick, shape},
};
use crate::{
    authz::{ConnAttrs, RequestAttrs},
    proxy::{
        Snapshot, deciding_policy,
        dial::dial_from,
        plan::{Way, hop_to},
        tunnel::{self, TunnelStream},
    },
    telemetry::Mode,
};

/// The protocol a request asks to upgrade to, if it is an HTTP/1.1 upgrade request
/// (`Connection: upgrade` and an `Upgrade` header). HTTP/2 has no such mechanism here.
pub fn requested(headers: &HeaderMap, version: Version) -> Option<HeaderValue> {
    if version != Version::HTTP_11 {
        return None;
    }
    let connection_says = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    connection_says
        .then(|| headers.get(header::UPGRADE).cloned())
        .flatten()
}

/// The stream to the endpoint, however it is reached: a TCP connection (the app on
/// this node, or passthrough) or a CONNECT stream through the tunnel.
type Stream = Either<TcpStream, TunnelStream>;

/// What the upgrade request is and where it goes.
pub struct Upgrade<'a> {
    pub protocol: HeaderValue,
    pub client: OnUpgrade,
    pub authority: &'a str,
    pub path_and_query: &'a str,
}

/// Opens the stream to the endpoint for an upgrade: authorized (the upgrade request
/// itself, L4 and L7) when the endpoint is on this node; through the tunnel, where the
/// destination decides at L4, otherwise.
async fn connect(
    conn: &Conn,
    snap: &Snapshot,
    endpoint: SocketAddr,
    req: &Request<Body>,
    up: &Upgrade<'_>,
    log: &mut RequestLog<'_>,
) -> Result<Stream, Failure> {
    let ctx = &conn.ctx;
    let hop = hop_to(snap, endpoint);
    log.destination = hop.peer();
    match &hop.way {
        Way::Local(dest) => {
            log.mode = Mode::Local;
            let attrs = ConnAttrs {
                principal: Some(conn.pod.identity.principal()),
                namespace: Some(conn.pod.identity.namespace.clone()),
                source_ip: conn.client.ip(),
                dest_port: endpoint.port(),
            };
            let request = RequestAttrs::new(
                req.method().as_str(),
                up.path_and_query,
                up.authority,
                req.headers(),
            );
            snap.policy
                .check_request(&dest.meta.load().workload, &attrs, Some(&request))
                .map_err(|d| Failure::Denied(deciding_policy(&d)))?;
            dial_from(&dest.netns, endpoint, ctx.connect_timeout)
                .await
                .map(Either::Left)
                .map_err(|e| Failure::Upstream(e.to_string()))
        }
        Way::Hbone(identity) => {
            log.mode = Mode::Hbone;
            tunnel::open(&conn.pod, ctx, identity, endpoint)
                .await
                .map(Either::Right)
                .map_err(|e| Failure::Upstream(e.to_string()))
        }
        Way::Passthrough => {
            log.mode = Mode::Passthrough;
            dial_from(&conn.pod.netns, endpoint, ctx.connect_timeout)
                .await
                .map(Either::Left)
                .map_err(|e| Failure::Upstream(e.to_string()))
        }
    }
}

/// Sends an upgrade request to one of `endpoints` and, on 101, joins the two
/// upgraded connections.
pub async fn send(
    conn: &Conn,
    snap: &Snapshot,
    endpoints: &[SocketAddr],
    mut req: Request<Body>,
    up: Upgrade<'_>,
    log: &mut RequestLog<'_>,
) -> Result<Response<Body>, Failure> {
    let (endpoint, in_flight) = pick(conn, snap, endpoints)?;
    log.upstream = super::Upstream(Some(endpoint));
    let stream = match connect(conn, snap, endpoint, &req, &up, log).await {
        Ok(s) => s,
        Err(e) => {
            in_flight.failed();
            return Err(e);
        }
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Failure::Upstream(e.to_string()))?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            debug!(error = %e, "upgrade connection to the endpoint ended");
        }
    });
    shape(&mut req, Wire::Http1, up.authority, up.path_and_query);
    let h = req.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, up.protocol.clone());
    let mut resp = match sender.send_request(req).await {
        Ok(r) => {
            in_flight.done();
            r
        }
        Err(e) => {
            in_flight.failed();
            return Err(Failure::Upstream(e.to_string()));
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let server = hyper::upgrade::on(&mut resp);
        let client = up.client;
        let span = info_span!("upgraded", id = conn.id, upstream = %endpoint);
        tokio::spawn(
            async move {
                let (client, server) = match tokio::try_join!(client, server) {
                    Ok(both) => both,
                    Err(e) => {
                        debug!(error = %e, "upgrade did not complete");
                        return;
                    }
                };
                let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
                match crate::proxy::relay::bidirectional(&mut client, &mut server).await {
                    Ok((up, down)) => debug!(up, down, "upgraded connection closed"),
                    Err(e) => debug!(error = %e, "upgraded connection ended with an error"),
                }
            }
            .instrument(span),
        );
    }
    let mut resp = resp.map(body::incoming);
    *resp.version_mut() = Version::default();
    Ok(resp)
}
