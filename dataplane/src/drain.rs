//! Graceful drain, handed to every accept loop and every connection.
//!
//! A [`DrainWatcher`] is both the signal and the work it stands for: every
//! accept loop and every connection holds a clone, stops taking new work
//! (closes its listener, sends HTTP/2 GOAWAY) once [`DrainWatcher::signaled`]
//! resolves, and drops its clone when it has finished. The
//! [`DrainTrigger`] starts the drain and waits until every clone is gone,
//! or a deadline passes.

use std::time::Duration;

use tokio::sync::watch;

/// A drain and its first watcher.
pub fn channel() -> (DrainTrigger, DrainWatcher) {
    let (tx, rx) = watch::channel(false);
    (DrainTrigger { tx }, DrainWatcher { rx })
}

pub struct DrainTrigger {
    tx: watch::Sender<bool>,
}

#[derive(Clone)]
pub struct DrainWatcher {
    rx: watch::Receiver<bool>,
}

/// How a drain ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainOutcome {
    /// Watchers still held when the deadline passed (0: everything ended).
    pub remaining: usize,
    pub took: Duration,
}

impl DrainTrigger {
    /// A watcher for new work.
    pub fn watcher(&self) -> DrainWatcher {
        DrainWatcher {
            rx: self.tx.subscribe(),
        }
    }

    /// Watchers (listeners and connections) not finished.
    pub fn outstanding(&self) -> usize {
        self.tx.receiver_count()
    }

    /// Signals every watcher without waiting: listeners close, HTTP/2
    /// connections get GOAWAY, connections run on. A ztunnel that handed
    /// its listeners to a successor starts here and waits later.
    pub fn start(&self) {
        self.tx.send_replace(true);
    }

    /// Signals every watcher (if [`DrainTrigger::start`] has not) and waits until all are dropped or `deadline`
    /// has passed. The trigger itself is no watcher: code that hands out
    /// watchers keeps it (shared) without holding the drain up.
    pub async fn drain(&self, deadline: Duration) -> DrainOutcome {
        let start = tokio::time::Instant::now();
        self.tx.send_replace(true);
        let _ = tokio::time::timeout(deadline, self.tx.closed()).await;
        DrainOutcome {
            remaining: self.tx.receiver_count(),
            took: start.elapsed(),
        }
    }
}

impl DrainWatcher {
    /// Resolves once the drain has started (at once if it has).
    pub async fn signaled(&self) {
        let mut rx = self.rx.clone();
        // An error means the trigger is gone: the process is ending anyway.
        let _ = rx.wait_for(|draining| *draining).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.rx.borrow()
    }
}

impl DrainTrigger {
    /// True once [`DrainTrigger::drain`] has been called.
    pub fn is_draining(&self) -> bool {
        *self.tx.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_every_watcher_or_the_deadline() {
        let (trigger, watcher) = channel();
        let conn = watcher.clone();
        let task = tokio::spawn(async move {
            conn.signaled().await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(conn);
        });
        let lingering = trigger.watcher();
        drop(watcher);
        let outcome = trigger.drain(Duration::from_millis(500)).await;
        task.await.unwrap();
        assert_eq!(outcome.remaining, 1, "the lingering watcher is counted");
        assert!(outcome.took >= Duration::from_millis(450));
        assert!(lingering.is_draining());

        let (trigger, watcher) = channel();
        let t = tokio::spawn(async move {
            watcher.signaled().await;
        });
        let outcome = trigger.drain(Duration::from_secs(5)).await;
        t.await.unwrap();
        assert_eq!(outcome.remaining, 0);
        assert!(outcome.took < Duration::from_secs(1));
    }
}
