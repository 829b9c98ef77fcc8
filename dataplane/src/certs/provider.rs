//! Who signs workload certificates: the boundary the certificate manager
//! asks through. The controller's CA answers over gRPC
//! (`control::ca_client`); the standalone CA signs locally.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use weft_api::Identity;
use weft_pki::{LocalCa, WorkloadCert};

use super::TrustRoots;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    /// The CA will not issue this (bad token, identity not on this node):
    /// asking again will not help until something changes.
    #[error("certificate authority refused {identity}: {reason}")]
    Refused { identity: String, reason: String },
    /// The CA could not be reached or failed; worth retrying.
    #[error("certificate authority unavailable: {0}")]
    Unavailable(String),
}

/// Signs workload certificates (the mesh CA, local or remote).
pub trait CertProvider: Send + Sync + 'static {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, IdentityError>>;
}

/// The standalone CA: signs with a root on local disk, whose certificate is
/// the whole trust bundle.
pub struct LocalCaProvider {
    ca: LocalCa,
    ttl: Duration,
}

/// Lifetime the standalone CA gives when none is asked for.
pub const LOCAL_DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

impl LocalCaProvider {
    /// Also makes `trust` the CA's own root. `ttl` zero: 24 h.
    pub fn new(ca: LocalCa, ttl: Duration, trust: &TrustRoots) -> Self {
        trust.set(ca.trust_bundle());
        let ttl = if ttl.is_zero() {
            LOCAL_DEFAULT_TTL
        } else {
            ttl
        };
        Self { ca, ttl }
    }
}

impl CertProvider for LocalCaProvider {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, IdentityError>> {
        Box::pin(async move {
            self.ca
                .sign(id, self.ttl)
                .map_err(|e| IdentityError::Refused {
                    identity: id.to_string(),
                    reason: e.to_string(),
                })
        })
    }
}
