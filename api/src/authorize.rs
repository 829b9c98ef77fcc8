//! Who may reach what: the authorization decisions of both proxies, pure,
//! so that `weftctl policy explain` runs the very code they run.
//!
//! - At a destination ztunnel ([`inbound`]): STRICT mTLS, then the
//!   waypoint requirement (a pod behind a Service with a waypoint accepts
//!   that Service's traffic only from the waypoint), then the L4
//!   `AuthorizationPolicy`s that select the pod ([`l4_policies`]).
//! - At a waypoint ([`Authorizer`]): the policies whose `targets` name the
//!   request's Service or the waypoint's Gateway, with the request's HTTP
//!   attributes.

use std::collections::HashMap;
use std::net::IpAddr;

use crate::model::{AuthorizationPolicy, MeshModel, MtlsMode, ParentKind, Service, Workload};
use crate::policy::{self, HeaderLookup, HttpAttrs, Request, Verdict};
use crate::Identity;

pub use crate::policy::Decision;

/// Why an inbound connection may not proceed (or continue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Policy(Option<String>),
    StrictMtls,
    /// A Service selecting the pod uses this waypoint (`namespace/name`),
    /// and the connection did not come from it.
    WaypointRequired(String),
}

impl Refusal {
    /// The `policy` label of the denial: the policy's namespace/name, or
    /// what denied it when no single policy did.
    pub fn policy_name(&self) -> String {
        match self {
            Refusal::Policy(p) => p.clone().unwrap_or_else(|| "no-matching-allow".into()),
            Refusal::StrictMtls => "peer-authentication-strict".into(),
            Refusal::WaypointRequired(w) => format!("waypoint-required:{w}"),
        }
    }
}

/// Policies of `w`'s namespace that select it and that a ztunnel enforces
/// (those with `targets` are the waypoint's).
pub fn l4_policies<'a>(
    model: &'a MeshModel,
    w: &'a Workload,
) -> impl Iterator<Item = &'a AuthorizationPolicy> + 'a {
    model.policies.iter().filter(move |p| {
        p.targets.is_empty()
            && p.namespace == w.namespace
            && p.selector
                .as_ref()
                .is_none_or(|sel| sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
    })
}

/// For each workload (index into `model.workloads`) behind a Service with a
/// waypoint: the waypoints it accepts that traffic from, as (identity,
/// `namespace/name`). `endpoints[i]`: the workloads Service `i` selects.
pub fn waypoint_requirements(
    model: &MeshModel,
    endpoints: &[Vec<usize>],
) -> HashMap<usize, Vec<(Identity, String)>> {
    let mut required: HashMap<usize, Vec<(Identity, String)>> = HashMap::new();
    for (si, s) in model.services.iter().enumerate() {
        let Some(entry) = service_waypoint(model, s) else {
            continue;
        };
        for &e in endpoints.get(si).into_iter().flatten() {
            let list = required.entry(e).or_default();
            if !list.contains(&entry) {
                list.push(entry.clone());
            }
        }
    }
    required
}

/// The waypoint Service `s` sends its traffic through, as (identity,
/// `namespace/name`): the identity from the waypoint's service account in
/// `model.waypoints` (the waypoint's name when it is not listed there).
/// Only `model`'s trust domain and waypoints are read.
pub fn service_waypoint(model: &MeshModel, s: &Service) -> Option<(Identity, String)> {
    let wp = s.waypoint.as_ref()?;
    let sa = model
        .waypoints
        .iter()
        .find(|w| w.namespace == s.namespace && &w.name == wp)
        .map(|w| w.service_account().to_owned())
        .unwrap_or_else(|| wp.clone());
    Some((
        Identity::new(&model.trust_domain, &s.namespace, &sa),
        format!("{}/{}", s.namespace, wp),
    ))
}

/// A policy and the index of its rule that decided.
pub type DecidedBy<'m> = Option<(&'m AuthorizationPolicy, usize)>;

/// One inbound connection to `dst` on `port` at its ztunnel. `required`:
/// `dst`'s entry of [`waypoint_requirements`]. `Ok` carries the ALLOW rule
/// that admitted it, if a policy decided.
pub fn inbound<'m>(
    model: &'m MeshModel,
    dst: &'m Workload,
    required: &[(Identity, String)],
    src_ip: IpAddr,
    src_identity: Option<&Identity>,
    port: u16,
) -> Result<DecidedBy<'m>, (Refusal, DecidedBy<'m>)> {
    if src_identity.is_none() && model.mtls_mode(dst) == MtlsMode::Strict {
        return Err((Refusal::StrictMtls, None));
    }
    // L7 policy lives in the waypoint: a client that skips it is refused.
    if !required.is_empty() && !required.iter().any(|(id, _)| src_identity == Some(id)) {
        return Err((Refusal::WaypointRequired(required[0].1.clone()), None));
    }
    let req = Request {
        src_ip,
        src_identity,
        dst_port: port,
        http: None,
    };
    let v = policy::decide(l4_policies(model, dst), &req);
    if v.allowed {
        Ok(v.by)
    } else {
        Err((Refusal::Policy(v.decision().policy()), v.by))
    }
}

/// A Service or Gateway by namespace and name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

/// One request as the waypoint sees it.
#[derive(Clone, Copy)]
pub struct AuthzRequest<'a> {
    /// The Service the request is for.
    pub service: Target<'a>,
    /// This waypoint's Gateway.
    pub waypoint: Target<'a>,
    pub src_ip: IpAddr,
    /// The client's SPIFFE identity from mTLS; `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    /// The service port.
    pub port: u16,
    /// Empty for a connection that is not HTTP: rules naming HTTP fields
    /// then fail closed, as at L4.
    pub method: &'a str,
    /// The request path; a query string, if left on, is ignored.
    pub path: &'a str,
    pub headers: &'a dyn HeaderLookup,
}

/// Waypoint-enforced policies indexed by what they target, built once per
/// model version.
#[derive(Debug, Default)]
pub struct Authorizer {
    policies: Vec<AuthorizationPolicy>,
    /// namespace -> service name -> indexes into `policies`.
    by_service: HashMap<String, HashMap<String, Vec<usize>>>,
    /// namespace -> gateway name -> indexes into `policies`.
    by_gateway: HashMap<String, HashMap<String, Vec<usize>>>,
    /// (namespace, workload) -> the Services with a waypoint that select
    /// it: their policies guard the workload when it is addressed directly.
    services_of: HashMap<(String, String), Vec<String>>,
}

impl Authorizer {
    pub fn build(model: &MeshModel) -> Self {
        let mut a = Authorizer::default();
        for (s, eps) in model.services.iter().zip(model.service_endpoints()) {
            if s.waypoint.is_none() {
                continue;
            }
            for e in eps {
                let w = &model.workloads[e];
                a.services_of
                    .entry((w.namespace.clone(), w.name.clone()))
                    .or_default()
                    .push(s.name.clone());
            }
        }
        for p in model.policies.iter().filter(|p| !p.targets.is_empty()) {
            let i = a.policies.len();
            a.policies.push(p.clone());
            for t in &p.targets {
                let index = match t.kind {
                    ParentKind::Service => &mut a.by_service,
                    ParentKind::Gateway => &mut a.by_gateway,
                };
                let list = index
                    .entry(p.namespace.clone())
                    .or_default()
                    .entry(t.name.clone())
                    .or_default();
                // A policy naming the same target twice counts once.
                if list.last() != Some(&i) {
                    list.push(i);
                }
            }
        }
        a
    }

    /// The decision with the policy and rule that made it.
    pub fn decide(&self, req: &AuthzRequest<'_>) -> Verdict<'_> {
        let service = lookup(&self.by_service, req.service);
        let gateway = lookup(&self.by_gateway, req.waypoint);
        // A policy targeting both is evaluated once.
        let applicable = service
            .iter()
            .chain(gateway.iter().filter(|i| !service.contains(i)));
        let path = req.path.split('?').next().unwrap_or(req.path);
        let request = Request {
            src_ip: req.src_ip,
            src_identity: req.src_identity,
            dst_port: req.port,
            http: (!req.method.is_empty()).then_some(HttpAttrs {
                method: req.method,
                path,
                headers: req.headers,
            }),
        };
        policy::decide(applicable.map(|&i| &self.policies[i]), &request)
    }

    /// The decision for a request to `workload` addressed directly (its
    /// pod address, not a Service) at a waypoint: the policies of every
    /// Service with a waypoint that selects it apply, each in turn, so a
    /// pod address is no way around its Services' policies; and those
    /// targeting the waypoint's Gateway. The first denial decides.
    /// `req.service` is ignored.
    pub fn decide_workload(&self, workload: Target<'_>, req: &AuthzRequest<'_>) -> Verdict<'_> {
        let services = self
            .services_of
            .get(&(workload.namespace.to_owned(), workload.name.to_owned()))
            .map_or(&[][..], Vec::as_slice);
        let as_service = |name: &str| {
            self.decide(&AuthzRequest {
                service: Target {
                    namespace: workload.namespace,
                    name,
                },
                ..*req
            })
        };
        let mut last = None;
        for s in services {
            let v = as_service(s);
            if !v.allowed {
                return v;
            }
            last = Some(v);
        }
        // No Service: the Gateway's policies alone.
        last.unwrap_or_else(|| as_service(""))
    }

    /// `verdict` for a workload addressed directly (`decide_workload`).
    pub fn verdict_workload(
        &self,
        workload: Target<'_>,
        req: &AuthzRequest<'_>,
    ) -> Result<(), String> {
        if self.is_empty() {
            return Ok(());
        }
        verdict_of(self.decide_workload(workload, req).decision())
    }

    /// Allow, or Deny with the deciding policy (`None`: no ALLOW policy
    /// matched).
    pub fn check(&self, req: &AuthzRequest<'_>) -> Decision {
        self.decide(req).decision()
    }

    /// `Err(policy)` when denied: the deciding policy (`namespace/name`),
    /// or `no-matching-allow`.
    pub fn verdict(&self, req: &AuthzRequest<'_>) -> Result<(), String> {
        if self.is_empty() {
            return Ok(());
        }
        verdict_of(self.check(req))
    }

    /// Whether any policy applies at this waypoint at all (to skip the work
    /// when none does).
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }
}

/// `Err(policy)` for a denial: the deciding policy, or `no-matching-allow`.
fn verdict_of(d: Decision) -> Result<(), String> {
    match d {
        Decision::Allow => Ok(()),
        Decision::Deny { policy } => Err(policy.unwrap_or_else(|| "no-matching-allow".to_owned())),
    }
}

fn lookup<'a>(
    index: &'a HashMap<String, HashMap<String, Vec<usize>>>,
    t: Target<'_>,
) -> &'a [usize] {
    index
        .get(t.namespace)
        .and_then(|m| m.get(t.name))
        .map_or(&[], Vec::as_slice)
}
