//! What the ztunnel shows on the shared ops endpoints
//! (`weft_dataplane::ops`): its metrics, a `/config_dump` of the model,
//! its pods, certificates and pooled connections, and the `/debug/node`
//! report `weftctl check` reads (`weft_api::node_report`).

use std::sync::Arc;

use weft_api::node_report::{CertificateState, NodeReport};
use weft_dataplane::certs::BoxFuture;
use weft_dataplane::ops::{OpsHandler, Readiness};

use crate::inpod::InPod;
use crate::proxy::ProxyInputs;

pub struct Admin {
    pub pi: Arc<ProxyInputs>,
    pub inpod: Arc<InPod>,
    pub readiness: Arc<Readiness>,
}

fn unix(t: Option<std::time::SystemTime>) -> u64 {
    t.and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
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
            serde_json::json!({
                "node": self.pi.cfg.node_name,
                "model_version": snap.version,
                "model": snap.to_model(),
                "pods": self.inpod.status().await,
                "certificates": self.pi.certs().to_json(),
                "trust_roots": self.pi.certs().trust().get().roots.len(),
                "pooled_connections": self.pi.dialer.pool().len(),
            })
        })
    }

    fn node_report(&self) -> BoxFuture<'_, Option<serde_json::Value>> {
        Box::pin(async move {
            let report = NodeReport {
                node: self.pi.cfg.node_name.clone(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                ready: self.readiness.is_ready(),
                model_version: self.pi.state.load().version,
                pods_enrolled: self
                    .inpod
                    .status()
                    .await
                    .iter()
                    .filter(|p| p.enrolled)
                    .count(),
                facts: weft_dataplane::node::gather(&self.pi.cfg.bpf_pin_dir),
                certificates: self
                    .pi
                    .certs()
                    .status()
                    .into_iter()
                    .map(|c| CertificateState {
                        identity: c.identity.to_string(),
                        valid_from_unix: unix(c.not_before),
                        expires_unix: unix(c.not_after),
                        last_error: c.last_error,
                    })
                    .collect(),
            };
            serde_json::to_value(report).ok()
        })
    }
}
