//! The waypoint: an L7 proxy per namespace, reached over HBONE. It reads the
//! mesh model (routes, L7 policy, traffic policies) from the controller's
//! config stream, terminates the HBONE tunnel, parses HTTP inside, routes per
//! Gateway API and forwards to the chosen endpoint over HBONE with its own
//! identity. The runtime it shares with ztunnel (controller client,
//! certificates, TLS, model swap, drain, ops ports) is `weft-dataplane`.
//!
//! Map of the rooms, in the order traffic meets them; each imports only
//! rooms further down the list:
//! - `app` (start-up, shutdown and drain; `config`: flags)
//! - `proxy`: the HBONE listener, its connections and tunnels, protocol
//!   sniffing, the HTTP servers inside tunnels
//! - `forward`: one request as a pipeline of stages (authorize, route,
//!   admit, attempts, finish), and the L4 path
//! - `plan`: a request -> its plan, from the route tables
//! - `upstream`: HBONE/TCP and pooled HTTP client connections to endpoints
//! - `resilience` (`registry`: per-service state across model versions;
//!   retries, outlier detection, balancing, limits, faults, rate limits)
//! - `state`: the compiled model (indexes, endpoints, route tables,
//!   authorizer), over the engines `route` (Gateway API) and `authz` (L7
//!   policy)
//! - leaves: `context` (the shared nouns: target, backend, endpoint,
//!   connection), `body`, `metrics`, `telemetry` (access log, trace
//!   context)

pub mod app;
pub mod authz;
pub mod body;
pub mod config;
pub mod context;
pub mod forward;
pub mod metrics;
pub mod plan;
pub mod proxy;
pub mod resilience;
pub mod route;
pub mod state;
pub mod telemetry;
pub mod upstream;
