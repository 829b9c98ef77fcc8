//! Ways a mesh lets someone in or falls over, end to end on the simulated
//! cluster with real processes (controller in embedded mode: a folder of
//! manifests stands in for the API server). Needs root; fails loudly
//! without it.

use std::time::Duration;

use weft_api::model::{AuthorizationPolicy, ParentKind, PolicyAction, PolicyTarget, Rule, Source};
use weft_e2e::cluster::Pod;
use weft_e2e::mesh::{bin_path, metric_sum, wait_until, Mesh};

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// An HBONE tunnel straight from `from` to `to:15008` (its own certificate,
/// signed by the mesh CA, for `legacy/default`), CONNECT `target`, with an
/// optional claimed client address; the server must prove `expect`.
fn probe(
    mesh: &Mesh,
    from: &Pod,
    to: &str,
    target: &str,
    expect: &str,
    forwarded: Option<&str>,
) -> serde_json::Value {
    let root = mesh.controller_root().expect("controller mode");
    let mut cmd = from.command_os(bin_path("weft-hbone-probe"));
    cmd.args([
        "connect",
        "--to",
        &format!("{to}:15008"),
        "--target",
        target,
    ])
    .args([
        "--identity",
        &spiffe("legacy", "default"),
        "--expect",
        expect,
    ])
    .arg("--ca-dir")
    .arg(root.parent().expect("CA directory"));
    if let Some(ip) = forwarded {
        cmd.args(["--forwarded", ip]);
    }
    let out = cmd.output().expect("run weft-hbone-probe");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("probe said: {}", String::from_utf8_lossy(&out.stderr)))
}

/// A workload with a valid certificate of its own opens HBONE straight to a
/// waypoint and claims, in `forwarded`, the address of a pod that an
/// ipBlock ALLOW admits: refused, counted and logged. The admitted pod
/// itself gets through; so does nobody else.
#[test]
fn e2e_hardening_a_forged_forwarded_address_is_refused_by_the_waypoint() {
    let mut mesh = Mesh::with_controller(2, &["shop"]).expect("mesh with controller");
    let admitted = mesh.add_pod(0, "shop", "admitted", "admitted").unwrap();
    let outsider = mesh.add_pod(0, "legacy", "outsider", "default").unwrap();
    let server = mesh.add_pod(1, "shop", "server", "server").unwrap();
    mesh.wait_enrolled(0, &admitted, true).unwrap();
    mesh.wait_enrolled(1, &server, true).unwrap();
    mesh.serve_testapp(&server, 7000).unwrap();
    let vip = mesh
        .add_service_selecting("shop", "server", &[("app", "server")], &[(80, 7000)])
        .unwrap();
    let waypoint = mesh.add_waypoint(1, "shop", "wp").unwrap();
    mesh.use_waypoint("shop", "server", Some("wp")).unwrap();
    mesh.model.policies.push(AuthorizationPolicy {
        name: "only-admitted".into(),
        namespace: "shop".into(),
        selector: None,
        action: PolicyAction::Allow,
        rules: vec![Rule {
            from: vec![Source {
                ip_blocks: vec![format!("{}/32", admitted.ip)],
                ..Default::default()
            }],
            to: vec![],
        }],
        targets: vec![PolicyTarget {
            kind: ParentKind::Service,
            name: "server".into(),
        }],
    });
    mesh.write_model().unwrap();
    let target = format!("{vip}:80");

    let v = wait_until(Duration::from_secs(10), || {
        let v = mesh.connect(&admitted, &target);
        (v["ok"] == true).then_some(v)
    })
    .expect("the admitted pod gets through its ztunnel and the waypoint");
    assert_eq!(v["ok"], true, "{v}");

    let wp_ip = waypoint.ip.to_string();
    let wp_id = spiffe("shop", "wp");
    let v = probe(&mesh, &outsider, &wp_ip, &target, &wp_id, None);
    assert_eq!(
        v["ok"], false,
        "the ipBlock ALLOW refuses the outsider's own address: {v}"
    );
    let before = metric_sum(
        &mesh.waypoint_metrics("wp").unwrap(),
        "weft_authorization_denials_total",
        &[("policy", "forged-source-address")],
    );
    let admitted_ip = admitted.ip.to_string();
    let v = probe(
        &mesh,
        &outsider,
        &wp_ip,
        &target,
        &wp_id,
        Some(&admitted_ip),
    );
    assert_eq!(v["ok"], false, "a forged `forwarded` gets nothing: {v}");
    assert!(
        v["error"].as_str().unwrap_or_default().contains("401"),
        "refused at the tunnel: {v}"
    );
    let m = mesh.waypoint_metrics("wp").unwrap();
    assert_eq!(
        metric_sum(
            &m,
            "weft_authorization_denials_total",
            &[("policy", "forged-source-address")]
        ),
        before + 1.0,
        "{m}"
    );
    assert!(
        !m.lines().any(|l| l.starts_with("weft_requests_total")
            && l.contains("source_workload=\"admitted\"")
            && l.contains("source_principal=\"spiffe://cluster.local/ns/legacy")),
        "no request is credited to the forged workload: {m}"
    );
    let log = mesh.waypoint_log("wp");
    assert!(
        log.contains("claims a source address its identity does not hold")
            && log.contains(&format!("claimed={admitted_ip}")),
        "{log}"
    );
}
