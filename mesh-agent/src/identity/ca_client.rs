//! The agent's side of the CA API: a TLS gRPC channel to the CA that authenticates the
//! node with its bootstrap token and sends one CSR per identity.
use std::{net::SocketAddr, time::Duration};

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
    authorization: MetadataValue<Ascii>,
}

impl CaClient {
    /// `root_pem` is the CA's root, which the CA's serving certificate chains to;
    /// `server_name` is the name in that certificate.
    pub fn new(
        addr: SocketAddr,
        server_name: &str,
        root_pem: &str,
        token: &str,
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
        let authorization = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| CaClientError::Token)?;
        Ok(CaClient {
            client: CertificateServiceClient::new(channel),
            authorization,
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
            req.metadata_mut()
                .insert("authorization", self.authorization.clone());
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
