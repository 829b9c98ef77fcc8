//! HBONE: HTTP/2 CONNECT tunnels over mutual TLS 1.3 with SPIFFE identities,
//! wire-compatible with Istio's ztunnel. The protocol only: rustls
//! configurations and SPIFFE verification ([`tls`]), the client
//! ([`client`]) and its pool ([`pool`]), the server ([`server`]) and the
//! tunnel byte stream ([`stream`]). Certificates come from `weft-pki`;
//! what runs a proxy around this (certificates renewed, configurations
//! cached, drain) lives in `weft-dataplane`.

pub mod client;
mod error;
pub mod pool;
pub mod server;
pub mod stream;
pub mod tls;

pub use client::{connect, H2Settings, HboneConnection};
pub use error::{FailureReason, HboneError};
pub use pool::Pool;
pub use server::{serve, serve_until, InboundTunnel};
pub use stream::{copy_bidirectional, copy_tunnel, H2Stream, Transferred};
pub use tls::{
    client_config, client_config_with, identity_of_cert, peer_identity, server_config, TlsError,
};
pub use weft_pki::{TrustBundle, WorkloadCert};

/// The HBONE port on every mesh workload and waypoint.
pub const HBONE_PORT: u16 = 15008;
