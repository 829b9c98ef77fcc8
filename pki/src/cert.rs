//! Workload certificates and trust bundles: the key material every HBONE
//! connection is built from, whichever CA produced it, and the SPIFFE id a
//! certificate names.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use weft_api::Identity;
use x509_parser::extensions::GeneralName;

use crate::pem::{certs_from_pem, certs_to_pem, pem_block};
use crate::PkiError;

/// A workload's certificate chain (leaf first) and private key.
///
/// Cheap to clone: the key is shared, the chain is a few hundred bytes.
#[derive(Clone)]
pub struct WorkloadCert {
    /// The SPIFFE identity in the leaf's URI SAN.
    pub identity: Identity,
    /// Leaf first, then any intermediates (never the root).
    pub chain: Vec<CertificateDer<'static>>,
    pub key: Arc<PrivateKeyDer<'static>>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl fmt::Debug for WorkloadCert {
    // The key stays out of logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("identity", &self.identity.to_string())
            .field("chain_len", &self.chain.len())
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .finish_non_exhaustive()
    }
}

impl WorkloadCert {
    /// Builds a `WorkloadCert` from a chain and key issued elsewhere (for
    /// example by the controller's CA): identity and validity are read from
    /// the leaf.
    pub fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Result<Self, PkiError> {
        let leaf = chain
            .first()
            .ok_or_else(|| PkiError::BadCertificate("empty certificate chain".into()))?;
        let identity = identity_of_cert(leaf)?;
        let (not_before, not_after) = validity_of_cert(leaf)?;
        Ok(Self {
            identity,
            chain,
            key: Arc::new(key),
            not_before,
            not_after,
        })
    }

    /// Parses a PEM chain (leaf first) and a PEM private key (PKCS#8, SEC1 or
    /// PKCS#1).
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        let chain = certs_from_pem(chain_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| PkiError::Pem(format!("private key: {e}")))?;
        Self::from_parts(chain, key)
    }

    /// The chain as PEM, leaf first.
    pub fn chain_pem(&self) -> String {
        certs_to_pem(&self.chain)
    }

    /// The private key as PEM, for handing the certificate to another
    /// process; never log it.
    pub fn key_pem(&self) -> String {
        let label = match &*self.key {
            PrivateKeyDer::Pkcs1(_) => "RSA PRIVATE KEY",
            PrivateKeyDer::Sec1(_) => "EC PRIVATE KEY",
            _ => "PRIVATE KEY",
        };
        pem_block(label, self.key.secret_der())
    }

    /// How long the certificate is valid in all.
    pub fn lifetime(&self) -> Duration {
        self.not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO)
    }

    /// When to ask for a new certificate: half way through the validity.
    pub fn refresh_at(&self) -> SystemTime {
        self.not_before + self.lifetime() / 2
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }

    /// Whether this chain verifies, now, up to `root` (directly, or through
    /// the intermediates or cross-signed certificates it carries): after a
    /// root rotation, a certificate for which this is false for the new
    /// signing root is due for renewal.
    pub fn chains_to(&self, root: &CertificateDer<'_>) -> bool {
        let (Some(leaf), Ok(anchor)) = (self.chain.first(), webpki::anchor_from_trusted_cert(root))
        else {
            return false;
        };
        let Ok(leaf) = webpki::EndEntityCert::try_from(leaf) else {
            return false;
        };
        let algs = rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms;
        leaf.verify_for_usage(
            algs.all,
            &[anchor],
            &self.chain[1..],
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .is_ok()
    }
}

/// The CA certificates a workload trusts. More than one root is allowed so a
/// root can be rotated with an overlap period.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrustBundle {
    pub roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// Parses every `CERTIFICATE` block; fails when there is none or when one
    /// is not usable as a trust anchor.
    pub fn from_pem(pem: &str) -> Result<Self, PkiError> {
        let roots = certs_from_pem(pem)?;
        for root in &roots {
            webpki::anchor_from_trusted_cert(root)
                .map_err(|e| PkiError::Pem(format!("not a usable CA certificate: {e}")))?;
        }
        Ok(Self { roots })
    }

    pub fn to_pem(&self) -> String {
        certs_to_pem(&self.roots)
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }

    /// Merges two bundles (rotation overlap), dropping duplicates.
    pub fn merged(&self, other: &TrustBundle) -> TrustBundle {
        let mut roots = self.roots.clone();
        for r in &other.roots {
            if !roots.contains(r) {
                roots.push(r.clone());
            }
        }
        TrustBundle { roots }
    }
}

/// The SPIFFE identity in a certificate's URI SAN. SPIFFE allows exactly one
/// URI SAN in an identity document.
pub fn identity_of_cert(der: &CertificateDer<'_>) -> Result<Identity, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| PkiError::BadCertificate(format!("unparseable certificate: {e}")))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| PkiError::BadCertificate(format!("bad subjectAltName: {e}")))?
        .ok_or(PkiError::NoSpiffeId)?;
    let mut uris = san.value.general_names.iter().filter_map(|n| match n {
        GeneralName::URI(uri) => Some(*uri),
        _ => None,
    });
    let uri = uris.next().ok_or(PkiError::NoSpiffeId)?;
    if uris.next().is_some() {
        return Err(PkiError::InvalidSpiffeId(
            "more than one URI SAN".to_owned(),
        ));
    }
    uri.parse::<Identity>()
        .map_err(|_| PkiError::InvalidSpiffeId(uri.to_owned()))
}

/// A certificate's validity period (not before, not after).
pub fn validity_of_cert(der: &CertificateDer<'_>) -> Result<(SystemTime, SystemTime), PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| PkiError::BadCertificate(format!("unparseable certificate: {e}")))?;
    let validity = cert.validity();
    Ok((
        unix_to_system(validity.not_before.timestamp()),
        unix_to_system(validity.not_after.timestamp()),
    ))
}

fn unix_to_system(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}
