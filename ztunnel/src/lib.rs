//! weft-ztunnel: the per-node L4 proxy. Map of the rooms:
//! - `capture/`: eBPF programs, network namespaces, in-pod routing (where
//!   the kernel meets user space)
//! - `inpod`: which pods are enrolled; enroll/unenroll
//! - `proxy/`: outbound, inbound, sockets inside pods
//! - `state/`: the mesh model as the data plane reads it; `source/`: the
//!   standalone model file (the controller's stream is shared, in
//!   `weft_dataplane::control`)
//! - `rbac`: L4 policy; `metrics` (the connection guard), `admin` (what the
//!   shared ops endpoints show)
//! - `cni_server`: the CNI plugin's way in
//!
//! Certificates, TLS configurations, the model swap, drain, the ops server
//! and the controller client are `weft_dataplane`'s, shared with the
//! waypoint.

pub mod admin;
pub mod app;
pub mod capture;
pub mod cni_plugin;
pub mod cni_server;
pub mod config;
pub mod handover;
pub mod inpod;
pub mod metrics;
pub mod proxy;
pub mod rbac;
pub mod source;
pub mod state;
