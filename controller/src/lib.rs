//! weft-controller: the control plane. Kubernetes objects (watched through
//! reflectors, or read from a folder of manifests) in; one mesh model out,
//! streamed to ztunnels over gRPC; also the mesh CA.
//!
//! - `model/`: Kubernetes objects -> `MeshModel` + status (pure,
//!   level-based); `build` in `model/mod.rs` calls `core` (namespaces,
//!   workloads, Services), `policies` (AuthorizationPolicy,
//!   PeerAuthentication), `traffic` (TrafficPolicy) and `gateway_api`
//!   (waypoints, routes, Gateway and route status)
//! - `reasons`: every condition type and reason the controller writes, and
//!   the names it writes under
//! - `kube_source`: reflectors on the API server feeding the builder
//! - `manifests`: the same builder fed by a watched folder of YAML
//! - `status`, `gateway_status`: policy, Gateway and route status written
//!   back (conditions, Events); `leader`: Lease-based leader election;
//!   `waypoint_deploy`: the waypoints' Deployments (cluster mode, leader
//!   only)
//! - `xds`: the config stream to ztunnels (incremental, ACK/NACK)
//! - `ca/`: the mesh CA on `weft-pki` (`MeshCa` in `ca/mod.rs`; root
//!   storage in `store` and `secret_store`, callers in `auth`, the gRPC
//!   service in `service`, root rotation in `rotation`, the gRPC port's
//!   serving certificate in `serving`)
//! - `app`: start-up, wiring the above together
//!
//! Imports run one way: `app` uses everything; the sources and writers use
//! `model` and `reasons`; nothing in `model` or `ca` imports upwards.

pub mod app;
pub mod ca;
pub mod gateway_status;
pub mod kube_source;
pub mod leader;
pub mod manifests;
pub mod metrics;
pub mod model;
pub mod reasons;
pub mod status;
pub mod waypoint_deploy;
pub mod xds;
