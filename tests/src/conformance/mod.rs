//! The Gateway API mesh conformance cases (`tests/conformance/`, upstream
//! data) run on the simulated cluster: a mesh with the controller in
//! embedded mode, the upstream `manifests.yaml` and one case's routes
//! written into the folder it watches, so the controller's real
//! translation and status run; the echo Deployments become pods the
//! harness starts (with the Deployment's labels) running `weft-echo`; a
//! waypoint Gateway serves the mesh namespace (the mesh profile: clients
//! in the mesh, routes with Service parents). Each case waits for its
//! routes to be Accepted (`/debug/status` on the controller's 15014), then
//! checks every expectation ported in `cases` from a mesh client pod.
//!
//! A case needing a feature Weft does not declare in
//! [`SUPPORTED_FEATURES`] fails at once as "unsupported feature", as does a
//! route the controller reports it could not apply whole; nothing is
//! skipped. With `WEFT_CONFORMANCE_RESULTS` set, each case also writes its
//! result there as JSON for the report (`report`).

pub mod cases;
pub mod check;
pub mod report;

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;
use serde_yaml::Value as Yaml;
use sha2::{Digest, Sha256};
use weft_api::model::USE_WAYPOINT_LABEL;

use self::cases::{Case, Check, Expect, Host, Protocol, MESH_NS};
use self::check::Target;
use crate::cluster::Pod;
use crate::mesh::{bin_path, wait_until, Mesh};

/// The features Weft declares; a case needing another fails as
/// unsupported. The report lists the rest as unsupported.
pub const SUPPORTED_FEATURES: &[&str] = &[
    "GRPCRoute",
    "HTTPRoute",
    "HTTPRoute303RedirectStatusCode",
    "HTTPRoute307RedirectStatusCode",
    "HTTPRoute308RedirectStatusCode",
    "HTTPRouteParentRefPort",
    "HTTPRouteResponseHeaderModification",
    "Mesh",
    "MeshConsumerRoute",
    "MeshHTTPRouteBackendRequestHeaderModification",
    "MeshHTTPRouteNamedRouteRule",
    "MeshHTTPRouteQueryParamMatching",
    "MeshHTTPRouteRedirectPath",
    "MeshHTTPRouteRedirectPort",
    "MeshHTTPRouteRewritePath",
    "MeshHTTPRouteSchemeRedirect",
];

/// The waypoint Gateway serving the mesh namespace.
pub const WAYPOINT: &str = "waypoint";
/// Nodes of the simulated cluster; the echo pods are spread over them.
const NODES: usize = 2;
/// Where each case writes its result when set.
pub const RESULTS_ENV: &str = "WEFT_CONFORMANCE_RESULTS";

/// The upstream data in the repository.
pub fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance")
}

/// A case by its upstream short name.
pub fn case(name: &str) -> Option<Case> {
    cases::all().into_iter().find(|c| c.name == name)
}

/// One case's outcome, as the report reads it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct CaseResult {
    pub name: String,
    pub passed: bool,
    /// Features Weft does not support that the case needs.
    #[serde(default)]
    pub unsupported: Vec<String>,
    /// One line per expectation that did not hold (or the set-up that
    /// failed).
    #[serde(default)]
    pub failures: Vec<String>,
    #[serde(default)]
    pub seconds: f64,
}

/// Runs the case `name` on a fresh mesh; panics with every failure.
pub fn run(name: &str) {
    let started = Instant::now();
    let Some(case) = case(name) else {
        panic!("no conformance case {name:?} in weft_e2e::conformance::cases");
    };
    let unsupported: Vec<String> = case
        .features
        .iter()
        .filter(|f| !SUPPORTED_FEATURES.contains(f))
        .map(|f| (*f).to_owned())
        .collect();
    let failures = if unsupported.is_empty() {
        match run_case(&case) {
            Ok(f) => f,
            Err(e) => vec![format!("{e:#}")],
        }
    } else {
        vec![format!(
            "unsupported feature: {} (Weft does not declare it; see docs/conformance/report.yaml)",
            unsupported.join(", ")
        )]
    };
    let result = CaseResult {
        name: name.to_owned(),
        passed: failures.is_empty(),
        unsupported,
        failures,
        seconds: started.elapsed().as_secs_f64(),
    };
    if let Some(dir) = std::env::var_os(RESULTS_ENV) {
        let path = Path::new(&dir).join(format!("{name}.json"));
        let written = std::fs::create_dir_all(&dir).and_then(|()| {
            std::fs::write(
                &path,
                serde_json::to_string_pretty(&result).unwrap_or_default(),
            )
        });
        if let Err(e) = written {
            panic!("writing {}: {e}", path.display());
        }
    }
    assert!(
        result.passed,
        "conformance case {name} ({}) failed:\n  - {}",
        case.file,
        result.failures.join("\n  - ")
    );
}

/// Set-up, routes, checks. `Ok` holds the failed expectations.
fn run_case(case: &Case) -> Result<Vec<String>> {
    let t0 = Instant::now();
    let h = Harness::start()?;
    eprintln!("{}: mesh ready after {:?}", case.name, t0.elapsed());
    let routes = h.apply_case(case)?;
    if let Err(e) = h.wait_routes_applied(&routes) {
        return Ok(vec![format!("{e:#}")]);
    }
    eprintln!("{}: routes applied after {:?}", case.name, t0.elapsed());
    let mut failures = Vec::new();
    match &case.check {
        Check::Requests(list) => {
            for e in list {
                if let Err(why) = h.expect(e) {
                    failures.push(format!("{}: {why}", e.name));
                }
            }
        }
        Check::Weights {
            request,
            weights,
            batch,
        } => {
            if let Err(why) = h.weights(request, weights, *batch) {
                failures.push(why);
            }
        }
    }
    if !failures.is_empty() {
        failures.push(format!(
            "waypoint log (last lines):\n{}",
            tail(&h.mesh.waypoint_log(WAYPOINT), 30)
        ));
    }
    Ok(failures)
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// An echo pod the harness started for a Deployment.
struct EchoPod {
    pod: Pod,
    labels: BTreeMap<String, String>,
}

impl EchoPod {
    fn matches(&self, namespace: &str, selector: &str) -> bool {
        self.pod.namespace == namespace
            && selector.split(',').all(|kv| {
                kv.split_once('=')
                    .is_some_and(|(k, v)| self.labels.get(k).map(String::as_str) == Some(v))
            })
    }
}

/// A route of a case, as its status is keyed.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct RouteRef {
    kind: String,
    namespace: String,
    name: String,
}

/// The mesh with the upstream manifests applied.
struct Harness {
    mesh: Mesh,
    pods: Vec<EchoPod>,
    /// ClusterIPs the harness gave the upstream Services, as an API
    /// server would.
    vips: BTreeMap<(String, String), Ipv4Addr>,
    folder: PathBuf,
}

/// The waypoint goes first: its pooled connections to the echo pods would
/// otherwise hold each ztunnel's drain for its whole timeout.
impl Drop for Harness {
    fn drop(&mut self) {
        let spawns: Vec<String> = self.mesh.waypoints.iter().map(|w| w.1.clone()).collect();
        for spawn in spawns {
            let _ = self.mesh.cluster.stop(&spawn, Duration::from_secs(2));
        }
    }
}

fn read_yaml_docs(path: &Path) -> Result<Vec<Yaml>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut docs = Vec::new();
    for d in serde_yaml::Deserializer::from_str(&text) {
        let v: Yaml = serde::Deserialize::deserialize(d)
            .with_context(|| format!("parsing {}", path.display()))?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

fn s<'a>(v: &'a Yaml, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(*p)?;
    }
    cur.as_str()
}

fn labels_of(v: Option<&Yaml>) -> BTreeMap<String, String> {
    v.and_then(Yaml::as_mapping)
        .map(|m| {
            m.iter()
                .filter_map(|(k, v)| Some((k.as_str()?.to_owned(), v.as_str()?.to_owned())))
                .collect()
        })
        .unwrap_or_default()
}

/// `{deployment}-{replica set hash}-{pod hash}`, as Kubernetes names a
/// Deployment's pods (the weight cases strip the two hashes).
fn pod_name(namespace: &str, deployment: &str, replica: usize) -> String {
    let h = Sha256::digest(format!("{namespace}/{deployment}").as_bytes());
    let hex: String = h.iter().map(|b| format!("{b:02x}")).collect();
    let p = Sha256::digest(format!("{namespace}/{deployment}/{replica}").as_bytes());
    let phex: String = p.iter().map(|b| format!("{b:02x}")).collect();
    format!("{deployment}-{}-{}", &hex[..10], &phex[..5])
}

/// The echo app's ports from the upstream container args (`--port=`,
/// `--grpc=`, `--tcp=`; ports also named by `--tls=` serve TLS, which no
/// case uses, and are left out). The upstream app's defaults without args.
fn echo_ports(args: &[String]) -> (Vec<u16>, Vec<u16>, Vec<u16>) {
    let values = |flag: &str| -> Vec<u16> {
        args.iter()
            .filter_map(|a| a.strip_prefix(&format!("--{flag}=")))
            .filter_map(|p| p.parse().ok())
            .collect()
    };
    if args.is_empty() {
        return (vec![8080], vec![7070], vec![9090]);
    }
    let tls = values("tls");
    let http = values("port")
        .into_iter()
        .filter(|p| !tls.contains(p))
        .collect();
    (http, values("grpc"), values("tcp"))
}

impl Harness {
    /// A mesh with the upstream namespaces (enrolled, the mesh namespace
    /// using the waypoint), the waypoint, one pod per Deployment replica
    /// running `weft-echo`, and the upstream Services.
    fn start() -> Result<Harness> {
        let docs = read_yaml_docs(&data_dir().join("manifests.yaml"))?;
        let mut mesh = Mesh::with_controller(NODES, &[])?;
        let folder = mesh
            .manifests_dir()
            .context("the mesh has no manifests folder")?
            .join("conformance");
        std::fs::create_dir_all(&folder)?;

        // Namespaces: as upstream, plus what the mesh profile set-up adds
        // (upstream implementations label them the same way): enrolled,
        // and the mesh namespace's Services through its waypoint.
        for d in docs.iter().filter(|d| s(d, &["kind"]) == Some("Namespace")) {
            let name = s(d, &["metadata", "name"]).context("Namespace without a name")?;
            mesh.set_ambient(name, true);
            let ns = mesh
                .model
                .namespaces
                .iter_mut()
                .find(|n| n.name == name)
                .context("namespace just added")?;
            ns.labels
                .extend(labels_of(d.get("metadata").and_then(|m| m.get("labels"))));
            if name == MESH_NS {
                ns.labels
                    .insert(USE_WAYPOINT_LABEL.to_owned(), WAYPOINT.to_owned());
            }
        }
        mesh.add_waypoint(NODES - 1, MESH_NS, WAYPOINT)?;

        // Deployments: the pods their ReplicaSets would make.
        let mut pods = Vec::new();
        let mut starts = Vec::new();
        for d in docs
            .iter()
            .filter(|d| s(d, &["kind"]) == Some("Deployment"))
        {
            let ns = s(d, &["metadata", "namespace"]).unwrap_or("default");
            let deployment = s(d, &["metadata", "name"]).context("Deployment without a name")?;
            let template = d.get("spec").and_then(|s| s.get("template"));
            let labels = labels_of(
                template
                    .and_then(|t| t.get("metadata"))
                    .and_then(|m| m.get("labels")),
            );
            let sa = template
                .and_then(|t| s(t, &["spec", "serviceAccountName"]))
                .unwrap_or("default")
                .to_owned();
            let args: Vec<String> = template
                .and_then(|t| t.get("spec"))
                .and_then(|s| s.get("containers"))
                .and_then(|c| c.get(0))
                .and_then(|c| c.get("args"))
                .and_then(Yaml::as_sequence)
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            let replicas = d
                .get("spec")
                .and_then(|s| s.get("replicas"))
                .and_then(Yaml::as_u64)
                .unwrap_or(1) as usize;
            for r in 0..replicas {
                let name = pod_name(ns, deployment, r);
                let node = pods.len() % NODES;
                let pod = mesh.add_pod(node, ns, &name, &sa)?;
                // Exactly the Deployment's labels (`add_pod` gave it
                // `app=<name>`); written once every pod exists.
                if let Some(w) = mesh
                    .model
                    .workloads
                    .iter_mut()
                    .find(|w| w.namespace == ns && w.name == name)
                {
                    w.labels = labels.clone();
                }
                starts.push((pod.clone(), echo_ports(&args)));
                pods.push(EchoPod {
                    pod,
                    labels: labels.clone(),
                });
            }
        }
        mesh.write_model()?;
        for (pod, (http, grpc, tcp)) in starts {
            let mut cmd = pod.command_os(bin_path("weft-echo"));
            cmd.args(["serve", "--pod", &pod.name, "--namespace", &pod.namespace]);
            for (flag, ports) in [("--http", &http), ("--grpc", &grpc), ("--tcp", &tcp)] {
                for p in ports {
                    cmd.args([flag, &p.to_string()]);
                }
            }
            let spawn = format!("echo-{}-{}", pod.namespace, pod.name);
            mesh.cluster.spawn(&spawn, cmd)?;
            mesh.cluster
                .wait_for_log(&spawn, "listening", Duration::from_secs(10))
                .with_context(|| format!("weft-echo in {}", pod.key()))?;
        }

        // Everything else of manifests.yaml as written (the Services, with
        // the ClusterIP an API server would assign).
        let mut vips = BTreeMap::new();
        let mut text = String::new();
        for mut d in docs {
            match s(&d, &["kind"]) {
                Some("Namespace" | "Deployment") => continue,
                Some("Service") => {
                    let ns = s(&d, &["metadata", "namespace"])
                        .unwrap_or("default")
                        .to_owned();
                    let name = s(&d, &["metadata", "name"]).unwrap_or("").to_owned();
                    let vip = mesh.next_vip();
                    if let Some(spec) = d.get_mut("spec").and_then(Yaml::as_mapping_mut) {
                        spec.insert("clusterIP".into(), vip.to_string().into());
                        spec.insert(
                            "clusterIPs".into(),
                            Yaml::Sequence(vec![vip.to_string().into()]),
                        );
                    }
                    vips.insert((ns, name), vip);
                }
                _ => {}
            }
            text += "---\n";
            text += &serde_yaml::to_string(&d)?;
        }
        let h = Harness {
            mesh,
            pods,
            vips,
            folder,
        };
        h.write("manifests.yaml", &text)?;
        h.wait_services()?;
        Ok(h)
    }

    fn write(&self, file: &str, text: &str) -> Result<()> {
        let path = self.folder.join(file);
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Waits until every ztunnel and the waypoint know every Service.
    fn wait_services(&self) -> Result<()> {
        let want: BTreeSet<(String, String)> = self.vips.keys().cloned().collect();
        let has_all = |dump: &Value| {
            let got: BTreeSet<(String, String)> = dump["model"]["services"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|s| {
                    (
                        s["namespace"].as_str().unwrap_or("").to_owned(),
                        s["name"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect();
            want.is_subset(&got)
        };
        for node in 0..NODES {
            wait_until(Duration::from_secs(20), || {
                has_all(&self.mesh.config_dump(node).ok()?).then_some(())
            })
            .with_context(|| format!("the ztunnel on node {node} did not get the Services"))?;
        }
        wait_until(Duration::from_secs(20), || {
            has_all(&self.waypoint_dump().ok()?).then_some(())
        })
        .context("the waypoint did not get the Services")
    }

    fn waypoint_dump(&self) -> Result<Value> {
        let (pod, _, _) = self.mesh.waypoints.first().context("no waypoint running")?;
        let out = pod
            .command("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                "http://127.0.0.1:15000/config_dump",
            ])
            .output()?;
        if !out.status.success() {
            bail!("{}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Writes the case's routes as they are upstream; returns them.
    fn apply_case(&self, case: &Case) -> Result<Vec<RouteRef>> {
        let path = data_dir().join("tests").join(case.file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let routes = read_yaml_docs(&path)?
            .iter()
            .map(|d| RouteRef {
                kind: s(d, &["kind"]).unwrap_or("").to_owned(),
                namespace: s(d, &["metadata", "namespace"])
                    .unwrap_or("default")
                    .to_owned(),
                name: s(d, &["metadata", "name"]).unwrap_or("").to_owned(),
            })
            .collect();
        self.write("case.yaml", &text)?;
        Ok(routes)
    }

    /// The controller's status tree (`/debug/status`).
    fn status(&self) -> Result<Value> {
        let text = self.mesh.node_exec(
            0,
            "curl",
            &[
                "-sS",
                "--max-time",
                "5",
                "http://127.0.0.1:15014/debug/status",
            ],
        )?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Every route Accepted on every parent (upstream waits the same way
    /// before sending), applied whole, and in the waypoint's model.
    fn wait_routes_applied(&self, routes: &[RouteRef]) -> Result<()> {
        let verdict = |st: &Value| -> Result<(), String> {
            let mut pending = Vec::new();
            for r in routes {
                let parents = st[&r.namespace][&r.kind][&r.name]["parents"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if parents.is_empty() {
                    pending.push(format!(
                        "{} {}/{}: no status yet",
                        r.kind, r.namespace, r.name
                    ));
                }
                for p in parents {
                    let conds = p["conditions"].as_array().cloned().unwrap_or_default();
                    let cond = |t: &str| conds.iter().find(|c| c["type"] == t).cloned();
                    let at = format!(
                        "{} {}/{} parent {}",
                        r.kind, r.namespace, r.name, p["parentRef"]
                    );
                    match cond("Accepted") {
                        Some(c) if c["status"] == "True" => {}
                        Some(c) => pending.push(format!(
                            "{at}: Accepted=False {}: {}",
                            c["reason"], c["message"]
                        )),
                        None => pending.push(format!("{at}: no Accepted condition")),
                    }
                    if let Some(c) = cond("PartiallyInvalid").filter(|c| c["status"] == "True") {
                        pending.push(format!(
                            "{at}: unsupported feature: rules dropped ({}: {})",
                            c["reason"], c["message"]
                        ));
                    }
                    if let Some(c) = cond("ResolvedRefs").filter(|c| {
                        c["status"] == "False"
                            && matches!(
                                c["reason"].as_str(),
                                Some("RefNotPermitted" | "InvalidKind")
                            )
                    }) {
                        pending.push(format!(
                            "{at}: unsupported feature: ResolvedRefs=False {}: {}",
                            c["reason"], c["message"]
                        ));
                    }
                }
            }
            if pending.is_empty() {
                Ok(())
            } else {
                Err(pending.join("; "))
            }
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let last = match self.status() {
                Ok(st) => match verdict(&st) {
                    Ok(()) => break,
                    Err(e) => e,
                },
                Err(e) => format!("reading /debug/status: {e:#}"),
            };
            if Instant::now() >= deadline {
                bail!("routes not accepted within 30s: {last}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let in_waypoint = |dump: &Value| {
            routes.iter().all(|r| {
                let list = match r.kind.as_str() {
                    "GRPCRoute" => &dump["model"]["grpc_routes"],
                    _ => &dump["model"]["http_routes"],
                };
                list.as_array().into_iter().flatten().any(|x| {
                    x["namespace"].as_str() == Some(&r.namespace)
                        && x["name"].as_str() == Some(&r.name)
                })
            })
        };
        wait_until(Duration::from_secs(20), || {
            in_waypoint(&self.waypoint_dump().ok()?).then_some(())
        })
        .context("the waypoint did not get the case's routes")
    }

    fn client(&self, (namespace, selector): (&str, &str)) -> Result<&Pod> {
        self.pods
            .iter()
            .find(|p| p.matches(namespace, selector))
            .map(|p| &p.pod)
            .with_context(|| format!("no pod {selector} in {namespace}"))
    }

    /// What the client's DNS would answer for the request's host.
    fn target(&self, e: &Expect) -> Result<Target> {
        let default_port = match e.protocol {
            Protocol::Http => 80,
            Protocol::Grpc => 7070,
        };
        match &e.host {
            Host::PodIp { selector, port } => {
                let ip = self.client((MESH_NS, selector))?.ip;
                Ok(Target {
                    authority: format!("{ip}:{port}"),
                    host: ip.to_string(),
                    port: *port,
                    ip,
                })
            }
            Host::Name(authority) => {
                let (host, port) = match authority.rsplit_once(':') {
                    Some((h, p)) => (h, p.parse().context("port")?),
                    None => (authority.as_str(), default_port),
                };
                let ip = match host.parse::<Ipv4Addr>() {
                    Ok(ip) => ip,
                    Err(_) => {
                        let short = host
                            .trim_end_matches(".cluster.local")
                            .trim_end_matches(".svc");
                        let (svc, ns) = short.split_once('.').unwrap_or((short, e.client.0));
                        *self
                            .vips
                            .get(&(ns.to_owned(), svc.to_owned()))
                            .with_context(|| format!("{host} names no Service"))?
                    }
                };
                Ok(Target {
                    authority: authority.clone(),
                    host: host.to_owned(),
                    port,
                    ip,
                })
            }
        }
    }

    fn expect(&self, e: &Expect) -> Result<(), String> {
        let client = self.client(e.client).map_err(|e| format!("{e:#}"))?;
        let t = self.target(e).map_err(|e| format!("{e:#}"))?;
        check::eventually(client, &t, e)
    }

    /// Upstream: the request succeeds first, then up to 10 tries of the
    /// distribution.
    fn weights(&self, e: &Expect, weights: &[(&str, f64)], batch: bool) -> Result<(), String> {
        self.expect(e)?;
        let client = self.client(e.client).map_err(|e| format!("{e:#}"))?;
        let t = self.target(e).map_err(|e| format!("{e:#}"))?;
        let mut tries = Vec::new();
        for i in 1..=10 {
            match check::distribution(client, &t, e, weights, batch) {
                Ok(()) => return Ok(()),
                Err(why) => tries.push(format!("try {i}/10: {why}")),
            }
        }
        Err(format!(
            "weighted distribution tests failed:\n    {}",
            tries.join("\n    ")
        ))
    }
}

/// The result files of a run, by case name.
pub fn read_results(dir: &Path) -> BTreeMap<String, CaseResult> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(text) = std::fs::read_to_string(entry.path()) else {
            continue;
        };
        if let Ok(r) = serde_json::from_str::<CaseResult>(&text) {
            out.insert(r.name.clone(), r);
        }
    }
    out
}

/// What a case result looks like when its test wrote none.
pub fn missing_result(name: &str) -> CaseResult {
    CaseResult {
        name: name.to_owned(),
        passed: false,
        unsupported: Vec::new(),
        failures: vec!["no result: the test did not run to its end (see its output)".to_owned()],
        seconds: 0.0,
    }
}
