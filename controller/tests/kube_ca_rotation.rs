//! Root rotation in cluster mode, against a fake Kubernetes API server
//! (`support::FakeApi`, standing in for the real one, which cannot run
//! here): two controller replicas keep the root in one Secret; an operator
//! annotates it; the leader rotates, the follower (watching the Secret)
//! adopts, and after the overlap both trust only the new root.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::*;
use tokio::sync::watch;
use weft_controller::ca::secret_store::SecretRootStore;
use weft_controller::ca::{MeshCa, RootStore, ROTATE_ANNOTATION};

const NS: &str = "weft-system";
const SECRET: &str = "weft-ca-root";

async fn replica(fake: &FakeApi) -> (Arc<MeshCa>, Arc<dyn RootStore>) {
    let store: Arc<dyn RootStore> = Arc::new(SecretRootStore::new(fake.client(), NS, SECRET));
    let ca = MeshCa::load_or_generate(store.clone(), "cluster.local")
        .await
        .unwrap();
    (Arc::new(ca), store)
}

/// Waits (at most 20 s) until `ca` trusts `n` roots.
async fn wait_roots(ca: &MeshCa, what: &str, n: usize) {
    wait_for(&mut ca.subscribe_bundle(), 20, what, |b| b.roots.len() == n).await;
}

#[tokio::test]
async fn kube_annotation_rotates_the_root_on_every_replica_then_retires_the_old_one() {
    let fake = FakeApi::start(&[SECRETS]).await;
    let (leader, leader_store) = replica(&fake).await;
    let (follower, follower_store) = replica(&fake).await;
    let old_root = leader.trust_bundle().roots[0].clone();
    assert_eq!(follower.trust_bundle().roots, vec![old_root.clone()]);

    let overlap = Duration::from_secs(3);
    let (_leading, is_leader) = watch::channel(true);
    let (_following, not_leader) = watch::channel(false);
    tokio::spawn(weft_controller::ca::rotation::run(
        leader.clone(),
        leader_store,
        is_leader,
        overlap,
    ));
    tokio::spawn(weft_controller::ca::rotation::run(
        follower.clone(),
        follower_store,
        not_leader,
        overlap,
    ));

    // What `kubectl annotate secret weft-ca-root weft.dev/rotate-root=now`
    // does, next to a label of the operator's own.
    let mut secret = fake.get(SECRETS, NS, SECRET).expect("root Secret created");
    secret["metadata"]["annotations"] = json!({ ROTATE_ANNOTATION: "now" });
    secret["metadata"]["labels"] = json!({ "team": "platform" });
    fake.apply(SECRETS, secret);

    wait_roots(&leader, "leader rotated", 2).await;
    wait_roots(&follower, "follower adopted", 2).await;
    assert_eq!(leader.trust_bundle(), follower.trust_bundle());
    let new_root = leader.trust_bundle().roots[0].clone();
    assert_ne!(new_root, old_root);
    assert_eq!(
        leader.trust_bundle().roots[1],
        old_root,
        "old root still trusted"
    );

    let stored = fake.get(SECRETS, NS, SECRET).unwrap();
    assert!(
        stored["metadata"]["annotations"][ROTATE_ANNOTATION].is_null(),
        "the request is consumed: {stored}"
    );
    assert_eq!(stored["metadata"]["labels"]["team"], "platform");
    assert!(stored["data"]["rotated-at"].is_string());
    assert!(stored["data"]["previous-roots.pem"].is_string());

    // After the overlap: only the new root, on both replicas and in the
    // Secret.
    wait_roots(&leader, "leader retired", 1).await;
    wait_roots(&follower, "follower retired", 1).await;
    assert_eq!(leader.trust_bundle().roots, vec![new_root.clone()]);
    assert_eq!(follower.trust_bundle().roots, vec![new_root]);
    let stored = fake.get(SECRETS, NS, SECRET).unwrap();
    assert!(stored["data"]["previous-roots.pem"].is_null(), "{stored}");
    assert_eq!(stored["metadata"]["labels"]["team"], "platform");
}
