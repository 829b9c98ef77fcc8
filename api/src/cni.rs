//! The protocol between the `weft-cni` plugin and the node's ztunnel: one
//! JSON line each way over a unix socket. The plugin returns to the runtime
//! only after the ztunnel answers, so capture is in place before the pod's
//! app runs.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Default path of the ztunnel's CNI socket on a node.
pub const DEFAULT_SOCKET: &str = "/var/run/weft/cni.sock";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CniCommand {
    Add,
    Del,
    Check,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniRequest {
    pub command: CniCommand,
    pub container_id: String,
    /// Path of the pod's network namespace (CNI_NETNS).
    pub netns: String,
    pub pod_namespace: String,
    pub pod_name: String,
    /// The pod's addresses, from the previous plugin's result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResponse {
    pub ok: bool,
    /// Whether the pod's traffic is captured now.
    #[serde(default)]
    pub enrolled: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}
