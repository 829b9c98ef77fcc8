//! The waypoint's data path. Each HBONE tunnel from a ztunnel carries one
//! client connection to a service; the first bytes tell HTTP/2 (prior
//! knowledge, gRPC included), HTTP/1.1, or something else, which is carried
//! at L4 to an endpoint after L4 policy. HTTP requests go through L7
//! policy, rate limits, routing, fault injection and the circuit breaker,
//! then to an endpoint chosen by least-request with retries and outlier
//! detection (see `forward`).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tracing::{debug, info, warn, Instrument};
use weft_api::Identity;
use weft_hbone::control::CertManager;
use weft_hbone::{tls, H2Settings, H2Stream, InboundTunnel};

use crate::body::{self, Counted, Prefixed};
use crate::forward::{self, Downstream, Target};
use crate::metrics::Metrics;
use crate::resilience_registry::Registry as ResilienceRegistry;
use crate::state::WaypointState;
use crate::telemetry::{AccessLog, SpanExporter};
use crate::upstream::{Proto, Upstream};

/// How long a new tunnel may stay silent before it is taken for a
/// server-first protocol and carried at L4.
const SNIFF_TIMEOUT: Duration = Duration::from_millis(1000);
/// Slow clients: the whole request head must arrive within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted (431 beyond, per RFC 6585).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

pub struct Proxy {
    pub state: WaypointState,
    pub upstream: Arc<Upstream>,
    pub metrics: Arc<Metrics>,
    pub resilience: ResilienceRegistry,
    pub certs: Arc<CertManager>,
    pub me: Identity,
    /// `namespace/name` of the Gateway.
    pub name: String,
    pub namespace: String,
    pub access_log: AccessLog,
    pub spans: SpanExporter,
    pub h2: H2Settings,
    tls_cache: Mutex<Option<(std::time::SystemTime, Arc<rustls::ServerConfig>)>>,
    conn_ids: AtomicU64,
}

impl Proxy {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        state: WaypointState,
        upstream: Arc<Upstream>,
        metrics: Arc<Metrics>,
        certs: Arc<CertManager>,
        me: Identity,
        namespace: String,
        name: String,
        access_log: AccessLog,
        spans: SpanExporter,
    ) -> Arc<Self> {
        Arc::new(Self {
            state,
            upstream,
            metrics,
            resilience: ResilienceRegistry::default(),
            certs,
            me,
            name,
            namespace,
            access_log,
            spans,
            h2: H2Settings::default(),
            tls_cache: Mutex::new(None),
            conn_ids: AtomicU64::new(1),
        })
    }

    /// The TLS server config for the current certificate, rebuilt when the
    /// certificate was renewed or the trust bundle changed.
    async fn tls(&self) -> Result<Arc<rustls::ServerConfig>, String> {
        let cert = self
            .certs
            .fetch(&self.me)
            .await
            .map_err(|e| e.to_string())?;
        {
            let cache = self.tls_cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((not_after, cfg)) = &*cache {
                if *not_after == cert.not_after {
                    return Ok(cfg.clone());
                }
            }
        }
        let cfg =
            tls::server_config(&cert, &self.certs.trust_bundle()).map_err(|e| e.to_string())?;
        *self.tls_cache.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((cert.not_after, cfg.clone()));
        Ok(cfg)
    }

    /// Drops the cached TLS config (trust bundle changed).
    pub fn reset_tls(&self) {
        *self.tls_cache.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// Accepts HBONE connections until the listener fails.
pub async fn serve_hbone(proxy: Arc<Proxy>, listener: TcpListener) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                warn!(component = "waypoint", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let proxy = proxy.clone();
        tokio::spawn(async move {
            let cfg = match proxy.tls().await {
                Ok(c) => c,
                Err(e) => {
                    proxy.metrics.failure("no_certificate");
                    warn!(component = "waypoint", error = %e, "no certificate for the waypoint; refusing HBONE");
                    return;
                }
            };
            let handler_proxy = proxy.clone();
            let result = weft_hbone::serve(stream, cfg, &proxy.h2, move |t: InboundTunnel| {
                let proxy = handler_proxy.clone();
                let id = proxy.conn_ids.fetch_add(1, Ordering::Relaxed);
                let span =
                    tracing::info_span!("tunnel", conn = id, target = %t.target, peer = %t.peer);
                async move { tunnel(proxy, t, peer.ip()).await }.instrument(span)
            })
            .await;
            if let Err(e) = result {
                let reason = e.reason().as_str();
                proxy
                    .metrics
                    .handshake_failures
                    .get_or_create(&crate::metrics::ReasonLabels {
                        reason: reason.to_owned(),
                    })
                    .inc();
                info!(component = "waypoint", peer = %peer, reason, error = %e, "HBONE connection failed");
            }
        });
    }
}

/// What the client asked for, from the tunnel.
#[derive(Clone, Debug)]
pub struct ConnCtx {
    pub target: Target,
    /// The CONNECT authority (service VIP or pod address and port).
    pub original_dst: SocketAddr,
    pub peer: Identity,
    pub src_ip: IpAddr,
    pub src_workload: String,
    pub src_namespace: String,
    pub proto: Proto,
    /// What every request of the connection derives from the above,
    /// computed once per connection rather than per request.
    pub derived: Derived,
}

#[derive(Clone, Debug)]
pub struct Derived {
    /// `name.namespace` of the target (metric label).
    pub service: String,
    /// The client's SPIFFE id.
    pub peer: String,
    /// `x-forwarded-client-cert` sent upstream.
    pub xfcc: Option<HeaderValue>,
    /// Headers of the HBONE CONNECT to an endpoint (`forwarded`).
    pub tunnel: HeaderMap,
}

impl Derived {
    fn new(target: &Target, peer: &Identity, src_ip: IpAddr, me: &Identity) -> Self {
        let forwarded = match src_ip {
            IpAddr::V4(v4) => format!("for={v4}"),
            IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
        };
        let mut tunnel = HeaderMap::new();
        set_header(&mut tunnel, "forwarded", &forwarded);
        // The endpoint sees the waypoint's identity in mTLS; this names the
        // original client for the app (Envoy's XFCC shape).
        let xfcc = HeaderValue::from_str(&format!("By={me};URI={peer}")).ok();
        Self {
            service: target.service_label(),
            peer: peer.to_string(),
            xfcc,
            tunnel,
        }
    }
}

async fn tunnel(proxy: Arc<Proxy>, t: InboundTunnel, conn_ip: IpAddr) {
    let snap = proxy.state.load();
    let target = match snap.service_by_vip(t.target.ip()) {
        Some(svc) => Target::Service {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            port: t.target.port(),
        },
        None => match snap.workload_endpoint(t.target) {
            Some(ep) => Target::Workload(ep),
            None => {
                proxy.metrics.failure("unknown_target");
                info!(component = "waypoint", target = %t.target, "CONNECT to an address that is no service or workload; refusing");
                t.reject(StatusCode::BAD_GATEWAY);
                return;
            }
        },
    };
    let src_ip = t.forwarded_for().unwrap_or(conn_ip);
    let (src_workload, src_namespace) = snap
        .workload_by_ip(src_ip)
        .map(|w| (w.name.clone(), w.namespace.clone()))
        .unwrap_or_default();
    drop(snap);
    let original_dst = t.target;
    let peer = t.peer.clone();
    let mut stream = match t.accept() {
        Ok(s) => s,
        Err(e) => {
            debug!(component = "waypoint", error = %e, "tunnel closed before accept");
            return;
        }
    };
    let (kind, prefix) = sniff(&mut stream).await;
    let io = Prefixed::new(prefix, stream);
    let derived = Derived::new(&target, &peer, src_ip, &proxy.me);
    let mut ctx = ConnCtx {
        target,
        original_dst,
        peer,
        src_ip,
        src_workload,
        src_namespace,
        proto: Proto::Http1,
        derived,
    };
    match kind {
        Sniffed::Http2 => {
            ctx.proto = Proto::Http2;
            serve_http(proxy, Arc::new(ctx), io).await
        }
        Sniffed::Http1 => serve_http(proxy, Arc::new(ctx), io).await,
        Sniffed::Opaque => forward::l4(proxy, ctx, io).await,
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Sniffed {
    Http1,
    Http2,
    Opaque,
}

const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads the first bytes (up to the HTTP/2 preface's length, or what
/// arrives within `SNIFF_TIMEOUT`) and classifies them.
async fn sniff(stream: &mut H2Stream) -> (Sniffed, Bytes) {
    let mut buf = BytesMut::with_capacity(H2_PREFACE.len());
    let deadline = tokio::time::Instant::now() + SNIFF_TIMEOUT;
    while buf.len() < H2_PREFACE.len() {
        let mut chunk = [0u8; 24];
        let want = H2_PREFACE.len() - buf.len();
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk[..want])).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => break,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
        let kind = classify(&buf);
        if kind != Classified::NeedMore {
            break;
        }
    }
    let kind = match classify(&buf) {
        Classified::Http2 => Sniffed::Http2,
        Classified::Http1 => Sniffed::Http1,
        Classified::NeedMore | Classified::Opaque => Sniffed::Opaque,
    };
    (kind, buf.freeze())
}

#[derive(Debug, PartialEq, Eq)]
enum Classified {
    Http1,
    Http2,
    Opaque,
    NeedMore,
}

fn classify(buf: &[u8]) -> Classified {
    if buf.is_empty() {
        return Classified::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if n == H2_PREFACE.len() {
            Classified::Http2
        } else {
            Classified::NeedMore
        };
    }
    // An HTTP/1.x request line starts with a method token and a space.
    match buf.iter().position(|&b| b == b' ') {
        Some(0) => Classified::Opaque,
        Some(i)
            if buf[..i]
                .iter()
                .all(|b| b.is_ascii_uppercase() || *b == b'-') =>
        {
            Classified::Http1
        }
        Some(_) => Classified::Opaque,
        None if buf.len() < 16 && buf.iter().all(|b| b.is_ascii_uppercase() || *b == b'-') => {
            Classified::NeedMore
        }
        None => Classified::Opaque,
    }
}

async fn serve_http<S>(proxy: Arc<Proxy>, ctx: Arc<ConnCtx>, io: S)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = {
        let proxy = proxy.clone();
        let ctx = ctx.clone();
        service_fn(move |req: Request<Incoming>| {
            let proxy = proxy.clone();
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(forward::handle(proxy, Downstream { ctx }, req).await) }
        })
    };
    let result = match ctx.proto {
        Proto::Http1 => {
            hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .max_buf_size(MAX_HEADER_BYTES.max(8192))
                .keep_alive(true)
                .serve_connection(TokioIo::new(io), svc)
                .with_upgrades()
                .await
        }
        Proto::Http2 => {
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(256)
                .max_header_list_size(MAX_HEADER_BYTES as u32)
                .initial_stream_window_size(4 * 1024 * 1024)
                .initial_connection_window_size(16 * 1024 * 1024)
                .max_pending_accept_reset_streams(64)
                .serve_connection(TokioIo::new(io), svc)
                .await
        }
    };
    if let Err(e) = result {
        debug!(component = "waypoint", error = %e, "client connection ended with an error");
    }
}

/// Sets the header when the value is valid.
pub fn set_header(h: &mut HeaderMap, name: &'static str, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

/// Counts a body's bytes into the `on_end` hook; used for both directions.
pub fn counted<B>(
    b: B,
    on_end: impl FnOnce(u64, bool) + Send + Sync + 'static,
) -> crate::upstream::Body
where
    B: http_body::Body<Data = Bytes> + Send + Sync + Unpin + 'static,
    B::Error: Into<crate::upstream::BoxError>,
{
    body::boxed(Counted::new(b, Arc::default()).on_end(on_end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Classified::Http1);
        assert_eq!(classify(b"M-SEARCH * HTTP/1.1"), Classified::Http1);
        assert_eq!(classify(b"GE"), Classified::NeedMore);
        assert_eq!(classify(b"PRI * HT"), Classified::NeedMore);
        assert_eq!(classify(H2_PREFACE), Classified::Http2);
        assert_eq!(classify(b"\x16\x03\x01\x02\x00"), Classified::Opaque);
        assert_eq!(classify(b"SSH-2.0-OpenSSH_9.2"), Classified::Opaque);
        assert_eq!(classify(b"get / HTTP/1.1"), Classified::Opaque);
        assert_eq!(classify(b" GET"), Classified::Opaque);
    }
}
