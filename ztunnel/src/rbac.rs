//! L4 authorization at the destination: `AuthorizationPolicy` evaluated for
//! one connection. A matching DENY wins; with no ALLOW policy the connection
//! is allowed; with ALLOW policies one must match. A rule that names HTTP
//! fields cannot be enforced at L4: in an ALLOW policy it matches nothing, in
//! a DENY policy it matches everything its L4 fields match (fail closed both
//! ways). The matching itself is `weft_api::policy`, shared with the
//! waypoint; this picks the policies that apply to a local workload.

use std::net::IpAddr;

use weft_api::model::Workload;
use weft_api::policy::{self, Request};
use weft_api::Identity;

pub use weft_api::policy::{cidr_contains, Decision};

use crate::state::Snapshot;

/// What the destination knows about a connection.
#[derive(Debug, Clone)]
pub struct Connection<'a> {
    pub src_ip: IpAddr,
    /// Verified mTLS peer; `None` for plaintext.
    pub src_identity: Option<&'a Identity>,
    pub dst_port: u16,
}

/// Policies with `targets` belong to the waypoint and are skipped here.
pub fn evaluate(snap: &Snapshot, dst: &Workload, conn: &Connection<'_>) -> Decision {
    let req = Request {
        src_ip: conn.src_ip,
        src_identity: conn.src_identity,
        dst_port: conn.dst_port,
        http: None,
    };
    policy::evaluate(snap.policies_for(dst), &req)
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
        let w = s.workload("shop", "db").unwrap().workload;
        assert_eq!(
            evaluate(&s, w, &conn(None, "10.0.0.1", 5432)),
            Decision::Allow
        );

        let s = snap(
            "  - { name: allow-all, namespace: shop, action: ALLOW, rules: [{}] }\n  - { name: no-web, namespace: shop, action: DENY, rules: [{ from: [{ principals: [spiffe://cluster.local/ns/shop/sa/web] }] }] }",
        );
        let w = s.workload("shop", "db").unwrap().workload;
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
        let w = s.workload("shop", "db").unwrap().workload;
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
    fn waypoint_targeted_policies_are_not_enforced_here() {
        let s = snap(
            "  - { name: at-waypoint, namespace: shop, action: DENY, rules: [{}], targets: [{ kind: Service, name: db }] }",
        );
        let w = s.workload("shop", "db").unwrap().workload;
        assert_eq!(
            evaluate(&s, w, &conn(None, "10.0.0.1", 5432)),
            Decision::Allow
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
