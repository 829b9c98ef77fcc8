//! The mesh model from the controller's config stream: the shared client
//! (`weft_hbone::control::config_stream`) feeding this ztunnel's
//! [`MeshState`] and counting updates and rejections.

use std::sync::Arc;

use weft_api::MeshModel;
use weft_hbone::control::{ConfigSink, ConfigStream, ControllerAddr, Role, SharedTrustBundle};

use crate::metrics::Metrics;
use crate::state::MeshState;

pub use weft_hbone::control::config_stream::{INITIAL_BACKOFF, MAX_BACKOFF};

struct StateSink {
    state: MeshState,
    metrics: Arc<Metrics>,
}

impl ConfigSink for StateSink {
    fn model_changed(&self, model: MeshModel, _version: u64, _full: bool) {
        self.state.store(model);
        self.metrics.config_updates.inc();
    }

    fn rejected(&self, _version: u64, _error: &str) {
        self.metrics.config_rejections.inc();
    }
}

/// Runs forever: subscribes for `node`, applies updates, reconnects.
pub async fn run(
    endpoint: impl Into<ControllerAddr>,
    node: String,
    token: String,
    state: MeshState,
    metrics: Arc<Metrics>,
    trust: SharedTrustBundle,
) {
    ConfigStream {
        endpoint: endpoint.into(),
        node,
        token,
        role: Role::Ztunnel,
        trust,
        sink: Arc::new(StateSink { state, metrics }),
    }
    .run()
    .await
}
