//! Workload certificates and trust bundles: the key material every HBONE
//! connection is built from, independent of which CA produced it.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use weft_api::Identity;

use crate::tls::{identity_of_cert, TlsError};

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
    ) -> Result<Self, TlsError> {
        let leaf = chain.first().ok_or(TlsError::NoPeerCertificate)?;
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
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let chain = certs_from_pem(chain_pem)?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| TlsError::Pem(format!("private key: {e}")))?;
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

    /// When to ask for a new certificate: half way through the validity.
    pub fn refresh_at(&self) -> SystemTime {
        let lifetime = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + lifetime / 2
    }

    pub fn is_expired(&self, now: SystemTime) -> bool {
        now >= self.not_after
    }
}

/// The CA certificates a workload trusts. More than one root is allowed so a
/// root can be rotated with an overlap period.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrustBundle {
    pub roots: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// Parses every `CERTIFICATE` block; fails when there is none or when one
    /// is not usable as a trust anchor.
    pub fn from_pem(pem: &str) -> Result<Self, TlsError> {
        let roots = certs_from_pem(pem)?;
        for root in &roots {
            webpki::anchor_from_trusted_cert(root)
                .map_err(|e| TlsError::Pem(format!("not a usable CA certificate: {e}")))?;
        }
        Ok(Self { roots })
    }

    pub fn to_pem(&self) -> String {
        certs_to_pem(&self.roots)
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

pub(crate) fn certs_from_pem(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Pem("no CERTIFICATE block found".into()));
    }
    Ok(certs)
}

pub(crate) fn certs_to_pem(certs: &[CertificateDer<'_>]) -> String {
    let mut out = String::new();
    for cert in certs {
        out.push_str(&pem_block("CERTIFICATE", cert.as_ref()));
    }
    out
}

pub(crate) fn pem_block(label: &str, der: &[u8]) -> String {
    let b64 = base64(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 64);
    out.push_str("-----BEGIN ");
    out.push_str(label);
    out.push_str("-----\n");
    for line in b64.as_bytes().chunks(64) {
        // base64 output is ASCII
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str("-----END ");
    out.push_str(label);
    out.push_str("-----\n");
    out
}

fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(ALPHABET[(n >> 18) as usize & 63] as char);
        out.push(ALPHABET[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            ALPHABET[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            ALPHABET[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

/// The leaf's validity period.
pub(crate) fn validity_of_cert(
    der: &CertificateDer<'_>,
) -> Result<(SystemTime, SystemTime), TlsError> {
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref())
        .map_err(|e| TlsError::BadCertificate(format!("unparseable certificate: {e}")))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), want);
        }
    }
}
