//! `kube_source` against a fake Kubernetes API server (`support::FakeApi`),
//! which stands in for the real one: no API server can run on the
//! development and CI machines. A real `kube::Client` talks HTTP to it; the
//! fake answers lists and watches as the API server does (resourceVersions,
//! bookmarks, 410 Gone), so reflectors, relists and the debounced rebuild
//! run as they would against a cluster.

mod support;

use std::sync::Arc;

use serde_json::json;
use support::*;
use tokio::sync::watch;
use weft_api::MeshModel;
use weft_controller::kube_source;
use weft_controller::model::{GatewayApiOutput, PolicyStatus};
use weft_controller::reasons;

struct Running {
    fake: FakeApi,
    model: watch::Receiver<Arc<MeshModel>>,
    status: watch::Receiver<Arc<Vec<PolicyStatus>>>,
    /// Kept open so the source keeps publishing Gateway API status.
    _gateway_api: watch::Receiver<Arc<GatewayApiOutput>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn start(fake: FakeApi) -> Running {
    let (out, model) = watch::channel(Arc::new(MeshModel::default()));
    let (st, status) = watch::channel(Arc::new(Vec::new()));
    let (gw, _gateway_api) = watch::channel(Arc::new(GatewayApiOutput::default()));
    let task = tokio::spawn(kube_source::run(
        fake.client(),
        "cluster.local".to_owned(),
        out,
        st,
        gw,
    ));
    Running {
        fake,
        model,
        status,
        _gateway_api,
        task,
    }
}

fn workload_names(m: &MeshModel) -> Vec<String> {
    m.workloads.iter().map(|w| w.name.clone()).collect()
}

fn ips_of(m: &MeshModel, name: &str) -> Vec<String> {
    m.workloads
        .iter()
        .filter(|w| w.name == name)
        .flat_map(|w| w.ips.iter().map(|i| i.to_string()))
        .collect()
}

fn captured(m: &MeshModel, name: &str) -> bool {
    m.workloads
        .iter()
        .any(|w| w.name == name && m.is_captured(w))
}

#[tokio::test]
async fn kube_source_follows_pods_namespaces_and_policies() {
    let fake = FakeApi::start(WATCHED).await;
    fake.apply(NAMESPACES, namespace("shop", json!({})));
    fake.apply(
        PODS,
        pod("shop", "a", "n1", "10.0.0.2", json!({"app": "a"})),
    );
    let mut r = start(fake).await;

    // Initial list: the pod is there, not captured (namespace unlabelled).
    let m = wait_for(&mut r.model, 10, "pod a in the model", |m| {
        workload_names(m) == ["a"]
    })
    .await;
    assert_eq!(ips_of(&m, "a"), ["10.0.0.2"]);
    assert!(!captured(&m, "a"));
    assert_eq!(m.workloads[0].service_account, "a");
    assert_eq!(m.trust_domain, "cluster.local");

    // Namespace label added: enrolled.
    r.fake.apply(
        NAMESPACES,
        namespace("shop", json!({"weft.dev/dataplane-mode": "ambient"})),
    );
    wait_for(&mut r.model, 10, "a captured after the label", |m| {
        captured(m, "a")
    })
    .await;

    // Pod added, then the first pod's IP changes, then it is deleted.
    r.fake.apply(
        PODS,
        pod("shop", "b", "n2", "10.0.1.2", json!({"app": "b"})),
    );
    wait_for(&mut r.model, 10, "pod b added", |m| {
        workload_names(m) == ["a", "b"]
    })
    .await;
    r.fake.apply(
        PODS,
        pod("shop", "a", "n1", "10.0.0.3", json!({"app": "a"})),
    );
    wait_for(&mut r.model, 10, "a's new IP", |m| {
        ips_of(m, "a") == ["10.0.0.3"]
    })
    .await;
    r.fake.delete(PODS, "shop", "a");
    let m = wait_for(&mut r.model, 10, "a deleted", |m| {
        workload_names(m) == ["b"]
    })
    .await;
    assert!(captured(&m, "b"));

    // Policy added, then changed; its status follows.
    let policy = |action: &str| {
        json!({
            "apiVersion": "weft.dev/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": "only-web", "namespace": "shop"},
            "spec": {"selector": {"matchLabels": {"app": "b"}}, "action": action,
                     "rules": [{"from": [{"source": {"namespaces": ["web"]}}],
                                "to": [{"operation": {"ports": [8080]}}]}]}
        })
    };
    r.fake.apply(AUTHZ, policy("ALLOW"));
    let m = wait_for(&mut r.model, 10, "policy added", |m| m.policies.len() == 1).await;
    let p = &m.policies[0];
    assert_eq!(p.action, weft_api::model::PolicyAction::Allow);
    assert_eq!(p.rules[0].to[0].ports, [8080]);
    assert_eq!(p.rules[0].from[0].namespaces, ["web"]);
    let st = wait_for(&mut r.status, 10, "policy status", |s| s.len() == 1).await;
    assert!(st[0].accepted);
    assert_eq!(st[0].reason, reasons::ACCEPTED);
    assert_eq!(st[0].observed_generation, Some(1));

    r.fake.apply(AUTHZ, policy("DENY"));
    wait_for(&mut r.model, 10, "policy changed to DENY", |m| {
        m.policies.first().map(|p| p.action) == Some(weft_api::model::PolicyAction::Deny)
    })
    .await;
    wait_for(&mut r.status, 10, "generation 2 in status", |s| {
        s.first().and_then(|s| s.observed_generation) == Some(2)
    })
    .await;

    // Label removed: unenrolled, pod still in the model.
    r.fake.apply(NAMESPACES, namespace("shop", json!({})));
    let m = wait_for(&mut r.model, 10, "b no longer captured", |m| {
        !captured(m, "b")
    })
    .await;
    assert_eq!(workload_names(&m), ["b"]);
    assert!(!r.task.is_finished(), "the source keeps running");
}

#[tokio::test]
async fn kube_source_relists_after_410_gone_and_converges() {
    let fake = FakeApi::start(WATCHED).await;
    fake.apply(
        NAMESPACES,
        namespace("shop", json!({"weft.dev/dataplane-mode": "ambient"})),
    );
    fake.apply(PODS, pod("shop", "a", "n1", "10.0.0.2", json!({})));
    fake.apply(PODS, pod("shop", "b", "n1", "10.0.0.4", json!({})));
    let mut r = start(fake).await;
    wait_for(&mut r.model, 10, "initial pods", |m| {
        workload_names(m) == ["a", "b"]
    })
    .await;
    let lists_before = r.fake.list_count(PODS);
    assert_eq!(lists_before, 1);

    // Compaction: every watch gets ERROR 410 Expired. The changes made
    // meanwhile (a delete among them) reach the controller only through
    // the relist the 410 forces.
    r.fake.expire_watches();
    r.fake.delete(PODS, "shop", "a");
    r.fake
        .apply(PODS, pod("shop", "c", "n2", "10.0.1.7", json!({})));
    r.fake
        .apply(PODS, pod("shop", "b", "n1", "10.0.0.5", json!({})));

    let m = wait_for(&mut r.model, 15, "model converged after relist", |m| {
        workload_names(m) == ["b", "c"] && ips_of(m, "b") == ["10.0.0.5"]
    })
    .await;
    assert!(captured(&m, "c"));
    assert!(
        r.fake.list_count(PODS) >= 2,
        "the 410 forced a relist of pods"
    );
    // Every watched kind relists, not only pods (each on its own backoff).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !WATCHED.iter().all(|c| r.fake.list_count(c) >= 2) {
        assert!(
            std::time::Instant::now() < deadline,
            "every reflector relists after 410 Gone"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // And it keeps following changes after the relist.
    r.fake
        .apply(PODS, pod("shop", "d", "n2", "10.0.1.8", json!({})));
    wait_for(&mut r.model, 10, "watch resumed after relist", |m| {
        workload_names(m) == ["b", "c", "d"]
    })
    .await;
}

#[tokio::test]
async fn kube_source_tolerates_missing_gateway_crd_and_reads_gateways() {
    // Without the Gateway collection the fake answers 404, as an API server
    // without the Gateway API CRD does: the model is still built.
    let fake = FakeApi::start(WATCHED).await;
    fake.apply(NAMESPACES, namespace("shop", json!({})));
    let mut r = start(fake).await;
    wait_for(&mut r.model, 10, "model without gateways", |m| {
        m.namespaces.len() == 1
    })
    .await;
    assert!(r
        .fake
        .requests()
        .iter()
        .any(|q| q.path == format!("/{GATEWAYS}")));

    // With the CRD installed, Gateways are listed and watched.
    let mut colls = WATCHED.to_vec();
    colls.push(GATEWAYS);
    let fake = FakeApi::start(&colls).await;
    fake.apply(NAMESPACES, namespace("shop", json!({})));
    let mut r = start(fake).await;
    wait_for(&mut r.model, 10, "model with gateways watched", |m| {
        m.namespaces.len() == 1
    })
    .await;
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(r
        .fake
        .requests()
        .iter()
        .any(|q| q.path == format!("/{GATEWAYS}") && q.query.contains("watch=true")));
}
