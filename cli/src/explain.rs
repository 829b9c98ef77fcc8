//! `weftctl policy explain SRC DST PORT [--method M --path P]`: which
//! policy and rule allow or deny a connection or request, at each hop it
//! takes (the waypoint, then each endpoint's ztunnel), decided by the code
//! the proxies run (`weft_api::authorize`) on the model the controller
//! serves, or on a folder of manifests.

use std::net::IpAddr;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use weft_api::authorize::{self, Authorizer, AuthzRequest, Target};
use weft_api::l7::GATEWAY_NAME_LABEL;
use weft_api::model::{Service, Workload};
use weft_api::policy::HeaderPairs;
use weft_api::{Identity, MeshModel};

#[derive(Debug, Serialize)]
pub struct Step {
    /// `waypoint shop/wp` or `ztunnel of shop/db`.
    pub at: String,
    pub allowed: bool,
    /// The deciding policy (`namespace/name`) and its rule index.
    pub policy: Option<String>,
    pub rule: Option<usize>,
    /// The rule as written, when one decided.
    pub rule_text: Option<serde_json::Value>,
    pub reason: String,
}

#[derive(Debug, Serialize)]
pub struct Explanation {
    /// `allow`, `deny`, or `depends` (endpoints decide differently).
    pub decision: &'static str,
    pub steps: Vec<Step>,
}

/// A client: a workload or an address outside the mesh.
struct Source<'m> {
    ip: IpAddr,
    workload: Option<&'m Workload>,
}

fn workload<'m>(m: &'m MeshModel, key: &str) -> Option<&'m Workload> {
    let (ns, name) = key.split_once('/')?;
    m.workloads
        .iter()
        .find(|w| w.namespace == ns && w.name == name)
}

fn service<'m>(m: &'m MeshModel, key: &str) -> Option<&'m Service> {
    if let Ok(ip) = key.parse::<IpAddr>() {
        return m.services.iter().find(|s| s.vips.contains(&ip));
    }
    let (ns, name) = key.split_once('/')?;
    m.services
        .iter()
        .find(|s| s.namespace == ns && s.name == name)
}

fn by_ip(m: &MeshModel, ip: IpAddr) -> Option<&Workload> {
    m.workloads.iter().find(|w| w.ips.contains(&ip))
}

fn decided(
    at: String,
    result: Result<authorize::DecidedBy<'_>, (authorize::Refusal, authorize::DecidedBy<'_>)>,
) -> Step {
    let (allowed, by, reason) = match result {
        Ok(None) => (true, None, "no policy denies it".to_owned()),
        Ok(Some(by)) => (true, Some(by), "allowed by this ALLOW rule".to_owned()),
        Err((refusal, by)) => {
            let reason = match &refusal {
                authorize::Refusal::Policy(Some(_)) => "denied by this DENY rule".to_owned(),
                authorize::Refusal::Policy(None) => {
                    "no ALLOW rule of the policies selecting it matches".to_owned()
                }
                authorize::Refusal::StrictMtls => {
                    "STRICT mTLS (PeerAuthentication) and the client is not in the mesh".to_owned()
                }
                authorize::Refusal::WaypointRequired(w) => format!(
                    "a Service selecting it uses waypoint {w}; only the waypoint may connect (denial policy {})",
                    refusal.policy_name()
                ),
            };
            (false, by, reason)
        }
    };
    Step {
        at,
        allowed,
        policy: by.map(|(p, _)| format!("{}/{}", p.namespace, p.name)),
        rule: by.map(|(_, i)| i),
        rule_text: by.and_then(|(p, i)| serde_json::to_value(&p.rules[i]).ok()),
        reason,
    }
}

/// A waypoint on the path: its Gateway, and what the request is for (a
/// Service, or a workload addressed directly, `direct`).
struct WaypointHop<'a> {
    waypoint: Target<'a>,
    service: Target<'a>,
    direct: bool,
}

/// What the waypoint decides for the request, by the waypoint's own code
/// (`Authorizer::decide`, or `decide_workload` for a pod addressed
/// directly).
fn at_waypoint(
    m: &MeshModel,
    hop: WaypointHop<'_>,
    src_ip: IpAddr,
    src_identity: Option<&Identity>,
    port: u16,
    (method, path): (Option<&str>, Option<&str>),
) -> Step {
    let authz = Authorizer::build(m);
    let no_headers = HeaderPairs(&[]);
    let req = AuthzRequest {
        service: hop.service,
        waypoint: hop.waypoint,
        src_ip,
        src_identity,
        port,
        method: method.unwrap_or(""),
        path: path.unwrap_or("/"),
        headers: &no_headers,
    };
    let v = if hop.direct {
        authz.decide_workload(hop.service, &req)
    } else {
        authz.decide(&req)
    };
    decided(
        format!("waypoint {}/{}", hop.waypoint.namespace, hop.waypoint.name),
        if v.allowed {
            Ok(v.by)
        } else {
            Err((authorize::Refusal::Policy(v.decision().policy()), v.by))
        },
    )
}

/// What the destination's ztunnel decides for a connection from `src_ip`
/// with `identity` to `dst` on `port`.
fn at_ztunnel(
    m: &MeshModel,
    required: &std::collections::HashMap<usize, Vec<(Identity, String)>>,
    dst: &Workload,
    src_ip: IpAddr,
    identity: Option<&Identity>,
    port: u16,
) -> Step {
    let at = format!("ztunnel of {}/{} (port {port})", dst.namespace, dst.name);
    if !m.is_captured(dst) {
        return Step {
            at,
            allowed: true,
            policy: None,
            rule: None,
            rule_text: None,
            reason: "not in the mesh: plain TCP, no policy".into(),
        };
    }
    let index = m.workloads.iter().position(|w| std::ptr::eq(w, dst));
    let req = index
        .and_then(|i| required.get(&i))
        .map(Vec::as_slice)
        .unwrap_or_default();
    decided(at, authorize::inbound(m, dst, req, src_ip, identity, port))
}

pub fn explain(
    m: &MeshModel,
    src: &str,
    dst: &str,
    port: u16,
    method: Option<&str>,
    path: Option<&str>,
) -> Result<Explanation> {
    let source = match src.parse::<IpAddr>() {
        Ok(ip) => Source {
            ip,
            workload: by_ip(m, ip),
        },
        Err(_) => {
            let w = workload(m, src)
                .with_context(|| format!("no workload {src:?} (give namespace/name or an IP)"))?;
            let ip = *w.ips.first().with_context(|| format!("{src} has no IP"))?;
            Source {
                ip,
                workload: Some(w),
            }
        }
    };
    // Traffic leaves in HBONE with the client's identity only when the
    // client is captured.
    let src_identity = source
        .workload
        .filter(|w| m.is_captured(w))
        .map(|w| m.identity_of(w));
    let endpoints = m.service_endpoints();
    let required = authorize::waypoint_requirements(m, &endpoints);
    let mut steps = Vec::new();
    // `pod/ns/name` names a workload even where a Service has its name;
    // `svc/ns/name` or a bare `ns/name` a Service first.
    let (as_pod, dst) = match dst.strip_prefix("pod/") {
        Some(rest) => (true, rest),
        None => (false, dst.strip_prefix("svc/").unwrap_or(dst)),
    };
    if let Some(svc) = service(m, dst).filter(|_| !as_pod) {
        let Some(sp) = svc.ports.iter().find(|p| p.port == port) else {
            bail!("Service {}/{} has no port {port}", svc.namespace, svc.name);
        };
        let si = m
            .services
            .iter()
            .position(|s| std::ptr::eq(s, svc))
            .unwrap_or(0);
        let eps: Vec<&Workload> = endpoints[si].iter().map(|&i| &m.workloads[i]).collect();
        if let Some(wp) = &svc.waypoint {
            let step = at_waypoint(
                m,
                WaypointHop {
                    waypoint: Target {
                        namespace: &svc.namespace,
                        name: wp,
                    },
                    service: Target {
                        namespace: &svc.namespace,
                        name: &svc.name,
                    },
                    direct: false,
                },
                source.ip,
                src_identity.as_ref(),
                port,
                (method, path),
            );
            let denied = !step.allowed;
            steps.push(step);
            if !denied {
                // The waypoint dials each endpoint with its own identity.
                let wp_sa = m
                    .waypoints
                    .iter()
                    .find(|w| w.namespace == svc.namespace && &w.name == wp)
                    .map(|w| w.service_account().to_owned())
                    .unwrap_or_else(|| wp.clone());
                let wp_id = Identity::new(&m.trust_domain, &svc.namespace, &wp_sa);
                let wp_ip = m
                    .workloads
                    .iter()
                    .find(|w| {
                        w.namespace == svc.namespace && w.labels.get(GATEWAY_NAME_LABEL) == Some(wp)
                    })
                    .and_then(|w| w.ips.first().copied())
                    .unwrap_or(source.ip);
                for e in &eps {
                    steps.push(at_ztunnel(
                        m,
                        &required,
                        e,
                        wp_ip,
                        Some(&wp_id),
                        sp.target(),
                    ));
                }
            }
        } else {
            for e in &eps {
                let id = if m.is_captured(e) {
                    src_identity.as_ref()
                } else {
                    None
                };
                steps.push(at_ztunnel(m, &required, e, source.ip, id, sp.target()));
            }
        }
        if eps.is_empty() && steps.iter().all(|s| s.allowed) {
            bail!("Service {}/{} has no endpoints", svc.namespace, svc.name);
        }
    } else {
        let w = match dst.parse::<IpAddr>() {
            Ok(ip) => by_ip(m, ip),
            Err(_) => workload(m, dst),
        }
        .with_context(|| format!("no Service or workload {dst:?}"))?;
        let wi = m
            .workloads
            .iter()
            .position(|x| std::ptr::eq(x, w))
            .unwrap_or(0);
        let waypoint = required
            .get(&wi)
            .and_then(|l| l.first())
            .map(|(id, wp)| (id.clone(), wp.clone()));
        match waypoint {
            // A mesh client's ztunnel sends it through the pod's waypoint,
            // where the policies of the pod's Services apply.
            Some((wp_id, wp)) if src_identity.is_some() => {
                let (wp_ns, wp_name) = wp.split_once('/').unwrap_or(("", &wp));
                let step = at_waypoint(
                    m,
                    WaypointHop {
                        waypoint: Target {
                            namespace: wp_ns,
                            name: wp_name,
                        },
                        service: Target {
                            namespace: &w.namespace,
                            name: &w.name,
                        },
                        direct: true,
                    },
                    source.ip,
                    src_identity.as_ref(),
                    port,
                    (method, path),
                );
                let allowed = step.allowed;
                steps.push(step);
                if allowed {
                    let wp_ip = m
                        .workloads
                        .iter()
                        .find(|x| {
                            x.namespace == wp_ns
                                && x.labels.get(GATEWAY_NAME_LABEL).map(String::as_str)
                                    == Some(wp_name)
                        })
                        .and_then(|x| x.ips.first().copied())
                        .unwrap_or(source.ip);
                    steps.push(at_ztunnel(m, &required, w, wp_ip, Some(&wp_id), port));
                }
            }
            _ => steps.push(at_ztunnel(
                m,
                &required,
                w,
                source.ip,
                src_identity.as_ref(),
                port,
            )),
        }
    }
    let allowed = steps.iter().filter(|s| s.allowed).count();
    // A hop denied ends the path; endpoints may differ among themselves.
    let decision = if allowed == steps.len() {
        "allow"
    } else if steps
        .iter()
        .any(|s| !s.allowed && s.at.starts_with("waypoint"))
        || steps
            .iter()
            .filter(|s| s.at.starts_with("ztunnel"))
            .all(|s| !s.allowed)
    {
        "deny"
    } else {
        "depends"
    };
    Ok(Explanation { decision, steps })
}

pub fn render(e: &Explanation) -> String {
    let mut out = format!("decision: {}\n", e.decision.to_uppercase());
    for s in &e.steps {
        out += &format!(
            "  {} {}: {}",
            if s.allowed { "√" } else { "×" },
            s.at,
            s.reason
        );
        if let (Some(p), Some(r)) = (&s.policy, s.rule) {
            out += &format!(" ({p}, rule {r}");
            if let Some(t) = &s.rule_text {
                out += &format!(": {t}");
            }
            out += ")";
        }
        out += "\n";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model() -> MeshModel {
        MeshModel::from_yaml(
            r#"
namespaces: [{ name: shop, labels: { weft.dev/dataplane-mode: ambient } }]
workloads:
  - { name: api, namespace: shop, service_account: api, node: n1, ips: [10.0.0.2], labels: { app: api } }
  - { name: db, namespace: shop, service_account: db, node: n2, ips: [10.0.0.3], labels: { app: db } }
  - { name: web, namespace: shop, service_account: web, node: n2, ips: [10.0.0.4], labels: { app: web } }
  - { name: wp-waypoint, namespace: shop, service_account: wp, node: n2, ips: [10.0.0.5], labels: { gateway.networking.k8s.io/gateway-name: wp, weft.dev/dataplane-mode: none } }
services:
  - { name: db, namespace: shop, vips: [10.1.0.1], ports: [{ port: 5432 }], selector: { app: db } }
  - { name: web, namespace: shop, vips: [10.1.0.2], ports: [{ port: 80, target_port: 8080 }], selector: { app: web }, waypoint: wp }
waypoints: [{ name: wp, namespace: shop }]
policies:
  - { name: db-from-api, namespace: shop, selector: { app: db }, action: ALLOW, rules: [{ from: [{ principals: [spiffe://cluster.local/ns/shop/sa/api] }] }] }
  - { name: no-admin, namespace: shop, action: DENY, rules: [{ to: [{ paths: ["/admin*"] }] }], targets: [{ kind: Service, name: web }] }
"#,
        )
        .unwrap()
    }

    #[test]
    fn names_the_deciding_policy_and_rule_at_each_hop() {
        let m = model();
        let e = explain(&m, "shop/api", "shop/db", 5432, None, None).unwrap();
        assert_eq!(e.decision, "allow");
        assert_eq!(e.steps[0].policy.as_deref(), Some("shop/db-from-api"));
        assert_eq!(e.steps[0].rule, Some(0));
        let e = explain(&m, "shop/web", "10.1.0.1", 5432, None, None).unwrap();
        assert_eq!(e.decision, "deny", "{e:?}");
        assert_eq!(e.steps[0].policy, None);
        let e = explain(
            &m,
            "shop/api",
            "shop/web",
            80,
            Some("GET"),
            Some("/admin/x"),
        )
        .unwrap();
        assert_eq!(e.decision, "deny");
        assert_eq!(e.steps.len(), 1);
        assert_eq!(e.steps[0].policy.as_deref(), Some("shop/no-admin"));
        let e = explain(&m, "shop/api", "shop/web", 80, Some("GET"), Some("/")).unwrap();
        assert_eq!(e.decision, "allow");
        assert_eq!(e.steps.len(), 2, "{e:?}");
        assert!(e.steps[1].at.starts_with("ztunnel of shop/web (port 8080)"));
        // A mesh client dialling the pod behind the waypoint: its ztunnel
        // sends it through the waypoint, where web's policies apply.
        let e = explain(&m, "shop/api", "pod/shop/web", 8080, Some("GET"), Some("/")).unwrap();
        assert_eq!(e.decision, "allow", "{e:?}");
        assert_eq!(e.steps.len(), 2, "{e:?}");
        assert_eq!(e.steps[0].at, "waypoint shop/wp");
        // Not HTTP: web's DENY naming a path fails closed, as at L4.
        let e = explain(&m, "shop/api", "pod/shop/web", 8080, None, None).unwrap();
        assert_eq!(e.decision, "deny", "{e:?}");
        assert_eq!(e.steps[0].policy.as_deref(), Some("shop/no-admin"));
        let e = explain(
            &m,
            "shop/api",
            "pod/shop/web",
            8080,
            Some("GET"),
            Some("/admin/x"),
        )
        .unwrap();
        assert_eq!(e.decision, "deny", "{e:?}");
        assert_eq!(e.steps[0].policy.as_deref(), Some("shop/no-admin"));
        // A client outside the mesh skips the waypoint: refused.
        let e = explain(&m, "10.9.9.9", "pod/shop/web", 8080, None, None).unwrap();
        assert_eq!(e.decision, "deny");
        assert!(
            e.steps[0].reason.contains("waypoint-required:shop/wp"),
            "{e:?}"
        );
    }
}
