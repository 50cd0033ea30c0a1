//! The agent's side of the CA API: a TLS gRPC channel to the CA that authenticates the
//! node with its token and sends one CSR per identity. The token file is read for
//! every request: a projected service-account token is rotated by the kubelet while
//! the agent runs.
use std::{path::PathBuf, time::Duration};

use futures_util::future::BoxFuture;
use tonic::{
    Code, Request,
    metadata::{Ascii, MetadataValue},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
};

use super::manager::{SignError, Signed, Signer};
use crate::api::ca::{
    CreateCertificateRequest, certificate_service_client::CertificateServiceClient,
};

#[derive(Debug, thiserror::Error)]
pub enum CaClientError {
    #[error("CA endpoint: {0}")]
    Endpoint(#[from] tonic::transport::Error),
    #[error("the node token is not a valid header value")]
    Token,
}

pub struct CaClient {
    client: CertificateServiceClient<Channel>,
    token_file: PathBuf,
}

/// The `authorization` header for `token` (the file's text, trimmed).
fn authorization(token: &str) -> Result<MetadataValue<Ascii>, CaClientError> {
    format!("Bearer {}", token.trim())
        .parse()
        .map_err(|_| CaClientError::Token)
}

impl CaClient {
    /// `root_pem` is the CA's root, which the CA's serving certificate chains to;
    /// `server_name` is the name in that certificate.
    /// `addr` is `host:port`; a name is resolved on each connect.
    pub fn new(
        addr: &str,
        server_name: &str,
        root_pem: &str,
        token_file: PathBuf,
    ) -> Result<CaClient, CaClientError> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root_pem))
            .domain_name(server_name);
        // Lazy: the agent starts without the CA and reconnects on its own.
        let channel = Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .connect_lazy();
        Ok(CaClient {
            client: CertificateServiceClient::new(channel),
            token_file,
        })
    }
}

impl Signer for CaClient {
    fn sign(&self, csr_pem: String, ttl: Duration) -> BoxFuture<'_, Result<Signed, SignError>> {
        Box::pin(async move {
            let mut req = Request::new(CreateCertificateRequest {
                csr: csr_pem,
                validity_duration_seconds: i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX),
            });
            let token = tokio::fs::read_to_string(&self.token_file)
                .await
                .map_err(|e| {
                    SignError::Call(format!(
                        "reading the node token {}: {e}",
                        self.token_file.display()
                    ))
                })?;
            let header = authorization(&token).map_err(|e| SignError::Call(e.to_string()))?;
            req.metadata_mut().insert("authorization", header);
            let resp = self
                .client
                .clone()
                .create_certificate(req)
                .await
                .map_err(|s| match s.code() {
                    Code::PermissionDenied | Code::Unauthenticated | Code::InvalidArgument => {
                        SignError::Refused(s.message().to_owned())
                    }
                    _ => SignError::Call(format!("{}: {}", s.code(), s.message())),
                })?
                .into_inner();
            Ok(Signed {
                chain_pem: resp.cert_chain,
                trust_bundle_pem: resp.trust_bundle,
            })
        })
    }
}
