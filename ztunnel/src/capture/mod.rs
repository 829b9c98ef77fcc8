//! In-kernel traffic capture of enrolled pods: network namespace handling
//! (`netns`), loading and steering with Weft's eBPF programs (`ebpf`), and the
//! in-pod routing that keeps the client's IP on the inbound leg (`pod_routing`).

pub mod ebpf;
pub mod netns;
pub mod pod_routing;
