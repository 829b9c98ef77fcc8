//! Proves the simulated cluster itself: addressing, routing between pods on
//! the same and on different nodes, isolation from everything outside the
//! cluster, capture on the fabric, teardown, and slot separation. Every test
//! builds network namespaces, so every name starts with `netns_`.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weft_e2e::cluster::{invoke_cni, sweep_unlocked_slots, Capture, Cluster, CniError, Pod};

const TESTAPP: &str = env!("CARGO_BIN_EXE_weft-testapp");
const PORT: u16 = 8080;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the netns_ tests build network namespaces and need root: run `sudo -E cargo test -p weft-e2e`"
    );
}

fn cluster(nodes: usize) -> Cluster {
    require_root();
    match Cluster::new(nodes) {
        Ok(c) => c,
        Err(e) => panic!("cannot build the simulated cluster: {e:#}"),
    }
}

/// Starts `weft-testapp serve` in `pod` and waits until it listens.
fn serve(c: &mut Cluster, pod: &Pod) -> String {
    let name = format!("server-{}", pod.name);
    let mut cmd = pod.command(TESTAPP);
    cmd.args(["serve", "--port", &PORT.to_string(), "--lifetime", "120"]);
    c.spawn(&name, cmd).expect("spawn server");
    c.wait_for_log(&name, "listening on", Duration::from_secs(10))
        .expect("server listening");
    name
}

/// Runs the testapp in `pod` and parses its JSON line.
fn testapp(pod: &Pod, args: &[&str]) -> (bool, Value) {
    let out = pod
        .command(TESTAPP)
        .args(args)
        .output()
        .expect("run weft-testapp");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "weft-testapp {args:?} printed no JSON ({e}): {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), v)
}

fn addr(pod: &Pod) -> String {
    SocketAddr::from((pod.ip, PORT)).to_string()
}

fn seen_ip(v: &Value) -> Ipv4Addr {
    let s = v["peer_seen_by_server"]
        .as_str()
        .expect("peer_seen_by_server");
    s.parse::<SocketAddr>()
        .map(|a| a.ip())
        .ok()
        .and_then(|ip| match ip {
            std::net::IpAddr::V4(v4) => Some(v4),
            _ => None,
        })
        .unwrap_or_else(|| panic!("bad peer address {s}"))
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

#[test]
fn netns_pods_reach_each_other_on_same_and_other_node() {
    let mut c = cluster(2);
    let a = c.add_pod(0, "default", "a").unwrap();
    let b = c.add_pod(0, "default", "b").unwrap();
    let x = c.add_pod(1, "other", "x").unwrap();
    let y = c.add_pod(1, "other", "y").unwrap();

    // Addressing follows the slot plan.
    let o = 64 + c.slot() as u8;
    assert_eq!(c.node(0).ip, Ipv4Addr::new(10, o, 255, 1));
    assert_eq!(c.node(1).pod_cidr, (Ipv4Addr::new(10, o, 2, 0), 24));
    assert_eq!(a.ip.octets()[..3], [10, o, 1]);
    assert_eq!(x.ip.octets()[..3], [10, o, 2]);
    assert_eq!(c.vip(7), Ipv4Addr::new(10, o, 200, 7));
    assert_eq!(c.pods().len(), 4);

    // Pause processes live in the pod's cgroup and netns.
    for p in c.pods() {
        let procs = std::fs::read_to_string(p.cgroup.join("cgroup.procs")).unwrap();
        assert!(
            procs
                .split_whitespace()
                .any(|pid| pid == p.pause_pid.to_string()),
            "pause of {} not in its cgroup",
            p.key()
        );
        let ns = std::fs::read_link(format!("/proc/{}/ns/net", p.pause_pid)).unwrap();
        let mut probe = p.command("readlink");
        let probe = probe.arg("/proc/self/ns/net").output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&probe.stdout).trim(),
            ns.to_string_lossy()
        );
    }

    serve(&mut c, &b);
    serve(&mut c, &x);
    serve(&mut c, &y);

    // Same node: a -> b.
    let (ok, v) = testapp(&a, &["send", "--connect", &addr(&b), "--bytes", "300000"]);
    assert!(ok, "same-node send failed: {v}");
    assert_eq!(seen_ip(&v), a.ip, "server must see the client's pod IP");

    // Other node: a -> x, and back x -> b.
    let (ok, v) = testapp(&a, &["send", "--connect", &addr(&x), "--bytes", "1000000"]);
    assert!(ok, "cross-node send failed: {v}");
    assert_eq!(seen_ip(&v), a.ip);
    let (ok, v) = testapp(&x, &["who", "--connect", &addr(&b)]);
    assert!(ok, "cross-node who failed: {v}");
    assert_eq!(seen_ip(&v), x.ip);

    // Several long-lived connections at once, cross-node.
    let (ok, v) = testapp(
        &b,
        &[
            "hold",
            "--connect",
            &addr(&y),
            "--conns",
            "8",
            "--rounds",
            "5",
            "--timeout",
            "10",
        ],
    );
    assert!(ok, "hold failed: {v}");
    assert_eq!(v["ok_conns"], 8);

    // The node itself (kubelet probes) reaches its pods from the node IP.
    let out = c
        .node(0)
        .command(TESTAPP)
        .args(["who", "--connect", &addr(&b)])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).expect("who JSON from the node");
    assert_eq!(
        seen_ip(&v),
        c.node(0).ip,
        "node-to-pod traffic must come from the node IP: {v}"
    );

    // A removed pod is gone and unreachable; the others still work.
    c.remove_pod(&y).unwrap();
    assert!(!netns_exists(&y.netns));
    assert!(!y.cgroup.exists());
    assert!(!process_alive(y.pause_pid));
    let (_, v) = testapp(&a, &["connect", "--connect", &addr(&y), "--timeout", "3"]);
    assert_eq!(v["ok"], false, "removed pod still answers: {v}");
    let (ok, v) = testapp(&a, &["send", "--connect", &addr(&x), "--bytes", "1000"]);
    assert!(ok, "send after remove_pod failed: {v}");
    c.teardown().expect("clean teardown");
}

/// Every pod and node also has an IPv6 address (dual-stack): pods reach
/// each other over IPv6 on the same and on another node, the server sees
/// the client pod's IPv6 address, and the node reaches its pods from its
/// own IPv6 address.
#[test]
fn netns_pods_reach_each_other_over_ipv6() {
    let mut c = cluster(2);
    let a = c.add_pod(0, "default", "a").unwrap();
    let b = c.add_pod(0, "default", "b").unwrap();
    let x = c.add_pod(1, "other", "x").unwrap();
    let slot = c.slot() as u16;
    assert_eq!(
        c.node(1).ip6,
        Ipv6Addr::new(0xfd00, slot, 0xff, 0, 0, 0, 0, 2)
    );
    assert_eq!(
        c.node(1).pod_cidr6,
        (Ipv6Addr::new(0xfd00, slot, 2, 0, 0, 0, 0, 0), 64)
    );
    assert_eq!(x.ip6.segments()[..3], [0xfd00, slot, 2]);
    assert_eq!(x.ip6.segments()[7], u16::from(x.ip.octets()[3]));
    assert_eq!(c.vip6(7), Ipv6Addr::new(0xfd00, slot, 0xc8, 0, 0, 0, 0, 7));
    for pod in [&b, &x] {
        let name = format!("server6-{}", pod.name);
        let mut cmd = pod.command(TESTAPP);
        cmd.args([
            "serve",
            "--port",
            &PORT.to_string(),
            "--bind",
            "::",
            "--lifetime",
            "60",
        ]);
        c.spawn(&name, cmd).unwrap();
        c.wait_for_log(&name, "listening on", Duration::from_secs(10))
            .unwrap();
    }
    let addr6 = |p: &Pod| SocketAddr::from((p.ip6, PORT)).to_string();
    let seen6 = |v: &Value| -> std::net::IpAddr {
        v["peer_seen_by_server"]
            .as_str()
            .and_then(|s| s.parse::<SocketAddr>().ok())
            .map(|a| a.ip())
            .unwrap_or_else(|| panic!("bad peer address in {v}"))
    };
    let (ok, v) = testapp(&a, &["send", "--connect", &addr6(&b), "--bytes", "300000"]);
    assert!(ok, "same-node IPv6 send failed: {v}");
    assert_eq!(seen6(&v), a.ip6);
    let (ok, v) = testapp(&a, &["send", "--connect", &addr6(&x), "--bytes", "1000000"]);
    assert!(ok, "cross-node IPv6 send failed: {v}");
    assert_eq!(seen6(&v), a.ip6);
    let out = c
        .node(0)
        .command(TESTAPP)
        .args(["who", "--connect", &addr6(&b)])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).expect("who JSON from the node");
    assert_eq!(
        seen6(&v),
        c.node(0).ip6,
        "node-to-pod IPv6 from the node: {v}"
    );
    // IPv4 is unchanged beside it (the dual-stack server sees it mapped).
    let (ok, v) = testapp(&a, &["who", "--connect", &addr(&x)]);
    assert!(ok, "{v}");
    assert_eq!(seen6(&v).to_canonical(), a.ip);
    c.teardown().expect("clean teardown");
}

#[test]
fn netns_vip_range_and_outside_world_unreachable() {
    let mut c = cluster(2);
    let a = c.add_pod(0, "default", "a").unwrap();
    let x = c.add_pod(1, "default", "x").unwrap();
    serve(&mut c, &x);

    // A VIP is only a model address: without the mesh nothing answers, and
    // the failure is immediate (no route on the node), not a timeout.
    let started = Instant::now();
    let (ok, v) = testapp(
        &a,
        &[
            "connect",
            "--connect",
            &format!("{}:80", c.vip(1)),
            "--timeout",
            "5",
        ],
    );
    assert!(ok);
    assert_eq!(v["ok"], false, "VIP must not be reachable: {v}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "VIP connect should fail fast, took {:?}: {v}",
        started.elapsed()
    );

    // Nodes and the fabric have no route out of the cluster (checked with
    // route lookups, so no packet is ever sent towards the outside).
    for node in c.nodes() {
        let out = Command::new("ip")
            .args(["-n", &node.netns, "route", "get", "192.0.2.1"])
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "{} has a route out: {}",
            node.name,
            String::from_utf8_lossy(&out.stdout)
        );
        let out = Command::new("ip")
            .args(["-n", &node.netns, "route", "show", "default"])
            .output()
            .unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).trim().is_empty(),
            "{} has a default route",
            node.name
        );
        let vip = Command::new("ip")
            .args(["-n", &node.netns, "route", "get", &c.vip(1).to_string()])
            .output()
            .unwrap();
        assert!(!vip.status.success(), "{} routes the VIP range", node.name);
    }
    let out = Command::new("ip")
        .args(["-n", c.fabric_netns(), "-o", "route", "show"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).trim().is_empty(),
        "fabric netns must have no routes"
    );

    // The fabric holds only the bridge and one veth per node; every node
    // link peers into a netns of this cluster.
    let out = Command::new("ip")
        .args(["-n", c.fabric_netns(), "-o", "link", "show"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&out.stdout).to_string();
    assert_eq!(
        links.lines().count(),
        2 + c.nodes().len(),
        "unexpected fabric links:\n{links}"
    );
    let prefix = format!("wft{}-", c.slot());
    for node in c.nodes() {
        let out = Command::new("ip")
            .args(["-n", &node.netns, "-o", "link", "show"])
            .output()
            .unwrap();
        for line in String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("link-netns"))
        {
            let peer_ns = line
                .split("link-netns ")
                .nth(1)
                .and_then(|s| s.split_whitespace().next())
                .unwrap_or("");
            assert!(
                peer_ns.starts_with(&prefix),
                "{} has a link into {peer_ns:?}: {line}",
                node.name
            );
        }
    }

    // The service IP space is not reachable, but the pod behind it is.
    let (ok, v) = testapp(&a, &["who", "--connect", &addr(&x)]);
    assert!(ok, "{v}");
}

#[test]
fn netns_capture_on_bridge_sees_cross_node_packets() {
    let mut c = cluster(2);
    let a = c.add_pod(0, "default", "a").unwrap();
    let b = c.add_pod(0, "default", "b").unwrap();
    let x = c.add_pod(1, "default", "x").unwrap();
    serve(&mut c, &x);
    serve(&mut c, &b);

    let cap = Capture::start(&c, &format!("tcp port {PORT}")).expect("start capture");
    let (ok, v) = testapp(&a, &["send", "--connect", &addr(&x), "--bytes", "20000"]);
    assert!(ok, "{v}");
    // Same-node traffic never touches the fabric.
    let (ok, v) = testapp(&a, &["send", "--connect", &addr(&b), "--bytes", "20000"]);
    assert!(ok, "{v}");
    let packets = cap.stop().expect("stop capture");

    assert!(
        packets
            .iter()
            .any(|p| p.src == a.ip && p.dst == x.ip && p.is_syn() && p.dst_port == PORT),
        "no SYN a->x on the bridge among {} packets",
        packets.len()
    );
    assert!(packets
        .iter()
        .any(|p| p.src == a.ip && p.dst == x.ip && p.payload_contains(b"SINK\n")));
    let to_x: usize = packets
        .iter()
        .filter(|p| p.src == a.ip && p.dst == x.ip)
        .map(|p| p.payload.len())
        .sum();
    assert!(to_x >= 20000, "only {to_x} payload bytes a->x captured");
    assert!(packets
        .iter()
        .any(|p| p.src == x.ip && p.dst == a.ip && p.src_port == PORT));
    assert!(
        !packets.iter().any(|p| p.dst == b.ip || p.src == b.ip),
        "same-node traffic appeared on the bridge"
    );
}

#[test]
fn netns_teardown_leaves_nothing() {
    let mut c = cluster(2);
    let slot = c.slot();
    let fabric = c.fabric_netns().to_owned();
    let a = c.add_pod(0, "default", "a").unwrap();
    let x = c.add_pod(1, "default", "x").unwrap();
    serve(&mut c, &x);
    let mut node_proc = c.node(1).command("sleep");
    node_proc.arg("600");
    let node_pid = c.spawn("node-sleeper", node_proc).unwrap();
    // An untracked process in a pod (e.g. a test's helper) dies too.
    let stray = a.command("sleep").arg("600").spawn().unwrap();
    let run_dir = c.run_dir().to_owned();
    let cgroup = c.cgroup_root().to_owned();
    assert!(netns_exists(&fabric) && run_dir.exists() && cgroup.exists());

    // `teardown` checks, before releasing the slot, that nothing of it is left.
    c.teardown().expect("teardown left something behind");
    let mut stray = stray;
    let status = stray.wait().unwrap();
    assert!(!status.success(), "stray pod process was not killed");
    for pid in [a.pause_pid, x.pause_pid, node_pid] {
        assert!(!process_alive(pid), "pid {pid} survived teardown");
    }
    for ns in [&a.netns, &x.netns] {
        assert!(!netns_exists(ns), "netns {ns} survived teardown");
    }
    assert!(!a.cgroup.exists() && !x.cgroup.exists());
    eprintln!("slot {slot} torn down");
}

/// What the panicking test saw of its cluster before it panicked.
struct Seen {
    pods: Vec<Pod>,
    sleeper_pid: u32,
    log: std::path::PathBuf,
}

#[test]
fn netns_teardown_runs_when_test_panics() {
    require_root();
    let seen: Arc<Mutex<Option<Seen>>> = Arc::default();
    let seen2 = seen.clone();
    let result = std::panic::catch_unwind(move || {
        let mut c = cluster(2);
        let a = c.add_pod(0, "panic", "a").unwrap();
        let x = c.add_pod(1, "panic", "x").unwrap();
        serve(&mut c, &x);
        let mut sleeper = a.command("sleep");
        sleeper.arg("600");
        let sleeper_pid = c.spawn("pod-sleeper", sleeper).unwrap();
        *seen2.lock().unwrap() = Some(Seen {
            pods: vec![a, x],
            sleeper_pid,
            log: c.log_path("pod-sleeper"),
        });
        panic!("deliberate panic with a live cluster");
    });
    assert!(result.is_err());
    let seen = seen.lock().unwrap().take().expect("cluster was built");
    // Only this test uses the "panic" namespace, so these names cannot have
    // been reused by a later cluster in the same slot.
    for p in &seen.pods {
        assert!(
            !process_alive(p.pause_pid),
            "pause of {} survived the panic",
            p.key()
        );
        assert!(
            !netns_exists(&p.netns),
            "netns {} survived the panic",
            p.netns
        );
        assert!(
            !p.cgroup.exists(),
            "cgroup {} survived the panic",
            p.cgroup.display()
        );
    }
    assert!(
        !process_alive(seen.sleeper_pid),
        "spawned process survived the panic"
    );
    assert!(!seen.log.exists(), "run dir survived the panic");
}

#[test]
fn netns_parallel_clusters_get_distinct_slots() {
    require_root();
    let barrier = Arc::new(Barrier::new(2));
    let pods: Arc<Mutex<Vec<Pod>>> = Arc::default();
    let handles: Vec<_> = (0..2)
        .map(|i| {
            let (barrier, pods) = (barrier.clone(), pods.clone());
            thread::spawn(move || {
                let mut c = cluster(1);
                let p = c.add_pod(0, "par", &format!("p{i}")).unwrap();
                serve(&mut c, &p);
                pods.lock().unwrap().push(p.clone());
                // Both clusters are alive from here to the last barrier.
                barrier.wait();
                let other = pods
                    .lock()
                    .unwrap()
                    .iter()
                    .find(|o| o.netns != p.netns)
                    .cloned()
                    .expect("other pod");
                let (_, v) = testapp(
                    &p,
                    &["connect", "--connect", &addr(&other), "--timeout", "3"],
                );
                let own = testapp(&p, &["who", "--connect", &addr(&p)]);
                barrier.wait();
                (
                    c.slot(),
                    c.fabric_netns().to_owned(),
                    c.node(0).netns.clone(),
                    p.ip,
                    v,
                    own,
                )
            })
        })
        .collect();
    let results: Vec<_> = handles
        .into_iter()
        .map(|h| h.join().expect("cluster thread"))
        .collect();
    let (a, b) = (&results[0], &results[1]);
    assert_ne!(a.0, b.0, "two live clusters got the same slot");
    assert_ne!(a.1, b.1);
    assert_ne!(a.2, b.2);
    assert_ne!(a.3, b.3);
    for r in &results {
        assert_eq!(
            r.4["ok"], false,
            "a pod reached another cluster's pod: {}",
            r.4
        );
        assert!(r.5 .0, "pod cannot reach itself: {}", r.5 .1);
    }
}

#[test]
fn netns_invoke_cni_runs_plugin_like_a_runtime() {
    let mut c = cluster(1);
    let pod = c.add_pod(0, "apps", "web").unwrap();
    let dir = c.run_dir().join("cni");
    std::fs::create_dir_all(&dir).unwrap();
    // A stand-in plugin that records its environment, stdin and netns.
    let plugin = dir.join("fake-cni");
    std::fs::write(
        &plugin,
        format!(
            "#!/bin/sh\nenv | grep ^CNI_ > {d}/env.$CNI_COMMAND\ncat > {d}/stdin.$CNI_COMMAND\nreadlink /proc/self/ns/net > {d}/netns.$CNI_COMMAND\n\
             if [ \"$CNI_COMMAND\" = CHECK ]; then echo '{{\"cniVersion\":\"1.0.0\",\"code\":999,\"msg\":\"not enrolled\"}}'; exit 1; fi\n\
             if [ \"$CNI_COMMAND\" = ADD ]; then echo '{{\"cniVersion\":\"1.0.0\",\"ips\":[]}}'; fi\n",
            d = dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&plugin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let node = c.node(0).clone();
    let conf = json!({"type": "fake-cni"});

    let out = invoke_cni(&plugin, "ADD", &pod, &node, &conf).expect("ADD");
    assert_eq!(out["cniVersion"], "1.0.0");
    let env = std::fs::read_to_string(dir.join("env.ADD")).unwrap();
    for want in [
        "CNI_COMMAND=ADD".to_owned(),
        format!("CNI_CONTAINERID={}", pod.container_id),
        format!("CNI_NETNS={}", pod.netns_path.display()),
        "CNI_IFNAME=eth0".to_owned(),
        format!("CNI_PATH={}", dir.display()),
    ] {
        assert!(env.lines().any(|l| l == want), "missing {want} in\n{env}");
    }
    let args = env.lines().find(|l| l.starts_with("CNI_ARGS=")).unwrap();
    assert!(args.contains("K8S_POD_NAMESPACE=apps") && args.contains("K8S_POD_NAME=web"));
    assert!(args.contains(&format!("K8S_POD_UID={}", pod.uid)));
    let stdin: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("stdin.ADD")).unwrap()).unwrap();
    assert_eq!(stdin["type"], "fake-cni");
    assert_eq!(stdin["cniVersion"], "1.0.0");
    assert_eq!(
        stdin["prevResult"]["ips"][0]["address"],
        format!("{}/32", pod.ip)
    );
    // The plugin runs in the node's netns, as kubelet's runtime does.
    let mut probe = node.command("sleep");
    probe.arg("30");
    let probe_pid = c.spawn("probe", probe).unwrap();
    let node_ns = std::fs::read_link(format!("/proc/{probe_pid}/ns/net")).unwrap();
    assert_eq!(
        std::fs::read_to_string(dir.join("netns.ADD"))
            .unwrap()
            .trim(),
        node_ns.to_string_lossy()
    );

    let err = invoke_cni(&plugin, "CHECK", &pod, &node, &conf).expect_err("CHECK must fail");
    let cni = err.downcast_ref::<CniError>().expect("a CniError");
    assert_eq!(cni.exit_code, Some(1));
    assert_eq!(cni.code(), Some(999));
    assert_eq!(cni.msg(), Some("not enrolled"));

    let out = invoke_cni(&plugin, "DEL", &pod, &node, &conf).expect("DEL");
    assert!(out.is_null());
    let stdin: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("stdin.DEL")).unwrap()).unwrap();
    assert!(
        stdin.get("prevResult").is_none(),
        "DEL carries no prevResult"
    );
}

/// Not a test on its own: `netns_leftovers_of_a_killed_run_are_swept` runs
/// this in a child process (WEFT_E2E_CRASH_HELPER=1) and SIGKILLs it while
/// its cluster is alive, so no teardown runs.
#[test]
fn netns_crash_helper() {
    if std::env::var_os("WEFT_E2E_CRASH_HELPER").is_none() {
        return;
    }
    let mut c = cluster(1);
    let p = c.add_pod(0, "crash", "a").unwrap();
    println!(
        "CLUSTER {} {} {} {}",
        c.slot(),
        p.pause_pid,
        p.netns,
        p.cgroup.display()
    );
    thread::sleep(Duration::from_secs(30));
}

#[test]
fn netns_leftovers_of_a_killed_run_are_swept() {
    require_root();
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "netns_crash_helper",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("WEFT_E2E_CRASH_HELPER", "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let line = std::io::BufRead::lines(std::io::BufReader::new(stdout))
        .map_while(Result::ok)
        .find_map(|l| l.find("CLUSTER ").map(|i| l[i..].to_owned()))
        .expect("helper built a cluster");
    child.kill().unwrap();
    child.wait().unwrap();
    let f: Vec<&str> = line.split_whitespace().collect();
    let (pause, netns, cgroup) = (f[2].parse::<u32>().unwrap(), f[3], Path::new(f[4]));

    // The killed run could not clean up (unless a concurrent cluster has
    // already taken the freed slot and swept it).
    let swept = sweep_unlocked_slots().expect("sweep");
    eprintln!("swept slots {swept:?}");
    assert!(
        !netns_exists(netns),
        "netns {netns} of the killed run survived the sweep"
    );
    assert!(
        !cgroup.exists(),
        "cgroup of the killed run survived the sweep"
    );
    // The orphaned pause was killed; it may linger as a zombie until init reaps it.
    let state = std::fs::read_to_string(format!("/proc/{pause}/stat")).unwrap_or_default();
    assert!(
        state.is_empty() || state.contains(") Z "),
        "pause {pause} of the killed run survived: {state}"
    );
}
