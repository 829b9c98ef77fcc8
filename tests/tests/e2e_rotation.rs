//! Root rotation under live traffic, end to end, with the controller in
//! embedded mode (no API server can run here: a folder of manifests stands
//! in for it, through the same code) and real processes throughout.
//!
//! The ztunnels and the waypoint trust the controller through a CA file
//! the test plays kubelet for: it names only the old root until after the
//! old root is retired (a ConfigMap volume can lag that long), so every
//! reconnection in between verifies the controller under what the
//! controller itself sent (or the cross-signed chain of the overlap).
//! Needs root; fails loudly without it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use weft_e2e::cluster::Pod;
use weft_e2e::mesh::{bin_path, metric_sum, wait_until, Mesh};

const NS: &str = "shop";
/// Workload certificates live a minute (renewed at half life); the old
/// root stays trusted 90 s after the rotation (at least one lifetime).
const CERT_TTL: &str = "60s";
const OVERLAP: &str = "90s";

/// Outcomes of one kind of request in the new-connection loop.
#[derive(Default)]
struct Lane {
    attempts: u32,
    failures: Vec<String>,
}

type Lanes = Arc<Mutex<Vec<(&'static str, Lane)>>>;

fn record(lanes: &Lanes, name: &'static str, failure: Option<String>) {
    let mut l = lanes.lock().unwrap();
    let lane = match l.iter_mut().position(|(n, _)| *n == name) {
        Some(i) => &mut l[i].1,
        None => {
            l.push((name, Lane::default()));
            &mut l.last_mut().unwrap().1
        }
    };
    lane.attempts += 1;
    if let Some(f) = failure {
        lane.failures.push(f);
    }
}

/// `weft-testapp <args>` in `pod`; the failure, if any.
fn testapp(pod: &Pod, args: &[&str]) -> Option<String> {
    let out = match pod.command_os(bin_path("weft-testapp")).args(args).output() {
        Ok(o) => o,
        Err(e) => return Some(format!("spawn: {e}")),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    (v["ok"] != true).then(|| format!("{args:?}: {v} {}", String::from_utf8_lossy(&out.stderr)))
}

/// An HTTP GET from `pod`; the failure, if any.
fn get(pod: &Pod, url: &str) -> Option<String> {
    let out = pod
        .command("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(url)
        .output();
    match out {
        Ok(o) if o.status.success() && o.stdout == b"200" => None,
        Ok(o) => Some(format!(
            "GET {url}: {} {}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )),
        Err(e) => Some(format!("spawn curl: {e}")),
    }
}

/// How many times a process's log says it subscribed to the controller.
fn subscriptions(log: &str) -> usize {
    log.matches("subscribed to the controller").count()
}

/// Waits until every running ztunnel and the waypoint subscribed once more
/// than `before` (same processes: their logs go on).
fn wait_all_resubscribed(mesh: &Mesh, before: &[usize], what: &str) -> Vec<usize> {
    let now = |mesh: &Mesh| -> Vec<usize> {
        let mut v: Vec<usize> = (0..3)
            .map(|n| subscriptions(&mesh.ztunnel_log(n)))
            .collect();
        v.push(subscriptions(&mesh.waypoint_log("wp")));
        v
    };
    wait_until(Duration::from_secs(30), || {
        let n = now(mesh);
        n.iter().zip(before).all(|(a, b)| a > b).then_some(n)
    })
    .unwrap_or_else(|e| {
        panic!(
            "{what}: not every ztunnel and the waypoint reconnected ({e:#}): subscriptions {:?} (before {before:?})\nztunnel 1: {}\nwaypoint: {}",
            now(mesh),
            tail(&mesh.ztunnel_log(0)),
            tail(&mesh.waypoint_log("wp"))
        )
    })
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}

/// Roots each ztunnel trusts (its `/config_dump`).
fn trusted_roots(mesh: &Mesh, node: usize) -> Option<u64> {
    mesh.config_dump(node).ok()?["trust_roots"].as_u64()
}

/// With long-lived connections (echo-checked holders, direct and through a
/// waypoint) and a loop of new connections, HTTP requests and checksummed
/// transfers across nodes: the root rotates, the controller restarts
/// during the overlap, workload certificates move to the new root, the old
/// root is retired, the controller restarts again and then one ztunnel.
/// Nothing fails, and every ztunnel and the waypoint running before the
/// rotation reconnects to the restarted controller without a restart of
/// its own.
#[test]
fn e2e_rotation_under_traffic_with_restarts_drops_nothing() {
    let started = Instant::now();
    let mut mesh = Mesh::with_controller(3, &[NS]).expect("mesh with controller");
    // Short lifetimes, and a CA file the test updates (see the module).
    let root_file = mesh.controller_root().unwrap();
    let ca_dir = root_file.parent().unwrap().to_owned();
    let published = mesh.cluster.run_dir().join("published-root.pem");
    std::fs::copy(&root_file, &published).unwrap();
    let old_root = std::fs::read_to_string(&root_file).unwrap();
    mesh.controller_args = ["--cert-ttl", CERT_TTL, "--root-overlap", OVERLAP]
        .map(String::from)
        .to_vec();
    mesh.controller_ca_file = Some(published.clone());
    for node in 0..3 {
        mesh.stop_ztunnel(node).unwrap();
    }
    mesh.stop_controller().unwrap();
    mesh.start_controller().unwrap();
    for node in 0..3 {
        mesh.start_ztunnel(node).unwrap();
    }

    let client = mesh.add_pod(0, NS, "client", "client").unwrap();
    // `echo` is dialled directly; `server` and `web` only through the
    // waypoint.
    let echo = mesh.add_pod(1, NS, "echo", "echo").unwrap();
    let server = mesh.add_pod(1, NS, "server", "server").unwrap();
    let web = mesh.add_pod(1, NS, "web", "web").unwrap();
    let far = mesh.add_pod(2, NS, "far", "far").unwrap();
    for (node, pod) in [(0, &client), (1, &echo), (1, &server), (1, &web), (2, &far)] {
        mesh.wait_enrolled(node, pod, true).unwrap();
    }
    mesh.serve_testapp(&echo, 7000).unwrap();
    mesh.serve_testapp(&server, 7000).unwrap();
    mesh.serve_httpapp(&web, 8080, None).unwrap();
    let tcp_vip = mesh
        .add_service_selecting(NS, "server", &[("app", "server")], &[(80, 7000)])
        .unwrap();
    let web_vip = mesh
        .add_service_selecting(NS, "web", &[("app", "web")], &[(80, 8080)])
        .unwrap();
    mesh.add_waypoint(0, NS, "wp").unwrap();
    mesh.use_waypoint(NS, "server", Some("wp")).unwrap();
    mesh.use_waypoint(NS, "web", Some("wp")).unwrap();
    let direct = format!("{}:7000", echo.ip);
    let via_waypoint = format!("{tcp_vip}:80");
    let web_url = format!("http://{web_vip}/");
    for (pod, target) in [
        (&client, &direct),
        (&client, &via_waypoint),
        (&far, &direct),
    ] {
        assert_eq!(testapp(pod, &["connect", "--connect", target]), None);
    }
    assert_eq!(get(&client, &web_url), None);

    // Long-lived connections from node 1 (whose ztunnel keeps running):
    // each echoes a random line every 100 ms, 1,300 times (a little over
    // two minutes: past the retirement and both controller restarts).
    let rounds = "1300";
    for (name, target) in [("hold-direct", &direct), ("hold-waypoint", &via_waypoint)] {
        let mut hold = client.command_os(bin_path("weft-testapp"));
        hold.args([
            "hold",
            "--connect",
            target,
            "--conns",
            "4",
            "--rounds",
            rounds,
        ])
        .args(["--interval-ms", "100", "--timeout", "30"]);
        mesh.cluster.spawn(name, hold).unwrap();
    }

    // The new-connection loop, in the background until `stop`.
    let lanes: Lanes = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    // Off while node 3's ztunnel restarts (its pod has no proxy then).
    let far_paused = Arc::new(AtomicBool::new(false));
    // Set by the traffic loop once it has seen the pause (no connect from
    // node 3 in flight any more).
    let far_idle = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (lanes, stop, far_paused, far_idle) = (
            lanes.clone(),
            stop.clone(),
            far_paused.clone(),
            far_idle.clone(),
        );
        let (client, far) = (client.clone(), far.clone());
        let (direct, via_waypoint, web_url) =
            (direct.clone(), via_waypoint.clone(), web_url.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            let mut i = 0u32;
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                let connect = |pod: &Pod, target: &str| {
                    testapp(pod, &["connect", "--connect", target, "--timeout", "5"])
                };
                record(&lanes, "connect direct", connect(&client, &direct));
                record(
                    &lanes,
                    "connect via waypoint",
                    connect(&client, &via_waypoint),
                );
                record(&lanes, "HTTP via waypoint", get(&client, &web_url));
                if far_paused.load(Ordering::SeqCst) {
                    far_idle.store(true, Ordering::SeqCst);
                } else {
                    far_idle.store(false, Ordering::SeqCst);
                    record(&lanes, "connect from node 3", connect(&far, &direct));
                }
                if i.is_multiple_of(8) {
                    let send = [
                        "send",
                        "--connect",
                        &direct,
                        "--bytes",
                        "1048576",
                        "--timeout",
                        "20",
                    ];
                    record(&lanes, "checksummed 1 MiB", testapp(&client, &send));
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(150));
            }
        })
    };
    std::thread::sleep(Duration::from_secs(3));

    // Rotate.
    let mut subs = wait_all_resubscribed(&mesh, &[0, 0, 0, 0], "before the rotation");
    std::fs::write(ca_dir.join("rotate-root"), "").unwrap();
    wait_until(Duration::from_secs(20), || {
        let now = std::fs::read_to_string(&root_file).ok()?;
        (now != old_root && ca_dir.join("previous-roots.pem").exists()).then_some(())
    })
    .expect("the controller rotates the root");
    let rotated = Instant::now();
    // Every proxy moves its certificates to the new root at once.
    wait_until(Duration::from_secs(20), || {
        let moved = (0..3).all(|n| mesh.ztunnel_log(n).contains("new signing root"))
            && mesh.waypoint_log("wp").contains("new signing root");
        moved.then_some(())
    })
    .unwrap_or_else(|e| panic!("certificates did not move to the new root: {e:#}"));
    for node in 0..3 {
        assert_eq!(
            trusted_roots(&mesh, node),
            Some(2),
            "node {node} in the overlap"
        );
    }

    // Restart the controller during the overlap.
    std::thread::sleep(Duration::from_secs(5));
    mesh.stop_controller().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    mesh.start_controller().unwrap();
    subs = wait_all_resubscribed(&mesh, &subs, "controller restarted in the overlap");

    // Retirement, `OVERLAP` after the rotation.
    wait_until(Duration::from_secs(120), || {
        (!ca_dir.join("previous-roots.pem").exists()).then_some(())
    })
    .expect("the old root is retired");
    let overlap = rotated.elapsed();
    wait_until(Duration::from_secs(20), || {
        (0..3)
            .all(|n| trusted_roots(&mesh, n) == Some(1))
            .then_some(())
    })
    .expect("every ztunnel trusts the new root alone");
    std::thread::sleep(Duration::from_secs(3));

    // Restart the controller again: it now serves a chain of the new root
    // alone, which the CA file (still the old root) cannot verify.
    mesh.stop_controller().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    mesh.start_controller().unwrap();
    wait_all_resubscribed(&mesh, &subs, "controller restarted after the retirement");
    std::thread::sleep(Duration::from_secs(3));

    // The CA file catches up (kubelet), and one ztunnel restarts: a fresh
    // start under the new root alone.
    std::fs::copy(&root_file, &published).unwrap();
    far_paused.store(true, Ordering::SeqCst);
    wait_until(Duration::from_secs(30), || {
        far_idle.load(Ordering::SeqCst).then_some(())
    })
    .expect("the traffic loop pauses node 3's connects");
    mesh.stop_ztunnel(2).unwrap();
    mesh.start_ztunnel(2).unwrap();
    mesh.wait_enrolled(2, &far, true).unwrap();
    far_paused.store(false, Ordering::SeqCst);
    std::thread::sleep(Duration::from_secs(5));

    stop.store(true, Ordering::SeqCst);
    traffic.join().unwrap();
    for name in ["hold-direct", "hold-waypoint"] {
        let status = wait_until(Duration::from_secs(120), || mesh.cluster.exit_status(name))
            .unwrap_or_else(|e| panic!("{name} did not finish its rounds: {e:#}"));
        let log = mesh.cluster.log(name);
        assert!(
            status.success() && log.contains("\"ok\":true"),
            "{name}: {log}"
        );
        eprintln!("{name}: {}", log.trim());
    }

    let lanes = lanes.lock().unwrap();
    let summary: Vec<String> = lanes
        .iter()
        .map(|(n, l)| format!("{n}: {} ({} failed)", l.attempts, l.failures.len()))
        .collect();
    eprintln!(
        "rotation under traffic: {}; overlap {:.0} s; whole test {:.0} s",
        summary.join(", "),
        overlap.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let failures: Vec<&String> = lanes.iter().flat_map(|(_, l)| &l.failures).collect();
    assert!(failures.is_empty(), "{}: {failures:#?}", summary.join(", "));
    assert!(
        lanes.iter().all(|(_, l)| l.attempts >= 20),
        "too little traffic: {}",
        summary.join(", ")
    );
    for node in 0..3 {
        let m = mesh.metrics(node).unwrap();
        for metric in [
            "weft_connection_failures_total",
            "weft_tls_handshake_failures_total",
        ] {
            assert_eq!(
                metric_sum(&m, metric, &[]),
                0.0,
                "node {node}: {metric}\n{m}"
            );
        }
    }
    let wp = mesh.waypoint_metrics("wp").unwrap();
    assert_eq!(
        metric_sum(&wp, "weft_tls_handshake_failures_total", &[]),
        0.0,
        "{wp}"
    );
    assert!(mesh.cluster.exit_status("waypoint-shop-wp").is_none());
    // No proxy ever failed to verify the controller.
    for (what, log) in (0..3)
        .map(|n| (format!("ztunnel {}", n + 1), mesh.ztunnel_log(n)))
        .chain([("waypoint".to_owned(), mesh.waypoint_log("wp"))])
    {
        assert!(!log.contains("unknown issuer"), "{what}:\n{}", tail(&log));
    }
}
