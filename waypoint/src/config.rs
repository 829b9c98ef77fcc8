//! Waypoint settings, from flags or environment.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "weft-waypoint",
    version,
    about = "Weft's L7 proxy (one per Gateway of class weft-waypoint)"
)]
pub struct Config {
    /// Name of the Gateway this waypoint serves.
    #[arg(long, env = "WEFT_WAYPOINT_NAME")]
    pub name: String,
    /// Namespace of the Gateway (and of this pod).
    #[arg(long, env = "WEFT_WAYPOINT_NAMESPACE")]
    pub namespace: String,
    /// ServiceAccount the pod runs as; its SPIFFE id is the waypoint's
    /// identity. Defaults to the Gateway name.
    #[arg(long, env = "WEFT_WAYPOINT_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    /// Node the pod runs on (the config stream and CA are per node).
    #[arg(long, env = "WEFT_NODE_NAME")]
    pub node_name: String,
    /// The controller's gRPC address (`host:port`, `https://..`, `http://..`).
    #[arg(long, env = "WEFT_CONTROLLER")]
    pub controller: String,
    /// Root certificate(s) verifying the controller's serving certificate.
    #[arg(long, env = "WEFT_CONTROLLER_CA_FILE")]
    pub controller_ca_file: Option<PathBuf>,
    /// File with the bearer token for the controller.
    #[arg(long, env = "WEFT_CA_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// Address HBONE is served on; the default takes both IPv4 and IPv6
    /// (dual-stack pods are dialled on either), or IPv4 alone on a node
    /// without IPv6.
    #[arg(long, default_value = "[::]:15008")]
    pub hbone_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// `/config_dump` (localhost only).
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    /// Address upstream HBONE connections are made from (the pod IP);
    /// any when unset.
    #[arg(long, env = "WEFT_POD_IP")]
    pub pod_ip: Option<IpAddr>,
    /// Certificate lifetime asked for (renewed at half life); 0s: the
    /// controller's default (its `--cert-ttl`).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub cert_ttl: Duration,
    /// At SIGTERM or SIGINT, how long the waypoint keeps accepting new HBONE
    /// connections (readiness already false) before it drains: time for
    /// the controller's model without this replica to reach the ztunnels,
    /// so none dials a closed listener.
    #[arg(long, env = "WEFT_DRAIN_ANNOUNCE", default_value = "0s", value_parser = parse_duration)]
    pub drain_announce: Duration,
    /// At SIGTERM or SIGINT, how long open HBONE connections may take to
    /// finish their tunnels before the process exits anyway.
    #[arg(long, env = "WEFT_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Write one JSON access-log line per request to stdout.
    #[arg(long, env = "WEFT_ACCESS_LOG", default_value_t = true, action = clap::ArgAction::Set)]
    pub access_log: bool,
    /// OTLP/HTTP traces endpoint (`http://collector:4318`); spans are
    /// exported when set.
    #[arg(long, env = "WEFT_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Log (not access log) as JSON lines.
    #[arg(long, env = "WEFT_LOG_JSON")]
    pub log_json: bool,
    /// Worker threads (0: one per CPU). 1 runs everything on one thread,
    /// with no cross-thread wake-ups (scale with replicas instead).
    #[arg(long, env = "WEFT_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
}

impl Config {
    pub fn service_account(&self) -> &str {
        self.service_account.as_deref().unwrap_or(&self.name)
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    weft_api::duration::parse(s)
}
