//! One HTTP request through the waypoint, and the L4 fallback.
//!
//! Order per request: L7 authorization (403), local rate limit (429),
//! routing (404/500/redirect), fault injection, circuit breaker (503), then
//! attempts: pick an endpoint by least-request among those not ejected,
//! send with the per-try timeout, and retry what the route's retry policy
//! and the service's retry budget allow. The whole exchange up to the
//! response headers is bounded by the route's request timeout (504).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::request::Parts;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tracing::{debug, info};

use crate::body;
use crate::metrics::{
    method_label, response_class, DenialLabels, RequestLabels, ServiceLabels, ServiceOnly,
};
use crate::plan::{self, Backend, Plan, Verdict};
use crate::proxy::{counted, set_header, ConnCtx, Proxy};
use crate::resilience_registry::Outcome;
use crate::state::Compiled;
use crate::telemetry::{AccessRecord, SpanRecord, TraceContext};
use crate::upstream::{Body, Endpoint, Proto, UpstreamError};

/// Request bodies up to this size are buffered so they can be retried and
/// mirrored; larger or unsized ones stream through in one attempt.
const MAX_REPLAY_BODY: u64 = 64 * 1024;

/// Where the client's tunnel pointed.
#[derive(Clone, Debug)]
pub enum Target {
    Service {
        namespace: String,
        name: String,
        port: u16,
    },
    Workload(Endpoint),
}

impl Target {
    pub fn service_label(&self) -> String {
        match self {
            Target::Service {
                namespace, name, ..
            } => format!("{name}.{namespace}"),
            Target::Workload(ep) => format!("{}.{}", ep.workload, ep.namespace),
        }
    }
}

pub struct Downstream {
    pub ctx: Arc<ConnCtx>,
}

/// Hop-by-hop headers (RFC 9110 7.6.1) never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<String> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|s| s.trim().to_ascii_lowercase())
        .filter(|s| !s.is_empty())
        .collect();
    for n in named {
        h.remove(n.as_str());
    }
    for n in HOP_BY_HOP {
        // gRPC needs "te: trailers" end to end.
        if n == "te"
            && h.get("te")
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"))
        {
            continue;
        }
        h.remove(n);
    }
}

fn is_grpc(h: &HeaderMap) -> bool {
    h.get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

/// Counts a request the client abandoned before its response headers (the
/// handler future is dropped): `weft_requests_total` with response code 0.
struct CancelledGuard {
    proxy: Option<Arc<Proxy>>,
    service: String,
}

impl Drop for CancelledGuard {
    fn drop(&mut self) {
        if let Some(proxy) = self.proxy.take() {
            proxy.metrics.active_requests.dec();
            proxy
                .metrics
                .cancelled
                .get_or_create(&ServiceOnly {
                    destination_service: std::mem::take(&mut self.service),
                })
                .inc();
            debug!(
                component = "waypoint",
                "request cancelled by the client before its response"
            );
        }
    }
}

/// What one request accumulated for its metrics and log line.
struct Ledger {
    start: Instant,
    start_unix_ms: u64,
    method: Method,
    path: String,
    authority: String,
    grpc: bool,
    route: String,
    policy: String,
    flag: &'static str,
    attempts: u32,
    upstream: Option<Endpoint>,
    trace: TraceContext,
    user_agent: String,
    request_bytes: Arc<std::sync::atomic::AtomicU64>,
}

pub async fn handle(proxy: Arc<Proxy>, d: Downstream, req: Request<Incoming>) -> Response<Body> {
    let ctx = d.ctx;
    let snap = proxy.state.load();
    proxy.metrics.active_requests.inc();
    let mut cancelled = CancelledGuard {
        proxy: Some(proxy.clone()),
        service: ctx.derived.service.clone(),
    };
    let (mut parts, incoming) = req.into_parts();
    let trace = TraceContext::from_headers(&parts.headers);
    let mut ledger = Ledger {
        start: Instant::now(),
        start_unix_ms: SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        method: parts.method.clone(),
        path: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into()),
        authority: authority_of(&parts),
        grpc: is_grpc(&parts.headers),
        route: String::new(),
        policy: String::new(),
        flag: "-",
        attempts: 0,
        upstream: None,
        trace,
        user_agent: parts
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned(),
        request_bytes: Arc::default(),
    };
    let response = respond(&proxy, &snap, &ctx, &mut parts, incoming, &mut ledger).await;
    cancelled.proxy = None;
    proxy.metrics.active_requests.dec();
    finish(&proxy, &ctx, ledger, response)
}

/// The answer, before metrics wrap its body.
async fn respond(
    proxy: &Arc<Proxy>,
    snap: &Arc<Compiled>,
    ctx: &ConnCtx,
    parts: &mut Parts,
    incoming: Incoming,
    ledger: &mut Ledger,
) -> Response<Body> {
    // L7 authorization.
    if let Target::Service {
        namespace, name, ..
    } = &ctx.target
    {
        let decision = snap.authz.check_http(
            namespace,
            name,
            &proxy.name,
            &ctx.peer,
            ctx.src_ip,
            ctx.original_dst.port(),
            &parts.method,
            parts.uri.path(),
            &parts.headers,
        );
        if let Err(policy) = decision {
            proxy
                .metrics
                .denials
                .get_or_create(&DenialLabels {
                    policy: policy.clone(),
                    destination_service: ctx.derived.service.clone(),
                })
                .inc();
            info!(component = "authz", policy, src = %ctx.peer, method = %parts.method, path = parts.uri.path(), "request denied by policy");
            ledger.policy = policy;
            ledger.flag = "denied";
            return local_reply(StatusCode::FORBIDDEN, ledger.grpc, "RBAC: access denied\n");
        }
    }

    let verdict = plan::plan(snap, &ctx.target, parts);
    let plan = match verdict {
        Verdict::Respond {
            status,
            headers,
            flag,
            route,
        } => {
            ledger.flag = flag;
            ledger.route = route;
            let mut r = local_reply(status, ledger.grpc, "");
            r.headers_mut().extend(headers);
            return r;
        }
        Verdict::Forward(p) => p,
    };
    ledger.route = plan.route.clone();
    let res = match &plan.backend {
        Backend::Service {
            namespace, name, ..
        } => proxy.resilience.for_service(snap, namespace, name),
        Backend::Workload(_) => proxy.resilience.default_service(),
    };

    // Local rate limit.
    if let Err(retry_after) = res.rate_limit(&parts.headers, &ctx.derived.peer) {
        proxy
            .metrics
            .rate_limited
            .get_or_create(&ServiceOnly {
                destination_service: plan.backend.label(),
            })
            .inc();
        ledger.flag = "rate_limited";
        let mut r = local_reply(StatusCode::TOO_MANY_REQUESTS, ledger.grpc, "rate limited\n");
        let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
        set_header(r.headers_mut(), "retry-after", &secs.to_string());
        return r;
    }

    // Circuit breaker.
    let _permit = match res.start_request() {
        Ok(p) => p,
        Err(_) => {
            proxy
                .metrics
                .overflows
                .get_or_create(&ServiceOnly {
                    destination_service: plan.backend.label(),
                })
                .inc();
            ledger.flag = "overflow";
            let mut r = local_reply(
                StatusCode::SERVICE_UNAVAILABLE,
                ledger.grpc,
                "upstream overflow\n",
            );
            set_header(r.headers_mut(), "x-weft-overflow", "true");
            return r;
        }
    };

    // Protocol upgrades (WebSocket, ...) on HTTP/1.1: the headers go
    // through and a 101 joins both connections. `h2c` is not one of them:
    // RFC 9113 deprecates it, and the request is answered in HTTP/1.1.
    let upgrade = upgrade_of(parts, ctx.proto);
    let downstream_upgrade = upgrade
        .as_ref()
        .and_then(|_| parts.extensions.remove::<hyper::upgrade::OnUpgrade>());
    prepare_upstream_head(parts, ctx, &plan, ledger);
    if let Some(u) = &upgrade {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        parts.headers.insert(header::UPGRADE, u.clone());
    }

    // Buffer small bodies so they can be retried and mirrored.
    let sized = http_body::Body::size_hint(&incoming).exact();
    let (replay, mut streaming): (Option<Bytes>, Option<Body>) = match sized {
        Some(n) if n <= MAX_REPLAY_BODY => match incoming.collect().await {
            Ok(c) => {
                let b = c.to_bytes();
                ledger
                    .request_bytes
                    .fetch_add(b.len() as u64, std::sync::atomic::Ordering::Relaxed);
                (Some(b), None)
            }
            Err(e) => {
                ledger.flag = "downstream_reset";
                debug!(component = "waypoint", error = %e, "client body failed");
                return local_reply(
                    StatusCode::BAD_REQUEST,
                    ledger.grpc,
                    "request body failed\n",
                );
            }
        },
        _ => {
            let bytes = ledger.request_bytes.clone();
            (
                None,
                Some(body::boxed(crate::body::Counted::new(incoming, bytes))),
            )
        }
    };

    if let Some(b) = &replay {
        for mirror in plan.mirrors() {
            spawn_mirror(proxy.clone(), snap.clone(), ctx, parts, b.clone(), mirror);
        }
    }

    let attempts = async {
        let max_attempts = 1 + plan.retry.as_ref().map(|r| r.attempts).unwrap_or(0);
        let mut last: Option<Response<Body>> = None;
        for attempt in 0..max_attempts {
            let body = match (&replay, streaming.take()) {
                (Some(b), _) => body::full(b.clone()),
                (None, Some(s)) => s,
                // A streamed body cannot be sent twice.
                (None, None) => break,
            };
            if attempt > 0 {
                if !res.try_retry() {
                    debug!(component = "waypoint", "retry budget exhausted");
                    break;
                }
                proxy
                    .metrics
                    .retries
                    .get_or_create(&ServiceOnly {
                        destination_service: plan.backend.label(),
                    })
                    .inc();
                tokio::time::sleep(res.backoff(plan.retry.as_ref(), attempt)).await;
            }
            ledger.attempts = attempt + 1;
            // Fault injection, per attempt: an injected abort is an upstream
            // failure the retry policy may retry (a delay delays the attempt).
            let fault = res.fault();
            if let Some(delay) = fault.delay {
                tokio::time::sleep(delay).await;
            }
            if let Some(code) = fault.abort {
                let outcome = Outcome::Status(code);
                if replay.is_none() {
                    // Not sent: the streamed body is still whole.
                    streaming = Some(body);
                }
                let retryable = attempt + 1 < max_attempts
                    && res.is_retryable(&parts.method, &outcome, plan.retry.as_ref());
                if retryable {
                    continue;
                }
                ledger.flag = "fault_abort";
                let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                return local_reply(status, ledger.grpc, "fault filter abort\n");
            }
            let endpoints = match &plan.backend {
                Backend::Service {
                    namespace,
                    name,
                    port,
                } => snap.endpoints(namespace, name, *port),
                Backend::Workload(ep) => Arc::from([ep.clone()]),
            };
            let Some((ep, _inflight)) = res.pick(&endpoints) else {
                ledger.flag = "no_healthy_upstream";
                return local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ledger.grpc,
                    "no healthy upstream\n",
                );
            };
            ledger.upstream = Some(ep.clone());
            // The last attempt takes the head; earlier ones send a copy.
            let head = if attempt + 1 == max_attempts {
                std::mem::replace(&mut *parts, Request::new(()).into_parts().0)
            } else {
                clone_head(parts)
            };
            let mut req = Request::from_parts(head, body);
            *req.version_mut() = match ctx.proto {
                Proto::Http1 => http::Version::HTTP_11,
                Proto::Http2 => http::Version::HTTP_2,
            };
            let sent = proxy
                .upstream
                .send(&ep, ctx.proto, req, &ctx.derived.tunnel);
            let result = match plan.try_timeout {
                Some(t) => match tokio::time::timeout(t, sent).await {
                    Ok(r) => r.map_err(AttemptError::Upstream),
                    Err(_) => Err(AttemptError::Timeout),
                },
                None => sent.await.map_err(AttemptError::Upstream),
            };
            let outcome = match &result {
                Ok(resp) => Outcome::Status(resp.status().as_u16()),
                Err(AttemptError::Upstream(UpstreamError::Connect(..))) => Outcome::ConnectFailed,
                Err(AttemptError::Upstream(UpstreamError::Reset(_))) => Outcome::Reset,
                Err(AttemptError::Timeout) => Outcome::Timeout,
            };
            if res.record(&ep, &outcome) {
                proxy
                    .metrics
                    .ejections
                    .get_or_create(&ServiceOnly {
                        destination_service: plan.backend.label(),
                    })
                    .inc();
                info!(component = "outlier", endpoint = %ep.addr, service = %plan.backend.label(), "endpoint ejected after consecutive failures");
            }
            let retryable = attempt + 1 < max_attempts
                && (replay.is_some() || matches!(outcome, Outcome::ConnectFailed))
                && res.is_retryable(&parts.method, &outcome, plan.retry.as_ref());
            match result {
                Ok(resp) => {
                    if retryable {
                        last = Some(resp);
                        continue;
                    }
                    return resp;
                }
                Err(e) => {
                    proxy.metrics.failure(e.reason());
                    debug!(component = "waypoint", endpoint = %ep.addr, error = %e, "upstream attempt failed");
                    if retryable {
                        last = None;
                        continue;
                    }
                    ledger.flag = e.flag();
                    return match e {
                        AttemptError::Timeout => local_reply(
                            StatusCode::GATEWAY_TIMEOUT,
                            ledger.grpc,
                            "upstream request timeout\n",
                        ),
                        AttemptError::Upstream(UpstreamError::Connect(..)) => local_reply(
                            StatusCode::SERVICE_UNAVAILABLE,
                            ledger.grpc,
                            "upstream connect error\n",
                        ),
                        AttemptError::Upstream(UpstreamError::Reset(_)) => local_reply(
                            StatusCode::BAD_GATEWAY,
                            ledger.grpc,
                            "upstream reset before response\n",
                        ),
                    };
                }
            }
        }
        match last {
            Some(r) => r,
            None => {
                ledger.flag = "retries_exhausted";
                local_reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    ledger.grpc,
                    "upstream unavailable\n",
                )
            }
        }
    };
    let mut response = match plan.request_timeout {
        Some(t) => match tokio::time::timeout(t, attempts).await {
            Ok(r) => r,
            Err(_) => {
                ledger.flag = "request_timeout";
                local_reply(
                    StatusCode::GATEWAY_TIMEOUT,
                    ledger.grpc,
                    "request timeout\n",
                )
            }
        },
        None => attempts.await,
    };
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        match (downstream_upgrade, upgrade) {
            (Some(down), Some(u)) => {
                let up = hyper::upgrade::on(&mut response);
                tokio::spawn(join_upgraded(down, up));
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                response.headers_mut().insert(header::UPGRADE, u);
                return response;
            }
            _ => {
                ledger.flag = "bad_upgrade";
                return local_reply(
                    StatusCode::BAD_GATEWAY,
                    ledger.grpc,
                    "upstream switched protocols unasked\n",
                );
            }
        }
    }
    strip_hop_by_hop(response.headers_mut());
    plan.apply_response_headers(response.headers_mut());
    // The request timeout runs on until the response body ends.
    if let Some(t) = plan.request_timeout {
        let remaining = t.saturating_sub(ledger.start.elapsed());
        response = response.map(|b| body::boxed(body::Deadline::new(b, remaining)));
    }
    response
}

#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("{0}")]
    Upstream(UpstreamError),
    #[error("per-try timeout")]
    Timeout,
}

impl AttemptError {
    fn reason(&self) -> &'static str {
        match self {
            AttemptError::Upstream(UpstreamError::Connect(..)) => "connect",
            AttemptError::Upstream(UpstreamError::Reset(_)) => "reset",
            AttemptError::Timeout => "timeout",
        }
    }

    fn flag(&self) -> &'static str {
        match self {
            AttemptError::Upstream(UpstreamError::Connect(..)) => "upstream_connect_failure",
            AttemptError::Upstream(UpstreamError::Reset(_)) => "upstream_reset",
            AttemptError::Timeout => "upstream_timeout",
        }
    }
}

/// The `Upgrade` a request asks for, if it is one we carry (HTTP/1.1,
/// `Connection: upgrade`, not `h2c`).
fn upgrade_of(parts: &Parts, proto: Proto) -> Option<HeaderValue> {
    if proto != Proto::Http1 {
        return None;
    }
    let wants = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let u = parts.headers.get(header::UPGRADE)?;
    (wants && !u.as_bytes().eq_ignore_ascii_case(b"h2c")).then(|| u.clone())
}

/// Copies bytes between the two upgraded connections until both close.
async fn join_upgraded(down: hyper::upgrade::OnUpgrade, up: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(down, up) {
        Ok((d, u)) => {
            let mut d = TokioIo::new(d);
            let mut u = TokioIo::new(u);
            if let Err(e) = weft_hbone::copy_bidirectional(&mut d, &mut u).await {
                debug!(component = "waypoint", error = %e, "upgraded connection ended with an error");
            }
        }
        Err(e) => debug!(component = "waypoint", error = %e, "upgrade failed"),
    }
}

fn authority_of(parts: &Parts) -> String {
    parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

/// Filters, rewrite, trace context and hop-by-hop cleanup on the request
/// head that goes upstream.
fn prepare_upstream_head(parts: &mut Parts, ctx: &ConnCtx, plan: &Plan, ledger: &Ledger) {
    strip_hop_by_hop(&mut parts.headers);
    plan.apply_request_headers(&mut parts.headers);
    if let Some(authority) = &plan.rewrite_authority {
        if let Ok(v) = HeaderValue::from_str(authority) {
            parts.headers.insert(header::HOST, v);
        }
    }
    let authority = plan
        .rewrite_authority
        .clone()
        .unwrap_or_else(|| authority_of(parts));
    let path = plan.rewrite_path_and_query.clone().unwrap_or_else(|| {
        parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_else(|| "/".into())
    });
    // HTTP/1.1 upstream: origin-form; HTTP/2: scheme and authority too.
    let uri = match ctx.proto {
        Proto::Http1 => path.parse::<Uri>().ok(),
        Proto::Http2 => format!("http://{authority}{path}").parse::<Uri>().ok(),
    };
    if let Some(uri) = uri {
        parts.uri = uri;
    }
    if ctx.proto == Proto::Http1 && !parts.headers.contains_key(header::HOST) {
        if let Ok(v) = HeaderValue::from_str(&authority) {
            parts.headers.insert(header::HOST, v);
        }
    }
    set_header(
        &mut parts.headers,
        "traceparent",
        &ledger.trace.traceparent(),
    );
    if let Some(xfcc) = &ctx.derived.xfcc {
        parts
            .headers
            .insert("x-forwarded-client-cert", xfcc.clone());
    }
}

fn clone_head(parts: &Parts) -> Parts {
    let mut b = Request::builder()
        .method(parts.method.clone())
        .uri(parts.uri.clone())
        .version(parts.version);
    if let Some(h) = b.headers_mut() {
        *h = parts.headers.clone();
    }
    let (p, ()) = b
        .body(())
        .map(Request::into_parts)
        .unwrap_or_else(|_| Request::new(()).into_parts());
    p
}

fn spawn_mirror(
    proxy: Arc<Proxy>,
    snap: Arc<Compiled>,
    ctx: &ConnCtx,
    parts: &Parts,
    body: Bytes,
    mirror: weft_api::model::BackendRef,
) {
    let head = clone_head(parts);
    let proto = ctx.proto;
    let tunnel = ctx.derived.tunnel.clone();
    tokio::spawn(async move {
        let eps = snap.endpoints(&mirror.namespace, &mirror.name, mirror.port);
        let Some(ep) = eps.get(rand::random::<usize>() % eps.len().max(1)).cloned() else {
            return;
        };
        let req = Request::from_parts(head, body::full(body));
        match tokio::time::timeout(
            Duration::from_secs(30),
            proxy.upstream.send(&ep, proto, req, &tunnel),
        )
        .await
        {
            Ok(Ok(resp)) => {
                // Drain so the connection can be reused.
                let _ = resp.into_body().collect().await;
            }
            Ok(Err(e)) => debug!(component = "mirror", error = %e, "mirror request failed"),
            Err(_) => debug!(component = "mirror", "mirror request timed out"),
        }
    });
}

/// A response the waypoint makes itself. gRPC clients get a trailers-only
/// response with the matching `grpc-status`.
pub fn local_reply(status: StatusCode, grpc: bool, text: &'static str) -> Response<Body> {
    if grpc && status != StatusCode::OK && !status.is_redirection() {
        let code = match status.as_u16() {
            400 => 13,
            401 => 16,
            403 => 7,
            404 => 12,
            429 => 8,
            502..=504 => 14,
            _ => 2,
        };
        let mut r = Response::new(body::empty());
        set_header(r.headers_mut(), "content-type", "application/grpc");
        set_header(r.headers_mut(), "grpc-status", &code.to_string());
        set_header(r.headers_mut(), "grpc-message", text.trim());
        set_header(r.headers_mut(), "x-weft-status", status.as_str());
        return r;
    }
    let mut r = Response::new(body::full(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    if !text.is_empty() {
        set_header(r.headers_mut(), "content-type", "text/plain");
    }
    r
}

/// Wraps the response body: when it ends (or the client goes away) the
/// request is counted and logged.
fn finish(
    proxy: &Arc<Proxy>,
    ctx: &ConnCtx,
    ledger: Ledger,
    response: Response<Body>,
) -> Response<Body> {
    let status = response.status().as_u16();
    let grpc_status = response
        .headers()
        .get("x-weft-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u16>().ok());
    let code = grpc_status.unwrap_or(status);
    let proxy = proxy.clone();
    let service = ctx.derived.service.clone();
    let labels = RequestLabels {
        reporter: "waypoint",
        source_workload: ctx.src_workload.clone(),
        source_workload_namespace: ctx.src_namespace.clone(),
        source_principal: ctx.derived.peer.clone(),
        destination_service: service.clone(),
        destination_workload: ledger
            .upstream
            .as_ref()
            .map(|e| e.workload.to_string())
            .unwrap_or_default(),
        destination_workload_namespace: ledger
            .upstream
            .as_ref()
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
    };
    let src = SocketAddr::new(ctx.src_ip, 0).ip().to_string();
    let src_workload = if ctx.src_workload.is_empty() {
        String::new()
    } else {
        format!("{}/{}", ctx.src_namespace, ctx.src_workload)
    };
    let (mut head, body) = response.into_parts();
    head.headers.remove("x-weft-status");
    let on_end = move |sent: u64, _completed: bool| {
        let m = &proxy.metrics;
        m.requests.get_or_create(&labels).inc();
        let svc = ServiceLabels {
            destination_service: service.clone(),
            response_class: response_class(code),
        };
        let elapsed = ledger.start.elapsed();
        m.duration
            .get_or_create(&svc)
            .observe(elapsed.as_secs_f64());
        let received = ledger
            .request_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        m.request_bytes.get_or_create(&svc).observe(received as f64);
        m.response_bytes.get_or_create(&svc).observe(sent as f64);
        if proxy.spans.enabled() {
            let end = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            proxy.spans.export(SpanRecord {
                trace: ledger.trace.clone(),
                name: format!("{} {}", ledger.method, service),
                start_unix_ns: end.saturating_sub(elapsed.as_nanos() as u64),
                end_unix_ns: end,
                status_code: code,
                attributes: vec![
                    ("http.request.method", ledger.method.to_string()),
                    ("url.path", ledger.path.clone()),
                    ("weft.source_principal", labels.source_principal.clone()),
                    ("weft.route", ledger.route.clone()),
                    (
                        "server.address",
                        ledger
                            .upstream
                            .as_ref()
                            .map(|e| e.addr.to_string())
                            .unwrap_or_default(),
                    ),
                ],
            });
        }
        if proxy.access_log.enabled() {
            proxy.access_log.log(AccessRecord {
                start_unix_ms: ledger.start_unix_ms,
                duration_ms: elapsed.as_secs_f64() * 1000.0,
                method: ledger.method.to_string(),
                path: ledger.path,
                authority: ledger.authority,
                protocol: labels.request_protocol,
                response_code: code,
                response_flags: ledger.flag,
                bytes_received: received,
                bytes_sent: sent,
                attempts: ledger.attempts,
                source_principal: labels.source_principal.clone(),
                source_address: src,
                source_workload: src_workload,
                destination_service: service,
                upstream_host: ledger
                    .upstream
                    .as_ref()
                    .map(|e| e.addr.to_string())
                    .unwrap_or_default(),
                upstream_workload: labels.destination_workload.clone(),
                route: ledger.route,
                policy: ledger.policy,
                trace_id: ledger.trace.trace_id_hex(),
                user_agent: ledger.user_agent,
            });
        }
    };
    let body = counted(body, on_end);
    Response::from_parts(head, body)
}

/// A connection that is not HTTP: L4 policy, then bytes to an endpoint.
pub async fn l4<S>(proxy: Arc<Proxy>, ctx: ConnCtx, mut io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let snap = proxy.state.load();
    let service = ctx.derived.service.clone();
    let endpoints = match &ctx.target {
        Target::Service {
            namespace,
            name,
            port,
        } => {
            if let Err(policy) = snap.authz.check_l4(
                namespace,
                name,
                &proxy.name,
                &ctx.peer,
                ctx.src_ip,
                ctx.original_dst.port(),
            ) {
                proxy
                    .metrics
                    .denials
                    .get_or_create(&DenialLabels {
                        policy: policy.clone(),
                        destination_service: service,
                    })
                    .inc();
                info!(component = "authz", policy, src = %ctx.peer, "L4 connection denied by policy");
                return;
            }
            snap.endpoints(namespace, name, *port)
        }
        Target::Workload(ep) => Arc::from([ep.clone()]),
    };
    let res = proxy.resilience.default_service();
    let Some((ep, _inflight)) = res.pick(&endpoints) else {
        proxy.metrics.failure("no_healthy_upstream");
        return;
    };
    let mut upstream = match proxy
        .upstream
        .open_stream(&ep, ctx.derived.tunnel.clone())
        .await
    {
        Ok(s) => s,
        Err(e) => {
            proxy.metrics.failure("connect");
            info!(component = "waypoint", endpoint = %ep.addr, error = %e, "L4 upstream connect failed");
            return;
        }
    };
    proxy
        .metrics
        .l4_connections
        .get_or_create(&ServiceOnly {
            destination_service: service,
        })
        .inc();
    if let Err(e) = weft_hbone::copy_bidirectional(&mut io, &mut upstream).await {
        debug!(component = "waypoint", error = %e, "L4 connection ended with an error");
    }
}
