//! Kubernetes objects in, mesh model and policy status out. Pure and
//! level-based: `build` computes the whole model from what is there now,
//! never from the event that woke it, and equal inputs give equal outputs
//! (everything is sorted by namespace/name). Both sources (`kube_source`,
//! `manifests`) feed this one function.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use weft_api::crd::{self, Gateway, WorkloadSelector};
use weft_api::model::{self, Labels, MeshModel};

use crate::gateway_api::{self, GatewayApiOutput};

/// Everything the controller watches, as the API server shows it.
#[derive(Clone, Debug, Default)]
pub struct ClusterState {
    pub namespaces: Vec<Arc<Namespace>>,
    pub pods: Vec<Arc<Pod>>,
    pub services: Vec<Arc<Service>>,
    pub endpoint_slices: Vec<Arc<EndpointSlice>>,
    pub service_accounts: Vec<Arc<ServiceAccount>>,
    pub authorization_policies: Vec<Arc<crd::AuthorizationPolicy>>,
    pub peer_authentications: Vec<Arc<crd::PeerAuthentication>>,
    pub gateways: Vec<Arc<Gateway>>,
    pub http_routes: Vec<Arc<crd::HTTPRoute>>,
    pub grpc_routes: Vec<Arc<crd::GRPCRoute>>,
    pub traffic_policies: Vec<Arc<crd::TrafficPolicy>>,
}

/// Which custom resource a `PolicyStatus` is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyKind {
    AuthorizationPolicy,
    PeerAuthentication,
    TrafficPolicy,
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyKind::AuthorizationPolicy => "AuthorizationPolicy",
            PolicyKind::PeerAuthentication => "PeerAuthentication",
            PolicyKind::TrafficPolicy => "TrafficPolicy",
        })
    }
}

/// The `Accepted` condition the controller owes one policy object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
    /// `metadata.generation` of the object this was computed from.
    pub observed_generation: Option<i64>,
    pub accepted: bool,
    pub reason: String,
    pub message: String,
}

/// Condition reasons written by the controller.
pub mod reasons {
    pub const ACCEPTED: &str = "Accepted";
    pub const L7_FIELDS_FAIL_CLOSED: &str = "L7FieldsFailClosedAtL4";
    pub const UNKNOWN_NAMESPACE: &str = "UnknownNamespace";
    pub const INVALID_IP_BLOCK: &str = "InvalidIpBlock";
    /// A `targetRefs` entry or TrafficPolicy target names nothing.
    pub const TARGET_NOT_FOUND: &str = "TargetNotFound";
    /// The target exists but does not use a waypoint, so nothing enforces
    /// what only a waypoint can.
    pub const NO_WAYPOINT: &str = "NoWaypoint";
    pub const INVALID_KIND: &str = "InvalidKind";
    pub const INVALID_VALUE: &str = "InvalidValue";
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct BuildOutput {
    pub model: MeshModel,
    /// One entry per AuthorizationPolicy, PeerAuthentication and
    /// TrafficPolicy, sorted by kind, namespace, name.
    pub policy_status: Vec<PolicyStatus>,
    /// Gateway and route status, and the waypoints to deploy.
    pub gateway_api: GatewayApiOutput,
    /// Things a user should look at that are not tied to a policy (bad pod
    /// IPs, unresolvable ports, …). Sorted.
    pub problems: Vec<String>,
}

impl BuildOutput {
    /// Publishes a build: the model and each status only when changed.
    pub fn publish(
        self,
        out: &watch::Sender<Arc<MeshModel>>,
        status: &watch::Sender<Arc<Vec<PolicyStatus>>>,
        gateway_api: &watch::Sender<Arc<GatewayApiOutput>>,
    ) {
        let BuildOutput {
            model,
            policy_status,
            gateway_api: gw,
            ..
        } = self;
        gateway_api.send_if_modified(|cur| {
            if **cur == gw {
                return false;
            }
            *cur = Arc::new(gw);
            true
        });
        let changed = out.send_if_modified(|cur| {
            if **cur == model {
                return false;
            }
            *cur = Arc::new(model);
            true
        });
        if changed {
            let m = out.borrow();
            tracing::info!(
                workloads = m.workloads.len(),
                services = m.services.len(),
                policies = m.policies.len(),
                waypoints = m.waypoints.len(),
                http_routes = m.http_routes.len(),
                grpc_routes = m.grpc_routes.len(),
                "mesh model updated"
            );
        }
        status.send_if_modified(|cur| {
            if **cur == policy_status {
                return false;
            }
            *cur = Arc::new(policy_status);
            true
        });
    }
}

/// Builds the mesh model from the cluster state.
pub fn build(state: &ClusterState, trust_domain: &str) -> BuildOutput {
    let mut problems = BTreeSet::new();

    let namespaces = build_namespaces(state);
    let known_ns: BTreeSet<&str> = namespaces.iter().map(|n| n.name.as_str()).collect();

    let workloads = build_workloads(state, &known_ns, &mut problems);
    let services = build_services(state, &mut problems);
    let waypoints = gateway_api::build_waypoints(state);

    let mut policy_status = Vec::new();
    let policies = build_policies(state, &known_ns, &services, &waypoints, &mut policy_status);
    let peer_authentications = build_peer_authentications(state, &known_ns, &mut policy_status);
    let traffic_policies = build_traffic_policies(state, &known_ns, &services, &mut policy_status);
    policy_status
        .sort_by(|a, b| (a.kind, &a.namespace, &a.name).cmp(&(b.kind, &b.namespace, &b.name)));

    check_waypoints(state, &mut problems);

    let inputs = gateway_api::Inputs {
        state,
        services: &services,
        workloads: &workloads,
    };
    let (http_routes, grpc_routes, routes) = gateway_api::build_routes(&inputs, &mut problems);
    let (gateways, deployments) = gateway_api::build_gateways(&inputs, &mut problems);

    BuildOutput {
        model: MeshModel {
            trust_domain: trust_domain.to_owned(),
            namespaces,
            workloads,
            services,
            policies,
            peer_authentications,
            waypoints,
            http_routes,
            grpc_routes,
            traffic_policies,
        },
        policy_status,
        gateway_api: GatewayApiOutput {
            gateways,
            routes,
            deployments,
        },
        problems: problems.into_iter().collect(),
    }
}

fn ns_name<K: ResourceExt>(obj: &K) -> (String, String) {
    (obj.namespace().unwrap_or_default(), obj.name_any())
}

/// Sorts objects by (namespace, name); a later duplicate replaces an earlier
/// one (as a second `kubectl apply` of the same object would).
pub(crate) fn by_key<K: ResourceExt>(objs: &[Arc<K>]) -> BTreeMap<(String, String), &K> {
    objs.iter()
        .map(|o| (ns_name(o.as_ref()), o.as_ref()))
        .collect()
}

fn build_namespaces(state: &ClusterState) -> Vec<model::Namespace> {
    by_key(&state.namespaces)
        .into_values()
        .map(|ns| model::Namespace {
            name: ns.name_any(),
            labels: ns.labels().clone(),
        })
        .collect()
}

fn build_workloads(
    state: &ClusterState,
    known_ns: &BTreeSet<&str>,
    problems: &mut BTreeSet<String>,
) -> Vec<model::Workload> {
    let mut out = Vec::new();
    for ((ns, name), pod) in by_key(&state.pods) {
        let (Some(spec), Some(status)) = (&pod.spec, &pod.status) else {
            continue;
        };
        let Some(node) = spec.node_name.clone().filter(|n| !n.is_empty()) else {
            continue; // not scheduled yet
        };
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            continue; // terminated: its IPs may already belong to another pod
        }
        let mut raw_ips: Vec<&str> = status
            .pod_ips
            .iter()
            .flatten()
            .map(|p| p.ip.as_str())
            .collect();
        if raw_ips.is_empty() {
            raw_ips.extend(status.pod_ip.as_deref());
        }
        let mut ips = Vec::new();
        for raw in raw_ips {
            match raw.parse::<IpAddr>() {
                Ok(ip) if !ips.contains(&ip) => ips.push(ip),
                Ok(_) => {}
                Err(_) => {
                    problems.insert(format!(
                        "pod {ns}/{name}: pod IP {raw:?} is not an IP address"
                    ));
                }
            }
        }
        if ips.is_empty() {
            continue; // no network yet
        }
        if !known_ns.contains(ns.as_str()) {
            problems.insert(format!(
                "pod {ns}/{name}: namespace {ns:?} does not exist; the pod is not captured"
            ));
        }
        #[allow(deprecated)] // `serviceAccount` is the old spelling some manifests still use
        let sa = spec
            .service_account_name
            .clone()
            .or_else(|| spec.service_account.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        out.push(model::Workload {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            name,
            namespace: ns,
            service_account: sa,
            node,
            ips,
            labels: pod.labels().clone(),
        });
    }
    out
}

fn build_services(state: &ClusterState, problems: &mut BTreeSet<String>) -> Vec<model::Service> {
    let pods = by_key(&state.pods);
    let namespaces = by_key(&state.namespaces);
    let mut out = Vec::new();
    for ((ns, name), svc) in by_key(&state.services) {
        let Some(spec) = &svc.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue; // a DNS alias: nothing to route
        }
        let mut raw_vips: Vec<&str> = spec
            .cluster_ips
            .iter()
            .flatten()
            .map(String::as_str)
            .collect();
        if raw_vips.is_empty() {
            raw_vips.extend(spec.cluster_ip.as_deref());
        }
        let mut vips = Vec::new();
        for raw in raw_vips {
            if raw.is_empty() || raw == "None" {
                continue; // headless
            }
            match raw.parse::<IpAddr>() {
                Ok(ip) if !vips.contains(&ip) => vips.push(ip),
                Ok(_) => {}
                Err(_) => {
                    problems.insert(format!(
                        "service {ns}/{name}: cluster IP {raw:?} is not an IP address"
                    ));
                }
            }
        }
        let selector: Labels = spec.selector.clone().unwrap_or_default();
        let selected: Vec<&Pod> = if selector.is_empty() {
            Vec::new()
        } else {
            pods.iter()
                .filter(|((pns, _), p)| {
                    *pns == ns && selector.iter().all(|(k, v)| p.labels().get(k) == Some(v))
                })
                .map(|(_, p)| *p)
                .collect()
        };
        let slices: Vec<&EndpointSlice> = state
            .endpoint_slices
            .iter()
            .map(Arc::as_ref)
            .filter(|s| {
                s.namespace().as_deref() == Some(ns.as_str())
                    && s.labels().get("kubernetes.io/service-name") == Some(&name)
            })
            .collect();
        let mut ports = Vec::new();
        for sp in spec.ports.iter().flatten() {
            let Ok(port) = u16::try_from(sp.port).map_err(|_| ()).and_then(|p| {
                if p == 0 {
                    Err(())
                } else {
                    Ok(p)
                }
            }) else {
                problems.insert(format!(
                    "service {ns}/{name}: port {} is out of range",
                    sp.port
                ));
                continue;
            };
            let target_port = match &sp.target_port {
                None => None,
                Some(IntOrString::Int(t)) => match u16::try_from(*t) {
                    Ok(t) if t != 0 => Some(t),
                    _ => {
                        problems.insert(format!(
                            "service {ns}/{name}: targetPort {t} is out of range; using port {port}"
                        ));
                        None
                    }
                },
                Some(IntOrString::String(named)) => match named.parse::<u16>() {
                    Ok(t) if t != 0 => Some(t),
                    _ => {
                        let resolved =
                            resolve_named_port(named, sp.name.as_deref(), &slices, &selected);
                        if resolved.is_none() && !selected.is_empty() {
                            problems.insert(format!(
                                "service {ns}/{name}: targetPort {named:?} names no container port of the selected pods; using port {port}"
                            ));
                        }
                        resolved
                    }
                },
            };
            ports.push(model::ServicePort { port, target_port });
        }
        // Set even when the Gateway is missing (reported by
        // `check_waypoints`): ztunnel then refuses the traffic rather than
        // let it bypass the waypoint's L7 policy.
        let waypoint = gateway_api::service_waypoint(
            svc.labels(),
            namespaces
                .get(&(String::new(), ns.clone()))
                .map(|n| n.labels()),
        );
        out.push(model::Service {
            name,
            namespace: ns,
            vips,
            ports,
            selector,
            waypoint,
        });
    }
    out
}

/// A named targetPort: the EndpointSlice controller already resolved it
/// (slice ports carry the service port's name and the pod's port number);
/// without slices, look it up in the selected pods' container ports.
fn resolve_named_port(
    target: &str,
    service_port_name: Option<&str>,
    slices: &[&EndpointSlice],
    selected: &[&Pod],
) -> Option<u16> {
    let from_slices = slices
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .find(|p| p.name.as_deref().unwrap_or("") == service_port_name.unwrap_or(""))
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0);
    from_slices.or_else(|| {
        selected
            .iter()
            .filter_map(|p| p.spec.as_ref())
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .find(|cp| cp.name.as_deref() == Some(target))
            .and_then(|cp| u16::try_from(cp.container_port).ok())
            .filter(|p| *p != 0)
    })
}

fn selector_labels(sel: &Option<WorkloadSelector>) -> Option<Labels> {
    sel.as_ref()
        .map(|s| s.match_labels.clone())
        .filter(|l| !l.is_empty())
}

fn status_for<K: ResourceExt>(
    kind: PolicyKind,
    obj: &K,
    accepted: bool,
    reason: &str,
    message: String,
) -> PolicyStatus {
    PolicyStatus {
        kind,
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
        observed_generation: obj.meta().generation,
        accepted,
        reason: reason.to_owned(),
        message,
    }
}

fn unknown_namespace<K: ResourceExt>(kind: PolicyKind, obj: &K, ns: &str) -> PolicyStatus {
    status_for(
        kind,
        obj,
        false,
        reasons::UNKNOWN_NAMESPACE,
        format!("namespace {ns:?} does not exist; this {kind} is ignored until it does"),
    )
}

/// Whether `block` is a CIDR (`10.0.0.0/8`, `fd00::/8`) or a bare address,
/// as ztunnel's `rbac::cidr_contains` reads it.
fn valid_ip_block(block: &str) -> bool {
    let (addr, len) = match block.split_once('/') {
        Some((a, l)) => match l.parse::<u8>() {
            Ok(l) => (a, Some(l)),
            Err(_) => return false,
        },
        None => (block, None),
    };
    match addr.parse::<IpAddr>() {
        Ok(IpAddr::V4(_)) => len.is_none_or(|l| l <= 32),
        Ok(IpAddr::V6(_)) => len.is_none_or(|l| l <= 128),
        Err(_) => false,
    }
}

fn build_policies(
    state: &ClusterState,
    known_ns: &BTreeSet<&str>,
    services: &[model::Service],
    waypoints: &[model::Waypoint],
    statuses: &mut Vec<PolicyStatus>,
) -> Vec<model::AuthorizationPolicy> {
    const KIND: PolicyKind = PolicyKind::AuthorizationPolicy;
    let mut out = Vec::new();
    for ((ns, name), p) in by_key(&state.authorization_policies) {
        if !known_ns.contains(ns.as_str()) {
            tracing::warn!(component = "model_builder", kind = %KIND, namespace = %ns, name = %name, "policy names a namespace that does not exist; ignored");
            statuses.push(unknown_namespace(KIND, p, &ns));
            continue;
        }
        let action = match p.spec.action {
            crd::PolicyAction::Allow => model::PolicyAction::Allow,
            crd::PolicyAction::Deny => model::PolicyAction::Deny,
        };
        let mut invalid_blocks = Vec::new();
        let mut has_l7 = false;
        let rules = p
            .spec
            .rules
            .iter()
            .map(|r| model::Rule {
                from: r
                    .from
                    .iter()
                    .map(|f| {
                        let mut ip_blocks = Vec::new();
                        for b in &f.source.ip_blocks {
                            if valid_ip_block(b) {
                                ip_blocks.push(b.clone());
                            } else {
                                invalid_blocks.push(b.clone());
                                // ztunnel reads a malformed block as matching
                                // nothing: right for ALLOW (fail closed), wrong
                                // for DENY, where it must match everything.
                                match action {
                                    model::PolicyAction::Allow => ip_blocks.push(b.clone()),
                                    model::PolicyAction::Deny => {
                                        ip_blocks.push("0.0.0.0/0".to_owned());
                                        ip_blocks.push("::/0".to_owned());
                                    }
                                }
                            }
                        }
                        model::Source {
                            principals: f.source.principals.clone(),
                            namespaces: f.source.namespaces.clone(),
                            ip_blocks,
                        }
                    })
                    .collect(),
                to: r
                    .to
                    .iter()
                    .map(|t| {
                        let d = model::Destination {
                            ports: t.operation.ports.clone(),
                            methods: t.operation.methods.clone(),
                            paths: t.operation.paths.clone(),
                            headers: t.operation.headers.clone(),
                        };
                        has_l7 |= d.has_l7_fields();
                        d
                    })
                    .collect(),
            })
            .collect();
        let targets: Vec<model::PolicyTarget> = p
            .spec
            .target_refs
            .iter()
            .map(|t| model::PolicyTarget {
                kind: match t.kind {
                    crd::PolicyTargetKind::Service => model::ParentKind::Service,
                    crd::PolicyTargetKind::Gateway => model::ParentKind::Gateway,
                },
                name: t.name.clone(),
            })
            .collect();
        let target_problem = targets.iter().find_map(|t| match t.kind {
            model::ParentKind::Service => {
                match services.iter().find(|s| s.namespace == ns && s.name == t.name) {
                    None => Some((
                        reasons::TARGET_NOT_FOUND,
                        format!("targetRefs: Service {ns}/{} does not exist", t.name),
                    )),
                    Some(s) if s.waypoint.is_none() => Some((
                        reasons::NO_WAYPOINT,
                        format!(
                            "targetRefs: Service {ns}/{} does not use a waypoint, so nothing enforces this policy for it: label it or its namespace {}=<waypoint>",
                            t.name,
                            model::USE_WAYPOINT_LABEL
                        ),
                    )),
                    Some(_) => None,
                }
            }
            model::ParentKind::Gateway => (!waypoints
                .iter()
                .any(|w| w.namespace == ns && w.name == t.name))
            .then(|| {
                (
                    reasons::TARGET_NOT_FOUND,
                    format!(
                        "targetRefs: namespace {ns} has no Gateway {:?} of class {}",
                        t.name,
                        crd::WAYPOINT_GATEWAY_CLASS
                    ),
                )
            }),
        });
        let status = if !invalid_blocks.is_empty() {
            let effect = match action {
                model::PolicyAction::Allow => "allow nothing",
                model::PolicyAction::Deny => "deny every source address",
            };
            status_for(
                KIND,
                p,
                false,
                reasons::INVALID_IP_BLOCK,
                format!(
                    "ipBlocks {} are not CIDRs (like 10.0.0.0/8 or fd00::/8) or addresses; until fixed they {effect} (fail closed)",
                    invalid_blocks.join(", ")
                ),
            )
        } else if let Some((reason, message)) = target_problem {
            status_for(KIND, p, false, reason, message)
        } else if !targets.is_empty() {
            // The waypoint enforces every field, HTTP ones included.
            status_for(
                KIND,
                p,
                true,
                reasons::ACCEPTED,
                "applied by the waypoint of its targets".to_owned(),
            )
        } else if has_l7 {
            status_for(
                KIND,
                p,
                true,
                reasons::L7_FIELDS_FAIL_CLOSED,
                "rules name HTTP fields (methods, paths, headers) that only a waypoint can enforce; \
                 ztunnel fails closed on them (an ALLOW rule matches nothing, a DENY rule matches \
                 on its L4 fields alone): set targetRefs to the Service or waypoint Gateway so \
                 the waypoint enforces it"
                    .to_owned(),
            )
        } else {
            status_for(KIND, p, true, reasons::ACCEPTED, "applied".to_owned())
        };
        statuses.push(status);
        out.push(model::AuthorizationPolicy {
            name,
            namespace: ns,
            selector: selector_labels(&p.spec.selector),
            action,
            rules,
            targets,
        });
    }
    out
}

fn build_peer_authentications(
    state: &ClusterState,
    known_ns: &BTreeSet<&str>,
    statuses: &mut Vec<PolicyStatus>,
) -> Vec<model::PeerAuthentication> {
    const KIND: PolicyKind = PolicyKind::PeerAuthentication;
    let mut out = Vec::new();
    for ((ns, name), p) in by_key(&state.peer_authentications) {
        if !known_ns.contains(ns.as_str()) {
            tracing::warn!(component = "model_builder", kind = %KIND, namespace = %ns, name = %name, "peer authentication names a namespace that does not exist; ignored");
            statuses.push(unknown_namespace(KIND, p, &ns));
            continue;
        }
        let mode = p.spec.mtls.as_ref().and_then(|m| m.mode);
        let Some(mode) = mode else {
            // No mode: inherit, which is what leaving it out of the model does.
            statuses.push(status_for(
                KIND,
                p,
                true,
                reasons::ACCEPTED,
                "no mtls.mode: the namespace-wide setting applies".to_owned(),
            ));
            continue;
        };
        statuses.push(status_for(
            KIND,
            p,
            true,
            reasons::ACCEPTED,
            "applied".to_owned(),
        ));
        out.push(model::PeerAuthentication {
            name,
            namespace: ns,
            selector: selector_labels(&p.spec.selector),
            mode: match mode {
                crd::MtlsMode::Strict => model::MtlsMode::Strict,
                crd::MtlsMode::Permissive => model::MtlsMode::Permissive,
            },
        });
    }
    out
}

fn build_traffic_policies(
    state: &ClusterState,
    known_ns: &BTreeSet<&str>,
    services: &[model::Service],
    statuses: &mut Vec<PolicyStatus>,
) -> Vec<model::TrafficPolicy> {
    const KIND: PolicyKind = PolicyKind::TrafficPolicy;
    let mut out = Vec::new();
    for ((ns, name), p) in by_key(&state.traffic_policies) {
        if !known_ns.contains(ns.as_str()) {
            statuses.push(unknown_namespace(KIND, p, &ns));
            continue;
        }
        let converted = traffic_policy(&ns, &name, &p.spec);
        let target = &p.spec.target_ref;
        let status = match &converted {
            Err((reason, message)) => status_for(KIND, p, false, reason, message.clone()),
            Ok(_) => match services
                .iter()
                .find(|s| s.namespace == ns && s.name == target.name)
            {
                None => status_for(
                    KIND,
                    p,
                    false,
                    reasons::TARGET_NOT_FOUND,
                    format!("targetRef: Service {ns}/{} does not exist", target.name),
                ),
                Some(s) if s.waypoint.is_none() => status_for(
                    KIND,
                    p,
                    false,
                    reasons::NO_WAYPOINT,
                    format!(
                        "Service {ns}/{} does not use a waypoint, which is what applies this policy: label it or its namespace {}=<waypoint>",
                        target.name,
                        model::USE_WAYPOINT_LABEL
                    ),
                ),
                Some(_) => status_for(KIND, p, true, reasons::ACCEPTED, "applied".to_owned()),
            },
        };
        statuses.push(status);
        if let Ok(tp) = converted {
            out.push(tp);
        }
    }
    out
}

/// A TrafficPolicy spec in model form; `Err` is (reason, message).
fn traffic_policy(
    ns: &str,
    name: &str,
    spec: &crd::TrafficPolicySpec,
) -> Result<model::TrafficPolicy, (&'static str, String)> {
    let invalid = |m: String| (reasons::INVALID_VALUE, m);
    let duration = |field: &str, v: &str| {
        gateway_api::parse_duration_ms(v).map_err(|e| invalid(format!("{field}: {e}")))
    };
    let percent = |field: &str, v: u32| {
        if v > 100 {
            Err(invalid(format!("{field}: {v} is not a percentage (0-100)")))
        } else {
            Ok(v)
        }
    };
    let t = &spec.target_ref;
    if !matches!(t.group.as_deref(), None | Some("") | Some("core")) || t.kind != "Service" {
        return Err((
            reasons::INVALID_KIND,
            format!(
                "targetRef must be a Service, not {}/{}",
                t.group.as_deref().unwrap_or(""),
                t.kind
            ),
        ));
    }
    let retry_budget = match &spec.retry_budget {
        None => None,
        Some(b) => {
            let d = model::RetryBudget::default();
            Some(model::RetryBudget {
                percent: percent("retryBudget.percent", b.percent.unwrap_or(d.percent))?,
                min_retries_per_second: b
                    .min_retries_per_second
                    .unwrap_or(d.min_retries_per_second),
            })
        }
    };
    let outlier_detection = match &spec.outlier_detection {
        None => None,
        Some(o) => {
            let d = model::OutlierDetection::default();
            Some(model::OutlierDetection {
                consecutive_5xx: o.consecutive5xx.unwrap_or(d.consecutive_5xx),
                base_ejection_ms: match &o.base_ejection_time {
                    None => d.base_ejection_ms,
                    Some(v) => duration("outlierDetection.baseEjectionTime", v)?,
                },
                max_ejection_percent: percent(
                    "outlierDetection.maxEjectionPercent",
                    o.max_ejection_percent.unwrap_or(d.max_ejection_percent),
                )?,
            })
        }
    };
    let limits = spec.limits.as_ref().map(|l| model::ConnectionLimits {
        max_connections: l.max_connections,
        max_pending_requests: l.max_pending_requests,
        max_requests: l.max_requests,
    });
    let fault = match &spec.fault {
        None => None,
        Some(f) => Some(model::Fault {
            delay: match &f.delay {
                None => None,
                Some(d) => Some(model::FaultDelay {
                    percent: percent("fault.delay.percent", d.percent)?,
                    delay_ms: duration("fault.delay.fixedDelay", &d.fixed_delay)?,
                }),
            },
            abort: match &f.abort {
                None => None,
                Some(a) => {
                    if !(200..=599).contains(&a.http_status) {
                        return Err(invalid(format!(
                            "fault.abort.httpStatus: {} is not an HTTP status (200-599)",
                            a.http_status
                        )));
                    }
                    Some(model::FaultAbort {
                        percent: percent("fault.abort.percent", a.percent)?,
                        status: a.http_status,
                    })
                }
            },
        }),
    };
    let rate_limit = match &spec.rate_limit {
        None => None,
        Some(r) => {
            let period_ms = duration("rateLimit.period", &r.period)?;
            if period_ms == 0 {
                return Err(invalid("rateLimit.period must be longer than 0".to_owned()));
            }
            let key = match &r.key {
                None => model::RateLimitKey::Global,
                Some(k) => match (k.type_, &k.header) {
                    (crd::RateLimitKeyType::Global, _) => model::RateLimitKey::Global,
                    (crd::RateLimitKeyType::ClientIdentity, _) => {
                        model::RateLimitKey::ClientIdentity
                    }
                    (crd::RateLimitKeyType::Header, Some(h)) if !h.is_empty() => {
                        model::RateLimitKey::Header(h.clone())
                    }
                    (crd::RateLimitKeyType::Header, _) => {
                        return Err(invalid(
                            "rateLimit.key: type Header needs the header name in `header`"
                                .to_owned(),
                        ))
                    }
                },
            };
            Some(model::RateLimit {
                requests: r.requests,
                period_ms,
                burst: r.burst,
                key,
            })
        }
    };
    Ok(model::TrafficPolicy {
        name: name.to_owned(),
        namespace: ns.to_owned(),
        target: t.name.clone(),
        retry_budget,
        outlier_detection,
        limits,
        fault,
        rate_limit,
    })
}

/// `weft.dev/use-waypoint` must name a waypoint Gateway of the namespace.
fn check_waypoints(state: &ClusterState, problems: &mut BTreeSet<String>) {
    const USE_WAYPOINT: &str = model::USE_WAYPOINT_LABEL;
    let waypoints: BTreeSet<(String, String)> = state
        .gateways
        .iter()
        .filter(|g| g.spec.gateway_class_name == crd::WAYPOINT_GATEWAY_CLASS)
        .map(|g| ns_name(g.as_ref()))
        .collect();
    let users = state
        .namespaces
        .iter()
        .map(|n| {
            (
                "namespace",
                n.name_any(),
                n.name_any(),
                n.labels().get(USE_WAYPOINT),
            )
        })
        .chain(state.services.iter().map(|s| {
            let (ns, name) = ns_name(s.as_ref());
            ("service", ns, name, s.labels().get(USE_WAYPOINT))
        }));
    for (what, ns, name, gw) in users {
        if let Some(gw) = gw.filter(|g| *g != "none") {
            if !waypoints.contains(&(ns.clone(), gw.clone())) {
                problems.insert(format!(
                    "{what} {name}: {USE_WAYPOINT}={gw} but namespace {ns} has no Gateway {gw:?} of class {}; its traffic is refused until there is one",
                    crd::WAYPOINT_GATEWAY_CLASS
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj<T: serde::de::DeserializeOwned>(yaml: &str) -> Arc<T> {
        Arc::new(serde_yaml::from_str(yaml).unwrap())
    }

    fn state() -> ClusterState {
        ClusterState {
            namespaces: vec![
                obj("metadata: {name: shop, labels: {weft.dev/dataplane-mode: ambient}}"),
                obj("metadata: {name: legacy}"),
            ],
            pods: vec![
                obj(r#"
metadata: {name: web-1, namespace: shop, uid: u1, labels: {app: web}}
spec:
  nodeName: n1
  serviceAccountName: web
  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
status: {phase: Running, podIPs: [{ip: 10.0.0.2}, {ip: "fd00::2"}]}
"#),
                obj("metadata: {name: pending, namespace: shop}\nspec: {containers: []}\nstatus: {phase: Pending}"),
                obj("metadata: {name: done, namespace: shop}\nspec: {nodeName: n1, containers: []}\nstatus: {phase: Succeeded, podIPs: [{ip: 10.0.0.9}]}"),
                obj("metadata: {name: old, namespace: legacy}\nspec: {nodeName: n2, containers: []}\nstatus: {podIP: 10.0.1.3}"),
            ],
            services: vec![obj(r#"
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: admin, port: 9000, targetPort: 9001}, {name: x, port: 81}]
"#)],
            ..Default::default()
        }
    }

    #[test]
    fn builds_workloads_and_services() {
        let out = build(&state(), "cluster.local");
        let m = &out.model;
        let names: Vec<&str> = m.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["old", "web-1"]);
        let w = &m.workloads[1];
        assert_eq!(w.service_account, "web");
        assert_eq!(w.uid, "u1");
        assert_eq!(w.ips.len(), 2);
        assert!(m.is_captured(w));
        assert!(!m.is_captured(&m.workloads[0]));
        assert_eq!(m.workloads[0].service_account, "default");
        let s = &m.services[0];
        assert_eq!(s.vips, ["10.96.0.10".parse::<IpAddr>().unwrap()]);
        assert_eq!(
            s.ports,
            [
                model::ServicePort {
                    port: 80,
                    target_port: Some(8080)
                },
                model::ServicePort {
                    port: 9000,
                    target_port: Some(9001)
                },
                model::ServicePort {
                    port: 81,
                    target_port: None
                },
            ]
        );
        m.validate().unwrap();
        assert!(out.problems.is_empty(), "{:?}", out.problems);
    }

    #[test]
    fn policies_get_status() {
        let mut st = state();
        st.authorization_policies = vec![
            obj("metadata: {name: l7, namespace: shop, generation: 3}\nspec: {action: ALLOW, rules: [{to: [{operation: {methods: [GET]}}]}]}"),
            obj("metadata: {name: ghost, namespace: nowhere}\nspec: {action: DENY}"),
            obj("metadata: {name: bad, namespace: shop}\nspec: {action: DENY, rules: [{from: [{source: {ipBlocks: [10.0.0.0/40, 10.1.0.0/16]}}]}]}"),
        ];
        st.peer_authentications = vec![obj(
            "metadata: {name: strict, namespace: shop}\nspec: {mtls: {mode: STRICT}}",
        )];
        let out = build(&st, "cluster.local");
        let got: Vec<(&str, bool, &str)> = out
            .policy_status
            .iter()
            .map(|s| (s.name.as_str(), s.accepted, s.reason.as_str()))
            .collect();
        assert_eq!(
            got,
            [
                ("ghost", false, reasons::UNKNOWN_NAMESPACE),
                ("bad", false, reasons::INVALID_IP_BLOCK),
                ("l7", true, reasons::L7_FIELDS_FAIL_CLOSED),
                ("strict", true, reasons::ACCEPTED),
            ]
        );
        assert_eq!(out.policy_status[2].observed_generation, Some(3));
        assert!(out.policy_status[2].message.contains("waypoint"));
        let names: Vec<&str> = out.model.policies.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["bad", "l7"]);
        // The invalid block of a DENY becomes "every address" (fail closed).
        assert_eq!(
            out.model.policies[0].rules[0].from[0].ip_blocks,
            ["0.0.0.0/0", "::/0", "10.1.0.0/16"]
        );
        assert_eq!(
            out.model.peer_authentications[0].mode,
            model::MtlsMode::Strict
        );
    }

    #[test]
    fn output_is_deterministic() {
        let a = state();
        let mut b = state();
        b.pods.reverse();
        b.namespaces.reverse();
        assert_eq!(build(&a, "td"), build(&b, "td"));
    }
}
