//! Workload certificates from the controller's CA (`weft.v1.Ca`): a fresh
//! P-256 key per request, a CSR carrying only the SPIFFE URI SAN, and the
//! node's bearer token. Also the trust bundle the TLS code verifies peers
//! against, shared with the config stream (`source::grpc`) which delivers
//! root rotations.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::{TrustBundle, WorkloadCert};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use tonic::transport::Channel;
use weft_api::proto::ca_client::CaClient;
use weft_api::proto::{bearer, CreateCertificateRequest};
use weft_api::Identity;

use super::addr::ControllerAddr;
use super::identity::{BoxFuture, CertProvider, IdentityError};

/// The mesh trust roots as last heard from the controller (the config
/// stream or a CA response; both carry the complete set). Empty until the
/// first contact, which makes every TLS handshake fail closed.
#[derive(Clone)]
pub struct SharedTrustBundle {
    inner: Arc<RwLock<TrustBundle>>,
}

impl Default for SharedTrustBundle {
    fn default() -> Self {
        Self {
            inner: Arc::new(RwLock::new(TrustBundle { roots: Vec::new() })),
        }
    }
}

impl SharedTrustBundle {
    pub fn get(&self) -> TrustBundle {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, bundle: TrustBundle) {
        let mut g = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if *g != bundle {
            tracing::info!(
                component = "identity",
                roots = bundle.roots.len(),
                "trust bundle updated"
            );
            *g = bundle;
        }
    }
}

/// A [`CertProvider`] backed by the controller's CA.
pub struct GrpcCaProvider {
    client: CaClient<Channel>,
    token: String,
    ttl: Duration,
    trust: SharedTrustBundle,
}

impl GrpcCaProvider {
    /// Connects lazily to `endpoint` (e.g. `http://controller:15012`); call
    /// inside a Tokio runtime. `ttl` is the lifetime asked for (the CA caps
    /// it).
    pub fn new(
        endpoint: impl Into<ControllerAddr>,
        token: String,
        ttl: Duration,
        trust: SharedTrustBundle,
    ) -> Result<Self, IdentityError> {
        let channel = endpoint
            .into()
            .endpoint()
            .map_err(IdentityError::Unavailable)?
            .timeout(Duration::from_secs(15))
            .connect_lazy();
        Ok(Self {
            client: CaClient::new(channel),
            token,
            ttl,
            trust,
        })
    }

    pub fn trust(&self) -> &SharedTrustBundle {
        &self.trust
    }

    async fn request(&self, id: &Identity) -> Result<WorkloadCert, IdentityError> {
        let refused = |reason: String| IdentityError::Refused {
            identity: id.to_string(),
            reason,
        };
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .map_err(|e| refused(format!("key generation: {e}")))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let uri = id
            .to_string()
            .try_into()
            .map_err(|e| refused(format!("identity is not a valid URI SAN: {e}")))?;
        params.subject_alt_names = vec![SanType::URI(uri)];
        let csr_pem = params
            .serialize_request(&key)
            .and_then(|csr| csr.pem())
            .map_err(|e| refused(format!("CSR: {e}")))?;

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
                        refused(format!("{:?}: {}", s.code(), s.message()))
                    }
                    _ => IdentityError::Unavailable(format!("{:?}: {}", s.code(), s.message())),
                }
            })?;
        let resp = resp.into_inner();
        let cert = WorkloadCert::from_pem(&resp.cert_chain_pem.concat(), &key.serialize_pem())
            .map_err(|e| refused(format!("CA answered with an unusable chain: {e}")))?;
        if &cert.identity != id {
            return Err(refused(format!(
                "CA issued a certificate for {} instead",
                cert.identity
            )));
        }
        if !resp.trust_bundle_pem.is_empty() {
            match TrustBundle::from_pem(&resp.trust_bundle_pem) {
                Ok(b) => self.trust.set(b),
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

    fn trust_bundle(&self) -> TrustBundle {
        self.trust.get()
    }
}
