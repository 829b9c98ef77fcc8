//! The in-memory mesh model the data plane reads. A `Snapshot` is an
//! immutable, indexed view of one `MeshModel`; `MeshState` swaps whole
//! snapshots when the source (file today, gRPC stream later) delivers a new
//! model, so a connection sees one consistent version from start to end.

mod snapshot;

use std::sync::{Arc, RwLock};

pub use snapshot::{OutboundRoute, Snapshot, WorkloadRef};
use weft_api::MeshModel;

#[derive(Clone, Default)]
pub struct MeshState {
    current: Arc<RwLock<Arc<Snapshot>>>,
    version: Arc<std::sync::atomic::AtomicU64>,
    changed: Arc<tokio::sync::Notify>,
}

impl MeshState {
    pub fn load(&self) -> Arc<Snapshot> {
        match self.current.read() {
            Ok(g) => g.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Installs a new model and wakes everything waiting for a change.
    pub fn store(&self, model: MeshModel) {
        let version = self
            .version
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
            + 1;
        let snap = Arc::new(Snapshot::new(model, version));
        match self.current.write() {
            Ok(mut g) => *g = snap,
            Err(poisoned) => *poisoned.into_inner() = snap,
        }
        self.changed.notify_waiters();
    }

    pub fn version(&self) -> u64 {
        self.version.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The current snapshot once `ready` holds for it, waiting up to
    /// `timeout` for updates (a pod's connection can race the model update
    /// that describes the pod).
    pub async fn load_when(
        &self,
        timeout: std::time::Duration,
        ready: impl Fn(&Snapshot) -> bool,
    ) -> Option<Arc<Snapshot>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let snap = self.load();
            if ready(&snap) {
                return Some(snap);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }

    /// Resolves on the next `store`.
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}
