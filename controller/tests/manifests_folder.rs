//! The embedded mode: a folder of Kubernetes manifests in, the mesh model
//! out, through the same builder as the API-server source.

mod support;

use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;
use weft_api::model::{MtlsMode, PolicyAction, ServicePort};
use weft_api::MeshModel;
use weft_controller::manifests;
use weft_controller::reasons;

const CLUSTER: &str = r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  labels: { weft.dev/dataplane-mode: ambient }
---
apiVersion: v1
kind: Namespace
metadata: { name: legacy }
---
# a comment-only document is skipped
---
apiVersion: apps/v1
kind: Deployment
metadata: { name: ignored, namespace: shop }
spec: {}
"#;

const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: { name: web-1, namespace: shop, uid: u-web-1, labels: { app: web } }
spec:
  nodeName: node-1
  serviceAccountName: web
  containers: [{ name: web, image: web, ports: [{ name: http, containerPort: 8080 }] }]
status: { phase: Running, podIP: 10.0.0.2, podIPs: [{ ip: 10.0.0.2 }] }
---
apiVersion: v1
kind: Pod
metadata: { name: db-1, namespace: shop, labels: { app: db } }
spec: { nodeName: node-2, containers: [{ name: db, image: db }] }
status: { phase: Running, podIPs: [{ ip: 10.0.1.2 }] }
---
apiVersion: v1
kind: Pod
metadata: { name: old-1, namespace: legacy }
spec: { nodeName: node-2, containers: [{ name: old, image: old }] }
status: { phase: Running, podIPs: [{ ip: 10.0.1.3 }] }
---
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec:
  clusterIP: 10.96.0.10
  selector: { app: web }
  ports: [{ name: http, port: 80, targetPort: http }]
"#;

const POLICIES: &str = r#"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: db-from-web, namespace: shop }
spec:
  selector: { matchLabels: { app: db } }
  action: ALLOW
  rules:
    - from: [{ source: { principals: ["spiffe://cluster.local/ns/shop/sa/web"] } }]
      to: [{ operation: { ports: [5432] } }]
---
apiVersion: weft.dev/v1alpha1
kind: PeerAuthentication
metadata: { name: strict, namespace: shop }
spec: { mtls: { mode: STRICT } }
"#;

fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).unwrap();
}

fn folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "00-cluster.yaml", CLUSTER);
    write(dir.path(), "10-pods.yml", PODS);
    write(dir.path(), "20-policies.yaml", POLICIES);
    write(dir.path(), "README.md", "not a manifest");
    dir
}

#[test]
fn manifests_folder_builds_the_expected_model() {
    let dir = folder();
    let out = manifests::load(dir.path(), "cluster.local");
    assert!(out.problems.is_empty(), "{:?}", out.problems);
    let m = &out.model;
    m.validate().unwrap();
    let ns: Vec<&str> = m.namespaces.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(ns, ["legacy", "shop"]);
    let w: Vec<(&str, &str, bool)> = m
        .workloads
        .iter()
        .map(|w| (w.name.as_str(), w.node.as_str(), m.is_captured(w)))
        .collect();
    assert_eq!(
        w,
        [
            ("old-1", "node-2", false),
            ("db-1", "node-2", true),
            ("web-1", "node-1", true)
        ]
    );
    let web = &m.workloads[2];
    assert_eq!(web.uid, "u-web-1");
    assert_eq!(
        m.identity_of(web).to_string(),
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    assert_eq!(m.workloads[1].service_account, "default");
    assert_eq!(m.services.len(), 1);
    assert_eq!(
        m.services[0].ports,
        [ServicePort {
            port: 80,
            target_port: Some(8080)
        }]
    );
    assert!(m.services[0].selects(web));
    assert_eq!(m.policies.len(), 1);
    assert_eq!(m.policies[0].action, PolicyAction::Allow);
    assert_eq!(m.peer_authentications[0].mode, MtlsMode::Strict);
    assert!(out.policy_status.iter().all(|s| s.accepted));
    // Same folder, same model.
    assert_eq!(manifests::load(dir.path(), "cluster.local"), out);
}

#[test]
fn manifests_bad_document_and_unknown_namespace_are_reported_and_isolated() {
    let dir = folder();
    write(
        dir.path(),
        "30-broken.yaml",
        r#"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: typo, namespace: shop }
spec: { action: PERMIT }
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: ghost, namespace: nowhere }
spec: { action: DENY }
---
apiVersion: v1
kind: Pod
metadata: { name: [oops
---
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: deny-legacy, namespace: shop }
spec: { action: DENY, rules: [{ from: [{ source: { namespaces: [legacy] } }] }] }
"#,
    );
    let out = manifests::load(dir.path(), "cluster.local");
    // The schema mismatch: file, document index and serde's reason.
    assert!(
        out.problems
            .iter()
            .any(|p| p.starts_with("30-broken.yaml: document 0")
                && p.contains("typo")
                && p.contains("PERMIT")),
        "{:?}",
        out.problems
    );
    // The YAML syntax error, in its own document.
    assert!(
        out.problems
            .iter()
            .any(|p| p.starts_with("30-broken.yaml: document 2") && p.contains("not valid YAML")),
        "{:?}",
        out.problems
    );
    assert_eq!(out.problems.len(), 2, "{:?}", out.problems);
    // The unknown namespace: a status, not in the model.
    let ghost = out
        .policy_status
        .iter()
        .find(|s| s.name == "ghost")
        .unwrap();
    assert!(!ghost.accepted);
    assert_eq!(ghost.reason, reasons::UNKNOWN_NAMESPACE);
    assert!(ghost.message.contains("nowhere"), "{}", ghost.message);
    // Everything else still applies, including the document after the bad ones.
    let names: Vec<&str> = out.model.policies.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["db-from-web", "deny-legacy"]);
    assert_eq!(out.model.workloads.len(), 3);
    let json = weft_controller::status::status_json(&out.policy_status);
    assert_eq!(
        json["shop"]["AuthorizationPolicy"]["deny-legacy"]["conditions"][0]["status"],
        "True"
    );
    assert_eq!(
        json["nowhere"]["AuthorizationPolicy"]["ghost"]["conditions"][0]["reason"],
        "UnknownNamespace"
    );
}

#[tokio::test]
async fn manifests_edit_updates_the_published_model() {
    let dir = folder();
    let (out, mut model) = watch::channel(Arc::new(MeshModel::default()));
    let (st, mut status) = watch::channel(Arc::new(Vec::new()));
    let (gw, _gateway_api) = watch::channel(Arc::default());
    let task = tokio::spawn(manifests::run(
        dir.path().to_owned(),
        "cluster.local".to_owned(),
        out,
        st,
        gw,
    ));
    support::wait_for(&mut model, 10, "initial model", |m| m.workloads.len() == 3).await;

    // The namespace loses its label: its pods are unenrolled.
    write(
        dir.path(),
        "00-cluster.yaml",
        &CLUSTER.replace("  labels: { weft.dev/dataplane-mode: ambient }\n", ""),
    );
    support::wait_for(&mut model, 10, "unenrolled after edit", |m| {
        m.workloads.iter().all(|w| !m.is_captured(w))
    })
    .await;

    // A new file with a policy naming an unknown namespace: status only.
    write(
        dir.path(),
        "40-new.yaml",
        "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: ghost, namespace: nowhere}\nspec: {action: DENY}\n",
    );
    let s = support::wait_for(&mut status, 10, "status of the new policy", |s| {
        s.iter().any(|s| s.name == "ghost")
    })
    .await;
    assert!(s.iter().any(|s| s.name == "ghost" && !s.accepted));
    assert_eq!(model.borrow().policies.len(), 1);

    // A pod IP changes in place.
    write(
        dir.path(),
        "10-pods.yml",
        &PODS.replace("10.0.0.2", "10.0.0.9"),
    );
    support::wait_for(&mut model, 10, "web-1's new IP", |m| {
        m.workloads.iter().any(|w| {
            w.name == "web-1" && w.ips == ["10.0.0.9".parse::<std::net::IpAddr>().unwrap()]
        })
    })
    .await;
    task.abort();
}

const L7: &str = r#"
apiVersion: v1
kind: Namespace
metadata: { name: shop, labels: { weft.dev/dataplane-mode: ambient, weft.dev/use-waypoint: wp } }
---
apiVersion: v1
kind: Service
metadata: { name: web, namespace: shop }
spec: { clusterIP: 10.96.0.10, selector: { app: web }, ports: [{ port: 80, targetPort: 8080 }] }
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: { name: wp, namespace: shop }
spec: { gatewayClassName: weft-waypoint, listeners: [{ name: mesh, port: 15008, protocol: HBONE }] }
---
apiVersion: v1
kind: Pod
metadata: { name: wp-1, namespace: shop, labels: { gateway.networking.k8s.io/gateway-name: wp } }
spec: { nodeName: node-1, serviceAccountName: wp, containers: [{ name: waypoint, image: w }] }
status: { phase: Running, podIPs: [{ ip: 10.0.0.50 }] }
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: web, namespace: shop }
spec:
  parentRefs: [{ group: "", kind: Service, name: web, port: 80 }]
  rules: [{ backendRefs: [{ name: web, port: 80 }], timeouts: { request: 3s } }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: { name: grpc, namespace: shop }
spec:
  parentRefs: [{ group: "", kind: Service, name: web }]
  rules: [{ matches: [{ method: { service: shop.Cart } }], backendRefs: [{ name: web, port: 80 }] }]
---
apiVersion: weft.dev/v1alpha1
kind: TrafficPolicy
metadata: { name: web, namespace: shop }
spec: { targetRef: { kind: Service, name: web }, outlierDetection: { baseEjectionTime: 5s } }
"#;

#[test]
fn manifests_folder_reads_gateway_api_and_traffic_policies() {
    let dir = folder_with(&[("l7.yaml", L7)]);
    let out = manifests::load(dir.path(), "cluster.local");
    assert!(out.problems.is_empty(), "{:?}", out.problems);
    let m = &out.model;
    assert_eq!(m.waypoints[0].name, "wp");
    assert_eq!(m.services[0].waypoint.as_deref(), Some("wp"));
    assert_eq!(
        m.http_routes[0].rules[0]
            .timeouts
            .as_ref()
            .unwrap()
            .request_ms,
        Some(3000)
    );
    assert_eq!(m.grpc_routes[0].name, "grpc");
    assert_eq!(
        m.traffic_policies[0]
            .outlier_detection
            .as_ref()
            .unwrap()
            .base_ejection_ms,
        5000
    );
    // The harness writes the waypoint's Pod: the Gateway is Programmed.
    let gw = &out.gateway_api.gateways[0];
    assert!(gw.conditions.iter().all(|c| c.status), "{gw:?}");
    let json = weft_controller::gateway_status::status_json(&out.gateway_api);
    assert_eq!(
        json["shop"]["HTTPRoute"]["web"]["parents"][0]["conditions"][0]["reason"],
        "Accepted"
    );
    assert_eq!(
        json["shop"]["HTTPRoute"]["web"]["parents"][0]["controllerName"],
        "weft.dev/waypoint-controller"
    );
    assert_eq!(
        json["shop"]["Gateway"]["wp"]["conditions"][1]["reason"],
        "Programmed"
    );
}

#[test]
fn manifests_malformed_route_names_its_file() {
    let bad = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: { name: broken, namespace: shop }\nspec: { rules: [{ backendRefs: [{ port: 80 }] }] }\n---\napiVersion: weft.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: { name: tp, namespace: shop }\nspec: { outlierDetection: {} }\n---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: HTTPRoute\nmetadata: { name: old, namespace: shop }\nspec: {}\n";
    let dir = folder_with(&[("l7.yaml", L7), ("routes/bad.yaml", bad)]);
    let out = manifests::load(dir.path(), "cluster.local");
    let mine: Vec<&String> = out
        .problems
        .iter()
        .filter(|p| p.starts_with("routes/bad.yaml"))
        .collect();
    assert_eq!(mine.len(), 3, "{:?}", out.problems);
    assert!(
        mine[0].contains("document 0 (HTTPRoute \"broken\")")
            && mine[0].contains("HTTPRoute schema"),
        "{}",
        mine[0]
    );
    assert!(
        mine[1].contains("TrafficPolicy") && mine[1].contains("targetRef"),
        "{}",
        mine[1]
    );
    assert!(
        mine[2].contains("use gateway.networking.k8s.io/v1"),
        "{}",
        mine[2]
    );
    // The good file still applies.
    assert_eq!(out.model.http_routes.len(), 1);
}

fn folder_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (name, text) in files {
        let path = dir.path().join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}
