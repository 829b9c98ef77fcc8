//! TLS configurations for HBONE, built once and reused: a server
//! configuration per local identity and a client configuration per (local,
//! peer) identity pair, each rebuilt only when its certificate was renewed
//! or the trusted roots changed. Every handshake therefore uses the current
//! certificate and the current roots, without building a verifier per
//! connection.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

use rustls_pki_types::CertificateDer;
use weft_api::Identity;
use weft_hbone::{tls, TlsError};
use weft_pki::WorkloadCert;

use crate::certs::{CertManager, IdentityError};

/// Client configurations kept at most (one per peer identity in use); past
/// it the cache starts over.
const MAX_CLIENT_CONFIGS: usize = 4096;

#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsConfigError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

impl From<TlsConfigError> for weft_hbone::HboneError {
    fn from(e: TlsConfigError) -> Self {
        match e {
            TlsConfigError::Identity(e) => weft_hbone::HboneError::Credentials(Arc::new(e)),
            TlsConfigError::Tls(t) => weft_hbone::HboneError::Tls(t),
        }
    }
}

struct Cached<T> {
    leaf: CertificateDer<'static>,
    trust_generation: u64,
    config: Arc<T>,
}

pub struct TlsConfigs {
    certs: Arc<CertManager>,
    server: Mutex<HashMap<Identity, Cached<rustls::ServerConfig>>>,
    client: Mutex<HashMap<(Identity, Identity), Cached<rustls::ClientConfig>>>,
}

impl TlsConfigs {
    pub fn new(certs: Arc<CertManager>) -> Arc<Self> {
        Arc::new(Self {
            certs,
            server: Mutex::default(),
            client: Mutex::default(),
        })
    }

    pub fn certs(&self) -> &Arc<CertManager> {
        &self.certs
    }

    /// The HBONE server configuration of `me`.
    pub async fn server(&self, me: &Identity) -> Result<Arc<rustls::ServerConfig>, TlsConfigError> {
        let cert = self.certs.fetch(me).await?;
        cached(
            &self.server,
            me.clone(),
            &cert,
            self.certs.trust().generation(),
            |trust| tls::server_config(&cert, trust),
            &self.certs,
            usize::MAX,
        )
    }

    /// The HBONE client configuration of `me` dialling a peer that must
    /// prove `peer`.
    pub async fn client(
        &self,
        me: &Identity,
        peer: &Identity,
    ) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
        let cert = self.certs.fetch(me).await?;
        cached(
            &self.client,
            (me.clone(), peer.clone()),
            &cert,
            self.certs.trust().generation(),
            |trust| tls::client_config(&cert, trust, peer),
            &self.certs,
            MAX_CLIENT_CONFIGS,
        )
    }
}

/// The cached configuration for `key` if it was built from `cert` and the
/// current roots, otherwise a new one (the generation is read before the
/// roots, so a change in between only causes one more rebuild).
fn cached<K: Hash + Eq, T>(
    cache: &Mutex<HashMap<K, Cached<T>>>,
    key: K,
    cert: &WorkloadCert,
    trust_generation: u64,
    build: impl FnOnce(&weft_pki::TrustBundle) -> Result<Arc<T>, TlsError>,
    certs: &CertManager,
    max: usize,
) -> Result<Arc<T>, TlsConfigError> {
    let leaf = cert.chain.first();
    {
        let map = cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&key) {
            if c.trust_generation == trust_generation && Some(&c.leaf) == leaf {
                return Ok(c.config.clone());
            }
        }
    }
    let config = build(&certs.trust().get())?;
    let mut map = cache.lock().unwrap_or_else(|p| p.into_inner());
    if map.len() >= max {
        map.clear();
    }
    if let Some(leaf) = leaf {
        map.insert(
            key,
            Cached {
                leaf: leaf.clone(),
                trust_generation,
                config: config.clone(),
            },
        );
    }
    Ok(config)
}
