//! The shared data-plane runtime end to end, with the controller in
//! embedded mode (no API server can run here: a folder of manifests stands
//! in for it, through the same reconcile code): workload certificates
//! renewed in the background under traffic, and a new mesh root reaching
//! the server TLS of running ztunnels and waypoints. Needs root; fails
//! loudly without it.

use std::time::{Duration, Instant};

use weft_e2e::cluster::Pod;
use weft_e2e::mesh::{bin_path, metric_sum, wait_until, Mesh};

fn spiffe(ns: &str, sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
}

/// Seconds of the day of every "certificate issued" line of the
/// controller's log for `identity`.
fn issued_at(log: &str, identity: &str) -> Vec<f64> {
    let field = format!("identity={identity}");
    log.lines()
        .filter(|l| l.contains("certificate issued"))
        .filter(|l| l.split_whitespace().any(|w| w == field))
        .filter_map(|l| {
            // 2026-12-01T22:10:11.123456Z ...
            let time = l.split_whitespace().next()?.split('T').nth(1)?;
            let mut hms = time.trim_end_matches('Z').split(':');
            let h: f64 = hms.next()?.parse().ok()?;
            let m: f64 = hms.next()?.parse().ok()?;
            let s: f64 = hms.next()?.parse().ok()?;
            Some(h * 3600.0 + m * 60.0 + s)
        })
        .collect()
}

/// A fresh HBONE connection (its own TLS handshake) from `from` to
/// `to:15008`, CONNECT `target`, with a client certificate signed by the
/// controller's current root; the server must prove `expect`.
fn probe(mesh: &Mesh, from: &Pod, to: &str, target: &str, expect: &str) -> serde_json::Value {
    let ca = mesh.controller_root().expect("controller mode");
    let ca_dir = ca.parent().expect("CA directory");
    let out = from
        .command_os(bin_path("weft-hbone-probe"))
        .args([
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
        .arg(ca_dir)
        .output()
        .expect("run weft-hbone-probe");
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("probe said: {}", String::from_utf8_lossy(&out.stderr)))
}

/// With 20 s workload certificates, every ztunnel renews in the background
/// (at half the remaining life) while traffic runs: at least three renewals
/// per identity, never two requests at once for one identity (the burst of
/// first connections shares one CSR), fresh handshakes verify the renewed
/// certificates, and no connection fails.
#[test]
fn e2e_runtime_certificates_renew_in_the_background_under_traffic() {
    let mut mesh = Mesh::with_controller(2, &["shop"]).expect("mesh with controller");
    mesh.ztunnel_args = vec!["--cert-ttl".into(), "20s".into()];
    for node in 0..2 {
        mesh.stop_ztunnel(node).unwrap();
        mesh.start_ztunnel(node).unwrap();
    }
    let outsider = mesh.add_pod(0, "legacy", "outsider", "default").unwrap();
    let client = mesh.add_pod(0, "shop", "client", "client").unwrap();
    let server = mesh.add_pod(1, "shop", "server", "server").unwrap();
    mesh.wait_enrolled(0, &client, true).unwrap();
    mesh.wait_enrolled(1, &server, true).unwrap();
    mesh.serve_testapp(&server, 7000).unwrap();
    let target = format!("{}:7000", server.ip);

    // A burst of first connections.
    let burst: Vec<serde_json::Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|_| s.spawn(|| mesh.connect(&client, &target)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for v in &burst {
        assert_eq!(v["ok"], true, "{v}");
    }

    mesh.spawn_holder("holder", &client, &target, 4, 400)
        .unwrap();
    let start = Instant::now();
    let (mut connections, mut handshakes, mut failed) = (0, 0, Vec::new());
    while start.elapsed() < Duration::from_secs(42) {
        let v = mesh.connect(&client, &target);
        connections += 1;
        if v["ok"] != true {
            failed.push(v);
        }
        let v = probe(
            &mesh,
            &outsider,
            &server.ip.to_string(),
            &target,
            &spiffe("shop", "server"),
        );
        handshakes += 1;
        if v["ok"] != true {
            failed.push(v);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        failed.is_empty(),
        "{} of {connections} connections and {handshakes} handshakes failed: {failed:?}",
        failed.len()
    );
    let status = wait_until(Duration::from_secs(10), || {
        mesh.cluster.exit_status("holder")
    })
    .expect("the long-lived connections end");
    assert!(status.success(), "{}", mesh.cluster.log("holder"));

    let log = mesh.controller_log();
    for sa in ["client", "server"] {
        let times = issued_at(&log, &spiffe("shop", sa));
        assert!(
            times.len() >= 4,
            "{sa}: first certificate and at least 3 renewals, got {times:?}"
        );
        for pair in times.windows(2) {
            assert!(
                pair[1] - pair[0] > 5.0,
                "{sa}: two requests {:.3} s apart (one CSR at a time per identity): {times:?}",
                pair[1] - pair[0]
            );
        }
    }
    for node in 0..2 {
        let m = mesh.metrics(node).unwrap();
        assert_eq!(
            metric_sum(&m, "weft_connection_failures_total", &[]),
            0.0,
            "{m}"
        );
        assert_eq!(
            metric_sum(&m, "weft_tls_handshake_failures_total", &[]),
            0.0,
            "{m}"
        );
    }
}

/// A root added while everything runs (the controller rotates: new signer,
/// old root still trusted) reaches the server TLS of the running ztunnel
/// and waypoint: a client whose certificate chains only to the new root is
/// accepted by both, without restarting either.
#[test]
fn e2e_runtime_a_new_root_reaches_ztunnel_and_waypoint_server_tls() {
    let mut mesh = Mesh::with_controller(2, &["shop"]).expect("mesh with controller");
    let outsider = mesh.add_pod(0, "legacy", "outsider", "default").unwrap();
    // `direct` is reached without a waypoint; `server` only through one.
    let direct_pod = mesh.add_pod(1, "shop", "direct", "direct").unwrap();
    let server = mesh.add_pod(1, "shop", "server", "server").unwrap();
    mesh.wait_enrolled(1, &direct_pod, true).unwrap();
    mesh.wait_enrolled(1, &server, true).unwrap();
    mesh.serve_testapp(&direct_pod, 7000).unwrap();
    mesh.serve_testapp(&server, 7000).unwrap();
    let vip = mesh
        .add_service_selecting("shop", "server", &[("app", "server")], &[(80, 7000)])
        .unwrap();
    let waypoint = mesh.add_waypoint(0, "shop", "wp").unwrap();
    mesh.use_waypoint("shop", "server", Some("wp")).unwrap();
    let direct = format!("{}:7000", direct_pod.ip);
    let via_waypoint = format!("{vip}:80");

    let root = mesh.controller_root().unwrap();
    let old_root = std::fs::read_to_string(&root).unwrap();
    let ca_dir = root.parent().unwrap().to_owned();
    std::fs::write(ca_dir.join("rotate-root"), "").unwrap();
    wait_until(Duration::from_secs(20), || {
        let now = std::fs::read_to_string(&root).ok()?;
        (now != old_root && ca_dir.join("previous-roots.pem").exists()).then_some(())
    })
    .expect("the controller rotates the root");
    // The client's certificate is signed by the new root only.
    let mut last = serde_json::Value::Null;
    let direct_ip = direct_pod.ip.to_string();
    wait_until(Duration::from_secs(15), || {
        last = probe(
            &mesh,
            &outsider,
            &direct_ip,
            &direct,
            &spiffe("shop", "direct"),
        );
        (last["ok"] == true).then_some(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "the ztunnel never accepted a certificate of the new root: {e:#}: {last}\n{}",
            mesh.ztunnel_log(1)
        )
    });
    let waypoint_ip = waypoint.ip.to_string();
    wait_until(Duration::from_secs(15), || {
        last = probe(
            &mesh,
            &outsider,
            &waypoint_ip,
            &via_waypoint,
            &spiffe("shop", "wp"),
        );
        (last["ok"] == true).then_some(())
    })
    .unwrap_or_else(|e| {
        panic!(
            "the waypoint never accepted a certificate of the new root: {e:#}: {last}\n{}",
            mesh.waypoint_log("wp")
        )
    });
    assert!(
        mesh.cluster.exit_status("waypoint-shop-wp").is_none(),
        "the waypoint kept running"
    );
    let dump = mesh.config_dump(1).unwrap();
    assert_eq!(dump["trust_roots"], 2, "{dump}");
}

/// Drain at SIGTERM, and its deadline: a ztunnel told to stop lets open
/// connections run on for `--drain-timeout`; a connection that ends within
/// it finishes every round, one still open at the deadline is closed then
/// (the client sees it end), and each is logged with the count.
#[test]
fn e2e_runtime_drain_deadline_closes_what_is_still_open_and_logs_it() {
    let mut mesh = Mesh::new(2, &["shop"]).expect("mesh");
    mesh.ztunnel_args = vec!["--drain-timeout".into(), "3s".into()];
    mesh.stop_ztunnel(1).unwrap();
    mesh.start_ztunnel(1).unwrap();
    let client = mesh.add_pod(0, "shop", "client", "client").unwrap();
    let server = mesh.add_pod(1, "shop", "server", "server").unwrap();
    mesh.wait_enrolled(0, &client, true).unwrap();
    mesh.wait_enrolled(1, &server, true).unwrap();
    mesh.serve_testapp(&server, 7000).unwrap();
    let target = format!("{}:7000", server.ip);
    let mut hold = |name: &str, rounds: &str| {
        let mut cmd = client.command_os(bin_path("weft-testapp"));
        cmd.args(["hold", "--connect", &target, "--conns", "2"])
            .args([
                "--rounds",
                rounds,
                "--interval-ms",
                "100",
                "--timeout",
                "30",
            ]);
        mesh.cluster.spawn(name, cmd).unwrap();
    };
    // 1 s of rounds (ends within the deadline) and 20 s (outlasts it).
    hold("short", "10");
    hold("long", "200");
    std::thread::sleep(Duration::from_millis(300));

    let name = mesh.ztunnel_name(1).expect("ztunnel 2 running").to_owned();
    let started = Instant::now();
    mesh.stop_ztunnel(1).unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(2500),
        "the ztunnel waited for the drain deadline: {took:?}"
    );

    let short = wait_until(Duration::from_secs(20), || {
        mesh.cluster.exit_status("short")
    })
    .expect("the short holder finished");
    let log = mesh.cluster.log("short");
    assert!(
        short.success() && log.contains("\"ok\":true"),
        "connections that end within the drain finish: {log}"
    );
    let long = wait_until(Duration::from_secs(20), || mesh.cluster.exit_status("long"))
        .expect("the long holder saw its connections end at the deadline");
    let long_log = mesh.cluster.log("long");
    assert!(
        !long.success() && long_log.contains("\"ok_conns\":0"),
        "connections still open at the deadline are closed: {long_log}"
    );
    let zlog = mesh.cluster.log(&name);
    let closed = zlog
        .lines()
        .filter(|l| l.contains("drain deadline reached: closing a connection still open"))
        .count();
    assert_eq!(closed, 2, "one line per connection closed:\n{zlog}");
    assert!(
        zlog.lines().any(|l| l
            .contains("drain deadline reached: closed the connections still open")
            && l.contains("closed=2")),
        "the count is logged:\n{zlog}"
    );
}

/// The outcome of one lane of the new-connection loop: attempts, failures.
type Lane = (u32, Vec<String>);

/// A ztunnel upgrade the way the DaemonSet rolls one (surge: the new
/// ztunnel starts beside the old one, takes its pods' sockets over, then
/// the old one gets SIGTERM), on both nodes in turn, under 200 long-lived
/// echo-checked connections (100 each way) and a loop of new connections
/// and checksummed 256 KiB transfers in both directions. No connection is
/// reset, no connect fails, every echoed line and checksum matches, and
/// each old ztunnel ends with nothing left open.
#[test]
fn e2e_runtime_ztunnel_upgrade_resets_nothing() {
    let mut mesh = Mesh::new(2, &["shop"]).expect("mesh");
    mesh.ztunnel_args = vec!["--drain-timeout".into(), "90s".into()];
    for node in 0..2 {
        mesh.stop_ztunnel(node).unwrap();
        mesh.start_ztunnel(node).unwrap();
    }
    let a = mesh.add_pod(0, "shop", "a", "a").unwrap();
    let b = mesh.add_pod(1, "shop", "b", "b").unwrap();
    mesh.wait_enrolled(0, &a, true).unwrap();
    mesh.wait_enrolled(1, &b, true).unwrap();
    mesh.serve_testapp(&a, 7000).unwrap();
    mesh.serve_testapp(&b, 7000).unwrap();
    let to_a = format!("{}:7000", a.ip);
    let to_b = format!("{}:7000", b.ip);
    for (pod, target) in [(&a, &to_b), (&b, &to_a)] {
        assert_eq!(mesh.connect(pod, target)["ok"], true);
    }

    // A hand-over that does not complete leaves the running ztunnel as it
    // was: garbage on the socket, and a successor that asks and goes away
    // after the first pod's sockets.
    let handover = mesh.ztunnel_state_dir(0).join("handover.sock");
    for first in [&b"not json"[..], br#"{"msg":"take","version":"test"}"#] {
        use socket2::{Domain, SockAddr, Socket, Type};
        let s = Socket::new(Domain::UNIX, Type::from(libc::SOCK_SEQPACKET), None).unwrap();
        s.connect(&SockAddr::unix(&handover).unwrap()).unwrap();
        s.send(first).unwrap();
        if first.starts_with(b"{") {
            let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
            s.recv(&mut buf).expect("the first pod's message");
        }
    }
    wait_until(Duration::from_secs(10), || {
        let log = mesh.ztunnel_log(0);
        (log.matches("hand-over to a new ztunnel failed; this one carries on")
            .count()
            == 2)
            .then_some(())
    })
    .unwrap_or_else(|e| panic!("{e:#}: {}", mesh.ztunnel_log(0)));
    for (pod, target) in [(&a, &to_b), (&b, &to_a)] {
        assert_eq!(
            mesh.connect(pod, target)["ok"],
            true,
            "after failed hand-overs"
        );
    }

    // 100 connections each way, a line every 100 ms for 45 s: across both
    // replacements and into the old ztunnels' drains.
    for (name, pod, target) in [("hold-ab", &a, &to_b), ("hold-ba", &b, &to_a)] {
        let mut hold = pod.command_os(bin_path("weft-testapp"));
        hold.args(["hold", "--connect", target, "--conns", "100"])
            .args(["--rounds", "450", "--interval-ms", "100", "--timeout", "30"]);
        mesh.cluster.spawn(name, hold).unwrap();
    }

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let stop = stop.clone();
        let (a, b, to_a, to_b) = (a.clone(), b.clone(), to_a.clone(), to_b.clone());
        std::thread::spawn(move || {
            let run = |pod: &Pod, args: &[&str]| -> Option<String> {
                let out = pod.command_os(bin_path("weft-testapp")).args(args).output();
                match out {
                    Ok(o) if String::from_utf8_lossy(&o.stdout).contains("\"ok\":true") => None,
                    Ok(o) => Some(format!(
                        "{args:?}: {} {}",
                        String::from_utf8_lossy(&o.stdout).trim(),
                        String::from_utf8_lossy(&o.stderr).trim()
                    )),
                    Err(e) => Some(format!("spawn: {e}")),
                }
            };
            let mut lanes: Vec<(&str, Lane)> = Vec::new();
            let mut record = |lane: &'static str, failure: Option<String>| {
                let i = match lanes.iter().position(|(n, _)| *n == lane) {
                    Some(i) => i,
                    None => {
                        lanes.push((lane, (0, Vec::new())));
                        lanes.len() - 1
                    }
                };
                lanes[i].1 .0 += 1;
                lanes[i].1 .1.extend(failure);
            };
            let deadline = Instant::now() + Duration::from_secs(150);
            let mut i = 0u32;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) && Instant::now() < deadline {
                for (lane, pod, target) in
                    [("connect a->b", &a, &to_b), ("connect b->a", &b, &to_a)]
                {
                    record(
                        lane,
                        run(pod, &["connect", "--connect", target, "--timeout", "5"]),
                    );
                }
                if i.is_multiple_of(4) {
                    for (lane, pod, target) in [("send a->b", &a, &to_b), ("send b->a", &b, &to_a)]
                    {
                        let args = [
                            "send",
                            "--connect",
                            target,
                            "--bytes",
                            "262144",
                            "--timeout",
                            "10",
                        ];
                        record(lane, run(pod, &args));
                    }
                }
                i += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            lanes
        })
    };

    std::thread::sleep(Duration::from_secs(3));
    let mut old = Vec::new();
    for node in 0..2 {
        let started = Instant::now();
        old.push(mesh.upgrade_ztunnel(node).expect("upgrade"));
        eprintln!(
            "node {}: the new ztunnel took over in {:.2} s",
            node + 1,
            started.elapsed().as_secs_f64()
        );
        std::thread::sleep(Duration::from_secs(4));
    }
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let lanes = traffic.join().unwrap();

    for name in ["hold-ab", "hold-ba"] {
        let status = wait_until(Duration::from_secs(90), || mesh.cluster.exit_status(name))
            .unwrap_or_else(|e| panic!("{name} did not finish its rounds: {e:#}"));
        let log = mesh.cluster.log(name);
        assert!(
            status.success() && log.contains("\"ok\":true") && log.contains("\"ok_conns\":100"),
            "{name}: every long-lived connection survives both replacements: {log}"
        );
        eprintln!("{name}: {}", log.trim());
    }
    let summary: Vec<String> = lanes
        .iter()
        .map(|(n, (attempts, f))| format!("{n}: {attempts} ({} failed)", f.len()))
        .collect();
    eprintln!(
        "new connections across the upgrades: {}",
        summary.join(", ")
    );
    let failures: Vec<&String> = lanes.iter().flat_map(|(_, (_, f))| f).collect();
    assert!(failures.is_empty(), "{}: {failures:#?}", summary.join(", "));
    assert!(
        lanes.len() == 4 && lanes.iter().all(|(_, (n, _))| *n >= 10),
        "too little traffic: {}",
        summary.join(", ")
    );

    // Each old ztunnel finished its connections and went, nothing cut.
    for (node, name) in old.iter().enumerate() {
        let status = wait_until(Duration::from_secs(60), || mesh.cluster.exit_status(name))
            .unwrap_or_else(|e| panic!("the old ztunnel of node {} did not exit: {e:#}", node + 1));
        let log = mesh.cluster.log(name);
        assert!(status.success(), "old ztunnel {name}: {status:?}\n{log}");
        assert!(
            log.contains("a new ztunnel took over this node's pods")
                && log.contains("shutting down; the new ztunnel has the pods")
                && log.contains("still_open=0"),
            "old ztunnel {name} handed over and drained:\n{log}"
        );
        assert!(!log.contains("drain deadline reached"), "{log}");
    }
    // The new ones carry the traffic now, without a failure.
    for node in 0..2 {
        let m = mesh.metrics(node).unwrap();
        assert_eq!(
            metric_sum(&m, "weft_connection_failures_total", &[]),
            0.0,
            "node {}: {m}",
            node + 1
        );
        assert!(
            metric_sum(&m, "weft_tcp_connections_opened_total", &[]) > 0.0,
            "node {}'s new ztunnel served connections",
            node + 1
        );
        let log = mesh.ztunnel_log(node);
        assert!(
            log.contains("received the running ztunnel's sockets"),
            "{log}"
        );
    }
    // Still captured: a fresh connection goes through the new ztunnel in mTLS.
    mesh.assert_mtls_from(&a, &to_b, "spiffe://cluster.local/ns/shop/sa/a");
}
