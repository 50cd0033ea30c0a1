//! Entry points of the fuzz targets (`fuzz/fuzz_targets`, run by `cargo xtask fuzz`):
//! each feeds untrusted bytes to the code that faces them in the agent, and checks
//! what must hold for any input. The targets are one line each; the corpora and any
//! crash reproducers live in `fuzz/`, and the unit test below replays them on stable.
//!
//! Not part of the agent's API.
use std::{net::IpAddr, sync::OnceLock};

use crate::{
    authz::PolicySet,
    config::{Config, Kind, fuzz as config_fuzz},
    state::{HttpRoutes, RouteTable, WorkloadIndex},
};

/// What every decision built from a config is built from, as the agent builds it.
fn build_state(config: &Config) {
    let routes = RouteTable::build(config);
    let _ = routes.service_entries();
    let _ = HttpRoutes::build(config, &[25, 3306]);
    let _ = PolicySet::build(config, "istio-system");
    let _ = WorkloadIndex::build(config, "cluster.local");
}

/// A file of the config directory (any kind, any number of documents).
pub fn config_yaml(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match config_fuzz::from_yaml(text) {
        Ok(config) => build_state(&config),
        // A rejection names the file (the object and field when there is one).
        Err(e) => assert!(e.contains(config_fuzz::FILE), "{e}"),
    }
}

/// An object from the Kubernetes API (Istio, Gateway API and core kinds): the first
/// byte picks the kind, the rest is its JSON.
pub fn api_object(data: &[u8]) {
    let Some((&pick, json)) = data.split_first() else {
        return;
    };
    let kind = Kind::ALL[usize::from(pick) % Kind::ALL.len()];
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(json) else {
        return;
    };
    if let Ok(config) = config_fuzz::from_json(kind, value) {
        build_state(&config);
    }
}

/// Protocol detection on a client's first bytes, in one read and byte by byte: the
/// verdict must not depend on how the bytes arrive, and the bytes read must be
/// given back whole.
pub fn detect(data: &[u8]) {
    use crate::proxy::http::detect::{Detected, MAX_PEEK, classify, detect};
    let once = classify(data);
    let runtime = runtime();
    let (whole, prefix) = runtime.block_on(async {
        let mut io = data;
        detect(&mut io, std::time::Duration::from_secs(1))
            .await
            .unwrap_or((Detected::Opaque, Default::default()))
    });
    assert!(data.starts_with(&prefix), "detection lost or changed bytes");
    if data.len() >= MAX_PEEK || once.is_some() {
        let piecewise = runtime.block_on(async {
            let mut io = tokio_test_reader(data);
            detect(&mut io, std::time::Duration::from_secs(1))
                .await
                .map(|(d, _)| d)
                .unwrap_or(Detected::Opaque)
        });
        assert_eq!(
            whole, piecewise,
            "the verdict depends on how the bytes arrive"
        );
    }
}

/// A reader that hands out one byte per read.
fn tokio_test_reader(data: &[u8]) -> impl tokio::io::AsyncRead + Unpin + '_ {
    struct OneByte<'a>(&'a [u8]);
    impl tokio::io::AsyncRead for OneByte<'_> {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if let Some((&b, rest)) = self.0.split_first()
                && buf.remaining() > 0
            {
                buf.put_slice(&[b]);
                self.0 = rest;
            }
            std::task::Poll::Ready(Ok(()))
        }
    }
    OneByte(data)
}

/// What a peer agent sends on the tunnel after TLS: HTTP/2 frames, served by the
/// same HTTP/2 server settings with the same CONNECT decision as the agent.
pub fn hbone_connect(data: &[u8]) {
    use http_body_util::Empty;
    use hyper::{Response, StatusCode, body::Bytes};
    let pod_ips = [IpAddr::from([10, 244, 1, 5])];
    runtime().block_on(async move {
        let (mut client, server) = tokio::io::duplex(data.len() + 1);
        let _ = tokio::io::AsyncWriteExt::write_all(&mut client, data).await;
        // The peer sent everything and went away.
        drop(client);
        let service = hyper::service::service_fn(move |req: hyper::Request<_>| {
            let code = if req.method() != hyper::Method::CONNECT {
                StatusCode::NOT_FOUND
            } else {
                match crate::proxy::connect_target(
                    req.uri().authority().map(|a| a.as_str()),
                    &pod_ips,
                ) {
                    Ok(t) => {
                        assert!(pod_ips.contains(&t.ip().to_canonical()));
                        assert!(!mesh_common::MESH_PORTS.contains(&t.port()));
                        StatusCode::OK
                    }
                    Err(crate::proxy::ConnectRefusal::NotThisPod) => StatusCode::BAD_REQUEST,
                    Err(crate::proxy::ConnectRefusal::MeshPort(_)) => StatusCode::FORBIDDEN,
                }
            };
            let mut r = Response::new(Empty::<Bytes>::new());
            *r.status_mut() = code;
            async move { Ok::<_, std::convert::Infallible>(r) }
        });
        let served = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .max_concurrent_streams(crate::proxy::TUNNEL_MAX_STREAMS)
            .serve_connection(hyper_util::rt::TokioIo::new(server), service);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), served).await;
    });
}

/// The admin API's requests: each message decoded from the bytes, and what the
/// agent does with its fields before touching anything (a log filter is checked, an
/// observe filter matched).
pub fn admin_request(data: &[u8]) {
    use crate::api::admin as pb;
    use prost::Message as _;
    if let Ok(level) = pb::LogLevel::decode(data) {
        let _ = crate::telemetry::check_filter(&level.filter);
    }
    if let Ok(r) = pb::ObserveRequest::decode(data) {
        let non_empty = |s: String| (!s.trim().is_empty()).then_some(s);
        let filter = crate::telemetry::FlowFilter {
            pod: non_empty(r.pod),
            service: non_empty(r.service),
            verdict: non_empty(r.verdict),
        };
        let mut flow =
            crate::telemetry::Flow::new(crate::telemetry::Origin::Agent, "forwarded", "forwarded");
        flow.pod = Some("default/client".into());
        flow.service = Some("default/web".into());
        let _ = filter.matches(&flow);
    }
    if let Ok(r) = pb::BpfMapsRequest::decode(data) {
        let _ = crate::bpf::inspect::known_map(r.dump.trim());
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap_or_else(|e| panic!("fuzzing runtime: {e}"))
    })
}

/// A request path from a client: normalizing never panics, is a fixed point (the
/// destination normalizes again what the source sent), leaves no dot segment and no
/// escape of an unreserved character, and the lenient reading is normal too (policy
/// checks it as it checks the first).
pub fn request_path(data: &[u8]) {
    use crate::authz::path::{lenient, normalize};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(once) = normalize(text) else {
        return;
    };
    assert_eq!(
        normalize(&once).ok().as_deref(),
        Some(&*once),
        "normalizing {text:?} twice changed it"
    );
    if !once.starts_with('/') {
        return;
    }
    assert!(
        !once.split('/').any(|s| s == "." || s == ".."),
        "{text:?} kept a dot segment: {once:?}"
    );
    let other = lenient(&once);
    if let Some(other) = other {
        assert!(
            !other.split('/').any(|s| s == "." || s == ".."),
            "the other reading of {text:?} kept a dot segment: {other:?}"
        );
        assert!(
            !other.contains("//"),
            "the other reading kept //: {other:?}"
        );
        assert_eq!(lenient(&other), None, "{other:?} is not a fixed point");
    }
}

#[cfg(test)]
mod tests {
    /// Writes the seed inputs of `hbone_connect` and `admin_request` (what a real
    /// peer sends: HTTP/2 from hyper's client, protobuf from prost). Run by hand:
    /// `cargo test -p mesh-agent --lib write_fuzz_seeds -- --ignored`.
    #[test]
    #[ignore = "writes fuzz/corpus; run by hand"]
    fn write_fuzz_seeds() {
        use prost::Message as _;
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        for (i, authority) in ["10.244.1.5:8080", "10.244.1.5:15008", "10.9.9.9:80"]
            .iter()
            .enumerate()
        {
            let bytes = super::runtime().block_on(capture_connect(authority));
            std::fs::write(root.join(format!("hbone_connect/connect-{i}.bin")), bytes).unwrap();
        }
        let admin = root.join("admin_request");
        let level = crate::api::admin::LogLevel {
            filter: "info,mesh_agent::proxy=debug".into(),
            kernel: "debug".into(),
        };
        std::fs::write(admin.join("log-level.bin"), level.encode_to_vec()).unwrap();
        let observe = crate::api::admin::ObserveRequest {
            pod: "default/client".into(),
            service: "web".into(),
            verdict: "denied".into(),
        };
        std::fs::write(admin.join("observe.bin"), observe.encode_to_vec()).unwrap();
        let maps = crate::api::admin::BpfMapsRequest {
            dump: "MESH_SETTINGS".into(),
        };
        std::fs::write(admin.join("bpf-maps.bin"), maps.encode_to_vec()).unwrap();
    }

    /// What hyper's HTTP/2 client writes for one CONNECT to `authority`.
    async fn capture_connect(authority: &str) -> Vec<u8> {
        use tokio::io::AsyncReadExt as _;
        let (client, mut server) = tokio::io::duplex(1 << 16);
        let (mut send, conn) =
            hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .handshake::<_, http_body_util::Empty<hyper::body::Bytes>>(
                    hyper_util::rt::TokioIo::new(client),
                )
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::connect(authority)
            .body(http_body_util::Empty::new())
            .unwrap();
        tokio::spawn(async move {
            let _ = send.send_request(req).await;
        });
        let mut out = vec![0u8; 1 << 16];
        let mut got = Vec::new();
        // The preface, SETTINGS, WINDOW_UPDATE and the CONNECT's HEADERS.
        while let Ok(Ok(n)) =
            tokio::time::timeout(std::time::Duration::from_millis(200), server.read(&mut out)).await
        {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&out[..n]);
        }
        got
    }

    /// Every input kept in `fuzz/corpus` and `fuzz/artifacts` (crash reproducers)
    /// replayed on stable: a crash once found stays fixed.
    #[test]
    fn the_fuzz_corpora_and_reproducers_replay_clean() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
        type Target = fn(&[u8]);
        let targets: [(&str, Target); 6] = [
            ("config_yaml", super::config_yaml),
            ("api_object", super::api_object),
            ("detect", super::detect),
            ("hbone_connect", super::hbone_connect),
            ("admin_request", super::admin_request),
            ("request_path", super::request_path),
        ];
        let mut replayed = 0;
        for (name, target) in targets {
            for dir in ["corpus", "artifacts"] {
                let Ok(entries) = std::fs::read_dir(root.join(dir).join(name)) else {
                    continue;
                };
                for e in entries.flatten() {
                    let data = std::fs::read(e.path()).unwrap();
                    target(&data);
                    replayed += 1;
                }
            }
        }
        assert!(replayed > 0, "no corpus under {}", root.display());
    }
}
