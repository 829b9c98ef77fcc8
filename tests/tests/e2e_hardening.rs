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
    probe_with(mesh, from, to, target, expect, forwarded, &[])
}

fn probe_with(
    mesh: &Mesh,
    from: &Pod,
    to: &str,
    target: &str,
    expect: &str,
    forwarded: Option<&str>,
    extra: &[&str],
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
    cmd.args(extra);
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

/// The circuit breaker's `maxConnections` and `maxPendingRequests` are
/// enforced at the waypoint: with one connection and one waiting request
/// allowed, of three concurrent slow HTTP/1.1 requests one waits and gets
/// through and one is answered 503 with `x-weft-overflow` (counted as a
/// pending overflow); a second concurrent TCP connection to a one-connection
/// service is turned away (counted as a connections overflow).
#[test]
fn e2e_hardening_max_connections_and_max_pending_requests_are_enforced() {
    use weft_api::model::{ConnectionLimits, TrafficPolicy};
    let mut mesh = Mesh::with_controller(2, &["shop"]).expect("mesh with controller");
    let client = mesh.add_pod(0, "shop", "client", "client").unwrap();
    let slow = mesh.add_pod(1, "shop", "slow", "slow").unwrap();
    let tcp = mesh.add_pod(1, "shop", "tcp", "tcp").unwrap();
    mesh.wait_enrolled(0, &client, true).unwrap();
    mesh.serve_httpapp(&slow, 8080, None).unwrap();
    mesh.serve_testapp(&tcp, 7000).unwrap();
    let slow_vip = mesh
        .add_service_selecting("shop", "slow", &[("app", "slow")], &[(80, 8080)])
        .unwrap();
    let tcp_vip = mesh
        .add_service_selecting("shop", "tcp", &[("app", "tcp")], &[(70, 7000)])
        .unwrap();
    mesh.add_waypoint(1, "shop", "wp").unwrap();
    mesh.use_waypoint("shop", "slow", Some("wp")).unwrap();
    mesh.use_waypoint("shop", "tcp", Some("wp")).unwrap();
    for (name, pending) in [("slow", Some(1)), ("tcp", None)] {
        mesh.model.traffic_policies.push(TrafficPolicy {
            name: format!("{name}-limits"),
            namespace: "shop".into(),
            target: name.into(),
            limits: Some(ConnectionLimits {
                max_connections: Some(1),
                max_pending_requests: pending,
                max_requests: None,
            }),
            ..Default::default()
        });
    }
    mesh.write_model().unwrap();
    let url = format!("http://{slow_vip}:80/slow?ms=1500");
    // Warm up: the route and policy are in place and the path works.
    let warm = mesh
        .curl(
            &client,
            &[
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("http://{slow_vip}:80/slow?ms=1"),
            ],
        )
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&warm.stdout), "200");

    let answers: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|_| {
                s.spawn(|| {
                    let out = mesh
                        .curl(
                            &client,
                            &[
                                "-o",
                                "/dev/null",
                                "-w",
                                "%{http_code} %header{x-weft-overflow}",
                                &url,
                            ],
                        )
                        .unwrap();
                    String::from_utf8_lossy(&out.stdout).trim().to_owned()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let overflowed = answers.iter().filter(|a| a.as_str() == "503 true").count();
    let served = answers.iter().filter(|a| a.as_str() == "200").count();
    assert_eq!(
        (served, overflowed),
        (2, 1),
        "one waits, one overflows: {answers:?}"
    );
    let m = mesh.waypoint_metrics("wp").unwrap();
    assert_eq!(
        metric_sum(
            &m,
            "weft_circuit_breaker_overflows_total",
            &[("destination_service", "slow.shop"), ("limit", "pending")]
        ),
        1.0,
        "{m}"
    );

    // TCP through the waypoint: one connection held, a second refused.
    let target = format!("{tcp_vip}:70");
    mesh.spawn_holder("holder", &client, &target, 1, 40)
        .unwrap();
    wait_until(Duration::from_secs(5), || {
        let m = mesh.waypoint_metrics("wp").ok()?;
        (metric_sum(
            &m,
            "weft_tcp_passthrough_connections_total",
            &[("destination_service", "tcp.shop")],
        ) >= 1.0)
            .then_some(())
    })
    .expect("the held connection goes through");
    let v = mesh.connect(&client, &target);
    assert_eq!(
        v["ok"], false,
        "a second connection is over maxConnections: {v}"
    );
    let m = mesh.waypoint_metrics("wp").unwrap();
    assert_eq!(
        metric_sum(
            &m,
            "weft_circuit_breaker_overflows_total",
            &[
                ("destination_service", "tcp.shop"),
                ("limit", "connections")
            ]
        ),
        1.0,
        "{m}"
    );
    let status = wait_until(Duration::from_secs(10), || {
        mesh.cluster.exit_status("holder")
    })
    .expect("the held connection ends");
    assert!(status.success(), "{}", mesh.cluster.log("holder"));
    let v = mesh.connect(&client, &target);
    assert_eq!(v["ok"], true, "the slot is free again: {v}");
}

/// Runs `weft-hbone-probe <args>` in `cmd`'s namespace; its JSON answer.
fn run_probe(mut cmd: std::process::Command, args: &[&str]) -> serde_json::Value {
    let out = cmd.args(args).output().expect("run weft-hbone-probe");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("probe said: {}", String::from_utf8_lossy(&out.stderr)))
}

/// 500 authenticated HBONE connections that open no tunnel are closed by
/// the destination ztunnel after its idle bound, while a normal client's
/// connections keep being served.
#[test]
fn e2e_hardening_idle_hbone_connections_are_shed_while_clients_are_served() {
    let mut mesh = Mesh::new(2, &["shop"]).expect("mesh");
    mesh.ztunnel_args = vec!["--hbone-idle-timeout".into(), "2s".into()];
    mesh.stop_ztunnel(1).unwrap();
    mesh.start_ztunnel(1).unwrap();
    let outsider = mesh.add_pod(0, "legacy", "outsider", "default").unwrap();
    let client = mesh.add_pod(0, "shop", "client", "client").unwrap();
    let server = mesh.add_pod(1, "shop", "server", "server").unwrap();
    mesh.wait_enrolled(0, &client, true).unwrap();
    mesh.wait_enrolled(1, &server, true).unwrap();
    mesh.serve_testapp(&server, 7000).unwrap();
    let target = format!("{}:7000", server.ip);
    let to = format!("{}:15008", server.ip);
    let ca = mesh.ca_dir().to_str().unwrap().to_owned();
    let flood = std::thread::scope(|s| {
        let flood = s.spawn(|| {
            run_probe(
                outsider.command_os(bin_path("weft-hbone-probe")),
                &[
                    "idle-flood",
                    "--to",
                    &to,
                    "--count",
                    "500",
                    "--hold-secs",
                    "15",
                    "--identity",
                    &spiffe("legacy", "default"),
                    "--expect",
                    &spiffe("shop", "server"),
                    "--ca-dir",
                    &ca,
                ],
            )
        });
        for _ in 0..20 {
            let v = mesh.connect(&client, &target);
            assert_eq!(v["ok"], true, "a normal client is served meanwhile: {v}");
            std::thread::sleep(Duration::from_millis(250));
        }
        flood.join().unwrap()
    });
    assert_eq!(flood["ok"], true, "{flood}");
    assert_eq!(flood["opened"], 500, "{flood}");
    assert_eq!(flood["closed_by_server"], 500, "{flood}");
}

/// A pooled HBONE connection whose peer stops answering (its ztunnel
/// frozen) is found dead by keepalive PINGs and retired; once the peer is
/// back, the next connection dials a new one and gets through.
#[test]
fn e2e_hardening_a_dead_peer_is_detected_by_keepalive_and_replaced() {
    let mut mesh = Mesh::new(2, &["shop"]).expect("mesh");
    mesh.ztunnel_args = vec![
        "--hbone-keepalive".into(),
        "1s".into(),
        "--hbone-keepalive-timeout".into(),
        "1s".into(),
    ];
    mesh.stop_ztunnel(0).unwrap();
    mesh.start_ztunnel(0).unwrap();
    let client = mesh.add_pod(0, "shop", "client", "client").unwrap();
    let server = mesh.add_pod(1, "shop", "server", "server").unwrap();
    mesh.wait_enrolled(0, &client, true).unwrap();
    mesh.wait_enrolled(1, &server, true).unwrap();
    mesh.serve_testapp(&server, 7000).unwrap();
    let target = format!("{}:7000", server.ip);
    let pooled = |mesh: &Mesh| mesh.config_dump(0).ok()?["pooled_connections"].as_u64();
    assert_eq!(mesh.connect(&client, &target)["ok"], true);
    assert_eq!(pooled(&mesh), Some(1));

    let peer = mesh.ztunnel_name(1).unwrap().to_owned();
    mesh.cluster.signal(&peer, libc::SIGSTOP).unwrap();
    let retired = wait_until(Duration::from_secs(10), || {
        (pooled(&mesh)? == 0).then_some(())
    });
    mesh.cluster.signal(&peer, libc::SIGCONT).unwrap();
    retired.expect("the unanswered connection is retired");

    let v = mesh.connect(&client, &target);
    assert_eq!(v["ok"], true, "a new connection replaces it: {v}");
    assert_eq!(pooled(&mesh), Some(1));
}

/// 200 connections that never finish a request head on the metrics port
/// are closed after the header deadline, while a scrape succeeds.
#[test]
fn e2e_hardening_a_slowloris_on_the_metrics_port_is_shed_while_a_scrape_succeeds() {
    let mesh = Mesh::new(1, &[]).expect("mesh");
    let node = mesh.cluster.node(0).clone();
    let to = format!("{}:15020", node.ip);
    let flood = std::thread::scope(|s| {
        let flood = s.spawn(|| {
            run_probe(
                node.command_os(bin_path("weft-hbone-probe")),
                &[
                    "slowloris",
                    "--to",
                    &to,
                    "--count",
                    "200",
                    "--hold-secs",
                    "12",
                ],
            )
        });
        std::thread::sleep(Duration::from_millis(1500));
        let m = mesh.metrics(0).expect("a scrape during the slowloris");
        assert!(m.contains("weft_build_info"), "{m}");
        flood.join().unwrap()
    });
    assert_eq!(flood["ok"], true, "{flood}");
    assert_eq!(flood["opened"], 200, "{flood}");
    assert_eq!(flood["closed_by_server"], 200, "{flood}");
}

/// A client offering only the hybrid post-quantum group X25519MLKEM768 (as
/// Istio's ztunnel does under its post-quantum policy) completes HBONE
/// handshakes with a ztunnel and a waypoint; a client with Weft's default
/// offer settles on it as well.
#[test]
fn e2e_hardening_post_quantum_key_exchange_with_ztunnel_and_waypoint() {
    let mut mesh = Mesh::with_controller(2, &["shop"]).expect("mesh with controller");
    let outsider = mesh.add_pod(0, "legacy", "outsider", "default").unwrap();
    let server = mesh.add_pod(1, "shop", "server", "server").unwrap();
    let other = mesh.add_pod(1, "shop", "other", "other").unwrap();
    mesh.wait_enrolled(1, &server, true).unwrap();
    mesh.wait_enrolled(1, &other, true).unwrap();
    mesh.serve_testapp(&server, 7000).unwrap();
    mesh.serve_testapp(&other, 7000).unwrap();
    let vip = mesh
        .add_service_selecting("shop", "other", &[("app", "other")], &[(80, 7000)])
        .unwrap();
    let waypoint = mesh.add_waypoint(0, "shop", "wp").unwrap();
    mesh.use_waypoint("shop", "other", Some("wp")).unwrap();
    let direct = format!("{}:7000", server.ip);
    let via = format!("{vip}:80");
    let cases = [
        (
            server.ip.to_string(),
            direct.as_str(),
            spiffe("shop", "server"),
        ),
        (waypoint.ip.to_string(), via.as_str(), spiffe("shop", "wp")),
    ];
    for (to, target, expect) in &cases {
        for extra in [&["--pq-only"][..], &[][..]] {
            let v = probe_with(&mesh, &outsider, to, target, expect, None, extra);
            assert_eq!(v["ok"], true, "{to} {extra:?}: {v}");
            assert_eq!(v["kx_group"], "Some(X25519MLKEM768)", "{to} {extra:?}: {v}");
        }
    }
}

/// The node's own addresses reach an enrolled pod directly only on the
/// pod's probe ports (what the kubelet needs); a hostNetwork process
/// connecting to any other port goes through the ztunnel and meets policy:
/// a DENY of the node's addresses refuses it, while the probe port still
/// reaches the app directly, uncounted by the ztunnel.
#[test]
fn e2e_hardening_the_node_bypasses_policy_only_on_probe_ports() {
    let mut mesh = Mesh::new(1, &["shop"]).expect("mesh");
    let web = mesh.add_pod(0, "shop", "web", "web").unwrap();
    mesh.wait_enrolled(0, &web, true).unwrap();
    mesh.serve_testapp(&web, 7000).unwrap();
    mesh.serve_testapp(&web, 7001).unwrap();
    mesh.set_probe_ports(&web, &[7000]).unwrap();
    let node = mesh.cluster.node(0).clone();
    let from_node = |mesh: &Mesh, port: u16| -> serde_json::Value {
        let out = node
            .command_os(bin_path("weft-testapp"))
            .args([
                "connect",
                "--connect",
                &format!("{}:{port}", web.ip),
                "--timeout",
                "5",
            ])
            .output()
            .expect("run weft-testapp in the node");
        let _ = mesh;
        serde_json::from_slice(&out.stdout).unwrap_or_else(
            |_| serde_json::json!({"ok": false, "error": String::from_utf8_lossy(&out.stderr)}),
        )
    };
    let node_sources = vec![
        format!("{}/32", node.ip),
        format!("{}/32", weft_e2e::cluster::POD_GATEWAY),
        format!("{}/128", node.ip6),
    ];
    mesh.model.policies.push(AuthorizationPolicy {
        name: "deny-node".into(),
        namespace: "shop".into(),
        selector: Some([("app".to_owned(), "web".to_owned())].into()),
        action: PolicyAction::Deny,
        rules: vec![Rule {
            from: vec![Source {
                ip_blocks: node_sources,
                ..Default::default()
            }],
            to: vec![],
        }],
        targets: vec![],
    });
    mesh.write_model().unwrap();

    // A hostNetwork process to the app port: through the ztunnel, denied.
    wait_until(Duration::from_secs(10), || {
        (from_node(&mesh, 7001)["ok"] == false).then_some(())
    })
    .expect("the node's connection to a non-probe port meets the DENY");
    let m = mesh.metrics(0).unwrap();
    assert!(
        metric_sum(
            &m,
            "weft_authorization_denials_total",
            &[("policy", "shop/deny-node")]
        ) >= 1.0,
        "the denial is counted under the policy: {m}"
    );

    // The kubelet's probe to the probe port: straight to the app, from the
    // node's address, not seen by the ztunnel.
    let opened = |m: &str| metric_sum(m, "weft_tcp_connections_opened_total", &[]);
    let before = opened(&mesh.metrics(0).unwrap());
    let v = from_node(&mesh, 7000);
    assert_eq!(v["ok"], true, "the probe port reaches the app: {v}");
    let peer = v["peer_seen_by_server"].as_str().unwrap_or_default();
    assert!(
        peer.starts_with(&format!("{}:", node.ip))
            || peer.starts_with(&format!("{}:", weft_e2e::cluster::POD_GATEWAY)),
        "the app sees the node: {v}"
    );
    assert_eq!(
        before,
        opened(&mesh.metrics(0).unwrap()),
        "the probe went through the ztunnel"
    );

    // Probe ports follow the model: without them, the node's connection to
    // 7000 meets the DENY too.
    mesh.set_probe_ports(&web, &[]).unwrap();
    wait_until(Duration::from_secs(10), || {
        (from_node(&mesh, 7000)["ok"] == false).then_some(())
    })
    .expect("with no probe ports, 7000 from the node meets the DENY");
}
