//! Certificates for the workloads of this node. `CertProvider` is the
//! boundary the controller's CA client will implement; `LocalCaProvider`
//! signs with a CA on local disk until then. `CertManager` caches one
//! certificate per identity and renews it at half life.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::ca::LocalCa;
use crate::{TrustBundle, WorkloadCert};
use weft_api::Identity;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("certificate authority refused {identity}: {reason}")]
    Refused { identity: String, reason: String },
    #[error("certificate authority unavailable: {0}")]
    Unavailable(String),
}

/// Signs workload certificates (the mesh CA, local or remote).
pub trait CertProvider: Send + Sync + 'static {
    fn fetch<'a>(&'a self, id: &'a Identity) -> BoxFuture<'a, Result<WorkloadCert, IdentityError>>;
    fn trust_bundle(&self) -> TrustBundle;
}

pub struct LocalCaProvider {
    ca: LocalCa,
    ttl: Duration,
}

impl LocalCaProvider {
    pub fn new(ca: LocalCa, ttl: Duration) -> Self {
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

    fn trust_bundle(&self) -> TrustBundle {
        self.ca.trust_bundle()
    }
}

pub struct CertManager {
    provider: Arc<dyn CertProvider>,
    cache: Mutex<HashMap<Identity, WorkloadCert>>,
}

impl CertManager {
    pub fn new(provider: Arc<dyn CertProvider>) -> Arc<Self> {
        Arc::new(Self {
            provider,
            cache: Mutex::new(HashMap::new()),
        })
    }

    pub fn trust_bundle(&self) -> TrustBundle {
        self.provider.trust_bundle()
    }

    /// The current certificate for `id`, fetched or renewed when past half
    /// life. A renewal failure keeps serving the old certificate until it
    /// expires.
    pub async fn fetch(&self, id: &Identity) -> Result<WorkloadCert, IdentityError> {
        let now = SystemTime::now();
        let cached = self.lock().get(id).cloned();
        if let Some(cert) = &cached {
            if now < cert.refresh_at() {
                return Ok(cert.clone());
            }
        }
        match self.provider.fetch(id).await {
            Ok(cert) => {
                self.lock().insert(id.clone(), cert.clone());
                Ok(cert)
            }
            Err(e) => match cached {
                Some(old) if !old.is_expired(now) => {
                    tracing::warn!(component = "identity", identity = %id, error = %e, "certificate renewal failed; serving the current one until it expires");
                    Ok(old)
                }
                _ => Err(e),
            },
        }
    }

    /// (identity, not_after) of every cached certificate, for /config_dump.
    pub fn snapshot(&self) -> Vec<(String, SystemTime)> {
        let mut v: Vec<_> = self
            .lock()
            .values()
            .map(|c| (c.identity.to_string(), c.not_after))
            .collect();
        v.sort();
        v
    }

    pub fn forget(&self, id: &Identity) {
        self.lock().remove(id);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, WorkloadCert>> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}
