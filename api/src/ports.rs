//! Well-known ports (DESIGN.md "Contracts").

/// Outbound capture listener, 127.0.0.1 inside each enrolled pod.
pub const OUTBOUND: u16 = 15001;
/// Inbound plaintext capture listener inside each enrolled pod.
pub const INBOUND_PLAINTEXT: u16 = 15006;
/// Inbound HBONE (HTTP/2 CONNECT over mTLS) inside each enrolled pod.
pub const HBONE: u16 = 15008;
/// Admin (`/config_dump`), localhost only.
pub const ADMIN: u16 = 15000;
/// Prometheus `/metrics`.
pub const METRICS: u16 = 15020;
/// Readiness `/healthz/ready`.
pub const READINESS: u16 = 15021;

/// Ports a workload may not be reached on through the mesh: they belong to
/// the proxy itself.
pub fn is_proxy_port(port: u16) -> bool {
    matches!(
        port,
        OUTBOUND | INBOUND_PLAINTEXT | HBONE | ADMIN | METRICS | READINESS
    )
}
