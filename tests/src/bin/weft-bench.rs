//! `weft-bench`: the data-path benchmark behind `cargo xtask bench`. On a
//! two-node simulated cluster it runs the same workloads (iperf3, wrk
//! keep-alive and connection-per-request against nginx) for a pod pair
//! outside the mesh and for Weft L4 cross-node and same-node, interleaved,
//! checks from the ztunnels' counters that the traffic took the path it
//! claims, and reports throughput, latency, ztunnel CPU and memory, and the
//! cost of capturing a `connect()`: a table, a JSON file and an SVG plot.

#[path = "../bench/probe.rs"]
mod probe;
#[path = "../bench/report.rs"]
mod report;
#[path = "../bench/tools.rs"]
mod tools;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use weft_e2e::mesh::{bin_path, metric_sum, wait_until, Mesh};
use weft_e2e::Pod;

use report::{Report, Sample};

const MESH_NS: &str = "bench-mesh";
const PLAIN_NS: &str = "bench-plain";
const OPENED: &str = "weft_tcp_connections_opened_total";
const ACTIVE: &str = "weft_active_connections";
/// Idle connections held open for the memory figure.
const IDLE_CONNECTIONS: usize = 1000;

struct Options {
    quick: bool,
    out: PathBuf,
    ztunnel_log: String,
}

impl Options {
    fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            quick: false,
            out: PathBuf::from("bench-results"),
            ztunnel_log: "info".into(),
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            match a.as_str() {
                "--quick" => o.quick = true,
                "--out" => o.out = it.next().context("--out needs a directory")?.into(),
                "--ztunnel-log" => {
                    o.ztunnel_log = it.next().context("--ztunnel-log needs a filter")?.clone()
                }
                "-h" | "--help" => {
                    println!(
                        "usage: weft-bench [--quick] [--out DIR] [--ztunnel-log FILTER]\n\
                         Runs the data-path benchmark on a simulated cluster (needs root)."
                    );
                    std::process::exit(0);
                }
                other => bail!("unknown argument {other:?} (try --help)"),
            }
        }
        Ok(o)
    }

    fn runs(&self) -> usize {
        if self.quick {
            1
        } else {
            3
        }
    }

    fn seconds(&self) -> u32 {
        if self.quick {
            3
        } else {
            10
        }
    }
}

/// Where a workload's client runs and which server it reaches.
pub struct Scenario {
    pub key: &'static str,
    pub title: &'static str,
    pub mesh: bool,
    client: Pod,
    server: Pod,
}

#[derive(Clone, Copy)]
pub enum Kind {
    Iperf {
        streams: u32,
    },
    Wrk {
        threads: u32,
        conns: u32,
        close: bool,
    },
}

#[derive(Clone, Copy)]
pub struct Workload {
    pub key: &'static str,
    pub title: &'static str,
    pub kind: Kind,
}

pub const WORKLOADS: &[Workload] = &[
    Workload {
        key: "iperf_1",
        title: "iperf3 -t 10 (1 stream)",
        kind: Kind::Iperf { streams: 1 },
    },
    Workload {
        key: "iperf_8",
        title: "iperf3 -t 10 -P 8",
        kind: Kind::Iperf { streams: 8 },
    },
    Workload {
        key: "wrk_c1_keepalive",
        title: "wrk -t1 -c1 keep-alive",
        kind: Kind::Wrk {
            threads: 1,
            conns: 1,
            close: false,
        },
    },
    Workload {
        key: "wrk_c32_keepalive",
        title: "wrk -t2 -c32 keep-alive",
        kind: Kind::Wrk {
            threads: 2,
            conns: 32,
            close: false,
        },
    },
    Workload {
        key: "wrk_c1_close",
        title: "wrk -t1 -c1 Connection: close",
        kind: Kind::Wrk {
            threads: 1,
            conns: 1,
            close: true,
        },
    },
    Workload {
        key: "wrk_c16_close",
        title: "wrk -t2 -c16 Connection: close",
        kind: Kind::Wrk {
            threads: 2,
            conns: 16,
            close: true,
        },
    },
];

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some(probe::HOLD) => probe::hold(&args[1..]),
        Some(probe::CONNECT_LOOP) => probe::connect_loop(&args[1..]),
        _ => Options::parse(&args).and_then(|o| bench(&o)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-bench: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The cluster, its pods and servers, and the ztunnel processes.
struct Bench {
    mesh: Mesh,
    scenarios: Vec<Scenario>,
    ztunnels: [u32; 2],
    wrk_script: PathBuf,
}

fn bench(o: &Options) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: the benchmark builds network namespaces and loads eBPF programs");
    }
    for tool in ["wrk", "iperf3", "nginx", "bpftool", "timeout", "curl"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            bail!("{tool} is not installed: run `cargo xtask setup`");
        }
    }
    probe::raise_nofile_limit();
    let started = std::time::SystemTime::now();
    let mut report = Report::new(o.quick, o.runs(), o.seconds(), started);
    eprintln!("weft-bench: building a 2-node cluster with a ztunnel on each node");
    let mut b = setup(o)?;

    // Idle memory: enrolled pods and servers up, nothing flowing yet.
    std::thread::sleep(Duration::from_secs(1));
    for (i, pid) in b.ztunnels.iter().enumerate() {
        report.idle_rss_mib[i] = tools::rss_mib(*pid)?.0;
    }

    for w in WORKLOADS {
        for run in 0..o.runs() {
            for s in &b.scenarios {
                eprintln!(
                    "weft-bench: {} / {} (run {}/{})",
                    w.title,
                    s.title,
                    run + 1,
                    o.runs()
                );
                let sample =
                    measure(&b, o, w, s).with_context(|| format!("{} / {}", w.title, s.title))?;
                report
                    .cells
                    .entry((w.key, s.key))
                    .or_default()
                    .runs
                    .push(sample);
            }
        }
    }
    std::thread::sleep(Duration::from_secs(1));
    for (i, pid) in b.ztunnels.iter().enumerate() {
        report.idle_rss_after_mib[i] = tools::rss_mib(*pid)?.0;
    }
    eprintln!("weft-bench: memory with {IDLE_CONNECTIONS} idle connections");
    report.held_rss_mib = hold_connections(&mut b, o)?;
    eprintln!("weft-bench: capture cost of connect()");
    report.capture = capture_cost(&b, o)?;
    report.finished = Some(std::time::SystemTime::now());

    report.write(&o.out, &b.scenarios)?;
    Ok(())
}

fn setup(o: &Options) -> Result<Bench> {
    let mut mesh = Mesh::new(2, &[MESH_NS])?;
    quiet_ztunnels(&mut mesh, &o.ztunnel_log)?;
    // No mesh: a pair on the same two nodes, in a namespace without the label.
    let plain_client = mesh.add_pod(0, PLAIN_NS, "plain-client", "client")?;
    let plain_server = mesh.add_pod(1, PLAIN_NS, "plain-server", "server")?;
    let mesh_client = mesh.add_pod(0, MESH_NS, "mesh-client", "client")?;
    let mesh_server = mesh.add_pod(1, MESH_NS, "mesh-server", "server")?;
    let mesh_local = mesh.add_pod(0, MESH_NS, "mesh-local", "server")?;
    wait_model(&mesh)?;
    for p in [&mesh_client, &mesh_server, &mesh_local] {
        mesh.wait_enrolled(p.node, p, true)?;
    }
    for p in [&plain_client, &plain_server] {
        mesh.wait_enrolled(p.node, p, false)?;
    }
    // Every pod, meshed or not, gets the same kernel settings a load
    // client needs: without TIME_WAIT reuse a connection-per-request
    // client runs out of ports and the no-mesh baseline collapses (the
    // mesh path, whose client connections end on the local ztunnel, hides
    // it), which made every ratio over it meaningless.
    for p in [
        &plain_client,
        &plain_server,
        &mesh_client,
        &mesh_server,
        &mesh_local,
    ] {
        tune_pod(p)?;
    }
    let www = mesh.cluster.run_dir().join("bench-www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("1k.bin"), vec![b'w'; 1024])?;
    let wrk_script = mesh.cluster.run_dir().join("bench-wrk.lua");
    std::fs::write(&wrk_script, tools::wrk_script())?;
    for server in [&plain_server, &mesh_server, &mesh_local] {
        start_servers(&mut mesh, server, &www)?;
    }
    let ztunnels = [
        tools::ztunnel_pid(&mesh.cluster.node(0).netns_path)?,
        tools::ztunnel_pid(&mesh.cluster.node(1).netns_path)?,
    ];
    let scenarios = vec![
        Scenario {
            key: "no_mesh",
            title: "no mesh",
            mesh: false,
            client: plain_client,
            server: plain_server,
        },
        Scenario {
            key: "weft_cross_node",
            title: "Weft L4 cross-node",
            mesh: true,
            client: mesh_client.clone(),
            server: mesh_server,
        },
        Scenario {
            key: "weft_same_node",
            title: "Weft L4 same-node",
            mesh: true,
            client: mesh_client,
            server: mesh_local,
        },
    ];
    Ok(Bench {
        mesh,
        scenarios,
        ztunnels,
        wrk_script,
    })
}

/// The load-client kernel settings, in the pod's network namespace.
fn tune_pod(pod: &Pod) -> Result<()> {
    for (key, value) in [
        ("net/ipv4/tcp_tw_reuse", "1"),
        ("net/ipv4/ip_local_port_range", "1024 65000"),
    ] {
        let out = pod
            .command("sh")
            .args(["-c", &format!("echo '{value}' > /proc/sys/{key}")])
            .output()
            .with_context(|| format!("setting {key} in {}", pod.name))?;
        if !out.status.success() {
            bail!(
                "setting {key}={value} in pod {}: {}",
                pod.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(())
}

/// Restarts each node's ztunnel with the log filter a production node would
/// run (`Mesh` starts them at debug level, which logs every connection).
/// The arguments mirror `Mesh::start_ztunnel`; no pod is enrolled yet, and a
/// restarted ztunnel keeps its state and pins by design.
fn quiet_ztunnels(mesh: &mut Mesh, filter: &str) -> Result<()> {
    let run_dir = mesh.cluster.run_dir().to_path_buf();
    for node in 0..mesh.cluster.nodes().len() {
        mesh.stop_ztunnel(node)?;
        let n = mesh.cluster.node(node).clone();
        let dir = run_dir.join(&n.name);
        let mut cmd = n.command_os(bin_path("weft-ztunnel"));
        cmd.arg("run")
            .args(["--node-name", &n.name])
            .args([
                "--node-ip",
                &format!("{},{}", n.ip, weft_e2e::cluster::POD_GATEWAY),
            ])
            .arg("--model-file")
            .arg(run_dir.join("mesh.yaml"))
            .arg("--ca-dir")
            .arg(mesh.ca_dir())
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--bpf-pin-dir")
            .arg(mesh.cluster.bpf_pin_dir().join(&n.name))
            .arg("--cni-socket")
            .arg(mesh.cni_socket(node))
            .env("WEFT_LOG", filter);
        let name = format!("bench-ztunnel-{}", n.name);
        mesh.cluster.spawn(&name, cmd)?;
        mesh.cluster
            .wait_for_log(&name, "ready", Duration::from_secs(30))
            .with_context(|| format!("ztunnel on {} did not become ready", n.name))?;
    }
    Ok(())
}

/// Waits until both ztunnels serve the model last written (`Mesh` only
/// waits for the ztunnels it started itself).
fn wait_model(mesh: &Mesh) -> Result<()> {
    let want = serde_json::to_value(&mesh.model)?;
    for node in 0..mesh.cluster.nodes().len() {
        wait_until(Duration::from_secs(10), || {
            let dump = mesh.config_dump(node).ok()?;
            (dump.get("model")? == &want).then_some(())
        })
        .with_context(|| format!("ztunnel on node {node} did not apply the mesh model"))?;
    }
    Ok(())
}

/// nginx serving a 1,024-byte file on 8080 and `iperf3 -s` on 5201.
fn start_servers(mesh: &mut Mesh, pod: &Pod, www: &Path) -> Result<()> {
    let prefix = mesh.cluster.run_dir().join(format!("nginx-{}", pod.name));
    std::fs::create_dir_all(&prefix)?;
    let p = prefix.display();
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 1;\nuser root;\n\
         pid {p}/nginx.pid;\nerror_log {p}/error.log warn;\nworker_rlimit_nofile 16384;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  tcp_nodelay on;\n\
           keepalive_timeout 120s;\n  keepalive_requests 100000000;\n\
           client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n\
           fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n\
           scgi_temp_path {p}/scgi;\n\
           server {{\n    listen 8080 reuseport backlog=4096;\n    root {www};\n\
             location / {{ }}\n  }}\n}}\n",
        www = www.display()
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut nginx = pod.command("nginx");
    nginx
        .arg("-e")
        .arg(prefix.join("error.log"))
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf_path);
    let name = format!("nginx-{}", pod.name);
    mesh.cluster.spawn(&name, nginx)?;
    let mut iperf = pod.command("iperf3");
    iperf.args(["-s", "-p", "5201", "--forceflush"]);
    let iperf_name = format!("iperf3-{}", pod.name);
    mesh.cluster.spawn(&iperf_name, iperf)?;
    // Ready when both answer from inside the pod itself.
    let url = format!("http://{}:8080/1k.bin", pod.ip);
    wait_until(Duration::from_secs(10), || {
        let out = pod
            .command("curl")
            .args(["-sS", "--max-time", "2", &url])
            .output()
            .ok()?;
        (out.status.success() && out.stdout.len() == 1024).then_some(())
    })
    .with_context(|| {
        format!(
            "nginx in {} did not serve {url}: {}",
            pod.key(),
            std::fs::read_to_string(prefix.join("error.log")).unwrap_or_default()
        )
    })?;
    wait_until(Duration::from_secs(10), || {
        mesh.cluster
            .log(&iperf_name)
            .contains("Server listening")
            .then_some(())
    })
    .with_context(|| format!("iperf3 -s did not start in {}", pod.key()))?;
    Ok(())
}

/// Connection counters that tell which path traffic took: opened by the
/// source ztunnel (client side) and by the destination ztunnel, toward this
/// scenario's server; and every connection either ztunnel ever opened.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    source: f64,
    destination: f64,
    total: f64,
}

fn counters(b: &Bench, s: &Scenario) -> Result<Counters> {
    let src = b.mesh.metrics(s.client.node)?;
    let dst = b.mesh.metrics(s.server.node)?;
    let server = s.server.name.as_str();
    let mut total = 0.0;
    for node in 0..2 {
        total += metric_sum(&b.mesh.metrics(node)?, OPENED, &[]);
    }
    Ok(Counters {
        source: metric_sum(
            &src,
            OPENED,
            &[("reporter", "source"), ("destination_workload", server)],
        ),
        destination: metric_sum(
            &dst,
            OPENED,
            &[
                ("reporter", "destination"),
                ("destination_workload", server),
            ],
        ),
        total,
    })
}

/// Fails unless the run's connections went through the ztunnels (mesh) or
/// around them (no mesh).
fn check_path(s: &Scenario, before: Counters, after: Counters, conns: f64) -> Result<()> {
    if s.mesh {
        let src = after.source - before.source;
        let dst = after.destination - before.destination;
        if src < conns || dst < conns {
            bail!(
                "traffic did not go through the mesh: {conns} client connections, but the \
                 source ztunnel opened {src} and the destination ztunnel {dst} toward {}",
                s.server.key()
            );
        }
    } else if after.total != before.total {
        bail!(
            "no-mesh traffic went through a ztunnel: its connection counters moved by {}",
            after.total - before.total
        );
    }
    Ok(())
}

fn measure(b: &Bench, o: &Options, w: &Workload, s: &Scenario) -> Result<Sample> {
    let secs = o.seconds();
    let url = format!("http://{}:8080/1k.bin", s.server.ip);
    // Warm up: iperf3 omits its first second; wrk gets a short run first.
    let omit = 1;
    if let Kind::Wrk {
        threads,
        conns,
        close,
    } = w.kind
    {
        tools::wrk(&s.client, &b.wrk_script, &url, threads, conns, 1, close).context("warm-up")?;
    }
    let before = counters(b, s)?;
    for pid in b.ztunnels {
        tools::reset_peak_rss(pid)?;
    }
    let cpu0 = b
        .ztunnels
        .map(|p| tools::cpu_seconds(p).unwrap_or(f64::NAN));
    let mut sample = Sample::default();
    let conns = match w.kind {
        Kind::Iperf { streams } => {
            let r = tools::iperf(&s.client, s.server.ip, secs, omit, streams)?;
            sample.bytes = r.bytes;
            sample.gbits = Some(r.gbits);
            sample.retransmits = r.retransmits;
            f64::from(streams + 1)
        }
        Kind::Wrk {
            threads,
            conns,
            close,
        } => {
            let r = tools::wrk(&s.client, &b.wrk_script, &url, threads, conns, secs, close)?;
            sample.bytes = r.bytes;
            let expected = if close {
                r.requests as f64
            } else {
                f64::from(conns)
            };
            sample.wrk = Some(r);
            expected
        }
    };
    let cpu1 = b
        .ztunnels
        .map(|p| tools::cpu_seconds(p).unwrap_or(f64::NAN));
    for (i, pid) in b.ztunnels.iter().enumerate() {
        sample.cpu_s[i] = cpu1[i] - cpu0[i];
        sample.peak_rss_mib[i] = tools::rss_mib(*pid)?.1;
    }
    let after = counters(b, s)?;
    check_path(s, before, after, conns)?;
    sample.connections = if s.mesh {
        after.source - before.source
    } else {
        conns
    };
    Ok(sample)
}

/// RSS of both ztunnels while a mesh client holds `IDLE_CONNECTIONS` idle
/// connections to the cross-node server.
fn hold_connections(b: &mut Bench, o: &Options) -> Result<[f64; 2]> {
    let s = &b.scenarios[1];
    let (client, server) = (s.client.clone(), s.server.clone());
    let exe = std::env::current_exe()?;
    let mut cmd = client.command_os(&exe);
    let hold_secs = if o.quick { 30 } else { 60 };
    cmd.args([
        probe::HOLD,
        "--connect",
        &format!("{}:8080", server.ip),
        "--count",
        &IDLE_CONNECTIONS.to_string(),
        "--seconds",
        &hold_secs.to_string(),
    ]);
    let active = |mesh: &Mesh, node: usize| -> f64 {
        mesh.metrics(node)
            .map(|t| metric_sum(&t, ACTIVE, &[]))
            .unwrap_or(0.0)
    };
    let base = [active(&b.mesh, 0), active(&b.mesh, 1)];
    b.mesh.cluster.spawn("bench-hold", cmd)?;
    b.mesh.cluster.wait_for_log(
        "bench-hold",
        &format!("holding {IDLE_CONNECTIONS}"),
        Duration::from_secs(20),
    )?;
    let want = IDLE_CONNECTIONS as f64;
    wait_until(Duration::from_secs(20), || {
        (active(&b.mesh, 0) - base[0] >= want && active(&b.mesh, 1) - base[1] >= want).then_some(())
    })
    .with_context(|| {
        format!(
            "the ztunnels never had {IDLE_CONNECTIONS} connections open (node1 {}, node2 {})",
            active(&b.mesh, 0) - base[0],
            active(&b.mesh, 1) - base[1]
        )
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let rss = [
        tools::rss_mib(b.ztunnels[0])?.0,
        tools::rss_mib(b.ztunnels[1])?.0,
    ];
    b.mesh.cluster.stop("bench-hold", Duration::from_secs(2))?;
    Ok(rss)
}

/// Times `connect()` from a pod, via the hidden connect-loop subcommand.
fn connect_loop(pod: &Pod, target: &str, count: usize) -> Result<Value> {
    let exe = std::env::current_exe()?;
    let out = pod
        .command_os("timeout")
        .args(["-k", "5", "90"])
        .arg(&exe)
        .args([probe::CONNECT_LOOP, "--connect", target])
        .args(["--count", &count.to_string()])
        .output()?;
    if !out.status.success() {
        bail!(
            "connect loop from {} to {target} failed: {}",
            pod.key(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).with_context(|| format!("connect loop printed {text:?}"))
}

/// Restores `kernel.bpf_stats_enabled` when dropped.
struct BpfStats {
    previous: String,
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> Result<BpfStats> {
        let previous = std::fs::read_to_string(BPF_STATS)?.trim().to_owned();
        std::fs::write(BPF_STATS, "1").context("enabling kernel.bpf_stats_enabled")?;
        Ok(BpfStats { previous })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS, &self.previous);
    }
}

/// What capturing a connection costs the app: the time `connect()` takes
/// when connect4 rewrites it to the pod's 15001, against the same loopback
/// handshake without a rewrite, and the programs' own run time.
fn capture_cost(b: &Bench, o: &Options) -> Result<Value> {
    let count = if o.quick { 1000 } else { 5000 };
    let plain = &b.scenarios[0];
    let mesh_client = &b.scenarios[1].client;
    let remote = format!("{}:8080", plain.server.ip);
    let _stats = BpfStats::enable()?;
    let before = tools::bpf_prog_stats(&b.ztunnels)?;
    let opened0 = metric_sum(&b.mesh.metrics(0)?, OPENED, &[("reporter", "source")]);
    let captured = connect_loop(mesh_client, &remote, count)?;
    let opened1 = metric_sum(&b.mesh.metrics(0)?, OPENED, &[("reporter", "source")]);
    let after = tools::bpf_prog_stats(&b.ztunnels)?;
    if opened1 - opened0 < count as f64 {
        bail!(
            "captured connects did not reach the ztunnel: {count} connects, {} connections opened",
            opened1 - opened0
        );
    }
    let plain_local = connect_loop(&plain.client, "local", count)?;
    let plain_remote = connect_loop(&plain.client, &remote, count)?;
    let mesh_local = connect_loop(mesh_client, "local", count)?;
    let mut programs = serde_json::Map::new();
    for (name, (ns, cnt)) in &after {
        let (ns0, cnt0) = before.get(name).copied().unwrap_or_default();
        let calls = cnt - cnt0;
        programs.insert(
            name.clone(),
            json!({"calls": calls, "run_time_ns": ns - ns0,
                   "ns_per_call": if calls > 0 { (ns - ns0) as f64 / calls as f64 } else { f64::NAN }}),
        );
    }
    let p50 = |v: &Value| v["p50_ns"].as_f64().unwrap_or(f64::NAN);
    Ok(json!({
        "connects": count,
        "enrolled_rewritten_to_15001": captured,
        "enrolled_loopback_not_rewritten": mesh_local,
        "not_enrolled_loopback": plain_local,
        "not_enrolled_remote_pod": plain_remote,
        "added_p50_ns_vs_loopback": p50(&captured) - p50(&plain_local),
        "added_p50_ns_vs_remote_pod": p50(&captured) - p50(&plain_remote),
        "bpf_programs": programs,
        "target_for_connects": plain.server.ip.to_string(),
    }))
}
