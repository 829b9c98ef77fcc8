//! `cargo xtask demo`: a two-node Weft mesh out of network namespaces on
//! this machine. Sample apps talk through it; the summary shows which
//! connections were mutual TLS and between which identities. Everything is
//! removed at the end.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use weft_api::model::{
    AuthorizationPolicy, BackendRef, Destination, HeaderModifier, HttpBackend, HttpFilter,
    HttpRoute, HttpRouteRule, ParentRef, PolicyAction, PolicyTarget, Rule,
};
use weft_e2e::cluster::Capture as PacketCapture;
use weft_e2e::mesh::{bin_path, Mesh};

fn main() {
    if let Err(e) = run() {
        eprintln!("weft demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn step(s: &str) {
    println!("\n==> {s}");
}

fn run() -> Result<()> {
    step("building a 2-node cluster of network namespaces: weft-controller (fed by a folder of Kubernetes manifests) and a weft-ztunnel on each node");
    let mut mesh = Mesh::with_controller(2, &["shop"])?;
    for n in mesh.cluster.nodes() {
        println!("    {} at {}", n.name, n.ip);
    }

    step("creating pods (enrolled through the weft-cni plugin, as a container runtime would)");
    let frontend = mesh.add_pod(0, "shop", "frontend", "frontend")?;
    let cart = mesh.add_pod(1, "shop", "cart", "cart")?;
    let legacy = mesh.add_pod(0, "legacy", "batch-job", "default")?;
    mesh.wait_enrolled(0, &frontend, true)?;
    mesh.wait_enrolled(1, &cart, true)?;
    for p in [&frontend, &cart, &legacy] {
        println!("    {:<18} node{}  {}", p.key(), p.node + 1, p.ip);
    }
    let vip = mesh.add_service("shop", "cart", "cart", &[(80, 8080)])?;
    println!("    service shop/cart  {vip}:80 -> cart:8080");

    let www = mesh.cluster.run_dir().join("www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("index.html"), "hello from the cart service\n")?;
    let mut http = cart.command("python3");
    http.args(["-u", "-m", "http.server", "8080", "--directory"])
        .arg(&www);
    mesh.cluster.spawn("cart-http", http)?;
    mesh.cluster
        .wait_for_log("cart-http", "Serving HTTP", Duration::from_secs(10))?;

    step("frontend (node1) -> http://cart (node2): an unmodified curl, watched on the node-to-node link");
    let wire = PacketCapture::start(&mesh.cluster, "tcp")?;
    for _ in 0..3 {
        let out = frontend
            .command("curl")
            .args(["-sS", "--max-time", "5", &format!("http://{vip}/")])
            .output()?;
        if !out.status.success() {
            bail!("curl failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        print!("    curl: {}", String::from_utf8_lossy(&out.stdout));
    }
    let packets = wire.stop()?;
    let on_port = |port: u16| {
        packets
            .iter()
            .filter(|p| p.src_port == port || p.dst_port == port)
            .count()
    };
    let on_hbone = on_port(15008);
    let control = on_port(weft_e2e::mesh::CONTROLLER_GRPC_PORT);
    let plaintext = packets
        .iter()
        .filter(|p| p.payload.windows(10).any(|w| w == b"hello from"))
        .count();
    println!(
        "    on the wire between nodes: {} TCP packets: {} HBONE (mTLS, port 15008), {} config stream (port {}), {} other; {} carrying the page in plaintext",
        packets.len(),
        on_hbone,
        control,
        weft_e2e::mesh::CONTROLLER_GRPC_PORT,
        packets.len() - on_hbone - control,
        plaintext
    );
    if plaintext > 0 || packets.len() != on_hbone + control {
        bail!("traffic left the node outside HBONE");
    }
    let log = mesh.cluster.log("cart-http");
    if let Some(line) = log.lines().find(|l| l.contains("GET /")) {
        println!("    cart's server log (client address is the frontend pod): {line}");
    }

    step("batch-job (not in the mesh) -> cart: plaintext, accepted by cart's ztunnel (PERMISSIVE)");
    let out = legacy
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://{}:8080/", cart.ip),
        ])
        .output()?;
    print!("    curl: {}", String::from_utf8_lossy(&out.stdout));

    std::thread::sleep(Duration::from_millis(300));
    step("what the ztunnels saw (weft_tcp_connections_opened_total)");
    println!(
        "    {:<11} {:<44} {:<40} {:<10} {:>5}",
        "reporter", "source", "destination", "security", "conns"
    );
    for node in 0..2 {
        let text = mesh.metrics(node).context("reading metrics")?;
        for line in text
            .lines()
            .filter(|l| l.starts_with("weft_tcp_connections_opened_total{"))
        {
            let label = |k: &str| -> String {
                line.split(&format!("{k}=\""))
                    .nth(1)
                    .and_then(|r| r.split('"').next())
                    .unwrap_or("")
                    .to_owned()
            };
            let or = |s: String, alt: String| if s.is_empty() { alt } else { s };
            let src = or(
                label("source_principal"),
                format!("{} (no identity)", label("source_workload")),
            );
            let src = if src == " (no identity)" {
                "non-mesh client".into()
            } else {
                src
            };
            let count = line.rsplit(' ').next().unwrap_or("0");
            println!(
                "    {:<11} {:<44} {:<40} {:<10} {:>5}",
                label("reporter"),
                src,
                label("destination_principal"),
                label("connection_security_policy"),
                count
            );
        }
    }

    step("weftctl status, run on each node");
    for node in 0..2 {
        let out = mesh
            .cluster
            .node(node)
            .command_os(bin_path("weftctl"))
            .arg("status")
            .output()?;
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            println!("    {line}");
        }
    }
    step("L7: a waypoint for shop/cart (Gateway of class weft-waypoint, Service labelled weft.dev/use-waypoint), an HTTPRoute adding a response header, and an L7 DENY on /admin*");
    mesh.add_waypoint(1, "shop", "wp")?;
    mesh.use_waypoint("shop", "cart", Some("wp"))?;
    mesh.model.http_routes.push(HttpRoute {
        name: "cart".into(),
        namespace: "shop".into(),
        created: "2026-01-01T00:00:00Z".into(),
        parents: vec![ParentRef {
            name: "cart".into(),
            ..Default::default()
        }],
        hostnames: vec![],
        rules: vec![HttpRouteRule {
            filters: vec![HttpFilter::ResponseHeaderModifier(HeaderModifier {
                set: vec![("x-served-by".into(), "weft-waypoint".into())],
                ..Default::default()
            })],
            backends: vec![HttpBackend {
                backend: BackendRef {
                    name: "cart".into(),
                    namespace: String::new(),
                    port: 80,
                },
                weight: 1,
                filters: vec![],
            }],
            ..Default::default()
        }],
    });
    mesh.model.policies.push(AuthorizationPolicy {
        name: "no-admin".into(),
        namespace: "shop".into(),
        selector: None,
        action: PolicyAction::Deny,
        rules: vec![Rule {
            from: vec![],
            to: vec![Destination {
                paths: vec!["/admin*".into()],
                ..Default::default()
            }],
        }],
        targets: vec![PolicyTarget {
            kind: Default::default(),
            name: "cart".into(),
        }],
    });
    mesh.write_model()?;
    for (path, want) in [
        ("/", "200 x-served-by=weft-waypoint"),
        ("/admin/users", "403 "),
    ] {
        let out = frontend
            .command("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} x-served-by=%header{x-served-by}",
                &format!("http://{vip}{path}"),
            ])
            .output()?;
        let got = String::from_utf8_lossy(&out.stdout).into_owned();
        println!("    GET {path:<13} -> {got}");
        if !got.starts_with(want) {
            bail!("expected {want:?} for {path} through the waypoint, got {got:?}");
        }
    }
    let direct = frontend
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            &format!("http://{}:8080/", cart.ip),
        ])
        .output()?;
    if direct.status.success() {
        bail!("a client skipping the waypoint was answered");
    }
    println!("    frontend -> cart's pod directly, skipping the waypoint: refused by cart's ztunnel (waypoint-required)");
    let m = mesh.waypoint_metrics("wp")?;
    for line in m.lines().filter(|l| l.starts_with("weft_requests_total{")) {
        let label = |k: &str| -> String {
            line.split(&format!("{k}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap_or("")
                .to_owned()
        };
        println!(
            "    waypoint: {} {} from {} -> {}: {}",
            label("request_method"),
            label("response_code"),
            label("source_principal"),
            label("destination_service"),
            line.rsplit(' ').next().unwrap_or("0")
        );
    }

    step("cleaning up");
    drop(mesh);
    println!("    done: namespaces, cgroups and eBPF programs removed");
    Ok(())
}
