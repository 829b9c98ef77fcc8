//! Access logs (one JSON line per request) and W3C trace context.

use std::io::Write;
use std::sync::Arc;

use http::HeaderMap;
use serde::Serialize;
use tokio::sync::mpsc;

/// One request, as logged.
#[derive(Debug, Serialize)]
pub struct AccessRecord {
    pub start_unix_ms: u64,
    pub duration_ms: f64,
    pub method: String,
    pub path: String,
    pub authority: String,
    pub protocol: &'static str,
    pub response_code: u16,
    /// Why the waypoint answered itself (`denied`, `rate_limited`,
    /// `no_route`, `fault_abort`, `overflow`, `upstream_timeout`, ...).
    pub response_flags: &'static str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub attempts: u32,
    pub source_principal: String,
    pub source_address: String,
    pub source_workload: String,
    pub destination_service: String,
    pub upstream_host: String,
    pub upstream_workload: String,
    pub route: String,
    pub policy: String,
    pub trace_id: String,
    pub user_agent: String,
}

/// Writes access records as JSON lines on a dedicated thread, so a slow
/// stdout never stalls the proxy; when the queue is full a record is
/// dropped and counted rather than blocking.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<mpsc::Sender<AccessRecord>>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl AccessLog {
    pub fn disabled() -> Self {
        Self {
            tx: None,
            dropped: Arc::default(),
        }
    }

    /// Logs to `out` (stdout in production).
    pub fn to_writer(mut out: impl Write + Send + 'static) -> Self {
        let (tx, mut rx) = mpsc::channel::<AccessRecord>(8192);
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                while let Some(r) = rx.blocking_recv() {
                    if let Ok(line) = serde_json::to_string(&r) {
                        let _ = writeln!(out, "{line}");
                    }
                    if rx.is_empty() {
                        let _ = out.flush();
                    }
                }
            })
            .ok();
        Self {
            tx: Some(tx),
            dropped: Arc::default(),
        }
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn log(&self, r: AccessRecord) {
        if let Some(tx) = &self.tx {
            if tx.try_send(r).is_err() {
                self.dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// W3C trace context of one request: the trace it belongs to and this
/// hop's span.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The caller's span, if the request carried one.
    pub parent_span_id: Option<[u8; 8]>,
    /// The span this waypoint adds (sent upstream as the parent).
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceContext {
    /// Continues the trace in `traceparent`, or starts one.
    pub fn from_headers(h: &HeaderMap) -> Self {
        let span_id = random_nonzero::<8>();
        if let Some((trace_id, parent, flags)) = h
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
            .and_then(parse_traceparent)
        {
            return Self {
                trace_id,
                parent_span_id: Some(parent),
                span_id,
                sampled: flags & 1 == 1,
            };
        }
        Self {
            trace_id: random_nonzero::<16>(),
            parent_span_id: None,
            span_id,
            sampled: true,
        }
    }

    pub fn traceparent(&self) -> String {
        format!(
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            u8::from(self.sampled)
        )
    }

    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }
}

fn random_nonzero<const N: usize>() -> [u8; N] {
    loop {
        let b: [u8; N] = std::array::from_fn(|_| rand::random());
        if b.iter().any(|x| *x != 0) {
            return b;
        }
    }
}

pub fn hex(b: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        let _ = write!(s, "{x:02x}");
    }
    s
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    if s.len() != N * 2
        || !s
            .bytes()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[i * 2..i * 2 + 2], 16).ok()?;
    }
    Some(out)
}

/// `version-traceid-parentid-flags`; all-zero ids and version ff are
/// invalid per the W3C spec.
fn parse_traceparent(v: &str) -> Option<([u8; 16], [u8; 8], u8)> {
    let mut parts = v.trim().split('-');
    let version = parts.next()?;
    let trace = parts.next()?;
    let parent = parts.next()?;
    let flags = parts.next()?;
    if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
        return None;
    }
    let trace_id = unhex::<16>(trace)?;
    let parent_id = unhex::<8>(parent)?;
    let flags = unhex::<1>(flags)?[0];
    if trace_id.iter().all(|b| *b == 0) || parent_id.iter().all(|b| *b == 0) {
        return None;
    }
    Some((trace_id, parent_id, flags))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continues_a_valid_trace_and_starts_one_otherwise() {
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let t = TraceContext::from_headers(&h);
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&t.parent_span_id.unwrap()), "00f067aa0ba902b7");
        assert_ne!(t.span_id_hex(), "00f067aa0ba902b7");
        let tp = t.traceparent();
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{tp}"
        );
        assert!(tp.ends_with("-01"));

        for bad in [
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "garbage",
        ] {
            let mut h = HeaderMap::new();
            h.insert("traceparent", bad.parse().unwrap());
            let t = TraceContext::from_headers(&h);
            assert!(t.parent_span_id.is_none(), "{bad}");
        }
    }
}

/// One finished server span of the waypoint, for OTLP export.
#[derive(Clone, Debug)]
pub struct SpanRecord {
    pub trace: TraceContext,
    pub name: String,
    pub start_unix_ns: u64,
    pub end_unix_ns: u64,
    pub status_code: u16,
    pub attributes: Vec<(&'static str, String)>,
}

/// Exports spans over OTLP/HTTP (JSON encoding, `POST <endpoint>/v1/traces`)
/// in batches from a background task. Export never blocks a request: when
/// the queue is full, spans are dropped and counted.
#[derive(Clone)]
pub struct SpanExporter {
    tx: Option<mpsc::Sender<SpanRecord>>,
    dropped: Arc<std::sync::atomic::AtomicU64>,
}

impl SpanExporter {
    pub fn disabled() -> Self {
        Self {
            tx: None,
            dropped: Arc::default(),
        }
    }

    /// Starts the export task (call inside a Tokio runtime). `endpoint` is
    /// the collector's base URL, e.g. `http://otel-collector:4318`.
    pub fn otlp_http(endpoint: &str, service_name: String) -> Result<Self, String> {
        let uri: http::Uri = format!("{}/v1/traces", endpoint.trim_end_matches('/'))
            .parse()
            .map_err(|e| format!("OTLP endpoint {endpoint:?}: {e}"))?;
        if uri.scheme_str() != Some("http") {
            return Err(format!(
                "OTLP endpoint {endpoint:?}: only http:// is supported (OTLP/HTTP JSON)"
            ));
        }
        let (tx, rx) = mpsc::channel(4096);
        tokio::spawn(export_loop(uri, service_name, rx));
        Ok(Self {
            tx: Some(tx),
            dropped: Arc::default(),
        })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn export(&self, span: SpanRecord) {
        if let Some(tx) = &self.tx {
            if tx.try_send(span).is_err() {
                self.dropped
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

const EXPORT_BATCH: usize = 512;

async fn export_loop(uri: http::Uri, service: String, mut rx: mpsc::Receiver<SpanRecord>) {
    let mut batch = Vec::with_capacity(EXPORT_BATCH);
    loop {
        let first = match rx.recv().await {
            Some(s) => s,
            None => return,
        };
        batch.push(first);
        // Gather what else arrives within a second, up to a batch.
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        while batch.len() < EXPORT_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(s)) => batch.push(s),
                _ => break,
            }
        }
        let body = otlp_json(&service, &batch);
        batch.clear();
        if let Err(e) = post_json(&uri, body).await {
            tracing::warn!(component = "otlp", endpoint = %uri, error = %e, "span export failed; spans dropped");
        }
    }
}

/// The OTLP/JSON `ExportTraceServiceRequest` for `spans`.
pub fn otlp_json(service: &str, spans: &[SpanRecord]) -> serde_json::Value {
    let attr = |k: &str, v: &str| serde_json::json!({ "key": k, "value": { "stringValue": v } });
    let spans: Vec<serde_json::Value> = spans
        .iter()
        .map(|s| {
            let mut attrs: Vec<serde_json::Value> =
                s.attributes.iter().map(|(k, v)| attr(k, v)).collect();
            attrs.push(serde_json::json!({
                "key": "http.response.status_code",
                "value": { "intValue": s.status_code.to_string() },
            }));
            let mut span = serde_json::json!({
                "traceId": s.trace.trace_id_hex(),
                "spanId": s.trace.span_id_hex(),
                "name": s.name,
                "kind": 2,
                "startTimeUnixNano": s.start_unix_ns.to_string(),
                "endTimeUnixNano": s.end_unix_ns.to_string(),
                "attributes": attrs,
                "status": { "code": if s.status_code >= 500 { 2 } else { 0 } },
            });
            if let Some(p) = s.trace.parent_span_id {
                span["parentSpanId"] = serde_json::json!(hex(&p));
            }
            span
        })
        .collect();
    serde_json::json!({
        "resourceSpans": [{
            "resource": { "attributes": [attr("service.name", service)] },
            "scopeSpans": [{ "scope": { "name": "weft-waypoint" }, "spans": spans }],
        }]
    })
}

async fn post_json(uri: &http::Uri, body: serde_json::Value) -> Result<(), String> {
    use http_body_util::{BodyExt, Full};
    let host = uri.host().ok_or("no host")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| "connect timed out".to_owned())?
    .map_err(|e| e.to_string())?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = http::Request::post(uri.path())
        .header(http::header::HOST, format!("{host}:{port}"))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(bytes::Bytes::from(body.to_string())))
        .map_err(|e| e.to_string())?;
    let resp = tokio::time::timeout(std::time::Duration::from_secs(10), send.send_request(req))
        .await
        .map_err(|_| "export timed out".to_owned())?
        .map_err(|e| e.to_string())?;
    let status = resp.status();
    let _ = resp.into_body().collect().await;
    if !status.is_success() {
        return Err(format!("collector answered {status}"));
    }
    Ok(())
}

#[cfg(test)]
mod otlp_tests {
    use super::*;
    use std::convert::Infallible;

    /// A collector stand-in (an external component): a real HTTP server
    /// that records what the exporter POSTs.
    #[tokio::test]
    async fn exports_spans_as_otlp_json_over_http() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (got_tx, mut got_rx) = mpsc::channel::<(String, serde_json::Value)>(4);
        tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let got_tx = got_tx.clone();
                    async move {
                        use http_body_util::BodyExt;
                        let path = req.uri().path().to_owned();
                        let body = req.into_body().collect().await.unwrap().to_bytes();
                        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        got_tx.send((path, v)).await.unwrap();
                        Ok::<_, Infallible>(http::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"{}"),
                        )))
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
        let exp = SpanExporter::otlp_http(&format!("http://{addr}"), "wp.shop".into()).unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        exp.export(SpanRecord {
            trace: TraceContext::from_headers(&h),
            name: "GET web.shop".into(),
            start_unix_ns: 1,
            end_unix_ns: 2,
            status_code: 200,
            attributes: vec![("http.request.method", "GET".into())],
        });
        let (path, v) = tokio::time::timeout(std::time::Duration::from_secs(5), got_rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(path, "/v1/traces");
        let span = &v["resourceSpans"][0]["scopeSpans"][0]["spans"][0];
        assert_eq!(span["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(span["parentSpanId"], "00f067aa0ba902b7");
        assert_eq!(span["name"], "GET web.shop");
        assert_eq!(
            v["resourceSpans"][0]["resource"]["attributes"][0]["value"]["stringValue"],
            "wp.shop"
        );
    }

    #[test]
    fn only_plain_http_endpoints() {
        assert!(SpanExporter::otlp_http("https://x:4318", "s".into()).is_err());
    }
}
