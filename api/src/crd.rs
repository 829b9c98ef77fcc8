//! Custom resources in `weft.dev/v1alpha1` (and the slice of Gateway API the
//! controller reads), as kube-rs types. Their CRD YAML in the chart is
//! generated from these (`crds_yaml`), never written by hand.
//!
//! JSON field names are camelCase, as in every Kubernetes API. The
//! controller converts these into the mesh model (`crate::model`); the data
//! plane never sees them.

use std::collections::BTreeMap;

use kube::{CustomResource, CustomResourceExt};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of Weft's own resources.
pub const GROUP: &str = "weft.dev";
/// Version of Weft's own resources.
pub const VERSION: &str = "v1alpha1";

/// Picks workloads of the resource's namespace by pod label. Absent, or
/// with no labels, it selects every workload of the namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// `weft.dev/v1alpha1` AuthorizationPolicy: L4 (and, through a waypoint,
/// L7) access control for the workloads of a namespace. A DENY that matches
/// wins; with no ALLOW policy for a workload, traffic is allowed; with ALLOW
/// policies, only what one matches is allowed.
// Each printcolumn repeats `type_`, which clippy mistakes for a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    status = "PolicyConditions",
    shortname = "wap",
    category = "weft",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(name = "Action", type_ = "string", json_path = ".spec.action"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    #[serde(default)]
    pub action: PolicyAction,
    /// A request matches the policy when one rule matches. An ALLOW policy
    /// with no rules allows nothing; a DENY policy with no rules denies
    /// nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<Rule>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum PolicyAction {
    #[default]
    Allow,
    Deny,
}

/// Matches when one `from` entry and one `to` entry match (an empty list
/// matches everything).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<RuleFrom>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<RuleTo>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleFrom {
    pub source: Source,
}

/// Who connects. Fields are ANDed; the values inside one field are ORed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// SPIFFE IDs (`spiffe://<trust-domain>/ns/<ns>/sa/<sa>`), or `*` for
    /// any authenticated peer.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub principals: Vec<String>,
    /// Namespaces of authenticated peers, or `*`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespaces: Vec<String>,
    /// Source addresses: CIDRs such as `10.0.0.0/8` or single addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RuleTo {
    pub operation: Operation,
}

/// What is reached. `methods` and `paths` are HTTP fields: only a waypoint
/// can enforce them; at L4 a rule naming them fails closed (an ALLOW rule
/// matches nothing, a DENY rule matches whatever its L4 fields match).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Destination ports on the workload (after Service port translation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
}

/// `weft.dev/v1alpha1` PeerAuthentication: whether the selected workloads
/// (or the whole namespace) accept plaintext. A workload selector wins over
/// a namespace-wide one.
// Each printcolumn repeats `type_`, which clippy mistakes for a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    namespaced,
    status = "PolicyConditions",
    shortname = "wpa",
    category = "weft",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mtls.mode"),
    printcolumn(
        name = "Accepted",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Accepted\")].status"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Absent (or without a mode): inherit the namespace-wide setting.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<PeerMtls>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PeerMtls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MtlsMode>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Only mTLS (HBONE) is accepted.
    Strict,
    /// mTLS and plaintext are both accepted.
    Permissive,
}

/// Status of `AuthorizationPolicy` and `PeerAuthentication`: standard
/// conditions (the controller writes `Accepted`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyConditions {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// A `metav1.Condition`, spelled out so the CRD schema is derived with it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default)]
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// RFC 3339 time of the last change of `status`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
}

/// The part of Gateway API's `gateway.networking.k8s.io/v1` `Gateway` that
/// the controller reads (waypoints are Gateways of class `weft-waypoint`).
/// Watched only: its CRD belongs to Gateway API and is never generated here.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "Gateway",
    namespaced,
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    pub gateway_class_name: String,
    #[serde(default)]
    pub listeners: Vec<GatewayListener>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayListener {
    pub name: String,
    pub port: i32,
    pub protocol: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
}

/// `gatewayClassName` of waypoint Gateways.
pub const WAYPOINT_GATEWAY_CLASS: &str = "weft-waypoint";

/// Weft's CustomResourceDefinitions as one multi-document YAML stream, for
/// the chart (`cargo xtask chart`).
pub fn crds_yaml() -> String {
    let crds = [AuthorizationPolicy::crd(), PeerAuthentication::crd()];
    let mut out = String::new();
    for crd in crds {
        out.push_str("---\n");
        // A CRD built by kube-derive always serializes.
        out.push_str(&serde_yaml::to_string(&crd).unwrap_or_default());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crds_are_generated_with_status_and_camel_case() {
        let yaml = crds_yaml();
        let docs: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&yaml)
            .map(|d| serde_yaml::Value::deserialize(d).unwrap())
            .collect();
        assert_eq!(docs.len(), 2);
        assert_eq!(
            docs[0]["metadata"]["name"].as_str(),
            Some("authorizationpolicies.weft.dev")
        );
        assert_eq!(
            docs[1]["metadata"]["name"].as_str(),
            Some("peerauthentications.weft.dev")
        );
        for d in &docs {
            assert_eq!(d["spec"]["scope"].as_str(), Some("Namespaced"));
            let v = &d["spec"]["versions"][0];
            assert_eq!(v["name"].as_str(), Some("v1alpha1"));
            assert!(v["subresources"]["status"].is_mapping());
        }
        assert!(yaml.contains("ipBlocks"), "camelCase fields");
        assert!(yaml.contains("matchLabels"));
        assert!(!yaml.contains("ip_blocks"));
    }

    #[test]
    fn policy_round_trips_from_yaml() {
        let p: AuthorizationPolicy = serde_yaml::from_str(
            r#"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: db, namespace: shop }
spec:
  selector: { matchLabels: { app: db } }
  action: DENY
  rules:
    - from: [{ source: { ipBlocks: [10.0.0.0/8], namespaces: [web] } }]
      to: [{ operation: { ports: [5432], methods: [GET] } }]
"#,
        )
        .unwrap();
        assert_eq!(p.spec.action, PolicyAction::Deny);
        assert_eq!(p.spec.rules[0].from[0].source.ip_blocks, ["10.0.0.0/8"]);
        assert_eq!(p.spec.rules[0].to[0].operation.ports, [5432]);
        assert!(serde_yaml::from_str::<AuthorizationPolicy>(
            "apiVersion: weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec: {action: MAYBE}\n"
        )
        .is_err());
    }
}
