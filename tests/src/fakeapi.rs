//! A fake Kubernetes API server for the agent's API source: real HTTPS with a bearer
//! token, lists with a resourceVersion, watches that stream newline-delimited events
//! from a resourceVersion (with bookmarks), `410 Gone` for a resourceVersion older
//! than the last compaction, and `404` for a resource that is not served (a CRD not
//! installed). It keeps objects in memory; the test changes them directly.
//!
//! Only what a list-then-watch client uses is implemented: cluster-wide GET of a
//! collection, paged by `limit`/`continue`, with or without `watch=1`.
use std::{
    collections::{BTreeMap, BTreeSet},
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::{Request, Response, StatusCode, body::Frame};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

/// The resources the agent watches: (apiVersion, kind, path of the collection).
const RESOURCES: &[(&str, &str, &str)] = &[
    ("v1", "Namespace", "api/v1/namespaces"),
    ("v1", "Service", "api/v1/services"),
    ("v1", "Pod", "api/v1/pods"),
    (
        "discovery.k8s.io/v1",
        "EndpointSlice",
        "apis/discovery.k8s.io/v1/endpointslices",
    ),
    (
        "security.istio.io/v1",
        "PeerAuthentication",
        "apis/security.istio.io/v1/peerauthentications",
    ),
    (
        "security.istio.io/v1",
        "AuthorizationPolicy",
        "apis/security.istio.io/v1/authorizationpolicies",
    ),
    (
        "gateway.networking.k8s.io/v1",
        "HTTPRoute",
        "apis/gateway.networking.k8s.io/v1/httproutes",
    ),
    (
        "gateway.networking.k8s.io/v1",
        "GRPCRoute",
        "apis/gateway.networking.k8s.io/v1/grpcroutes",
    ),
];

fn resource_of(
    api_version: &str,
    kind: &str,
) -> Option<&'static (&'static str, &'static str, &'static str)> {
    RESOURCES
        .iter()
        .find(|(v, k, _)| *v == api_version && *k == kind)
}

struct Event {
    rv: u64,
    path: &'static str,
    kind: &'static str,
    object: Value,
}

/// What the server has been asked, per collection path.
#[derive(Debug, Default, Clone)]
pub struct Requests {
    pub lists: BTreeMap<String, u64>,
    pub watches: BTreeMap<String, u64>,
    /// Watches answered with 410 Gone.
    pub gone: u64,
    pub unauthorized: u64,
    /// List pages answered with a `continue` token.
    pub pages: u64,
    /// TokenReviews answered (authenticated or not).
    pub token_reviews: u64,
    /// Merge patches of `pods/<name>/status`.
    pub status_patches: u64,
    /// Merge patches of `httproutes|grpcroutes/<name>/status`, written or not.
    pub route_status_patches: u64,
    /// Lease writes refused with 409.
    pub lease_conflicts: u64,
}

/// What a service-account token stands for, as the fake's TokenReview answers.
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub username: String,
    /// The node of the pod the token is bound to (`None`: not a bound token).
    pub node: Option<String>,
    pub audiences: Vec<String>,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Watches from a resourceVersion below this are answered with 410 Gone.
    oldest: u64,
    objects: BTreeMap<&'static str, BTreeMap<(String, String), Value>>,
    events: Vec<Event>,
    /// Collections answered with 404 (CRDs not installed).
    absent: BTreeSet<&'static str>,
    /// While set, watch requests get 503 (a server that is down).
    refuse_watches: bool,
    /// Bumped to end every open watch (a server restart); each watch checks it on
    /// every turn, under the lock, so none can miss it.
    epoch: u64,
    /// Service-account tokens TokenReview knows.
    tokens: BTreeMap<String, TokenInfo>,
    /// Events created (events.k8s.io/v1), in order.
    events_created: Vec<Value>,
    /// Leases (coordination.k8s.io/v1) by (namespace, name); read and written, not
    /// listed or watched.
    leases: BTreeMap<(String, String), Value>,
    requests: Requests,
}

struct Shared {
    state: Mutex<State>,
    /// Bumped on every change and on `drop_watches`; watches wait on it.
    changed: watch::Sender<u64>,
    token: String,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct FakeApi {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
    kubeconfig: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl FakeApi {
    /// Serves on `addr` inside the network namespace at `netns` (the listener is bound
    /// there; the server runs on a thread of the test process). Writes the CA
    /// certificate and a kubeconfig with a bearer token under `dir`.
    pub fn start(netns: &Path, addr: SocketAddr, dir: &Path) -> anyhow::Result<FakeApi> {
        std::fs::create_dir_all(dir)?;
        let (ca_pem, chain, key) = certificates(addr)?;
        let ca_path = dir.join("api-ca.pem");
        std::fs::write(&ca_path, ca_pem)?;
        let token = crate::cluster::random_hex(16)?;
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\n\
                 clusters: [{{name: fake, cluster: {{server: \"https://{addr}\", certificate-authority: {}}}}}]\n\
                 users: [{{name: agent, user: {{token: {token}}}}}]\n\
                 contexts: [{{name: fake, context: {{cluster: fake, user: agent}}}}]\n\
                 current-context: fake\n",
                ca_path.display()
            ),
        )?;
        let listener = crate::cluster::in_netns(netns, move || std::net::TcpListener::bind(addr))??;
        listener.set_nonblocking(true)?;
        let mut config = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(chain, key)?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                rv: 1,
                ..State::default()
            }),
            changed: watch::Sender::new(0),
            token,
        });
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let s = shared.clone();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.to_string()));
                    return;
                }
            };
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                tokio::select! {
                    _ = accept_loop(listener, acceptor, s) => {}
                    _ = stopped => {}
                }
            });
        });
        ready_rx
            .recv()
            .context("fake API thread")?
            .map_err(anyhow::Error::msg)?;
        Ok(FakeApi {
            shared,
            addr,
            kubeconfig,
            stop: Some(stop),
        })
    }

    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Creates or replaces every object of a multi-document YAML text. Returns the
    /// key of each.
    pub fn apply(&self, yaml: &str) -> anyhow::Result<Vec<ObjectRef>> {
        self.apply_values(documents(yaml)?)
    }

    /// As [`FakeApi::apply`], for objects already in JSON form.
    pub fn apply_values(&self, docs: Vec<Value>) -> anyhow::Result<Vec<ObjectRef>> {
        let mut keys = Vec::new();
        let mut st = self.shared.lock();
        for mut v in docs {
            let (api_version, kind) = (
                v["apiVersion"].as_str().unwrap_or_default().to_owned(),
                v["kind"].as_str().unwrap_or_default().to_owned(),
            );
            let (_, _, path) = resource_of(&api_version, &kind)
                .with_context(|| format!("the fake API does not serve {api_version}/{kind}"))?;
            let id = id_of(&v, kind == "Namespace")?;
            keys.push(ObjectRef {
                api_version: api_version.clone(),
                kind: kind.clone(),
                namespace: id.0.clone(),
                name: id.1.clone(),
            });
            st.rv += 1;
            let rv = st.rv;
            // As the API server: `generation` starts at 1 and counts spec changes, and
            // a write of the object leaves its status (a subresource) as it was.
            let previous = st.objects.get(path).and_then(|o| o.get(&id));
            let generation = match previous {
                None => 1,
                Some(p) => {
                    let g = p["metadata"]["generation"].as_i64().unwrap_or(1);
                    if p["spec"] == v["spec"] { g } else { g + 1 }
                }
            };
            if v.get("status").is_none()
                && let Some(status) = previous.and_then(|p| p.get("status"))
            {
                v["status"] = status.clone();
            }
            let meta = v["metadata"]
                .as_object_mut()
                .context("object without metadata")?;
            meta.insert("resourceVersion".into(), rv.to_string().into());
            meta.insert("generation".into(), generation.into());
            if id.0.is_empty() {
                meta.remove("namespace");
            } else {
                meta.insert("namespace".into(), id.0.clone().into());
            }
            let objects = st.objects.entry(path).or_default();
            let kind = if objects.insert(id, v.clone()).is_some() {
                "MODIFIED"
            } else {
                "ADDED"
            };
            st.events.push(Event {
                rv,
                path,
                kind,
                object: v,
            });
        }
        drop(st);
        self.shared.changed.send_modify(|n| *n += 1);
        Ok(keys)
    }

    /// Deletes an object (`namespace` empty for a Namespace).
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> anyhow::Result<()> {
        let (_, _, path) = resource_of(api_version, kind).context("unknown kind")?;
        let mut st = self.shared.lock();
        st.rv += 1;
        let rv = st.rv;
        let mut object = st
            .objects
            .get_mut(path)
            .and_then(|o| o.remove(&(namespace.to_owned(), name.to_owned())))
            .with_context(|| format!("{kind} {namespace}/{name} does not exist"))?;
        object["metadata"]["resourceVersion"] = rv.to_string().into();
        st.events.push(Event {
            rv,
            path,
            kind: "DELETED",
            object,
        });
        drop(st);
        self.shared.changed.send_modify(|n| *n += 1);
        Ok(())
    }

    /// Forgets the event history: a watch from any resourceVersion before now gets
    /// 410 Gone, as after an etcd compaction.
    pub fn compact(&self) {
        let mut st = self.shared.lock();
        // A watch from the current resourceVersion (what a list returns) still works.
        st.oldest = st.rv;
        st.events.clear();
    }

    /// Ends every open watch, as a restarting API server does.
    pub fn drop_watches(&self) {
        self.shared.lock().epoch += 1;
        self.shared.changed.send_modify(|n| *n += 1);
    }

    /// While `refuse` is set, watch requests get 503 Service Unavailable.
    pub fn refuse_watches(&self, refuse: bool) {
        self.shared.lock().refuse_watches = refuse;
    }

    /// Serves (or stops serving, with 404) the collection of `api_version`/`kind`.
    pub fn serve_kind(&self, api_version: &str, kind: &str, served: bool) {
        if let Some((_, _, path)) = resource_of(api_version, kind) {
            let mut st = self.shared.lock();
            if served {
                st.absent.remove(path);
            } else {
                st.absent.insert(path);
            }
        }
    }

    /// Makes TokenReview know `token`.
    pub fn add_token(&self, token: &str, info: TokenInfo) {
        self.shared.lock().tokens.insert(token.to_owned(), info);
    }

    pub fn requests(&self) -> Requests {
        self.shared.lock().requests.clone()
    }
}

impl Drop for FakeApi {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Names an object of the fake: what `apply` returns and `delete` takes.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ObjectRef {
    pub api_version: String,
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

fn documents(yaml: &str) -> anyhow::Result<Vec<Value>> {
    use serde::Deserialize as _;
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(yaml) {
        let v = Value::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn id_of(v: &Value, cluster_scoped: bool) -> anyhow::Result<(String, String)> {
    let name = v["metadata"]["name"]
        .as_str()
        .context("object without metadata.name")?
        .to_owned();
    let namespace = if cluster_scoped {
        String::new()
    } else {
        v["metadata"]["namespace"]
            .as_str()
            .unwrap_or("default")
            .to_owned()
    };
    Ok((namespace, name))
}

/// A CA and a server certificate for `addr`'s IP. Returns (CA PEM, chain, key).
fn certificates(
    addr: SocketAddr,
) -> anyhow::Result<(String, Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "fake kubernetes CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca_cert.pem(), ca_key)?;
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    params.subject_alt_names = vec![rcgen::SanType::IpAddress(addr.ip())];
    let cert = params.signed_by(&key, &issuer)?;
    let chain = vec![CertificateDer::from_pem_slice(cert.pem().as_bytes())?];
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes())?;
    Ok((ca_cert.pem(), chain, key))
}

async fn accept_loop(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    shared: Arc<Shared>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let (acceptor, shared) = (acceptor.clone(), shared.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}

type Body = BoxBody<Bytes, Infallible>;

fn full(status: StatusCode, v: &Value) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("static"));
    r
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code})
}

fn query(req: &Request<hyper::body::Incoming>) -> BTreeMap<String, String> {
    req.uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

async fn route(shared: &Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let bearer = format!("Bearer {}", shared.token);
    if req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        != Some(bearer.as_str())
    {
        shared.lock().requests.unauthorized += 1;
        return full(
            StatusCode::UNAUTHORIZED,
            &status(401, "Unauthorized", "Unauthorized"),
        );
    }
    if req.method() == hyper::Method::POST && req.uri().path() == TOKEN_REVIEWS {
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return full(StatusCode::BAD_REQUEST, &status(400, "BadRequest", "body")),
        };
        return match serde_json::from_slice::<Value>(&body) {
            Ok(review) => full(StatusCode::CREATED, &token_review(shared, review)),
            Err(e) => full(
                StatusCode::BAD_REQUEST,
                &status(400, "BadRequest", &e.to_string()),
            ),
        };
    }
    let events_path = req
        .uri()
        .path()
        .starts_with("/apis/events.k8s.io/v1/namespaces/")
        && req.uri().path().contains("/events");
    if events_path && matches!(*req.method(), hyper::Method::POST | hyper::Method::PATCH) {
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return full(StatusCode::BAD_REQUEST, &status(400, "BadRequest", "body")),
        };
        return match serde_json::from_slice::<Value>(&body) {
            Ok(event) => {
                shared.lock().events_created.push(event.clone());
                full(StatusCode::CREATED, &event)
            }
            Err(e) => full(
                StatusCode::BAD_REQUEST,
                &status(400, "BadRequest", &e.to_string()),
            ),
        };
    }
    let leases = req.uri().path().starts_with(LEASES);
    if req.method() == hyper::Method::PATCH || (leases && req.method() != hyper::Method::GET) {
        let path = req.uri().path().to_owned();
        let method = req.method().clone();
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return full(StatusCode::BAD_REQUEST, &status(400, "BadRequest", "body")),
        };
        return match serde_json::from_slice::<Value>(&body) {
            Ok(body) if leases => write_lease(shared, &method, &path, body),
            Ok(patch) if path.starts_with("/apis/gateway.networking.k8s.io/") => {
                patch_route_status(shared, &path, &patch)
            }
            Ok(patch) => patch_pod_status(shared, &path, &patch),
            Err(e) => full(
                StatusCode::BAD_REQUEST,
                &status(400, "BadRequest", &e.to_string()),
            ),
        };
    }
    if leases {
        return read_lease(shared, req.uri().path());
    }
    handle(shared, req)
}

const LEASES: &str = "/apis/coordination.k8s.io/v1/namespaces/";

/// `(namespace, name)` of `/apis/coordination.k8s.io/v1/namespaces/<ns>/leases[/<name>]`.
fn lease_path(path: &str) -> Option<(String, Option<String>)> {
    let rest = path.strip_prefix(LEASES)?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [ns, "leases"] => Some(((*ns).to_owned(), None)),
        [ns, "leases", name] => Some(((*ns).to_owned(), Some((*name).to_owned()))),
        _ => None,
    }
}

fn read_lease(shared: &Arc<Shared>, path: &str) -> Response<Body> {
    let Some((ns, Some(name))) = lease_path(path) else {
        return full(StatusCode::NOT_FOUND, &status(404, "NotFound", "not found"));
    };
    match shared.lock().leases.get(&(ns, name)) {
        Some(l) => full(StatusCode::OK, l),
        None => full(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", "lease not found"),
        ),
    }
}

/// POST creates (409 if it exists), PUT replaces only from the current
/// resourceVersion (409 otherwise): the optimistic concurrency a leader election
/// relies on.
fn write_lease(
    shared: &Arc<Shared>,
    method: &hyper::Method,
    path: &str,
    mut lease: Value,
) -> Response<Body> {
    let Some((ns, name)) = lease_path(path) else {
        return full(StatusCode::NOT_FOUND, &status(404, "NotFound", "not found"));
    };
    let Some(name) = name.or_else(|| lease["metadata"]["name"].as_str().map(str::to_owned)) else {
        return full(
            StatusCode::BAD_REQUEST,
            &status(400, "BadRequest", "no name"),
        );
    };
    let mut st = shared.lock();
    let key = (ns.clone(), name.clone());
    let current = st
        .leases
        .get(&key)
        .map(|l| l["metadata"]["resourceVersion"].clone());
    let conflict = match (method, &current) {
        (&hyper::Method::POST, Some(_)) => true,
        (&hyper::Method::PUT, None) => {
            return full(
                StatusCode::NOT_FOUND,
                &status(404, "NotFound", "lease not found"),
            );
        }
        (&hyper::Method::PUT, Some(v)) => lease["metadata"]["resourceVersion"] != *v,
        _ => false,
    };
    if conflict {
        st.requests.lease_conflicts += 1;
        return full(
            StatusCode::CONFLICT,
            &status(409, "Conflict", "the object has been modified"),
        );
    }
    st.rv += 1;
    lease["metadata"]["resourceVersion"] = st.rv.to_string().into();
    lease["metadata"]["namespace"] = ns.into();
    lease["metadata"]["name"] = name.into();
    st.leases.insert(key, lease.clone());
    full(StatusCode::OK, &lease)
}

/// `PATCH .../namespaces/<ns>/(httproutes|grpcroutes)/<name>/status` with a merge
/// patch of `status`; a `metadata.resourceVersion` in the patch must be the current
/// one (409 otherwise), as the API server checks it.
fn patch_route_status(shared: &Arc<Shared>, path: &str, patch: &Value) -> Response<Body> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let [
        "apis",
        group,
        version,
        "namespaces",
        ns,
        plural,
        name,
        "status",
    ] = parts.as_slice()
    else {
        return full(StatusCode::NOT_FOUND, &status(404, "NotFound", "not found"));
    };
    let collection = format!("apis/{group}/{version}/{plural}");
    let Some((_, _, collection)) = RESOURCES.iter().find(|(_, _, p)| *p == collection).copied()
    else {
        return full(StatusCode::NOT_FOUND, &status(404, "NotFound", "not found"));
    };
    let mut st = shared.lock();
    st.requests.route_status_patches += 1;
    st.rv += 1;
    let rv = st.rv;
    let Some(route) = st
        .objects
        .get_mut(collection)
        .and_then(|o| o.get_mut(&((*ns).to_owned(), (*name).to_owned())))
    else {
        return full(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", "route not found"),
        );
    };
    let wanted = &patch["metadata"]["resourceVersion"];
    if !wanted.is_null() && *wanted != route["metadata"]["resourceVersion"] {
        return full(
            StatusCode::CONFLICT,
            &status(409, "Conflict", "the object has been modified"),
        );
    }
    if !route["status"].is_object() {
        route["status"] = json!({});
    }
    if let Some(changes) = patch["status"].as_object() {
        for (k, v) in changes {
            route["status"][k] = v.clone();
        }
    }
    route["metadata"]["resourceVersion"] = rv.to_string().into();
    let object = route.clone();
    st.events.push(Event {
        rv,
        path: collection,
        kind: "MODIFIED",
        object: object.clone(),
    });
    drop(st);
    shared.changed.send_modify(|n| *n += 1);
    full(StatusCode::OK, &object)
}

/// `PATCH /api/v1/namespaces/<ns>/pods/<name>/status` with a merge patch: the
/// metadata annotations it names are set (or removed, for null), nothing else.
fn patch_pod_status(shared: &Arc<Shared>, path: &str, patch: &Value) -> Response<Body> {
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let ["api", "v1", "namespaces", ns, "pods", name, "status"] = parts.as_slice() else {
        return full(StatusCode::NOT_FOUND, &status(404, "NotFound", "not found"));
    };
    let mut st = shared.lock();
    st.requests.status_patches += 1;
    st.rv += 1;
    let rv = st.rv;
    let Some(pod) = st
        .objects
        .get_mut("api/v1/pods")
        .and_then(|o| o.get_mut(&((*ns).to_owned(), (*name).to_owned())))
    else {
        return full(
            StatusCode::NOT_FOUND,
            &status(404, "NotFound", "pod not found"),
        );
    };
    if let Some(changes) = patch["metadata"]["annotations"].as_object() {
        let meta = &mut pod["metadata"];
        if !meta["annotations"].is_object() {
            meta["annotations"] = json!({});
        }
        for (k, v) in changes {
            if let Some(a) = meta["annotations"].as_object_mut() {
                if v.is_null() {
                    a.remove(k);
                } else {
                    a.insert(k.clone(), v.clone());
                }
            }
        }
    }
    pod["metadata"]["resourceVersion"] = rv.to_string().into();
    let object = pod.clone();
    st.events.push(Event {
        rv,
        path: "api/v1/pods",
        kind: "MODIFIED",
        object: object.clone(),
    });
    drop(st);
    shared.changed.send_modify(|n| *n += 1);
    full(StatusCode::OK, &object)
}

impl FakeApi {
    /// Every Event created or updated so far (events.k8s.io/v1 objects).
    pub fn events(&self) -> Vec<Value> {
        self.shared.lock().events_created.clone()
    }

    /// An object as the server holds it now (`namespace` empty for a Namespace).
    pub fn object(
        &self,
        api_version: &str,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Option<Value> {
        let (_, _, path) = resource_of(api_version, kind)?;
        self.shared
            .lock()
            .objects
            .get(path)
            .and_then(|o| o.get(&(namespace.to_owned(), name.to_owned())))
            .cloned()
    }

    /// A Lease as the server holds it now.
    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        self.shared
            .lock()
            .leases
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned()
    }

    /// A metadata annotation of a pod, as the server holds it now.
    pub fn pod_annotation(&self, namespace: &str, name: &str, key: &str) -> Option<String> {
        let st = self.shared.lock();
        st.objects
            .get("api/v1/pods")
            .and_then(|o| o.get(&(namespace.to_owned(), name.to_owned())))
            .and_then(|p| {
                p["metadata"]["annotations"][key]
                    .as_str()
                    .map(str::to_owned)
            })
    }
}

/// Answers a TokenReview as the API server does: authenticated only for a known token
/// valid for one of the audiences asked; the answer's audiences are that overlap; a
/// bound token's user carries its pod's node in `extra`.
fn token_review(shared: &Arc<Shared>, mut review: Value) -> Value {
    let mut st = shared.lock();
    st.requests.token_reviews += 1;
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let asked: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_else(|| vec!["https://kubernetes.default.svc".to_owned()]);
    let answer = match st.tokens.get(token) {
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
        Some(info) => {
            let overlap: Vec<&String> = asked
                .iter()
                .filter(|a| info.audiences.contains(a))
                .collect();
            if overlap.is_empty() {
                json!({"authenticated": false,
                    "error": "token audiences is invalid for the target audiences"})
            } else {
                let mut user = json!({"username": info.username,
                    "groups": ["system:serviceaccounts", "system:authenticated"]});
                if let Some(node) = &info.node {
                    user["extra"] = json!({"authentication.kubernetes.io/node-name": [node]});
                }
                json!({"authenticated": true, "audiences": overlap, "user": user})
            }
        }
    };
    drop(st);
    review["status"] = answer;
    review
}

fn handle(shared: &Arc<Shared>, req: Request<hyper::body::Incoming>) -> Response<Body> {
    let path = req.uri().path().trim_start_matches('/').to_owned();
    let Some((api_version, kind, path)) = RESOURCES.iter().find(|(_, _, p)| *p == path).copied()
    else {
        return full(StatusCode::NOT_FOUND, &status(404, "NotFound", "not found"));
    };
    let q = query(&req);
    let watching = matches!(q.get("watch").map(String::as_str), Some("1" | "true"));
    let mut st = shared.lock();
    if st.absent.contains(path) {
        return full(
            StatusCode::NOT_FOUND,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        );
    }
    if !watching {
        *st.requests.lists.entry(path.to_owned()).or_default() += 1;
        // Pages as a real server cuts them: `limit` items, and a `continue` token
        // (here: the list's resourceVersion and the offset) while more remain.
        let (rv, offset) = match q.get("continue").and_then(|t| t.split_once('-')) {
            Some((rv, off)) => (
                rv.parse().unwrap_or(st.rv),
                off.parse::<usize>().unwrap_or(0),
            ),
            None => (st.rv, 0),
        };
        let limit = q
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let all = st.objects.get(path);
        let total = all.map_or(0, BTreeMap::len);
        let items: Vec<Value> = all
            .into_iter()
            .flat_map(|o| o.values())
            .skip(offset)
            .take(limit)
            .map(|v| {
                // As a real server lists them: items carry no apiVersion/kind.
                let mut v = v.clone();
                if let Some(m) = v.as_object_mut() {
                    m.remove("apiVersion");
                    m.remove("kind");
                }
                v
            })
            .collect();
        let next = offset + items.len();
        let mut metadata = json!({"resourceVersion": rv.to_string()});
        if next < total {
            metadata["continue"] = format!("{rv}-{next}").into();
            metadata["remainingItemCount"] = (total - next).into();
            st.requests.pages += 1;
        }
        let list = json!({"apiVersion": api_version, "kind": format!("{kind}List"),
            "metadata": metadata, "items": items});
        return full(StatusCode::OK, &list);
    }
    *st.requests.watches.entry(path.to_owned()).or_default() += 1;
    if st.refuse_watches {
        return full(
            StatusCode::SERVICE_UNAVAILABLE,
            &status(503, "ServiceUnavailable", "the fake server is down"),
        );
    }
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(st.rv);
    let bookmarks = q.get("allowWatchBookmarks").is_some_and(|v| v == "true");
    let timeout = q
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(290), Duration::from_secs);
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    if from < st.oldest {
        st.requests.gone += 1;
        let gone = json!({"type": "ERROR", "object": status(410, "Expired",
            &format!("too old resource version: {from} ({})", st.oldest))});
        let _ = tx.try_send(Bytes::from(format!("{gone}\n")));
    } else {
        let epoch = st.epoch;
        drop(st);
        let w = Watch {
            path,
            api_version,
            kind,
            from,
            bookmarks,
            timeout,
            epoch,
        };
        tokio::spawn(stream_events(shared.clone(), w, tx));
    }
    let body = StreamBody::new(
        tokio_stream::wrappers::ReceiverStream::new(rx)
            .map(|b| Ok::<_, Infallible>(Frame::data(b))),
    );
    let mut r = Response::new(http_body_util::BodyExt::boxed(body));
    r.headers_mut()
        .insert("content-type", "application/json".parse().expect("static"));
    r
}

use tokio_stream::StreamExt as _;

/// One open watch.
struct Watch {
    path: &'static str,
    api_version: &'static str,
    kind: &'static str,
    from: u64,
    bookmarks: bool,
    timeout: Duration,
    /// The server's epoch when it began: a later one ends it.
    epoch: u64,
}

async fn stream_events(shared: Arc<Shared>, w: Watch, tx: mpsc::Sender<Bytes>) {
    let Watch {
        path,
        api_version,
        kind,
        mut from,
        bookmarks,
        timeout,
        epoch,
    } = w;
    let mut changed = shared.changed.subscribe();
    let end = Instant::now() + timeout;
    let mut last_bookmark = Instant::now();
    loop {
        let lines: Vec<String> = {
            let st = shared.lock();
            if st.epoch != epoch {
                return;
            }
            let mut lines: Vec<String> = st
                .events
                .iter()
                .filter(|e| e.rv > from && e.path == path)
                .map(|e| json!({"type": e.kind, "object": e.object}).to_string())
                .collect();
            if let Some(last) = st
                .events
                .iter()
                .filter(|e| e.path == path)
                .map(|e| e.rv)
                .max()
            {
                from = from.max(last);
            }
            if bookmarks && last_bookmark.elapsed() >= Duration::from_secs(1) {
                from = st.rv.max(from);
                lines.push(
                    json!({"type": "BOOKMARK", "object": {"apiVersion": api_version, "kind": kind,
                        "metadata": {"resourceVersion": from.to_string()}}})
                    .to_string(),
                );
                last_bookmark = Instant::now();
            }
            lines
        };
        for l in lines {
            if tx.send(Bytes::from(l + "\n")).await.is_err() {
                return;
            }
        }
        if Instant::now() >= end {
            return;
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}
