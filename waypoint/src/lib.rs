//! The waypoint: an L7 proxy per namespace, reached over HBONE. It reads the
//! mesh model (routes, L7 policy, traffic policies) from the controller's
//! config stream, terminates the HBONE tunnel, parses HTTP inside, routes per
//! Gateway API and forwards to the chosen endpoint over HBONE with its own
//! identity. Map of the rooms:
//! - `proxy`: tunnels in, protocol detection, HTTP servers; `forward`: one
//!   request (policy, limits, routing, faults, attempts) and the L4 path
//! - `plan`: request -> plan, over `route` (Gateway API) and `authz` (L7
//!   policy); `resilience` and `resilience_registry`: retries, outlier
//!   detection, balancing, limits, faults, rate limits per service
//! - `upstream`: HBONE/TCP and pooled HTTP client connections to endpoints
//! - `state`: the compiled model; `metrics`, `telemetry` (access log, trace
//!   context); `app`, `config`

pub mod app;
pub mod authz;
pub mod body;
pub mod config;
pub mod forward;
pub mod metrics;
pub mod plan;
pub mod proxy;
pub mod resilience;
pub mod resilience_registry;
pub mod route;
pub mod state;
pub mod telemetry;
pub mod upstream;
