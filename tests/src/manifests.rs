//! Renders a mesh model as the Kubernetes objects a cluster would hold
//! (Namespaces, Pods with their status, Services, weft.dev policies), so the
//! same test scenario can drive the controller through its manifest folder.

use serde_json::{json, Value};
use weft_api::model::{
    BackendRef, HeaderMatch, HttpBackend, HttpFilter, MatchType, MtlsMode, ParentKind, PathMatch,
    PathModifier, PolicyAction, QueryParamMatch,
};
use weft_api::MeshModel;

pub fn render(model: &MeshModel) -> anyhow::Result<String> {
    let mut docs: Vec<Value> = Vec::new();
    for ns in &model.namespaces {
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": ns.name, "labels": ns.labels },
        }));
    }
    for w in &model.workloads {
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": w.name, "namespace": w.namespace, "uid": w.uid, "labels": w.labels },
            "spec": {
                "nodeName": w.node,
                "serviceAccountName": w.service_account,
                "containers": [{ "name": "app", "image": "app" }],
            },
            "status": {
                "phase": "Running",
                "podIP": w.ips.first().map(|i| i.to_string()),
                "podIPs": w.ips.iter().map(|i| json!({ "ip": i.to_string() })).collect::<Vec<_>>(),
            },
        }));
    }
    for s in &model.services {
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": s.name,
                "namespace": s.namespace,
                "labels": match &s.waypoint {
                    Some(w) => json!({ weft_api::model::USE_WAYPOINT_LABEL: w }),
                    None => json!({}),
                },
            },
            "spec": {
                "clusterIP": s.vips.first().map(|i| i.to_string()),
                "clusterIPs": s.vips.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                "selector": s.selector,
                "ports": s.ports.iter().map(|p| json!({
                    "name": format!("p{}", p.port),
                    "port": p.port,
                    "targetPort": p.target(),
                    "protocol": "TCP",
                })).collect::<Vec<_>>(),
            },
        }));
    }
    for p in &model.policies {
        let mut spec = json!({
            "action": match p.action { PolicyAction::Allow => "ALLOW", PolicyAction::Deny => "DENY" },
            "rules": p.rules.iter().map(|r| json!({
                "from": r.from.iter().map(|f| json!({ "source": {
                    "principals": f.principals, "namespaces": f.namespaces, "ipBlocks": f.ip_blocks,
                }})).collect::<Vec<_>>(),
                "to": r.to.iter().map(|t| json!({ "operation": {
                    "ports": t.ports, "methods": t.methods, "paths": t.paths, "headers": t.headers,
                }})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        if !p.targets.is_empty() {
            spec["targetRefs"] = p
                .targets
                .iter()
                .map(|t| json!({ "kind": kind_name(t.kind), "name": t.name }))
                .collect();
        }
        if let Some(sel) = &p.selector {
            spec["selector"] = json!({ "matchLabels": sel });
        }
        docs.push(json!({
            "apiVersion": "weft.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": { "name": p.name, "namespace": p.namespace },
            "spec": spec,
        }));
    }
    for pa in &model.peer_authentications {
        let mut spec = json!({
            "mtls": { "mode": match pa.mode { MtlsMode::Strict => "STRICT", MtlsMode::Permissive => "PERMISSIVE" } },
        });
        if let Some(sel) = &pa.selector {
            spec["selector"] = json!({ "matchLabels": sel });
        }
        docs.push(json!({
            "apiVersion": "weft.dev/v1alpha1",
            "kind": "PeerAuthentication",
            "metadata": { "name": pa.name, "namespace": pa.namespace },
            "spec": spec,
        }));
    }
    for w in &model.waypoints {
        docs.push(json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": { "name": w.name, "namespace": w.namespace },
            "spec": {
                "gatewayClassName": weft_api::model::WAYPOINT_CLASS,
                "listeners": [{ "name": "mesh", "port": 15008, "protocol": "HBONE" }],
            },
        }));
    }
    for r in &model.http_routes {
        docs.push(json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "HTTPRoute",
            "metadata": { "name": r.name, "namespace": r.namespace, "creationTimestamp": created(&r.created) },
            "spec": {
                "parentRefs": r.parents.iter().map(parent_ref).collect::<Vec<_>>(),
                "hostnames": r.hostnames,
                "rules": r.rules.iter().map(|rule| {
                    let mut v = json!({
                        "matches": rule.matches.iter().map(|m| {
                            let mut mv = json!({
                                "headers": m.headers.iter().map(header_match).collect::<Vec<_>>(),
                                "queryParams": m.query_params.iter().map(query_match).collect::<Vec<_>>(),
                            });
                            if let Some(p) = &m.path {
                                let (t, val) = match p {
                                    PathMatch::Exact(v) => ("Exact", v),
                                    PathMatch::PathPrefix(v) => ("PathPrefix", v),
                                    PathMatch::RegularExpression(v) => ("RegularExpression", v),
                                };
                                mv["path"] = json!({ "type": t, "value": val });
                            }
                            if let Some(method) = &m.method {
                                mv["method"] = json!(method);
                            }
                            mv
                        }).collect::<Vec<_>>(),
                        "filters": rule.filters.iter().map(filter).collect::<Vec<_>>(),
                        "backendRefs": rule.backends.iter().map(backend).collect::<Vec<_>>(),
                    });
                    if let Some(name) = &rule.name {
                        v["name"] = json!(name);
                    }
                    if let Some(t) = &rule.timeouts {
                        let mut tv = json!({});
                        if let Some(ms) = t.request_ms {
                            tv["request"] = json!(format!("{ms}ms"));
                        }
                        if let Some(ms) = t.backend_request_ms {
                            tv["backendRequest"] = json!(format!("{ms}ms"));
                        }
                        v["timeouts"] = tv;
                    }
                    if let Some(r) = &rule.retry {
                        let mut rv = json!({ "codes": r.codes, "attempts": r.attempts });
                        if let Some(ms) = r.backoff_ms {
                            rv["backoff"] = json!(format!("{ms}ms"));
                        }
                        v["retry"] = rv;
                    }
                    v
                }).collect::<Vec<_>>(),
            },
        }));
    }
    for r in &model.grpc_routes {
        docs.push(json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GRPCRoute",
            "metadata": { "name": r.name, "namespace": r.namespace, "creationTimestamp": created(&r.created) },
            "spec": {
                "parentRefs": r.parents.iter().map(parent_ref).collect::<Vec<_>>(),
                "hostnames": r.hostnames,
                "rules": r.rules.iter().map(|rule| json!({
                    "matches": rule.matches.iter().map(|m| {
                        let mut mv = json!({
                            "headers": m.headers.iter().map(header_match).collect::<Vec<_>>(),
                        });
                        if let Some(g) = &m.method {
                            mv["method"] = json!({
                                "type": match_type(g.kind),
                                "service": g.service,
                                "method": g.method,
                            });
                        }
                        mv
                    }).collect::<Vec<_>>(),
                    "filters": rule.filters.iter().map(filter).collect::<Vec<_>>(),
                    "backendRefs": rule.backends.iter().map(backend).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            },
        }));
    }
    for tp in &model.traffic_policies {
        docs.push(crate::manifests::traffic_policy(tp));
    }
    let mut out = String::new();
    for d in docs {
        out += "---\n";
        out += &serde_yaml::to_string(&d)?;
    }
    Ok(out)
}

fn kind_name(k: ParentKind) -> &'static str {
    match k {
        ParentKind::Service => "Service",
        ParentKind::Gateway => "Gateway",
    }
}

fn created(c: &str) -> Value {
    if c.is_empty() {
        Value::Null
    } else {
        json!(c)
    }
}

fn parent_ref(p: &weft_api::model::ParentRef) -> Value {
    let mut v = json!({
        "group": if p.kind == ParentKind::Service { "" } else { "gateway.networking.k8s.io" },
        "kind": kind_name(p.kind),
        "name": p.name,
    });
    if !p.namespace.is_empty() {
        v["namespace"] = json!(p.namespace);
    }
    if let Some(port) = p.port {
        v["port"] = json!(port);
    }
    v
}

fn match_type(k: MatchType) -> &'static str {
    match k {
        MatchType::Exact => "Exact",
        MatchType::RegularExpression => "RegularExpression",
    }
}

fn header_match(h: &HeaderMatch) -> Value {
    json!({ "type": match_type(h.kind), "name": h.name, "value": h.value })
}

fn query_match(q: &QueryParamMatch) -> Value {
    json!({ "type": match_type(q.kind), "name": q.name, "value": q.value })
}

fn backend_ref(b: &BackendRef) -> Value {
    let mut v = json!({ "name": b.name, "port": b.port });
    if !b.namespace.is_empty() {
        v["namespace"] = json!(b.namespace);
    }
    v
}

fn backend(b: &HttpBackend) -> Value {
    let mut v = backend_ref(&b.backend);
    v["weight"] = json!(b.weight);
    if !b.filters.is_empty() {
        v["filters"] = b.filters.iter().map(filter).collect();
    }
    v
}

fn path_modifier(p: &PathModifier) -> Value {
    match p {
        PathModifier::ReplaceFullPath(v) => {
            json!({ "type": "ReplaceFullPath", "replaceFullPath": v })
        }
        PathModifier::ReplacePrefixMatch(v) => {
            json!({ "type": "ReplacePrefixMatch", "replacePrefixMatch": v })
        }
    }
}

fn header_modifier(m: &weft_api::model::HeaderModifier) -> Value {
    let pairs = |l: &[(String, String)]| -> Vec<Value> {
        l.iter()
            .map(|(n, v)| json!({ "name": n, "value": v }))
            .collect()
    };
    json!({ "set": pairs(&m.set), "add": pairs(&m.add), "remove": m.remove })
}

fn filter(f: &HttpFilter) -> Value {
    match f {
        HttpFilter::RequestHeaderModifier(m) => {
            json!({ "type": "RequestHeaderModifier", "requestHeaderModifier": header_modifier(m) })
        }
        HttpFilter::ResponseHeaderModifier(m) => {
            json!({ "type": "ResponseHeaderModifier", "responseHeaderModifier": header_modifier(m) })
        }
        HttpFilter::RequestRedirect(r) => {
            let mut v = json!({});
            if let Some(s) = &r.scheme {
                v["scheme"] = json!(s);
            }
            if let Some(h) = &r.hostname {
                v["hostname"] = json!(h);
            }
            if let Some(p) = &r.path {
                v["path"] = path_modifier(p);
            }
            if let Some(p) = r.port {
                v["port"] = json!(p);
            }
            if let Some(c) = r.status_code {
                v["statusCode"] = json!(c);
            }
            json!({ "type": "RequestRedirect", "requestRedirect": v })
        }
        HttpFilter::UrlRewrite(r) => {
            let mut v = json!({});
            if let Some(h) = &r.hostname {
                v["hostname"] = json!(h);
            }
            if let Some(p) = &r.path {
                v["path"] = path_modifier(p);
            }
            json!({ "type": "URLRewrite", "urlRewrite": v })
        }
        HttpFilter::RequestMirror(m) => {
            let mut v = json!({ "backendRef": backend_ref(&m.backend) });
            if let Some(p) = m.percent {
                v["percent"] = json!(p);
            }
            json!({ "type": "RequestMirror", "requestMirror": v })
        }
    }
}

/// A `weft.dev/v1alpha1` TrafficPolicy.
pub fn traffic_policy(tp: &weft_api::model::TrafficPolicy) -> Value {
    let mut spec = json!({ "targetRef": { "kind": "Service", "name": tp.target } });
    if let Some(b) = &tp.retry_budget {
        spec["retryBudget"] =
            json!({ "percent": b.percent, "minRetriesPerSecond": b.min_retries_per_second });
    }
    if let Some(o) = &tp.outlier_detection {
        spec["outlierDetection"] = json!({
            "consecutive5xx": o.consecutive_5xx,
            "baseEjectionTime": format!("{}ms", o.base_ejection_ms),
            "maxEjectionPercent": o.max_ejection_percent,
        });
    }
    if let Some(l) = &tp.limits {
        spec["limits"] = json!({
            "maxConnections": l.max_connections,
            "maxPendingRequests": l.max_pending_requests,
            "maxRequests": l.max_requests,
        });
    }
    if let Some(f) = &tp.fault {
        let mut fv = json!({});
        if let Some(d) = &f.delay {
            fv["delay"] =
                json!({ "percent": d.percent, "fixedDelay": format!("{}ms", d.delay_ms) });
        }
        if let Some(a) = &f.abort {
            fv["abort"] = json!({ "percent": a.percent, "httpStatus": a.status });
        }
        spec["fault"] = fv;
    }
    if let Some(r) = &tp.rate_limit {
        let mut rv = json!({ "requests": r.requests, "period": format!("{}ms", r.period_ms) });
        if let Some(b) = r.burst {
            rv["burst"] = json!(b);
        }
        match &r.key {
            weft_api::model::RateLimitKey::Global => {}
            weft_api::model::RateLimitKey::Header(h) => {
                rv["key"] = json!({ "type": "Header", "header": h })
            }
            weft_api::model::RateLimitKey::ClientIdentity => {
                rv["key"] = json!({ "type": "ClientIdentity" })
            }
        }
        spec["rateLimit"] = rv;
    }
    json!({
        "apiVersion": "weft.dev/v1alpha1",
        "kind": "TrafficPolicy",
        "metadata": { "name": tp.name, "namespace": tp.namespace },
        "spec": spec,
    })
}
