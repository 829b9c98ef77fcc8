//! What can go wrong with certificates and CA material.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid PEM: {0}")]
    Pem(String),
    #[error("bad certificate: {0}")]
    BadCertificate(String),
    #[error("certificate has no SPIFFE URI SAN")]
    NoSpiffeId,
    #[error("certificate carries an invalid SPIFFE id: {0}")]
    InvalidSpiffeId(String),
    /// A CA certificate and key that cannot sign (mismatched pair, not a
    /// CA, a subject that cannot be reproduced).
    #[error("CA material is unusable: {0}")]
    InvalidCa(String),
    #[error("{0} exists but {1} does not: restore the missing file, or remove both to generate a new root (every workload certificate then changes)")]
    Incomplete(PathBuf, PathBuf),
    #[error("bad certificate request: {0}")]
    BadCsr(String),
    #[error("identity {identity} is outside this CA's trust domain {trust_domain}")]
    WrongTrustDomain {
        identity: String,
        trust_domain: String,
    },
}

impl PkiError {
    pub(crate) fn io(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> PkiError + '_ {
        move |source| PkiError::Io {
            path: path.to_owned(),
            source,
        }
    }
}
