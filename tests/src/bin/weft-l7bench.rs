//! `weft-l7bench`: the waypoint benchmark behind `cargo xtask bench
//! waypoint` (and the second half of `cargo xtask bench`). On a two-node
//! simulated cluster with the controller, the same HTTP workloads run, in
//! one interleaved run, against:
//! - no mesh: client pod -> nginx pod directly;
//! - nginx reverse proxy: client pod -> a second nginx (plain reverse
//!   proxy, keep-alive upstream, HTTP/2 listener) on the server's node ->
//!   nginx;
//! - Weft waypoint: enrolled client -> ztunnel -> HBONE -> waypoint on the
//!   server's node -> HBONE -> ztunnel -> nginx.
//!
//! HTTP/1.1 with wrk (keep-alive, 1 and 32 connections) and HTTP/2 with
//! h2load (prior knowledge, 4 connections x 32 streams). Requests per
//! second, latency, and the proxy's CPU per request (waypoint process vs
//! nginx proxy workers) and memory are printed side by side, and written to
//! bench-results/waypoint-<stamp>.json. Each run checks the waypoint's
//! request counter moved by what the client sent (and that no other
//! scenario touched it).

#[path = "../bench/tools.rs"]
#[allow(dead_code)]
mod tools;

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use weft_e2e::mesh::{metric_sum, wait_until, Mesh};
use weft_e2e::Pod;

const MESH_NS: &str = "l7-mesh";
const PLAIN_NS: &str = "l7-plain";
const WAYPOINT: &str = "wp";
const REQUESTS: &str = "weft_requests_total";

struct Options {
    quick: bool,
    out: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Proxy {
    None,
    Nginx,
    Waypoint,
}

struct Scenario {
    key: &'static str,
    title: &'static str,
    proxy: Proxy,
    client: Pod,
    /// host:port for HTTP/1.1 and for HTTP/2.
    h1: String,
    h2: String,
}

#[derive(Clone, Copy)]
enum Load {
    Wrk { conns: u32, threads: u32 },
    H2load { conns: u32, streams: u32 },
}

struct Workload {
    key: &'static str,
    title: &'static str,
    load: Load,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        key: "h1_c1",
        title: "HTTP/1.1 wrk -c1 keep-alive",
        load: Load::Wrk {
            conns: 1,
            threads: 1,
        },
    },
    Workload {
        key: "h1_c32",
        title: "HTTP/1.1 wrk -c32 keep-alive",
        load: Load::Wrk {
            conns: 32,
            threads: 2,
        },
    },
    Workload {
        key: "h2_c4_m32",
        title: "HTTP/2 h2load -c4 -m32",
        load: Load::H2load {
            conns: 4,
            streams: 32,
        },
    },
];

#[derive(Default, Clone, Debug)]
struct Sample {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    mean_us: f64,
    requests: f64,
    proxy_cpu_s: f64,
    proxy_rss_mib: f64,
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let o = Options {
        quick: args.iter().any(|a| a == "--quick"),
        out: args
            .iter()
            .position(|a| a == "--out")
            .and_then(|i| args.get(i + 1))
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("bench-results")),
    };
    match bench(&o) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-l7bench: FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn bench(o: &Options) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("run as root: the benchmark builds network namespaces and loads eBPF programs");
    }
    for tool in ["wrk", "h2load", "nginx", "curl", "timeout"] {
        let found = std::process::Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            bail!("{tool} is not installed: run `cargo xtask setup`");
        }
    }
    let (runs, secs) = if o.quick { (1, 3) } else { (3, 10) };
    eprintln!("weft-l7bench: building a 2-node cluster with the controller and a waypoint");
    let mut mesh = Mesh::with_controller(2, &[MESH_NS])?;
    let plain_client = mesh.add_pod(0, PLAIN_NS, "plain-client", "client")?;
    let plain_server = mesh.add_pod(1, PLAIN_NS, "plain-server", "server")?;
    let proxy_pod = mesh.add_pod(1, PLAIN_NS, "nginx-proxy", "proxy")?;
    let mesh_client = mesh.add_pod(0, MESH_NS, "mesh-client", "client")?;
    let mesh_server = mesh.add_pod(1, MESH_NS, "mesh-server", "server")?;
    let vip = mesh.add_service(MESH_NS, "web", "mesh-server", &[(80, 8080), (81, 8081)])?;
    // WEFT_WORKER_THREADS, when set, is handed to the waypoint (runtime
    // comparisons); otherwise it runs with its default.
    let threads = std::env::var("WEFT_WORKER_THREADS").unwrap_or_else(|_| "0".into());
    mesh.add_waypoint_with_env(
        1,
        MESH_NS,
        WAYPOINT,
        &[
            ("WEFT_LOG", "info"),
            ("WEFT_ACCESS_LOG", "false"),
            ("WEFT_WORKER_THREADS", &threads),
        ],
    )?;
    mesh.use_waypoint(MESH_NS, "web", Some(WAYPOINT))?;
    mesh.wait_enrolled(0, &mesh_client, true)?;
    mesh.wait_enrolled(1, &mesh_server, true)?;

    let www = mesh.cluster.run_dir().join("l7-www");
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("1k.bin"), vec![b'w'; 1024])?;
    let wrk_script = mesh.cluster.run_dir().join("l7-wrk.lua");
    std::fs::write(&wrk_script, tools::wrk_script())?;
    for server in [&plain_server, &mesh_server] {
        nginx(&mut mesh, server, &server_conf(&www))?;
    }
    nginx(&mut mesh, &proxy_pod, &proxy_conf(plain_server.ip))?;
    let waypoint_pid = mesh
        .waypoint_pid(WAYPOINT)
        .context("waypoint pid unknown")?;
    let proxy_pids = tools::pids_in_netns(&proxy_pod.netns_path, "nginx")?;
    if proxy_pids.is_empty() {
        bail!("no nginx process in {}", proxy_pod.key());
    }

    let scenarios = [
        Scenario {
            key: "no_mesh",
            title: "no mesh",
            proxy: Proxy::None,
            client: plain_client.clone(),
            h1: format!("{}:8080", plain_server.ip),
            h2: format!("{}:8081", plain_server.ip),
        },
        Scenario {
            key: "nginx_proxy",
            title: "nginx reverse proxy",
            proxy: Proxy::Nginx,
            client: plain_client,
            h1: format!("{}:8080", proxy_pod.ip),
            h2: format!("{}:8081", proxy_pod.ip),
        },
        Scenario {
            key: "weft_waypoint",
            title: "Weft waypoint",
            proxy: Proxy::Waypoint,
            client: mesh_client,
            h1: format!("{vip}:80"),
            h2: format!("{vip}:81"),
        },
    ];
    // Every path answers before anything is measured.
    for s in &scenarios {
        let url = format!("http://{}/1k.bin", s.h1);
        wait_until(Duration::from_secs(15), || {
            let out = s
                .client
                .command("curl")
                .args(["-sS", "--max-time", "3", &url])
                .output()
                .ok()?;
            (out.status.success() && out.stdout.len() == 1024).then_some(())
        })
        .with_context(|| format!("{}: {url} does not answer", s.title))?;
    }

    let mut results: Vec<(&Workload, &Scenario, Vec<Sample>)> = Vec::new();
    for w in WORKLOADS {
        let mut cells: Vec<Vec<Sample>> = scenarios.iter().map(|_| Vec::new()).collect();
        for run in 0..runs {
            for (i, s) in scenarios.iter().enumerate() {
                eprintln!(
                    "weft-l7bench: {} / {} (run {}/{runs})",
                    w.title,
                    s.title,
                    run + 1
                );
                let pids: Vec<u32> = match s.proxy {
                    Proxy::None => vec![],
                    Proxy::Nginx => proxy_pids.clone(),
                    Proxy::Waypoint => vec![waypoint_pid],
                };
                let sample = measure(&mesh, &wrk_script, w, s, secs, &pids)
                    .with_context(|| format!("{} / {}", w.title, s.title))?;
                cells[i].push(sample);
            }
        }
        for (s, c) in scenarios.iter().zip(cells) {
            results.push((w, s, c));
        }
    }
    report(o, &results, runs, secs)
}

fn server_conf(www: &Path) -> String {
    format!(
        "  server {{\n    listen 8080 reuseport backlog=4096;\n    root {www};\n    location / {{ }}\n  }}\n\
           server {{\n    listen 8081 http2 reuseport backlog=4096;\n    root {www};\n    location / {{ }}\n  }}\n",
        www = www.display()
    )
}

/// A plain reverse proxy: keep-alive upstream pool, HTTP/2 on 8081.
fn proxy_conf(server: Ipv4Addr) -> String {
    format!(
        "  upstream backend {{\n    server {server}:8080;\n    keepalive 128;\n  }}\n\
           server {{\n    listen 8080 reuseport backlog=4096;\n    listen 8081 http2 reuseport backlog=4096;\n\
             location / {{\n      proxy_pass http://backend;\n      proxy_http_version 1.1;\n\
               proxy_set_header Connection \"\";\n      proxy_buffering on;\n    }}\n  }}\n"
    )
}

/// nginx in `pod` with `servers` inside its http block (2 workers, no
/// access log), waited on until it answers.
fn nginx(mesh: &mut Mesh, pod: &Pod, servers: &str) -> Result<()> {
    let prefix = mesh.cluster.run_dir().join(format!("nginx-{}", pod.name));
    std::fs::create_dir_all(&prefix)?;
    let p = prefix.display();
    let conf = format!(
        "daemon off;\nmaster_process on;\nworker_processes 2;\nuser root;\n\
         pid {p}/nginx.pid;\nerror_log {p}/error.log warn;\nworker_rlimit_nofile 16384;\n\
         events {{ worker_connections 8192; }}\n\
         http {{\n  access_log off;\n  sendfile on;\n  tcp_nodelay on;\n\
           keepalive_timeout 120s;\n  keepalive_requests 100000000;\n\
           http2_max_concurrent_streams 256;\n\
           client_body_temp_path {p}/body;\n  proxy_temp_path {p}/proxy;\n\
           fastcgi_temp_path {p}/fastcgi;\n  uwsgi_temp_path {p}/uwsgi;\n\
           scgi_temp_path {p}/scgi;\n{servers}}}\n"
    );
    let conf_path = prefix.join("nginx.conf");
    std::fs::write(&conf_path, conf)?;
    let mut cmd = pod.command("nginx");
    cmd.arg("-e")
        .arg(prefix.join("error.log"))
        .arg("-p")
        .arg(&prefix)
        .arg("-c")
        .arg(&conf_path);
    mesh.cluster.spawn(&format!("nginx-{}", pod.name), cmd)?;
    // Loopback inside the pod: not captured (an enrolled pod dialling its
    // own IP would go through the mesh, and a waypoint-only Service's pod
    // refuses anything but its waypoint).
    let url = "http://127.0.0.1:8080/".to_owned();
    wait_until(Duration::from_secs(10), || {
        let out = pod
            .command("curl")
            .args(["-s", "-o", "/dev/null", "--max-time", "2", &url])
            .output()
            .ok()?;
        out.status.success().then_some(())
    })
    .with_context(|| {
        format!(
            "nginx in {} did not start: {}",
            pod.key(),
            std::fs::read_to_string(prefix.join("error.log")).unwrap_or_default()
        )
    })
}

fn waypoint_requests(mesh: &Mesh) -> f64 {
    mesh.waypoint_metrics(WAYPOINT)
        .map(|t| metric_sum(&t, REQUESTS, &[]))
        .unwrap_or(f64::NAN)
}

fn measure(
    mesh: &Mesh,
    wrk_script: &Path,
    w: &Workload,
    s: &Scenario,
    secs: u32,
    pids: &[u32],
) -> Result<Sample> {
    let before = waypoint_requests(mesh);
    let cpu0: f64 = pids
        .iter()
        .map(|p| tools::cpu_seconds(*p).unwrap_or(0.0))
        .sum();
    let mut sample = match w.load {
        Load::Wrk { conns, threads } => {
            let url = format!("http://{}/1k.bin", s.h1);
            // Warm-up (connections, pools), then the measured run.
            tools::wrk(&s.client, wrk_script, &url, threads, conns, 1, false)?;
            let r = tools::wrk(&s.client, wrk_script, &url, threads, conns, secs, false)?;
            Sample {
                rps: r.rps,
                p50_us: r.percentile(50.0),
                p99_us: r.percentile(99.0),
                mean_us: r.mean_us,
                requests: r.requests as f64,
                ..Default::default()
            }
        }
        Load::H2load { conns, streams } => {
            let url = format!("http://{}/1k.bin", s.h2);
            h2load(&s.client, &url, conns, streams, secs)?
        }
    };
    let cpu1: f64 = pids
        .iter()
        .map(|p| tools::cpu_seconds(*p).unwrap_or(0.0))
        .sum();
    sample.proxy_cpu_s = cpu1 - cpu0;
    sample.proxy_rss_mib = pids
        .iter()
        .map(|p| tools::rss_mib(*p).map(|r| r.0).unwrap_or(0.0))
        .sum();
    let after = waypoint_requests(mesh);
    let moved = after - before;
    match s.proxy {
        Proxy::Waypoint if moved < sample.requests => bail!(
            "the waypoint counted {moved} requests but the client completed {}: traffic did not go through it",
            sample.requests
        ),
        Proxy::None | Proxy::Nginx if moved > 0.0 => {
            bail!("{} traffic reached the waypoint ({moved} requests)", s.title)
        }
        _ => {}
    }
    Ok(sample)
}

/// `h2load` over HTTP/2 prior knowledge for `secs` (after a 1 s warm-up);
/// fails on any failed or non-2xx request.
fn h2load(pod: &Pod, url: &str, conns: u32, streams: u32, secs: u32) -> Result<Sample> {
    let out = pod
        .command("timeout")
        .args(["-k", "5", &(secs + 30).to_string(), "h2load"])
        .args([
            "-c",
            &conns.to_string(),
            "-m",
            &streams.to_string(),
            "-D",
            &secs.to_string(),
            "--warm-up-time=1",
            url,
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!(
            "h2load failed: {}{}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_h2load(&text).with_context(|| format!("h2load output:\n{text}"))
}

fn parse_h2load(text: &str) -> Result<Sample> {
    let mut s = Sample::default();
    let number = |t: &str| -> Option<f64> { t.trim().trim_end_matches(',').parse().ok() };
    let duration_us = |t: &str| -> Option<f64> {
        let t = t.trim();
        if let Some(v) = t.strip_suffix("us") {
            v.parse().ok()
        } else if let Some(v) = t.strip_suffix("ms") {
            v.parse::<f64>().ok().map(|v| v * 1e3)
        } else if let Some(v) = t.strip_suffix('s') {
            v.parse::<f64>().ok().map(|v| v * 1e6)
        } else {
            None
        }
    };
    let mut ok = 0.0;
    let mut failed = 0.0;
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("finished in ") {
            // "10.00s, 12345.60 req/s, 14.35MB/s"
            s.rps = rest
                .split(',')
                .find(|p| p.contains("req/s"))
                .and_then(|p| number(p.trim().trim_end_matches("req/s")))
                .context("req/s")?;
        } else if let Some(rest) = l.strip_prefix("requests:") {
            for part in rest.split(',') {
                let mut it = part.split_whitespace();
                let (Some(n), Some(what)) = (it.next(), it.next()) else {
                    continue;
                };
                let n: f64 = n.parse().unwrap_or(0.0);
                match what {
                    "succeeded" => ok = n,
                    "failed" | "errored" | "timeout" => failed += n,
                    _ => {}
                }
            }
        } else if let Some(rest) = l.strip_prefix("status codes:") {
            let non2xx: f64 = rest
                .split(',')
                .filter(|p| !p.contains("2xx"))
                .filter_map(|p| p.split_whitespace().next()?.parse::<f64>().ok())
                .sum();
            if non2xx > 0.0 {
                bail!("{non2xx} responses were not 2xx");
            }
        } else if let Some(rest) = l.strip_prefix("time for request:") {
            let f: Vec<&str> = rest.split_whitespace().collect();
            // min max mean sd +/-sd
            s.mean_us = f.get(2).and_then(|v| duration_us(v)).unwrap_or(f64::NAN);
        }
    }
    if failed > 0.0 {
        bail!("{failed} requests failed");
    }
    if ok == 0.0 {
        bail!("no request succeeded");
    }
    s.requests = ok;
    s.p50_us = f64::NAN;
    s.p99_us = f64::NAN;
    Ok(s)
}

fn report(
    o: &Options,
    results: &[(&Workload, &Scenario, Vec<Sample>)],
    runs: usize,
    secs: u32,
) -> Result<()> {
    let med = |v: &[Sample], f: fn(&Sample) -> f64| tools::median(v.iter().map(f));
    let mut table = String::new();
    let _ = writeln!(
        table,
        "\nWaypoint benchmark: median of {runs} x {secs} s per cell (2 vCPU shared by clients, proxies and servers)\n"
    );
    let _ = writeln!(
        table,
        "{:<30} {:<22} {:>10} {:>8} {:>9} {:>9} {:>9} {:>12} {:>9}",
        "workload",
        "path",
        "req/s",
        "vs none",
        "p50 us",
        "p99 us",
        "mean us",
        "proxy CPU us/req",
        "proxy MiB"
    );
    let mut json_rows = Vec::new();
    for (w, s, samples) in results {
        let rps = med(samples, |x| x.rps);
        let base = results
            .iter()
            .find(|(w2, s2, _)| w2.key == w.key && s2.proxy == Proxy::None)
            .map(|(_, _, v)| med(v, |x| x.rps))
            .unwrap_or(f64::NAN);
        let cpu_us = med(samples, |x| {
            if x.requests > 0.0 {
                x.proxy_cpu_s * 1e6 / x.requests
            } else {
                f64::NAN
            }
        });
        let rss = med(samples, |x| x.proxy_rss_mib);
        let _ = writeln!(
            table,
            "{:<30} {:<22} {:>10.0} {:>8.2} {:>9.0} {:>9.0} {:>9.0} {:>12.1} {:>9.1}",
            w.title,
            s.title,
            rps,
            rps / base,
            med(samples, |x| x.p50_us),
            med(samples, |x| x.p99_us),
            med(samples, |x| x.mean_us),
            if s.proxy == Proxy::None {
                f64::NAN
            } else {
                cpu_us
            },
            if s.proxy == Proxy::None {
                f64::NAN
            } else {
                rss
            },
        );
        json_rows.push(json!({
            "workload": w.key, "scenario": s.key,
            "rps": rps, "ratio_vs_no_mesh": rps / base,
            "p50_us": med(samples, |x| x.p50_us), "p99_us": med(samples, |x| x.p99_us),
            "mean_us": med(samples, |x| x.mean_us),
            "proxy_cpu_us_per_request": cpu_us, "proxy_rss_mib": rss,
            "runs": samples.iter().map(|x| json!({"rps": x.rps, "requests": x.requests, "proxy_cpu_s": x.proxy_cpu_s})).collect::<Vec<Value>>(),
        }));
    }
    let _ = writeln!(
        table,
        "\nWeft waypoint path also crosses both ztunnels (HBONE twice); nginx proxies plain TCP. \
         'proxy CPU' is the waypoint process or the nginx proxy's workers only."
    );
    print!("{table}");
    std::fs::create_dir_all(&o.out)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let path = o.out.join(format!("waypoint-{stamp}.json"));
    std::fs::write(
        &path,
        serde_json::to_string_pretty(&json!({
            "quick": o.quick, "runs": runs, "seconds": secs,
            "commit": std::process::Command::new("git").args(["rev-parse", "--short", "HEAD"]).output().ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned()),
            "results": json_rows,
        }))?,
    )?;
    eprintln!("weft-l7bench: wrote {}", path.display());
    Ok(())
}
