//! `mesh-agent ca`: the mesh's certificate authority, a gRPC service over TLS.
mod authority;
mod listener;
mod node_auth;
mod rate;
mod service;
mod token_review;

use std::sync::Arc;

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tonic::transport::Server;
use tracing::info;

pub use authority::{Authority, Source};

use crate::{
    api::ca::certificate_service_server::CertificateServiceServer,
    cli::{CaArgs, Source as ConfigSourceArg},
    config::{ApiSource, ConfigWatch, Directory},
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
    let source = args.source.source();
    let client = match &source {
        ConfigSourceArg::Kubernetes(kubeconfig) => {
            Some(crate::config::api_client(kubeconfig.as_deref()).await?)
        }
        ConfigSourceArg::Directory(_) => None,
    };
    let config = match (&source, &client) {
        (ConfigSourceArg::Directory(dir), _) => ConfigWatch::start(Directory::new(dir.clone())),
        (ConfigSourceArg::Kubernetes(_), Some((client, server))) => {
            // Which pods run where is all the CA reads.
            ConfigWatch::start(
                ApiSource::new(client.clone(), server.clone()).only(&[crate::config::Kind::Pod]),
            )
        }
        (ConfigSourceArg::Kubernetes(_), None) => anyhow::bail!("no Kubernetes client"),
    };
    let nodes = match (&args.node_auth.node_tokens, &client) {
        (Some(path), _) => node_auth::NodeAuth::Tokens(node_auth::TokenFile { path: path.clone() }),
        (None, Some((client, _))) => {
            node_auth::NodeAuth::TokenReview(Box::new(token_review::TokenReviewer::new(
                client.clone(),
                args.token_audience.clone(),
                &args.agent_service_account,
            )?))
        }
        (None, None) => anyhow::bail!(
            "--token-review asks the Kubernetes API: give --kubernetes or --kubeconfig"
        ),
    };
    info!(source = ?source, node_auth = if args.node_auth.token_review { "token-review" } else { "node-tokens" },
        "CA config");
    let service = service::CaService {
        authority: Arc::new(authority),
        nodes: Arc::new(nodes),
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
