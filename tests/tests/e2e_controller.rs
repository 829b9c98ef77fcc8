//! End-to-end with the controller in embedded mode: the mesh is described
//! as Kubernetes manifests in a folder the controller watches; ztunnels get
//! config over the gRPC stream and certificates from the controller's CA.
//! (No API server can run here: the manifest folder stands in for it,
//! through the same reconcile code.) Needs root; fails loudly without it.

use std::time::{Duration, Instant};

use weft_e2e::mesh::{bin_path, deny_from, metric_sum, wait_until, Mesh, CONTROLLER_GRPC_PORT};

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// Label a namespace in the manifests: its pods become enrolled and reach
/// each other over mTLS with certificates from the controller's CA. A DENY
/// policy closes an open connection and refuses new ones; removing it lets
/// traffic flow again.
#[test]
fn e2e_controller_label_enrolls_and_policy_applies_live() {
    let mut mesh = Mesh::with_controller(2, &[]).expect("mesh with controller");
    let client = mesh.add_pod(0, "shop", "client", "client").unwrap();
    let server = mesh.add_pod(1, "shop", "server", "server").unwrap();
    mesh.wait_enrolled(0, &client, false).unwrap();
    mesh.serve_testapp(&server, 7000).unwrap();
    let target = format!("{}:7000", server.ip);

    mesh.set_ambient("shop", true);
    mesh.write_model().unwrap();
    mesh.wait_enrolled(0, &client, true).unwrap();
    mesh.wait_enrolled(1, &server, true).unwrap();
    let v = mesh.connect(&client, &target);
    assert_eq!(v["ok"], true, "{v}");
    let m = mesh.metrics(0).unwrap();
    assert!(
        metric_sum(
            &m,
            "weft_tcp_connections_opened_total",
            &[
                ("reporter", "source"),
                ("connection_security_policy", "mutual_tls"),
                ("destination_principal", &spiffe("shop", "server"))
            ]
        ) >= 1.0,
        "{m}"
    );
    let dump = mesh.config_dump(0).unwrap();
    assert!(
        dump["certificates"]
            .to_string()
            .contains(&spiffe("shop", "client")),
        "{dump}"
    );

    mesh.spawn_holder("holder", &client, &target, 1, 300)
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        mesh.cluster.exit_status("holder").is_none(),
        "{}",
        mesh.cluster.log("holder")
    );

    // The DENY is written while the connection runs: within a second of
    // the write (the controller's folder poll, the model build, the push,
    // the ztunnel's apply) the open connection is closed and new ones are
    // refused. The README promises "within a second".
    mesh.model
        .policies
        .push(deny_from("shop", "deny-client", &spiffe("shop", "client")));
    mesh.write_model_files().unwrap();
    let written = Instant::now();
    let status = wait_until(Duration::from_secs(5), || {
        mesh.cluster.exit_status("holder")
    })
    .expect("the open connection is closed after the DENY arrives");
    let closed_after = written.elapsed();
    assert!(!status.success(), "{}", mesh.cluster.log("holder"));
    let refused_after = wait_until(Duration::from_secs(5), || {
        (mesh.connect(&client, &target)["ok"] == false).then(|| written.elapsed())
    })
    .expect("new connections are refused once the DENY arrives");
    eprintln!(
        "DENY written: open connection closed after {} ms, new connections refused after {} ms",
        closed_after.as_millis(),
        refused_after.as_millis()
    );
    assert!(
        closed_after <= Duration::from_secs(1) && refused_after <= Duration::from_secs(1),
        "the DENY took effect after {closed_after:?} (open connection) and {refused_after:?} (new ones): more than a second"
    );
    let v = mesh.connect(&client, &target);
    assert_eq!(v["ok"], false, "refused while denied: {v}");

    mesh.model.policies.clear();
    mesh.write_model().unwrap();
    let v = mesh.connect(&client, &target);
    assert_eq!(v["ok"], true, "flows again: {v}");
}

/// A ztunnel may only obtain identities of pods on its own node.
#[test]
fn e2e_controller_refuses_identity_of_pod_on_another_node() {
    let mut mesh = Mesh::with_controller(2, &["shop"]).expect("mesh with controller");
    let _a = mesh.add_pod(0, "shop", "a", "a-sa").unwrap();
    let _b = mesh.add_pod(1, "shop", "b", "b-sa").unwrap();
    let controller = format!("https://{}:{CONTROLLER_GRPC_PORT}", mesh.cluster.node(0).ip);
    let root = mesh.controller_root().unwrap();
    let token1 = std::fs::read_to_string(mesh.cluster.run_dir().join("node1.token")).unwrap();
    let ask = |identity: &str, token: &str| -> serde_json::Value {
        let out = mesh
            .cluster
            .node(0)
            .command_os(bin_path("weft-hbone-probe"))
            .args([
                "csr",
                "--controller",
                &controller,
                "--ca-file",
                root.to_str().unwrap(),
                "--token",
                token.trim(),
                "--identity",
                identity,
            ])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("{}", String::from_utf8_lossy(&out.stderr)))
    };
    let v = ask(&spiffe("shop", "a-sa"), &token1);
    assert_eq!(v["ok"], true, "own pod's identity: {v}");
    let v = ask(&spiffe("shop", "b-sa"), &token1);
    assert_eq!(v["ok"], false, "{v}");
    assert_eq!(v["code"], "PermissionDenied", "{v}");
    let v = ask(&spiffe("shop", "a-sa"), "not-a-token");
    assert_eq!(v["code"], "Unauthenticated", "{v}");
}

/// Killing and restarting the controller mid-traffic drops no established
/// connection, and changes made while it was down arrive after it returns.
#[test]
fn e2e_controller_restart_keeps_traffic_and_catches_up() {
    let mut mesh = Mesh::with_controller(2, &["shop"]).expect("mesh with controller");
    let client = mesh.add_pod(0, "shop", "client", "client").unwrap();
    let server = mesh.add_pod(1, "shop", "server", "server").unwrap();
    mesh.wait_enrolled(0, &client, true).unwrap();
    mesh.serve_testapp(&server, 7000).unwrap();
    let target = format!("{}:7000", server.ip);

    mesh.spawn_holder("holder", &client, &target, 8, 60)
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    mesh.stop_controller().unwrap();
    // While it is down: a new connection still works on the last good config.
    let v = mesh.connect(&client, &target);
    assert_eq!(v["ok"], true, "{v}");
    // A change made while it is down.
    mesh.model.policies.push(deny_from(
        "shop",
        "deny-client",
        &spiffe("shop", "someone-else"),
    ));
    let late = mesh
        .add_pod(0, "shop", "late", "late")
        .unwrap_or_else(|e| panic!("{e:#}"));
    std::thread::sleep(Duration::from_secs(1));

    mesh.start_controller().unwrap();
    mesh.wait_model_applied()
        .expect("the change made while the controller was down arrives");
    mesh.wait_enrolled(0, &late, true).unwrap();

    let status = wait_until(Duration::from_secs(40), || {
        mesh.cluster.exit_status("holder")
    })
    .unwrap();
    assert!(
        status.success(),
        "established connections dropped across the restart:\n{}",
        mesh.cluster.log("holder")
    );
}

/// A malformed manifest and a policy naming an unknown namespace are
/// reported, and the rest of the mesh keeps working; garbage on the gRPC
/// port does not disturb the controller.
#[test]
fn e2e_controller_bad_input_is_reported_and_contained() {
    let mut mesh = Mesh::with_controller(2, &["shop"]).expect("mesh with controller");
    let client = mesh.add_pod(0, "shop", "client", "client").unwrap();
    let server = mesh.add_pod(1, "shop", "server", "server").unwrap();
    mesh.serve_testapp(&server, 7000).unwrap();
    let dir = mesh.manifests_dir().unwrap().to_owned();
    std::fs::write(
        dir.join("broken.yaml"),
        "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: broken, namespace: shop }\nspec:\n  action: MAYBE\n  rules: 7\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("orphan.yaml"),
        "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: { name: orphan, namespace: nowhere }\nspec: { action: DENY }\n",
    )
    .unwrap();
    let node1 = mesh.cluster.node(0).clone();
    let garbage = node1
        .command_os(bin_path("weft-hbone-probe"))
        .args([
            "raw",
            "--to",
            &format!("{}:{CONTROLLER_GRPC_PORT}", node1.ip),
            "--kind",
            "garbage",
        ])
        .output()
        .unwrap();
    assert!(garbage.status.success());

    let status = wait_until(Duration::from_secs(10), || {
        let s = mesh
            .node_exec(
                0,
                "curl",
                &[
                    "-sS",
                    "--max-time",
                    "5",
                    "http://127.0.0.1:15014/debug/status",
                ],
            )
            .ok()?;
        s.contains("UnknownNamespace").then_some(s)
    })
    .expect("the orphan policy's status says its namespace is unknown");
    assert!(status.contains("orphan"), "{status}");
    let log = wait_until(Duration::from_secs(10), || {
        let l = mesh.controller_log();
        l.contains("broken.yaml").then_some(l)
    })
    .expect("the malformed manifest is reported with its file name");
    assert!(log.contains("broken.yaml"), "{log}");

    // Everything else still works, including new config.
    mesh.wait_enrolled(0, &client, true).unwrap();
    let (_, v) = mesh
        .testapp(
            &client,
            &[
                "connect",
                "--connect",
                &format!("{}:7000", server.ip),
                "--timeout",
                "5",
            ],
        )
        .unwrap();
    assert_eq!(v["ok"], true, "{v}");
}
