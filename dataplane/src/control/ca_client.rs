//! Workload certificates from the controller's CA (`weft.v1.Ca`): a fresh
//! P-256 key per request, a CSR carrying only the SPIFFE URI SAN, and this
//! process's bearer token. Each answer also carries the mesh roots, which
//! go to the shared [`TrustRoots`].

use std::time::Duration;

use tonic::transport::Channel;
use weft_api::proto::ca_client::CaClient;
use weft_api::proto::{bearer, CreateCertificateRequest};
use weft_api::Identity;
use weft_pki::signer::Csr;
use weft_pki::{TrustBundle, WorkloadCert};

use super::addr::ControllerAddr;
use super::trust::status_text;
use crate::certs::{BoxFuture, CertProvider, IdentityError, TrustRoots};

/// A [`CertProvider`] backed by the controller's CA.
pub struct GrpcCaProvider {
    client: CaClient<Channel>,
    token: String,
    ttl: Duration,
    trust: TrustRoots,
}

impl GrpcCaProvider {
    /// Connects lazily to `endpoint` (e.g. `https://controller:15012`), and
    /// again after each disconnection under the roots trusted then; call
    /// inside a Tokio runtime. `ttl` is the lifetime asked for (zero: the
    /// CA's default; the CA caps it).
    pub fn new(
        endpoint: impl Into<ControllerAddr>,
        token: String,
        ttl: Duration,
        trust: TrustRoots,
    ) -> Result<Self, IdentityError> {
        let addr = endpoint.into();
        let ep = addr
            .endpoint()
            .map_err(IdentityError::Unavailable)?
            .timeout(Duration::from_secs(15));
        let channel = addr.connect_lazy(ep);
        Ok(Self {
            client: CaClient::new(channel),
            token,
            ttl,
            trust,
        })
    }

    async fn request(&self, id: &Identity) -> Result<WorkloadCert, IdentityError> {
        let refused = |reason: String| IdentityError::Refused {
            identity: id.to_string(),
            reason,
        };
        let (csr_pem, key_pem) = Csr::generate(id).map_err(|e| refused(e.to_string()))?;
        let mut req = tonic::Request::new(CreateCertificateRequest {
            csr_pem,
            requested_ttl_seconds: self.ttl.as_secs(),
        });
        let auth = bearer(&self.token)
            .parse()
            .map_err(|_| IdentityError::Unavailable("token is not valid metadata".into()))?;
        req.metadata_mut().insert("authorization", auth);
        let resp = self
            .client
            .clone()
            .create_certificate(req)
            .await
            .map_err(|s| {
                use tonic::Code;
                match s.code() {
                    Code::PermissionDenied | Code::Unauthenticated | Code::InvalidArgument => {
                        refused(status_text(&s))
                    }
                    _ => IdentityError::Unavailable(status_text(&s)),
                }
            })?;
        let resp = resp.into_inner();
        let cert = WorkloadCert::from_pem(&resp.cert_chain_pem.concat(), &key_pem)
            .map_err(|e| refused(format!("CA answered with an unusable chain: {e}")))?;
        if &cert.identity != id {
            return Err(refused(format!(
                "CA issued a certificate for {} instead",
                cert.identity
            )));
        }
        if !resp.trust_bundle_pem.is_empty() {
            match TrustBundle::from_pem(&resp.trust_bundle_pem) {
                Ok(b) => {
                    self.trust.set(b);
                }
                Err(e) => {
                    tracing::warn!(component = "identity", error = %e, "CA sent an unusable trust bundle; keeping the current one")
                }
            }
        }
        Ok(cert)
    }
}

impl CertProvider for GrpcCaProvider {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, IdentityError>> {
        Box::pin(self.request(id))
    }
}
