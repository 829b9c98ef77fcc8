//! The data plane's side of the control plane, shared by ztunnels and
//! waypoints: where the controller is and how to trust it ([`addr`]),
//! workload certificates from its CA ([`ca_client`], cached and renewed by
//! [`identity::CertManager`]) and the config stream ([`config_stream`]).

pub mod addr;
pub mod ca_client;
pub mod config_stream;
pub mod identity;

pub use addr::{ControllerAddr, CONTROLLER_SERVER_NAME};
pub use ca_client::{GrpcCaProvider, SharedTrustBundle};
pub use config_stream::{ConfigSink, ConfigStream, Role};
pub use identity::{CertManager, CertProvider, IdentityError, LocalCaProvider};
