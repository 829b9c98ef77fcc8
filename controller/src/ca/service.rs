//! The `weft.v1.Ca` gRPC service: authenticates the caller, checks that it
//! may have the identity in its request (`auth`), and has the mesh CA sign
//! the request; the answer carries the current trust bundle.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use weft_api::proto::ca_server::{Ca, CaServer};
use weft_api::proto::{CreateCertificateRequest, CreateCertificateResponse};
use weft_api::MeshModel;
use weft_pki::signer::Csr;
use weft_pki::PkiError;

use super::auth::{authenticate_caller, authorize, Authenticator};
use super::error::CaError;
use super::MeshCa;

/// The `weft.v1.Ca` service.
#[derive(Clone)]
pub struct CaService {
    ca: Arc<MeshCa>,
    auth: Arc<dyn Authenticator>,
    models: watch::Receiver<Arc<MeshModel>>,
}

impl CaService {
    pub fn new(
        ca: Arc<MeshCa>,
        auth: Arc<dyn Authenticator>,
        models: watch::Receiver<Arc<MeshModel>>,
    ) -> Self {
        Self { ca, auth, models }
    }

    pub fn into_service(self) -> CaServer<Self> {
        CaServer::new(self)
    }
}

#[tonic::async_trait]
impl Ca for CaService {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let caller = authenticate_caller(self.auth.as_ref(), request.metadata())
            .await
            .inspect_err(|s| {
                warn!(
                    component = "ca",
                    error = s.message(),
                    "certificate request refused: authentication"
                )
            })?;
        let req = request.into_inner();
        let csr =
            Csr::from_pem(&req.csr_pem).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let node = caller.node.clone();
        if let Err(why) = authorize(&self.models.borrow(), &caller, &csr.identity) {
            warn!(component = "ca", node = %node, identity = %csr.identity, reason = %why, "certificate request refused");
            return Err(Status::permission_denied(why));
        }
        let issued = self
            .ca
            .sign(csr, Duration::from_secs(req.requested_ttl_seconds))
            .map_err(|e| match e {
                CaError::Pki(PkiError::WrongTrustDomain { .. }) => {
                    Status::permission_denied(e.to_string())
                }
                e => Status::internal(e.to_string()),
            })?;
        info!(component = "ca", node = %node, identity = %issued.identity, "certificate issued");
        Ok(Response::new(CreateCertificateResponse {
            cert_chain_pem: issued.chain_pem,
            trust_bundle_pem: self.ca.trust_bundle().to_pem(),
        }))
    }
}
