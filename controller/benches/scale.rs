//! Control-plane scale benchmark: a synthetic cluster (10,000 pods, 1,000
//! services, a few hundred policies) built from manifests by the real
//! builder, served by the real `XdsServer` over loopback gRPC to 100 real
//! ztunnel config clients (`source::grpc::run`), then one pod change at a
//! time. Reports initial sync time, per-change latency until every ztunnel
//! holds the change (and until the controller has counted every ACK), bytes
//! pushed per change, and controller and ztunnel memory.
//!
//! The ztunnel clients run in a child process (this binary re-executed with
//! `--ztunnels-child`), so each process's RSS is its own. The parent drives
//! the child over stdin/stdout, one JSON object per line.
//!
//! Run: `cargo bench -p weft-controller --bench scale -- [--quick] [--changes N]
//! [--ztunnels N] [--out DIR]` (progress on stderr, the table on stdout, JSON
//! in `bench-results/controller-<utc>.json`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use weft_api::model::{AuthorizationPolicy, Workload};
use weft_api::{proto, MeshModel};
use weft_controller::manifests;
use weft_controller::model;
use weft_controller::xds::{XdsCounters, XdsOptions, XdsServer, XdsStats};
use weft_dataplane::certs::TrustRoots;
use weft_dataplane::control::{ConfigStream, Role, StateSink};
use weft_pki::LocalCa;
use weft_ztunnel::metrics::Metrics;
use weft_ztunnel::state::{MeshState, Snapshot};

const TRUST_DOMAIN: &str = "cluster.local";
const PODS_PER_NAMESPACE: usize = 100;
const POLICIES_PER_NAMESPACE: usize = 3;
const SERVICE_ACCOUNTS_PER_NAMESPACE: usize = 5;
/// Until all clients hold the full model.
const SYNC_TIMEOUT: Duration = Duration::from_secs(300);
/// Until all clients hold one change.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// For the whole change phase: changes stop (and are reported as fewer)
/// once it is spent, so a slow build still ends.
const CHANGES_BUDGET: Duration = Duration::from_secs(900);
/// For a child's reply that needs no model work.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, Debug)]
struct Scale {
    pods: usize,
    services: usize,
    ztunnels: usize,
    changes: usize,
}

impl Scale {
    fn namespaces(&self) -> usize {
        self.pods / PODS_PER_NAMESPACE
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("scale bench: cannot start a Tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = if let Some(i) = args.iter().position(|a| a == "--ztunnels-child") {
        let endpoint = args.get(i + 1).cloned().unwrap_or_default();
        let count = args.get(i + 2).and_then(|n| n.parse().ok()).unwrap_or(0);
        rt.block_on(child_main(endpoint, count))
    } else if args.iter().any(|a| a == "--curve") {
        rt.block_on(curve_main(&args))
    } else {
        rt.block_on(parent_main(&args))
    };
    // The ztunnel clients run forever; do not wait for them.
    rt.shutdown_timeout(Duration::from_millis(100));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("scale bench FAILED: {e:#}");
            ExitCode::FAILURE
        }
    }
}

// ---- the growth curve: one full run per cluster size ----

const CURVE_PODS: [usize; 3] = [1_000, 10_000, 50_000];

/// Runs the bench at each of [`CURVE_PODS`] (a process of its own each, so
/// that one size's memory does not count in the next) with the same number
/// of ztunnels, then prints how each figure grows with the cluster.
async fn curve_main(args: &[String]) -> Result<()> {
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let out_dir = flag("--out").map(PathBuf::from).unwrap_or_else(|| {
        let controller = Path::new(env!("CARGO_MANIFEST_DIR"));
        controller
            .parent()
            .unwrap_or(controller)
            .join("bench-results")
    });
    let exe = std::env::current_exe().context("cannot find the bench's own executable")?;
    let mut runs = Vec::new();
    for pods in CURVE_PODS {
        let dir = out_dir.join(format!("curve-{pods}"));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        let mut cmd = tokio::process::Command::new(&exe);
        cmd.args(["--pods", &pods.to_string()])
            .arg("--out")
            .arg(&dir);
        for name in ["--ztunnels", "--changes"] {
            if let Some(v) = flag(name) {
                cmd.args([name, v]);
            }
        }
        eprintln!("growth curve: {pods} pods");
        let status = cmd.status().await.context("cannot run the bench")?;
        if !status.success() {
            bail!("the run at {pods} pods failed ({status})");
        }
        let newest = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .max()
            .ok_or_else(|| anyhow!("the run at {pods} pods wrote no results"))?;
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&newest)?)
            .with_context(|| format!("reading {}", newest.display()))?;
        runs.push(doc);
    }
    let f = |v: &Value, path: &str| {
        path.split('.')
            .fold(v, |v, k| &v[k])
            .as_f64()
            .unwrap_or(f64::NAN)
    };
    let figures: [(&str, &str, f64); 9] = [
        ("ztunnels", "scale.ztunnels", 1.0),
        (
            "initial sync of all ztunnels, ms",
            "initial_sync.all_applied_ms",
            1.0,
        ),
        (
            "full model per ztunnel, KiB",
            "initial_sync.bytes_pushed",
            1.0 / 1024.0,
        ),
        (
            "change applied by all, p50 ms",
            "changes.all_applied_ms.p50",
            1.0,
        ),
        (
            "change applied by all, p99 ms",
            "changes.all_applied_ms.p99",
            1.0,
        ),
        (
            "change pushed to all, p50 ms",
            "changes.all_pushed_ms.p50",
            1.0,
        ),
        (
            "bytes per change per ztunnel, p50",
            "changes.bytes_per_change_per_ztunnel.p50",
            1.0,
        ),
        (
            "model memory per ztunnel client, MiB",
            "memory_kib.ztunnel_per_client_mib",
            1.0,
        ),
        (
            "controller RSS at the end, MiB",
            "memory_kib.controller.end.rss_kib",
            1.0 / 1024.0,
        ),
    ];
    let mut t = String::new();
    let _ = write!(t, "\nWeft controller scale: growth curve\n  {:<40}", "pods");
    for r in &runs {
        let _ = write!(t, "{:>12}", f(r, "scale.pods"));
    }
    let _ = writeln!(t, "{:>12}", "last/first");
    let mut curve = serde_json::Map::new();
    for (name, path, scale) in figures {
        let _ = write!(t, "  {name:<40}");
        let mut values = Vec::new();
        for r in &runs {
            let mut v = f(r, path) * scale;
            if path == "initial_sync.bytes_pushed" {
                v /= f(r, "scale.ztunnels");
            }
            values.push(v);
            let _ = write!(t, "{v:>12.1}");
        }
        let growth = values.last().unwrap_or(&f64::NAN) / values.first().unwrap_or(&f64::NAN);
        let _ = writeln!(t, "{growth:>11.2}x");
        curve.insert(name.to_owned(), json!(values));
    }
    let _ = writeln!(
        t,
        "  (pods x{:.0} from the first size to the last; a change touches one pod or adds one policy)",
        CURVE_PODS[CURVE_PODS.len() - 1] as f64 / CURVE_PODS[0] as f64
    );
    print!("{t}");
    let path = out_dir.join(format!(
        "controller-curve-{}.json",
        utc_stamp(SystemTime::now())
    ));
    std::fs::write(
        &path,
        serde_json::to_string_pretty(
            &json!({"benchmark": "controller-scale-curve", "pods": CURVE_PODS, "figures": curve}),
        )?,
    )?;
    println!("  results: {}", path.display());
    Ok(())
}

// ---- the child: N ztunnel config clients ----

/// What every ztunnel must show under namespace/name after a change
/// (`None`: absent).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Want {
    Workload(Option<Workload>),
    Policy(Option<AuthorizationPolicy>),
}

impl Want {
    fn shown_by(&self, snap: &Snapshot, ns: &str, name: &str) -> bool {
        match self {
            Want::Workload(w) => snap.workload(ns, name).map(|x| x.workload) == w.as_ref(),
            Want::Policy(p) => {
                snap.policy_model(ns)
                    .policies
                    .iter()
                    .find(|x| x.name == name)
                    == p.as_ref()
            }
        }
    }
}

/// Parent -> child.
#[derive(Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Start the clients; reply `synced` once every MeshState holds this
    /// many workloads and services.
    Start { workloads: usize, services: usize },
    /// Reply `armed`, then `applied` once every MeshState shows `workload`
    /// (None: absent) under namespace/name.
    Expect {
        id: usize,
        namespace: String,
        name: String,
        want: Want,
    },
    /// Reply `memory`.
    Memory,
}

async fn child_main(endpoint: String, count: usize) -> Result<()> {
    if endpoint.is_empty() || count == 0 {
        bail!("usage: --ztunnels-child <http://addr:port> <count>");
    }
    let mut out = tokio::io::stdout();
    // Commands arrive through a task so that a parent that goes away (stdin
    // closed) ends this process even while it is waiting on the clients.
    let (commands, mut input) = tokio::sync::mpsc::channel::<String>(4);
    tokio::spawn(async move {
        let mut lines = BufReader::new(tokio::io::stdin()).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if commands.send(line).await.is_err() {
                break;
            }
        }
        std::process::exit(0);
    });
    let baseline = Rss::read();
    emit(&mut out, json!({"event": "ready", "rss": baseline})).await?;
    let mut states = Vec::new();
    while let Some(line) = input.recv().await {
        let cmd: Command = serde_json::from_str(&line).context("bad command from the parent")?;
        match cmd {
            Command::Start {
                workloads,
                services,
            } => {
                let started = Instant::now();
                for i in 0..count {
                    let state = MeshState::default();
                    let metrics = Metrics::new();
                    tokio::spawn(
                        ConfigStream {
                            endpoint: endpoint.clone().into(),
                            node: node_name(i),
                            token: "bench".to_owned(),
                            role: Role::Ztunnel,
                            trust: TrustRoots::default(),
                            sink: Arc::new(StateSink {
                                state: state.clone(),
                                updates: metrics.common.config_updates.clone(),
                                rejections: metrics.common.config_rejections.clone(),
                            }),
                        }
                        .run(),
                    );
                    states.push(state);
                }
                let done = wait_all(&states, SYNC_TIMEOUT, move |m| {
                    m.workload_count() == workloads && m.service_count() == services
                })
                .await;
                emit(
                    &mut out,
                    json!({"event": "synced", "ok": done.is_some(),
                           "ms": started.elapsed().as_secs_f64() * 1e3, "rss": Rss::read()}),
                )
                .await?;
            }
            Command::Expect {
                id,
                namespace,
                name,
                want,
            } => {
                let want = Arc::new((namespace, name, want));
                let waiting = {
                    let states = states.clone();
                    tokio::spawn(async move {
                        wait_all(&states, CHANGE_TIMEOUT, move |m| {
                            let (ns, name, want) = &*want;
                            want.shown_by(m, ns, name)
                        })
                        .await
                    })
                };
                let armed = Instant::now();
                emit(&mut out, json!({"event": "armed", "id": id})).await?;
                let last = waiting.await.ok().flatten();
                emit(
                    &mut out,
                    json!({"event": "applied", "id": id, "ok": last.is_some(),
                           "since_armed_ms": last.map(|t| t.duration_since(armed).as_secs_f64() * 1e3)}),
                )
                .await?;
            }
            Command::Memory => {
                emit(&mut out, json!({"event": "memory", "rss": Rss::read()})).await?;
            }
        }
    }
    Ok(()) // the parent closed stdin
}

/// Waits until `ready` holds for every state's model; the instant the last
/// one got there, or None on timeout.
async fn wait_all(
    states: &[MeshState],
    timeout: Duration,
    ready: impl Fn(&Snapshot) -> bool + Clone + Send + Sync + 'static,
) -> Option<Instant> {
    let waiters: Vec<_> = states
        .iter()
        .map(|s| {
            let s = s.clone();
            let ready = ready.clone();
            tokio::spawn(async move {
                s.wait_until(timeout, |snap| ready(snap))
                    .await
                    .map(|_| Instant::now())
            })
        })
        .collect();
    let mut last = None;
    for w in waiters {
        let t = w.await.ok().flatten()?;
        last = Some(last.map_or(t, |l: Instant| l.max(t)));
    }
    last
}

async fn emit(out: &mut tokio::io::Stdout, v: Value) -> Result<()> {
    out.write_all(format!("{v}\n").as_bytes()).await?;
    out.flush().await?;
    Ok(())
}

// ---- the parent: cluster, controller, measurements ----

struct Ztunnels {
    _child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Ztunnels {
    async fn spawn(endpoint: &str, count: usize) -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find this benchmark's binary")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("--ztunnels-child")
            .arg(endpoint)
            .arg(count.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("cannot start the ztunnel child process")?;
        let stdin = child.stdin.take().context("child stdin")?;
        let stdout = child.stdout.take().context("child stdout")?;
        Ok(Self {
            _child: child,
            stdin,
            lines: BufReader::new(stdout).lines(),
        })
    }

    async fn send(&mut self, cmd: &Command) -> Result<()> {
        let line = serde_json::to_string(cmd)? + "\n";
        self.stdin.write_all(line.as_bytes()).await?;
        self.stdin.flush().await?;
        Ok(())
    }

    /// The next event named `event` (other lines are skipped).
    async fn recv(&mut self, event: &str, timeout: Duration) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let line = tokio::time::timeout_at(deadline, self.lines.next_line())
                .await
                .map_err(|_| anyhow!("the ztunnel child sent no {event:?} within {timeout:?}"))??
                .ok_or_else(|| anyhow!("the ztunnel child exited before {event:?}"))?;
            if let Ok(v) = serde_json::from_str::<Value>(&line) {
                if v["event"] == event {
                    return Ok(v);
                }
            }
        }
    }
}

fn node_name(i: usize) -> String {
    format!("node-{i:03}")
}

/// 10.16.0.0/12 for pods, by global pod index.
fn pod_ip(g: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 16, 0, 2)) + g as u32)
}

fn service_ip(g: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 10)) + g as u32)
}

/// Writes the cluster as Kubernetes manifests, one file per namespace.
fn write_manifests(dir: &Path, s: &Scale) -> Result<usize> {
    let services_per_ns = s.services / s.namespaces();
    let mut bytes = 0;
    for n in 0..s.namespaces() {
        let ns = format!("ns-{n:03}");
        let mut y = String::new();
        let _ = writeln!(y, "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {ns}, labels: {{weft.dev/dataplane-mode: ambient}}}}");
        for k in 0..PODS_PER_NAMESPACE {
            let g = n * PODS_PER_NAMESPACE + k;
            let ip = pod_ip(g);
            let _ = writeln!(
                y,
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{k:03}, namespace: {ns}, uid: uid-{g:06}, labels: {{app: svc-{app:02}, version: v1}}}}\nspec: {{nodeName: {node}, serviceAccountName: sa-{sa}, containers: [{{name: app, image: app, ports: [{{name: http, containerPort: 8080}}]}}]}}\nstatus: {{phase: Running, podIP: {ip}, podIPs: [{{ip: {ip}}}]}}",
                app = k % services_per_ns,
                node = node_name(g % s.ztunnels),
                sa = k % SERVICE_ACCOUNTS_PER_NAMESPACE,
            );
        }
        for j in 0..services_per_ns {
            let vip = service_ip(n * services_per_ns + j);
            let _ = writeln!(
                y,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{j:02}, namespace: {ns}}}\nspec: {{clusterIP: {vip}, clusterIPs: [{vip}], selector: {{app: svc-{j:02}}}, ports: [{{name: http, port: 80, targetPort: http}}, {{name: grpc, port: 9090, targetPort: 9090}}]}}"
            );
        }
        let peer = format!("ns-{:03}", (n + 1) % s.namespaces());
        for p in 0..POLICIES_PER_NAMESPACE {
            let (action, rule) = match p % 3 {
                0 => ("ALLOW", format!("{{from: [{{source: {{principals: [\"spiffe://{TRUST_DOMAIN}/ns/{peer}/sa/sa-1\"]}}}}], to: [{{operation: {{ports: [8080]}}}}]}}")),
                1 => ("ALLOW", format!("{{from: [{{source: {{namespaces: [{ns}, {peer}]}}}}]}}")),
                _ => ("DENY", "{from: [{source: {ipBlocks: [192.168.0.0/16]}}]}".to_owned()),
            };
            let _ = writeln!(
                y,
                "---\napiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: policy-{p}, namespace: {ns}}}\nspec: {{selector: {{matchLabels: {{app: svc-{app:02}}}}}, action: {action}, rules: [{rule}]}}",
                app = p % services_per_ns,
            );
        }
        let _ = writeln!(y, "---\napiVersion: weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: strict, namespace: {ns}}}\nspec: {{mtls: {{mode: STRICT}}}}");
        bytes += y.len();
        std::fs::write(dir.join(format!("{ns}.yaml")), y)?;
    }
    Ok(bytes)
}

/// One change: the model after it and what every ztunnel must show.
struct Change {
    kind: &'static str,
    model: MeshModel,
    namespace: String,
    name: String,
    want: Want,
}

fn make_change(i: usize, current: &MeshModel, last_added: &mut Option<(String, String)>) -> Change {
    let mut m = current.clone();
    let pick = (i * 7919) % m.workloads.len();
    let edit = |m: &mut MeshModel, kind: &'static str, f: &dyn Fn(&mut Workload)| {
        let w = &mut m.workloads[pick];
        f(w);
        (kind, w.namespace.clone(), w.name.clone(), Some(w.clone()))
    };
    if i % 5 == 4 {
        // A DENY policy added for one app of the pod's namespace.
        let w = &m.workloads[pick];
        let app = w.labels.get("app").cloned().unwrap_or_default();
        let yaml = format!(
            "policies: [{{ name: deny-{i}, namespace: {ns}, selector: {{ app: {app} }}, action: DENY, rules: [{{ from: [{{ ip_blocks: [192.0.2.{last}/32] }}] }}] }}]",
            ns = w.namespace,
            last = i % 250,
        );
        let policy = MeshModel::from_yaml(&yaml)
            .expect("the bench's policy parses")
            .policies
            .remove(0);
        let (namespace, name) = (policy.namespace.clone(), policy.name.clone());
        m.policies.push(policy.clone());
        return Change {
            kind: "policy add",
            model: m,
            namespace,
            name,
            want: Want::Policy(Some(policy)),
        };
    }
    let (kind, namespace, name, workload) = match i % 5 {
        0 => edit(&mut m, "pod IP change", &|w| {
            w.ips = vec![IpAddr::V4(Ipv4Addr::from(
                u32::from(Ipv4Addr::new(10, 200, 0, 2)) + i as u32,
            ))]
        }),
        1 => edit(&mut m, "pod label change", &|w| {
            // Moves the pod to another service of its namespace.
            let app = w.labels.get("app").cloned().unwrap_or_default();
            let next = if app == "svc-00" { "svc-01" } else { "svc-00" };
            w.labels.insert("app".into(), next.into());
            w.labels.insert("version".into(), format!("v{}", i + 2));
        }),
        2 => {
            let base = m.workloads[pick].clone();
            let w = Workload {
                uid: format!("added-{i}"),
                name: format!("added-{i:03}"),
                ips: vec![IpAddr::V4(Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(10, 201, 0, 2)) + i as u32,
                ))],
                ..base
            };
            *last_added = Some((w.namespace.clone(), w.name.clone()));
            m.workloads.push(w.clone());
            ("pod add", w.namespace.clone(), w.name.clone(), Some(w))
        }
        _ => {
            let (ns, name) = last_added.take().unwrap_or_else(|| {
                let w = &m.workloads[pick];
                (w.namespace.clone(), w.name.clone())
            });
            m.workloads
                .retain(|w| !(w.namespace == ns && w.name == name));
            ("pod delete", ns, name, None)
        }
    };
    Change {
        kind,
        model: m,
        namespace,
        name,
        want: Want::Workload(workload),
    }
}

/// VmRSS and VmHWM of this process, in KiB.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
struct Rss {
    rss_kib: u64,
    hwm_kib: u64,
}

impl Rss {
    fn read() -> Self {
        let text = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Rss {
            rss_kib: field("VmRSS:"),
            hwm_kib: field("VmHWM:"),
        }
    }

    fn from_event(v: &Value) -> Self {
        serde_json::from_value(v["rss"].clone()).unwrap_or_default()
    }

    fn mib(&self) -> f64 {
        self.rss_kib as f64 / 1024.0
    }
}

/// Nearest-rank percentile of sorted samples.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

fn acks(c: &XdsCounters) -> &AtomicU64 {
    &c.acks
}

fn pushes(c: &XdsCounters) -> &AtomicU64 {
    &c.pushes
}

/// Polls one counter (every ms, bounded) until it reaches `target`.
async fn counter_reaches(
    counters: &XdsCounters,
    counter: fn(&XdsCounters) -> &AtomicU64,
    target: u64,
    timeout: Duration,
) -> Option<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        if counter(counters).load(Ordering::Relaxed) >= target {
            return Some(Instant::now());
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

struct ChangeResult {
    kind: &'static str,
    all_applied_ms: f64,
    all_acked_ms: f64,
    all_pushed_ms: f64,
    pushes: u64,
    /// Streams that broke (clients reconnecting) during the change.
    stream_errors: u64,
    bytes: u64,
}

async fn parent_main(args: &[String]) -> Result<()> {
    let quick = args.iter().any(|a| a == "--quick");
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
    };
    let mut scale = if quick {
        Scale {
            pods: 1_000,
            services: 100,
            ztunnels: 20,
            changes: 10,
        }
    } else {
        Scale {
            pods: 10_000,
            services: 1_000,
            ztunnels: 100,
            changes: 50,
        }
    };
    if let Some(n) = flag("--pods") {
        // Services, policies and namespaces in proportion (10 pods per
        // Service, 100 per namespace).
        let pods: usize = n.parse().context("--pods wants a number")?;
        if pods < PODS_PER_NAMESPACE || !pods.is_multiple_of(PODS_PER_NAMESPACE) {
            bail!("--pods wants a multiple of {PODS_PER_NAMESPACE}");
        }
        scale.pods = pods;
        scale.services = pods / 10;
    }
    if let Some(n) = flag("--changes") {
        scale.changes = n.parse().context("--changes wants a number")?;
    }
    if let Some(n) = flag("--ztunnels") {
        scale.ztunnels = n.parse().context("--ztunnels wants a number")?;
    }
    let out_dir = flag("--out").map(PathBuf::from).unwrap_or_else(|| {
        let controller = Path::new(env!("CARGO_MANIFEST_DIR"));
        controller
            .parent()
            .unwrap_or(controller)
            .join("bench-results")
    });
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: built without optimizations; run through `cargo bench` for real figures"
        );
    }
    let started_at = SystemTime::now();
    let rss_start = Rss::read();
    eprintln!(
        "scale bench: {} pods, {} services, {} ztunnels, {} changes",
        scale.pods, scale.services, scale.ztunnels, scale.changes
    );

    // The cluster, through the real manifests reader and model builder.
    let dir = tempfile::tempdir()?;
    let manifest_bytes = write_manifests(dir.path(), &scale)?;
    let t = Instant::now();
    let (cluster, mut problems) = manifests::read_dir(dir.path());
    let parse_ms = ms(t.elapsed());
    let t = Instant::now();
    let built = model::build(&cluster, TRUST_DOMAIN);
    let build_ms = ms(t.elapsed());
    // What every change costs the controller before the config server sees
    // it: the builder is level-based and rebuilds the whole model (median
    // of three more builds of the same cluster).
    let rebuild_ms = sorted(
        (0..3)
            .map(|_| {
                let t = Instant::now();
                let again = model::build(&cluster, TRUST_DOMAIN);
                let took = ms(t.elapsed());
                drop(again);
                took
            })
            .collect(),
    )[1];
    drop(cluster);
    problems.extend(built.problems);
    if !problems.is_empty() {
        bail!(
            "the synthetic manifests have {} problems, first: {}",
            problems.len(),
            problems[0]
        );
    }
    let model = built.model;
    if model.workloads.len() != scale.pods || model.services.len() != scale.services {
        bail!(
            "built {} workloads and {} services, expected {} and {}",
            model.workloads.len(),
            model.services.len(),
            scale.pods,
            scale.services
        );
    }
    let one_workload_bytes =
        prost::Message::encoded_len(&proto::Workload::from(&model.workloads[0])) as u64;
    let model_stats = json!({
        "namespaces": model.namespaces.len(), "workloads": model.workloads.len(),
        "services": model.services.len(), "authorization_policies": model.policies.len(),
        "peer_authentications": model.peer_authentications.len(),
        "manifest_bytes": manifest_bytes, "one_workload_encoded_bytes": one_workload_bytes,
    });
    let rss_model = Rss::read();

    // The controller's config server on loopback.
    let (models, models_rx) = watch::channel(Arc::new(model));
    let bundle = LocalCa::generate(TRUST_DOMAIN)
        .map_err(|e| anyhow!("cannot make a CA: {e}"))?
        .trust_bundle();
    let (_trust, trust_rx) = watch::channel(bundle);
    let xds = XdsServer::new(models_rx, trust_rx, XdsOptions::default());
    let counters = xds.counters();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(xds.clone().into_service())
            // TCP_NODELAY as `Server::serve` (the controller's path) sets it;
            // `TcpIncoming::from` alone leaves Nagle on and adds ~40 ms
            // delayed-ACK stalls to every push.
            .serve_with_incoming(TcpIncoming::from(listener).with_nodelay(Some(true))),
    );
    let rss_server = Rss::read();

    // Initial sync.
    let mut zt = Ztunnels::spawn(&endpoint, scale.ztunnels).await?;
    let child_ready = Rss::from_event(&zt.recv("ready", REPLY_TIMEOUT).await?);
    let t = Instant::now();
    zt.send(&Command::Start {
        workloads: scale.pods,
        services: scale.services,
    })
    .await?;
    let synced = zt.recv("synced", SYNC_TIMEOUT + REPLY_TIMEOUT).await?;
    let sync_all_applied_ms = ms(t.elapsed());
    if synced["ok"] != true {
        bail!(
            "initial sync did not converge: not every ztunnel held the full model within {SYNC_TIMEOUT:?}"
        );
    }
    let acked = counter_reaches(&counters, acks, scale.ztunnels as u64, REPLY_TIMEOUT)
        .await
        .ok_or_else(|| anyhow!("the controller did not count {} ACKs", scale.ztunnels))?;
    let sync_all_acked_ms = ms(acked.duration_since(t));
    let sync_child_ms = synced["ms"].as_f64().unwrap_or(f64::NAN);
    let child_synced = Rss::from_event(&synced);
    let after_sync: XdsStats = counters.snapshot();
    eprintln!(
        "initial sync: {sync_all_applied_ms:.0} ms; now {} changes",
        scale.changes
    );
    let rss_subscribed = Rss::read();

    // One pod change at a time.
    let mut results = Vec::new();
    let mut last_added = None;
    let changes_started = Instant::now();
    for i in 0..scale.changes {
        if changes_started.elapsed() > CHANGES_BUDGET {
            eprintln!(
                "change phase over its {CHANGES_BUDGET:?} budget: stopping after {i} of {} changes",
                scale.changes
            );
            break;
        }
        let current = models.borrow().clone();
        let change = make_change(i, &current, &mut last_added);
        drop(current);
        zt.send(&Command::Expect {
            id: i,
            namespace: change.namespace.clone(),
            name: change.name.clone(),
            want: change.want.clone(),
        })
        .await?;
        zt.recv("armed", REPLY_TIMEOUT).await?;
        let before = counters.snapshot();
        let n = scale.ztunnels as u64;
        let t0 = Instant::now();
        models.send_replace(Arc::new(change.model));
        let watch_counter = |counter, target| {
            let counters = counters.clone();
            tokio::spawn(async move {
                counter_reaches(&counters, counter, target, CHANGE_TIMEOUT).await
            })
        };
        let pushed = watch_counter(pushes, before.pushes + n);
        let acks = watch_counter(acks, before.acks + n);
        let applied = zt.recv("applied", CHANGE_TIMEOUT + REPLY_TIMEOUT).await?;
        let all_applied = t0.elapsed();
        if applied["ok"] != true {
            bail!(
                "change {i} ({}) did not reach every ztunnel within {CHANGE_TIMEOUT:?}",
                change.kind
            );
        }
        let acked = acks
            .await?
            .ok_or_else(|| anyhow!("change {i}: the controller did not count every ACK"))?;
        let pushed = pushed
            .await?
            .ok_or_else(|| anyhow!("change {i}: the controller did not push to every ztunnel"))?;
        let after = counters.snapshot();
        if after.nacks != before.nacks {
            bail!("change {i} ({}) was NACKed", change.kind);
        }
        eprintln!(
            "change {}/{} ({}): {:.1} ms, {} B",
            i + 1,
            scale.changes,
            change.kind,
            ms(all_applied),
            after.bytes_pushed - before.bytes_pushed
        );
        results.push(ChangeResult {
            kind: change.kind,
            all_applied_ms: ms(all_applied),
            all_acked_ms: ms(acked.duration_since(t0)),
            all_pushed_ms: ms(pushed.duration_since(t0)),
            pushes: after.pushes - before.pushes,
            stream_errors: after.rejected - before.rejected,
            bytes: after.bytes_pushed - before.bytes_pushed,
        });
    }
    zt.send(&Command::Memory).await?;
    let child_end = Rss::from_event(&zt.recv("memory", REPLY_TIMEOUT).await?);
    let rss_end = Rss::read();
    let final_stats = counters.snapshot();
    drop(zt); // kills the child

    // Report.
    let applied = sorted(results.iter().map(|r| r.all_applied_ms).collect());
    let acked = sorted(results.iter().map(|r| r.all_acked_ms).collect());
    let pushed = sorted(results.iter().map(|r| r.all_pushed_ms).collect());
    let stream_errors: u64 = results.iter().map(|r| r.stream_errors).sum();
    let bytes = sorted(results.iter().map(|r| r.bytes as f64).collect());
    let per_sub = sorted(
        results
            .iter()
            .map(|r| r.bytes as f64 / r.pushes.max(1) as f64)
            .collect(),
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let n = scale.ztunnels as f64;
    let zt_per_client_mib = (child_synced.mib() - child_ready.mib()) / n;
    let controller_subs_mib = rss_subscribed.mib() - rss_server.mib();
    let mut by_kind: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for r in &results {
        by_kind.entry(r.kind).or_default().push(r.all_applied_ms);
    }

    let mut t = String::new();
    let _ = writeln!(
        t,
        "\nWeft controller scale benchmark ({})",
        if quick { "quick" } else { "full" }
    );
    let _ = writeln!(t, "  cluster: {} pods, {} services, {} authz policies, {} peer authns, {} namespaces; {} ztunnels (= nodes)",
        scale.pods, scale.services, model_stats["authorization_policies"], model_stats["peer_authentications"],
        scale.namespaces(), scale.ztunnels);
    let row = |t: &mut String, k: &str, v: String| {
        let _ = writeln!(t, "  {k:<52} {v}");
    };
    row(
        &mut t,
        "manifests parsed (read_dir, YAML -> k8s objects)",
        format!(
            "{parse_ms:.0} ms ({:.1} MiB of YAML)",
            manifest_bytes as f64 / 1048576.0
        ),
    );
    row(
        &mut t,
        "model built (model_builder::build, full rebuild)",
        format!("{build_ms:.0} ms"),
    );
    row(
        &mut t,
        "model rebuilt per change (not in the change figures)",
        format!("{rebuild_ms:.1} ms"),
    );
    row(
        &mut t,
        "initial sync: all ztunnels hold the full model",
        format!("{sync_all_applied_ms:.0} ms (child-measured {sync_child_ms:.0} ms)"),
    );
    row(
        &mut t,
        "initial sync: controller counted every ACK",
        format!("{sync_all_acked_ms:.0} ms"),
    );
    row(
        &mut t,
        "initial sync: bytes pushed (total / per ztunnel)",
        format!(
            "{:.1} MiB / {:.0} KiB",
            after_sync.bytes_pushed as f64 / 1048576.0,
            after_sync.bytes_pushed as f64 / n / 1024.0
        ),
    );
    row(
        &mut t,
        "pod changes measured (one at a time)",
        format!("{} of {}", results.len(), scale.changes),
    );
    row(
        &mut t,
        "change -> controller pushed to every ztunnel  p50 / p99",
        format!(
            "{:.1} / {:.1} ms",
            percentile(&pushed, 50.0),
            percentile(&pushed, 99.0)
        ),
    );
    row(
        &mut t,
        "change -> every ztunnel applied it  p50 / p99 / max",
        format!(
            "{:.1} / {:.1} / {:.1} ms",
            percentile(&applied, 50.0),
            percentile(&applied, 99.0),
            percentile(&applied, 100.0)
        ),
    );
    row(
        &mut t,
        "change -> controller counted every ACK  p50 / p99",
        format!(
            "{:.1} / {:.1} ms",
            percentile(&acked, 50.0),
            percentile(&acked, 99.0)
        ),
    );
    for (k, v) in &by_kind {
        let v = sorted(v.clone());
        row(
            &mut t,
            &format!("  {k} ({}x) p50 / max", v.len()),
            format!(
                "{:.1} / {:.1} ms",
                percentile(&v, 50.0),
                percentile(&v, 100.0)
            ),
        );
    }
    row(
        &mut t,
        "config streams broken during changes (reconnects)",
        format!("{stream_errors} (resume pushes count in the bytes)"),
    );
    row(
        &mut t,
        "bytes pushed per change (all ztunnels)  p50 / max",
        format!(
            "{:.0} / {:.0} B",
            percentile(&bytes, 50.0),
            percentile(&bytes, 100.0)
        ),
    );
    row(
        &mut t,
        "bytes pushed per change per ztunnel  p50 / max",
        format!(
            "{:.0} / {:.0} B (one workload encoded: {one_workload_bytes} B)",
            percentile(&per_sub, 50.0),
            percentile(&per_sub, 100.0)
        ),
    );
    row(
        &mut t,
        "controller RSS: start / model built / serving",
        format!(
            "{:.1} / {:.1} / {:.1} MiB",
            rss_start.mib(),
            rss_model.mib(),
            rss_server.mib()
        ),
    );
    row(
        &mut t,
        "controller RSS: all subscribed / end (peak)",
        format!(
            "{:.1} / {:.1} MiB ({:.1} MiB)",
            rss_subscribed.mib(),
            rss_end.mib(),
            rss_end.hwm_kib as f64 / 1024.0
        ),
    );
    row(
        &mut t,
        "controller RSS growth for the subscribers",
        format!(
            "{controller_subs_mib:.1} MiB ({:.0} KiB per ztunnel)",
            controller_subs_mib * 1024.0 / n
        ),
    );
    row(
        &mut t,
        "ztunnel process RSS: empty / synced / end (peak)",
        format!(
            "{:.1} / {:.1} / {:.1} MiB ({:.1} MiB)",
            child_ready.mib(),
            child_synced.mib(),
            child_end.mib(),
            child_end.hwm_kib as f64 / 1024.0
        ),
    );
    row(
        &mut t,
        "ztunnel model memory per client (synced - empty) / N",
        format!("{zt_per_client_mib:.2} MiB"),
    );
    let _ = writeln!(
        t,
        "  (all {} ztunnel clients share one child process; the controller is the parent process)",
        scale.ztunnels
    );
    print!("{t}");

    let doc = json!({
        "benchmark": "controller-scale",
        "mode": if quick { "quick" } else { "full" },
        "started": utc_stamp(started_at),
        "scale": {"pods": scale.pods, "services": scale.services, "ztunnels": scale.ztunnels,
                  "changes": scale.changes, "changes_done": results.len()},
        "model": model_stats,
        "builder": {"parse_ms": parse_ms, "build_ms": build_ms, "rebuild_ms": rebuild_ms},
        "initial_sync": {
            "all_applied_ms": sync_all_applied_ms, "child_measured_ms": sync_child_ms,
            "all_acked_ms": sync_all_acked_ms, "bytes_pushed": after_sync.bytes_pushed,
            "pushes": after_sync.pushes, "full_pushes": after_sync.full_pushes,
        },
        "changes": {
            "all_applied_ms": {"p50": percentile(&applied, 50.0), "p99": percentile(&applied, 99.0),
                               "max": percentile(&applied, 100.0), "mean": mean(&applied)},
            "all_pushed_ms": {"p50": percentile(&pushed, 50.0), "p99": percentile(&pushed, 99.0),
                              "max": percentile(&pushed, 100.0)},
            "stream_errors": stream_errors,
            "all_acked_ms": {"p50": percentile(&acked, 50.0), "p99": percentile(&acked, 99.0),
                             "max": percentile(&acked, 100.0)},
            "bytes_per_change": {"p50": percentile(&bytes, 50.0), "max": percentile(&bytes, 100.0), "mean": mean(&bytes)},
            "bytes_per_change_per_ztunnel": {"p50": percentile(&per_sub, 50.0), "max": percentile(&per_sub, 100.0)},
            "samples": results.iter().map(|r| json!({"kind": r.kind, "all_applied_ms": r.all_applied_ms,
                "all_acked_ms": r.all_acked_ms, "all_pushed_ms": r.all_pushed_ms,
                "stream_errors": r.stream_errors, "pushes": r.pushes, "bytes": r.bytes})).collect::<Vec<_>>(),
        },
        "memory_kib": {
            "controller": {"start": rss_start, "model_built": rss_model, "serving": rss_server,
                           "subscribed": rss_subscribed, "end": rss_end},
            "ztunnels_process": {"empty": child_ready, "synced": child_synced, "end": child_end},
            "ztunnel_per_client_mib": zt_per_client_mib,
        },
        "xds_counters_end": {"pushes": final_stats.pushes, "bytes_pushed": final_stats.bytes_pushed,
            "full_pushes": final_stats.full_pushes, "acks": final_stats.acks, "nacks": final_stats.nacks,
            "rejected": final_stats.rejected, "subscribers": final_stats.subscribers},
    });
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let path = out_dir.join(format!("controller-{}.json", utc_stamp(started_at)));
    std::fs::write(&path, serde_json::to_string_pretty(&doc)?)
        .with_context(|| format!("cannot write {}", path.display()))?;
    println!("  results: {}", path.display());
    Ok(())
}

/// `YYYYMMDDTHHMMSSZ`, as the data-path benchmark names its results.
fn utc_stamp(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}{month:02}{day:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}
