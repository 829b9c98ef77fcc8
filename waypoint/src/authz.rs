//! L7 authorization at the waypoint: the `AuthorizationPolicy`s whose
//! `targets` name the request's Service or this waypoint's Gateway,
//! evaluated with the request's HTTP attributes by `weft_api::policy`. A
//! denied request is answered 403.

use std::collections::HashMap;
use std::net::IpAddr;

use http::HeaderMap;
use weft_api::model::{AuthorizationPolicy, MeshModel, ParentKind};
use weft_api::policy::{self, HeaderLookup, HttpAttrs, Request};
use weft_api::Identity;

pub use weft_api::policy::Decision;

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
    pub headers: &'a HeaderMap,
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
}

impl Authorizer {
    pub fn build(model: &MeshModel) -> Self {
        let mut a = Authorizer::default();
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

    /// Allow, or Deny with the deciding policy (`None`: no ALLOW policy
    /// matched).
    pub fn check(&self, req: &AuthzRequest<'_>) -> Decision {
        let service = lookup(&self.by_service, req.service);
        let gateway = lookup(&self.by_gateway, req.waypoint);
        // A policy targeting both is evaluated once.
        let applicable = service
            .iter()
            .chain(gateway.iter().filter(|i| !service.contains(i)));
        let headers = Headers(req.headers);
        let path = req.path.split('?').next().unwrap_or(req.path);
        let request = Request {
            src_ip: req.src_ip,
            src_identity: req.src_identity,
            dst_port: req.port,
            http: (!req.method.is_empty()).then_some(HttpAttrs {
                method: req.method,
                path,
                headers: &headers,
            }),
        };
        policy::evaluate(applicable.map(|&i| &self.policies[i]), &request)
    }

    /// `Err(policy)` when denied: the deciding policy (`namespace/name`),
    /// or `no-matching-allow`.
    pub fn verdict(&self, req: &AuthzRequest<'_>) -> Result<(), String> {
        if self.is_empty() {
            return Ok(());
        }
        match self.check(req) {
            Decision::Allow => Ok(()),
            Decision::Deny { policy } => {
                Err(policy.unwrap_or_else(|| "no-matching-allow".to_owned()))
            }
        }
    }

    /// Whether any policy applies at this waypoint at all (to skip the work
    /// when none does).
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
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

struct Headers<'a>(&'a HeaderMap);

impl HeaderLookup for Headers<'_> {
    fn any_value(&self, name: &str, pred: &mut dyn FnMut(&str) -> bool) -> bool {
        // `HeaderMap` looks `&str` names up case-insensitively; an invalid
        // name finds nothing.
        self.0
            .get_all(name)
            .iter()
            .any(|v| v.to_str().is_ok_and(&mut *pred))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn authorizer(policies: &str) -> Authorizer {
        let model = MeshModel::from_yaml(&format!("policies:\n{policies}")).unwrap();
        Authorizer::build(&model)
    }

    struct Req {
        service: &'static str,
        identity: Option<Identity>,
        method: &'static str,
        path: &'static str,
        headers: HeaderMap,
    }

    fn req(method: &'static str, path: &'static str) -> Req {
        Req {
            service: "web",
            identity: None,
            method,
            path,
            headers: HeaderMap::new(),
        }
    }

    impl Req {
        fn from(mut self, sa: &str) -> Self {
            self.identity = Some(Identity::new("cluster.local", "shop", sa));
            self
        }
        fn header(mut self, n: &'static str, v: &'static str) -> Self {
            self.headers.insert(n, v.parse().unwrap());
            self
        }
        fn to(mut self, service: &'static str) -> Self {
            self.service = service;
            self
        }
        fn check(&self, a: &Authorizer) -> Decision {
            a.check(&AuthzRequest {
                service: Target {
                    namespace: "shop",
                    name: self.service,
                },
                waypoint: Target {
                    namespace: "shop",
                    name: "waypoint",
                },
                src_ip: "10.0.0.1".parse().unwrap(),
                src_identity: self.identity.as_ref(),
                port: 80,
                method: self.method,
                path: self.path,
                headers: &self.headers,
            })
        }
    }

    fn denied_by(p: &str) -> Decision {
        Decision::Deny {
            policy: Some(p.into()),
        }
    }

    const NO_ALLOW: Decision = Decision::Deny { policy: None };

    #[test]
    fn paths_methods_and_headers() {
        let a = authorizer(
            "  - { name: read, namespace: shop, targets: [{ kind: Service, name: web }], rules: [{ to: [{ methods: [GET, HEAD], paths: ['/api/*', /health] }] }] }\n  - { name: no-debug, namespace: shop, action: DENY, targets: [{ name: web }], rules: [{ to: [{ headers: { X-Debug: ['*'] } }] }] }",
        );
        assert_eq!(req("GET", "/api/items").check(&a), Decision::Allow);
        assert_eq!(req("GET", "/health?verbose=1").check(&a), Decision::Allow);
        assert_eq!(req("GET", "/admin").check(&a), NO_ALLOW);
        assert_eq!(req("DELETE", "/api/items").check(&a), NO_ALLOW);
        assert_eq!(
            req("GET", "/api/items").header("x-debug", "1").check(&a),
            denied_by("shop/no-debug")
        );
    }

    #[test]
    fn principals_and_deny_wins() {
        let a = authorizer(
            "  - { name: from-shop, namespace: shop, targets: [{ name: web }], rules: [{ from: [{ namespaces: [shop] }] }] }\n  - { name: not-legacy, namespace: shop, action: DENY, targets: [{ name: web }], rules: [{ from: [{ principals: [spiffe://cluster.local/ns/shop/sa/legacy] }], to: [{ methods: [POST] }] }] }",
        );
        assert_eq!(req("POST", "/").from("api").check(&a), Decision::Allow);
        assert_eq!(req("POST", "/").check(&a), NO_ALLOW);
        assert_eq!(
            req("POST", "/").from("legacy").check(&a),
            denied_by("shop/not-legacy")
        );
        assert_eq!(req("GET", "/").from("legacy").check(&a), Decision::Allow);
    }

    #[test]
    fn only_policies_targeting_the_service_or_this_waypoint_apply() {
        let a = authorizer(
            "  - { name: ztunnel-only, namespace: shop, action: DENY, rules: [{}] }\n  - { name: other-svc, namespace: shop, action: DENY, targets: [{ name: db }], rules: [{}] }\n  - { name: other-ns, namespace: prod, action: DENY, targets: [{ name: web }], rules: [{}] }\n  - { name: other-gw, namespace: shop, action: DENY, targets: [{ kind: Gateway, name: edge }], rules: [{}] }\n  - { name: gw-admin, namespace: shop, action: DENY, targets: [{ kind: Gateway, name: waypoint }, { name: web }], rules: [{ to: [{ paths: ['/admin*'] }] }] }",
        );
        assert!(!a.is_empty());
        assert_eq!(req("GET", "/").check(&a), Decision::Allow);
        assert_eq!(req("GET", "/admin/x").check(&a), denied_by("shop/gw-admin"));
        // The Gateway target covers every service behind the waypoint.
        assert_eq!(
            req("GET", "/admin").to("cart").check(&a),
            denied_by("shop/gw-admin")
        );
        assert_eq!(
            req("GET", "/").to("db").check(&a),
            denied_by("shop/other-svc")
        );
    }

    #[test]
    fn no_policy_allows() {
        let a = authorizer("  []");
        assert!(a.is_empty());
        assert_eq!(req("DELETE", "/").check(&a), Decision::Allow);
    }
}
