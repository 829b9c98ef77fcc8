//! The waypoint: an L7 proxy per namespace, reached over HBONE. It reads the
//! mesh model (routes, L7 policy, traffic policies) from the controller's
//! config stream, terminates the HBONE tunnel, parses HTTP inside, routes per
//! Gateway API and forwards to the chosen endpoint over HBONE with its own
//! identity.

pub mod authz;
pub mod resilience;
pub mod route;
