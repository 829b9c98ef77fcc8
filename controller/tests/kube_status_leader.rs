//! The status writer and leader election against a fake Kubernetes API
//! server (`support::FakeApi`), which stands in for the real one: no API
//! server can run on the development and CI machines. Status goes through
//! PATCH of the status subresource, Events through POST, the Lease through
//! GET/POST/PUT with resourceVersion conflicts, as on a cluster.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use support::*;
use tokio::sync::watch;
use weft_controller::leader::{self, LeaderConfig};
use weft_controller::model::{PolicyKind, PolicyStatus};
use weft_controller::reasons;
use weft_controller::status;

fn policy(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"action": "DENY"}
    })
}

fn st(name: &str, accepted: bool, reason: &str) -> PolicyStatus {
    PolicyStatus {
        kind: PolicyKind::AuthorizationPolicy,
        namespace: "shop".into(),
        name: name.into(),
        observed_generation: Some(1),
        accepted,
        reason: reason.into(),
        message: format!("{reason} message"),
    }
}

fn status_patches(fake: &FakeApi) -> Vec<Recorded> {
    fake.requests()
        .into_iter()
        .filter(|r| r.method == "PATCH" && r.path.ends_with("/status"))
        .collect()
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn kube_status_written_only_by_the_leader_and_only_on_change() {
    let fake = FakeApi::start(&[AUTHZ, PEER_AUTHN, EVENTS]).await;
    fake.apply(AUTHZ, policy("good"));
    fake.apply(AUTHZ, policy("bad"));
    let (st_tx, st_rx) = watch::channel(Arc::new(vec![
        st("bad", false, reasons::INVALID_IP_BLOCK),
        st("good", true, reasons::ACCEPTED),
    ]));
    let (lead_tx, lead_rx) = watch::channel(false);
    let task = tokio::spawn(status::run(
        fake.client(),
        st_rx,
        lead_rx,
        "replica-0".into(),
    ));

    // Not the leader: nothing written.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(status_patches(&fake).is_empty());

    lead_tx.send_replace(true);
    eventually("both conditions written", || {
        fake.list(AUTHZ)
            .iter()
            .all(|p| p["status"]["conditions"][0]["type"] == "Accepted")
    })
    .await;
    let bad = fake.get(AUTHZ, "shop", "bad").unwrap();
    let c = &bad["status"]["conditions"][0];
    assert_eq!(c["status"], "False");
    assert_eq!(c["reason"], "InvalidIpBlock");
    assert_eq!(c["observedGeneration"], 1);
    assert!(c["lastTransitionTime"].is_string());
    let good = fake.get(AUTHZ, "shop", "good").unwrap();
    assert_eq!(good["status"]["conditions"][0]["status"], "True");
    assert_eq!(
        good["spec"]["action"], "DENY",
        "status patch leaves spec alone"
    );
    // A Warning Event for the policy that was not accepted, none for the other.
    let events = fake.list(EVENTS);
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["type"], "Warning");
    assert_eq!(events[0]["reason"], "InvalidIpBlock");
    assert_eq!(events[0]["regarding"]["name"], "bad");
    assert_eq!(events[0]["regarding"]["kind"], "AuthorizationPolicy");

    // The same status again: no write.
    let patches = status_patches(&fake).len();
    assert_eq!(patches, 2);
    st_tx.send_replace(Arc::new(vec![
        st("bad", false, reasons::INVALID_IP_BLOCK),
        st("good", true, reasons::ACCEPTED),
    ]));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(status_patches(&fake).len(), patches);

    // The bad policy is fixed: one write, the transition time moves.
    let before = c["lastTransitionTime"].clone();
    tokio::time::sleep(Duration::from_millis(5)).await;
    st_tx.send_replace(Arc::new(vec![
        st("bad", true, reasons::ACCEPTED),
        st("good", true, reasons::ACCEPTED),
    ]));
    eventually("bad accepted", || {
        fake.get(AUTHZ, "shop", "bad").unwrap()["status"]["conditions"][0]["status"] == "True"
    })
    .await;
    assert_eq!(status_patches(&fake).len(), patches + 1);
    let after = fake.get(AUTHZ, "shop", "bad").unwrap()["status"]["conditions"][0]
        ["lastTransitionTime"]
        .clone();
    assert_ne!(before, after);
    assert_eq!(
        fake.list(EVENTS).len(),
        1,
        "no Event for an accepted policy"
    );
    task.abort();
}

fn cfg(identity: &str) -> LeaderConfig {
    LeaderConfig {
        lease_duration: Duration::from_millis(1500),
        retry_period: Duration::from_millis(100),
        ..LeaderConfig::new("weft-system", identity)
    }
}

#[tokio::test]
async fn kube_leader_one_leader_and_failover() {
    let fake = FakeApi::start(&[LEASES]).await;
    let (mut a, a_task) = leader::spawn(fake.client(), cfg("a"));
    wait_for(&mut a, 10, "a leads (creates the Lease)", |l| *l).await;
    let (b, b_task) = leader::spawn(fake.client(), cfg("b"));
    // b sees a renewing, so b never leads while a is alive.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(*a.borrow());
    assert!(!*b.borrow());
    let lease = fake.get(LEASES, "weft-system", "weft-controller").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "a");
    assert_eq!(lease["spec"]["leaseDurationSeconds"], 1);
    assert!(lease["spec"]["renewTime"].is_string());
    // Renewals were conditional updates (PUT carrying a resourceVersion).
    assert!(fake.requests().iter().any(|r| r.method == "PUT"
        && r.body
            .as_ref()
            .is_some_and(|b| b["metadata"]["resourceVersion"].is_string())));

    // a dies: once its lease expires, b takes over.
    a_task.abort();
    let mut b = b;
    wait_for(&mut b, 10, "b takes over", |l| *l).await;
    let lease = fake.get(LEASES, "weft-system", "weft-controller").unwrap();
    assert_eq!(lease["spec"]["holderIdentity"], "b");
    assert_eq!(lease["spec"]["leaseTransitions"], 1);
    b_task.abort();
}

#[tokio::test]
async fn kube_leader_loses_on_conflict() {
    let fake = FakeApi::start(&[LEASES]).await;
    let (mut a, a_task) = leader::spawn(fake.client(), cfg("a"));
    wait_for(&mut a, 10, "a leads", |l| *l).await;
    // Someone else takes the Lease behind a's back (a newer record): a's
    // next renewal sees another holder, which is not expired, and a steps
    // down.
    let mut lease = fake.get(LEASES, "weft-system", "weft-controller").unwrap();
    lease["spec"]["holderIdentity"] = json!("intruder");
    fake.apply(LEASES, lease);
    wait_for(&mut a, 10, "a steps down", |l| !*l).await;
    a_task.abort();
}
