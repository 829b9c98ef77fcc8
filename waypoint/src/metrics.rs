//! Prometheus metrics of the waypoint (`weft_` prefix, mesh-standard
//! labels): the families every data-plane process has
//! (`weft_dataplane::metrics`) and the waypoint's own. Request counters
//! carry the workload labels; histograms carry only the destination
//! service and the response class, so their series stay few.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use weft_dataplane::metrics::{encode, CommonMetrics, ReasonLabels};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_service: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub request_protocol: &'static str,
    /// Standard method names; anything else is `OTHER`.
    pub request_method: &'static str,
    pub response_code: u16,
    /// The route rule that matched (`namespace/route#rule`), or empty.
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub destination_service: String,
    /// `2xx`, `4xx`, ...
    pub response_class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    pub policy: String,
    pub destination_service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OverflowLabels {
    pub destination_service: String,
    /// Which limit: `requests`, `pending`, `connections`.
    pub limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceOnly {
    pub destination_service: String,
}

pub struct Metrics {
    pub requests: Family<RequestLabels, Counter>,
    pub duration: Family<ServiceLabels, Histogram>,
    pub request_bytes: Family<ServiceLabels, Histogram>,
    pub response_bytes: Family<ServiceLabels, Histogram>,
    pub denials: Family<DenialLabels, Counter>,
    pub retries: Family<ServiceOnly, Counter>,
    pub rate_limited: Family<ServiceOnly, Counter>,
    pub overflows: Family<OverflowLabels, Counter>,
    pub cancelled: Family<ServiceOnly, Counter>,
    pub ejections: Family<ServiceOnly, Counter>,
    pub failures: Family<ReasonLabels, Counter>,
    pub l4_connections: Family<ServiceOnly, Counter>,
    pub active_requests: Gauge,
    /// Config updates and rejections, inbound handshake failures, build.
    pub common: CommonMetrics,
    registry: Registry,
}

fn seconds_histogram() -> Histogram {
    // 0.5 ms .. ~65 s
    Histogram::new(exponential_buckets(0.0005, 2.0, 18))
}

fn bytes_histogram() -> Histogram {
    // 64 B .. ~1 GiB
    Histogram::new(exponential_buckets(64.0, 4.0, 13))
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("weft");
        let common = CommonMetrics::register(&mut registry, "waypoint");
        let m = Metrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(seconds_histogram),
            request_bytes: Family::new_with_constructor(bytes_histogram),
            response_bytes: Family::new_with_constructor(bytes_histogram),
            denials: Family::default(),
            retries: Family::default(),
            rate_limited: Family::default(),
            overflows: Family::default(),
            cancelled: Family::default(),
            ejections: Family::default(),
            failures: Family::default(),
            l4_connections: Family::default(),
            active_requests: Gauge::default(),
            common,
            registry: Registry::default(),
        };
        registry.register("requests", "HTTP requests handled", m.requests.clone());
        registry.register(
            "request_duration_seconds",
            "Time from request headers to the end of the response",
            m.duration.clone(),
        );
        registry.register(
            "request_bytes",
            "Request body sizes",
            m.request_bytes.clone(),
        );
        registry.register(
            "response_bytes",
            "Response body sizes",
            m.response_bytes.clone(),
        );
        registry.register(
            "authorization_denials",
            "Requests denied by authorization policy",
            m.denials.clone(),
        );
        registry.register("retries", "Upstream retries", m.retries.clone());
        registry.register(
            "rate_limited",
            "Requests answered 429 by a local rate limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "circuit_breaker_overflows",
            "Requests answered 503 because a limit was reached",
            m.overflows.clone(),
        );
        registry.register(
            "requests_cancelled",
            "Requests the client abandoned before the response headers",
            m.cancelled.clone(),
        );
        registry.register(
            "outlier_ejections",
            "Endpoints ejected for consecutive failures",
            m.ejections.clone(),
        );
        registry.register(
            "upstream_failures",
            "Upstream attempts that failed before a response, by reason",
            m.failures.clone(),
        );
        registry.register(
            "tcp_passthrough_connections",
            "Non-HTTP connections carried at L4",
            m.l4_connections.clone(),
        );
        registry.register(
            "active_requests",
            "Requests being proxied now",
            m.active_requests.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    pub fn encode(&self) -> String {
        encode(&self.registry)
    }

    /// Counts a request or connection a circuit-breaker limit turned away.
    pub fn overflowed(&self, destination_service: String, limit: crate::resilience::Overflow) {
        self.overflows
            .get_or_create(&OverflowLabels {
                destination_service,
                limit: limit.as_str(),
            })
            .inc();
    }

    /// Counts a request or tunnel `policy` denied for `destination_service`.
    pub fn denied(&self, policy: &str, destination_service: String) {
        self.denials
            .get_or_create(&DenialLabels {
                policy: policy.to_owned(),
                destination_service,
            })
            .inc();
    }

    pub fn failure(&self, reason: &str) {
        self.failures
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// Counts one more for `destination_service` in a per-service family.
pub fn count_for(family: &Family<ServiceOnly, Counter>, destination_service: String) {
    family
        .get_or_create(&ServiceOnly {
            destination_service,
        })
        .inc();
}

pub fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

pub fn response_class(code: u16) -> &'static str {
    match code {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}
