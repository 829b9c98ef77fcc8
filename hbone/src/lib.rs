//! HBONE: HTTP/2 CONNECT tunnels over mutual TLS 1.3 with SPIFFE identities,
//! wire-compatible with Istio's ztunnel. Shared by the ztunnel and the
//! waypoint: certificates ([`ca`], [`WorkloadCert`], [`TrustBundle`]), TLS
//! configuration ([`tls`]), the client ([`client`]) and its pool ([`pool`]),
//! the server ([`server`]) and the tunnel byte stream ([`stream`]).

pub mod ca;
mod cert;
pub mod client;
pub mod control;
mod error;
pub mod pool;
pub mod server;
pub mod stream;
pub mod tls;

pub use ca::{CaError, LocalCa};
pub use cert::{TrustBundle, WorkloadCert};
pub use client::{connect, H2Settings, HboneConnection};
pub use error::{FailureReason, HboneError};
pub use pool::Pool;
pub use server::{serve, serve_until, InboundTunnel};
pub use stream::{copy_bidirectional, copy_tunnel, H2Stream};
pub use tls::{client_config, identity_of_cert, peer_identity, server_config, TlsError};

/// The HBONE port on every mesh workload and waypoint.
pub const HBONE_PORT: u16 = 15008;
