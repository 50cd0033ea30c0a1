//! Sending one routed request to a backend: filters, timeouts, an endpoint by P2C,
//! and the request on the way to that endpoint.
use std::{sync::Arc, time::Duration};

use http::{HeaderValue, Request, Response, Uri, Version, header};
use http_body_util::BodyExt as _;
use hyper::upgrade::OnUpgrade;
use tower::ServiceExt as _;
use tracing::{Instrument as _, debug};

use super::{
    Conn, RequestLog, Wire,
    balance::InFlight,
    body::Body,
    connect::{Connect, Dispatch, mode_of},
    errors::{Failure, unreachable_endpoint},
    replay::Recording,
    request_filters, response_filters,
    route::Forward,
    upgrade::Upgrade,
};
use crate::{
    config::Retry,
    proxy::{Snapshot, plan::hop_to},
    state::CompiledMirror,
    telemetry::{Mode, Peer},
};

/// A mirrored copy gives up after this when the rule has no request timeout.
const MIRROR_TIMEOUT: Duration = Duration::from_secs(15);

/// A request to a rule's backend.
pub async fn forward(
    conn: &Arc<Conn>,
    snap: &Arc<Snapshot>,
    f: Forward,
    mut req: Request<Body>,
    wire: Wire,
    upgrade: Option<(HeaderValue, OnUpgrade)>,
    log: &mut RequestLog<'_>,
) -> Result<Response<Body>, Failure> {
    let rule = f.rule.clone();
    let backend = rule.backends.get(f.backend).ok_or(Failure::NoBackend)?;
    let endpoints = backend
        .endpoints
        .as_deref()
        .ok_or(Failure::InvalidBackend)?;
    log.service = backend.service.clone();
    request_filters(&rule.filters, req.headers_mut());
    request_filters(&backend.filters, req.headers_mut());
    let target = Target {
        wire,
        authority: &f.authority,
        path_and_query: &f.path_and_query,
        timeout: rule.timeouts.backend_request,
    };
    // Retries happen inside the request timeout, which bounds them all. Each attempt
    // picks its endpoint anew. An upgrade is sent once; the timeout bounds its
    // handshake, not the upgraded connection.
    let attempts = async {
        if let Some((protocol, client)) = upgrade {
            let up = Upgrade {
                protocol,
                client,
                authority: &f.authority,
                path_and_query: &f.path_and_query,
            };
            // Boxed: upgrades are rare and their future is large (see `tunnel::lease`).
            return Box::pin(super::upgrade::send(conn, snap, endpoints, req, up, log)).await;
        }
        let mirrors: Vec<&CompiledMirror> = rule
            .mirrors
            .iter()
            .filter(|m| m.takes(rand::random()))
            .collect();
        if rule.retry.is_none() && mirrors.is_empty() {
            return send(conn, snap, endpoints, req, target, log).await;
        }
        let (parts, body) = req.into_parts();
        let recording = Recording::new(body);
        for m in mirrors {
            mirror(
                conn,
                snap,
                m,
                &parts,
                recording.follower(),
                target,
                rule.timeouts.request,
            );
        }
        loop {
            let req = again(&parts, recording.attempt());
            let result = send(conn, snap, endpoints, req, target, log).await;
            let Some(retry) = &rule.retry else {
                return result;
            };
            if !retryable(retry, &result) || log.retries >= retry.attempts || !recording.can_retry()
            {
                return result;
            }
            log.retries += 1;
            debug!(retries = log.retries, "retrying the request");
            drop(result);
            tokio::time::sleep(retry.backoff).await;
        }
    };
    let mut resp = match rule.timeouts.request {
        Some(t) => tokio::time::timeout(t, attempts)
            .await
            .map_err(|_| Failure::Timeout)??,
        None => attempts.await?,
    };
    response_filters(&rule.filters, &mut resp);
    response_filters(&backend.filters, &mut resp);
    Ok(resp)
}

/// A request to the Service's own endpoints (its routes were removed while the
/// client's connection was open).
pub async fn to_service(
    conn: &Arc<Conn>,
    snap: &Arc<Snapshot>,
    req: Request<Body>,
    wire: Wire,
    authority: &str,
    log: &mut RequestLog<'_>,
) -> Result<Response<Body>, Failure> {
    let target = snap
        .routes
        .get(conn.frontend)
        .ok_or(Failure::InvalidBackend)?;
    let pq = req
        .uri()
        .path_and_query()
        .map_or("/".to_owned(), |p| p.as_str().to_owned());
    send(
        conn,
        snap,
        &target.endpoints,
        req,
        Target {
            wire,
            authority,
            path_and_query: &pq,
            timeout: None,
        },
        log,
    )
    .await
}

/// Sends a copy of the request to one of the mirror's endpoints, on its own task;
/// the answer is read and dropped. The copy's body follows what the real request
/// reads, so it never holds it.
fn mirror(
    conn: &Arc<Conn>,
    snap: &Arc<Snapshot>,
    m: &CompiledMirror,
    parts: &http::request::Parts,
    body: Body,
    target: Target<'_>,
    limit: Option<Duration>,
) {
    let Some(endpoints) = m.endpoints.clone() else {
        return;
    };
    let (conn, snap) = (conn.clone(), snap.clone());
    let req = again(parts, body);
    let (authority, pq, wire) = (
        target.authority.to_owned(),
        target.path_and_query.to_owned(),
        target.wire,
    );
    let (method, path) = (parts.method.to_string(), parts.uri.path().to_owned());
    let service = m.mirror.service.clone();
    let span = tracing::debug_span!("mirror", id = conn.id, service = %service);
    tokio::spawn(
        async move {
            let mut log = RequestLog {
                conn: &conn,
                method: &method,
                authority: &authority,
                path: &path,
                route: String::new(),
                rule: String::new(),
                upstream: super::Upstream(None),
                mode: Mode::Passthrough,
                destination: Peer::default(),
                service,
                retries: 0,
            };
            let t = Target {
                wire,
                authority: &authority,
                path_and_query: &pq,
                timeout: None,
            };
            let sent = send(&conn, &snap, &endpoints, req, t, &mut log);
            match tokio::time::timeout(limit.unwrap_or(MIRROR_TIMEOUT), sent).await {
                Ok(Ok(resp)) => {
                    let status = resp.status().as_u16();
                    let mut body = resp.into_body();
                    while let Some(Ok(_)) = body.frame().await {}
                    debug!(status, upstream = %log.upstream, "mirrored");
                }
                Ok(Err(e)) => debug!(error = %e, "mirror failed"),
                Err(_) => debug!("mirror timed out"),
            }
        }
        .instrument(span),
    );
}

/// The endpoint for one attempt: P2C over peak-EWMA, same node first.
pub fn pick(
    conn: &Conn,
    snap: &Snapshot,
    endpoints: &[std::net::SocketAddr],
) -> Result<(std::net::SocketAddr, InFlight), Failure> {
    conn.ctx
        .loads
        .pick_near(endpoints, |e| snap.local_pod(e.ip()).is_some())
        .ok_or(Failure::NoEndpoint)
}

/// Whether an attempt's outcome may be retried: a connection failure, or one of the
/// rule's codes.
fn retryable(retry: &Retry, result: &Result<Response<Body>, Failure>) -> bool {
    match result {
        Ok(r) => unreachable_endpoint(r) || retry.codes.contains(&r.status().as_u16()),
        Err(Failure::Upstream(_)) => true,
        Err(_) => false,
    }
}

/// The request again, with a new attempt's body.
fn again(parts: &http::request::Parts, body: Body) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req
}

#[derive(Clone, Copy)]
struct Target<'a> {
    wire: Wire,
    authority: &'a str,
    path_and_query: &'a str,
    /// `timeouts.backendRequest`: until the endpoint's response headers.
    timeout: Option<Duration>,
}

/// Puts a request in the form its wire needs: HTTP/1.1 origin-form with a Host
/// header, or HTTP/2 absolute-form (the authority travels as `:authority`).
pub fn shape<B>(req: &mut Request<B>, wire: Wire, authority: &str, path_and_query: &str) {
    match wire {
        Wire::Http1 => {
            if let Ok(uri) = Uri::try_from(path_and_query) {
                *req.uri_mut() = uri;
            }
            if let Ok(v) = HeaderValue::from_str(authority) {
                req.headers_mut().insert(header::HOST, v);
            }
            *req.version_mut() = Version::HTTP_11;
        }
        Wire::Http2 => {
            let uri = Uri::builder()
                .scheme("http")
                .authority(authority)
                .path_and_query(path_and_query)
                .build();
            if let Ok(uri) = uri {
                *req.uri_mut() = uri;
            }
            req.headers_mut().remove(header::HOST);
            *req.version_mut() = Version::HTTP_2;
        }
    }
}

async fn send(
    conn: &Arc<Conn>,
    snap: &Arc<Snapshot>,
    endpoints: &[std::net::SocketAddr],
    req: Request<Body>,
    target: Target<'_>,
    log: &mut RequestLog<'_>,
) -> Result<Response<Body>, Failure> {
    let (endpoint, in_flight) = pick(conn, snap, endpoints)?;
    log.upstream = super::Upstream(Some(endpoint));
    let hop = hop_to(snap, endpoint);
    log.destination = hop.peer();
    log.mode = mode_of(&hop.way);
    let call = Connect {
        conn: conn.clone(),
        snap: snap.clone(),
    }
    .oneshot(Dispatch {
        endpoint,
        way: hop.way,
        req,
        wire: target.wire,
        authority: target.authority.to_owned(),
        path_and_query: target.path_and_query.to_owned(),
        service: log.service.clone(),
    });
    let result = match target.timeout {
        Some(t) => tokio::time::timeout(t, call)
            .await
            .unwrap_or(Err(Failure::Timeout)),
        None => call.await,
    };
    match result {
        Ok(mut resp) => {
            if unreachable_endpoint(&resp) {
                in_flight.failed();
            } else {
                in_flight.done();
            }
            *resp.version_mut() = Version::default();
            Ok(resp)
        }
        Err(e) => {
            in_flight.failed();
            Err(e)
        }
    }
}
