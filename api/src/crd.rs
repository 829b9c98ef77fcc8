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
    /// Services or waypoint Gateways of the policy's namespace it applies
    /// to. With targets the policy is enforced by the waypoint only (HTTP
    /// fields included) and `selector` is ignored; without, by the
    /// destination's ztunnel.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub target_refs: Vec<PolicyTargetRef>,
}

/// What a waypoint-enforced policy applies to (Gateway API
/// `LocalPolicyTargetReference`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyTargetRef {
    /// `""` (core) for a Service, `gateway.networking.k8s.io` for a Gateway;
    /// may be left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub kind: PolicyTargetKind,
    pub name: String,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum PolicyTargetKind {
    #[default]
    Service,
    Gateway,
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

/// What is reached. `methods`, `paths` and `headers` are HTTP fields: only a waypoint
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
    /// Request header name (case-insensitive) to accepted values (exact, or
    /// with a leading or trailing `*`); every named header must match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, Vec<String>>,
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
    status = "GatewayStatus",
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_routes: Option<AllowedRoutes>,
}

/// Which routes may attach to a listener (default: routes of the
/// Gateway's own namespace, of the kinds its protocol supports).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AllowedRoutes {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespaces: Option<RouteNamespaces>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kinds: Vec<RouteGroupKind>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteNamespaces {
    /// `All`, `Same` (default) or `Selector` (read as `Same`: the
    /// controller does not evaluate namespace selectors).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteGroupKind {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    pub kind: String,
}

/// `Gateway.status`: the controller writes `Accepted` and `Programmed`
/// conditions and the waypoint Service's address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<GatewayStatusAddress>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatusAddress {
    /// `IPAddress` or `Hostname`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    pub value: String,
}

/// `gatewayClassName` of waypoint Gateways.
pub const WAYPOINT_GATEWAY_CLASS: &str = "weft-waypoint";

/// Gateway API `ParentReference`: a route attaches to a Service (mesh
/// routing through its waypoint: `group: ""`, `kind: Service`) or to a
/// Gateway (the defaults: `group: gateway.networking.k8s.io`,
/// `kind: Gateway`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ParentReference {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Absent: the route's namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

/// `gateway.networking.k8s.io/v1` HTTPRoute, the fields the mesh reads.
/// Watched only (its CRD belongs to Gateway API). Durations are Gateway
/// API durations: up to four `<1-5 digits><h|m|s|ms>` parts, e.g. `10s`,
/// `500ms`, `1m30s`.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "HTTPRoute",
    plural = "httproutes",
    namespaced,
    status = "RouteStatus",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HTTPRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<HTTPRouteMatch>,
    #[serde(default)]
    pub filters: Vec<HTTPRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<HTTPBackendRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HTTPRouteTimeouts>,
    /// Experimental channel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<HTTPRouteRetry>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HTTPPathMatch>,
    #[serde(default)]
    pub headers: Vec<HTTPHeaderMatch>,
    #[serde(default)]
    pub query_params: Vec<HTTPHeaderMatch>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPPathMatch {
    /// `Exact`, `PathPrefix` (default) or `RegularExpression`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// Default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// A header or query parameter match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPHeaderMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    pub name: String,
    pub value: String,
}

/// One filter; `type` says which of the other fields is set.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteFilter {
    /// `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestRedirect`,
    /// `URLRewrite`, `RequestMirror` (or `ExtensionRef`, unsupported).
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HTTPHeaderFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HTTPHeaderFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<HTTPRequestRedirectFilter>,
    #[serde(
        default,
        rename = "urlRewrite",
        skip_serializing_if = "Option::is_none"
    )]
    pub url_rewrite: Option<HTTPURLRewriteFilter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<HTTPRequestMirrorFilter>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPHeaderFilter {
    #[serde(default)]
    pub set: Vec<HTTPHeader>,
    #[serde(default)]
    pub add: Vec<HTTPHeader>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPHeader {
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRequestRedirectFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HTTPPathModifier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPURLRewriteFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HTTPPathModifier>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPPathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub type_: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRequestMirrorFilter {
    pub backend_ref: BackendObjectReference,
    /// 0-100 (experimental); `fraction` wins when both are set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<Fraction>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Fraction {
    pub numerator: i32,
    /// Default 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denominator: Option<i32>,
}

/// A reference to a backend: a Service unless `group`/`kind` say otherwise.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackendObjectReference {
    /// Default `""` (core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Default `Service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Required for a Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<i32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPBackendRef {
    #[serde(flatten)]
    pub backend: BackendObjectReference,
    /// Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HTTPRouteFilter>,
}

/// Gateway API durations (`10s`, `500ms`); `0s` disables the timeout.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteTimeouts {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HTTPRouteRetry {
    /// HTTP response codes retried (5xx).
    #[serde(default)]
    pub codes: Vec<i32>,
    /// Retries after the first attempt.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<i32>,
    /// A Gateway API duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
}

/// `gateway.networking.k8s.io/v1` GRPCRoute, the fields the mesh reads.
/// Watched only.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "gateway.networking.k8s.io",
    version = "v1",
    kind = "GRPCRoute",
    plural = "grpcroutes",
    namespaced,
    status = "RouteStatus",
    derive = "PartialEq",
    derive = "Default"
)]
#[serde(rename_all = "camelCase")]
pub struct GRPCRouteSpec {
    #[serde(default)]
    pub parent_refs: Vec<ParentReference>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GRPCRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GRPCRouteRule {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default)]
    pub matches: Vec<GRPCRouteMatch>,
    /// `RequestHeaderModifier`, `ResponseHeaderModifier`, `RequestMirror`.
    #[serde(default)]
    pub filters: Vec<HTTPRouteFilter>,
    #[serde(default)]
    pub backend_refs: Vec<HTTPBackendRef>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GRPCRouteMatch {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<GRPCMethodMatch>,
    #[serde(default)]
    pub headers: Vec<HTTPHeaderMatch>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GRPCMethodMatch {
    /// `Exact` (default) or `RegularExpression`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// Gateway API `RouteStatus`: one entry per parent and controller.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteStatus {
    #[serde(default)]
    pub parents: Vec<RouteParentStatus>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RouteParentStatus {
    pub parent_ref: ParentReference,
    pub controller_name: String,
    #[serde(default)]
    pub conditions: Vec<Condition>,
}

/// `weft.dev/v1alpha1` TrafficPolicy: resilience settings for the traffic
/// to one Service through its waypoint, what Gateway API has no standard
/// field for. Durations are Gateway API duration strings (`30s`, `500ms`,
/// `1m`); counts and percentages are integers.
// Each printcolumn repeats `type_`, which clippy mistakes for a duplicate.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "weft.dev",
    version = "v1alpha1",
    kind = "TrafficPolicy",
    namespaced,
    status = "PolicyConditions",
    shortname = "wtp",
    category = "weft",
    derive = "PartialEq",
    derive = "Default",
    printcolumn(name = "Target", type_ = "string", json_path = ".spec.targetRef.name"),
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
pub struct TrafficPolicySpec {
    pub target_ref: TrafficTargetRef,
    /// Retries allowed beyond the first attempts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_budget: Option<RetryBudget>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Circuit breaking: past these, requests are answered 503 at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ConnectionLimits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<Fault>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// The Service (in the policy's namespace) the policy applies to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficTargetRef {
    /// `""` (core); may be left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Only `Service`.
    #[serde(default = "service_kind")]
    pub kind: String,
    pub name: String,
}

fn service_kind() -> String {
    "Service".to_owned()
}

/// Retries allowed at most `percent` of active requests (default 20), and
/// at least `minRetriesPerSecond` (default 10).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RetryBudget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_retries_per_second: Option<u32>,
}

/// Ejects an endpoint after `consecutive5xx` failures in a row (default 5)
/// for `baseEjectionTime` (default `30s`) times the number of its
/// ejections; never more than `maxEjectionPercent` (default 50) at once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetection {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive5xx: Option<u32>,
    /// A Gateway API duration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_ejection_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ejection_percent: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConnectionLimits {
    /// Concurrent upstream connections per endpoint (HTTP/1.1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_pending_requests: Option<u32>,
    /// Concurrent requests to the service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_requests: Option<u32>,
}

/// Injected faults, for testing resilience.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<FaultDelay>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultDelay {
    /// Share of requests delayed, 0-100.
    pub percent: u32,
    /// A Gateway API duration.
    pub fixed_delay: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FaultAbort {
    /// Share of requests aborted, 0-100.
    pub percent: u32,
    /// Status answered (gRPC requests get the matching grpc-status).
    pub http_status: u16,
}

/// Local token bucket: `requests` per `period`, bursting to `burst`
/// (default `requests`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    pub requests: u32,
    /// A Gateway API duration.
    pub period: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
    /// Absent: one bucket for all requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<RateLimitKey>,
}

/// One bucket per value of `type`: `Global` (one bucket), `Header` (per
/// value of the request header `header`) or `ClientIdentity` (per client
/// SPIFFE identity).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitKey {
    #[serde(rename = "type")]
    pub type_: RateLimitKeyType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RateLimitKeyType {
    #[default]
    Global,
    Header,
    ClientIdentity,
}

/// Weft's CustomResourceDefinitions as one multi-document YAML stream, for
/// the chart (`cargo xtask chart`). Gateway API's own CRDs (Gateway,
/// HTTPRoute, GRPCRoute) are installed from Gateway API's release, never
/// from here.
pub fn crds_yaml() -> String {
    let crds = [
        AuthorizationPolicy::crd(),
        PeerAuthentication::crd(),
        TrafficPolicy::crd(),
    ];
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
        assert_eq!(docs.len(), 3);
        assert_eq!(
            docs[0]["metadata"]["name"].as_str(),
            Some("authorizationpolicies.weft.dev")
        );
        assert_eq!(
            docs[1]["metadata"]["name"].as_str(),
            Some("peerauthentications.weft.dev")
        );
        assert_eq!(
            docs[2]["metadata"]["name"].as_str(),
            Some("trafficpolicies.weft.dev")
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
        assert!(yaml.contains("targetRefs"));
        assert!(yaml.contains("baseEjectionTime"));
        assert!(yaml.contains("consecutive5xx"));
    }

    #[test]
    fn http_route_reads_gateway_api_field_names() {
        let r: HTTPRoute = serde_yaml::from_str(
            r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: r, namespace: shop }
spec:
  parentRefs: [{ group: "", kind: Service, name: web, port: 80 }]
  hostnames: [web.shop]
  rules:
    - matches: [{ path: { type: PathPrefix, value: /api }, headers: [{ name: x, value: y }], queryParams: [{ name: q, value: "1" }], method: GET }]
      filters:
        - { type: RequestHeaderModifier, requestHeaderModifier: { set: [{ name: a, value: b }], remove: [c] } }
        - { type: URLRewrite, urlRewrite: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /v2 } } }
        - { type: RequestMirror, requestMirror: { backendRef: { name: shadow, port: 80 } } }
      backendRefs: [{ name: web-v2, port: 8080, weight: 90, filters: [] }]
      timeouts: { request: 10s, backendRequest: 500ms }
      retry: { codes: [503], attempts: 2, backoff: 100ms }
      sessionPersistence: { type: Cookie }
"#,
        )
        .unwrap();
        let rule = &r.spec.rules[0];
        assert_eq!(r.spec.parent_refs[0].kind.as_deref(), Some("Service"));
        assert_eq!(rule.matches[0].query_params[0].name, "q");
        assert_eq!(
            rule.filters[1]
                .url_rewrite
                .as_ref()
                .unwrap()
                .path
                .as_ref()
                .unwrap()
                .replace_prefix_match
                .as_deref(),
            Some("/v2")
        );
        assert_eq!(rule.backend_refs[0].backend.name, "web-v2");
        assert_eq!(rule.backend_refs[0].weight, Some(90));
        assert_eq!(
            rule.timeouts.as_ref().unwrap().backend_request.as_deref(),
            Some("500ms")
        );
        assert_eq!(rule.retry.as_ref().unwrap().attempts, Some(2));
    }

    #[test]
    fn authorization_policy_keeps_old_fields_and_reads_target_refs() {
        let p: AuthorizationPolicy = serde_yaml::from_str(
            r#"
apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: { name: api, namespace: shop }
spec:
  targetRefs: [{ kind: Service, name: web }, { group: gateway.networking.k8s.io, kind: Gateway, name: wp }]
  rules:
    - to: [{ operation: { methods: [GET], headers: { x-team: [blue, "green*"] } } }]
"#,
        )
        .unwrap();
        assert_eq!(p.spec.target_refs[1].kind, PolicyTargetKind::Gateway);
        assert_eq!(
            p.spec.rules[0].to[0].operation.headers["x-team"],
            ["blue", "green*"]
        );
        assert!(serde_yaml::from_str::<AuthorizationPolicy>(
            "apiVersion: weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: x}
spec: {targetRefs: [{kind: Pod, name: a}]}
"
        )
        .is_err());
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
