//! What can go wrong in the mesh CA. Certificates, keys, requests and the
//! CA directory's files fail as `weft-pki` says ([`PkiError`]); what is the
//! controller's own is the root store (a Secret, in a cluster) and asking a
//! CA that signs with a user-supplied intermediate to rotate.

use weft_pki::PkiError;

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("root store: {0}")]
    Store(String),
    #[error("rotation needs a self-managed root; this CA signs with a user-supplied intermediate")]
    NotRotatable,
}
