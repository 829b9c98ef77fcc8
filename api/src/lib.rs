//! Contracts shared by every Weft component: the mesh model the data plane
//! reads, SPIFFE identities, well-known names and ports, and the protocol the
//! CNI plugin speaks to the node's ztunnel. Nothing here does I/O.

pub mod authorize;
pub mod cni;
pub mod config_cache;
#[cfg(feature = "crd")]
pub mod crd;
pub mod duration;
pub mod identity;
pub mod l7;
pub mod model;
pub mod node_report;
pub mod policy;
pub mod ports;
pub mod proto;

pub use identity::Identity;
pub use model::MeshModel;

/// Namespace label that enrolls a namespace's pods; a pod label with the
/// same key and value `none` opts a single pod out.
pub const DATAPLANE_MODE_LABEL: &str = "weft.dev/dataplane-mode";
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
pub const DATAPLANE_MODE_NONE: &str = "none";
