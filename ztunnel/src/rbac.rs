//! L4 authorization at the destination: `AuthorizationPolicy` evaluated for
//! one connection. A matching DENY wins; with no ALLOW policy the connection
//! is allowed; with ALLOW policies one must match. A rule that names HTTP
//! fields cannot be enforced at L4: in an ALLOW policy it matches nothing, in
//! a DENY policy it matches everything its L4 fields match (fail closed both
//! ways).

use std::net::IpAddr;

use weft_api::model::{AuthorizationPolicy, PolicyAction, Rule, Workload};
use weft_api::Identity;

use crate::state::Snapshot;

/// What the destination knows about a connection.
#[derive(Debug, Clone)]
pub struct Connection<'a> {
    pub src_ip: IpAddr,
    /// Verified mTLS peer; `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    pub dst_port: u16,
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

pub fn evaluate(snap: &Snapshot, dst: &Workload, conn: &Connection<'_>) -> Decision {
    let mut any_allow = false;
    let mut allowed = false;
    for p in snap.policies_for(dst) {
        match p.action {
            PolicyAction::Deny => {
                if p.rules.iter().any(|r| rule_matches(r, conn, true)) {
                    return Decision::Deny {
                        policy: Some(policy_name(p)),
                    };
                }
            }
            PolicyAction::Allow => {
                any_allow = true;
                if !allowed && p.rules.iter().any(|r| rule_matches(r, conn, false)) {
                    allowed = true;
                }
            }
        }
    }
    if any_allow && !allowed {
        return Decision::Deny { policy: None };
    }
    Decision::Allow
}

fn policy_name(p: &AuthorizationPolicy) -> String {
    format!("{}/{}", p.namespace, p.name)
}

/// `l7_matches`: how a rule's HTTP-only fields count at L4 (true for DENY,
/// false for ALLOW: fail closed).
fn rule_matches(rule: &Rule, conn: &Connection<'_>, l7_matches: bool) -> bool {
    let from_ok = rule.from.is_empty()
        || rule.from.iter().any(|s| {
            (s.principals.is_empty()
                || s.principals
                    .iter()
                    .any(|p| p == "*" || conn.src_identity.is_some_and(|id| id.to_string() == *p)))
                && (s.namespaces.is_empty()
                    || s.namespaces.iter().any(|n| {
                        n == "*" || conn.src_identity.is_some_and(|id| id.namespace == *n)
                    }))
                && (s.ip_blocks.is_empty()
                    || s.ip_blocks.iter().any(|b| cidr_contains(b, conn.src_ip)))
        });
    let to_ok = rule.to.is_empty()
        || rule.to.iter().any(|d| {
            (d.ports.is_empty() || d.ports.contains(&conn.dst_port))
                && (!d.has_l7_fields() || l7_matches)
        });
    from_ok && to_ok
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
    use weft_api::MeshModel;

    fn snap(policies: &str) -> Snapshot {
        let doc = format!(
            r#"
namespaces: [{{ name: shop, labels: {{ weft.dev/dataplane-mode: ambient }} }}]
workloads:
  - {{ name: db, namespace: shop, node: n1, ips: [10.0.0.9], labels: {{ app: db }} }}
policies:
{policies}
"#
        );
        Snapshot::new(MeshModel::from_yaml(&doc).unwrap(), 1)
    }

    fn conn<'a>(id: Option<&'a Identity>, ip: &str, port: u16) -> Connection<'a> {
        Connection {
            src_ip: ip.parse().unwrap(),
            src_identity: id,
            dst_port: port,
        }
    }

    #[test]
    fn no_policy_allows_and_deny_wins() {
        let s = snap("  []");
        let w = &s.model.workloads[0];
        assert_eq!(
            evaluate(&s, w, &conn(None, "10.0.0.1", 5432)),
            Decision::Allow
        );

        let s = snap(
            "  - { name: allow-all, namespace: shop, action: ALLOW, rules: [{}] }\n  - { name: no-web, namespace: shop, action: DENY, rules: [{ from: [{ principals: [spiffe://cluster.local/ns/shop/sa/web] }] }] }",
        );
        let w = &s.model.workloads[0];
        let web = Identity::new("cluster.local", "shop", "web");
        let api = Identity::new("cluster.local", "shop", "api");
        assert_eq!(
            evaluate(&s, w, &conn(Some(&web), "10.0.0.1", 5432)),
            Decision::Deny {
                policy: Some("shop/no-web".into())
            }
        );
        assert_eq!(
            evaluate(&s, w, &conn(Some(&api), "10.0.0.1", 5432)),
            Decision::Allow
        );
    }

    #[test]
    fn allow_requires_a_match_and_l7_fields_fail_closed() {
        let s = snap(
            "  - { name: ports, namespace: shop, selector: { app: db }, action: ALLOW, rules: [{ to: [{ ports: [5432] }], from: [{ ip_blocks: [10.0.0.0/24] }] }] }\n  - { name: http-only, namespace: shop, action: ALLOW, rules: [{ to: [{ methods: [GET] }] }] }",
        );
        let w = &s.model.workloads[0];
        assert_eq!(
            evaluate(&s, w, &conn(None, "10.0.0.1", 5432)),
            Decision::Allow
        );
        assert_eq!(
            evaluate(&s, w, &conn(None, "10.0.1.1", 5432)),
            Decision::Deny { policy: None }
        );
        assert_eq!(
            evaluate(&s, w, &conn(None, "10.0.0.1", 80)),
            Decision::Deny { policy: None }
        );
    }

    #[test]
    fn cidrs() {
        assert!(cidr_contains("10.0.0.0/8", "10.2.3.4".parse().unwrap()));
        assert!(!cidr_contains("10.0.0.0/8", "11.0.0.1".parse().unwrap()));
        assert!(cidr_contains("10.0.0.5", "10.0.0.5".parse().unwrap()));
        assert!(cidr_contains("fd00::/8", "fd12::1".parse().unwrap()));
        assert!(!cidr_contains("garbage/8", "10.0.0.1".parse().unwrap()));
        assert!(!cidr_contains("10.0.0.0/40", "10.0.0.1".parse().unwrap()));
    }
}
