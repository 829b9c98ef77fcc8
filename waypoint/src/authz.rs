//! L7 authorization at the waypoint: the `AuthorizationPolicy`s whose
//! `targets` name the request's Service or this waypoint's Gateway,
//! evaluated with the request's HTTP attributes. The engine is
//! `weft_api::authorize::Authorizer` (shared with `weftctl policy
//! explain`); this adapts `http` headers to it. A denied request is
//! answered 403.

use http::HeaderMap;
use weft_api::policy::HeaderLookup;

pub use weft_api::authorize::{Authorizer, AuthzRequest, Decision, Target};

/// A request's headers as the policy evaluator reads them.
pub struct Headers<'a>(pub &'a HeaderMap);

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
    use weft_api::{Identity, MeshModel};

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
                headers: &Headers(&self.headers),
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
