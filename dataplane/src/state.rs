//! The mesh model as a proxy reads it: one compiled, immutable version at a
//! time, swapped whole. Readers take an `Arc` and keep it for as long as a
//! connection or request needs one consistent view; the swap goes through a
//! `tokio::sync::watch`, so a waiter that is busy when a version lands
//! still sees it (it is marked changed until read), and no update is
//! missed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tracing::info;
use weft_api::config_cache::{Changes, ConfigCache};
use weft_api::MeshModel;

/// A proxy's compiled form of one model version (indexes, route tables,
/// policies), built once per swap.
pub trait Compiled: Send + Sync + 'static {
    fn compile(model: MeshModel, version: u64) -> Self;
    fn version(&self) -> u64;

    /// The next version: `self` with `changes` (read from `cache`, which
    /// holds the whole new model) applied. By default compiled whole from
    /// the cache; a proxy whose model grows with the cluster rebuilds only
    /// what the changes touch.
    fn update(&self, cache: &ConfigCache, changes: &Changes, version: u64) -> Self
    where
        Self: Sized,
    {
        let _ = changes;
        Self::compile(cache.to_model(), version)
    }
}

/// The current compiled model. Cheap to clone; clones share it.
pub struct ModelState<T> {
    current: Arc<watch::Sender<Arc<T>>>,
    /// Local versions: 0 is the empty model before the first update.
    last_version: Arc<AtomicU64>,
    /// One writer at a time: an update builds on the version it replaces
    /// (held while compiling, outside the watch's lock, so readers never
    /// wait for a compile).
    writer: Arc<std::sync::Mutex<()>>,
}

impl<T> Clone for ModelState<T> {
    fn clone(&self) -> Self {
        Self {
            current: self.current.clone(),
            last_version: self.last_version.clone(),
            writer: self.writer.clone(),
        }
    }
}

impl<T: Compiled> Default for ModelState<T> {
    fn default() -> Self {
        Self {
            current: Arc::new(watch::Sender::new(Arc::new(T::compile(
                MeshModel::default(),
                0,
            )))),
            last_version: Arc::new(AtomicU64::new(0)),
            writer: Arc::default(),
        }
    }
}

impl<T: Compiled> ModelState<T> {
    pub fn load(&self) -> Arc<T> {
        self.current.borrow().clone()
    }

    /// Compiles `model` as the next version, installs it and wakes every
    /// subscriber; returns the version.
    pub fn store(&self, model: MeshModel) -> u64 {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let version = self.last_version.fetch_add(1, Ordering::AcqRel) + 1;
        self.current
            .send_replace(Arc::new(T::compile(model, version)));
        version
    }

    /// Installs the next version built from the current one and what an
    /// update changed ([`Compiled::update`]); returns the version.
    pub fn apply(&self, cache: &ConfigCache, changes: &Changes) -> u64 {
        let _writer = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let version = self.last_version.fetch_add(1, Ordering::AcqRel) + 1;
        let next = self.load().update(cache, changes, version);
        self.current.send_replace(Arc::new(next));
        version
    }

    /// The version now serving (0 before the first model).
    pub fn version(&self) -> u64 {
        self.current.borrow().version()
    }

    /// A receiver marked changed by every later `store`, including the ones
    /// that land while its owner is busy elsewhere.
    pub fn subscribe(&self) -> watch::Receiver<Arc<T>> {
        self.current.subscribe()
    }

    /// The current model once `ready` holds for it, waiting up to `timeout`
    /// for later versions (a connection can race the update that describes
    /// its pod).
    pub async fn wait_until(
        &self,
        timeout: Duration,
        ready: impl Fn(&T) -> bool,
    ) -> Option<Arc<T>> {
        let mut rx = self.subscribe();
        let found = tokio::time::timeout(timeout, rx.wait_for(|t| ready(t))).await;
        match found {
            Ok(Ok(t)) => Some(t.clone()),
            _ => None,
        }
    }

    /// Runs `apply` for the current version and then for every later one,
    /// one at a time. A version stored while `apply` is still busy with the
    /// previous one is applied next (several such are coalesced into the
    /// newest): none is lost.
    pub async fn for_each_version<F, Fut>(&self, mut apply: F)
    where
        F: FnMut(Arc<T>) -> Fut,
        Fut: std::future::Future<Output = ()>,
    {
        let mut rx = self.subscribe();
        loop {
            let current = rx.borrow_and_update().clone();
            apply(current).await;
            if rx.changed().await.is_err() {
                return;
            }
        }
    }

    /// Waits for the first model, logging every `every` that it is still
    /// waiting for `source`.
    pub async fn first_model(&self, source: &str, every: Duration) -> Arc<T> {
        let mut waited = Duration::ZERO;
        loop {
            if let Some(t) = self.wait_until(every, |t| t.version() > 0).await {
                return t;
            }
            waited += every;
            info!(
                component = "config",
                source,
                waited_s = waited.as_secs(),
                "waiting for the first mesh model"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Count(u64);

    impl Compiled for Count {
        fn compile(model: MeshModel, version: u64) -> Self {
            let _ = model;
            Count(version)
        }
        fn version(&self) -> u64 {
            self.0
        }
    }

    #[tokio::test]
    async fn an_update_stored_while_the_reader_is_busy_is_not_missed() {
        let state = ModelState::<Count>::default();
        let mut rx = state.subscribe();
        // The reader handles version 1 ...
        state.store(MeshModel::default());
        rx.changed().await.unwrap();
        assert_eq!(rx.borrow_and_update().0, 1);
        // ... and while it is busy (not waiting), version 2 lands.
        state.store(MeshModel::default());
        tokio::time::timeout(Duration::from_secs(1), rx.changed())
            .await
            .expect("the update that landed while busy is seen")
            .unwrap();
        assert_eq!(rx.borrow_and_update().0, 2);
    }

    #[tokio::test]
    async fn for_each_version_applies_a_version_that_lands_mid_apply() {
        let state = ModelState::<Count>::default();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (s, log) = (state.clone(), seen.clone());
        tokio::spawn(async move {
            s.for_each_version(|c| {
                let log = log.clone();
                async move {
                    log.lock().unwrap().push(c.0);
                    // A slow reconcile: the next version lands meanwhile.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
            .await
        });
        // Version 0 is applied from t=0 to 200 ms, version 1 lands after it.
        tokio::time::sleep(Duration::from_millis(250)).await;
        state.store(MeshModel::default());
        tokio::time::sleep(Duration::from_millis(50)).await;
        state.store(MeshModel::default()); // while version 1 is applied
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(*seen.lock().unwrap(), vec![0, 1, 2]);
        // Two versions landing during one apply are coalesced: the newest
        // is applied, nothing is left behind.
        state.store(MeshModel::default());
        tokio::time::sleep(Duration::from_millis(20)).await;
        state.store(MeshModel::default());
        state.store(MeshModel::default());
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert_eq!(*seen.lock().unwrap(), vec![0, 1, 2, 3, 5]);
    }

    #[tokio::test]
    async fn wait_until_sees_a_later_version() {
        let state = ModelState::<Count>::default();
        let s = state.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.store(MeshModel::default());
        });
        let got = state.wait_until(Duration::from_secs(2), |c| c.0 >= 1).await;
        assert_eq!(got.map(|c| c.0), Some(1));
        assert!(state
            .wait_until(Duration::from_millis(50), |c| c.0 >= 9)
            .await
            .is_none());
    }
}
