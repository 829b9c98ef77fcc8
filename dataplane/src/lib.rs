//! The runtime Weft's two data-plane processes (ztunnel and waypoint)
//! share, between the HBONE protocol (`weft-hbone`) and the proxies:
//! - [`control`]: the controller client: config stream, CA client, and the
//!   wiring of both from a proxy's flags;
//! - [`certs`]: workload certificates renewed in the background, one
//!   request in flight per identity, and the trusted roots;
//! - [`tls`]: HBONE TLS configurations cached per identity, following
//!   renewals and root changes;
//! - [`dial`]: pooled HBONE dialling and the headers every tunnel carries;
//! - [`state`]: the model swap (one compiled version at a time, on `watch`);
//! - [`drain`]: graceful drain handed to every accept loop and connection;
//! - [`ops`]: admin, metrics and readiness endpoints;
//! - [`metrics`]: the metric families every process has; [`logging`]:
//!   log set-up and shutdown signals.

pub mod certs;
pub mod control;
pub mod dial;
pub mod drain;
pub mod logging;
pub mod metrics;
pub mod node;
pub mod ops;
pub mod state;
pub mod tls;
