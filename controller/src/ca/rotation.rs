//! Root rotation, driven by the operator and kept in step across replicas.
//!
//! An operator asks for a rotation by annotating the root Secret
//! (`kubectl annotate secret -n weft-system weft-ca-root weft.dev/rotate-root=now`)
//! or, in embedded mode, by creating the file `rotate-root` in the CA
//! directory. The leader then makes a new root the signer while the old one
//! stays trusted, and retires the old one when the overlap has passed (long
//! enough for every workload certificate to have been renewed from the new
//! root). Every replica follows what is stored, so all of them sign with the
//! same root; ztunnels and waypoints get the new trust bundle over the
//! config stream, and the controller's serving certificate is reissued
//! (`serving`).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::watch;
use tracing::{info, warn};

use super::error::CaError;
use super::store::{unix_now, RootStore};
use super::MeshCa;

/// After a failed step, try again this much later.
const RETRY: Duration = Duration::from_secs(30);

/// Follows the store; on the leader, also rotates on request and retires
/// the previous roots `overlap` after a rotation. Runs until the store's
/// change stream ends.
pub async fn run(
    ca: Arc<MeshCa>,
    store: Arc<dyn RootStore>,
    mut is_leader: watch::Receiver<bool>,
    overlap: Duration,
) {
    let mut changes = store.changes();
    // Embedded mode hands a fixed `true` whose sender may be gone.
    let mut leadership_open = true;
    loop {
        let leader = *is_leader.borrow_and_update();
        let wait = match step(&ca, store.as_ref(), leader, overlap).await {
            Ok(next) => next,
            Err(e) => {
                warn!(component = "ca", error = %e, "root rotation step failed; retrying");
                Some(RETRY)
            }
        };
        // Nothing pending: only a change (or leadership) wakes us.
        let wait = wait.unwrap_or(Duration::from_secs(365 * 86400));
        tokio::select! {
            next = changes.next() => {
                if next.is_none() {
                    return;
                }
            }
            _ = tokio::time::sleep(wait) => {}
            changed = is_leader.changed(), if leadership_open => {
                leadership_open = changed.is_ok();
            }
        }
    }
}

/// One look at the store. Returns how long until the next thing is due
/// (the end of an overlap), if anything is.
async fn step(
    ca: &MeshCa,
    store: &dyn RootStore,
    leader: bool,
    overlap: Duration,
) -> Result<Option<Duration>, CaError> {
    let Some(stored) = store.load().await? else {
        return Ok(None);
    };
    ca.adopt(&stored)?;
    if !leader {
        return Ok(None);
    }
    if stored.rotation_requested {
        info!(
            component = "ca",
            overlap_s = overlap.as_secs(),
            "root rotation requested"
        );
        ca.rotate().await?;
        return Ok(Some(overlap));
    }
    if stored.previous_roots_pem.is_empty() {
        return Ok(None);
    }
    // Previous roots without a rotation time (set by hand, or by an older
    // version): count the overlap from now.
    let Some(at) = stored.rotated_at_unix else {
        let mut dated = stored.clone();
        dated.rotated_at_unix = Some(unix_now());
        store.save(&dated).await?;
        return Ok(Some(overlap));
    };
    let due = at.saturating_add(overlap.as_secs());
    let now = unix_now();
    if now >= due {
        ca.retire_previous_roots().await?;
        return Ok(None);
    }
    Ok(Some(Duration::from_secs(due - now)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::store::{DirRootStore, CROSS_SIGNED_FILE, ROTATE_REQUEST_FILE};
    use crate::ca::Csr;

    /// Certificates in the chain of a leaf `ca` signs now.
    fn leaf_chain_len(ca: &MeshCa) -> usize {
        let id = weft_api::Identity::new("cluster.local", "shop", "cart");
        let (csr, _) = Csr::generate(&id).unwrap();
        ca.sign(Csr::from_pem(&csr).unwrap(), Duration::from_secs(60))
            .unwrap()
            .chain_pem
            .len()
    }

    async fn ca_on(dir: &std::path::Path) -> (Arc<MeshCa>, Arc<dyn RootStore>) {
        let store: Arc<dyn RootStore> = Arc::new(DirRootStore::new(dir));
        let ca = MeshCa::load_or_generate(store.clone(), "cluster.local")
            .await
            .unwrap();
        (Arc::new(ca), store)
    }

    /// Waits (at most 20 s) until `ca`'s bundle satisfies `ok`.
    async fn wait_bundle(ca: &MeshCa, what: &str, ok: impl Fn(&weft_pki::TrustBundle) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !ok(&ca.trust_bundle()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{what}: {} roots",
                ca.trust_bundle().roots.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[tokio::test]
    async fn requested_rotation_overlaps_then_retires_and_followers_follow() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let (leader, leader_store) = ca_on(&ca_dir).await;
        let (follower, follower_store) = ca_on(&ca_dir).await;
        let old_root = leader.trust_bundle().roots[0].clone();
        assert_eq!(follower.trust_bundle().roots, vec![old_root.clone()]);
        let overlap = Duration::from_secs(3);
        tokio::spawn(run(
            leader.clone(),
            leader_store,
            watch::channel(true).1,
            overlap,
        ));
        tokio::spawn(run(
            follower.clone(),
            follower_store,
            watch::channel(false).1,
            overlap,
        ));

        std::fs::write(ca_dir.join(ROTATE_REQUEST_FILE), "now").unwrap();
        // Overlap: the new root signs, the old one is still trusted, on
        // both replicas; the request is consumed.
        wait_bundle(&leader, "leader rotated", |b| b.roots.len() == 2).await;
        assert_ne!(leader.trust_bundle().roots[0], old_root);
        assert_eq!(leader.trust_bundle().roots[1], old_root);
        wait_bundle(&follower, "follower adopted", |b| b.roots.len() == 2).await;
        assert_eq!(follower.trust_bundle(), leader.trust_bundle());
        assert!(!ca_dir.join(ROTATE_REQUEST_FILE).exists());
        let new_root = leader.trust_bundle().roots[0].clone();
        // Leaves of the overlap carry the new root cross-signed by the old
        // one, on the follower too.
        assert!(ca_dir.join(CROSS_SIGNED_FILE).exists());
        assert_eq!(leaf_chain_len(&follower), 2);
        assert_eq!(leaf_chain_len(&leader), 2);

        // After the overlap only the new root is trusted, everywhere.
        wait_bundle(&leader, "leader retired", |b| b.roots == [new_root.clone()]).await;
        wait_bundle(&follower, "follower retired", |b| {
            b.roots == [new_root.clone()]
        })
        .await;

        assert!(!ca_dir.join(CROSS_SIGNED_FILE).exists());
        assert_eq!(leaf_chain_len(&leader), 1);
        // A restart comes back with the new root alone.
        let (restarted, _) = ca_on(&ca_dir).await;
        assert_eq!(restarted.trust_bundle().roots, vec![new_root]);
    }

    #[tokio::test]
    async fn a_follower_never_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let (follower, store) = ca_on(&ca_dir).await;
        std::fs::write(ca_dir.join(ROTATE_REQUEST_FILE), "now").unwrap();
        let step = step(&follower, store.as_ref(), false, Duration::from_secs(60)).await;
        assert_eq!(step.unwrap(), None);
        assert_eq!(follower.trust_bundle().roots.len(), 1);
        assert!(
            ca_dir.join(ROTATE_REQUEST_FILE).exists(),
            "request left for the leader"
        );
    }

    #[tokio::test]
    async fn the_overlap_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        let (ca, store) = ca_on(&ca_dir).await;
        ca.rotate().await.unwrap();
        // Restarted well within the overlap: the deadline is counted from
        // the stored rotation time, not from the restart.
        let (again, store2) = ca_on(&ca_dir).await;
        assert_eq!(again.trust_bundle().roots.len(), 2);
        let wait = step(&again, store2.as_ref(), true, Duration::from_secs(3600))
            .await
            .unwrap()
            .expect("retirement is scheduled");
        assert!(wait <= Duration::from_secs(3600) && wait > Duration::from_secs(3500));
        // Past the overlap: retired.
        assert_eq!(
            step(&again, store.as_ref(), true, Duration::ZERO)
                .await
                .unwrap(),
            None
        );
        assert_eq!(again.trust_bundle().roots.len(), 1);
    }
}
