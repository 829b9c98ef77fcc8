//! A local mesh CA built on rcgen: the stopgap signer for workload
//! certificates until the controller's CA exists. It keeps one self-signed
//! ECDSA P-256 root, optionally persisted in a directory.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, CustomExtension, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SerialNumber,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use weft_api::Identity;

use crate::cert::{pem_block, TrustBundle, WorkloadCert};

pub const ROOT_CERT_FILE: &str = "root-cert.pem";
pub const ROOT_KEY_FILE: &str = "root-key.pem";

/// Root validity.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaves are backdated by this much to tolerate clock skew between nodes.
pub const BACKDATE: Duration = Duration::from_secs(5 * 60);
const ROOT_COMMON_NAME: &str = "Weft mesh CA";

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
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("{0} exists but {1} does not: restore the missing file or remove both to generate a new root")]
    Incomplete(PathBuf, PathBuf),
    #[error("identity {identity} is outside this CA's trust domain {trust_domain}")]
    WrongTrustDomain {
        identity: String,
        trust_domain: String,
    },
    #[error("invalid identity for a certificate: {0}")]
    BadIdentity(String),
}

/// Self-signed mesh root that signs workload leaves.
pub struct LocalCa {
    trust_domain: String,
    key: KeyPair,
    /// rcgen's view of the root, used as the issuer when signing.
    issuer: rcgen::Certificate,
    /// The root as distributed (byte-exact with what is on disk).
    root_der: CertificateDer<'static>,
}

impl std::fmt::Debug for LocalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn root_params(trust_domain: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, trust_domain);
    dn.push(DnType::CommonName, ROOT_COMMON_NAME);
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

impl LocalCa {
    /// A fresh self-signed root (ECDSA P-256, CA:true, 10 years) for
    /// `trust_domain`, kept in memory only.
    pub fn generate(trust_domain: &str) -> Result<LocalCa, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = root_params(trust_domain);
        let now = SystemTime::now();
        set_validity(
            &mut params,
            now.checked_sub(BACKDATE).unwrap_or(now),
            now + ROOT_TTL,
        );
        params.serial_number = Some(random_serial());
        let issuer = params.self_signed(&key)?;
        let root_der = issuer.der().clone();
        Ok(LocalCa {
            trust_domain: trust_domain.to_owned(),
            key,
            issuer,
            root_der,
        })
    }

    /// Loads `dir/root-cert.pem` and `dir/root-key.pem` written by
    /// [`LocalCa::load_or_generate`].
    pub fn load(dir: &Path) -> Result<LocalCa, CaError> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        let cert_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let invalid = |path: &Path, reason: String| CaError::Invalid {
            path: path.to_owned(),
            reason,
        };

        let root_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| invalid(&cert_path, format!("no usable CERTIFICATE: {e}")))?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| invalid(&key_path, format!("no usable private key: {e}")))?;

        let (_, parsed) = x509_parser::parse_x509_certificate(root_der.as_ref())
            .map_err(|e| invalid(&cert_path, format!("unparseable certificate: {e}")))?;
        if parsed.public_key().raw != key.public_key_der().as_slice() {
            return Err(invalid(
                &key_path,
                format!("key does not belong to the certificate in {ROOT_CERT_FILE}"),
            ));
        }
        let trust_domain = parsed
            .subject()
            .iter_organization()
            .next()
            .and_then(|o| o.as_str().ok())
            .ok_or_else(|| invalid(&cert_path, "root subject has no organization".into()))?
            .to_owned();

        // rcgen 0.13 signs with an issuer `Certificate`; rebuild one with the
        // same subject and key. The subject must match byte for byte or
        // chain building would fail, so check it instead of trusting it.
        let issuer = root_params(&trust_domain).self_signed(&key)?;
        let (_, rebuilt) = x509_parser::parse_x509_certificate(issuer.der().as_ref())
            .map_err(|e| invalid(&cert_path, format!("internal: {e}")))?;
        if rebuilt.subject().as_raw() != parsed.subject().as_raw() {
            return Err(invalid(
                &cert_path,
                "root was not written by Weft's LocalCa (unexpected subject)".into(),
            ));
        }
        Ok(LocalCa {
            trust_domain,
            key,
            issuer,
            root_der: root_der.into_owned(),
        })
    }

    /// Loads the root from `dir`, or generates one and writes it there
    /// (directory 0700, key 0600, each file written to a temporary name and
    /// renamed so a reader never sees half a file).
    pub fn load_or_generate(dir: &Path, trust_domain: &str) -> Result<LocalCa, CaError> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        match (cert_path.exists(), key_path.exists()) {
            (true, true) => return LocalCa::load(dir),
            (true, false) => return Err(CaError::Incomplete(cert_path, key_path)),
            (false, true) => return Err(CaError::Incomplete(key_path, cert_path)),
            (false, false) => {}
        }
        let ca = LocalCa::generate(trust_domain)?;
        create_private_dir(dir)?;
        // Key first: a crash in between leaves "key without cert", which
        // `Incomplete` reports instead of silently regenerating.
        write_atomic(&key_path, ca.key.serialize_pem().as_bytes(), 0o600)?;
        write_atomic(&cert_path, ca.root_pem().as_bytes(), 0o644)?;
        Ok(ca)
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn root_cert(&self) -> &CertificateDer<'static> {
        &self.root_der
    }

    pub fn root_pem(&self) -> String {
        pem_block("CERTIFICATE", self.root_der.as_ref())
    }

    pub fn trust_bundle(&self) -> TrustBundle {
        TrustBundle {
            roots: vec![self.root_der.clone()],
        }
    }

    /// A leaf for a workload: ECDSA P-256 key, empty subject, one critical
    /// URI SAN = `identity`, no DNS names, digitalSignature, serverAuth +
    /// clientAuth, valid from 5 minutes ago for `ttl`.
    pub fn sign(&self, identity: &Identity, ttl: Duration) -> Result<WorkloadCert, CaError> {
        if identity.trust_domain != self.trust_domain {
            return Err(CaError::WrongTrustDomain {
                identity: identity.to_string(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let (params, not_before, not_after) = workload_leaf_params(identity, ttl);
        let leaf = params.signed_by(&key, &self.issuer, &self.key)?;
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        Ok(WorkloadCert {
            identity: identity.clone(),
            chain: vec![leaf.der().clone()],
            key: Arc::new(key_der),
            not_before,
            not_after,
        })
    }
}

/// The parameters of every workload leaf Weft issues (this local CA and the
/// controller's): empty subject, one critical URI SAN = `identity`, not a
/// CA, digitalSignature, serverAuth + clientAuth, a random serial, valid
/// from [`BACKDATE`] before now for `ttl`. Returns them with (not_before,
/// not_after).
pub fn workload_leaf_params(
    identity: &Identity,
    ttl: Duration,
) -> (CertificateParams, SystemTime, SystemTime) {
    let mut params = CertificateParams::default();
    // Like Istio: no subject, identity only in a SAN, which RFC 5280 then
    // requires to be critical (rcgen writes SANs non-critical, so it goes
    // in as a custom extension).
    params.distinguished_name = DistinguishedName::new();
    let mut san = CustomExtension::from_oid_content(
        &[2, 5, 29, 17],
        uri_san_der(identity.to_string().as_bytes()),
    );
    san.set_criticality(true);
    params.custom_extensions = vec![san];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    params.serial_number = Some(random_serial());
    let now = truncate_to_secs(SystemTime::now());
    let not_before = now.checked_sub(BACKDATE).unwrap_or(now);
    let not_after = now + ttl;
    set_validity(&mut params, not_before, not_after);
    (params, not_before, not_after)
}

/// DER of `GeneralNames ::= SEQUENCE { uniformResourceIdentifier [6] IA5String }`.
fn uri_san_der(uri: &[u8]) -> Vec<u8> {
    let mut inner = vec![0x86];
    push_der_len(&mut inner, uri.len());
    inner.extend_from_slice(uri);
    let mut out = vec![0x30];
    push_der_len(&mut out, inner.len());
    out.extend_from_slice(&inner);
    out
}

fn push_der_len(out: &mut Vec<u8>, len: usize) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

/// A random positive certificate serial.
pub fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // A failing system RNG would make the keys weak as well; a time-based
    // serial still keeps serials distinct in that (theoretical) case.
    if rustls::crypto::ring::default_provider()
        .secure_random
        .fill(&mut bytes)
        .is_err()
    {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        bytes = nanos.to_be_bytes();
    }
    // Positive INTEGER, no leading zero octet ambiguity.
    bytes[0] = (bytes[0] & 0x7f) | 0x01;
    SerialNumber::from_slice(&bytes)
}

fn truncate_to_secs(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Sets rcgen's validity without naming the `time` crate: epoch plus an
/// offset, whole seconds.
pub fn set_validity(params: &mut CertificateParams, not_before: SystemTime, not_after: SystemTime) {
    let since_epoch = |t: SystemTime| {
        Duration::from_secs(t.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs())
    };
    let epoch = rcgen::date_time_ymd(1970, 1, 1);
    params.not_before = epoch + since_epoch(not_before);
    params.not_after = epoch + since_epoch(not_after);
}

fn read(path: &Path) -> Result<String, CaError> {
    fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    use std::os::unix::fs::DirBuilderExt;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io_err(dir))
}

fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), CaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp.{}", std::process::id()));
    let result = (|| {
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}
