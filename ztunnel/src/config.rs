//! ztunnel settings, from flags or environment.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    /// Name of this node: the ztunnel serves the pods scheduled on it.
    #[arg(long, env = "WEFT_NODE_NAME")]
    pub node_name: String,
    /// Addresses the node's kubelet probes come from; their connections to
    /// pods are not captured.
    #[arg(long = "node-ip", env = "WEFT_NODE_IP", value_delimiter = ',')]
    pub node_ips: Vec<IpAddr>,
    /// The controller's gRPC address (`host:port` or `http://host:port`):
    /// config stream and CA. The normal mode.
    #[arg(long, env = "WEFT_CONTROLLER", conflicts_with_all = ["model_file", "ca_dir"])]
    pub controller: Option<String>,
    /// Root certificate(s) that verify the controller's TLS serving
    /// certificate (the `weft-ca-root-cert` ConfigMap in a cluster).
    #[arg(long, env = "WEFT_CONTROLLER_CA_FILE")]
    pub controller_ca_file: Option<PathBuf>,
    /// File holding this node's bearer token for the controller (a
    /// ServiceAccount token in a cluster, a bootstrap token elsewhere).
    #[arg(long, env = "WEFT_CA_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
    /// Standalone mode: the mesh model from a YAML file, watched for
    /// changes, instead of the controller's stream.
    #[arg(long, env = "WEFT_MODEL_FILE", requires = "ca_dir")]
    pub model_file: Option<PathBuf>,
    /// Standalone mode: directory of a local mesh CA (root-cert.pem,
    /// root-key.pem), generated on first start.
    #[arg(long, env = "WEFT_CA_DIR", requires = "model_file")]
    pub ca_dir: Option<PathBuf>,
    /// Where enrolled pods are remembered across restarts.
    #[arg(long, env = "WEFT_STATE_DIR", default_value = "/var/run/weft/ztunnel")]
    pub state_dir: PathBuf,
    /// bpffs directory for this ztunnel's pinned maps and links.
    #[arg(long, env = "WEFT_BPF_PIN_DIR", default_value = "/sys/fs/bpf/weft")]
    pub bpf_pin_dir: PathBuf,
    /// Unix socket the CNI plugin talks to.
    #[arg(long, env = "WEFT_CNI_SOCKET", default_value = weft_api::cni::DEFAULT_SOCKET)]
    pub cni_socket: PathBuf,
    #[arg(long, default_value = "127.0.0.1:15000")]
    pub admin_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    /// Workload certificate lifetime asked for (renewed at half life); 0s:
    /// the CA's default (the controller's `--cert-ttl`, or 24 h from the
    /// standalone CA).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub cert_ttl: Duration,
    /// CONNECT streams per pooled HTTP/2 connection before another opens.
    #[arg(long, default_value_t = 100)]
    pub max_streams_per_connection: usize,
    /// Trust domain of the local CA.
    #[arg(long, default_value = weft_api::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Log as JSON lines.
    #[arg(long, env = "WEFT_LOG_JSON")]
    pub log_json: bool,
    /// Connections this ztunnel proxies at once, all pods together; more
    /// are closed on accept (counted as `node_connection_limit`).
    #[arg(long, env = "WEFT_MAX_CONNECTIONS", default_value_t = 65_536)]
    pub max_connections: usize,
    /// Connections at once per pod and direction (its outbound, its
    /// inbound); more are closed on accept (`pod_connection_limit`).
    #[arg(long, env = "WEFT_MAX_CONNECTIONS_PER_POD", default_value_t = 8_192)]
    pub max_connections_per_pod: usize,
    /// A plaintext inbound connection (15006) over which no byte has moved
    /// either way by then is closed (`first_byte_timeout`).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub first_byte_timeout: Duration,
    /// Connecting to the app inside its pod; past it the tunnel is
    /// answered 503 (`app_unreachable`).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub app_connect_timeout: Duration,
    /// An inbound HBONE connection with no open tunnel for this long is
    /// closed with GOAWAY.
    #[arg(long, default_value = "300s", value_parser = parse_duration)]
    pub hbone_idle_timeout: Duration,
    /// Pooled outbound HBONE connections send an HTTP/2 PING this often;
    /// one unanswered within `--hbone-keepalive-timeout` retires the
    /// connection (a dead peer) and the next tunnel dials a new one.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub hbone_keepalive: Duration,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub hbone_keepalive_timeout: Duration,
    /// At SIGTERM: how long open connections may run on after the pods'
    /// listeners have closed, before the process exits anyway. Keep it
    /// below the pod's terminationGracePeriodSeconds.
    #[arg(long, env = "WEFT_DRAIN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    weft_api::duration::parse(s)
}
