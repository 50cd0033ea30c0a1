//! `mesh-agent ca`: the mesh's certificate authority, a gRPC service over TLS.
mod authority;
mod listener;
mod node_auth;
mod rate;
mod service;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tonic::transport::Server;
use tracing::info;

pub use authority::{Authority, Source};

use crate::{
    api::ca::certificate_service_server::CertificateServiceServer,
    cli::CaArgs,
    config::{ConfigWatch, Directory},
};

pub async fn run(args: CaArgs) -> anyhow::Result<()> {
    crate::limits::raise_fd_limit();
    let source = match (&args.root_cert, &args.signing_cert, &args.signing_key) {
        (Some(root_cert), signing_cert, Some(signing_key)) => Source::Files {
            root_cert,
            signing_cert: signing_cert.as_deref().unwrap_or(root_cert),
            signing_key,
        },
        (None, None, None) => Source::StateDir(&args.state_dir),
        _ => anyhow::bail!(
            "--root-cert and --signing-key go together (with --signing-cert for an intermediate)"
        ),
    };
    let (authority, generated) = Authority::load(source, &args.trust_domain, args.max_cert_ttl)
        .context("loading the CA's keys")?;
    if generated {
        info!(dir = %args.state_dir.display(), "generated a new root CA");
    }
    let (chain, key) = authority
        .serving_cert(&args.server_name)
        .context("issuing the CA's serving certificate")?;
    let config = ConfigWatch::start(Directory::new(args.config_dir.clone()));
    let service = service::CaService {
        authority: Arc::new(authority),
        nodes: Arc::new(node_auth::TokenFile {
            path: args.node_tokens.clone(),
        }),
        config: config.updates.clone(),
        rate: rate::SigningRate::default(),
    };
    let tls = listener::server_config(&chain, &key).context("CA TLS settings")?;
    let tcp = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let incoming = listener::incoming(tcp, tls);
    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    info!(listen = %args.listen, trust_domain = %args.trust_domain, "CA serving");
    Server::builder()
        // A silent peer is found and dropped; a request cannot hold a slot forever.
        .http2_keepalive_interval(Some(std::time::Duration::from_secs(20)))
        .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
        .timeout(std::time::Duration::from_secs(10))
        .max_concurrent_streams(Some(16))
        .concurrency_limit_per_connection(16)
        .add_service(CertificateServiceServer::new(service))
        .serve_with_incoming_shutdown(incoming, async move {
            tokio::select! {
                _ = sigterm.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            info!("CA shutting down");
        })
        .await
        .context("CA server")?;
    drop(config);
    Ok(())
}
