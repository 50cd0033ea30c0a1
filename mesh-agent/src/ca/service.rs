//! The gRPC face of the CA: authenticate the node, check that the identity runs there,
//! sign.
use std::{sync::Arc, time::Duration};

use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::{
    authority::{Authority, SignRefusal},
    node_auth::{AuthError, NodeAuth},
};
use crate::{
    api::ca::{
        CreateCertificateRequest, CreateCertificateResponse,
        certificate_service_server::CertificateService,
    },
    config::Generation,
    identity::Identity,
};

/// How long a request for an identity the CA's view of the pods lacks waits for that
/// view to change before it is refused.
const CATCH_UP: Duration = Duration::from_secs(2);

pub struct CaService {
    pub authority: Arc<Authority>,
    pub nodes: Arc<NodeAuth>,
    /// The cluster's pods: which identities run on which node.
    pub config: watch::Receiver<Arc<Generation>>,
    /// CSRs per node and per identity: a misbehaving node (or a clock far ahead of
    /// the CA, renewing in a loop) cannot keep the CA busy.
    pub rate: super::rate::SigningRate,
}

impl CaService {
    fn runs_on(&self, node: &str, id: &Identity) -> bool {
        self.config.borrow().config.pods.iter().any(|p| {
            p.node_name.as_deref() == Some(node)
                && p.id.namespace == id.namespace
                && p.service_account == id.service_account
        })
    }
}

#[tonic::async_trait]
impl CertificateService for CaService {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        let node = self
            .nodes
            .authenticate(request.metadata())
            .await
            .map_err(|e| {
                warn!(%peer, error = %e, "CA request not authenticated");
                match e {
                    AuthError::Review(_) => Status::unavailable(e.to_string()),
                    _ => Status::unauthenticated(e.to_string()),
                }
            })?;
        let req = request.into_inner();
        if let Err(e) = self.rate.check(&node, &req.csr) {
            warn!(%node, error = %e, "CSR refused: rate limit");
            return Err(Status::resource_exhausted(e.to_string()));
        }
        let ttl = Duration::from_secs(u64::try_from(req.validity_duration_seconds).unwrap_or(0));
        let mut signed = self
            .authority
            .sign(&req.csr, &node, ttl, |id| self.runs_on(&node, id));
        // The agent and the CA watch the same pods; the agent may see a new pod first.
        // A pod the CA does not know yet gets until its view catches up (bounded)
        // before the refusal, instead of a failed request and the agent's retry.
        let deadline = tokio::time::Instant::now() + CATCH_UP;
        let mut config = self.config.clone();
        while matches!(signed, Err(SignRefusal::NotOnNode { .. })) {
            match tokio::time::timeout_at(deadline, config.changed()).await {
                Ok(Ok(())) => {}
                _ => break,
            }
            signed = self
                .authority
                .sign(&req.csr, &node, ttl, |id| self.runs_on(&node, id));
        }
        match signed {
            Ok((identity, cert_chain)) => {
                info!(%node, %identity, "certificate signed");
                Ok(Response::new(CreateCertificateResponse {
                    cert_chain,
                    trust_bundle: self.authority.roots_pem().to_vec(),
                }))
            }
            Err(e) => {
                warn!(%node, error = %e, "CSR refused");
                Err(match e {
                    SignRefusal::NotOnNode { .. } | SignRefusal::WrongTrustDomain(..) => {
                        Status::permission_denied(e.to_string())
                    }
                    SignRefusal::Sign(_) => Status::internal(e.to_string()),
                    _ => Status::invalid_argument(e.to_string()),
                })
            }
        }
    }
}
