//! `AuthorizationPolicy` evaluation, shared by the ztunnel (L4, at the
//! destination) and the waypoint (L7). Pure: the caller picks the policies
//! that apply and describes the request; this decides.
//!
//! A matching DENY wins; with no ALLOW policy the request is allowed; with
//! ALLOW policies one must match. Where the HTTP attributes are unknown (L4
//! enforcement), a rule naming HTTP fields fails closed: in an ALLOW policy
//! it matches nothing, in a DENY policy it matches on its L4 fields alone.

use std::net::IpAddr;

use crate::model::{AuthorizationPolicy, Destination, PolicyAction, Rule, Source};
use crate::Identity;

/// What the enforcement point knows about one connection or request.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    pub src_ip: IpAddr,
    /// Verified mTLS peer; `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    pub dst_port: u16,
    /// `None` at L4: rules naming HTTP fields then fail closed.
    pub http: Option<HttpAttrs<'a>>,
}

/// The HTTP attributes a waypoint can check.
#[derive(Clone, Copy)]
pub struct HttpAttrs<'a> {
    pub method: &'a str,
    /// Path without the query string.
    pub path: &'a str,
    pub headers: &'a dyn HeaderLookup,
}

/// Read access to request headers, so this crate need not depend on `http`.
pub trait HeaderLookup {
    /// Whether some value of header `name` satisfies `pred`. `name` comes
    /// from a policy as written: the lookup must ignore its case.
    fn any_value(&self, name: &str, pred: &mut dyn FnMut(&str) -> bool) -> bool;
}

/// Headers as `(name, value)` pairs, for callers (and tests) without a
/// header map.
pub struct HeaderPairs<'a>(pub &'a [(&'a str, &'a str)]);

impl HeaderLookup for HeaderPairs<'_> {
    fn any_value(&self, name: &str, pred: &mut dyn FnMut(&str) -> bool) -> bool {
        self.0
            .iter()
            .any(|(n, v)| n.eq_ignore_ascii_case(name) && pred(v))
    }
}

/// The `policy` label of a tunnel refused because it claimed a source
/// address its identity does not hold.
pub const FORGED_SOURCE: &str = "forged-source-address";

/// The client address a policy may see for a tunnel that arrived on a
/// connection from `conn_ip`, authenticated as `peer`, claiming `claimed`
/// (the `forwarded` header). The connection's own address needs no belief:
/// the source ztunnel dials from inside the client pod. A different claimed
/// address is believed only when the mesh model says it belongs to a
/// workload of `peer`'s identity (`identity_at` answers that); any other
/// claim is refused (`Err` with the address claimed), never passed to
/// ipBlock rules or metrics.
pub fn source_address(
    conn_ip: IpAddr,
    claimed: Option<IpAddr>,
    peer: &Identity,
    identity_at: impl Fn(IpAddr) -> Option<Identity>,
) -> Result<IpAddr, IpAddr> {
    match claimed {
        None => Ok(conn_ip),
        Some(ip) if ip.to_canonical() == conn_ip.to_canonical() => Ok(conn_ip),
        Some(ip) if identity_at(ip).as_ref() == Some(peer) => Ok(ip),
        Some(ip) => Err(ip),
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied by the named policy (`namespace/name`), or by the absence of a
    /// matching ALLOW (`None`).
    Deny {
        policy: Option<String>,
    },
}

impl Decision {
    /// The denying policy, if one did.
    pub fn policy(self) -> Option<String> {
        match self {
            Decision::Allow => None,
            Decision::Deny { policy } => policy,
        }
    }
}

/// Decides `req` against `policies` (those that apply to its destination).
pub fn evaluate<'p>(
    policies: impl IntoIterator<Item = &'p AuthorizationPolicy>,
    req: &Request<'_>,
) -> Decision {
    decide(policies, req).decision()
}

/// A decision with the policy and rule (index into its `rules`) that made
/// it: the matching DENY rule, or the first matching ALLOW rule. `None`
/// when no policy applies (allowed) or no ALLOW matched (denied).
#[derive(Debug, Clone, Copy)]
pub struct Verdict<'p> {
    pub allowed: bool,
    pub by: Option<(&'p AuthorizationPolicy, usize)>,
}

impl Verdict<'_> {
    pub fn decision(&self) -> Decision {
        if self.allowed {
            Decision::Allow
        } else {
            Decision::Deny {
                policy: self.by.map(|(p, _)| policy_name(p)),
            }
        }
    }
}

/// The one evaluation both proxies and `weftctl policy explain` run.
pub fn decide<'p>(
    policies: impl IntoIterator<Item = &'p AuthorizationPolicy>,
    req: &Request<'_>,
) -> Verdict<'p> {
    // Rendered once: principals are compared as SPIFFE URIs.
    let principal = req.src_identity.map(Identity::to_string);
    let ctx = Ctx {
        req,
        principal: principal.as_deref(),
    };
    let mut any_allow = false;
    let mut allowed_by = None;
    for p in policies {
        match p.action {
            PolicyAction::Deny => {
                if let Some(i) = p.rules.iter().position(|r| ctx.rule_matches(r, true)) {
                    return Verdict {
                        allowed: false,
                        by: Some((p, i)),
                    };
                }
            }
            PolicyAction::Allow => {
                any_allow = true;
                if allowed_by.is_none() {
                    allowed_by = p
                        .rules
                        .iter()
                        .position(|r| ctx.rule_matches(r, false))
                        .map(|i| (p, i));
                }
            }
        }
    }
    Verdict {
        allowed: !any_allow || allowed_by.is_some(),
        by: allowed_by,
    }
}

/// `namespace/name`, as decisions, logs and metrics name a policy.
pub fn policy_name(p: &AuthorizationPolicy) -> String {
    format!("{}/{}", p.namespace, p.name)
}

struct Ctx<'r, 'a> {
    req: &'r Request<'a>,
    principal: Option<&'r str>,
}

impl Ctx<'_, '_> {
    /// `l7_unknown_matches`: what a rule's HTTP fields count as when the
    /// request has no HTTP attributes (true for DENY, false for ALLOW).
    fn rule_matches(&self, rule: &Rule, l7_unknown_matches: bool) -> bool {
        (rule.from.is_empty() || rule.from.iter().any(|s| self.source_matches(s)))
            && (rule.to.is_empty()
                || rule
                    .to
                    .iter()
                    .any(|d| self.destination_matches(d, l7_unknown_matches)))
    }

    fn source_matches(&self, s: &Source) -> bool {
        let ns = self.req.src_identity.map(|id| id.namespace.as_str());
        (s.principals.is_empty()
            || s.principals
                .iter()
                .any(|p| p == "*" || self.principal.is_some_and(|id| wildcard_match(p, id))))
            && (s.namespaces.is_empty()
                || s.namespaces
                    .iter()
                    .any(|n| n == "*" || ns.is_some_and(|ns| wildcard_match(n, ns))))
            && (s.ip_blocks.is_empty()
                || s.ip_blocks
                    .iter()
                    .any(|b| cidr_contains(b, self.req.src_ip)))
    }

    fn destination_matches(&self, d: &Destination, l7_unknown_matches: bool) -> bool {
        if !d.ports.is_empty() && !d.ports.contains(&self.req.dst_port) {
            return false;
        }
        if !d.has_l7_fields() {
            return true;
        }
        let Some(http) = &self.req.http else {
            return l7_unknown_matches;
        };
        (d.methods.is_empty() || d.methods.iter().any(|m| m == http.method))
            && (d.paths.is_empty() || d.paths.iter().any(|p| wildcard_match(p, http.path)))
            && d.headers.iter().all(|(name, accepted)| {
                http.headers.any_value(name, &mut |value| {
                    accepted.iter().any(|a| wildcard_match(a, value))
                })
            })
    }
}

/// Policy string matching: `*` matches anything (present), `*suffix` and
/// `prefix*` match by suffix and prefix, anything else exactly.
pub fn wildcard_match(pattern: &str, value: &str) -> bool {
    if pattern == "*" {
        true
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else {
        pattern == value
    }
}

/// `10.0.0.0/8`, `fd00::/8` or a bare address. A malformed block matches
/// nothing.
pub fn cidr_contains(block: &str, ip: IpAddr) -> bool {
    let (addr, len) = match block.split_once('/') {
        Some((a, l)) => match l.parse::<u8>() {
            Ok(l) => (a, Some(l)),
            Err(_) => return false,
        },
        None => (block, None),
    };
    let Ok(net) = addr.parse::<IpAddr>() else {
        return false;
    };
    match (net, ip) {
        (IpAddr::V4(n), IpAddr::V4(i)) => {
            let len = len.unwrap_or(32);
            if len > 32 {
                return false;
            }
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
            u32::from(n) & mask == u32::from(i) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(i)) => {
            let len = len.unwrap_or(128);
            if len > 128 {
                return false;
            }
            let mask = if len == 0 {
                0
            } else {
                u128::MAX << (128 - len)
            };
            u128::from(n) & mask == u128::from(i) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claimed_source_is_believed_only_for_the_peer_s_own_workloads() {
        let web = Identity::new("cluster.local", "shop", "web");
        let db = Identity::new("cluster.local", "shop", "db");
        let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
        let at = |a: IpAddr| match a.to_string().as_str() {
            "10.0.0.2" | "10.0.0.3" => Some(web.clone()),
            "10.0.0.9" => Some(db.clone()),
            _ => None,
        };
        let conn = ip("10.0.0.2");
        assert_eq!(source_address(conn, None, &web, at), Ok(conn));
        assert_eq!(source_address(conn, Some(conn), &web, at), Ok(conn));
        // Another address of the same identity is believed.
        assert_eq!(
            source_address(conn, Some(ip("10.0.0.3")), &web, at),
            Ok(ip("10.0.0.3"))
        );
        // Someone else's address, or one nobody holds, is refused.
        assert_eq!(
            source_address(conn, Some(ip("10.0.0.9")), &web, at),
            Err(ip("10.0.0.9"))
        );
        assert_eq!(
            source_address(conn, Some(ip("192.0.2.1")), &web, at),
            Err(ip("192.0.2.1"))
        );
    }
    use crate::MeshModel;

    fn policies(yaml: &str) -> Vec<AuthorizationPolicy> {
        MeshModel::from_yaml(&format!("policies:\n{yaml}"))
            .unwrap()
            .policies
    }

    fn l4<'a>(id: Option<&'a Identity>, ip: &str, port: u16) -> Request<'a> {
        Request {
            src_ip: ip.parse().unwrap(),
            src_identity: id,
            dst_port: port,
            http: None,
        }
    }

    fn l7<'a>(
        id: Option<&'a Identity>,
        method: &'a str,
        path: &'a str,
        headers: &'a HeaderPairs<'a>,
    ) -> Request<'a> {
        Request {
            http: Some(HttpAttrs {
                method,
                path,
                headers,
            }),
            ..l4(id, "10.0.0.1", 80)
        }
    }

    fn deny(name: &str) -> Decision {
        Decision::Deny {
            policy: Some(name.into()),
        }
    }

    #[test]
    fn deny_wins_and_allow_is_required_once_present() {
        let web = Identity::new("cluster.local", "shop", "web");
        let api = Identity::new("cluster.local", "shop", "api");
        assert_eq!(evaluate(&[], &l4(None, "10.0.0.1", 80)), Decision::Allow);

        let p = policies(
            "  - { name: all, namespace: shop, rules: [{}] }\n  - { name: no-web, namespace: shop, action: DENY, rules: [{ from: [{ principals: [spiffe://cluster.local/ns/shop/sa/web] }] }] }",
        );
        assert_eq!(
            evaluate(&p, &l4(Some(&web), "10.0.0.1", 80)),
            deny("shop/no-web")
        );
        assert_eq!(
            evaluate(&p, &l4(Some(&api), "10.0.0.1", 80)),
            Decision::Allow
        );

        let p = policies("  - { name: only-api, namespace: shop, rules: [{ from: [{ principals: [spiffe://cluster.local/ns/shop/sa/api] }] }] }");
        assert_eq!(
            evaluate(&p, &l4(Some(&web), "10.0.0.1", 80)),
            Decision::Deny { policy: None }
        );
        assert_eq!(
            evaluate(&p, &l4(None, "10.0.0.1", 80)),
            Decision::Deny { policy: None }
        );
    }

    #[test]
    fn sources_match_principal_wildcards_namespaces_and_ip_blocks() {
        let web = Identity::new("cluster.local", "shop", "web");
        let p = policies(
            "  - { name: a, namespace: shop, rules: [{ from: [{ principals: [spiffe://cluster.local/ns/shop/*] }] }] }",
        );
        assert_eq!(evaluate(&p, &l4(Some(&web), "1.1.1.1", 1)), Decision::Allow);
        let p = policies(
            "  - { name: a, namespace: shop, rules: [{ from: [{ principals: ['*/sa/api'] }] }] }",
        );
        assert_ne!(evaluate(&p, &l4(Some(&web), "1.1.1.1", 1)), Decision::Allow);
        let p = policies(
            "  - { name: a, namespace: shop, rules: [{ from: [{ namespaces: [shop], ip_blocks: [10.0.0.0/8] }] }] }",
        );
        assert_eq!(
            evaluate(&p, &l4(Some(&web), "10.1.1.1", 1)),
            Decision::Allow
        );
        assert_ne!(
            evaluate(&p, &l4(Some(&web), "11.1.1.1", 1)),
            Decision::Allow
        );
        assert_ne!(evaluate(&p, &l4(None, "10.1.1.1", 1)), Decision::Allow);
        // `*` needs no identity.
        let p = policies(
            "  - { name: a, namespace: shop, rules: [{ from: [{ principals: ['*'] }] }] }",
        );
        assert_eq!(evaluate(&p, &l4(None, "10.1.1.1", 1)), Decision::Allow);
    }

    #[test]
    fn http_fields_match_at_l7_and_fail_closed_at_l4() {
        let p = policies(
            "  - { name: read, namespace: shop, rules: [{ to: [{ methods: [GET], paths: [/api/*] }] }] }\n  - { name: no-admin, namespace: shop, action: DENY, rules: [{ to: [{ paths: ['*/admin'] }] }] }\n  - { name: no-beta, namespace: shop, action: DENY, rules: [{ to: [{ headers: { X-Beta: ['on', 'yes*'] } }] }] }",
        );
        assert_eq!(
            evaluate(&p, &l7(None, "GET", "/api/items", &HeaderPairs(&[]))),
            Decision::Allow
        );
        assert_eq!(
            evaluate(&p, &l7(None, "POST", "/api/items", &HeaderPairs(&[]))),
            Decision::Deny { policy: None }
        );
        assert_eq!(
            evaluate(&p, &l7(None, "GET", "/other", &HeaderPairs(&[]))),
            Decision::Deny { policy: None }
        );
        assert_eq!(
            evaluate(&p, &l7(None, "GET", "/api/admin", &HeaderPairs(&[]))),
            deny("shop/no-admin")
        );
        assert_eq!(
            evaluate(
                &p,
                &l7(
                    None,
                    "GET",
                    "/api/x",
                    &HeaderPairs(&[("x-beta", "yes please")])
                )
            ),
            deny("shop/no-beta")
        );
        assert_eq!(
            evaluate(
                &p,
                &l7(None, "GET", "/api/x", &HeaderPairs(&[("x-beta", "off")]))
            ),
            Decision::Allow
        );
        // At L4 the DENY rules match on their (empty) L4 fields: everything.
        assert_eq!(
            evaluate(&p, &l4(None, "10.0.0.1", 80)),
            deny("shop/no-admin")
        );
        // And an ALLOW naming HTTP fields matches nothing.
        let p =
            policies("  - { name: read, namespace: shop, rules: [{ to: [{ methods: [GET] }] }] }");
        assert_eq!(
            evaluate(&p, &l4(None, "10.0.0.1", 80)),
            Decision::Deny { policy: None }
        );
    }

    #[test]
    fn ports_and_cidrs() {
        let p = policies("  - { name: db, namespace: shop, rules: [{ to: [{ ports: [5432] }] }] }");
        assert_eq!(evaluate(&p, &l4(None, "10.0.0.1", 5432)), Decision::Allow);
        assert_ne!(evaluate(&p, &l4(None, "10.0.0.1", 80)), Decision::Allow);

        assert!(cidr_contains("10.0.0.0/8", "10.2.3.4".parse().unwrap()));
        assert!(!cidr_contains("10.0.0.0/8", "11.0.0.1".parse().unwrap()));
        assert!(cidr_contains("0.0.0.0/0", "11.0.0.1".parse().unwrap()));
        assert!(cidr_contains("10.0.0.5", "10.0.0.5".parse().unwrap()));
        assert!(cidr_contains("fd00::/8", "fd12::1".parse().unwrap()));
        assert!(!cidr_contains("fd00::/8", "10.0.0.1".parse().unwrap()));
        assert!(!cidr_contains("garbage/8", "10.0.0.1".parse().unwrap()));
        assert!(!cidr_contains("10.0.0.0/40", "10.0.0.1".parse().unwrap()));
    }

    #[test]
    fn wildcards() {
        assert!(wildcard_match("*", ""));
        assert!(wildcard_match("/api/*", "/api/x"));
        assert!(!wildcard_match("/api/*", "/apix"));
        assert!(wildcard_match("*.json", "/a.json"));
        assert!(wildcard_match("/exact", "/exact"));
        assert!(!wildcard_match("/exact", "/exact/"));
    }
}
