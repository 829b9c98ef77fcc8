//! The mesh model from a YAML file, re-read when it changes. A file that
//! fails to parse or validate is rejected and the last good model stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::{info, warn};
use weft_api::MeshModel;

use weft_dataplane::metrics::CommonMetrics;

use crate::state::MeshState;

pub fn load(path: &Path) -> anyhow::Result<MeshModel> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("cannot read mesh model {}: {e}", path.display()))?;
    MeshModel::from_yaml(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
}

fn stamp(path: &Path) -> Option<(SystemTime, u64)> {
    let md = std::fs::metadata(path).ok()?;
    Some((md.modified().ok()?, md.len()))
}

/// Watches `path` (checking its modification stamp every 200 ms) and stores
/// each new valid model.
pub async fn watch(path: PathBuf, state: MeshState, metrics: Arc<crate::metrics::Metrics>) {
    let metrics: &CommonMetrics = &metrics.common;
    let mut last = stamp(&path);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        tick.tick().await;
        let now = stamp(&path);
        if now == last || now.is_none() {
            continue;
        }
        last = now;
        match load(&path) {
            Ok(model) => {
                let version = state.store(model);
                metrics.config_updates.inc();
                info!(component = "config", version, "mesh model applied");
            }
            Err(e) => {
                metrics.config_rejections.inc();
                warn!(component = "config", error = %e, "mesh model rejected; keeping the last good one");
            }
        }
    }
}
