//! The last stage: what the stages noted about a request ([`Ledger`]) is
//! reported once its response body ends, or the client goes away: the
//! request metrics, its span and its access-log line. A request the client
//! abandons before its response headers is counted as cancelled
//! ([`InFlight`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::request::Parts;
use http::{header, Method, Response};
use tracing::debug;

use super::head::{authority_of, is_grpc, path_and_query};
use crate::body::{counted, Body};
use crate::context::{ConnCtx, Endpoint, Proto};
use crate::metrics::{
    count_for, method_label, response_class, Metrics, RequestLabels, ServiceLabels,
};
use crate::telemetry::{AccessLog, AccessRecord, SpanExporter, SpanRecord, TraceContext};

/// What one request accumulated for its metrics and log line.
pub struct Ledger {
    pub start: Instant,
    start_unix_ms: u64,
    method: Method,
    path: String,
    authority: String,
    pub grpc: bool,
    pub route: String,
    pub policy: String,
    pub flag: &'static str,
    pub attempts: u32,
    pub upstream: Option<Endpoint>,
    pub trace: TraceContext,
    user_agent: String,
    /// Request body bytes, counted as they are read.
    pub request_bytes: Arc<AtomicU64>,
}

impl Ledger {
    /// Opened from the client's request head, before any stage.
    pub fn new(parts: &Parts) -> Self {
        Self {
            start: Instant::now(),
            start_unix_ms: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            method: parts.method.clone(),
            path: path_and_query(parts),
            authority: authority_of(parts),
            grpc: is_grpc(&parts.headers),
            route: String::new(),
            policy: String::new(),
            flag: "-",
            attempts: 0,
            upstream: None,
            trace: TraceContext::from_headers(&parts.headers),
            user_agent: parts
                .headers
                .get(header::USER_AGENT)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_owned(),
            request_bytes: Arc::default(),
        }
    }
}

/// A request being proxied (`weft_active_requests`). Dropped before
/// [`InFlight::answered`] (the client went away and hyper dropped the
/// handler), it counts the request as cancelled: `weft_requests_cancelled`.
pub struct InFlight {
    metrics: Option<Arc<Metrics>>,
    service: String,
}

impl InFlight {
    pub fn start(metrics: &Arc<Metrics>, service: &str) -> Self {
        metrics.active_requests.inc();
        Self {
            metrics: Some(metrics.clone()),
            service: service.to_owned(),
        }
    }

    /// The response headers are ready.
    pub fn answered(mut self) {
        if let Some(m) = self.metrics.take() {
            m.active_requests.dec();
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(m) = self.metrics.take() {
            m.active_requests.dec();
            count_for(&m.cancelled, std::mem::take(&mut self.service));
            debug!(
                component = "waypoint",
                "request cancelled by the client before its response"
            );
        }
    }
}

/// Where a finished request is reported.
#[derive(Clone)]
pub struct Reporters {
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
    pub spans: SpanExporter,
}

/// Wraps the response body: when it ends (or the client goes away) the
/// request is counted and logged.
pub fn finish(
    report: &Reporters,
    ctx: &ConnCtx,
    ledger: Ledger,
    response: Response<Body>,
) -> Response<Body> {
    // A gRPC local reply is a 200 whose real status rides in this header.
    let code = response
        .headers()
        .get("x-weft-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok())
        .unwrap_or(response.status().as_u16());
    let (mut head, body) = response.into_parts();
    head.headers.remove("x-weft-status");
    let done = Done {
        report: report.clone(),
        labels: request_labels(ctx, &ledger, code),
        src_address: ctx.src_ip.to_string(),
        src_workload: if ctx.src_workload.is_empty() {
            String::new()
        } else {
            format!("{}/{}", ctx.src_namespace, ctx.src_workload)
        },
        ledger,
        code,
    };
    let body = counted(body, move |sent, _completed| done.report(sent));
    Response::from_parts(head, body)
}

fn request_labels(ctx: &ConnCtx, ledger: &Ledger, code: u16) -> RequestLabels {
    let upstream = ledger.upstream.as_ref();
    RequestLabels {
        reporter: "waypoint",
        source_workload: ctx.src_workload.clone(),
        source_workload_namespace: ctx.src_namespace.clone(),
        source_principal: ctx.derived.peer.clone(),
        destination_service: ctx.derived.service.clone(),
        destination_workload: upstream.map(|e| e.workload.to_string()).unwrap_or_default(),
        destination_workload_namespace: upstream
            .map(|e| e.namespace.to_string())
            .unwrap_or_default(),
        request_protocol: if ledger.grpc {
            "grpc"
        } else {
            match ctx.proto {
                Proto::Http1 => "http/1.1",
                Proto::Http2 => "http/2",
            }
        },
        request_method: method_label(&ledger.method),
        response_code: code,
        route: ledger.route.clone(),
    }
}

/// A request whose response is under way, waiting for its body's end.
struct Done {
    report: Reporters,
    labels: RequestLabels,
    src_address: String,
    src_workload: String,
    ledger: Ledger,
    code: u16,
}

impl Done {
    fn report(self, sent: u64) {
        let elapsed = self.ledger.start.elapsed();
        let received = self.ledger.request_bytes.load(Ordering::Relaxed);
        self.count(elapsed, received, sent);
        if self.report.spans.enabled() {
            self.export_span(elapsed);
        }
        if self.report.access_log.enabled() {
            self.log(elapsed, received, sent);
        }
    }

    fn count(&self, elapsed: Duration, received: u64, sent: u64) {
        let m = &self.report.metrics;
        m.requests.get_or_create(&self.labels).inc();
        let svc = ServiceLabels {
            destination_service: self.labels.destination_service.clone(),
            response_class: response_class(self.code),
        };
        m.duration
            .get_or_create(&svc)
            .observe(elapsed.as_secs_f64());
        m.request_bytes.get_or_create(&svc).observe(received as f64);
        m.response_bytes.get_or_create(&svc).observe(sent as f64);
    }

    fn upstream_host(&self) -> String {
        self.ledger
            .upstream
            .as_ref()
            .map(|e| e.addr.to_string())
            .unwrap_or_default()
    }

    fn export_span(&self, elapsed: Duration) {
        let l = &self.ledger;
        let end = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        self.report.spans.export(SpanRecord {
            trace: l.trace.clone(),
            name: format!("{} {}", l.method, self.labels.destination_service),
            start_unix_ns: end.saturating_sub(elapsed.as_nanos() as u64),
            end_unix_ns: end,
            status_code: self.code,
            attributes: vec![
                ("http.request.method", l.method.to_string()),
                ("url.path", l.path.clone()),
                (
                    "weft.source_principal",
                    self.labels.source_principal.clone(),
                ),
                ("weft.route", l.route.clone()),
                ("server.address", self.upstream_host()),
            ],
        });
    }

    fn log(self, elapsed: Duration, received: u64, sent: u64) {
        let upstream_host = self.upstream_host();
        let Done {
            report,
            labels,
            src_address,
            src_workload,
            ledger: l,
            code,
        } = self;
        report.access_log.log(AccessRecord {
            start_unix_ms: l.start_unix_ms,
            duration_ms: elapsed.as_secs_f64() * 1000.0,
            method: l.method.to_string(),
            path: l.path,
            authority: l.authority,
            protocol: labels.request_protocol,
            response_code: code,
            response_flags: l.flag,
            bytes_received: received,
            bytes_sent: sent,
            attempts: l.attempts,
            source_principal: labels.source_principal,
            source_address: src_address,
            source_workload: src_workload,
            destination_service: labels.destination_service,
            upstream_host,
            upstream_workload: labels.destination_workload,
            route: l.route,
            policy: l.policy,
            trace_id: l.trace.trace_id_hex(),
            user_agent: l.user_agent,
        });
    }
}
