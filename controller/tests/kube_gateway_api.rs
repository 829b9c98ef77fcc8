//! Gateway API and waypoints against a fake Kubernetes API server
//! (`support::FakeApi`; no API server can run on the development and CI
//! machines): waypoint Gateways and HTTPRoutes watched into the mesh model,
//! route status written by the leader through the status subresource, and
//! the waypoint's ServiceAccount/Deployment/Service server-side applied.

mod support;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use support::*;
use tokio::sync::watch;
use weft_api::MeshModel;
use weft_controller::model::GatewayApiOutput;
use weft_controller::reasons::CONTROLLER_NAME;
use weft_controller::waypoint_deploy::{self, DeployConfig};
use weft_controller::{gateway_status, kube_source};

struct Running {
    fake: FakeApi,
    model: watch::Receiver<Arc<MeshModel>>,
    gateway_api: watch::Receiver<Arc<GatewayApiOutput>>,
    tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// A cluster with namespace `shop` using waypoint `wp`, Services `web` and
/// `web-v2`, and the Gateway API CRDs installed.
async fn start() -> Running {
    let mut colls = WATCHED.to_vec();
    colls.extend(GATEWAY_API);
    colls.extend([
        EVENTS,
        DEPLOYMENTS,
        "apis/policy/v1/poddisruptionbudgets",
        "api/v1/configmaps",
    ]);
    let fake = FakeApi::start(&colls).await;
    fake.apply(
        NAMESPACES,
        namespace(
            "shop",
            json!({"weft.dev/dataplane-mode": "ambient", "weft.dev/use-waypoint": "wp"}),
        ),
    );
    fake.apply(SERVICES, service("shop", "web", "10.96.0.10", json!({})));
    fake.apply(SERVICES, service("shop", "web-v2", "10.96.0.11", json!({})));
    fake.apply(GATEWAYS, waypoint_gateway("shop", "wp"));
    let (out, model) = watch::channel(Arc::new(MeshModel::default()));
    let (st, _status) = watch::channel(Arc::new(Vec::new()));
    let (gw, gateway_api) = watch::channel(Arc::new(GatewayApiOutput::default()));
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
        gateway_api,
        tasks: vec![task],
    }
}

async fn eventually(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn kube_waypoint_gateway_and_labelled_namespace_reach_the_model() {
    let mut r = start().await;
    let m = wait_for(&mut r.model, 10, "waypoint in the model", |m| {
        !m.waypoints.is_empty()
    })
    .await;
    assert_eq!(m.waypoints[0].name, "wp");
    assert_eq!(m.waypoints[0].service_account(), "wp");
    assert!(m
        .services
        .iter()
        .all(|s| s.waypoint.as_deref() == Some("wp")));

    // The Service opts out.
    r.fake.apply(
        SERVICES,
        service(
            "shop",
            "web",
            "10.96.0.10",
            json!({"weft.dev/use-waypoint": "none"}),
        ),
    );
    wait_for(&mut r.model, 10, "web opted out", |m| {
        m.services
            .iter()
            .any(|s| s.name == "web" && s.waypoint.is_none())
    })
    .await;
}

#[tokio::test]
async fn kube_http_route_added_and_changed_updates_the_model() {
    let mut r = start().await;
    r.fake
        .apply(HTTP_ROUTES, http_route("shop", "split", "web", "web-v2"));
    let m = wait_for(&mut r.model, 10, "route in the model", |m| {
        !m.http_routes.is_empty()
    })
    .await;
    assert_eq!(m.http_routes[0].rules[0].backends[0].backend.name, "web-v2");

    let mut changed = http_route("shop", "split", "web", "web");
    changed["spec"]["rules"][0]["timeouts"] = json!({"request": "2s"});
    r.fake.apply(HTTP_ROUTES, changed);
    let m = wait_for(&mut r.model, 10, "route changed", |m| {
        m.http_routes[0].rules[0].backends[0].backend.name == "web"
    })
    .await;
    assert_eq!(
        m.http_routes[0].rules[0]
            .timeouts
            .as_ref()
            .and_then(|t| t.request_ms),
        Some(2000)
    );

    r.fake.delete(HTTP_ROUTES, "shop", "split");
    wait_for(&mut r.model, 10, "route deleted", |m| {
        m.http_routes.is_empty()
    })
    .await;
}

fn parent_conditions(route: &Value) -> Vec<(String, String, String)> {
    route["status"]["parents"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["controllerName"] == CONTROLLER_NAME)
        .flat_map(|p| p["conditions"].as_array().cloned().unwrap_or_default())
        .map(|c| {
            (
                c["type"].as_str().unwrap_or("").to_owned(),
                c["status"].as_str().unwrap_or("").to_owned(),
                c["reason"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect()
}

fn strs(v: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    v.iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect()
}

#[tokio::test]
async fn kube_route_status_written_with_accepted_resolved_refs_and_backend_not_found() {
    let mut r = start().await;
    // Another controller's entry must survive our writes.
    let mut good = http_route("shop", "good", "web", "web-v2");
    good["status"] = json!({"parents": [{"parentRef": {"name": "edge"}, "controllerName": "example.com/gw",
        "conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": ""}]}]});
    r.fake.apply(HTTP_ROUTES, good);
    r.fake
        .apply(HTTP_ROUTES, http_route("shop", "broken", "web", "missing"));
    let (lead_tx, lead_rx) = watch::channel(true);
    r.tasks.push(tokio::spawn(gateway_status::run(
        r.fake.client(),
        r.gateway_api.clone(),
        lead_rx,
        "replica-0".into(),
    )));
    let fake = r.fake.clone();
    eventually("both routes have our status", || {
        ["good", "broken"].iter().all(|n| {
            fake.get(HTTP_ROUTES, "shop", n)
                .is_some_and(|o| !parent_conditions(&o).is_empty())
        })
    })
    .await;
    let good = fake.get(HTTP_ROUTES, "shop", "good").unwrap();
    assert_eq!(
        parent_conditions(&good),
        strs(&[
            ("Accepted", "True", "Accepted"),
            ("ResolvedRefs", "True", "ResolvedRefs")
        ])
    );
    assert_eq!(good["status"]["parents"].as_array().unwrap().len(), 2);
    assert_eq!(good["status"]["parents"][1]["parentRef"]["kind"], "Service");
    let broken = fake.get(HTTP_ROUTES, "shop", "broken").unwrap();
    assert_eq!(
        parent_conditions(&broken),
        strs(&[
            ("Accepted", "True", "Accepted"),
            ("ResolvedRefs", "False", "BackendNotFound")
        ])
    );
    let cond = &broken["status"]["parents"][0]["conditions"][1];
    assert!(cond["message"].as_str().unwrap().contains("shop/missing"));
    assert!(cond["lastTransitionTime"].is_string());
    // A Warning Event tells the user.
    eventually("BackendNotFound event", || {
        fake.list(EVENTS)
            .iter()
            .any(|e| e["reason"] == "BackendNotFound" && e["type"] == "Warning")
    })
    .await;

    // The backend appears: ResolvedRefs flips, nothing else is rewritten.
    let writes_before = fake
        .requests()
        .iter()
        .filter(|q| q.method == "PATCH" && q.path.ends_with("/httproutes/good/status"))
        .count();
    fake.apply(
        SERVICES,
        service("shop", "missing", "10.96.0.12", json!({})),
    );
    eventually("ResolvedRefs True", || {
        fake.get(HTTP_ROUTES, "shop", "broken")
            .is_some_and(|o| parent_conditions(&o)[1].1 == "True")
    })
    .await;
    wait_for(&mut r.gateway_api, 5, "settled", |_| true).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let writes_after = fake
        .requests()
        .iter()
        .filter(|q| q.method == "PATCH" && q.path.ends_with("/httproutes/good/status"))
        .count();
    assert_eq!(
        writes_before, writes_after,
        "unchanged status is not rewritten"
    );

    // The Gateway got Accepted, and Programmed=False until a pod is ready.
    let gw = fake.get(GATEWAYS, "shop", "wp").unwrap();
    let conds = gw["status"]["conditions"].as_array().unwrap();
    assert_eq!(conds[0]["type"], "Accepted");
    assert_eq!(conds[1]["reason"], "NoResources");
    assert_eq!(conds[1]["observedGeneration"], 1);
    drop(lead_tx);
}

#[tokio::test]
async fn kube_waypoint_deployment_is_server_side_applied() {
    let mut r = start().await;
    let mut gw = waypoint_gateway("shop", "wp");
    gw["metadata"]["annotations"] = json!({"weft.dev/waypoint-replicas": "2"});
    r.fake.apply(GATEWAYS, gw);
    let uid = r.fake.get(GATEWAYS, "shop", "wp").unwrap()["metadata"]["uid"].clone();
    let root = weft_pki::LocalCa::generate("cluster.local").unwrap();
    let (_trust_tx, trust_rx) = watch::channel(root.trust_bundle());
    let cfg = DeployConfig {
        image: "example.com/weft:test".into(),
        image_pull_policy: "IfNotPresent".into(),
        controller_url: "https://weft-controller.weft-system.svc:15010".into(),
        trust_domain: "cluster.local".into(),
        trust: trust_rx,
    };
    let (_lead_tx, lead_rx) = watch::channel(true);
    r.tasks.push(tokio::spawn(waypoint_deploy::run(
        r.fake.client(),
        cfg,
        r.gateway_api.clone(),
        lead_rx,
    )));
    let fake = r.fake.clone();
    eventually("deployment applied", || {
        fake.get(DEPLOYMENTS, "shop", "wp").is_some()
            && fake
                .get("api/v1/configmaps", "shop", "weft-ca-root-cert")
                .is_some()
    })
    .await;
    let applies: Vec<Recorded> = fake
        .requests()
        .into_iter()
        .filter(|q| q.method == "PATCH" && q.content_type == "application/apply-patch+yaml")
        .collect();
    let paths: Vec<&str> = applies.iter().map(|q| q.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "/api/v1/namespaces/shop/configmaps/weft-ca-root-cert",
            "/api/v1/namespaces/shop/serviceaccounts/wp",
            "/apis/apps/v1/namespaces/shop/deployments/wp",
            "/apis/policy/v1/namespaces/shop/poddisruptionbudgets/wp",
            "/api/v1/namespaces/shop/services/wp",
        ]
    );
    let root = applies[0].body.as_ref().unwrap();
    assert!(
        root["data"]["root-cert.pem"]
            .as_str()
            .unwrap()
            .contains("BEGIN CERTIFICATE"),
        "{root}"
    );
    let applies = &applies[1..];
    for q in applies {
        assert!(
            q.query.contains("fieldManager=weft-controller"),
            "{}",
            q.query
        );
        assert!(q.query.contains("force=true"), "{}", q.query);
        let owner = &q.body.as_ref().unwrap()["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "Gateway");
        assert_eq!(owner["uid"], uid);
        assert_eq!(owner["controller"], true);
    }
    let d = applies[1].body.as_ref().unwrap();
    assert_eq!(d["spec"]["replicas"], 2);
    let pod = &d["spec"]["template"];
    assert_eq!(
        pod["metadata"]["labels"]["gateway.networking.k8s.io/gateway-name"],
        "wp"
    );
    assert_eq!(pod["spec"]["serviceAccountName"], "wp");
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["image"], "example.com/weft:test");
    assert!(c["env"]
        .as_array()
        .unwrap()
        .contains(&json!({"name": "WEFT_CONTROLLER", "value": "https://weft-controller.weft-system.svc:15010"})));
    let ports: Vec<i64> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_i64().unwrap())
        .collect();
    assert_eq!(ports, [15008, 15020, 15021]);
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 15021);
    assert_eq!(
        d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0,
        "rollouts surge"
    );
    let pdb = applies[2].body.as_ref().unwrap();
    assert_eq!(pdb["kind"], "PodDisruptionBudget");
    assert_eq!(pdb["spec"]["maxUnavailable"], 1);
    let s = applies[3].body.as_ref().unwrap();
    assert_eq!(s["spec"]["type"], "ClusterIP");
    assert_eq!(s["spec"]["ports"][0]["port"], 15008);

    // The waypoint's Service shows up as the Gateway's address, and is not
    // itself sent through the waypoint.
    let out = wait_for(&mut r.gateway_api, 10, "address", |o| {
        o.gateways.first().is_some_and(|g| !g.addresses.is_empty())
    })
    .await;
    assert_eq!(out.gateways[0].name, "wp");
    let m = r.model.borrow().clone();
    assert!(m
        .services
        .iter()
        .any(|s| s.name == "wp" && s.waypoint.is_none()));

    // Scaling goes through the annotation.
    let mut gw = waypoint_gateway("shop", "wp");
    gw["metadata"]["annotations"] = json!({"weft.dev/waypoint-replicas": "4"});
    fake.apply(GATEWAYS, gw);
    eventually("scaled", || {
        fake.get(DEPLOYMENTS, "shop", "wp")
            .is_some_and(|d| d["spec"]["replicas"] == 4)
    })
    .await;
}
