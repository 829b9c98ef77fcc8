//! End-to-end L4 mesh on the simulated cluster (network namespaces, real
//! kernel eBPF, real ztunnel processes, real clients and servers). Needs
//! root; fails loudly without it.

use std::time::Duration;

use weft_e2e::cluster::Capture as PacketCapture;
use weft_e2e::mesh::{bin_path, deny_from, metric_sum, wait_until, Mesh};
use weft_e2e::wire::{assert_hbone_only, get_marker_file, send_checksummed, serve_marker_file};

const OPENED: &str = "weft_tcp_connections_opened_total";

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// Cross-node: curl and a bulk transfer from a pod on node 1 to a Service
/// whose pod is on node 2 travel only as TLS on 15008, and the server sees
/// the client pod's IP.
#[test]
fn e2e_cross_node_mtls_preserves_source_ip() {
    let mut mesh = Mesh::new(2, &["shop"]).expect("mesh");
    let client = mesh.add_pod(0, "shop", "client", "client-sa").unwrap();
    let server = mesh.add_pod(1, "shop", "server", "server-sa").unwrap();
    mesh.wait_enrolled(0, &client, true).unwrap();
    mesh.wait_enrolled(1, &server, true).unwrap();
    let vip = mesh
        .add_service("shop", "server", "server", &[(80, 8080), (9000, 9000)])
        .unwrap();

    // An HTTP server logging each client address, with a file whose
    // content must never be seen on the wire.
    let marker = serve_marker_file(&mut mesh, &server, "http-server", "0.0.0.0").unwrap();
    mesh.serve_testapp(&server, 9000).unwrap();

    let cap = PacketCapture::start(&mesh.cluster, "tcp").unwrap();

    get_marker_file(&client, &format!("http://{vip}/marker.txt"), &marker);
    // 64 MiB bulk transfer, checksummed by the server.
    let seen = send_checksummed(&mesh, &client, &format!("{vip}:9000"), 64 << 20);
    assert_eq!(seen, client.ip, "the server must see the client pod");

    assert_hbone_only(&cap.stop().unwrap(), &marker);

    let log = mesh.cluster.log("http-server");
    assert!(
        log.contains(&format!("{} - -", client.ip)),
        "http server log does not show the client pod IP:\n{log}"
    );

    let src = mesh.metrics(0).unwrap();
    let dst = mesh.metrics(1).unwrap();
    let labels = [
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", &spiffe("shop", "client-sa")[..]),
        ("destination_principal", &spiffe("shop", "server-sa")[..]),
    ];
    assert!(
        metric_sum(
            &src,
            OPENED,
            &[&labels[..], &[("reporter", "source")]].concat()
        ) >= 2.0,
        "{src}"
    );
    assert!(
        metric_sum(
            &dst,
            OPENED,
            &[&labels[..], &[("reporter", "destination")]].concat()
        ) >= 2.0,
        "{dst}"
    );
    wait_until(Duration::from_secs(5), || {
        let m = mesh.metrics(0).ok()?;
        (metric_sum(&m, "weft_tcp_sent_bytes_total", &[("reporter", "source")]) >= 67108864.0)
            .then_some(())
    })
    .expect("source ztunnel counted the bulk bytes");
    let log = mesh.ztunnel_log(0);
    assert!(
        log.contains("conn="),
        "ztunnel logs carry a connection id:\n{log}"
    );
}

/// Same node: works through ztunnel and is policy-checked there.
#[test]
fn e2e_same_node_is_policy_checked() {
    let mut mesh = Mesh::new(1, &["shop"]).expect("mesh");
    let a = mesh.add_pod(0, "shop", "a", "a-sa").unwrap();
    let b = mesh.add_pod(0, "shop", "b", "b-sa").unwrap();
    mesh.wait_enrolled(0, &b, true).unwrap();
    mesh.serve_testapp(&b, 7000).unwrap();
    let target = format!("{}:7000", b.ip);

    let v = mesh.connect(&a, &target);
    assert_eq!(v["ok"], true, "{v}");
    assert!(
        v["peer_seen_by_server"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&format!("{}:", a.ip)),
        "{v}"
    );

    mesh.model
        .policies
        .push(deny_from("shop", "deny-a", &spiffe("shop", "a-sa")));
    mesh.write_model().unwrap();
    wait_until(Duration::from_secs(10), || {
        let v = mesh.connect(&a, &target);
        (v["ok"] == false).then_some(())
    })
    .expect("DENY policy refuses a's connections");
    let m = mesh.metrics(0).unwrap();
    assert!(
        metric_sum(
            &m,
            "weft_authorization_denials_total",
            &[("policy", "shop/deny-a")]
        ) >= 1.0,
        "{m}"
    );
    assert!(mesh.ztunnel_log(0).contains("denied by policy"));
}

/// Pods outside the mesh bypass ztunnel entirely; kubelet-style probes
/// from the node reach an enrolled app directly.
#[test]
fn e2e_non_enrolled_bypass_and_node_probes() {
    let mut mesh = Mesh::new(2, &["shop"]).expect("mesh");
    let plain_client = mesh.add_pod(0, "legacy", "old-client", "default").unwrap();
    let plain_server = mesh.add_pod(1, "legacy", "old-server", "default").unwrap();
    let meshed = mesh.add_pod(1, "shop", "web", "web").unwrap();
    mesh.wait_enrolled(0, &plain_client, false).unwrap();
    mesh.wait_enrolled(1, &meshed, true).unwrap();
    mesh.serve_testapp(&plain_server, 7000).unwrap();
    mesh.serve_testapp(&meshed, 7000).unwrap();
    // 7000 is also the pod's probe port (what the controller reads from
    // the pod spec's probes), so the node reaches it directly.
    mesh.set_probe_ports(&meshed, &[7000]).unwrap();
    let before = (mesh.metrics(0).unwrap(), mesh.metrics(1).unwrap());

    for _ in 0..5 {
        let (_, v) = mesh
            .testapp(
                &plain_client,
                &[
                    "connect",
                    "--connect",
                    &format!("{}:7000", plain_server.ip),
                    "--timeout",
                    "5",
                ],
            )
            .unwrap();
        assert_eq!(v["ok"], true, "{v}");
    }
    let after = (mesh.metrics(0).unwrap(), mesh.metrics(1).unwrap());
    assert_eq!(
        metric_sum(&before.0, OPENED, &[]),
        metric_sum(&after.0, OPENED, &[]),
        "node1 ztunnel counted non-mesh traffic"
    );
    assert_eq!(
        metric_sum(&before.1, OPENED, &[]),
        metric_sum(&after.1, OPENED, &[]),
        "node2 ztunnel counted non-mesh traffic"
    );

    // Probe from the node itself to the probe port: straight to the app,
    // ztunnel not involved (other ports: e2e_hardening).
    let node_ip = mesh.cluster.node(1).ip;
    let who = mesh
        .node_exec(
            1,
            bin_path("weft-testapp").to_str().unwrap(),
            &[
                "connect",
                "--connect",
                &format!("{}:7000", meshed.ip),
                "--timeout",
                "5",
            ],
        )
        .unwrap();
    let gateway = weft_e2e::cluster::POD_GATEWAY;
    assert!(
        who.contains(&format!("\"peer_seen_by_server\":\"{node_ip}:"))
            || who.contains(&format!("\"peer_seen_by_server\":\"{gateway}:")),
        "probe from the node: {who}"
    );
    let m = mesh.metrics(1).unwrap();
    assert_eq!(
        metric_sum(&after.1, OPENED, &[]),
        metric_sum(&m, OPENED, &[]),
        "node probe went through ztunnel"
    );

    // A non-mesh client reaching a meshed pod is let in (PERMISSIVE) in
    // plaintext, through the destination ztunnel.
    let (_, v) = mesh
        .testapp(
            &plain_client,
            &[
                "connect",
                "--connect",
                &format!("{}:7000", meshed.ip),
                "--timeout",
                "5",
            ],
        )
        .unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert!(
        v["peer_seen_by_server"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&format!("{}:", plain_client.ip)),
        "{v}"
    );
    let m = mesh.metrics(1).unwrap();
    assert!(
        metric_sum(
            &m,
            OPENED,
            &[
                ("reporter", "destination"),
                ("connection_security_policy", "none")
            ]
        ) >= 1.0,
        "{m}"
    );
}

/// Enrolling and unenrolling a running pod switches its path; the pod's
/// processes are never restarted.
#[test]
fn e2e_enroll_and_unenroll_running_pod() {
    let mut mesh = Mesh::new(2, &["shop"]).expect("mesh");
    let client = mesh.add_pod(0, "late", "client", "default").unwrap();
    let server = mesh.add_pod(1, "shop", "server", "server").unwrap();
    mesh.serve_testapp(&server, 7000).unwrap();
    let target = format!("{}:7000", server.ip);
    let pause = client.pause_pid;
    let source_opened =
        |mesh: &Mesh| metric_sum(&mesh.metrics(0).unwrap(), OPENED, &[("reporter", "source")]);

    let base = source_opened(&mesh);
    let v = mesh.connect(&client, &target);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(source_opened(&mesh), base, "not enrolled yet, yet counted");

    mesh.set_ambient("late", true);
    mesh.write_model().unwrap();
    mesh.wait_enrolled(0, &client, true).unwrap();
    let v = mesh.connect(&client, &target);
    assert_eq!(v["ok"], true, "{v}");
    assert!(
        v["peer_seen_by_server"]
            .as_str()
            .unwrap_or_default()
            .starts_with(&format!("{}:", client.ip)),
        "{v}"
    );
    wait_until(Duration::from_secs(5), || {
        (source_opened(&mesh) > base).then_some(())
    })
    .expect("enrolled pod's connection went through ztunnel");

    mesh.set_ambient("late", false);
    mesh.write_model().unwrap();
    mesh.wait_enrolled(0, &client, false).unwrap();
    let base = source_opened(&mesh);
    let v = mesh.connect(&client, &target);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(source_opened(&mesh), base, "unenrolled pod still captured");
    assert!(
        std::path::Path::new(&format!("/proc/{pause}")).exists(),
        "the pod's pause process was restarted"
    );
}

/// With its ztunnel down an enrolled pod's connections are refused and
/// nothing leaves in plaintext; after a restart they work again.
#[test]
fn e2e_ztunnel_down_fails_closed() {
    let mut mesh = Mesh::new(2, &["shop"]).expect("mesh");
    let client = mesh.add_pod(0, "shop", "client", "client").unwrap();
    let server = mesh.add_pod(1, "shop", "server", "server").unwrap();
    mesh.wait_enrolled(0, &client, true).unwrap();
    mesh.serve_testapp(&server, 7000).unwrap();
    let target = format!("{}:7000", server.ip);
    let v = mesh.connect(&client, &target);
    assert_eq!(v["ok"], true, "{v}");

    mesh.stop_ztunnel(0).unwrap();
    let cap = PacketCapture::start(&mesh.cluster, "tcp").unwrap();
    let v = mesh.connect(&client, &target);
    assert_eq!(
        v["ok"], false,
        "connection succeeded with ztunnel down: {v}"
    );
    let packets = cap.stop().unwrap();
    assert!(
        packets
            .iter()
            .all(|p| p.dst_port != 7000 && p.src_port != 7000),
        "a packet to the app port left the node while ztunnel was down"
    );

    mesh.start_ztunnel(0).unwrap();
    wait_until(Duration::from_secs(10), || {
        let v = mesh.connect(&client, &target);
        (v["ok"] == true).then_some(())
    })
    .expect("connections work again after ztunnel restarts");
}

/// A peer with a certificate from another CA, or a server that is not the
/// identity the client expects, is rejected, counted and logged.
#[test]
fn e2e_wrong_identity_is_rejected() {
    let mut mesh = Mesh::new(2, &["shop"]).expect("mesh");
    let outsider = mesh.add_pod(0, "legacy", "outsider", "default").unwrap();
    let server = mesh.add_pod(1, "shop", "server", "server").unwrap();
    mesh.wait_enrolled(1, &server, true).unwrap();
    mesh.serve_testapp(&server, 7000).unwrap();
    let probe = bin_path("weft-hbone-probe");
    let hbone = format!("{}:15008", server.ip);
    let target = format!("{}:7000", server.ip);
    let ca = mesh.ca_dir().to_str().unwrap().to_owned();
    let run = |extra: &[&str]| -> serde_json::Value {
        let out = outsider
            .command_os(&probe)
            .args([
                "connect",
                "--to",
                &hbone,
                "--target",
                &target,
                "--identity",
                &spiffe("legacy", "default"),
            ])
            .args(extra)
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|_| panic!("probe said: {}", String::from_utf8_lossy(&out.stderr)))
    };

    // Positive control: a proper mesh certificate gets through.
    let v = run(&["--ca-dir", &ca, "--expect", &spiffe("shop", "server")]);
    assert_eq!(v["ok"], true, "{v}");

    // The server is not who the client expects.
    let v = run(&["--ca-dir", &ca, "--expect", &spiffe("shop", "someone-else")]);
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap_or_default()
            .contains("someone-else"),
        "{v}"
    );

    // The client's certificate comes from another CA.
    let v = run(&["--foreign-ca", "--expect", &spiffe("shop", "server")]);
    assert_eq!(v["ok"], false, "{v}");
    wait_until(Duration::from_secs(5), || {
        let m = mesh.metrics(1).ok()?;
        (metric_sum(&m, "weft_tls_handshake_failures_total", &[]) >= 1.0).then_some(())
    })
    .expect("handshake failure counted");
    assert!(
        mesh.ztunnel_log(1).contains("HBONE connection rejected"),
        "{}",
        mesh.ztunnel_log(1)
    );
}

/// Garbage, plain HTTP/1 and a truncated TLS handshake on 15008 are
/// rejected without disturbing an established tunnel or new ones.
#[test]
fn e2e_bad_input_on_hbone_port() {
    let mut mesh = Mesh::new(2, &["shop"]).expect("mesh");
    let client = mesh.add_pod(0, "shop", "client", "client").unwrap();
    let outsider = mesh.add_pod(0, "legacy", "outsider", "default").unwrap();
    let server = mesh.add_pod(1, "shop", "server", "server").unwrap();
    mesh.wait_enrolled(0, &client, true).unwrap();
    mesh.wait_enrolled(1, &server, true).unwrap();
    mesh.serve_testapp(&server, 7000).unwrap();
    let target = format!("{}:7000", server.ip);

    // A long-lived tunnel that spans the attack.
    let mut hold = client.command_os(bin_path("weft-testapp"));
    hold.args([
        "hold",
        "--connect",
        &target,
        "--conns",
        "4",
        "--rounds",
        "40",
        "--timeout",
        "60",
    ]);
    mesh.cluster.spawn("holder", hold).unwrap();

    let probe = bin_path("weft-hbone-probe");
    for kind in ["garbage", "http1", "truncated-tls"] {
        let out = outsider
            .command_os(&probe)
            .args([
                "raw",
                "--to",
                &format!("{}:15008", server.ip),
                "--kind",
                kind,
            ])
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["ok"], true, "{kind}: {v}");
        assert_eq!(
            v["closed_by_server"], true,
            "{kind}: server must close the connection: {v}"
        );
        let text = v["response_text"].as_str().unwrap_or_default();
        assert!(!text.contains("HTTP/1.1 200"), "{kind}: {v}");
    }
    let v = mesh.connect(&client, &target);
    assert_eq!(v["ok"], true, "new tunnel after bad input: {v}");
    wait_until(Duration::from_secs(60), || {
        mesh.cluster.exit_status("holder")
    })
    .expect("holder finished");
    let log = mesh.cluster.log("holder");
    assert!(
        mesh.cluster
            .exit_status("holder")
            .is_some_and(|s| s.success()),
        "long-lived tunnels broke:\n{log}"
    );
    let m = mesh.metrics(1).unwrap();
    assert!(
        metric_sum(&m, "weft_tls_handshake_failures_total", &[]) >= 3.0,
        "{m}"
    );
}

/// 200 concurrent long-lived connections through one ztunnel pair stay up
/// and carry their bytes intact.
#[test]
fn e2e_200_long_lived_connections() {
    let mut mesh = Mesh::new(2, &["shop"]).expect("mesh");
    let client = mesh.add_pod(0, "shop", "client", "client").unwrap();
    let server = mesh.add_pod(1, "shop", "server", "server").unwrap();
    mesh.wait_enrolled(0, &client, true).unwrap();
    mesh.wait_enrolled(1, &server, true).unwrap();
    let vip = mesh
        .add_service("shop", "server", "server", &[(7000, 7000)])
        .unwrap();
    mesh.serve_testapp(&server, 7000).unwrap();
    let (out, v) = mesh
        .testapp(
            &client,
            &[
                "hold",
                "--connect",
                &format!("{vip}:7000"),
                "--conns",
                "200",
                "--rounds",
                "10",
                "--timeout",
                "120",
            ],
        )
        .unwrap();
    assert!(
        out.status.success(),
        "{v} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let m = mesh.metrics(0).unwrap();
    assert!(
        metric_sum(
            &m,
            OPENED,
            &[
                ("reporter", "source"),
                ("connection_security_policy", "mutual_tls")
            ]
        ) >= 200.0,
        "{m}"
    );
}

/// A new DENY closes an open connection it now denies and refuses new ones;
/// removing it lets traffic flow again. STRICT mTLS refuses plaintext from
/// outside the mesh while mesh clients keep working.
#[test]
fn e2e_policy_change_applies_to_open_connections_and_strict_mtls() {
    use weft_api::model::{MtlsMode, PeerAuthentication};
    let mut mesh = Mesh::new(2, &["shop"]).expect("mesh");
    let client = mesh.add_pod(0, "shop", "client", "client").unwrap();
    let outsider = mesh.add_pod(0, "legacy", "outsider", "default").unwrap();
    let server = mesh.add_pod(1, "shop", "server", "server").unwrap();
    mesh.wait_enrolled(0, &client, true).unwrap();
    mesh.wait_enrolled(1, &server, true).unwrap();
    mesh.serve_testapp(&server, 7000).unwrap();
    let target = format!("{}:7000", server.ip);

    // A long-lived connection, exchanging a line every 100 ms for up to 30 s.
    mesh.spawn_holder("holder", &client, &target, 1, 300)
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        mesh.cluster.exit_status("holder").is_none(),
        "holder ended early:\n{}",
        mesh.cluster.log("holder")
    );

    mesh.model
        .policies
        .push(deny_from("shop", "deny-client", &spiffe("shop", "client")));
    mesh.write_model().unwrap();
    let status = wait_until(Duration::from_secs(5), || {
        mesh.cluster.exit_status("holder")
    })
    .expect("the open connection is closed within seconds of the DENY");
    assert!(
        !status.success(),
        "holder should fail when its connection is cut:\n{}",
        mesh.cluster.log("holder")
    );
    assert!(
        mesh.ztunnel_log(1).contains("policy now denies"),
        "{}",
        mesh.ztunnel_log(1)
    );
    let v = mesh.connect(&client, &target);
    assert_eq!(v["ok"], false, "new connection while denied: {v}");

    mesh.model.policies.clear();
    mesh.write_model().unwrap();
    let v = mesh.connect(&client, &target);
    assert_eq!(v["ok"], true, "after removing the DENY: {v}");

    // PERMISSIVE: plaintext from outside the mesh is let in; STRICT: refused.
    let v = mesh.connect(&outsider, &target);
    assert_eq!(v["ok"], true, "permissive plaintext: {v}");
    mesh.model.peer_authentications.push(PeerAuthentication {
        name: "strict".into(),
        namespace: "shop".into(),
        selector: None,
        mode: MtlsMode::Strict,
    });
    mesh.write_model().unwrap();
    let v = mesh.connect(&outsider, &target);
    assert_eq!(v["ok"], false, "plaintext under STRICT: {v}");
    let v = mesh.connect(&client, &target);
    assert_eq!(v["ok"], true, "mTLS under STRICT: {v}");
    let m = mesh.metrics(1).unwrap();
    assert!(
        metric_sum(
            &m,
            "weft_authorization_denials_total",
            &[("policy", "peer-authentication-strict")]
        ) >= 1.0,
        "{m}"
    );
}
