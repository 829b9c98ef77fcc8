//! weft-controller: the control plane. Kubernetes objects (watched through
//! reflectors, or read from a folder of manifests) in; one mesh model out,
//! streamed to ztunnels over gRPC; also the mesh CA.
//!
//! - `model_builder`: Kubernetes objects -> `MeshModel` + policy status
//!   (pure, level-based); `gateway_api`: its Gateway API / L7 part
//!   (waypoints, routes, route and Gateway status)
//! - `kube_source`: reflectors on the API server feeding the builder
//! - `manifests`: the same builder fed by a watched folder of YAML
//! - `status`, `leader`: conditions/Events, Lease-based leader election;
//!   `gateway_status`: Gateway and route status; `waypoint_deploy`: the
//!   waypoints' Deployments (cluster mode, leader only)
//! - `xds`: the config stream to ztunnels (incremental, ACK/NACK)
//! - `ca/`: the mesh CA on `weft-pki` (`MeshCa` in `ca/mod.rs`; root
//!   storage in `store` and `secret_store`, callers in `auth`, the gRPC
//!   service in `service`, root rotation in `rotation`, the gRPC port's
//!   serving certificate in `serving`)

pub mod app;
pub mod ca;
pub mod gateway_api;
pub mod gateway_status;
pub mod kube_source;
pub mod leader;
pub mod manifests;
pub mod model_builder;
pub mod status;
pub mod waypoint_deploy;
pub mod xds;
