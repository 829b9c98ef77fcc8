//! The mesh model: what the data plane knows about the cluster. The
//! controller builds it from Kubernetes objects (or a folder of manifests);
//! ztunnels and waypoints only ever read this, never kube types.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::identity::{Identity, DEFAULT_TRUST_DOMAIN};
pub use crate::l7::*;
use crate::{DATAPLANE_MODE_AMBIENT, DATAPLANE_MODE_LABEL, DATAPLANE_MODE_NONE};

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MeshModel {
    pub trust_domain: String,
    pub namespaces: Vec<Namespace>,
    pub workloads: Vec<Workload>,
    pub services: Vec<Service>,
    pub policies: Vec<AuthorizationPolicy>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub waypoints: Vec<Waypoint>,
    pub http_routes: Vec<HttpRoute>,
    pub grpc_routes: Vec<GrpcRoute>,
    pub traffic_policies: Vec<TrafficPolicy>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub labels: Labels,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    /// Pod UID (unique per pod incarnation).
    #[serde(default)]
    pub uid: String,
    pub name: String,
    pub namespace: String,
    #[serde(default = "default_service_account")]
    pub service_account: String,
    /// Name of the node the pod is scheduled on.
    pub node: String,
    pub ips: Vec<IpAddr>,
    #[serde(default)]
    pub labels: Labels,
    /// The container ports the pod's liveness, readiness and startup probes
    /// use (named ports resolved). Only these are reachable from the node's
    /// own addresses (the kubelet) without going through the ztunnel; every
    /// other connection from the node meets policy like any client's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub probe_ports: Vec<u16>,
}

/// At most this many probe ports per pod (the kernel's steering entry has
/// room for this many; a pod declaring more is refused by validation).
pub const MAX_PROBE_PORTS: usize = 8;

fn default_service_account() -> String {
    "default".to_owned()
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    /// ClusterIPs.
    pub vips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// Pods whose labels include all of these are the endpoints.
    #[serde(default)]
    pub selector: Labels,
    /// Name of the waypoint (in `namespace`) this Service's traffic goes
    /// through, from the `weft.dev/use-waypoint` label of the Service or
    /// its Namespace. Its endpoints then accept it only from the waypoint.
    #[serde(default)]
    pub waypoint: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    pub port: u16,
    /// Port on the pod; defaults to `port`.
    #[serde(default)]
    pub target_port: Option<u16>,
}

impl ServicePort {
    pub fn target(&self) -> u16 {
        self.target_port.unwrap_or(self.port)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum PolicyAction {
    #[default]
    Allow,
    Deny,
}

/// `weft.dev/v1alpha1` AuthorizationPolicy, in model form.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    /// Selects workloads of `namespace` by label; `None` selects them all.
    #[serde(default)]
    pub selector: Option<Labels>,
    #[serde(default)]
    pub action: PolicyAction,
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Services or waypoint Gateways (in `namespace`) the policy applies to
    /// at the waypoint. A policy with targets is enforced by the waypoint
    /// only; one without is enforced by the destination ztunnel.
    #[serde(default)]
    pub targets: Vec<PolicyTarget>,
}

/// What a waypoint-enforced policy applies to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyTarget {
    #[serde(default)]
    pub kind: ParentKind,
    pub name: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// mTLS and plaintext both accepted.
    #[default]
    Permissive,
    /// Only mTLS (HBONE) accepted; plaintext is refused.
    Strict,
}

/// `weft.dev/v1alpha1` PeerAuthentication, in model form: the mTLS mode of
/// a namespace's workloads (all, or those its selector picks; a workload
/// selector wins over a namespace-wide one).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub selector: Option<Labels>,
    #[serde(default)]
    pub mode: MtlsMode,
}

/// A rule matches when one of its `from` entries and one of its `to`
/// entries match (an empty list matches everything).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Destination>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Source {
    /// SPIFFE IDs, or `*`.
    pub principals: Vec<String>,
    pub namespaces: Vec<String>,
    /// CIDRs such as `10.0.0.0/8` or single addresses.
    pub ip_blocks: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Destination {
    pub ports: Vec<u16>,
    /// HTTP fields: only a waypoint can enforce them; at L4 a rule naming
    /// them fails closed.
    pub methods: Vec<String>,
    /// Exact paths, or with a leading or trailing `*` as a suffix or prefix
    /// match.
    pub paths: Vec<String>,
    /// Header name (case-insensitive) to accepted values (same `*` rules);
    /// every named header must match.
    pub headers: BTreeMap<String, Vec<String>>,
}

impl Destination {
    pub fn has_l7_fields(&self) -> bool {
        !self.methods.is_empty() || !self.paths.is_empty() || !self.headers.is_empty()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("mesh model is not valid YAML/JSON: {0}")]
    Parse(#[from] serde_yaml::Error),
    #[error("mesh model is invalid: {0}")]
    Invalid(String),
}

/// What makes one workload unusable on its own.
pub fn validate_workload(w: &Workload) -> Result<(), String> {
    if w.name.is_empty() || w.namespace.is_empty() {
        return Err("a workload needs a name and a namespace".into());
    }
    if w.probe_ports.len() > MAX_PROBE_PORTS || w.probe_ports.contains(&0) {
        return Err(format!(
            "workload {}/{}: at most {MAX_PROBE_PORTS} probe ports, none 0 (got {:?})",
            w.namespace, w.name, w.probe_ports
        ));
    }
    Ok(())
}

/// What makes one service unusable on its own.
pub fn validate_service(s: &Service) -> Result<(), String> {
    if s.ports.iter().any(|p| p.port == 0 || p.target() == 0) {
        return Err(format!("service {}/{} has a port 0", s.namespace, s.name));
    }
    Ok(())
}

impl MeshModel {
    /// Parses and validates a model document (YAML or JSON).
    pub fn from_yaml(text: &str) -> Result<Self, ModelError> {
        let mut model: MeshModel = serde_yaml::from_str(text)?;
        if model.trust_domain.is_empty() {
            model.trust_domain = DEFAULT_TRUST_DOMAIN.to_owned();
        }
        model.validate()?;
        Ok(model)
    }

    pub fn validate(&self) -> Result<(), ModelError> {
        let mut seen = std::collections::HashSet::new();
        for w in &self.workloads {
            validate_workload(w).map_err(ModelError::Invalid)?;
            if !seen.insert((&w.namespace, &w.name)) {
                return Err(ModelError::Invalid(format!(
                    "workload {}/{} appears twice",
                    w.namespace, w.name
                )));
            }
        }
        for s in &self.services {
            validate_service(s).map_err(ModelError::Invalid)?;
        }
        Ok(())
    }

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.namespaces.iter().find(|n| n.name == name)
    }

    pub fn identity_of(&self, w: &Workload) -> Identity {
        Identity::new(&self.trust_domain, &w.namespace, &w.service_account)
    }

    /// Whether a workload's traffic is captured: its namespace carries the
    /// ambient label and the pod does not opt out.
    pub fn is_captured(&self, w: &Workload) -> bool {
        if w.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some(DATAPLANE_MODE_NONE) {
            return false;
        }
        self.namespace(&w.namespace)
            .and_then(|n| n.labels.get(DATAPLANE_MODE_LABEL))
            .map(String::as_str)
            == Some(DATAPLANE_MODE_AMBIENT)
    }
}

impl MeshModel {
    /// The mTLS mode in force for `w`: a PeerAuthentication selecting it by
    /// label wins over a namespace-wide one; PERMISSIVE without either.
    pub fn mtls_mode(&self, w: &Workload) -> MtlsMode {
        let in_ns = self
            .peer_authentications
            .iter()
            .filter(|p| p.namespace == w.namespace);
        let mut namespace_wide = None;
        for p in in_ns {
            match &p.selector {
                Some(sel) if !sel.is_empty() => {
                    if sel.iter().all(|(k, v)| w.labels.get(k) == Some(v)) {
                        return p.mode;
                    }
                }
                _ => namespace_wide = Some(p.mode),
            }
        }
        namespace_wide.unwrap_or_default()
    }
}

impl MeshModel {
    /// The endpoint workloads of every service (indexes into `workloads`,
    /// one list per entry of `services`): the workloads with an address
    /// that the service selects. Services select within their namespace
    /// only, so this costs services x pods of their namespace.
    pub fn service_endpoints(&self) -> Vec<Vec<usize>> {
        let mut by_namespace: std::collections::HashMap<&str, Vec<usize>> =
            std::collections::HashMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            if !w.ips.is_empty() {
                by_namespace.entry(&w.namespace).or_default().push(i);
            }
        }
        self.services
            .iter()
            .map(|s| {
                by_namespace
                    .get(s.namespace.as_str())
                    .map(|ws| {
                        ws.iter()
                            .copied()
                            .filter(|&i| s.selects(&self.workloads[i]))
                            .collect()
                    })
                    .unwrap_or_default()
            })
            .collect()
    }
}

impl Service {
    pub fn selects(&self, w: &Workload) -> bool {
        w.namespace == self.namespace
            && !self.selector.is_empty()
            && self
                .selector
                .iter()
                .all(|(k, v)| w.labels.get(k) == Some(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = r#"
namespaces:
  - name: shop
    labels: { weft.dev/dataplane-mode: ambient }
  - name: legacy
workloads:
  - { name: a, namespace: shop, node: n1, ips: [10.0.0.2], labels: { app: a } }
  - { name: b, namespace: shop, node: n2, ips: [10.0.1.2], labels: { app: b, weft.dev/dataplane-mode: none } }
  - { name: c, namespace: legacy, node: n2, ips: [10.0.1.3] }
services:
  - { name: a, namespace: shop, vips: [10.96.0.10], ports: [{ port: 80, target_port: 8080 }], selector: { app: a } }
"#;

    #[test]
    fn capture_follows_namespace_label_and_pod_opt_out() {
        let m = MeshModel::from_yaml(DOC).unwrap();
        assert_eq!(m.trust_domain, "cluster.local");
        let caps: Vec<bool> = m.workloads.iter().map(|w| m.is_captured(w)).collect();
        assert_eq!(caps, vec![true, false, false]);
        assert!(m.services[0].selects(&m.workloads[0]));
        assert!(!m.services[0].selects(&m.workloads[1]));
        assert_eq!(
            m.identity_of(&m.workloads[0]).to_string(),
            "spiffe://cluster.local/ns/shop/sa/default"
        );
    }

    #[test]
    fn rejects_unknown_fields_and_duplicates() {
        assert!(MeshModel::from_yaml("workloadz: []").is_err());
        let dup = "workloads:\n - {name: a, namespace: x, node: n, ips: []}\n - {name: a, namespace: x, node: n, ips: []}\n";
        let err = MeshModel::from_yaml(dup).unwrap_err().to_string();
        assert!(err.contains("appears twice"), "{err}");
    }
}

#[cfg(test)]
mod mtls_tests {
    use super::*;

    #[test]
    fn workload_selector_wins_over_namespace_wide() {
        let m = MeshModel::from_yaml(
            r#"
workloads:
  - { name: a, namespace: shop, node: n1, ips: [10.0.0.2], labels: { app: a } }
  - { name: b, namespace: shop, node: n1, ips: [10.0.0.3], labels: { app: b } }
  - { name: c, namespace: other, node: n1, ips: [10.0.0.4] }
peer_authentications:
  - { name: strict, namespace: shop, mode: STRICT }
  - { name: a-permissive, namespace: shop, selector: { app: a }, mode: PERMISSIVE }
"#,
        )
        .unwrap();
        let modes: Vec<MtlsMode> = m.workloads.iter().map(|w| m.mtls_mode(w)).collect();
        assert_eq!(
            modes,
            vec![MtlsMode::Permissive, MtlsMode::Strict, MtlsMode::Permissive]
        );
    }
}
