//! gRPC messages and services (tonic/prost), generated from `api/proto/`,
//! and the conversions between the wire messages and `crate::model`.
//!
//! model -> proto never fails; proto -> model fails on what the wire type
//! cannot rule out (unparseable IPs, ports above 65535), with an error that
//! names the resource, so a client can NACK with it.

use std::net::IpAddr;

use crate::model;

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("weft.v1");
}

pub use v1::*;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{resource}: {reason}")]
pub struct ConversionError {
    /// `kind namespace/name` of the offending resource.
    pub resource: String,
    pub reason: String,
}

fn err(kind: &str, ns: &str, name: &str, reason: String) -> ConversionError {
    ConversionError {
        resource: if ns.is_empty() {
            format!("{kind} {name}")
        } else {
            format!("{kind} {ns}/{name}")
        },
        reason,
    }
}

fn parse_ips(
    kind: &str,
    ns: &str,
    name: &str,
    ips: &[String],
) -> Result<Vec<IpAddr>, ConversionError> {
    ips.iter()
        .map(|s| {
            s.parse()
                .map_err(|_| err(kind, ns, name, format!("{s:?} is not an IP address")))
        })
        .collect()
}

fn port16(kind: &str, ns: &str, name: &str, p: u32) -> Result<u16, ConversionError> {
    u16::try_from(p).map_err(|_| err(kind, ns, name, format!("port {p} is above 65535")))
}

/// The key a resource is upserted and removed by.
pub trait Keyed {
    /// Namespace and name, borrowed (compare keys without allocating).
    fn key_parts(&self) -> (&str, &str);

    fn key(&self) -> ResourceKey {
        let (namespace, name) = self.key_parts();
        ResourceKey::new(namespace, name)
    }
}

impl ResourceKey {
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl std::fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.namespace.is_empty() {
            f.write_str(&self.name)
        } else {
            write!(f, "{}/{}", self.namespace, self.name)
        }
    }
}

macro_rules! keyed {
    ($($t:ty),*) => {$(
        impl Keyed for $t {
            fn key_parts(&self) -> (&str, &str) {
                (&self.namespace, &self.name)
            }
        }
    )*};
}
keyed!(
    L7Resource,
    model::Waypoint,
    model::HttpRoute,
    model::GrpcRoute,
    model::TrafficPolicy,
    Workload,
    Service,
    AuthorizationPolicy,
    PeerAuthentication,
    model::Workload,
    model::Service,
    model::AuthorizationPolicy,
    model::PeerAuthentication
);

impl Keyed for Namespace {
    fn key_parts(&self) -> (&str, &str) {
        ("", &self.name)
    }
}

impl Keyed for model::Namespace {
    fn key_parts(&self) -> (&str, &str) {
        ("", &self.name)
    }
}

// ---- model -> proto ----

impl From<&model::Namespace> for Namespace {
    fn from(n: &model::Namespace) -> Self {
        Self {
            name: n.name.clone(),
            labels: n.labels.clone().into_iter().collect(),
        }
    }
}

impl From<&model::Workload> for Workload {
    fn from(w: &model::Workload) -> Self {
        Self {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: w.service_account.clone(),
            node: w.node.clone(),
            ips: w.ips.iter().map(ToString::to_string).collect(),
            labels: w.labels.clone().into_iter().collect(),
            probe_ports: w.probe_ports.iter().map(|&p| u32::from(p)).collect(),
        }
    }
}

impl From<&model::Service> for Service {
    fn from(s: &model::Service) -> Self {
        Self {
            name: s.name.clone(),
            namespace: s.namespace.clone(),
            vips: s.vips.iter().map(ToString::to_string).collect(),
            ports: s
                .ports
                .iter()
                .map(|p| ServicePort {
                    port: p.port.into(),
                    target_port: p.target_port.map(u32::from),
                })
                .collect(),
            selector: s.selector.clone().into_iter().collect(),
            waypoint: s.waypoint.clone(),
        }
    }
}

fn selector_to_proto(s: &Option<model::Labels>) -> Option<Selector> {
    s.as_ref().map(|l| Selector {
        match_labels: l.clone().into_iter().collect(),
    })
}

fn selector_from_proto(s: &Option<Selector>) -> Option<model::Labels> {
    s.as_ref()
        .map(|s| s.match_labels.clone().into_iter().collect())
}

impl From<&model::AuthorizationPolicy> for AuthorizationPolicy {
    fn from(p: &model::AuthorizationPolicy) -> Self {
        Self {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            selector: selector_to_proto(&p.selector),
            action: match p.action {
                model::PolicyAction::Allow => PolicyAction::Allow,
                model::PolicyAction::Deny => PolicyAction::Deny,
            } as i32,
            rules: p
                .rules
                .iter()
                .map(|r| Rule {
                    from: r
                        .from
                        .iter()
                        .map(|s| Source {
                            principals: s.principals.clone(),
                            namespaces: s.namespaces.clone(),
                            ip_blocks: s.ip_blocks.clone(),
                        })
                        .collect(),
                    to: r
                        .to
                        .iter()
                        .map(|d| Destination {
                            ports: d.ports.iter().map(|p| u32::from(*p)).collect(),
                            methods: d.methods.clone(),
                            paths: d.paths.clone(),
                            headers: d
                                .headers
                                .iter()
                                .map(|(k, v)| (k.clone(), HeaderValues { values: v.clone() }))
                                .collect(),
                        })
                        .collect(),
                })
                .collect(),
            targets: p
                .targets
                .iter()
                .map(|t| PolicyTarget {
                    kind: parent_kind_name(t.kind).to_owned(),
                    name: t.name.clone(),
                })
                .collect(),
        }
    }
}

impl From<&model::PeerAuthentication> for PeerAuthentication {
    fn from(p: &model::PeerAuthentication) -> Self {
        Self {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            selector: selector_to_proto(&p.selector),
            mode: match p.mode {
                model::MtlsMode::Permissive => MtlsMode::Permissive,
                model::MtlsMode::Strict => MtlsMode::Strict,
            } as i32,
        }
    }
}

impl From<&model::MeshModel> for Resources {
    fn from(m: &model::MeshModel) -> Self {
        Self {
            namespaces: m.namespaces.iter().map(Into::into).collect(),
            workloads: m.workloads.iter().map(Into::into).collect(),
            services: m.services.iter().map(Into::into).collect(),
            policies: m.policies.iter().map(Into::into).collect(),
            peer_authentications: m.peer_authentications.iter().map(Into::into).collect(),
            waypoints: m.waypoints.iter().map(Into::into).collect(),
            http_routes: m.http_routes.iter().map(Into::into).collect(),
            grpc_routes: m.grpc_routes.iter().map(Into::into).collect(),
            traffic_policies: m.traffic_policies.iter().map(Into::into).collect(),
        }
    }
}

fn parent_kind_name(k: model::ParentKind) -> &'static str {
    match k {
        model::ParentKind::Service => "Service",
        model::ParentKind::Gateway => "Gateway",
    }
}

macro_rules! l7_to_proto {
    ($($t:ty),*) => {$(
        impl From<&$t> for L7Resource {
            fn from(r: &$t) -> Self {
                Self {
                    namespace: r.namespace.clone(),
                    name: r.name.clone(),
                    // Serializing plain data structs cannot fail.
                    json: serde_json::to_string(r).unwrap_or_default(),
                }
            }
        }
    )*};
}
l7_to_proto!(
    model::Waypoint,
    model::HttpRoute,
    model::GrpcRoute,
    model::TrafficPolicy
);

pub(crate) fn decode_l7<T: serde::de::DeserializeOwned + Keyed>(
    kind: &str,
    items: &[L7Resource],
) -> Result<Vec<T>, ConversionError> {
    items
        .iter()
        .map(|r| {
            let v: T = serde_json::from_str(&r.json)
                .map_err(|e| err(kind, &r.namespace, &r.name, format!("undecodable: {e}")))?;
            if v.key() != r.key() {
                return Err(err(
                    kind,
                    &r.namespace,
                    &r.name,
                    format!("body names {}", v.key()),
                ));
            }
            Ok(v)
        })
        .collect()
}

// ---- proto -> model ----

impl From<&Namespace> for model::Namespace {
    fn from(n: &Namespace) -> Self {
        Self {
            name: n.name.clone(),
            labels: n.labels.clone().into_iter().collect(),
        }
    }
}

impl TryFrom<&Workload> for model::Workload {
    type Error = ConversionError;
    fn try_from(w: &Workload) -> Result<Self, ConversionError> {
        Ok(Self {
            uid: w.uid.clone(),
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            service_account: if w.service_account.is_empty() {
                "default".to_owned()
            } else {
                w.service_account.clone()
            },
            node: w.node.clone(),
            ips: parse_ips("workload", &w.namespace, &w.name, &w.ips)?,
            labels: w.labels.clone().into_iter().collect(),
            probe_ports: w
                .probe_ports
                .iter()
                .map(|&p| port16("workload", &w.namespace, &w.name, p))
                .collect::<Result<_, _>>()?,
        })
    }
}

impl TryFrom<&Service> for model::Service {
    type Error = ConversionError;
    fn try_from(s: &Service) -> Result<Self, ConversionError> {
        let (ns, name) = (&s.namespace, &s.name);
        Ok(Self {
            name: name.clone(),
            namespace: ns.clone(),
            vips: parse_ips("service", ns, name, &s.vips)?,
            ports: s
                .ports
                .iter()
                .map(|p| {
                    Ok(model::ServicePort {
                        port: port16("service", ns, name, p.port)?,
                        target_port: p
                            .target_port
                            .map(|t| port16("service", ns, name, t))
                            .transpose()?,
                    })
                })
                .collect::<Result<_, ConversionError>>()?,
            selector: s.selector.clone().into_iter().collect(),
            waypoint: s.waypoint.clone(),
        })
    }
}

impl TryFrom<&AuthorizationPolicy> for model::AuthorizationPolicy {
    type Error = ConversionError;
    fn try_from(p: &AuthorizationPolicy) -> Result<Self, ConversionError> {
        let (ns, name) = (&p.namespace, &p.name);
        let action = match PolicyAction::try_from(p.action) {
            Ok(PolicyAction::Allow) => model::PolicyAction::Allow,
            Ok(PolicyAction::Deny) => model::PolicyAction::Deny,
            Err(_) => {
                return Err(err(
                    "authorization policy",
                    ns,
                    name,
                    format!("unknown action {}", p.action),
                ))
            }
        };
        let rules = p
            .rules
            .iter()
            .map(|r| {
                Ok(model::Rule {
                    from: r
                        .from
                        .iter()
                        .map(|s| model::Source {
                            principals: s.principals.clone(),
                            namespaces: s.namespaces.clone(),
                            ip_blocks: s.ip_blocks.clone(),
                        })
                        .collect(),
                    to: r
                        .to
                        .iter()
                        .map(|d| {
                            Ok(model::Destination {
                                ports: d
                                    .ports
                                    .iter()
                                    .map(|p| port16("authorization policy", ns, name, *p))
                                    .collect::<Result<_, ConversionError>>()?,
                                methods: d.methods.clone(),
                                paths: d.paths.clone(),
                                headers: d
                                    .headers
                                    .iter()
                                    .map(|(k, v)| (k.clone(), v.values.clone()))
                                    .collect(),
                            })
                        })
                        .collect::<Result<_, ConversionError>>()?,
                })
            })
            .collect::<Result<_, ConversionError>>()?;
        Ok(Self {
            name: name.clone(),
            namespace: ns.clone(),
            selector: selector_from_proto(&p.selector),
            action,
            rules,
            targets: p
                .targets
                .iter()
                .map(|t| {
                    let kind = match t.kind.as_str() {
                        "Service" | "" => model::ParentKind::Service,
                        "Gateway" => model::ParentKind::Gateway,
                        other => {
                            return Err(err(
                                "authorization policy",
                                ns,
                                name,
                                format!("unknown target kind {other:?}"),
                            ))
                        }
                    };
                    Ok(model::PolicyTarget {
                        kind,
                        name: t.name.clone(),
                    })
                })
                .collect::<Result<_, ConversionError>>()?,
        })
    }
}

impl TryFrom<&PeerAuthentication> for model::PeerAuthentication {
    type Error = ConversionError;
    fn try_from(p: &PeerAuthentication) -> Result<Self, ConversionError> {
        let mode = match MtlsMode::try_from(p.mode) {
            Ok(MtlsMode::Permissive) => model::MtlsMode::Permissive,
            Ok(MtlsMode::Strict) => model::MtlsMode::Strict,
            Err(_) => {
                return Err(err(
                    "peer authentication",
                    &p.namespace,
                    &p.name,
                    format!("unknown mTLS mode {}", p.mode),
                ))
            }
        };
        Ok(Self {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            selector: selector_from_proto(&p.selector),
            mode,
        })
    }
}

impl Resources {
    /// The resources as a model with `trust_domain` (not validated: the
    /// caller decides whether to `MeshModel::validate`).
    pub fn to_model(&self, trust_domain: &str) -> Result<model::MeshModel, ConversionError> {
        Ok(model::MeshModel {
            trust_domain: trust_domain.to_owned(),
            namespaces: self.namespaces.iter().map(Into::into).collect(),
            workloads: self
                .workloads
                .iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            services: self
                .services
                .iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            policies: self
                .policies
                .iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            peer_authentications: self
                .peer_authentications
                .iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            waypoints: decode_l7("waypoint", &self.waypoints)?,
            http_routes: decode_l7("HTTPRoute", &self.http_routes)?,
            grpc_routes: decode_l7("GRPCRoute", &self.grpc_routes)?,
            traffic_policies: decode_l7("traffic policy", &self.traffic_policies)?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.workloads.is_empty()
            && self.services.is_empty()
            && self.policies.is_empty()
            && self.peer_authentications.is_empty()
            && self.waypoints.is_empty()
            && self.http_routes.is_empty()
            && self.grpc_routes.is_empty()
            && self.traffic_policies.is_empty()
    }
}

impl Removals {
    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.workloads.is_empty()
            && self.services.is_empty()
            && self.policies.is_empty()
            && self.peer_authentications.is_empty()
            && self.waypoints.is_empty()
            && self.http_routes.is_empty()
            && self.grpc_routes.is_empty()
            && self.traffic_policies.is_empty()
    }
}

impl SubscribeRequest {
    pub fn hello(node_name: &str, resume: Option<ResumePoint>) -> Self {
        Self {
            request: Some(subscribe_request::Request::Hello(Hello {
                node_name: node_name.to_owned(),
                resume,
                role: String::new(),
            })),
        }
    }

    /// A Hello from a waypoint running on `node_name`.
    pub fn waypoint_hello(node_name: &str, resume: Option<ResumePoint>) -> Self {
        let mut h = Self::hello(node_name, resume);
        if let Some(subscribe_request::Request::Hello(hello)) = &mut h.request {
            hello.role = "waypoint".to_owned();
        }
        h
    }

    pub fn ack(version: u64) -> Self {
        Self {
            request: Some(subscribe_request::Request::Ack(Ack { version })),
        }
    }

    pub fn nack(version: u64, error: impl Into<String>) -> Self {
        Self {
            request: Some(subscribe_request::Request::Nack(Nack {
                version,
                error: error.into(),
            })),
        }
    }
}

/// The `authorization` metadata value for a bearer token.
pub fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// The token of an `authorization: Bearer <token>` metadata value.
pub fn token_of_bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MeshModel;

    const DOC: &str = r#"
namespaces:
  - { name: shop, labels: { weft.dev/dataplane-mode: ambient } }
  - { name: empty }
workloads:
  - { uid: u1, name: a, namespace: shop, service_account: cart, node: n1, ips: [10.0.0.2, "fd00::2"], labels: { app: a } }
  - { name: b, namespace: shop, node: n2, ips: [] }
services:
  - { name: a, namespace: shop, vips: [10.96.0.10], ports: [{ port: 80, target_port: 8080 }, { port: 443 }], selector: { app: a } }
policies:
  - name: allow-front
    namespace: shop
    selector: { app: a }
    action: ALLOW
    rules:
      - from: [{ principals: ["spiffe://cluster.local/ns/shop/sa/front"], namespaces: [shop], ip_blocks: [10.0.0.0/8] }]
        to: [{ ports: [8080], methods: [GET], paths: [/x] }]
  - { name: deny-all, namespace: shop, selector: {}, action: DENY, rules: [{}] }
  - { name: no-selector, namespace: shop }
peer_authentications:
  - { name: strict, namespace: shop, mode: STRICT }
  - { name: a, namespace: shop, selector: { app: a }, mode: PERMISSIVE }
"#;

    #[test]
    fn model_round_trips_through_proto() {
        let model = MeshModel::from_yaml(DOC).unwrap();
        let wire = Resources::from(&model);
        // Through bytes too, so field numbers and optionality are exercised.
        let bytes = prost::Message::encode_to_vec(&wire);
        let decoded: Resources = prost::Message::decode(bytes.as_slice()).unwrap();
        let back = decoded.to_model(&model.trust_domain).unwrap();
        assert_eq!(back, model);
        // `selector: {}` and no selector stay distinct.
        assert_eq!(back.policies[1].selector, Some(Default::default()));
        assert_eq!(back.policies[2].selector, None);
    }

    #[test]
    fn bad_wire_values_name_the_resource() {
        let mut w = Workload::from(&MeshModel::from_yaml(DOC).unwrap().workloads[0]);
        w.ips.push("not-an-ip".into());
        let e = model::Workload::try_from(&w).unwrap_err();
        assert_eq!(e.resource, "workload shop/a");
        let s = Service {
            name: "s".into(),
            namespace: "ns".into(),
            ports: vec![ServicePort {
                port: 70000,
                target_port: None,
            }],
            ..Default::default()
        };
        assert!(model::Service::try_from(&s)
            .unwrap_err()
            .to_string()
            .contains("above 65535"));
        let p = AuthorizationPolicy {
            action: 7,
            ..Default::default()
        };
        assert!(model::AuthorizationPolicy::try_from(&p).is_err());
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(token_of_bearer(&bearer("abc")), Some("abc"));
        assert_eq!(token_of_bearer("bearer  xyz "), Some("xyz"));
        assert_eq!(token_of_bearer("Basic abc"), None);
        assert_eq!(token_of_bearer("Bearer "), None);
    }
}
