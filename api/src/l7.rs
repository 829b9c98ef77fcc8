//! The L7 part of the mesh model: waypoints, Gateway API routes in model
//! form, and the `weft.dev` TrafficPolicy that carries resilience settings
//! Gateway API has no field for. The controller fills these from
//! `Gateway`/`HTTPRoute`/`GRPCRoute`/`TrafficPolicy` objects; waypoints read
//! them, ztunnels only read `Waypoint` and `Service::waypoint`.

use serde::{Deserialize, Serialize};

/// Label on a waypoint's pods naming their Gateway (Gateway API convention).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// Label on a Namespace or Service sending its traffic through a waypoint.
pub const USE_WAYPOINT_LABEL: &str = "weft.dev/use-waypoint";
/// `gatewayClassName` of waypoint Gateways.
pub const WAYPOINT_CLASS: &str = "weft-waypoint";

/// A deployed waypoint: a Gateway of class `weft-waypoint`. Its pods are the
/// workloads of `namespace` labelled `GATEWAY_NAME_LABEL: name`, running as
/// `service_account`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Waypoint {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub service_account: String,
}

impl Waypoint {
    pub fn service_account(&self) -> &str {
        if self.service_account.is_empty() {
            &self.name
        } else {
            &self.service_account
        }
    }
}

/// Where a route attaches: a Service (mesh routing, the waypoint case) or a
/// Gateway.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParentRef {
    #[serde(default)]
    pub kind: ParentKind,
    /// Empty: the route's namespace.
    #[serde(default)]
    pub namespace: String,
    pub name: String,
    /// Only this service port; `None` for all.
    #[serde(default)]
    pub port: Option<u16>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ParentKind {
    #[default]
    Service,
    Gateway,
}

/// `HTTPRoute` in model form.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRoute {
    pub name: String,
    pub namespace: String,
    /// RFC 3339 creation time: the Gateway API tie-breaker between routes
    /// (oldest first, then namespace/name alphabetically).
    #[serde(default)]
    pub created: String,
    pub parents: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<HttpRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpRouteRule {
    pub name: Option<String>,
    /// Empty: one match of `PathPrefix /`.
    pub matches: Vec<HttpRouteMatch>,
    pub filters: Vec<HttpFilter>,
    /// Empty: the request is answered 500 (no backend), per the spec.
    pub backends: Vec<HttpBackend>,
    pub timeouts: Option<Timeouts>,
    pub retry: Option<Retry>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpRouteMatch {
    pub path: Option<PathMatch>,
    pub headers: Vec<HeaderMatch>,
    pub query_params: Vec<QueryParamMatch>,
    /// Upper-case method name.
    pub method: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value")]
pub enum PathMatch {
    Exact(String),
    PathPrefix(String),
    RegularExpression(String),
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MatchType {
    #[default]
    Exact,
    RegularExpression,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    #[serde(default, rename = "type")]
    pub kind: MatchType,
    /// Case-insensitive.
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryParamMatch {
    #[serde(default, rename = "type")]
    pub kind: MatchType,
    /// Case-sensitive.
    pub name: String,
    pub value: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HttpFilter {
    RequestHeaderModifier(HeaderModifier),
    ResponseHeaderModifier(HeaderModifier),
    RequestRedirect(RequestRedirect),
    UrlRewrite(UrlRewrite),
    RequestMirror(RequestMirror),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeaderModifier {
    /// Replace (or add) these headers.
    pub set: Vec<(String, String)>,
    /// Append these values.
    pub add: Vec<(String, String)>,
    /// Remove these header names.
    pub remove: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RequestRedirect {
    pub scheme: Option<String>,
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
    pub port: Option<u16>,
    /// 301 or 302 (default 302).
    pub status_code: Option<u16>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UrlRewrite {
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value")]
pub enum PathModifier {
    ReplaceFullPath(String),
    /// Replaces the part matched by the rule's `PathPrefix` match.
    ReplacePrefixMatch(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestMirror {
    pub backend: BackendRef,
    /// Share of requests mirrored, 0-100 (default 100).
    #[serde(default)]
    pub percent: Option<u32>,
}

/// A Service (in `namespace`, empty: the route's) and port.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendRef {
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    pub port: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpBackend {
    #[serde(flatten)]
    pub backend: BackendRef,
    /// Relative weight (Gateway API default 1); 0 never receives traffic.
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub filters: Vec<HttpFilter>,
}

fn default_weight() -> u32 {
    1
}

/// Gateway API `HTTPRouteTimeouts`, in milliseconds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Timeouts {
    /// Whole request, retries included.
    pub request_ms: Option<u64>,
    /// One attempt to the backend (the per-try timeout).
    pub backend_request_ms: Option<u64>,
}

/// Gateway API `HTTPRouteRetry` (plus the weft opt-in for non-idempotent
/// methods).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retry {
    /// Response codes retried (5xx only per the spec); empty: 500, 502,
    /// 503, 504. Connect failures and resets are always retryable.
    pub codes: Vec<u16>,
    /// Retries after the first attempt.
    pub attempts: u32,
    pub backoff_ms: Option<u64>,
    /// Retry POST/PATCH and other non-idempotent methods too.
    pub non_idempotent: bool,
}

/// `GRPCRoute` in model form.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcRoute {
    pub name: String,
    pub namespace: String,
    #[serde(default)]
    pub created: String,
    pub parents: Vec<ParentRef>,
    #[serde(default)]
    pub hostnames: Vec<String>,
    #[serde(default)]
    pub rules: Vec<GrpcRouteRule>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcRouteRule {
    pub name: Option<String>,
    pub matches: Vec<GrpcRouteMatch>,
    /// Header modifiers and mirrors only (redirects/rewrites are not gRPC).
    pub filters: Vec<HttpFilter>,
    pub backends: Vec<HttpBackend>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcRouteMatch {
    pub method: Option<GrpcMethodMatch>,
    pub headers: Vec<HeaderMatch>,
}

/// Matches `/<service>/<method>`; an empty field matches any.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GrpcMethodMatch {
    #[serde(rename = "type")]
    pub kind: MatchType,
    pub service: String,
    pub method: String,
}

/// `weft.dev/v1alpha1` TrafficPolicy: resilience for one Service's traffic
/// through its waypoint (what Gateway API has no standard field for).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficPolicy {
    pub name: String,
    pub namespace: String,
    /// The Service (in `namespace`) it applies to.
    pub target: String,
    #[serde(default)]
    pub retry_budget: Option<RetryBudget>,
    #[serde(default)]
    pub outlier_detection: Option<OutlierDetection>,
    #[serde(default)]
    pub limits: Option<ConnectionLimits>,
    #[serde(default)]
    pub fault: Option<Fault>,
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
}

/// Retries allowed at most `percent` of active requests, and at least
/// `min_retries_per_second`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryBudget {
    pub percent: u32,
    pub min_retries_per_second: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            percent: 20,
            min_retries_per_second: 10,
        }
    }
}

/// Ejects an endpoint after `consecutive_5xx` failures in a row for
/// `base_ejection_ms` x the number of times it was ejected; never more than
/// `max_ejection_percent` of the endpoints at once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OutlierDetection {
    pub consecutive_5xx: u32,
    pub base_ejection_ms: u64,
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            base_ejection_ms: 30_000,
            max_ejection_percent: 50,
        }
    }
}

/// Circuit breaking: past these, requests are answered 503 at once.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConnectionLimits {
    /// Concurrent upstream connections per endpoint (HTTP/1.1).
    pub max_connections: Option<u32>,
    /// Requests waiting for a connection.
    pub max_pending_requests: Option<u32>,
    /// Concurrent requests to the service.
    pub max_requests: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultDelay {
    /// 0-100.
    pub percent: u32,
    pub delay_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultAbort {
    /// 0-100.
    pub percent: u32,
    /// HTTP status answered (gRPC requests get the matching grpc-status).
    pub status: u16,
}

/// Local token bucket: `requests` per `period_ms`, bursting to `burst`
/// (default `requests`), one bucket per key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub requests: u32,
    pub period_ms: u64,
    #[serde(default)]
    pub burst: Option<u32>,
    #[serde(default)]
    pub key: RateLimitKey,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum RateLimitKey {
    /// One bucket for all requests.
    #[default]
    Global,
    /// A bucket per value of this request header.
    Header(String),
    /// A bucket per client SPIFFE identity.
    ClientIdentity,
}
