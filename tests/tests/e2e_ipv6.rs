//! Dual-stack end to end: every simulated pod and node has an IPv4 and an
//! IPv6 address (`tests/src/cluster.rs`), and IPv6 traffic goes through the
//! mesh as IPv4 does: captured in the kernel, carried in HBONE (mTLS) over
//! IPv6 between nodes and within one, with the client's IPv6 address kept
//! for the server and for policy. Needs root; fails loudly without it.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use weft_api::model::{AuthorizationPolicy, PolicyAction, Rule, Source};
use weft_e2e::cluster::{Capture, Pod};
use weft_e2e::mesh::{metric_sum, wait_until, Mesh};
use weft_e2e::wire::{assert_hbone_only, get_marker_file, send_checksummed, serve_marker_file};

const OPENED: &str = "weft_tcp_connections_opened_total";

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// `[ip6]:port` of a pod.
fn at6(pod: &Pod, port: u16) -> String {
    SocketAddr::from((pod.ip6, port)).to_string()
}

/// The address the server saw, from a `weft-testapp` answer.
fn seen(v: &serde_json::Value) -> Option<IpAddr> {
    v["peer_seen_by_server"]
        .as_str()?
        .parse::<SocketAddr>()
        .ok()
        .map(|a| a.ip().to_canonical())
}

/// Starts `weft-testapp serve` on `[::]:port` (both families) in `pod`.
fn serve_dual(mesh: &mut Mesh, pod: &Pod, port: u16) {
    let mut cmd = pod.command_os(weft_e2e::mesh::bin_path("weft-testapp"));
    cmd.args(["serve", "--port", &port.to_string(), "--bind", "::"]);
    let name = format!("testapp6-{}-{port}", pod.name);
    mesh.cluster.spawn(&name, cmd).unwrap();
    mesh.cluster
        .wait_for_log(&name, "listening", Duration::from_secs(10))
        .unwrap();
}

/// Cross-node over IPv6: curl to a dual-stack Service's IPv6 VIP and a
/// checksummed 64 MiB transfer to the pod's IPv6 address travel only as
/// TLS on 15008 between the pods' IPv6 addresses, and the server sees the
/// client pod's IPv6 address.
#[test]
fn e2e_ipv6_cross_node_mtls_preserves_source_ip() {
    let mut mesh = Mesh::new(2, &["shop"]).expect("mesh");
    let client = mesh.add_pod(0, "shop", "client", "client-sa").unwrap();
    let server = mesh.add_pod(1, "shop", "server", "server-sa").unwrap();
    mesh.wait_enrolled(0, &client, true).unwrap();
    mesh.wait_enrolled(1, &server, true).unwrap();
    mesh.add_service("shop", "server", "server", &[(80, 8080)])
        .unwrap();
    // Dual-stack Service: an IPv6 VIP beside the IPv4 one.
    let vip6 = mesh.cluster.vip6(1);
    mesh.model
        .services
        .iter_mut()
        .find(|s| s.name == "server")
        .unwrap()
        .vips
        .push(IpAddr::V6(vip6));
    mesh.write_model().unwrap();

    let marker = serve_marker_file(&mut mesh, &server, "http-server6", "::").unwrap();
    serve_dual(&mut mesh, &server, 9000);

    let cap = Capture::start(&mesh.cluster, "tcp").unwrap();
    get_marker_file(&client, &format!("http://[{vip6}]/marker.txt"), &marker);
    let seen_by_server = send_checksummed(&mesh, &client, &at6(&server, 9000), 64 << 20);
    assert_eq!(seen_by_server, IpAddr::V6(client.ip6));

    let packets = cap.stop().unwrap();
    assert_hbone_only(&packets, &marker);
    let pods = [IpAddr::V6(client.ip6), IpAddr::V6(server.ip6)];
    for p in &packets {
        assert!(
            pods.contains(&p.src) && pods.contains(&p.dst),
            "not between the pods' IPv6 addresses: {} -> {}",
            p.src,
            p.dst
        );
    }
    assert!(
        packets
            .iter()
            .any(|p| p.is_syn() && p.dst == IpAddr::V6(server.ip6) && p.dst_port == 15008),
        "no IPv6 HBONE connection opened"
    );
    let log = mesh.cluster.log("http-server6");
    assert!(
        log.contains(&format!("{} - -", client.ip6)),
        "http server log does not show the client pod's IPv6 address:\n{log}"
    );

    let labels = [
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", &spiffe("shop", "client-sa")[..]),
        ("destination_principal", &spiffe("shop", "server-sa")[..]),
        ("reporter", "destination"),
    ];
    let dst = mesh.metrics(1).unwrap();
    assert!(metric_sum(&dst, OPENED, &labels) >= 2.0, "{dst}");
}

/// Same node over IPv6: through the ztunnel in mTLS with the client's
/// IPv6 address kept; an ALLOW policy with an IPv6 ipBlock lets in exactly
/// the addresses it names (not the same pod over IPv4, not another pod).
#[test]
fn e2e_ipv6_same_node_mtls_and_ip_block_policy() {
    let mut mesh = Mesh::new(1, &["shop"]).expect("mesh");
    let a = mesh.add_pod(0, "shop", "a", "a-sa").unwrap();
    let b = mesh.add_pod(0, "shop", "b", "b-sa").unwrap();
    let server = mesh.add_pod(0, "shop", "server", "server-sa").unwrap();
    mesh.wait_enrolled(0, &server, true).unwrap();
    serve_dual(&mut mesh, &server, 7000);
    let target6 = at6(&server, 7000);
    let target4 = format!("{}:7000", server.ip);

    let v = mesh.connect(&a, &target6);
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(seen(&v), Some(IpAddr::V6(a.ip6)), "{v}");
    let m = mesh.metrics(0).unwrap();
    let mtls = [
        ("connection_security_policy", "mutual_tls"),
        ("source_principal", &spiffe("shop", "a-sa")[..]),
        ("destination_principal", &spiffe("shop", "server-sa")[..]),
        ("reporter", "destination"),
    ];
    assert!(metric_sum(&m, OPENED, &mtls) >= 1.0, "{m}");

    // Only a's IPv6 address may connect.
    mesh.model.policies.push(AuthorizationPolicy {
        name: "allow-a6".into(),
        namespace: "shop".into(),
        selector: Some([("app".to_owned(), "server".to_owned())].into()),
        action: PolicyAction::Allow,
        rules: vec![Rule {
            from: vec![Source {
                ip_blocks: vec![format!("{}/128", a.ip6)],
                ..Default::default()
            }],
            to: vec![],
        }],
        targets: vec![],
    });
    mesh.write_model().unwrap();
    wait_until(Duration::from_secs(10), || {
        (mesh.connect(&b, &target6)["ok"] == false).then_some(())
    })
    .expect("b's IPv6 address is outside the ipBlock");
    let v = mesh.connect(&a, &target6);
    assert_eq!(v["ok"], true, "a over IPv6 is allowed: {v}");
    assert_eq!(seen(&v), Some(IpAddr::V6(a.ip6)), "{v}");
    let v = mesh.connect(&a, &target4);
    assert_eq!(v["ok"], false, "a over IPv4 is not in the IPv6 block: {v}");
    let m = mesh.metrics(0).unwrap();
    assert!(
        metric_sum(
            &m,
            "weft_authorization_denials_total",
            &[("policy", "no-matching-allow")]
        ) >= 2.0,
        "{m}"
    );

    // A /64 covering the node's pod CIDR admits b too.
    mesh.model.policies[0].rules[0].from[0].ip_blocks = vec![format!(
        "{}/{}",
        mesh.cluster.node(0).pod_cidr6.0,
        mesh.cluster.node(0).pod_cidr6.1
    )];
    mesh.write_model().unwrap();
    let v = mesh.connect(&b, &target6);
    assert_eq!(v["ok"], true, "b inside the /64: {v}");
    assert_eq!(seen(&v), Some(IpAddr::V6(b.ip6)), "{v}");
}

/// Through a waypoint over IPv6: a request to a dual-stack Service's IPv6
/// VIP reaches the waypoint on its IPv6 address (HBONE), which routes it.
#[test]
fn e2e_ipv6_through_a_waypoint() {
    let mut mesh = Mesh::with_controller(2, &["shop"]).expect("mesh with controller");
    let client = mesh.add_pod(0, "shop", "client", "client").unwrap();
    let web = mesh.add_pod(1, "shop", "web", "web").unwrap();
    mesh.wait_enrolled(0, &client, true).unwrap();
    mesh.wait_enrolled(1, &web, true).unwrap();
    mesh.serve_httpapp(&web, 8080, None).unwrap();
    mesh.add_service_selecting("shop", "web", &[("app", "web")], &[(80, 8080)])
        .unwrap();
    let vip6 = mesh.cluster.vip6(9);
    mesh.model
        .services
        .iter_mut()
        .find(|s| s.name == "web")
        .unwrap()
        .vips
        .push(IpAddr::V6(vip6));
    mesh.write_model().unwrap();
    let wp = mesh.add_waypoint(1, "shop", "wp").unwrap();
    mesh.use_waypoint("shop", "web", Some("wp")).unwrap();
    let cap = Capture::start(&mesh.cluster, "tcp").unwrap();
    let out = mesh
        .curl(
            &client,
            &[
                "-g",
                "-D",
                "-",
                "-o",
                "/dev/null",
                &format!("http://[{vip6}]/"),
            ],
        )
        .unwrap();
    let head = String::from_utf8_lossy(&out.stdout).to_lowercase();
    assert!(
        out.status.success()
            && head.starts_with("http/1.1 200")
            && head.contains("x-app-name: web"),
        "GET over IPv6 via the waypoint: {head} {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        mesh.ztunnel_log(0)
    );
    let packets = cap.stop().unwrap();
    assert!(
        packets
            .iter()
            .any(|p| p.is_syn() && p.dst == IpAddr::V6(wp.ip6) && p.dst_port == 15008),
        "the client's ztunnel dialled the waypoint over IPv6"
    );
    let m = mesh.waypoint_metrics("wp").unwrap();
    assert!(
        metric_sum(
            &m,
            "weft_requests_total",
            &[("source_principal", &spiffe("shop", "client")[..])]
        ) >= 1.0,
        "the waypoint handled the request as the client's: {m}"
    );
}
