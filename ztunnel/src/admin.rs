//! What the ztunnel shows on the shared ops endpoints
//! (`weft_dataplane::ops`): its metrics, and a `/config_dump` of the model,
//! its pods, certificates and pooled connections.

use std::sync::Arc;

use weft_dataplane::certs::BoxFuture;
use weft_dataplane::ops::OpsHandler;

use crate::inpod::InPod;
use crate::proxy::ProxyInputs;

pub struct Admin {
    pub pi: Arc<ProxyInputs>,
    pub inpod: Arc<InPod>,
}

impl OpsHandler for Admin {
    fn metrics(&self) -> String {
        self.pi.metrics.encode()
    }

    fn config_dump(&self) -> BoxFuture<'_, serde_json::Value> {
        Box::pin(async move {
            let snap = self.pi.state.load();
            serde_json::json!({
                "node": self.pi.cfg.node_name,
                "model_version": snap.version,
                "model": snap.model,
                "pods": self.inpod.status().await,
                "certificates": self.pi.certs().to_json(),
                "trust_roots": self.pi.certs().trust().get().roots.len(),
                "pooled_connections": self.pi.dialer.pool().len(),
            })
        })
    }
}
