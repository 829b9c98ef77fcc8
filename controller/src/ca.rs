//! The mesh CA: signs workload certificate requests from ztunnels, and
//! decides who may ask for what.
//!
//! - Key material: a self-signed root generated on first start and kept in
//!   a [`RootStore`] (a directory in embedded mode; a Kubernetes Secret
//!   store plugs in behind the same trait), or a user-supplied intermediate
//!   ([`MeshCa::from_intermediate`]).
//! - Authentication ([`Authenticator`]): bootstrap tokens mapped to node
//!   names in embedded mode ([`BootstrapTokens`]); ServiceAccount tokens
//!   checked with TokenReview in a cluster ([`TokenReviewAuthenticator`]).
//! - Authorization: the SPIFFE identity in the CSR must belong to at least
//!   one workload scheduled on the caller's node in the current model.
//! - Root rotation: [`MeshCa::rotate`] makes a new root the signer while the
//!   old one stays in the trust bundle (the overlap period), so leaves
//!   issued before the rotation keep verifying until
//!   [`MeshCa::retire_previous_roots`] is called, which should be after
//!   every old leaf has been renewed (one leaf lifetime, 24 h by default)
//!   and the new bundle has reached every ztunnel.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use tokio::sync::watch;
use tonic::metadata::MetadataMap;
use tonic::{Request, Response, Status};
use tracing::{info, warn};
use weft_api::proto::ca_server::{Ca, CaServer};
use weft_api::proto::{CreateCertificateRequest, CreateCertificateResponse};
use weft_api::{Identity, MeshModel};
use weft_hbone::ca::{random_serial, set_validity};
use weft_hbone::TrustBundle;

/// Leaf lifetime when the request does not ask for one.
pub const DEFAULT_LEAF_TTL: Duration = Duration::from_secs(24 * 3600);
/// Longest leaf lifetime granted; longer requests are capped.
pub const DEFAULT_MAX_LEAF_TTL: Duration = Duration::from_secs(48 * 3600);
/// Root validity.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves are backdated by this much to tolerate clock skew between nodes.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
/// TokenReview `user.extra` key carrying the node of a pod-bound token.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA material is unusable: {0}")]
    Invalid(String),
    #[error("root store: {0}")]
    Store(String),
    #[error("bad certificate request: {0}")]
    BadCsr(String),
    #[error("identity {identity} is outside this CA's trust domain {trust_domain}")]
    WrongTrustDomain {
        identity: String,
        trust_domain: String,
    },
    #[error("rotation needs a self-managed root; this CA signs with a user-supplied intermediate")]
    NotRotatable,
}

/// What a [`RootStore`] keeps: the signing root and the roots it replaced
/// that are still trusted (rotation overlap).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredRoots {
    pub cert_pem: String,
    /// Never log it.
    pub key_pem: String,
    pub previous_roots_pem: Vec<String>,
    /// When the current root replaced the previous ones (Unix seconds):
    /// the overlap is counted from here, across restarts.
    pub rotated_at_unix: Option<u64>,
    /// An operator asked for a rotation (read by `load`; `save` leaves the
    /// request alone, `clear_rotation_request` consumes it).
    pub rotation_requested: bool,
}

impl StoredRoots {
    /// The same roots (ignoring bookkeeping).
    pub fn same_roots(&self, other: &StoredRoots) -> bool {
        self.cert_pem == other.cert_pem && self.previous_roots_pem == other.previous_roots_pem
    }
}

/// Where the self-managed root lives between restarts.
#[tonic::async_trait]
pub trait RootStore: Send + Sync + 'static {
    /// `None` on first start (nothing stored yet).
    async fn load(&self) -> Result<Option<StoredRoots>, CaError>;
    async fn save(&self, roots: &StoredRoots) -> Result<(), CaError>;
    /// Consumes an operator's rotation request (after the rotation).
    async fn clear_rotation_request(&self) -> Result<(), CaError>;
    /// Wakes up when what is stored may have changed (another replica
    /// rotated, an operator asked for a rotation).
    fn changes(&self) -> futures::stream::BoxStream<'static, ()>;
}

/// A directory (embedded mode): `root-cert.pem`, `root-key.pem` (0600) and
/// `previous-roots.pem` (absent when there is no rotation in progress).
pub struct DirRootStore {
    dir: PathBuf,
}

pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";
pub const PREVIOUS_ROOTS_FILE: &str = "previous-roots.pem";
/// Unix seconds of the last rotation (kept during the overlap).
pub const ROTATED_AT_FILE: &str = "rotated-at";
/// Embedded mode: create this file in the CA directory to rotate the root.
pub const ROTATE_REQUEST_FILE: &str = "rotate-root";
/// Cluster mode: set this annotation on the root Secret to rotate the root.
pub const ROTATE_ANNOTATION: &str = "weft.dev/rotate-root";

/// How often the directory store looks for changes.
const DIR_POLL: Duration = Duration::from_secs(2);

impl DirRootStore {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read_opt(path: &Path) -> Result<Option<String>, CaError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

/// Writes to a temporary name and renames, so a reader never sees half a
/// file.
fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(contents)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

#[tonic::async_trait]
impl RootStore for DirRootStore {
    async fn load(&self) -> Result<Option<StoredRoots>, CaError> {
        let cert_path = self.dir.join(ROOT_CERT_FILE);
        let key_path = self.dir.join(ROOT_KEY_FILE);
        let (cert, key) = (read_opt(&cert_path)?, read_opt(&key_path)?);
        let previous = read_opt(&self.dir.join(PREVIOUS_ROOTS_FILE))?;
        match (cert, key) {
            (None, None) => Ok(None),
            (Some(cert_pem), Some(key_pem)) => Ok(Some(StoredRoots {
                cert_pem,
                key_pem,
                previous_roots_pem: previous.map(|p| split_pem(&p)).unwrap_or_default(),
                rotated_at_unix: read_opt(&self.dir.join(ROTATED_AT_FILE))?
                    .and_then(|t| t.trim().parse().ok()),
                rotation_requested: self.dir.join(ROTATE_REQUEST_FILE).exists(),
            })),
            _ => Err(CaError::Store(format!(
                "only one of {} and {} exists: restore the missing file, or remove both to generate a new root (every workload certificate then changes)",
                cert_path.display(),
                key_path.display()
            ))),
        }
    }

    async fn save(&self, roots: &StoredRoots) -> Result<(), CaError> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(io_err(&self.dir))?;
        let previous = self.dir.join(PREVIOUS_ROOTS_FILE);
        if roots.previous_roots_pem.is_empty() {
            remove_if_exists(&previous)?;
        } else {
            write_atomic(
                &previous,
                roots.previous_roots_pem.concat().as_bytes(),
                0o644,
            )?;
        }
        let rotated_at = self.dir.join(ROTATED_AT_FILE);
        match roots.rotated_at_unix {
            Some(t) => write_atomic(&rotated_at, t.to_string().as_bytes(), 0o644)?,
            None => remove_if_exists(&rotated_at)?,
        }
        // Key first: a crash in between leaves a new key with the old cert,
        // which load() rejects at the signature check instead of silently
        // signing with a mismatched pair.
        write_atomic(
            &self.dir.join(ROOT_KEY_FILE),
            roots.key_pem.as_bytes(),
            0o600,
        )?;
        write_atomic(
            &self.dir.join(ROOT_CERT_FILE),
            roots.cert_pem.as_bytes(),
            0o644,
        )
    }

    async fn clear_rotation_request(&self) -> Result<(), CaError> {
        remove_if_exists(&self.dir.join(ROTATE_REQUEST_FILE))
    }

    /// A tick every couple of seconds: the files are small and local.
    fn changes(&self) -> futures::stream::BoxStream<'static, ()> {
        use futures::StreamExt;
        futures::stream::unfold((), |()| async {
            tokio::time::sleep(DIR_POLL).await;
            Some(((), ()))
        })
        .boxed()
    }
}

/// The signer of stored roots and the bundle they make (signing root
/// first, then the ones still trusted from before).
fn signer_and_bundle(stored: &StoredRoots) -> Result<(Signer, TrustBundle), CaError> {
    let signer = Signer::from_pem(&stored.cert_pem, &stored.key_pem, Vec::new())?;
    let mut roots = vec![stored.cert_pem.clone()];
    roots.extend(stored.previous_roots_pem.iter().cloned());
    Ok((signer, bundle_of(&roots)?))
}

/// Removes `path`; absent is fine.
fn remove_if_exists(path: &Path) -> Result<(), CaError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_err(path)(e)),
        _ => Ok(()),
    }
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Every PEM block of `pem`, one string each.
fn split_pem(pem: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = pem;
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let Some(end) = rest[start..].find(END) else {
            break;
        };
        let stop = start + end + END.len();
        out.push(format!("{}\n", &rest[start..stop]));
        rest = &rest[stop..];
    }
    out
}

/// The key and issuer the CA signs with.
struct Signer {
    key: KeyPair,
    /// rcgen's view of the issuing certificate (same subject and key).
    issuer: rcgen::Certificate,
    /// Certificates sent after the leaf (intermediates; never the root).
    chain_pem: Vec<String>,
}

impl Signer {
    /// Rebuilds an rcgen issuer for an existing CA certificate and checks
    /// that the key belongs to it and the subject survives byte for byte
    /// (chain building compares names exactly).
    fn from_pem(cert_pem: &str, key_pem: &str, chain_pem: Vec<String>) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| CaError::Invalid(format!("no usable private key: {e}")))?;
        let der = pem_to_der(cert_pem)?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| CaError::Invalid(format!("unparseable CA certificate: {e}")))?;
        if parsed.public_key().raw != key.public_key_der().as_slice() {
            return Err(CaError::Invalid(
                "the private key does not belong to the CA certificate".into(),
            ));
        }
        let params = CertificateParams::from_ca_cert_pem(cert_pem)
            .map_err(|e| CaError::Invalid(format!("CA certificate: {e}")))?;
        let issuer = params.self_signed(&key)?;
        let (_, rebuilt) = x509_parser::parse_x509_certificate(issuer.der().as_ref())
            .map_err(|e| CaError::Invalid(format!("internal: {e}")))?;
        if rebuilt.subject().as_raw() != parsed.subject().as_raw() {
            return Err(CaError::Invalid(
                "the CA certificate's subject cannot be reproduced exactly; re-issue it with UTF8String or PrintableString names".into(),
            ));
        }
        Ok(Self {
            key,
            issuer,
            chain_pem,
        })
    }
}

fn pem_to_der(pem: &str) -> Result<Vec<u8>, CaError> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .map(|c| c.as_ref().to_vec())
        .map_err(|e| CaError::Invalid(format!("no CERTIFICATE block: {e}")))
}

fn bundle_of(pems: &[String]) -> Result<TrustBundle, CaError> {
    TrustBundle::from_pem(&pems.concat())
        .map_err(|e| CaError::Invalid(format!("trust bundle: {e}")))
}

/// A new self-signed root. Each root gets a distinct subject (a random
/// suffix in its CN) so that during an overlap two roots never share a
/// name.
fn generate_root(trust_domain: &str) -> Result<StoredRoots, CaError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(
        DnType::CommonName,
        format!("Weft mesh CA {:08x}", rand::random::<u32>()),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    set_validity(
        &mut params,
        now.checked_sub(BACKDATE).unwrap_or(now),
        now + ROOT_TTL,
    );
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    Ok(StoredRoots {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        previous_roots_pem: Vec::new(),
        rotated_at_unix: None,
        rotation_requested: false,
    })
}

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

/// A signed leaf.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub identity: Identity,
    /// Leaf first, then intermediates; one PEM block each.
    pub chain_pem: Vec<String>,
    pub not_after: SystemTime,
}

/// A parsed, signature-checked certificate request.
pub struct Csr {
    pub identity: Identity,
    params: CertificateSigningRequestParams,
}

impl Csr {
    /// Parses a PEM CSR and reads its SPIFFE identity: exactly one URI SAN
    /// and nothing else in the SAN.
    pub fn from_pem(pem: &str) -> Result<Csr, CaError> {
        let params = CertificateSigningRequestParams::from_pem(pem)
            .map_err(|e| CaError::BadCsr(format!("not a valid signed PKCS#10 request: {e}")))?;
        let sans = &params.params.subject_alt_names;
        let identity = match sans.as_slice() {
            [SanType::URI(uri)] => uri
                .as_str()
                .parse::<Identity>()
                .map_err(|e| CaError::BadCsr(e.to_string()))?,
            _ => {
                return Err(CaError::BadCsr(
                    "the request must carry exactly one subjectAltName: the SPIFFE URI".into(),
                ))
            }
        };
        Ok(Csr { identity, params })
    }
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
                let s = generate_root(trust_domain)?;
                store.save(&s).await?;
                info!(component = "ca", trust_domain, "generated a new mesh root");
                s
            }
        };
        let (signer, bundle) = signer_and_bundle(&stored)?;
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
        let mut issuers = split_pem(chain_pem);
        let root = issuers.pop();
        let mut sent_after_leaf = vec![split_pem(cert_pem)
            .into_iter()
            .next()
            .ok_or_else(|| CaError::Invalid("no CERTIFICATE in the intermediate".into()))?];
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
        let signer = Signer::from_pem(cert_pem, key_pem, sent_after_leaf)?;
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
    /// (and any earlier still in overlap) stays in the trust bundle.
    pub async fn rotate(&self) -> Result<(), CaError> {
        let (store, mut next) = match &self.state().mode {
            Mode::Root { store, stored } => {
                let mut next = generate_root(&self.trust_domain)?;
                next.previous_roots_pem = vec![stored.cert_pem.clone()];
                next.previous_roots_pem
                    .extend(stored.previous_roots_pem.iter().cloned());
                (store.clone(), next)
            }
            Mode::Intermediate => return Err(CaError::NotRotatable),
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
        let (signer, bundle) = signer_and_bundle(&next)?;
        store.save(&next).await?;
        self.commit(store, next, signer, bundle);
        Ok(())
    }

    fn apply(&self, store: Arc<dyn RootStore>, next: StoredRoots) -> Result<(), CaError> {
        let (signer, bundle) = signer_and_bundle(&next)?;
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
        let identity = csr.identity;
        if identity.trust_domain != self.trust_domain {
            return Err(CaError::WrongTrustDomain {
                identity: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let ttl = if ttl.is_zero() { self.default_ttl } else { ttl }.min(self.max_ttl);
        let (params, _, not_after) = weft_hbone::ca::workload_leaf_params(&identity, ttl);

        let signer = self.state().signer.clone();
        let request = CertificateSigningRequestParams {
            params,
            public_key: csr.params.public_key,
        };
        let leaf = request.signed_by(&signer.issuer, &signer.key)?;
        let mut chain_pem = vec![leaf.pem()];
        chain_pem.extend(signer.chain_pem.iter().cloned());
        Ok(IssuedCert {
            identity,
            chain_pem,
            not_after,
        })
    }
}

/// The controller's own TLS serving certificate, for the gRPC port.
pub struct ServingCert {
    pub chain_pem: String,
    pub key_pem: String,
}

/// The name ztunnels expect the controller's serving certificate to carry
/// (they connect by Service name or by IP; either way they verify this).
pub const CONTROLLER_SERVER_NAME: &str = "weft-controller";

impl MeshCa {
    /// A serving certificate for the controller's gRPC port, signed by the
    /// mesh root: DNS names `dns` (always including
    /// [`CONTROLLER_SERVER_NAME`]), serverAuth only, valid for `ttl`.
    pub fn issue_serving_cert(
        &self,
        dns: &[String],
        ttl: Duration,
    ) -> Result<ServingCert, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut names: Vec<String> = vec![CONTROLLER_SERVER_NAME.to_owned()];
        names.extend(
            dns.iter()
                .filter(|d| d.as_str() != CONTROLLER_SERVER_NAME)
                .cloned(),
        );
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, CONTROLLER_SERVER_NAME);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        params.use_authority_key_identifier_extension = true;
        params.serial_number = Some(random_serial());
        let now = SystemTime::now();
        set_validity(
            &mut params,
            now.checked_sub(BACKDATE).unwrap_or(now),
            now + ttl,
        );
        let signer = self.state().signer.clone();
        let leaf = params.signed_by(&key, &signer.issuer, &signer.key)?;
        let mut chain_pem = leaf.pem();
        for c in &signer.chain_pem {
            chain_pem.push_str(c);
        }
        Ok(ServingCert {
            chain_pem,
            key_pem: key.serialize_pem(),
        })
    }
}

// ---- authentication ----

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The token is not valid (maps to UNAUTHENTICATED).
    #[error("{0}")]
    Rejected(String),
    /// The token could not be checked (maps to UNAVAILABLE).
    #[error("cannot check the token: {0}")]
    Unavailable(String),
}

impl From<AuthError> for Status {
    fn from(e: AuthError) -> Status {
        match e {
            AuthError::Rejected(m) => Status::unauthenticated(m),
            AuthError::Unavailable(m) => Status::unavailable(m),
        }
    }
}

/// Maps a bearer token to the node it was issued for.
/// Who presented a token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// The node the token is bound to.
    pub node: String,
    /// `Some((namespace, service account))`: a workload's own token (a
    /// waypoint's, say), which may obtain only its own identity. `None`: a
    /// node agent (the node's ztunnel), which may obtain the identities of
    /// the node's pods.
    pub workload: Option<(String, String)>,
}

#[tonic::async_trait]
pub trait Authenticator: Send + Sync + 'static {
    async fn node_of(&self, token: &str) -> Result<String, AuthError>;

    /// The caller behind `token`; by default a node agent of `node_of`.
    async fn caller_of(&self, token: &str) -> Result<Caller, AuthError> {
        Ok(Caller {
            node: self.node_of(token).await?,
            workload: None,
        })
    }
}

/// Whether `caller` may obtain a certificate for `id` under `model`: a
/// node agent for any workload on its node, a workload only for itself
/// (and only while it runs on the node its token is bound to).
pub fn authorize(model: &MeshModel, caller: &Caller, id: &Identity) -> Result<(), String> {
    if let Some((ns, sa)) = &caller.workload {
        let own = Identity::new(&model.trust_domain, ns, sa);
        if &own != id {
            return Err(format!(
                "a workload token ({ns}/{sa}) may only obtain its own identity {own}, not {id}"
            ));
        }
    }
    if !node_runs_identity(model, &caller.node, id) {
        return Err(format!(
            "node {} runs no workload with identity {id}; a ztunnel only gets identities of pods scheduled on its node",
            caller.node
        ));
    }
    Ok(())
}

/// The node of the request's `authorization: Bearer <token>`.
pub async fn authenticate(
    auth: &dyn Authenticator,
    metadata: &MetadataMap,
) -> Result<String, Status> {
    Ok(authenticate_caller(auth, metadata).await?.node)
}

/// The caller behind the request's `authorization: Bearer <token>`.
pub async fn authenticate_caller(
    auth: &dyn Authenticator,
    metadata: &MetadataMap,
) -> Result<Caller, Status> {
    let value = metadata
        .get("authorization")
        .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>` metadata"))?
        .to_str()
        .map_err(|_| Status::unauthenticated("authorization metadata is not ASCII"))?;
    let token = weft_api::proto::token_of_bearer(value).ok_or_else(|| {
        Status::unauthenticated("authorization metadata must be `Bearer <token>`")
    })?;
    Ok(auth.caller_of(token).await?)
}

/// Embedded mode: fixed bootstrap tokens, one per node.
#[derive(Clone, Default)]
pub struct BootstrapTokens {
    by_token: HashMap<String, String>,
}

impl std::fmt::Debug for BootstrapTokens {
    // Tokens stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BootstrapTokens")
            .field("nodes", &self.by_token.len())
            .finish()
    }
}

impl BootstrapTokens {
    pub fn new(node_tokens: impl IntoIterator<Item = (String, String)>) -> Self {
        Self {
            by_token: node_tokens
                .into_iter()
                .map(|(node, token)| (token, node))
                .collect(),
        }
    }

    /// Parses `node: token` lines; blank lines and `#` comments are skipped.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut pairs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (node, token) = line
                .split_once(':')
                .map(|(n, t)| (n.trim(), t.trim()))
                .filter(|(n, t)| !n.is_empty() && !t.is_empty())
                .ok_or_else(|| format!("line {}: want `node: token`", i + 1))?;
            pairs.push((node.to_owned(), token.to_owned()));
        }
        Ok(Self::new(pairs))
    }

    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read bootstrap tokens {}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

#[tonic::async_trait]
impl Authenticator for BootstrapTokens {
    async fn node_of(&self, token: &str) -> Result<String, AuthError> {
        self.by_token
            .get(token)
            .cloned()
            .ok_or_else(|| AuthError::Rejected("unknown bootstrap token".into()))
    }
}

/// Cluster mode: the ztunnel's ServiceAccount token (projected, pod-bound),
/// checked with a TokenReview; the node comes from the token's
/// `authentication.kubernetes.io/node-name` extra.
#[derive(Clone)]
pub struct TokenReviewAuthenticator {
    client: kube::Client,
    audiences: Vec<String>,
    /// Usernames (`system:serviceaccount:<ns>:<sa>`) of node agents: the
    /// ztunnels, which get their node's pods' identities. Any other
    /// ServiceAccount gets only its own.
    node_agents: Vec<String>,
}

impl TokenReviewAuthenticator {
    /// `audiences` empty means the API server's default audience. With no
    /// node agents set, every caller is a node agent.
    pub fn new(client: kube::Client, audiences: Vec<String>) -> Self {
        Self {
            client,
            audiences,
            node_agents: Vec::new(),
        }
    }

    /// The ServiceAccounts (`namespace/name`) that act for their node.
    pub fn with_node_agents<'a>(mut self, agents: impl IntoIterator<Item = &'a str>) -> Self {
        self.node_agents = agents
            .into_iter()
            .map(|a| format!("system:serviceaccount:{}", a.replacen('/', ":", 1)))
            .collect();
        self
    }
}

#[tonic::async_trait]
impl Authenticator for TokenReviewAuthenticator {
    async fn node_of(&self, token: &str) -> Result<String, AuthError> {
        Ok(self.caller_of(token).await?.node)
    }

    async fn caller_of(&self, token: &str) -> Result<Caller, AuthError> {
        use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: (!self.audiences.is_empty()).then(|| self.audiences.clone()),
            },
            ..Default::default()
        };
        let api: kube::Api<TokenReview> = kube::Api::all(self.client.clone());
        let done = api
            .create(&kube::api::PostParams::default(), &review)
            .await
            .map_err(|e| AuthError::Unavailable(format!("TokenReview: {e}")))?;
        let status = done.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            return Err(AuthError::Rejected(format!(
                "token rejected by the API server: {}",
                status.error.unwrap_or_else(|| "not authenticated".into())
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let node = user
            .extra
            .and_then(|mut extra| extra.remove(NODE_NAME_EXTRA))
            .and_then(|v| v.into_iter().next())
            .ok_or_else(|| {
                AuthError::Rejected(format!(
                    "token is not bound to a pod on a node (no {NODE_NAME_EXTRA}); use the pod's projected ServiceAccount token"
                ))
            })?;
        if self.node_agents.is_empty() || self.node_agents.contains(&username) {
            return Ok(Caller {
                node,
                workload: None,
            });
        }
        let workload = username
            .strip_prefix("system:serviceaccount:")
            .and_then(|rest| rest.split_once(':'))
            .map(|(ns, sa)| (ns.to_owned(), sa.to_owned()))
            .ok_or_else(|| AuthError::Rejected(format!("{username:?} is not a ServiceAccount")))?;
        Ok(Caller {
            node,
            workload: Some(workload),
        })
    }
}

// ---- the gRPC service ----

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

/// Whether `node` runs a workload with identity `id` in `model`.
pub fn node_runs_identity(model: &MeshModel, node: &str, id: &Identity) -> bool {
    model
        .workloads
        .iter()
        .any(|w| w.node == node && &model.identity_of(w) == id)
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
                CaError::WrongTrustDomain { .. } => Status::permission_denied(e.to_string()),
                e => Status::internal(e.to_string()),
            })?;
        info!(component = "ca", node = %node, identity = %issued.identity, "certificate issued");
        Ok(Response::new(CreateCertificateResponse {
            cert_chain_pem: issued.chain_pem,
            trust_bundle_pem: self.ca.trust_bundle().to_pem(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_tokens_get_only_their_own_identity() {
        let m = MeshModel::from_yaml(
            r#"
workloads:
  - { name: wp-0, namespace: shop, service_account: wp, node: n1, ips: [10.0.0.9] }
  - { name: web, namespace: shop, service_account: web, node: n1, ips: [10.0.0.2] }
"#,
        )
        .unwrap();
        let id = |sa: &str| Identity::new("cluster.local", "shop", sa);
        let agent = Caller {
            node: "n1".into(),
            workload: None,
        };
        let waypoint = Caller {
            node: "n1".into(),
            workload: Some(("shop".into(), "wp".into())),
        };
        assert!(authorize(&m, &agent, &id("web")).is_ok());
        assert!(authorize(&m, &agent, &id("wp")).is_ok());
        assert!(authorize(&m, &waypoint, &id("wp")).is_ok());
        let err = authorize(&m, &waypoint, &id("web")).unwrap_err();
        assert!(err.contains("only obtain its own identity"), "{err}");
        let elsewhere = Caller {
            node: "n2".into(),
            workload: Some(("shop".into(), "wp".into())),
        };
        assert!(authorize(&m, &elsewhere, &id("wp")).is_err());
    }

    #[test]
    fn bootstrap_tokens_parse() {
        let t = BootstrapTokens::parse("# nodes\nnode-1: abc\n\n node-2 : def \n").unwrap();
        assert_eq!(t.by_token.get("abc").map(String::as_str), Some("node-1"));
        assert_eq!(t.by_token.get("def").map(String::as_str), Some("node-2"));
        assert!(BootstrapTokens::parse("node-1 abc").is_err());
        assert!(BootstrapTokens::parse("node-1:").is_err());
    }

    #[test]
    fn split_pem_keeps_every_block() {
        let a = generate_root("td").unwrap().cert_pem;
        let b = generate_root("td").unwrap().cert_pem;
        let blocks = split_pem(&format!("{a}{b}"));
        assert_eq!(blocks.len(), 2);
        assert_eq!(bundle_of(&blocks).unwrap().roots.len(), 2);
    }
}
