//! What the ztunnel shows on the shared ops endpoints
//! (`weft_dataplane::ops`): its metrics, and a `/config_dump` of the model,
//! its pods, certificates and pooled connections.

use std::sync::Arc;
use std::time::UNIX_EPOCH;

use weft_dataplane::certs::BoxFuture;
use weft_dataplane::ops::OpsHandler;

use crate::inpod::InPod;
use crate::proxy::ProxyInputs;

pub struct Admin {
    pub pi: Arc<ProxyInputs>,
    pub inpod: Arc<InPod>,
}

fn unix(t: Option<std::time::SystemTime>) -> u64 {
    t.and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl OpsHandler for Admin {
    fn metrics(&self) -> String {
        self.pi.metrics.encode()
    }

    fn config_dump(&self) -> BoxFuture<'_, serde_json::Value> {
        Box::pin(async move {
            let snap = self.pi.state.load();
            let certs: Vec<_> = self
                .pi
                .certs()
                .status()
                .into_iter()
                .map(|c| {
                    serde_json::json!({
                        "identity": c.identity.to_string(),
                        "expires_unix": unix(c.not_after),
                        "renew_unix": unix(c.renew_at),
                        "last_error": c.last_error,
                    })
                })
                .collect();
            serde_json::json!({
                "node": self.pi.cfg.node_name,
                "model_version": snap.version,
                "model": snap.model,
                "pods": self.inpod.status().await,
                "certificates": certs,
                "trust_roots": self.pi.certs().trust().get().roots.len(),
                "pooled_connections": self.pi.dialer.pool().len(),
            })
        })
    }
}
