//! Weft's public-key infrastructure, shared by the controller's mesh CA and
//! the data plane's standalone CA, and by everything that holds or checks a
//! certificate:
//! - [`cert`]: a workload's certificate and key ([`WorkloadCert`]), the
//!   roots it trusts ([`TrustBundle`]), and the SPIFFE id in a certificate;
//! - [`params`]: what every root, workload leaf and serving certificate
//!   Weft issues looks like (lifetimes, serials, key usages, SANs);
//! - [`signer`]: a CA certificate with its key, checked to belong together,
//!   that signs those parameters;
//! - [`files`]: where a CA keeps its root on disk, written atomically;
//! - [`local`]: the standalone CA (a root in a directory) that signs
//!   workload certificates without a controller.
//!
//! No network, no TLS sessions: `weft-hbone` builds rustls configurations
//! from what this crate holds.

pub mod cert;
mod error;
pub mod files;
pub mod local;
pub mod params;
pub mod pem;
pub mod signer;

pub use cert::{identity_of_cert, validity_of_cert, TrustBundle, WorkloadCert};
pub use error::PkiError;
pub use local::LocalCa;
pub use signer::Signer;
