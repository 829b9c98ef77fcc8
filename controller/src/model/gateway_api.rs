//! Gateway API (`Gateway`, `HTTPRoute`, `GRPCRoute`) in: the waypoints,
//! the L7 routes of the mesh model, the status Gateway API says their
//! controller owes them, and the waypoint Deployments to run. Pure, like
//! the rest of `model`: equal inputs give equal outputs, sorted by
//! namespace/name.
//!
//! A route rule the waypoint could not apply faithfully (a bad duration, an
//! unknown filter) is dropped and reported, never half applied.

use std::collections::{BTreeMap, BTreeSet};

use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use weft_api::crd;
use weft_api::model::{self, GATEWAY_NAME_LABEL};

use super::cluster::{by_key, ns_name, parse_duration_ms, ClusterState};
use crate::reasons;

/// Annotation on a waypoint Gateway: replicas of its Deployment.
pub const REPLICAS_ANNOTATION: &str = "weft.dev/waypoint-replicas";
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// One condition as the builder decides it (`lastTransitionTime` is the
/// writer's business).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Cond {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: bool,
    pub reason: String,
    pub message: String,
}

impl Cond {
    fn new(type_: &str, status: bool, reason: &str, message: impl Into<String>) -> Self {
        Cond {
            type_: type_.to_owned(),
            status,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum RouteKind {
    HTTPRoute,
    GRPCRoute,
}

impl std::fmt::Display for RouteKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RouteKind::HTTPRoute => "HTTPRoute",
            RouteKind::GRPCRoute => "GRPCRoute",
        })
    }
}

/// `status.parents` entries this controller owns on one route.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    pub kind: RouteKind,
    pub namespace: String,
    pub name: String,
    pub observed_generation: Option<i64>,
    pub parents: Vec<RouteParentStatus>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteParentStatus {
    pub parent_ref: crd::ParentReference,
    pub conditions: Vec<Cond>,
}

/// Status of one waypoint Gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    pub namespace: String,
    pub name: String,
    pub observed_generation: Option<i64>,
    pub conditions: Vec<Cond>,
    /// ClusterIPs of the waypoint's Service.
    pub addresses: Vec<String>,
}

/// A waypoint the leader deploys (cluster mode only).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WaypointDeployment {
    pub namespace: String,
    pub name: String,
    /// The Gateway's UID: owner of what is deployed, so deletion cascades.
    pub uid: String,
    pub replicas: i32,
}

/// Everything Gateway-API-shaped the builder decides besides the model.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayApiOutput {
    pub gateways: Vec<GatewayStatus>,
    pub routes: Vec<RouteStatus>,
    pub deployments: Vec<WaypointDeployment>,
}

fn parse_opt_duration(s: &Option<String>) -> Result<Option<u64>, String> {
    s.as_deref().map(parse_duration_ms).transpose()
}

fn is_waypoint(g: &crd::Gateway) -> bool {
    g.spec.gateway_class_name == crd::WAYPOINT_GATEWAY_CLASS
}

/// Waypoint Gateways as model waypoints. The waypoint Deployment runs as a
/// ServiceAccount named after the Gateway.
pub fn build_waypoints(state: &ClusterState) -> Vec<model::Waypoint> {
    by_key(&state.gateways)
        .into_iter()
        .filter(|(_, g)| is_waypoint(g))
        .map(|((namespace, name), _)| model::Waypoint {
            service_account: name.clone(),
            name,
            namespace,
        })
        .collect()
}

/// `weft.dev/use-waypoint` must name a waypoint Gateway of the namespace.
pub(crate) fn check_waypoints(state: &ClusterState, problems: &mut BTreeSet<String>) {
    const USE_WAYPOINT: &str = model::USE_WAYPOINT_LABEL;
    let waypoints: BTreeSet<(String, String)> = state
        .gateways
        .iter()
        .filter(|g| is_waypoint(g))
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

/// What the builder already knows that route conversion needs.
pub struct Inputs<'a> {
    pub state: &'a ClusterState,
    pub services: &'a [model::Service],
    pub workloads: &'a [model::Workload],
}

impl Inputs<'_> {
    fn service(&self, ns: &str, name: &str) -> Option<&model::Service> {
        self.services
            .iter()
            .find(|s| s.namespace == ns && s.name == name)
    }

    fn gateway(&self, ns: &str, name: &str) -> Option<&crd::Gateway> {
        self.state
            .gateways
            .iter()
            .map(AsRef::as_ref)
            .find(|g| g.namespace().as_deref() == Some(ns) && g.name_any() == name)
    }
}

enum ParentOutcome {
    /// Not a parent this controller manages: no status entry.
    NotOurs,
    Accepted(model::ParentRef),
    Rejected(&'static str, String),
}

fn resolve_parent(
    inputs: &Inputs,
    kind: RouteKind,
    route_ns: &str,
    p: &crd::ParentReference,
) -> ParentOutcome {
    let group = p.group.as_deref().unwrap_or(GATEWAY_GROUP);
    let pkind = p.kind.as_deref().unwrap_or("Gateway");
    let ns = p.namespace.clone().unwrap_or_else(|| route_ns.to_owned());
    let port = match p.port.map(u16::try_from) {
        None => None,
        Some(Ok(port)) if port != 0 => Some(port),
        Some(_) => {
            return ParentOutcome::Rejected(
                reasons::NO_MATCHING_PARENT,
                format!("parentRef port {:?} is not a port number", p.port),
            )
        }
    };
    match (group, pkind) {
        ("" | "core", "Service") => {
            let Some(svc) = inputs.service(&ns, &p.name) else {
                return ParentOutcome::Rejected(
                    reasons::NO_MATCHING_PARENT,
                    format!("Service {ns}/{} does not exist", p.name),
                );
            };
            if svc.waypoint.is_none() {
                return ParentOutcome::Rejected(
                    reasons::NO_MATCHING_PARENT,
                    format!(
                        "Service {ns}/{} does not use a waypoint: label it or its namespace {}=<waypoint Gateway name>",
                        p.name,
                        model::USE_WAYPOINT_LABEL
                    ),
                );
            }
            if let Some(port) = port {
                if !svc.ports.iter().any(|sp| sp.port == port) {
                    return ParentOutcome::Rejected(
                        reasons::NO_MATCHING_PARENT,
                        format!("Service {ns}/{} has no port {port}", p.name),
                    );
                }
            }
            ParentOutcome::Accepted(model::ParentRef {
                kind: model::ParentKind::Service,
                namespace: if ns == route_ns { String::new() } else { ns },
                name: p.name.clone(),
                port,
            })
        }
        (GATEWAY_GROUP, "Gateway") => {
            let Some(gw) = inputs.gateway(&ns, &p.name).filter(|g| is_waypoint(g)) else {
                // Absent, or another controller's Gateway: its status is not ours to write.
                return ParentOutcome::NotOurs;
            };
            let listeners: Vec<&crd::GatewayListener> = gw
                .spec
                .listeners
                .iter()
                .filter(|l| p.section_name.as_ref().is_none_or(|s| *s == l.name))
                .filter(|l| p.port.is_none_or(|port| port == l.port))
                .collect();
            if listeners.is_empty() && !gw.spec.listeners.is_empty() {
                return ParentOutcome::Rejected(
                    reasons::NO_MATCHING_PARENT,
                    format!(
                        "Gateway {ns}/{} has no listener matching sectionName {:?} and port {:?}",
                        p.name, p.section_name, p.port
                    ),
                );
            }
            let allows = |l: &crd::GatewayListener| {
                let from = l
                    .allowed_routes
                    .as_ref()
                    .and_then(|a| a.namespaces.as_ref())
                    .and_then(|n| n.from.as_deref())
                    .unwrap_or("Same");
                let ns_ok = from == "All" || ns == route_ns;
                let kinds = l
                    .allowed_routes
                    .as_ref()
                    .map(|a| a.kinds.as_slice())
                    .unwrap_or_default();
                let kind_ok = if kinds.is_empty() {
                    matches!(l.protocol.as_str(), "HTTP" | "HTTPS" | "HBONE")
                } else {
                    kinds.iter().any(|k| k.kind == kind.to_string())
                };
                ns_ok && kind_ok
            };
            let allowed = if gw.spec.listeners.is_empty() {
                ns == route_ns
            } else {
                listeners.iter().any(|l| allows(l))
            };
            if !allowed {
                return ParentOutcome::Rejected(
                    reasons::NOT_ALLOWED_BY_LISTENERS,
                    format!(
                        "no listener of Gateway {ns}/{} allows a {kind} from namespace {route_ns}",
                        p.name
                    ),
                );
            }
            ParentOutcome::Accepted(model::ParentRef {
                kind: model::ParentKind::Gateway,
                namespace: if ns == route_ns { String::new() } else { ns },
                name: p.name.clone(),
                port,
            })
        }
        _ => ParentOutcome::NotOurs,
    }
}

/// The route a rule belongs to, as its references are resolved against.
struct RouteCtx {
    namespace: String,
    /// `(namespace, name)` of each Service the route names as parent.
    parent_services: Vec<(String, String)>,
}

impl RouteCtx {
    fn new(namespace: &str, parent_refs: &[crd::ParentReference]) -> Self {
        let parent_services = parent_refs
            .iter()
            .filter(|p| {
                matches!(p.group.as_deref(), Some("" | "core"))
                    && p.kind.as_deref() == Some("Service")
            })
            .map(|p| {
                (
                    p.namespace.clone().unwrap_or_else(|| namespace.to_owned()),
                    p.name.clone(),
                )
            })
            .collect();
        Self {
            namespace: namespace.to_owned(),
            parent_services,
        }
    }
}

/// Why a backend reference is not (fully) resolved.
struct RefIssue {
    reason: &'static str,
    message: String,
}

/// A backend as the model carries it. `Err` drops it; `Ok` with an issue
/// keeps it (a Service that does not exist yet: the waypoint answers 500
/// for its share, as the spec asks).
fn resolve_backend(
    inputs: &Inputs,
    route: &RouteCtx,
    b: &crd::BackendObjectReference,
    issues: &mut Vec<RefIssue>,
) -> Option<model::BackendRef> {
    let group = b.group.as_deref().unwrap_or("");
    let kind = b.kind.as_deref().unwrap_or("Service");
    if !matches!(group, "" | "core") || kind != "Service" {
        issues.push(RefIssue {
            reason: reasons::INVALID_KIND,
            message: format!(
                "backendRef {:?} is a {group}/{kind}: only Services are supported",
                b.name
            ),
        });
        return None;
    }
    let ns = b
        .namespace
        .clone()
        .unwrap_or_else(|| route.namespace.to_owned());
    // A consumer route may send to the Service it is a route for: that
    // traffic was addressed to the Service already, so no grant is needed.
    // Any other namespace needs a ReferenceGrant.
    if ns != route.namespace
        && !route
            .parent_services
            .contains(&(ns.clone(), b.name.clone()))
    {
        issues.push(RefIssue {
            reason: reasons::REF_NOT_PERMITTED,
            message: format!(
                "backendRef {ns}/{}: backends in another namespace than the route's need a ReferenceGrant, which weft does not support yet (a consumer route may name its parent Service)",
                b.name
            ),
        });
        return None;
    }
    let Some(port) = b
        .port
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0)
    else {
        issues.push(RefIssue {
            reason: reasons::BACKEND_NOT_FOUND,
            message: format!("backendRef {:?} needs a port (1-65535)", b.name),
        });
        return None;
    };
    if inputs.service(&ns, &b.name).is_none() {
        issues.push(RefIssue {
            reason: reasons::BACKEND_NOT_FOUND,
            message: format!("backend Service {ns}/{} does not exist", b.name),
        });
    }
    Some(model::BackendRef {
        name: b.name.clone(),
        namespace: if ns == route.namespace {
            String::new()
        } else {
            ns
        },
        port,
    })
}

fn match_type(t: &Option<String>) -> Result<model::MatchType, String> {
    match t.as_deref() {
        None | Some("Exact") => Ok(model::MatchType::Exact),
        Some("RegularExpression") => Ok(model::MatchType::RegularExpression),
        Some(other) => Err(format!("match type {other:?} is not supported")),
    }
}

fn header_matches(h: &[crd::HTTPHeaderMatch]) -> Result<Vec<model::HeaderMatch>, String> {
    h.iter()
        .map(|h| {
            Ok(model::HeaderMatch {
                kind: match_type(&h.type_)?,
                name: h.name.clone(),
                value: h.value.clone(),
            })
        })
        .collect()
}

fn header_modifier(
    m: &Option<crd::HTTPHeaderFilter>,
    what: &str,
) -> Result<model::HeaderModifier, String> {
    let m = m
        .as_ref()
        .ok_or_else(|| format!("filter {what} without its {what} field"))?;
    let pairs = |v: &[crd::HTTPHeader]| {
        v.iter()
            .map(|h| (h.name.clone(), h.value.clone()))
            .collect()
    };
    Ok(model::HeaderModifier {
        set: pairs(&m.set),
        add: pairs(&m.add),
        remove: m.remove.clone(),
    })
}

fn path_modifier(p: &Option<crd::HTTPPathModifier>) -> Result<Option<model::PathModifier>, String> {
    let Some(p) = p else { return Ok(None) };
    match (
        p.type_.as_str(),
        &p.replace_full_path,
        &p.replace_prefix_match,
    ) {
        ("ReplaceFullPath", Some(v), _) => {
            Ok(Some(model::PathModifier::ReplaceFullPath(v.clone())))
        }
        ("ReplacePrefixMatch", _, Some(v)) => {
            Ok(Some(model::PathModifier::ReplacePrefixMatch(v.clone())))
        }
        (t, _, _) => Err(format!(
            "path modifier {t:?} needs its value (replaceFullPath or replacePrefixMatch)"
        )),
    }
}

fn filter(
    inputs: &Inputs,
    route: &RouteCtx,
    kind: RouteKind,
    f: &crd::HTTPRouteFilter,
    issues: &mut Vec<RefIssue>,
) -> Result<Option<model::HttpFilter>, String> {
    let grpc = kind == RouteKind::GRPCRoute;
    Ok(Some(match f.type_.as_str() {
        "RequestHeaderModifier" => model::HttpFilter::RequestHeaderModifier(header_modifier(
            &f.request_header_modifier,
            "requestHeaderModifier",
        )?),
        "ResponseHeaderModifier" => model::HttpFilter::ResponseHeaderModifier(header_modifier(
            &f.response_header_modifier,
            "responseHeaderModifier",
        )?),
        "RequestRedirect" if !grpc => {
            let r = f
                .request_redirect
                .as_ref()
                .ok_or("filter RequestRedirect without its requestRedirect field")?;
            let port = r
                .port
                .map(|p| u16::try_from(p).map_err(|_| format!("redirect port {p} is out of range")))
                .transpose()?;
            let status_code = match r.status_code {
                None => None,
                // 301 and 302 are core; 303, 307 and 308 extended.
                Some(c @ (301 | 302 | 303 | 307 | 308)) => Some(c as u16),
                Some(c) => {
                    return Err(format!(
                        "redirect statusCode {c} is not supported (301, 302, 303, 307 or 308)"
                    ))
                }
            };
            model::HttpFilter::RequestRedirect(model::RequestRedirect {
                scheme: r.scheme.clone(),
                hostname: r.hostname.clone(),
                path: path_modifier(&r.path)?,
                port,
                status_code,
            })
        }
        "URLRewrite" if !grpc => {
            let r = f
                .url_rewrite
                .as_ref()
                .ok_or("filter URLRewrite without its urlRewrite field")?;
            model::HttpFilter::UrlRewrite(model::UrlRewrite {
                hostname: r.hostname.clone(),
                path: path_modifier(&r.path)?,
            })
        }
        "RequestMirror" => {
            let m = f
                .request_mirror
                .as_ref()
                .ok_or("filter RequestMirror without its requestMirror field")?;
            let percent = match (&m.fraction, m.percent) {
                (Some(fr), _) => {
                    let den = fr.denominator.unwrap_or(100);
                    if den <= 0 || fr.numerator < 0 || fr.numerator > den {
                        return Err(format!(
                            "mirror fraction {}/{den} is not between 0 and 1",
                            fr.numerator
                        ));
                    }
                    Some((i64::from(fr.numerator) * 100 / i64::from(den)) as u32)
                }
                (None, Some(p)) if (0..=100).contains(&p) => Some(p as u32),
                (None, Some(p)) => return Err(format!("mirror percent {p} is not 0-100")),
                (None, None) => None,
            };
            let Some(backend) = resolve_backend(inputs, route, &m.backend_ref, issues) else {
                return Ok(None); // reported in ResolvedRefs; mirroring is skipped
            };
            model::HttpFilter::RequestMirror(model::RequestMirror { backend, percent })
        }
        other => {
            return Err(format!(
                "filter type {other:?} is not supported on a {kind} by weft"
            ))
        }
    }))
}

fn filters(
    inputs: &Inputs,
    route: &RouteCtx,
    kind: RouteKind,
    fs: &[crd::HTTPRouteFilter],
    issues: &mut Vec<RefIssue>,
) -> Result<Vec<model::HttpFilter>, String> {
    let mut out = Vec::new();
    for f in fs {
        out.extend(filter(inputs, route, kind, f, issues)?);
    }
    Ok(out)
}

fn backends(
    inputs: &Inputs,
    route: &RouteCtx,
    kind: RouteKind,
    refs: &[crd::HTTPBackendRef],
    issues: &mut Vec<RefIssue>,
) -> Result<Vec<model::HttpBackend>, String> {
    let mut out = Vec::new();
    for b in refs {
        let weight = match b.weight {
            None => 1,
            Some(w) if w >= 0 => w as u32,
            Some(w) => {
                return Err(format!(
                    "backendRef {:?} weight {w} is negative",
                    b.backend.name
                ))
            }
        };
        let filters = filters(inputs, route, kind, &b.filters, issues)?;
        if let Some(backend) = resolve_backend(inputs, route, &b.backend, issues) {
            out.push(model::HttpBackend {
                backend,
                weight,
                filters,
            });
        }
    }
    Ok(out)
}

fn http_rule(
    inputs: &Inputs,
    route: &RouteCtx,
    r: &crd::HTTPRouteRule,
    issues: &mut Vec<RefIssue>,
) -> Result<model::HttpRouteRule, String> {
    const KIND: RouteKind = RouteKind::HTTPRoute;
    let mut matches = Vec::new();
    for m in &r.matches {
        let path = match &m.path {
            None => None,
            Some(p) => {
                let value = p.value.clone().unwrap_or_else(|| "/".to_owned());
                Some(match p.type_.as_deref().unwrap_or("PathPrefix") {
                    "Exact" => model::PathMatch::Exact(value),
                    "PathPrefix" => model::PathMatch::PathPrefix(value),
                    "RegularExpression" => model::PathMatch::RegularExpression(value),
                    other => return Err(format!("path match type {other:?} is not supported")),
                })
            }
        };
        matches.push(model::HttpRouteMatch {
            path,
            headers: header_matches(&m.headers)?,
            query_params: header_matches(&m.query_params)?
                .into_iter()
                .map(|h| model::QueryParamMatch {
                    kind: h.kind,
                    name: h.name,
                    value: h.value,
                })
                .collect(),
            method: m.method.as_ref().map(|m| m.to_ascii_uppercase()),
        });
    }
    let timeouts = match &r.timeouts {
        None => None,
        Some(t) => {
            // `0s` disables a timeout, which the model says by leaving it out.
            let request_ms = parse_opt_duration(&t.request)
                .map_err(|e| format!("timeouts.request: {e}"))?
                .filter(|ms| *ms != 0);
            let backend_request_ms = parse_opt_duration(&t.backend_request)
                .map_err(|e| format!("timeouts.backendRequest: {e}"))?
                .filter(|ms| *ms != 0);
            if let (Some(req), Some(be)) = (request_ms, backend_request_ms) {
                if be > req {
                    return Err(format!(
                        "timeouts.backendRequest ({be}ms) is longer than timeouts.request ({req}ms)"
                    ));
                }
            }
            Some(model::Timeouts {
                request_ms,
                backend_request_ms,
            })
        }
    };
    let retry = match &r.retry {
        None => None,
        Some(rt) => {
            let codes = rt
                .codes
                .iter()
                .map(|c| match u16::try_from(*c) {
                    Ok(c) if (400..=599).contains(&c) => Ok(c),
                    _ => Err(format!(
                        "retry code {c} is not an HTTP error status (400-599)"
                    )),
                })
                .collect::<Result<Vec<_>, _>>()?;
            let attempts = match rt.attempts {
                None => 1,
                Some(a) if a >= 0 => a as u32,
                Some(a) => return Err(format!("retry attempts {a} is negative")),
            };
            Some(model::Retry {
                codes,
                attempts,
                backoff_ms: parse_opt_duration(&rt.backoff)
                    .map_err(|e| format!("retry.backoff: {e}"))?,
                non_idempotent: false,
            })
        }
    };
    Ok(model::HttpRouteRule {
        name: r.name.clone(),
        matches,
        filters: filters(inputs, route, KIND, &r.filters, issues)?,
        backends: backends(inputs, route, KIND, &r.backend_refs, issues)?,
        timeouts,
        retry,
    })
}

fn grpc_rule(
    inputs: &Inputs,
    route: &RouteCtx,
    r: &crd::GRPCRouteRule,
    issues: &mut Vec<RefIssue>,
) -> Result<model::GrpcRouteRule, String> {
    const KIND: RouteKind = RouteKind::GRPCRoute;
    let mut matches = Vec::new();
    for m in &r.matches {
        let method = match &m.method {
            None => None,
            Some(mm) => {
                let (service, method) = (
                    mm.service.clone().unwrap_or_default(),
                    mm.method.clone().unwrap_or_default(),
                );
                if service.is_empty() && method.is_empty() {
                    return Err("a gRPC method match needs a service or a method".to_owned());
                }
                Some(model::GrpcMethodMatch {
                    kind: match_type(&mm.type_)?,
                    service,
                    method,
                })
            }
        };
        matches.push(model::GrpcRouteMatch {
            method,
            headers: header_matches(&m.headers)?,
        });
    }
    Ok(model::GrpcRouteRule {
        name: r.name.clone(),
        matches,
        filters: filters(inputs, route, KIND, &r.filters, issues)?,
        backends: backends(inputs, route, KIND, &r.backend_refs, issues)?,
    })
}

/// The route-level pieces common to both kinds.
struct Converted<R> {
    parents: Vec<model::ParentRef>,
    rules: Vec<R>,
    status: Option<RouteStatus>,
}

#[allow(clippy::too_many_arguments)]
fn convert_route<K: ResourceExt, S, R>(
    inputs: &Inputs,
    kind: RouteKind,
    obj: &K,
    parent_refs: &[crd::ParentReference],
    spec_rules: &[S],
    rule: impl Fn(&Inputs, &RouteCtx, &S, &mut Vec<RefIssue>) -> Result<R, String>,
    problems: &mut BTreeSet<String>,
) -> Converted<R> {
    let (ns, name) = (obj.namespace().unwrap_or_default(), obj.name_any());
    let ctx = RouteCtx::new(&ns, parent_refs);
    let mut issues = Vec::new();
    let mut rules = Vec::new();
    let mut invalid = Vec::new();
    for (i, r) in spec_rules.iter().enumerate() {
        match rule(inputs, &ctx, r, &mut issues) {
            Ok(r) => rules.push(r),
            Err(e) => {
                problems.insert(format!(
                    "{kind} {ns}/{name} rule {i}: {e}; the rule is ignored"
                ));
                invalid.push(format!("rule {i}: {e}"));
            }
        }
    }
    for i in &issues {
        problems.insert(format!("{kind} {ns}/{name}: {}", i.message));
    }
    let all_invalid = !spec_rules.is_empty() && rules.is_empty();
    let mut parents = Vec::new();
    let mut statuses = Vec::new();
    for p in parent_refs {
        let accepted = match resolve_parent(inputs, kind, &ns, p) {
            ParentOutcome::NotOurs => continue,
            ParentOutcome::Rejected(reason, message) => {
                problems.insert(format!("{kind} {ns}/{name}: {message}"));
                Cond::new(reasons::ACCEPTED, false, reason, message)
            }
            ParentOutcome::Accepted(_) if all_invalid => Cond::new(
                reasons::ACCEPTED,
                false,
                reasons::UNSUPPORTED_VALUE,
                format!("every rule is invalid: {}", invalid.join("; ")),
            ),
            ParentOutcome::Accepted(parent) => {
                if !parents.contains(&parent) {
                    parents.push(parent);
                }
                Cond::new(
                    reasons::ACCEPTED,
                    true,
                    reasons::ACCEPTED,
                    "attached to the waypoint",
                )
            }
        };
        let resolved = match issues.first() {
            None => Cond::new(
                reasons::RESOLVED_REFS,
                true,
                reasons::RESOLVED_REFS,
                "all references resolved",
            ),
            Some(first) => Cond::new(
                reasons::RESOLVED_REFS,
                false,
                first.reason,
                issues
                    .iter()
                    .map(|i| i.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        };
        let mut conditions = vec![accepted, resolved];
        if !invalid.is_empty() && !all_invalid {
            conditions.push(Cond::new(
                reasons::PARTIALLY_INVALID,
                true,
                reasons::UNSUPPORTED_VALUE,
                format!("ignored: {}", invalid.join("; ")),
            ));
        }
        statuses.push(RouteParentStatus {
            parent_ref: p.clone(),
            conditions,
        });
    }
    Converted {
        parents,
        rules,
        status: (!statuses.is_empty()).then(|| RouteStatus {
            kind,
            namespace: ns,
            name,
            observed_generation: obj.meta().generation,
            parents: statuses,
        }),
    }
}

fn created<K: ResourceExt>(obj: &K) -> String {
    obj.meta()
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.to_string())
        .unwrap_or_default()
}

/// HTTPRoutes and GRPCRoutes with at least one accepted parent, as model
/// routes, and the status of every route with a parent this controller
/// manages.
pub fn build_routes(
    inputs: &Inputs,
    problems: &mut BTreeSet<String>,
) -> (
    Vec<model::HttpRoute>,
    Vec<model::GrpcRoute>,
    Vec<RouteStatus>,
) {
    let mut statuses = Vec::new();
    let mut http = Vec::new();
    for ((namespace, name), r) in by_key(&inputs.state.http_routes) {
        let c = convert_route(
            inputs,
            RouteKind::HTTPRoute,
            r,
            &r.spec.parent_refs,
            &r.spec.rules,
            http_rule,
            problems,
        );
        statuses.extend(c.status);
        if !c.parents.is_empty() {
            http.push(model::HttpRoute {
                created: created(r),
                name,
                namespace,
                parents: c.parents,
                hostnames: r.spec.hostnames.clone(),
                rules: c.rules,
            });
        }
    }
    let mut grpc = Vec::new();
    for ((namespace, name), r) in by_key(&inputs.state.grpc_routes) {
        let c = convert_route(
            inputs,
            RouteKind::GRPCRoute,
            r,
            &r.spec.parent_refs,
            &r.spec.rules,
            grpc_rule,
            problems,
        );
        statuses.extend(c.status);
        if !c.parents.is_empty() {
            grpc.push(model::GrpcRoute {
                created: created(r),
                name,
                namespace,
                parents: c.parents,
                hostnames: r.spec.hostnames.clone(),
                rules: c.rules,
            });
        }
    }
    (http, grpc, statuses)
}

/// Status of each waypoint Gateway and what to deploy for it.
pub fn build_gateways(
    inputs: &Inputs,
    problems: &mut BTreeSet<String>,
) -> (Vec<GatewayStatus>, Vec<WaypointDeployment>) {
    let mut statuses = Vec::new();
    let mut deployments = Vec::new();
    for ((ns, name), g) in by_key(&inputs.state.gateways) {
        if !is_waypoint(g) {
            continue;
        }
        let is_ours =
            |labels: &BTreeMap<String, String>| labels.get(GATEWAY_NAME_LABEL) == Some(&name);
        let pods: Vec<_> = inputs
            .state
            .pods
            .iter()
            .filter(|p| p.namespace().as_deref() == Some(ns.as_str()) && is_ours(p.labels()))
            .collect();
        // Ready: in the model (scheduled, running, with an IP) and not
        // reported unready by the kubelet.
        let ready = pods.iter().any(|p| {
            let in_model = inputs
                .workloads
                .iter()
                .any(|w| w.namespace == ns && w.name == p.name_any());
            let kubelet_ready = p
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready"))
                .is_none_or(|c| c.status == "True");
            in_model && kubelet_ready
        });
        let programmed = if ready {
            Cond::new(
                reasons::PROGRAMMED,
                true,
                reasons::PROGRAMMED,
                "a waypoint pod is ready",
            )
        } else if pods.is_empty() {
            Cond::new(
                reasons::PROGRAMMED,
                false,
                reasons::NO_RESOURCES,
                format!("no waypoint pod (label {GATEWAY_NAME_LABEL}={name}) exists yet"),
            )
        } else {
            Cond::new(
                reasons::PROGRAMMED,
                false,
                reasons::PENDING,
                "waiting for a waypoint pod to become ready",
            )
        };
        let addresses = inputs
            .service(&ns, &name)
            .map(|s| s.vips.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        statuses.push(GatewayStatus {
            namespace: ns.clone(),
            name: name.clone(),
            observed_generation: g.meta().generation,
            conditions: vec![
                Cond::new(
                    reasons::ACCEPTED,
                    true,
                    reasons::ACCEPTED,
                    "waypoint of the mesh",
                ),
                programmed,
            ],
            addresses,
        });
        let replicas = match g.annotations().get(REPLICAS_ANNOTATION) {
            None => 1,
            Some(v) => match v.trim().parse::<i32>() {
                Ok(n) if n >= 0 => n,
                _ => {
                    problems.insert(format!(
                        "Gateway {ns}/{name}: annotation {REPLICAS_ANNOTATION}={v:?} is not a replica count; using 1"
                    ));
                    1
                }
            },
        };
        if let Some(uid) = g.uid() {
            deployments.push(WaypointDeployment {
                namespace: ns,
                name,
                uid,
                replicas,
            });
        }
    }
    (statuses, deployments)
}
