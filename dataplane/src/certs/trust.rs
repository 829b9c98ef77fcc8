//! The mesh roots this process trusts, as last delivered (by the config
//! stream, a CA answer, or the standalone CA), observable so that cached
//! TLS configurations follow a change without a restart.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;
use weft_pki::TrustBundle;

/// Shared handle; clones see the same roots. Empty until the first
/// delivery, which makes every TLS handshake fail closed.
#[derive(Clone)]
pub struct TrustRoots {
    inner: Arc<Inner>,
}

struct Inner {
    bundle: watch::Sender<TrustBundle>,
    /// Bumped on every change: a cheap "is my cached config current?".
    generation: AtomicU64,
}

impl Default for TrustRoots {
    fn default() -> Self {
        Self::new(TrustBundle::default())
    }
}

impl TrustRoots {
    pub fn new(bundle: TrustBundle) -> Self {
        Self {
            inner: Arc::new(Inner {
                bundle: watch::Sender::new(bundle),
                generation: AtomicU64::new(0),
            }),
        }
    }

    pub fn get(&self) -> TrustBundle {
        self.inner.bundle.borrow().clone()
    }

    /// Replaces the roots when they differ; returns whether they did.
    pub fn set(&self, bundle: TrustBundle) -> bool {
        let changed = self.inner.bundle.send_if_modified(|current| {
            if *current == bundle {
                return false;
            }
            *current = bundle;
            true
        });
        if changed {
            self.inner.generation.fetch_add(1, Ordering::AcqRel);
            tracing::info!(
                component = "identity",
                roots = self.inner.bundle.borrow().roots.len(),
                "trust bundle updated"
            );
        }
        changed
    }

    /// Changes with every new set of roots.
    pub fn generation(&self) -> u64 {
        self.inner.generation.load(Ordering::Acquire)
    }

    /// Wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<TrustBundle> {
        self.inner.bundle.subscribe()
    }
}
