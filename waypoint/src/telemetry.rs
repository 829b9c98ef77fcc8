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
