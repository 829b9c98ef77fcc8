//! weft-ztunnel: the per-node L4 proxy. Map of the rooms:
//! - `capture/`: eBPF programs, network namespaces, in-pod routing (where
//!   the kernel meets user space)
//! - `inpod`: which pods are enrolled; enroll/unenroll
//! - `proxy/`: outbound, inbound, sockets inside pods
//! - `state/`: the mesh model as the data plane reads it; `source/`: how it
//!   arrives
//! - `identity`: certificates; `rbac`: L4 policy; `metrics`, `admin`
//! - `cni_server`: the CNI plugin's way in

pub mod admin;
pub mod app;
pub mod capture;
pub mod cni_server;
pub mod config;
pub mod inpod;
pub mod metrics;
pub mod proxy;
pub mod rbac;
pub mod source;
pub mod state;

// Shared with the waypoint; kept under their old paths.
pub use weft_hbone::control::addr as controller_client;
pub use weft_hbone::control::{ca_client, identity};
