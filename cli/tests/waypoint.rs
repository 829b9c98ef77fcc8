//! `weftctl waypoint apply|list|status|delete` against the fake Kubernetes
//! API server of `testsupport/` (a real kube::Client in the weftctl
//! process; no API server can run here).

use serde_json::json;
use weft_testsupport::fake_api::{self as fake, FakeApi};

struct Ctl {
    kubeconfig: tempfile::NamedTempFile,
}

impl Ctl {
    async fn run(&self, args: &[&str]) -> (bool, String, String) {
        let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_weftctl"))
            .args(args)
            .arg("--kubeconfig")
            .arg(self.kubeconfig.path())
            .output()
            .await
            .expect("run weftctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn waypoint_apply_list_status_delete() {
    let api = FakeApi::start(&[fake::NAMESPACES, fake::SERVICES, fake::GATEWAYS]).await;
    api.apply(fake::NAMESPACES, fake::namespace("shop", json!({})));
    api.apply(
        fake::SERVICES,
        fake::service("shop", "reviews", "10.96.0.9", json!({})),
    );
    let kubeconfig = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(kubeconfig.path(), api.kubeconfig()).unwrap();
    let ctl = Ctl { kubeconfig };

    // The Gateway a user would write, without touching the cluster.
    let (ok, yaml, err) = ctl
        .run(&["waypoint", "apply", "wp", "-n", "shop", "--dry-run"])
        .await;
    assert!(ok, "{err}");
    assert!(
        yaml.contains("gatewayClassName: weft-waypoint")
            && yaml.contains("protocol: HBONE")
            && yaml.contains("port: 15008"),
        "{yaml}"
    );
    assert!(api.list(fake::GATEWAYS).is_empty());

    let (ok, out, err) = ctl
        .run(&[
            "waypoint",
            "apply",
            "wp",
            "-n",
            "shop",
            "--replicas",
            "2",
            "--for-service",
            "reviews",
        ])
        .await;
    assert!(ok, "{out}{err}");
    let gw = api
        .get(fake::GATEWAYS, "shop", "wp")
        .expect("Gateway created");
    assert_eq!(gw["spec"]["gatewayClassName"], "weft-waypoint");
    assert_eq!(gw["spec"]["listeners"][0]["port"], 15008);
    assert_eq!(
        gw["metadata"]["annotations"]["weft.dev/waypoint-replicas"],
        "2"
    );
    let svc = api.get(fake::SERVICES, "shop", "reviews").unwrap();
    assert_eq!(svc["metadata"]["labels"]["weft.dev/use-waypoint"], "wp");
    assert!(api.requests().iter().any(|r| r.method == "PATCH"
        && r.content_type == "application/apply-patch+yaml"
        && r.query.contains("fieldManager=weftctl")));

    let (ok, out, _) = ctl
        .run(&[
            "waypoint",
            "apply",
            "wp",
            "-n",
            "shop",
            "--enroll-namespace",
        ])
        .await;
    assert!(ok);
    assert_eq!(
        api.get(fake::NAMESPACES, "", "shop").unwrap()["metadata"]["labels"]
            ["weft.dev/use-waypoint"],
        "wp",
        "{out}"
    );

    let (ok, table, _) = ctl.run(&["waypoint", "list", "-n", "shop"]).await;
    assert!(ok);
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("shop") && l.contains("wp") && l.contains("Unknown")),
        "{table}"
    );

    // The controller programs it.
    let mut gw = api.get(fake::GATEWAYS, "shop", "wp").unwrap();
    gw["status"] = json!({"conditions": [{"type": "Programmed", "status": "True", "reason": "Programmed", "message": "waypoint deployed"}]});
    api.apply(fake::GATEWAYS, gw);
    let (ok, out, _) = ctl
        .run(&["waypoint", "status", "wp", "-n", "shop", "-o", "json"])
        .await;
    assert!(ok);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["programmed"], "True");
    assert_eq!(
        v["used_by"],
        json!(["namespace shop", "service shop/reviews"])
    );
    let (_, table, _) = ctl.run(&["waypoint", "list", "-A"]).await;
    assert!(table.contains("True"), "{table}");

    let (ok, _, warn) = ctl.run(&["waypoint", "delete", "wp", "-n", "shop"]).await;
    assert!(ok);
    assert!(warn.contains("still labelled to use it"), "{warn}");
    assert!(api.get(fake::GATEWAYS, "shop", "wp").is_none());
    let (ok, _, err) = ctl.run(&["waypoint", "status", "wp", "-n", "shop"]).await;
    assert!(!ok && err.contains("no waypoint shop/wp"), "{err}");
}
