//! `weftctl check` on an installed mesh: the API server, CRDs, the control
//! plane, every node's ztunnel (readiness, config stream, node facts, clock,
//! certificates), the CA's roots, waypoints, policy status, other meshes
//! and NetworkPolicies that block HBONE.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Result;
use serde_json::Value;
use weft_api::node_report::NodeReport;
use weft_api::ports;

use super::{netpol, node, progress, Check, Group, Report};
use crate::http_get;
use crate::kube_api::{condition, name, namespace, pod_ready, Api, Found};

/// Label of the controller's and the ztunnels' pods (the chart's).
pub const NAME_LABEL: &str = "app.kubernetes.io/name";
pub const CONTROLLER: &str = "weft-controller";
pub const ZTUNNEL: &str = "weft-ztunnel";
/// The controller's metrics and debug port.
pub const CONTROLLER_METRICS_PORT: u16 = 15014;
const LEADER_LEASE: &str = "weft-controller-leader";
const ROOT_CONFIGMAP: &str = "weft-ca-root-cert";
/// Clock skew between a node and this machine that is worth a warning, and
/// the one certificates do not survive (they are backdated 5 minutes).
const SKEW_WARN: Duration = Duration::from_secs(5);
const SKEW_ERROR: Duration = Duration::from_secs(300);
/// Oldest Kubernetes version the chart supports.
pub const MIN_KUBERNETES: (u32, u32) = (1, 28);

/// Weft's CRDs and the version each must serve.
pub const WEFT_CRDS: &[(&str, &str)] = &[
    ("authorizationpolicies.weft.dev", "v1alpha1"),
    ("peerauthentications.weft.dev", "v1alpha1"),
    ("trafficpolicies.weft.dev", "v1alpha1"),
];
/// The Gateway API CRDs waypoints need.
pub const GATEWAY_CRDS: &[(&str, &str)] = &[
    ("gateways.gateway.networking.k8s.io", "v1"),
    ("httproutes.gateway.networking.k8s.io", "v1"),
    ("grpcroutes.gateway.networking.k8s.io", "v1"),
];

pub fn pod_ip(p: &Value) -> Option<IpAddr> {
    p["status"]["podIP"].as_str()?.parse().ok()
}

/// The API server's version; the group gets its check. `None`: unreachable.
pub async fn kubernetes(api: &Api, g: &mut Group) -> Option<(u32, u32)> {
    match api.get("/version").await {
        Ok(Found::Object(v)) => {
            let num = |k: &str| {
                v[k].as_str()
                    .and_then(|s| s.trim_end_matches('+').parse::<u32>().ok())
            };
            let (Some(major), Some(minor)) = (num("major"), num("minor")) else {
                g.push(Check::warn(
                    "Kubernetes version",
                    format!("unreadable: {v}"),
                    "check `kubectl version`",
                ));
                return Some((0, 0));
            };
            g.push(Check::ok("can reach the Kubernetes API"));
            let (a, b) = MIN_KUBERNETES;
            g.push(if (major, minor) >= MIN_KUBERNETES {
                Check::ok(format!("Kubernetes {major}.{minor} (at least {a}.{b})"))
            } else {
                Check::error(
                    "Kubernetes version",
                    format!("{major}.{minor} is older than {a}.{b}"),
                    "upgrade the cluster: the chart needs at least Kubernetes 1.28",
                )
            });
            Some((major, minor))
        }
        Ok(Found::Missing) | Err(_) => {
            g.push(Check::error(
                "can reach the Kubernetes API",
                "GET /version failed",
                "check the kubeconfig (--kubeconfig, KUBECONFIG) and that the API server is reachable: `kubectl version`",
            ));
            None
        }
    }
}

/// Whether a CRD exists and serves `version`.
pub async fn crd(api: &Api, crd: &str, version: &str) -> Result<Option<bool>> {
    Ok(
        match api
            .get(&format!(
                "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd}"
            ))
            .await?
        {
            Found::Missing => None,
            Found::Object(v) => Some(v["spec"]["versions"].as_array().is_some_and(|vs| {
                vs.iter()
                    .any(|x| x["name"].as_str() == Some(version) && x["served"] != false)
            })),
        },
    )
}

fn crd_checks(found: Option<bool>, crd: &str, version: &str, required: bool) -> Check {
    match found {
        Some(true) => Check::ok(format!("CRD {crd} serves {version}")),
        Some(false) => Check::error(format!("CRD {crd}"), format!("does not serve {version}"), "install the CRDs of this release: `kubectl apply -f charts/weft/crds/` (Helm does not upgrade CRDs)"),
        None if required => Check::error(format!("CRD {crd}"), "missing", "install the CRDs: `kubectl apply -f charts/weft/crds/` (the chart installs them on first install)"),
        None => Check::warn(format!("CRD {crd}"), "missing: waypoints and routes cannot be used", "install the Gateway API CRDs (standard channel, v1.1 or later) to use waypoints"),
    }
}

/// What `/debug/subscribers` says.
pub struct Streams {
    pub latest: u64,
    pub subscribers: Vec<Value>,
}

pub fn streams(addr: SocketAddr) -> Result<Streams> {
    let v = http_get::get_json(addr, "/debug/subscribers")?;
    Ok(Streams {
        latest: v["latest_version"].as_u64().unwrap_or(0),
        subscribers: v["subscribers"].as_array().cloned().unwrap_or_default(),
    })
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub async fn run(api: &Api, ns: &str) -> Result<Report> {
    let mut report = Report::default();
    progress("Kubernetes API");
    let mut g = Group::new("Kubernetes API");
    let reachable = kubernetes(api, &mut g).await.is_some();
    report.add(g);
    if !reachable {
        return Ok(report);
    }

    progress("CRDs");
    let mut g = Group::new("Custom resources");
    for (c, v) in WEFT_CRDS {
        g.push(crd_checks(crd(api, c, v).await?, c, v, true));
    }
    for (c, v) in GATEWAY_CRDS {
        g.push(crd_checks(crd(api, c, v).await?, c, v, false));
    }
    report.add(g);

    progress("control plane");
    let mut g = Group::new("Control plane");
    let weft_pods = api.list(&format!("/api/v1/namespaces/{ns}/pods")).await?;
    let with_name = |n: &str| -> Vec<&Value> {
        weft_pods
            .iter()
            .filter(|p| p["metadata"]["labels"][NAME_LABEL].as_str() == Some(n))
            .collect()
    };
    let controllers = with_name(CONTROLLER);
    let ready: Vec<&&Value> = controllers.iter().filter(|p| pod_ready(p)).collect();
    g.push(match (ready.len(), controllers.len()) {
        (0, 0) => Check::error("controller pods", format!("none in namespace {ns}"), format!("install the chart (`helm install weft charts/weft -n {ns} --create-namespace`) or name its namespace with --namespace")),
        (0, n) => Check::error("controller pods", format!("none of {n} is ready"), format!("`kubectl -n {ns} describe pods -l {NAME_LABEL}={CONTROLLER}` and their logs")),
        (r, n) => Check::ok(format!("controller pods ready ({r}/{n})")),
    });
    match api.get(&format!("/apis/coordination.k8s.io/v1/namespaces/{ns}/leases/{LEADER_LEASE}")).await? {
        Found::Object(l) if l["spec"]["holderIdentity"].as_str().is_some_and(|h| !h.is_empty()) => {
            g.push(Check::ok(format!("leader elected ({})", l["spec"]["holderIdentity"].as_str().unwrap_or(""))));
        }
        _ => g.push(Check::warn("leader election", format!("Lease {ns}/{LEADER_LEASE} has no holder"), "no replica writes status, deploys waypoints or rotates the root: check the controllers' logs for Lease errors (RBAC on coordination.k8s.io leases)")),
    }
    let mut streams_seen: Option<Streams> = None;
    for p in &ready {
        let Some(ip) = pod_ip(p) else { continue };
        let addr = SocketAddr::new(ip, CONTROLLER_METRICS_PORT);
        match streams(addr) {
            Ok(s) => {
                g.push(Check::ok(format!("controller {} serves config version {} to {} subscriber(s)", name(p), s.latest, s.subscribers.len())));
                streams_seen = Some(s);
                break;
            }
            Err(e) => g.push(Check::error(format!("controller {}", name(p)), format!("{e:#}"), format!("the controller's port {CONTROLLER_METRICS_PORT} must be reachable from here: run weftctl where pod IPs are routed, or check the pod's log"))),
        }
    }
    report.add(g);

    progress("data plane");
    let mut g = Group::new("Data plane");
    let nodes = api.list("/api/v1/nodes").await?;
    let ztunnels = with_name(ZTUNNEL);
    let mut reports: Vec<(String, NodeReport)> = Vec::new();
    for n in &nodes {
        let node_name = name(n);
        let Some(z) = ztunnels
            .iter()
            .find(|z| z["spec"]["nodeName"].as_str() == Some(node_name))
        else {
            g.push(Check::error(format!("{node_name}: ztunnel"), "no ztunnel pod on this node", format!("check the DaemonSet's tolerations and node selector: `kubectl -n {ns} describe daemonset {ZTUNNEL}`")));
            continue;
        };
        let Some(ip) = pod_ip(z) else {
            g.push(Check::error(
                format!("{node_name}: ztunnel"),
                format!("pod {} has no IP yet", name(z)),
                format!("`kubectl -n {ns} describe pod {}`", name(z)),
            ));
            continue;
        };
        let ready = http_get::get(SocketAddr::new(ip, ports::READINESS), "/healthz/ready");
        match ready {
            Ok((200, _)) => {}
            Ok((code, _)) => {
                g.push(Check::error(
                    format!("{node_name}: ztunnel {}", name(z)),
                    format!("not ready (/healthz/ready answered {code})"),
                    format!(
                        "`kubectl -n {ns} logs {}`: it is starting or draining",
                        name(z)
                    ),
                ));
                continue;
            }
            Err(e) => {
                g.push(Check::error(format!("{node_name}: ztunnel {}", name(z)), format!("down: {e:#}"), format!("`kubectl -n {ns} logs {} --previous` and `kubectl -n {ns} describe pod {}`; while it is down the node's enrolled pods cannot connect (fail closed)", name(z), name(z))));
                continue;
            }
        }
        let sent = Instant::now();
        let r = match http_get::get_json(SocketAddr::new(ip, ports::METRICS), "/debug/node")
            .and_then(|v| Ok(serde_json::from_value::<NodeReport>(v)?))
        {
            Ok(r) => r,
            Err(e) => {
                g.push(Check::warn(
                    format!("{node_name}: ztunnel {}", name(z)),
                    format!("ready, but no node report: {e:#}"),
                    "a ztunnel older than this weftctl has no /debug/node: upgrade it",
                ));
                continue;
            }
        };
        let rtt = sent.elapsed();
        g.push(Check::ok(format!(
            "{node_name}: ztunnel {} ready (version {}, {} pod(s) enrolled)",
            name(z),
            r.version,
            r.pods_enrolled
        )));
        // The report was made somewhere in the round trip: allow half.
        let here = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i128)
            .unwrap_or(0)
            - (rtt.as_millis() / 2) as i128;
        let skew =
            Duration::from_millis((here - r.facts.unix_time_ms as i128).unsigned_abs() as u64);
        g.push(if skew >= SKEW_ERROR {
            Check::error(format!("{node_name}: clock"), format!("{}s off this machine's clock", skew.as_secs()), "run NTP (chrony, systemd-timesyncd) on every node: certificates are backdated only 5 minutes")
        } else if skew >= SKEW_WARN {
            Check::warn(format!("{node_name}: clock"), format!("{}s off this machine's clock", skew.as_secs()), "run NTP (chrony, systemd-timesyncd) on every node")
        } else {
            Check::ok(format!("{node_name}: clock within {}s", SKEW_WARN.as_secs()))
        });
        if let Some(s) = &streams_seen {
            // Every stream of this node's ztunnel (a restart can leave an
            // old one open for a moment; a rejected update on any counts).
            let subs: Vec<&Value> = s
                .subscribers
                .iter()
                .filter(|x| x["node"].as_str() == Some(node_name) && x["role"] == "ztunnel")
                .collect();
            let nacked = subs.iter().find(|sub| {
                let nack = &sub["last_nack"];
                nack.is_object()
                    && nack["version"].as_u64().unwrap_or(0)
                        > sub["acked_version"].as_u64().unwrap_or(0)
            });
            let acked = subs
                .iter()
                .filter_map(|x| x["acked_version"].as_u64())
                .max()
                .unwrap_or(0);
            if subs.is_empty() {
                g.push(Check::error(format!("{node_name}: config stream"), "not subscribed to the controller", format!("the ztunnel serves its last model: `kubectl -n {ns} logs {}` shows why it cannot reach weft-controller:15010", name(z))));
            } else if let Some(sub) = nacked {
                let nack = &sub["last_nack"];
                g.push(Check::error(format!("{node_name}: config stream"), format!("rejected config version {}: {}", nack["version"], nack["error"].as_str().unwrap_or("")), "the ztunnel keeps its last good config; a rejected update usually means the controller and ztunnel versions differ: run the same release on both (`weftctl proxy-status` shows every proxy)"));
            } else if acked == s.latest {
                // The model the ztunnel serves carries the version of the
                // last update that changed what it holds (routes, for
                // instance, are not sent to it).
                g.push(Check::ok(format!(
                    "{node_name}: config version {acked} acknowledged (the latest; model from version {})",
                    r.model_version
                )));
            } else {
                g.push(Check::warn(
                    format!("{node_name}: config stream"),
                    format!("acknowledged version {acked}, the controller's latest is {}", s.latest),
                    "an update is in flight, or the stream is stuck: check again, then `weftctl proxy-status`",
                ));
            }
        }
        node::facts(node_name, &r.facts, true, &mut g);
        node::certificates(node_name, &r, now_unix(), &mut g);
        reports.push((node_name.to_owned(), r));
    }
    if nodes.is_empty() {
        g.push(Check::warn(
            "nodes",
            "the API lists no nodes",
            "check RBAC: weftctl needs to list nodes",
        ));
    }
    report.add(g);

    progress("certificates");
    let mut g = Group::new("Mesh CA");
    match api
        .get(&format!(
            "/api/v1/namespaces/{ns}/configmaps/{ROOT_CONFIGMAP}"
        ))
        .await?
    {
        Found::Object(cm) => match cm["data"]["root-cert.pem"]
            .as_str()
            .map(weft_pki::TrustBundle::from_pem)
        {
            Some(Ok(bundle)) => {
                for der in &bundle.roots {
                    if let Ok((from, to)) = weft_pki::validity_of_cert(der) {
                        let secs = |t: SystemTime| {
                            t.duration_since(UNIX_EPOCH)
                                .map(|d| d.as_secs())
                                .unwrap_or(0)
                        };
                        let (from, to, now) = (secs(from), secs(to), now_unix());
                        let left = to.saturating_sub(now);
                        g.push(if to <= now {
                            Check::error("mesh root", "expired", "rotate the root: `kubectl annotate secret -n <ns> weft-ca-root weft.dev/rotate-root=now`")
                        } else if left < 90 * 86400 || left * 10 < to.saturating_sub(from) {
                            Check::warn("mesh root", format!("expires in {}", node::human(left)), "rotate the root ahead of expiry: `kubectl annotate secret -n <ns> weft-ca-root weft.dev/rotate-root=now`")
                        } else {
                            Check::ok(format!("mesh root valid for {}", node::human(left)))
                        });
                    }
                }
            }
            _ => g.push(Check::error(
                "mesh root",
                format!("ConfigMap {ns}/{ROOT_CONFIGMAP} holds no readable root-cert.pem"),
                "the controller publishes it at start: check the controller's log",
            )),
        },
        Found::Missing => g.push(Check::error(
            "mesh root",
            format!("ConfigMap {ns}/{ROOT_CONFIGMAP} is missing"),
            "the controller publishes it at start: check that it runs and may write ConfigMaps",
        )),
    }
    report.add(g);

    progress("waypoints and policies");
    let mut g = Group::new("Waypoints and policies");
    let gateways = api
        .list("/apis/gateway.networking.k8s.io/v1/gateways")
        .await?;
    let mut waypoints = 0;
    for gw in gateways
        .iter()
        .filter(|gw| gw["spec"]["gatewayClassName"] == weft_api::l7::WAYPOINT_CLASS)
    {
        waypoints += 1;
        let key = format!("{}/{}", namespace(gw), name(gw));
        g.push(match condition(gw, "Programmed") {
            Some(("True", _, _)) => Check::ok(format!("waypoint {key} programmed")),
            Some((_, reason, msg)) => Check::warn(
                format!("waypoint {key}"),
                format!("not programmed: {reason} {msg}"),
                format!(
                    "`kubectl -n {} describe gateway {}` and the waypoint's Deployment",
                    namespace(gw),
                    name(gw)
                ),
            ),
            None => Check::warn(
                format!("waypoint {key}"),
                "no Programmed condition yet",
                "the controller's leader sets it: check that a leader is elected",
            ),
        });
    }
    if waypoints == 0 {
        g.push(Check::ok("no waypoints deployed"));
    }
    let mut policies = 0;
    for kind in [
        "authorizationpolicies",
        "peerauthentications",
        "trafficpolicies",
    ] {
        for p in api.list(&format!("/apis/weft.dev/v1alpha1/{kind}")).await? {
            policies += 1;
            if let Some((status, reason, msg)) = condition(&p, "Accepted") {
                if status != "True" {
                    g.push(Check::warn(format!("{} {}/{}", p["kind"].as_str().unwrap_or(kind), namespace(&p), name(&p)), format!("Accepted={status} ({reason}): {msg}"), "fix the policy as the condition says; until then it is enforced as the condition describes"));
                }
            }
        }
    }
    g.push(Check::ok(format!(
        "{policies} policy object(s) checked for their Accepted condition"
    )));
    report.add(g);

    progress("other meshes and NetworkPolicies");
    let namespaces = api.list("/api/v1/namespaces").await?;
    let pods = api.list("/api/v1/pods").await?;
    report.add(compatibility(
        &namespaces,
        &pods,
        &api.list("/apis/networking.k8s.io/v1/networkpolicies")
            .await?,
    ));
    Ok(report)
}

/// Other meshes capturing enrolled pods, and NetworkPolicies blocking HBONE
/// (also run by `--pre` on namespaces labelled ahead of install).
pub fn compatibility(namespaces: &[Value], pods: &[Value], policies: &[Value]) -> Group {
    let mut g = Group::new("Compatibility");
    let enrolled: BTreeMap<&str, &Value> = namespaces
        .iter()
        .filter(|n| {
            n["metadata"]["labels"][weft_api::DATAPLANE_MODE_LABEL]
                == weft_api::DATAPLANE_MODE_AMBIENT
        })
        .map(|n| (name(n), n))
        .collect();
    let mut other_mesh = 0;
    for (ns, n) in &enrolled {
        let l = &n["metadata"]["labels"];
        if l["istio-injection"] == "enabled"
            || l["istio.io/dataplane-mode"] == "ambient"
            || n["metadata"]["annotations"]["linkerd.io/inject"] == "enabled"
        {
            other_mesh += 1;
            g.push(Check::error(format!("namespace {ns}"), "is also enrolled in another mesh (Istio or Linkerd labels)", "two meshes would capture the same pods: remove the other mesh's label or Weft's `weft.dev/dataplane-mode`"));
        }
    }
    for p in pods.iter().filter(|p| enrolled.contains_key(namespace(p))) {
        let sidecar = p["spec"]["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(p["spec"]["initContainers"].as_array().into_iter().flatten())
            .find_map(|c| {
                c["name"].as_str().filter(|n| {
                    ["istio-proxy", "linkerd-proxy", "istio-init", "linkerd-init"].contains(n)
                })
            });
        if let Some(c) = sidecar {
            other_mesh += 1;
            g.push(Check::error(format!("pod {}/{}", namespace(p), name(p)), format!("runs the {c} sidecar of another mesh"), "restart it without the other mesh's injection, or opt it out of Weft with the pod label `weft.dev/dataplane-mode: none`"));
        }
    }
    if other_mesh == 0 {
        g.push(Check::ok("no other mesh captures enrolled pods"));
    }
    let findings = netpol::analyze(policies, namespaces, pods);
    if findings.is_empty() {
        g.push(Check::ok(format!(
            "no NetworkPolicy blocks HBONE ({}/TCP) between mesh pods ({} checked)",
            ports::HBONE,
            policies.len()
        )));
    }
    for f in findings {
        g.push(Check::error(
            format!("NetworkPolicy {}", f.policy),
            f.detail,
            f.hint,
        ));
    }
    g
}
