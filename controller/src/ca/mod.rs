//! The mesh CA: signs workload certificate requests from ztunnels and
//! waypoints with the mesh root (or a user-supplied intermediate), and
//! keeps the root rotating. Certificates, signing parameters and the CA
//! directory's files are `weft-pki`'s; this folder adds what only the
//! controller does:
//!
//! - here, [`MeshCa`]: the signer and trust bundle now, where the root is
//!   kept ([`store::RootStore`]), and the rotation state: [`MeshCa::rotate`]
//!   makes a new root the signer while the old one stays in the trust
//!   bundle (the overlap), so leaves issued before keep verifying until
//!   [`MeshCa::retire_previous_roots`], which should come after every old
//!   leaf has been renewed (one leaf lifetime, 24 h by default) and the new
//!   bundle has reached every ztunnel. During the overlap every chain the
//!   CA issues (workload leaves and the gRPC serving certificate) carries
//!   the new root cross-signed by the old one after the leaf, so a peer
//!   that still knows only the old root verifies it too;
//! - `store`: the [`store::RootStore`] trait and the directory store of
//!   embedded mode; `secret_store`: the Kubernetes Secret store of cluster
//!   mode (and the ConfigMap the root is published in);
//! - `auth`: who may ask for which identity;
//! - `service`: the `weft.v1.Ca` gRPC service;
//! - `rotation`: rotation on an operator's request, in step across
//!   replicas;
//! - `serving`: the controller's own TLS certificate for its gRPC port.
//!
//! Arrows run one way: `service`, `rotation` and `serving` build on
//! [`MeshCa`]; it builds on `store` and `error`; `auth` stands alone.

pub mod auth;
mod error;
pub mod rotation;
pub mod secret_store;
pub mod service;
pub mod serving;
pub mod store;

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::sync::watch;
use tracing::info;
use weft_pki::pem::split_certs;
use weft_pki::signer::generate_root;
use weft_pki::{PkiError, Signer, TrustBundle};

pub use auth::{
    authenticate, authenticate_caller, authorize, node_runs_identity, AuthError, Authenticator,
    BootstrapTokens, Caller, TokenReviewAuthenticator, NODE_NAME_EXTRA,
};
pub use error::CaError;
pub use store::{
    DirRootStore, RootStore, StoredRoots, CROSS_SIGNED_FILE, PREVIOUS_ROOTS_FILE, ROTATED_AT_FILE,
    ROTATE_ANNOTATION, ROTATE_REQUEST_FILE,
};
pub use weft_pki::files::{ROOT_CERT_FILE, ROOT_KEY_FILE};
pub use weft_pki::signer::{Csr, IssuedCert};

use store::unix_now;

/// Leaf lifetime when the request does not ask for one.
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest leaf lifetime granted; longer requests are capped.
pub const DEFAULT_MAX_LEAF_TTL: Duration = Duration::from_secs(48 * 3600);

enum Mode {
    /// Self-managed root, persisted in the store.
    Root {
        store: Arc<dyn RootStore>,
        stored: StoredRoots,
    },
    /// User-supplied intermediate; the trust bundle is fixed.
    Intermediate,
}

struct CaState {
    signer: Arc<Signer>,
    mode: Mode,
}

/// The mesh CA's key material and signing. Share it as `Arc<MeshCa>`.
pub struct MeshCa {
    trust_domain: String,
    state: RwLock<CaState>,
    bundle: watch::Sender<TrustBundle>,
    default_ttl: Duration,
    max_ttl: Duration,
}

impl MeshCa {
    /// Loads the root (and any still-trusted previous roots) from `store`,
    /// or generates a root and saves it on first start.
    pub async fn load_or_generate(
        store: Arc<dyn RootStore>,
        trust_domain: &str,
    ) -> Result<MeshCa, CaError> {
        let stored = match store.load().await? {
            Some(s) => s,
            None => {
                let s = fresh_root(trust_domain)?;
                store.save(&s).await?;
                info!(component = "ca", trust_domain, "generated a new mesh root");
                s
            }
        };
        let (signer, bundle) = signer_and_bundle(&stored, trust_domain)?;
        Ok(Self::build(
            trust_domain,
            signer,
            Mode::Root { store, stored },
            bundle,
        ))
    }

    /// Signs with a user-supplied intermediate: `cert_pem` and `key_pem` are
    /// the intermediate, `chain_pem` its issuers up to and including the
    /// root (the last block, which becomes the trust bundle). With an empty
    /// chain the certificate itself is the root.
    pub fn from_intermediate(
        cert_pem: &str,
        key_pem: &str,
        chain_pem: &str,
        trust_domain: &str,
    ) -> Result<MeshCa, CaError> {
        let mut issuers = split_certs(chain_pem);
        let root = issuers.pop();
        let mut sent_after_leaf = vec![split_certs(cert_pem)
            .into_iter()
            .next()
            .ok_or_else(|| PkiError::InvalidCa("no CERTIFICATE in the intermediate".into()))?];
        let bundle = match root {
            Some(root) => {
                sent_after_leaf.extend(issuers);
                bundle_of(&[root])?
            }
            None => {
                let b = bundle_of(&sent_after_leaf)?;
                sent_after_leaf.clear();
                b
            }
        };
        let signer = Signer::from_pem(cert_pem, key_pem, sent_after_leaf, trust_domain)?;
        Ok(Self::build(
            trust_domain,
            signer,
            Mode::Intermediate,
            bundle,
        ))
    }

    fn build(trust_domain: &str, signer: Signer, mode: Mode, bundle: TrustBundle) -> MeshCa {
        MeshCa {
            trust_domain: trust_domain.to_owned(),
            state: RwLock::new(CaState {
                signer: Arc::new(signer),
                mode,
            }),
            bundle: watch::Sender::new(bundle),
            default_ttl: DEFAULT_LEAF_TTL,
            max_ttl: DEFAULT_MAX_LEAF_TTL,
        }
    }

    /// Overrides the default and maximum leaf lifetimes.
    pub fn with_ttl(mut self, default_ttl: Duration, max_ttl: Duration) -> Self {
        self.default_ttl = default_ttl;
        self.max_ttl = max_ttl.max(Duration::from_secs(60));
        self
    }

    /// The longest lifetime a workload certificate is issued for.
    pub fn max_ttl(&self) -> Duration {
        self.max_ttl
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Every trusted root, newest (the signer's) first.
    pub fn trust_bundle(&self) -> TrustBundle {
        self.bundle.borrow().clone()
    }

    /// Follows the trust bundle (feed it to `XdsServer::new`).
    pub fn subscribe_bundle(&self) -> watch::Receiver<TrustBundle> {
        self.bundle.subscribe()
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, CaState> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a root rotation: a new root signs from now on; the old root
    /// (and any earlier still in overlap) stays in the trust bundle, and
    /// the new root cross-signed by the old one goes after every leaf.
    pub async fn rotate(&self) -> Result<(), CaError> {
        let (store, mut next) = match &*self.state() {
            CaState {
                mode: Mode::Root { store, stored },
                signer,
            } => {
                let mut next = fresh_root(&self.trust_domain)?;
                next.previous_roots_pem = vec![stored.cert_pem.clone()];
                next.previous_roots_pem
                    .extend(stored.previous_roots_pem.iter().cloned());
                // The old root vouches for the new one; the bridges the old
                // root had to the roots before it stay (they are still
                // trusted, and a peer may know only the oldest).
                next.cross_signed_pem = vec![signer.cross_sign(&next.cert_pem, &next.key_pem)?];
                next.cross_signed_pem
                    .extend(stored.cross_signed_pem.iter().cloned());
                (store.clone(), next)
            }
            CaState {
                mode: Mode::Intermediate,
                ..
            } => return Err(CaError::NotRotatable),
        };
        next.previous_roots_pem.dedup();
        next.rotated_at_unix = Some(unix_now());
        self.install(store.clone(), next).await?;
        store.clear_rotation_request().await?;
        info!(
            component = "ca",
            "root rotated; previous roots stay trusted until retired"
        );
        Ok(())
    }

    /// Ends the overlap: only the current root stays trusted. Leaves from
    /// older roots stop verifying.
    pub async fn retire_previous_roots(&self) -> Result<(), CaError> {
        let (store, next) = match &self.state().mode {
            Mode::Root { store, stored } => (
                store.clone(),
                StoredRoots {
                    previous_roots_pem: Vec::new(),
                    cross_signed_pem: Vec::new(),
                    rotated_at_unix: None,
                    ..stored.clone()
                },
            ),
            Mode::Intermediate => return Err(CaError::NotRotatable),
        };
        self.install(store, next).await?;
        info!(component = "ca", "previous roots retired");
        Ok(())
    }

    /// Takes roots another replica stored (its rotation or retirement):
    /// signs with the stored root and trusts the stored set. Returns
    /// whether anything changed.
    pub fn adopt(&self, stored: &StoredRoots) -> Result<bool, CaError> {
        let store = match &self.state().mode {
            Mode::Root {
                store,
                stored: mine,
            } if !mine.same_roots(stored) => store.clone(),
            _ => return Ok(false),
        };
        self.apply(store, stored.clone())?;
        info!(
            component = "ca",
            trusted_roots = 1 + stored.previous_roots_pem.len(),
            "adopted the stored mesh roots"
        );
        Ok(true)
    }

    async fn install(&self, store: Arc<dyn RootStore>, next: StoredRoots) -> Result<(), CaError> {
        // Parse before persisting, persist before using: a restart must not
        // come back with a root the mesh was never told about.
        let (signer, bundle) = signer_and_bundle(&next, &self.trust_domain)?;
        store.save(&next).await?;
        self.commit(store, next, signer, bundle);
        Ok(())
    }

    fn apply(&self, store: Arc<dyn RootStore>, next: StoredRoots) -> Result<(), CaError> {
        let (signer, bundle) = signer_and_bundle(&next, &self.trust_domain)?;
        self.commit(store, next, signer, bundle);
        Ok(())
    }

    fn commit(
        &self,
        store: Arc<dyn RootStore>,
        next: StoredRoots,
        signer: Signer,
        bundle: TrustBundle,
    ) {
        {
            let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
            st.signer = Arc::new(signer);
            st.mode = Mode::Root {
                store,
                stored: next,
            };
        }
        self.bundle.send_replace(bundle);
    }

    /// Signs `csr` for `ttl` (0: the default; capped at the maximum). The
    /// caller has already decided the requester may have the identity.
    pub fn sign(&self, csr: Csr, ttl: Duration) -> Result<IssuedCert, CaError> {
        let ttl = if ttl.is_zero() { self.default_ttl } else { ttl }.min(self.max_ttl);
        let signer = self.state().signer.clone();
        Ok(signer.sign_csr(csr, ttl)?)
    }

    /// Signs `params` (the gRPC port's serving certificate) for a new key
    /// with the current signer: the chain PEM, leaf first, and the key PEM.
    pub fn sign_with_new_key(
        &self,
        params: rcgen::CertificateParams,
    ) -> Result<(String, String), CaError> {
        let signer = self.state().signer.clone();
        Ok(signer.sign_with_new_key(params)?)
    }
}

/// A new self-signed root with nothing before it.
fn fresh_root(trust_domain: &str) -> Result<StoredRoots, CaError> {
    let root = generate_root(trust_domain)?;
    Ok(StoredRoots {
        cert_pem: root.cert_pem,
        key_pem: root.key_pem,
        previous_roots_pem: Vec::new(),
        cross_signed_pem: Vec::new(),
        rotated_at_unix: None,
        rotation_requested: false,
    })
}

/// The signer of stored roots (its chains carry the cross-signed roots of
/// an overlap) and the bundle they make (signing root first, then the ones
/// still trusted from before).
fn signer_and_bundle(
    stored: &StoredRoots,
    trust_domain: &str,
) -> Result<(Signer, TrustBundle), CaError> {
    let signer = Signer::from_pem(
        &stored.cert_pem,
        &stored.key_pem,
        stored.cross_signed_pem.clone(),
        trust_domain,
    )?;
    let mut roots = vec![stored.cert_pem.clone()];
    roots.extend(stored.previous_roots_pem.iter().cloned());
    Ok((signer, bundle_of(&roots)?))
}

fn bundle_of(pems: &[String]) -> Result<TrustBundle, CaError> {
    Ok(TrustBundle::from_pem(&pems.concat())?)
}
