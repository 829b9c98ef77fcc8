//! Operating a live mesh: a real Prometheus (Debian's `prometheus`, run by
//! this test inside node 1's network namespace) scrapes every ztunnel, the
//! waypoint and the controller while real traffic runs (curl through the
//! waypoint, TCP connections, a request L7 policy denies, a dial an L4
//! DENY refuses); `promtool check metrics` passes on every `/metrics`;
//! every query of every dashboard panel in `charts/weft/dashboards/`
//! answers a non-empty result; and `weftctl check` (a real kube::Client
//! against the fake API server of `testsupport/`, since no API server can
//! run here, plus the real controller and ztunnels) passes on the healthy
//! mesh and names each fault with its hint. Needs root; fails loudly
//! without it.
//!
//! With `WEFT_DASHBOARD_PICTURES=<dir>` the test also renders each
//! dashboard's panels from Prometheus range queries into `<dir>/<name>.svg`
//! (the README's pictures: no Grafana runs here).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weft_api::model::{
    AuthorizationPolicy, Destination, ParentKind, PolicyAction, PolicyTarget, Rule,
};
use weft_e2e::mesh::{bin_path, wait_until, Mesh};
use weft_e2e::Pod;
use weft_testsupport::fake_api::{self as fake, FakeApi};

const NS: &str = "shop";
const PROM_PORT: u16 = 19090;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A TCP listener on `ip` made inside the network namespace at `netns`.
fn listen_in(netns: &Path, ip: Ipv4Addr) -> TcpListener {
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        let target = std::fs::File::open(&netns).expect("open netns");
        // SAFETY: setns on this short-lived thread only; it ends right after.
        let r = unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
        TcpListener::bind((ip, 0)).expect("bind in netns")
    })
    .join()
    .expect("listener thread")
}

fn ready_pod(ns: &str, name: &str, node: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "app", "image": "app"}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
                   "conditions": [{"type": "Ready", "status": "True"}]},
    })
}

fn crd(name: &str, version: &str) -> Value {
    json!({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
           "metadata": {"name": name}, "spec": {"versions": [{"name": version, "served": true, "storage": true}]}})
}

const CRDS: &[(&str, &str)] = &[
    ("authorizationpolicies.weft.dev", "v1alpha1"),
    ("peerauthentications.weft.dev", "v1alpha1"),
    ("trafficpolicies.weft.dev", "v1alpha1"),
    ("gateways.gateway.networking.k8s.io", "v1"),
    ("httproutes.gateway.networking.k8s.io", "v1"),
    ("grpcroutes.gateway.networking.k8s.io", "v1"),
];

/// The cluster's objects as an API server would list them for this mesh.
fn populate(api: &FakeApi, mesh: &Mesh) {
    api.apply(
        fake::NAMESPACES,
        fake::namespace(
            "weft-system",
            json!({"kubernetes.io/metadata.name": "weft-system"}),
        ),
    );
    for n in &mesh.model.namespaces {
        let mut labels = serde_json::to_value(&n.labels).unwrap();
        labels["kubernetes.io/metadata.name"] = json!(n.name);
        api.apply(fake::NAMESPACES, fake::namespace(&n.name, labels));
    }
    for n in mesh.cluster.nodes() {
        api.apply(fake::NODES, json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": n.name},
            "status": {"conditions": [{"type": "Ready", "status": "True"}], "addresses": [{"type": "InternalIP", "address": n.ip.to_string()}]}}));
        api.apply(
            fake::PODS,
            ready_pod(
                "weft-system",
                &format!("weft-ztunnel-{}", n.name),
                &n.name,
                &n.ip.to_string(),
                json!({"app.kubernetes.io/name": "weft-ztunnel"}),
            ),
        );
    }
    let n1 = mesh.cluster.node(0);
    api.apply(
        fake::PODS,
        ready_pod(
            "weft-system",
            "weft-controller-0",
            &n1.name,
            &n1.ip.to_string(),
            json!({"app.kubernetes.io/name": "weft-controller"}),
        ),
    );
    for w in &mesh.model.workloads {
        let mut p = ready_pod(
            &w.namespace,
            &w.name,
            &w.node,
            &w.ips[0].to_string(),
            serde_json::to_value(&w.labels).unwrap(),
        );
        p["spec"]["serviceAccountName"] = json!(w.service_account);
        api.apply(fake::PODS, p);
    }
    api.apply(
        fake::LEASES,
        json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
        "metadata": {"name": "weft-controller-leader", "namespace": "weft-system"},
        "spec": {"holderIdentity": "weft-controller-0", "leaseDurationSeconds": 15}}),
    );
    let root = std::fs::read_to_string(mesh.controller_root().unwrap()).unwrap();
    api.apply(fake::CONFIG_MAPS, json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "weft-ca-root-cert", "namespace": "weft-system"}, "data": {"root-cert.pem": root}}));
    for (name, v) in CRDS {
        api.apply(fake::CRDS, crd(name, v));
    }
    let mut gw = fake::waypoint_gateway(NS, "wp");
    gw["status"] =
        json!({"conditions": [{"type": "Programmed", "status": "True", "reason": "Programmed"}]});
    api.apply(fake::GATEWAYS, gw);
}

/// `weftctl <args> -o json` inside node 1: (exit code, report).
fn weftctl(mesh: &Mesh, kubeconfig: &Path, args: &[&str]) -> (i32, Value) {
    let out = mesh
        .cluster
        .node(0)
        .command_os(bin_path("weftctl"))
        .args(args)
        .args(["-o", "json", "--kubeconfig"])
        .arg(kubeconfig)
        .output()
        .expect("run weftctl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "weftctl {args:?} printed no JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

/// The check whose name contains `name` with `status`, or a panic showing
/// the report.
fn find<'a>(report: &'a Value, status: &str, name: &str, detail: &str) -> &'a Value {
    report["groups"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["checks"].as_array().into_iter().flatten())
        .find(|c| {
            c["status"] == status
                && c["name"].as_str().is_some_and(|n| n.contains(name))
                && c["detail"].as_str().unwrap_or("").contains(detail)
        })
        .unwrap_or_else(|| {
            panic!(
                "no {status} check {name:?} with {detail:?} in:\n{}",
                serde_json::to_string_pretty(report).unwrap()
            )
        })
}

fn curl_codes(mesh: &Mesh, pod: &Pod, url: &str, n: usize) -> Vec<String> {
    let mut args: Vec<&str> = vec!["-s", "-w", "%{http_code}\\n", "--max-time", "60"];
    for _ in 0..n {
        args.extend(["-o", "/dev/null", url]);
    }
    let out = mesh.curl(pod, &args).expect("run curl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Prometheus's HTTP API, asked from inside node 1.
fn prom(mesh: &Mesh, path: &str, params: &[(&str, String)]) -> Value {
    try_prom(mesh, path, params).unwrap_or_else(|e| panic!("asking Prometheus {path}: {e:#}"))
}

fn try_prom(mesh: &Mesh, path: &str, params: &[(&str, String)]) -> anyhow::Result<Value> {
    let mut args: Vec<String> = vec!["-sS".into(), "--max-time".into(), "10".into(), "-G".into()];
    for (k, v) in params {
        args.push("--data-urlencode".into());
        args.push(format!("{k}={v}"));
    }
    args.push(format!("http://127.0.0.1:{PROM_PORT}{path}"));
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let text = mesh.node_exec(0, "curl", &refs)?;
    serde_json::from_str::<Value>(&text)
        .map_err(|e| anyhow::anyhow!("Prometheus answered no JSON ({e}): {text}"))
}

fn dashboards() -> Vec<(String, Value)> {
    let dir = repo().join("charts/weft/dashboards");
    let mut out: Vec<(String, Value)> = std::fs::read_dir(&dir)
        .expect("dashboards folder")
        .filter_map(Result::ok)
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap();
            (
                e.path().file_stem().unwrap().to_string_lossy().into_owned(),
                serde_json::from_str(&text).unwrap(),
            )
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// One round of traffic: HTTP through the waypoint (OK, 503, denied by L7
/// policy), TCP connections to db, and a dial to db's pod on a port an L4
/// DENY names, which its ztunnel refuses.
fn traffic(mesh: &Mesh, client: &Pod, web_vip: Ipv4Addr, db_vip: Ipv4Addr, db: &Pod) {
    let ok = curl_codes(mesh, client, &format!("http://{web_vip}/who"), 20);
    assert!(ok.iter().all(|c| c == "200"), "{ok:?}");
    let errors = curl_codes(mesh, client, &format!("http://{web_vip}/status/503"), 2);
    assert!(errors.iter().all(|c| c == "503"), "{errors:?}");
    let denied = curl_codes(mesh, client, &format!("http://{web_vip}/admin"), 2);
    assert!(denied.iter().all(|c| c == "403"), "{denied:?}");
    for _ in 0..3 {
        let r = mesh.connect(client, &format!("{db_vip}:5432"));
        assert_eq!(r["ok"], true, "{r}");
    }
    let r = mesh.connect(client, &format!("{}:5433", db.ip));
    assert_ne!(r["ok"], true, "the L4 DENY of db:5433 must refuse: {r}");
}

/// Polylines of every series of a range query, one colour each.
fn svg_panel(title: &str, series: &[(String, Vec<(f64, f64)>)], x0: f64, y0: f64) -> String {
    const W: f64 = 380.0;
    const H: f64 = 150.0;
    const COLOURS: [&str; 6] = [
        "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
    ];
    let pts: Vec<&(f64, f64)> = series.iter().flat_map(|(_, p)| p.iter()).collect();
    let (tmin, tmax) = pts.iter().fold((f64::MAX, f64::MIN), |(a, b), (t, _)| {
        (a.min(*t), b.max(*t))
    });
    let vmax = pts
        .iter()
        .map(|(_, v)| *v)
        .fold(0.0f64, f64::max)
        .max(f64::MIN_POSITIVE);
    let span = (tmax - tmin).max(0.0);
    let mut out = format!(
        "<g transform=\"translate({x0},{y0})\"><rect width=\"{W}\" height=\"{}\" fill=\"#fafafa\" stroke=\"#ccc\"/><text x=\"6\" y=\"16\" font-size=\"12\" font-weight=\"bold\">{}</text><text x=\"6\" y=\"29\" font-size=\"9\" fill=\"#666\">0 to {} over {span:.0} s</text>",
        H + 72.0,
        xml(title),
        short(vmax)
    );
    for (i, (label, p)) in series.iter().take(6).enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let line: Vec<String> = p
            .iter()
            .map(|(t, v)| {
                let x = 6.0 + (t - tmin) / (tmax - tmin).max(1.0) * (W - 12.0);
                let y = 34.0 + H - v / vmax * (H - 8.0);
                format!("{x:.1},{y:.1}")
            })
            .collect();
        out += &format!(
            "<polyline fill=\"none\" stroke=\"{c}\" stroke-width=\"1.5\" points=\"{}\"/>",
            line.join(" ")
        );
        out += &format!(
            "<text x=\"{}\" y=\"{}\" font-size=\"9\" fill=\"{c}\">{}</text>",
            6 + (i % 2) * 190,
            H as usize + 48 + (i / 2) * 11,
            xml(&label.chars().take(40).collect::<String>())
        );
    }
    out + "</g>"
}

fn short(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.4}")
    }
}

fn xml(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn legend(metric: &Value, format: &str) -> String {
    let mut s = format.to_owned();
    if let Some(m) = metric.as_object() {
        for (k, v) in m {
            s = s.replace(&format!("{{{{{k}}}}}"), v.as_str().unwrap_or(""));
        }
    }
    s
}

fn render_pictures(mesh: &Mesh, dir: &Path, start: f64, end: f64) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, d) in dashboards() {
        let panels = d["panels"].as_array().unwrap();
        let rows = panels.len().div_ceil(2);
        let mut body = String::new();
        for (i, p) in panels.iter().enumerate() {
            let mut series = Vec::new();
            for t in p["targets"].as_array().unwrap() {
                let r = prom(
                    mesh,
                    "/api/v1/query_range",
                    &[
                        ("query", t["expr"].as_str().unwrap().to_owned()),
                        ("start", format!("{start}")),
                        ("end", format!("{end}")),
                        ("step", "1".into()),
                    ],
                );
                for s in r["data"]["result"].as_array().into_iter().flatten() {
                    let pts: Vec<(f64, f64)> = s["values"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|v| {
                            let val: f64 = v[1].as_str()?.parse().ok()?;
                            val.is_finite().then_some((v[0].as_f64()?, val))
                        })
                        .collect();
                    series.push((
                        legend(&s["metric"], t["legendFormat"].as_str().unwrap_or("")),
                        pts,
                    ));
                }
            }
            body += &svg_panel(
                p["title"].as_str().unwrap_or(""),
                &series,
                10.0 + (i % 2) as f64 * 390.0,
                34.0 + (i / 2) as f64 * 232.0,
            );
        }
        let svg = format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"790\" height=\"{}\" font-family=\"sans-serif\"><text x=\"10\" y=\"20\" font-size=\"15\" font-weight=\"bold\">{}</text><text x=\"780\" y=\"20\" font-size=\"9\" fill=\"#666\" text-anchor=\"end\">each panel's queries, from Prometheus, drawn by tests/tests/e2e_operate.rs</text>{body}</svg>\n",
            44 + rows * 232, xml(d["title"].as_str().unwrap_or(&name))
        );
        std::fs::write(dir.join(format!("{name}.svg")), svg).unwrap();
    }
}

/// A config subscriber for `node` that NACKs the first update it gets (as a
/// ztunnel of another release would, whose checks reject what this
/// controller sends), over the real gRPC stream from inside node 1, and
/// holds the stream open until `stop` is dropped. Returns the NACKed
/// version.
fn nacking_subscriber(
    mesh: &Mesh,
    node: &str,
    stop: std::sync::mpsc::Receiver<()>,
) -> std::sync::mpsc::Receiver<u64> {
    use weft_api::proto::mesh_config_client::MeshConfigClient;
    use weft_api::proto::SubscribeRequest;
    let netns = mesh.cluster.node(0).netns_path.clone();
    let url = format!("https://{}:15010", mesh.cluster.node(0).ip);
    let root = std::fs::read_to_string(mesh.controller_root().unwrap()).unwrap();
    let token =
        std::fs::read_to_string(mesh.cluster.run_dir().join(format!("{node}.token"))).unwrap();
    let node = node.to_owned();
    let (done, version) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let target = std::fs::File::open(&netns).expect("open netns");
        // SAFETY: setns on this thread only; its sockets are then made in node 1.
        assert_eq!(
            unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) },
            0
        );
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(root))
                .domain_name("weft-controller");
            let channel = tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .connect()
                .await
                .expect("connect to the controller");
            let (tx, rx) = tokio::sync::mpsc::channel::<SubscribeRequest>(4);
            tx.send(SubscribeRequest::hello(&node, None)).await.unwrap();
            let outbound =
                futures::stream::unfold(
                    rx,
                    |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
                );
            let mut req = tonic::Request::new(outbound);
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {}", token.trim()).parse().unwrap(),
            );
            let mut inbound = MeshConfigClient::new(channel)
                .subscribe(req)
                .await
                .expect("subscribe")
                .into_inner();
            let update = inbound
                .message()
                .await
                .expect("an update")
                .expect("an update");
            tx.send(SubscribeRequest::nack(
                update.version,
                "workload shop/db: field `ipFamilies` is not known to this ztunnel",
            ))
            .await
            .unwrap();
            done.send(update.version).unwrap();
            // Hold the stream until the test is done with it.
            let _ = tokio::task::spawn_blocking(move || stop.recv_timeout(Duration::from_secs(60)))
                .await;
        });
    });
    version
}

#[test]
fn e2e_operate_prometheus_dashboards_and_weftctl_check() {
    let mut mesh = Mesh::with_controller(2, &[NS]).expect("mesh with controller");
    let client = mesh.add_pod(0, NS, "client", "client").unwrap();
    let web = mesh.add_pod(1, NS, "web", "web").unwrap();
    mesh.serve_httpapp(&web, 8080, None).unwrap();
    let db = mesh.add_pod(1, NS, "db", "db").unwrap();
    mesh.serve_testapp(&db, 5432).unwrap();
    let waypoint = mesh.add_waypoint(1, NS, "wp").unwrap();
    let web_vip = mesh.add_service(NS, "web", "web", &[(80, 8080)]).unwrap();
    let db_vip = mesh.add_service(NS, "db", "db", &[(5432, 5432)]).unwrap();
    mesh.use_waypoint(NS, "web", Some("wp")).unwrap();
    mesh.model.policies.push(AuthorizationPolicy {
        name: "no-admin".into(),
        namespace: NS.into(),
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
            kind: ParentKind::Service,
            name: "web".into(),
        }],
    });
    // L4, enforced by db's ztunnel (the dashboards' L4 denial panels).
    mesh.model.policies.push(AuthorizationPolicy {
        name: "db-not-5433".into(),
        namespace: NS.into(),
        selector: Some([("app".to_owned(), "db".to_owned())].into_iter().collect()),
        action: PolicyAction::Deny,
        rules: vec![Rule {
            from: vec![],
            to: vec![Destination {
                ports: vec![5433],
                ..Default::default()
            }],
        }],
        targets: vec![],
    });
    mesh.write_model().unwrap();
    mesh.wait_enrolled(0, &client, true).unwrap();

    // Every /metrics endpoint passes promtool's lint.
    let n1 = mesh.cluster.node(0).ip;
    let n2 = mesh.cluster.node(1).ip;
    let targets: Vec<(&str, SocketAddr)> = vec![
        ("weft-ztunnel", SocketAddr::from((n1, 15020))),
        ("weft-ztunnel", SocketAddr::from((n2, 15020))),
        ("weft-waypoint", SocketAddr::from((waypoint.ip, 15020))),
        ("weft-controller", SocketAddr::from((n1, 15014))),
    ];
    traffic(&mesh, &client, web_vip, db_vip, &db);
    for (_, addr) in &targets {
        let out = mesh
            .cluster
            .node(0)
            .command("sh")
            .args([
                "-c",
                &format!("curl -sS --max-time 5 http://{addr}/metrics | promtool check metrics"),
            ])
            .output()
            .expect("run promtool (Debian package prometheus; `cargo xtask setup` installs it)");
        assert!(
            out.status.success(),
            "promtool check metrics on {addr}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    // Prometheus scrapes everything every second while traffic runs.
    let dir = mesh.cluster.run_dir().join("prometheus");
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let mut jobs: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for (job, addr) in &targets {
        jobs.entry(job).or_default().push(addr.to_string());
    }
    let scrape: Vec<Value> = jobs
        .iter()
        .map(|(j, t)| json!({"job_name": j, "static_configs": [{"targets": t}]}))
        .collect();
    let config = json!({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [repo().join("charts/weft/files/alerts.yaml")],
        "scrape_configs": scrape,
    });
    std::fs::write(
        dir.join("prometheus.yml"),
        serde_yaml::to_string(&config).unwrap(),
    )
    .unwrap();
    let mut cmd = mesh.cluster.node(0).command("prometheus");
    cmd.arg(format!(
        "--config.file={}",
        dir.join("prometheus.yml").display()
    ))
    .arg(format!(
        "--storage.tsdb.path={}",
        dir.join("data").display()
    ))
    .arg(format!("--web.listen-address=127.0.0.1:{PROM_PORT}"))
    .stdout(Stdio::null());
    mesh.cluster
        .spawn("prometheus", cmd)
        .expect("start prometheus (Debian package prometheus; `cargo xtask setup` installs it)");
    wait_until(Duration::from_secs(30), || {
        let v = try_prom(&mesh, "/api/v1/targets", &[]).ok()?;
        let active = v["data"]["activeTargets"].as_array()?;
        (active.len() == targets.len() && active.iter().all(|t| t["health"] == "up")).then_some(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "Prometheus did not scrape every target: {e}\n{}",
            prom(&mesh, "/api/v1/targets", &[])
        )
    });
    let start = Instant::now();
    let t0 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    // Longer when drawing the README's pictures.
    let pictures = std::env::var_os("WEFT_DASHBOARD_PICTURES");
    let rounds = if pictures.is_some() { 40 } else { 8 };
    for round in 0..rounds {
        traffic(&mesh, &client, web_vip, db_vip, &db);
        if round == 3 {
            // A model change mid-run: pushes and ACKs for the latency panels.
            mesh.add_service(NS, "extra", "db", &[(5433, 5432)])
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    assert!(
        start.elapsed() < Duration::from_secs(90),
        "traffic rounds took {:?}",
        start.elapsed()
    );
    std::thread::sleep(Duration::from_secs(3));

    // Every panel's every query answers something.
    let mut failures = Vec::new();
    let mut queries = 0;
    for (name, d) in dashboards() {
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let expr = t["expr"].as_str().unwrap();
                queries += 1;
                let r = prom(&mesh, "/api/v1/query", &[("query", expr.to_owned())]);
                let empty = r["data"]["result"].as_array().is_none_or(|a| a.is_empty());
                if r["status"] != "success" || empty {
                    failures.push(format!("{name} / {}: {expr}\n  -> {r}", p["title"]));
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {queries} dashboard queries failed or were empty:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The rules file loads into a real Prometheus.
    let rules = prom(&mesh, "/api/v1/rules", &[]);
    assert_eq!(
        rules["data"]["groups"][0]["rules"].as_array().map(Vec::len),
        Some(7),
        "{rules}"
    );
    if let Some(out) = pictures {
        let t1 = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        render_pictures(&mesh, Path::new(&out), t0, t1);
    }

    // weftctl check against the fake API server, listening in node 1.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _enter = rt.enter();
    let api = FakeApi::start_on(
        listen_in(&mesh.cluster.node(0).netns_path, n1),
        &[
            fake::NAMESPACES,
            fake::NODES,
            fake::PODS,
            fake::LEASES,
            fake::CONFIG_MAPS,
            fake::CRDS,
            fake::NETWORK_POLICIES,
            fake::AUTHZ,
            fake::PEER_AUTHN,
            fake::TRAFFIC_POLICIES,
            fake::GATEWAYS,
        ],
    );
    populate(&api, &mesh);
    let kubeconfig = mesh.cluster.run_dir().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();

    let (code, r) = weftctl(&mesh, &kubeconfig, &["check"]);
    assert_eq!(
        (code, &r["errors"], &r["warnings"]),
        (0, &json!(0), &json!(0)),
        "healthy mesh:\n{}",
        serde_json::to_string_pretty(&r).unwrap()
    );
    find(&r, "ok", "node2: config version", "");
    find(&r, "ok", "node1: capture hooks attached", "");
    let (code, _) = weftctl(&mesh, &kubeconfig, &["check", "--strict"]);
    assert_eq!(code, 0);

    // A NetworkPolicy admitting the client on the app's port only.
    api.apply(fake::NETWORK_POLICIES, json!({"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "db-from-client", "namespace": NS},
        "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                 "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": 5432}]}]}}));
    let (code, r) = weftctl(&mesh, &kubeconfig, &["check"]);
    assert_eq!(code, 1);
    let c = find(
        &r,
        "error",
        "NetworkPolicy shop/db-from-client",
        "shop/client -> shop/db (admitted on 5432/TCP only)",
    );
    assert!(
        c["hint"]
            .as_str()
            .unwrap()
            .contains("{port: 15008, protocol: TCP}"),
        "{c}"
    );
    api.delete(fake::NETWORK_POLICIES, NS, "db-from-client");

    // A NACKed config: a subscriber for node 2 rejects its update.
    let (stop, stopped) = std::sync::mpsc::channel();
    let nacked = nacking_subscriber(&mesh, "node2", stopped)
        .recv_timeout(Duration::from_secs(10))
        .expect("the subscriber got an update");
    let r = wait_until(Duration::from_secs(10), || {
        let (code, r) = weftctl(&mesh, &kubeconfig, &["check"]);
        (code == 1).then_some(r)
    })
    .unwrap_or_else(|e| {
        let out = mesh
            .cluster
            .node(0)
            .command_os(bin_path("weftctl"))
            .args(["proxy-status", "--kubeconfig"])
            .arg(&kubeconfig)
            .output()
            .unwrap();
        panic!(
            "check did not fail on a NACK of version {nacked}: {e}\n{}{}\ncontroller:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            mesh.controller_log()
                .lines()
                .filter(|l| l.contains("NACK") || l.contains("rejected"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    let c = find(
        &r,
        "error",
        "node2: config stream",
        &format!("rejected config version {nacked}: workload shop/db: field `ipFamilies`"),
    );
    assert!(
        c["hint"].as_str().unwrap().contains("versions differ"),
        "{c}"
    );
    let out = mesh
        .cluster
        .node(0)
        .command_os(bin_path("weftctl"))
        .args(["proxy-status", "--kubeconfig"])
        .arg(&kubeconfig)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(&format!("NACKED v{nacked}")) && table.contains("SYNCED"),
        "{table}"
    );
    drop(stop);
    wait_until(Duration::from_secs(10), || {
        (weftctl(&mesh, &kubeconfig, &["check"]).0 == 0).then_some(())
    })
    .expect("check passes again once the NACKing subscriber is gone");

    // A missing CRD.
    api.delete(fake::CRDS, "", "trafficpolicies.weft.dev");
    let (code, r) = weftctl(&mesh, &kubeconfig, &["check"]);
    assert_eq!(code, 1);
    let c = find(&r, "error", "CRD trafficpolicies.weft.dev", "missing");
    assert!(
        c["hint"].as_str().unwrap().contains("charts/weft/crds/"),
        "{c}"
    );
    api.apply(fake::CRDS, crd("trafficpolicies.weft.dev", "v1alpha1"));

    // Workload certificates about to expire: node 2's ztunnel asks for 60 s
    // certificates (backdated 5 minutes, so under a quarter of their
    // lifetime is left from the start).
    mesh.stop_ztunnel(1).unwrap();
    mesh.ztunnel_args = vec!["--cert-ttl".into(), "60s".into()];
    mesh.start_ztunnel(1).unwrap();
    let r = wait_until(Duration::from_secs(20), || {
        let (_, r) = weftctl(&mesh, &kubeconfig, &["check"]);
        let groups = r["groups"].as_array()?;
        groups
            .iter()
            .flat_map(|g| g["checks"].as_array().into_iter().flatten())
            .any(|c| {
                c["status"] == "warning"
                    && c["name"].as_str().is_some_and(|n| {
                        n.starts_with("node2: certificate of spiffe://cluster.local/ns/shop/sa/db")
                    })
            })
            .then_some(r)
    })
    .expect("no warning about node2's expiring certificates");
    let c = find(
        &r,
        "warning",
        "node2: certificate of spiffe://cluster.local/ns/shop/sa/db",
        "expires in",
    );
    assert!(c["hint"].as_str().unwrap().contains("renewal"), "{c}");
    let (code, _) = weftctl(&mesh, &kubeconfig, &["check", "--strict"]);
    assert_eq!(code, 2, "warnings only, --strict");

    // One ztunnel down.
    mesh.stop_ztunnel(1).unwrap();
    let (code, r) = weftctl(&mesh, &kubeconfig, &["check"]);
    assert_eq!(code, 1);
    let c = find(&r, "error", "node2: ztunnel weft-ztunnel-node2", "down");
    assert!(c["hint"].as_str().unwrap().contains("fail closed"), "{c}");

    // bpffs not mounted where the node expects it (before install, on the
    // node itself).
    let not_bpffs = mesh.cluster.run_dir().join("not-bpffs");
    std::fs::create_dir_all(&not_bpffs).unwrap();
    let (code, r) = weftctl(
        &mesh,
        &kubeconfig,
        &[
            "check",
            "--pre",
            "--local",
            "--no-kube",
            "--bpf-dir",
            not_bpffs.to_str().unwrap(),
        ],
    );
    assert_eq!(code, 1);
    let c = find(&r, "error", "this node: bpffs", "is not on a bpffs");
    assert!(
        c["hint"]
            .as_str()
            .unwrap()
            .contains("mount -t bpf bpf /sys/fs/bpf"),
        "{c}"
    );
    // Before install, against the API: permissions are checked one by one.
    api.deny_access("create", "clusterroles");
    let (code, r) = weftctl(&mesh, &kubeconfig, &["check", "--pre"]);
    assert_eq!(code, 1);
    find(
        &r,
        "error",
        "can create clusterroles.rbac.authorization.k8s.io",
        "not allowed",
    );
    find(&r, "warning", "Weft", "already exist");

    explain_agrees_with_the_proxies(&mut mesh, &kubeconfig, &client, web_vip, db_vip, &web, &db);
}

/// (source, DST, port, method and path, what to send, expected decision,
/// the policy that must be named).
type Row<'a> = (
    &'a Pod,
    String,
    u16,
    Option<(&'a str, &'a str)>,
    Real,
    &'a str,
    Option<&'a str>,
);

/// What a row sends through the mesh.
enum Real {
    /// GET of this path on web's VIP, through the waypoint.
    Http(&'static str),
    /// A TCP connection to this address.
    Tcp(String),
}

/// `weftctl policy explain` against what the ztunnels and the waypoint do
/// for the same inputs, row by row, live (the controller's model) and
/// offline (the manifests folder the controller reads).
fn explain_agrees_with_the_proxies(
    mesh: &mut Mesh,
    kubeconfig: &Path,
    client: &Pod,
    web_vip: Ipv4Addr,
    db_vip: Ipv4Addr,
    web: &Pod,
    db: &Pod,
) {
    mesh.ztunnel_args.clear();
    mesh.start_ztunnel(1).unwrap();
    let other = mesh.add_pod(0, NS, "other", "other").unwrap();
    mesh.model.policies.push(AuthorizationPolicy {
        name: "db-from-client".into(),
        namespace: NS.into(),
        selector: Some([("app".to_owned(), "db".to_owned())].into_iter().collect()),
        action: PolicyAction::Allow,
        rules: vec![Rule {
            from: vec![weft_api::model::Source {
                principals: vec!["spiffe://cluster.local/ns/shop/sa/client".into()],
                ..Default::default()
            }],
            to: vec![],
        }],
        targets: vec![],
    });
    mesh.write_model().unwrap();
    mesh.wait_enrolled(0, &other, true).unwrap();
    let db_ip = db.ip.to_string();
    let rows: Vec<Row> = vec![
        (
            client,
            "shop/web".into(),
            80,
            Some(("GET", "/who")),
            Real::Http("/who"),
            "allow",
            None,
        ),
        (
            client,
            "shop/web".into(),
            80,
            Some(("GET", "/admin")),
            Real::Http("/admin"),
            "deny",
            Some("shop/no-admin"),
        ),
        (
            &other,
            "shop/web".into(),
            80,
            Some(("GET", "/admin/x")),
            Real::Http("/admin/x"),
            "deny",
            Some("shop/no-admin"),
        ),
        (
            &other,
            "shop/web".into(),
            80,
            Some(("GET", "/who")),
            Real::Http("/who"),
            "allow",
            None,
        ),
        (
            client,
            "shop/db".into(),
            5432,
            None,
            Real::Tcp(format!("{db_vip}:5432")),
            "allow",
            Some("shop/db-from-client"),
        ),
        (
            &other,
            "shop/db".into(),
            5432,
            None,
            Real::Tcp(format!("{db_vip}:5432")),
            "deny",
            None,
        ),
        (
            &other,
            db_ip.clone(),
            5432,
            None,
            Real::Tcp(format!("{db_ip}:5432")),
            "deny",
            None,
        ),
        // A mesh client dialling web's pod goes through the waypoint, where
        // web's DENY naming a path refuses a connection that is not HTTP.
        (
            client,
            "pod/shop/web".into(),
            8080,
            None,
            Real::Tcp(format!("{}:8080", web.ip)),
            "deny",
            Some("shop/no-admin"),
        ),
    ];
    let manifests = mesh.manifests_dir().unwrap().to_owned();
    for (src, dst, port, http, real, want, policy) in rows {
        let actual = match &real {
            Real::Http(path) => {
                let code = curl_codes(mesh, src, &format!("http://{web_vip}{path}"), 1);
                match code.first().map(String::as_str) {
                    Some("200") => "allow",
                    Some("403") => "deny",
                    other => panic!("{} GET {path}: unexpected answer {other:?}", src.key()),
                }
            }
            Real::Tcp(addr) => {
                if mesh.connect(src, addr)["ok"] == true {
                    "allow"
                } else {
                    "deny"
                }
            }
        };
        assert_eq!(
            actual,
            want,
            "the mesh itself: {} -> {dst}:{port} {http:?}",
            src.key()
        );
        for source in ["live", "offline"] {
            let mut cmd = mesh.cluster.node(0).command_os(bin_path("weftctl"));
            cmd.args([
                "policy",
                "explain",
                &src.key(),
                &dst,
                &port.to_string(),
                "-o",
                "json",
            ]);
            if let Some((m, p)) = http {
                cmd.args(["--method", m, "--path", p]);
            }
            if source == "live" {
                cmd.arg("--kubeconfig").arg(kubeconfig);
            } else {
                cmd.arg("--manifests").arg(&manifests);
            }
            let out = cmd.output().unwrap();
            let e: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|err| {
                panic!(
                    "explain printed no JSON ({err}): {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                )
            });
            assert_eq!(
                e["decision"],
                actual,
                "{source} explain of {} -> {dst}:{port} {http:?} disagrees with the mesh:\n{e:#}",
                src.key()
            );
            assert_eq!(
                out.status.code(),
                Some(if actual == "allow" { 0 } else { 1 })
            );
            if let Some(p) = policy {
                assert!(
                    e["steps"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .any(|s| s["policy"] == p),
                    "{source}: {p} not named:\n{e:#}"
                );
            }
        }
    }
}
