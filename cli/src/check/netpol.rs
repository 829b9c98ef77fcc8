//! Which NetworkPolicies block HBONE. Once a namespace is enrolled, its
//! pods' traffic arrives on 15008/TCP (the ztunnel's tunnel port, inside the
//! destination pod) instead of the app's port, and a waypoint's traffic to
//! the pods behind it does too; egress leaves the source pod toward
//! `<pod IP>:15008`. A policy written for the app's ports, or a default
//! deny, then drops mesh traffic. This finds, for every enrolled or
//! waypoint pod, the policies that admit a mesh peer on some port but not
//! on 15008, and default-deny policies that admit nothing, in both
//! directions. Pure: it reads the objects as the API server returns them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde_json::{Map, Value};
use weft_api::policy::cidr_contains;
use weft_api::ports::HBONE;

use crate::kube_api::{name, namespace};

/// One policy that blocks HBONE, with what it blocks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Finding {
    /// `namespace/name`.
    pub policy: String,
    pub ingress: bool,
    pub detail: String,
    pub hint: String,
}

struct MeshPod<'a> {
    ns: &'a str,
    name: &'a str,
    labels: &'a Map<String, Value>,
    ns_labels: &'a Map<String, Value>,
    ip: Option<IpAddr>,
    waypoint: bool,
}

impl MeshPod<'_> {
    fn key(&self) -> String {
        format!("{}/{}", self.ns, self.name)
    }
}

static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();

fn empty() -> &'static Map<String, Value> {
    EMPTY.get_or_init(Map::new)
}

fn labels(v: &Value) -> &Map<String, Value> {
    v["metadata"]["labels"]
        .as_object()
        .unwrap_or_else(|| empty())
}

/// Kubernetes label selector semantics (`matchLabels`, `matchExpressions`);
/// an empty selector selects everything.
pub fn selector_matches(sel: &Value, labels: &Map<String, Value>) -> bool {
    let by_label = sel["matchLabels"].as_object().is_none_or(|m| {
        m.iter()
            .all(|(k, v)| labels.get(k).and_then(Value::as_str) == v.as_str())
    });
    let by_expr = sel["matchExpressions"].as_array().is_none_or(|exprs| {
        exprs.iter().all(|e| {
            let key = e["key"].as_str().unwrap_or("");
            let values: Vec<&str> = e["values"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let have = labels.get(key).and_then(Value::as_str);
            match e["operator"].as_str().unwrap_or("") {
                "In" => have.is_some_and(|h| values.contains(&h)),
                "NotIn" => have.is_none_or(|h| !values.contains(&h)),
                "Exists" => have.is_some(),
                "DoesNotExist" => have.is_none(),
                _ => false,
            }
        })
    });
    by_label && by_expr
}

fn policy_types(p: &Value) -> (bool, bool) {
    match p["spec"]["policyTypes"].as_array() {
        Some(t) => (
            t.iter().any(|v| v == "Ingress"),
            t.iter().any(|v| v == "Egress"),
        ),
        // Without policyTypes: Ingress always, Egress when egress rules exist.
        None => (true, p["spec"]["egress"].is_array()),
    }
}

/// Whether a peer list (`from` or `to`) admits `pod`, for a policy in
/// namespace `policy_ns`.
fn peers_admit(peers: &Value, policy_ns: &str, pod: &MeshPod<'_>) -> bool {
    let Some(list) = peers.as_array() else {
        return true;
    };
    if list.is_empty() {
        return true;
    }
    list.iter().any(|peer| {
        if let Some(block) = peer.get("ipBlock") {
            let Some(ip) = pod.ip else { return false };
            let inside = block["cidr"].as_str().is_some_and(|c| cidr_contains(c, ip));
            let excepted = block["except"].as_array().is_some_and(|e| {
                e.iter()
                    .filter_map(Value::as_str)
                    .any(|c| cidr_contains(c, ip))
            });
            return inside && !excepted;
        }
        let ns_ok = match peer.get("namespaceSelector") {
            Some(sel) => selector_matches(sel, pod.ns_labels),
            None => pod.ns == policy_ns,
        };
        let pod_ok = peer
            .get("podSelector")
            .is_none_or(|sel| selector_matches(sel, pod.labels));
        ns_ok && pod_ok
    })
}

/// Whether a rule's `ports` admit 15008/TCP.
fn ports_admit_hbone(ports: &Value) -> bool {
    let Some(list) = ports.as_array() else {
        return true;
    };
    list.is_empty()
        || list.iter().any(|p| {
            let tcp = p["protocol"].as_str().is_none_or(|pr| pr == "TCP");
            let port = match &p["port"] {
                Value::Null => true,
                Value::Number(n) => {
                    let start = n.as_u64().unwrap_or(0);
                    let end = p["endPort"].as_u64().unwrap_or(start);
                    (start..=end).contains(&u64::from(HBONE))
                }
                // A named port is a container port of the pod; nothing
                // names the ztunnel's listener.
                _ => false,
            };
            tcp && port
        })
}

fn describe_ports(ports: &Value) -> String {
    match ports.as_array() {
        Some(list) if !list.is_empty() => list
            .iter()
            .map(|p| {
                let proto = p["protocol"].as_str().unwrap_or("TCP");
                match (&p["port"], p["endPort"].as_u64()) {
                    (Value::Null, _) => format!("any/{proto}"),
                    (v, Some(end)) => format!("{v}-{end}/{proto}"),
                    (Value::String(s), None) => format!("{s}/{proto}"),
                    (v, None) => format!("{v}/{proto}"),
                }
            })
            .collect::<Vec<_>>()
            .join(", "),
        _ => "every port".into(),
    }
}

/// The pods HBONE flows between: pods of enrolled namespaces that do not
/// opt out, and waypoint pods.
fn mesh_pods<'a>(namespaces: &'a [Value], pods: &'a [Value]) -> Vec<MeshPod<'a>> {
    let ns_labels: BTreeMap<&str, &Map<String, Value>> =
        namespaces.iter().map(|n| (name(n), labels(n))).collect();
    pods.iter()
        .filter_map(|p| {
            let ns = namespace(p);
            let nl = ns_labels.get(ns).copied().unwrap_or_else(|| empty());
            let l = labels(p);
            let waypoint = l.contains_key(weft_api::l7::GATEWAY_NAME_LABEL);
            let enrolled = nl
                .get(weft_api::DATAPLANE_MODE_LABEL)
                .and_then(Value::as_str)
                == Some(weft_api::DATAPLANE_MODE_AMBIENT)
                && l.get(weft_api::DATAPLANE_MODE_LABEL)
                    .and_then(Value::as_str)
                    != Some(weft_api::DATAPLANE_MODE_NONE);
            (enrolled || waypoint).then(|| MeshPod {
                ns,
                name: name(p),
                labels: l,
                ns_labels: nl,
                ip: p["status"]["podIP"].as_str().and_then(|s| s.parse().ok()),
                waypoint,
            })
        })
        .collect()
}

/// Every policy that blocks HBONE between mesh pods, one finding per policy
/// and direction.
pub fn analyze(policies: &[Value], namespaces: &[Value], pods: &[Value]) -> Vec<Finding> {
    let mesh = mesh_pods(namespaces, pods);
    // (policy, ingress) -> examples of what it blocks.
    let mut blocked: BTreeMap<(String, bool), Vec<String>> = BTreeMap::new();
    for ingress in [true, false] {
        let (rules_key, peers_key) = if ingress {
            ("ingress", "from")
        } else {
            ("egress", "to")
        };
        for local in &mesh {
            let selecting: Vec<&Value> = policies
                .iter()
                .filter(|p| namespace(p) == local.ns)
                .filter(|p| {
                    let (i, e) = policy_types(p);
                    if ingress {
                        i
                    } else {
                        e
                    }
                })
                .filter(|p| selector_matches(&p["spec"]["podSelector"], local.labels))
                .collect();
            if selecting.is_empty() {
                continue;
            }
            for peer in mesh.iter().filter(|m| m.key() != local.key()) {
                let mut hbone = false;
                let mut app_only: Vec<(String, String)> = Vec::new();
                for p in &selecting {
                    for rule in p["spec"][rules_key].as_array().into_iter().flatten() {
                        if !peers_admit(&rule[peers_key], local.ns, peer) {
                            continue;
                        }
                        if ports_admit_hbone(&rule["ports"]) {
                            hbone = true;
                        } else {
                            app_only.push((
                                format!("{}/{}", namespace(p), name(p)),
                                describe_ports(&rule["ports"]),
                            ));
                        }
                    }
                }
                if hbone {
                    continue;
                }
                let (from, to) = if ingress {
                    (peer.key(), local.key())
                } else {
                    (local.key(), peer.key())
                };
                if app_only.is_empty() {
                    // Nothing admits this peer at all. A default deny is
                    // meant to, except for the waypoint in front of the pod,
                    // and it is reported once per policy.
                    let waypoint_of_local = ingress && peer.waypoint && peer.ns == local.ns;
                    for p in &selecting {
                        let rules = p["spec"][rules_key].as_array().map_or(0, Vec::len);
                        if rules == 0 || waypoint_of_local {
                            let what = if waypoint_of_local {
                                format!("waypoint {from} -> {to}")
                            } else {
                                format!("{from} -> {to}")
                            };
                            blocked
                                .entry((format!("{}/{}", namespace(p), name(p)), ingress))
                                .or_default()
                                .push(what);
                        }
                    }
                } else {
                    for (policy, ports) in app_only {
                        blocked
                            .entry((policy, ingress))
                            .or_default()
                            .push(format!("{from} -> {to} (admitted on {ports} only)"));
                    }
                }
            }
        }
    }
    blocked
        .into_iter()
        .map(|((policy, ingress), mut what)| {
            what.sort();
            what.dedup();
            let n = what.len();
            let mut shown: Vec<String> = what.into_iter().take(3).collect();
            if n > 3 {
                shown.push(format!("and {} more", n - 3));
            }
            let dir = if ingress { "ingress" } else { "egress" };
            let (peer_word, fix_peer) = if ingress { ("from", "from") } else { ("to", "to") };
            Finding {
                detail: format!(
                    "NetworkPolicy {policy} blocks HBONE ({HBONE}/TCP) {dir} between mesh pods: {}",
                    shown.join("; ")
                ),
                hint: format!(
                    "mesh traffic arrives on {HBONE}/TCP, not the app's port: add `{{port: {HBONE}, protocol: TCP}}` to the ports of an {dir} rule of {policy} that admits the peers ({peer_word} the enrolled namespaces and the waypoint pods), or a policy allowing {HBONE}/TCP {fix_peer} them"
                ),
                policy,
                ingress,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ns(name: &str, ambient: bool) -> Value {
        let labels = if ambient {
            json!({"weft.dev/dataplane-mode": "ambient", "kubernetes.io/metadata.name": name})
        } else {
            json!({"kubernetes.io/metadata.name": name})
        };
        json!({"metadata": {"name": name, "labels": labels}})
    }

    fn pod(ns: &str, name: &str, ip: &str, labels: Value) -> Value {
        json!({"metadata": {"name": name, "namespace": ns, "labels": labels}, "status": {"podIP": ip}})
    }

    fn world() -> (Vec<Value>, Vec<Value>) {
        (
            vec![ns("shop", true), ns("other", false)],
            vec![
                pod("shop", "api", "10.0.1.2", json!({"app": "api"})),
                pod("shop", "db", "10.0.1.3", json!({"app": "db"})),
                pod(
                    "shop",
                    "wp",
                    "10.0.1.4",
                    json!({"gateway.networking.k8s.io/gateway-name": "wp"}),
                ),
                pod("other", "job", "10.0.2.2", json!({"app": "job"})),
            ],
        )
    }

    #[test]
    fn app_port_only_policy_is_named_with_the_fix() {
        let (n, p) = world();
        let pol = json!({"metadata": {"name": "db-from-api", "namespace": "shop"}, "spec": {
            "podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "api"}}}], "ports": [{"port": 5432}]}]}});
        let f = analyze(&[pol], &n, &p);
        assert_eq!(f.len(), 1, "{f:?}");
        assert_eq!(f[0].policy, "shop/db-from-api");
        assert!(
            f[0].detail
                .contains("shop/api -> shop/db (admitted on 5432/TCP only)"),
            "{f:?}"
        );
        // The waypoint in front of db is blocked too.
        assert!(f[0].detail.contains("waypoint shop/wp -> shop/db"), "{f:?}");
        assert!(f[0].hint.contains("{port: 15008, protocol: TCP}"), "{f:?}");
    }

    #[test]
    fn policies_admitting_hbone_pass() {
        let (n, p) = world();
        let pol = json!({"metadata": {"name": "db", "namespace": "shop"}, "spec": {
            "podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {}}], "ports": [{"port": 5432}, {"port": 15000, "endPort": 15010}]}]}});
        assert_eq!(analyze(&[pol], &n, &p), vec![]);
        let allow_all = json!({"metadata": {"name": "all", "namespace": "shop"}, "spec": {
            "podSelector": {}, "ingress": [{}]}});
        assert_eq!(analyze(&[allow_all], &n, &p), vec![]);
        // A policy in a namespace that is not enrolled changes nothing.
        let other = json!({"metadata": {"name": "deny", "namespace": "other"}, "spec": {
            "podSelector": {}, "policyTypes": ["Ingress"]}});
        assert_eq!(analyze(&[other], &n, &p), vec![]);
    }

    #[test]
    fn default_deny_ingress_and_egress() {
        let (n, p) = world();
        let deny = json!({"metadata": {"name": "default-deny", "namespace": "shop"}, "spec": {
            "podSelector": {}, "policyTypes": ["Ingress", "Egress"]}});
        let f = analyze(&[deny], &n, &p);
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f.iter().any(|x| x.ingress) && f.iter().any(|x| !x.ingress));
        assert!(f.iter().all(|x| x.policy == "shop/default-deny"));
    }

    #[test]
    fn selectors_and_ip_blocks() {
        let l: Map<String, Value> =
            serde_json::from_value(json!({"app": "db", "tier": "data"})).unwrap();
        assert!(selector_matches(&json!({}), &l));
        assert!(selector_matches(
            &json!({"matchExpressions": [{"key": "tier", "operator": "In", "values": ["data"]}]}),
            &l
        ));
        assert!(!selector_matches(
            &json!({"matchExpressions": [{"key": "tier", "operator": "NotIn", "values": ["data"]}]}),
            &l
        ));
        assert!(selector_matches(
            &json!({"matchExpressions": [{"key": "x", "operator": "DoesNotExist"}]}),
            &l
        ));
        let (n, p) = world();
        // Egress to the pod CIDR on the app port only, except one address.
        let pol = json!({"metadata": {"name": "api-out", "namespace": "shop"}, "spec": {
            "podSelector": {"matchLabels": {"app": "api"}}, "policyTypes": ["Egress"],
            "egress": [{"to": [{"ipBlock": {"cidr": "10.0.1.0/24", "except": ["10.0.1.4/32"]}}], "ports": [{"port": 5432}]}]}});
        let f = analyze(&[pol], &n, &p);
        assert_eq!(f.len(), 1, "{f:?}");
        assert!(
            f[0].detail
                .contains("shop/api -> shop/db (admitted on 5432/TCP only)"),
            "{f:?}"
        );
        assert!(!f[0].ingress);
    }
}
