//! Tunnels in: the waypoint's HBONE listener, its connections (mTLS with
//! the waypoint's current certificate and roots, drained gracefully), and
//! the tunnels they carry. Each tunnel from a ztunnel carries one client
//! connection to a service; the first bytes tell HTTP/2 (prior knowledge,
//! gRPC included), HTTP/1.1, or something else, which is carried at L4.
//! Requests and L4 connections then go to `forward`.

use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::{Request, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, info, warn, Instrument};
use weft_api::Identity;
use weft_dataplane::drain::DrainWatcher;
use weft_dataplane::tls::TlsConfigs;
use weft_hbone::{H2Settings, H2Stream, InboundTunnel};

use crate::body::Prefixed;
use crate::context::{ConnCtx, Derived, Proto, Target};
use crate::forward::Forwarder;

/// How long a new tunnel may stay silent before it is taken for a
/// server-first protocol and carried at L4.
const SNIFF_TIMEOUT: Duration = Duration::from_millis(1000);
/// Slow clients: the whole request head must arrive within this.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head accepted (431 beyond, per RFC 6585).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// The waypoint's HBONE server side: who it is, the TLS it accepts with,
/// and where the tunnels' traffic goes.
pub struct Proxy {
    forwarder: Arc<Forwarder>,
    /// Server configurations of `me`, following certificate renewals and
    /// trust-bundle changes.
    tls: Arc<TlsConfigs>,
    me: Identity,
    h2: H2Settings,
    conn_ids: AtomicU64,
    /// HBONE connections being served (what a drain waits for).
    open: AtomicUsize,
}

impl Proxy {
    pub fn new(forwarder: Arc<Forwarder>, tls: Arc<TlsConfigs>, me: Identity) -> Arc<Self> {
        Arc::new(Self {
            forwarder,
            tls,
            me,
            h2: H2Settings::default(),
            conn_ids: AtomicU64::new(1),
            open: AtomicUsize::new(0),
        })
    }

    /// HBONE connections open now.
    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }
}

/// Counts one open connection until dropped.
struct Open<'a>(&'a AtomicUsize);

impl<'a> Open<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(count)
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts HBONE connections until the drain starts, then closes the
/// listener. Each connection holds a clone of `drain` until it ends: once
/// the drain starts it sends GOAWAY, lets its open tunnels finish (the
/// HTTP connections inside them close after their current request), and
/// returns.
pub async fn serve_hbone(proxy: Arc<Proxy>, listener: TcpListener, drain: DrainWatcher) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = drain.signaled() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!(component = "waypoint", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        // The dual-stack listener reports IPv4 peers as mapped IPv6.
        let peer = peer.ip().to_canonical();
        tokio::spawn(connection(proxy.clone(), stream, peer, drain.clone()));
    }
    info!(
        component = "waypoint",
        "draining: no longer accepting HBONE connections"
    );
}

/// One HBONE connection, from the TLS handshake to its last tunnel.
async fn connection(proxy: Arc<Proxy>, stream: TcpStream, peer: IpAddr, drain: DrainWatcher) {
    let _open = Open::new(&proxy.open);
    let _ = stream.set_nodelay(true);
    let metrics = proxy.forwarder.metrics().clone();
    let cfg = match proxy.tls.server(&proxy.me).await {
        Ok(c) => c,
        Err(e) => {
            metrics.failure("no_certificate");
            warn!(component = "waypoint", error = %e, "no certificate for the waypoint; refusing HBONE");
            return;
        }
    };
    let handler = {
        let proxy = proxy.clone();
        let drain = drain.clone();
        move |t: InboundTunnel| {
            let proxy = proxy.clone();
            let drain = drain.clone();
            let id = proxy.conn_ids.fetch_add(1, Ordering::Relaxed);
            let span = tracing::info_span!("tunnel", conn = id, target = %t.target, peer = %t.peer);
            async move { tunnel(proxy, t, peer, drain).await }.instrument(span)
        }
    };
    let result = weft_hbone::serve_until(stream, cfg, &proxy.h2, handler, drain.signaled()).await;
    if let Err(e) = result {
        let reason = e.reason().as_str();
        metrics.common.handshake_failed(reason);
        info!(component = "waypoint", peer = %peer, reason, error = %e, "HBONE connection failed");
    }
}

/// One CONNECT: where it points, then the first bytes say HTTP/2, HTTP/1.1
/// or anything else (carried at L4).
async fn tunnel(proxy: Arc<Proxy>, t: InboundTunnel, conn_ip: IpAddr, drain: DrainWatcher) {
    let snap = proxy.forwarder.state().load();
    let target = match snap.service_by_vip(t.target.ip()) {
        Some(svc) => Target::Service {
            namespace: svc.namespace.clone(),
            name: svc.name.clone(),
            port: t.target.port(),
        },
        None => match snap.workload_endpoint(t.target) {
            Some(ep) => Target::Workload(ep),
            None => {
                proxy.forwarder.metrics().failure("unknown_target");
                info!(component = "waypoint", target = %t.target, "CONNECT to an address that is no service or workload; refusing");
                t.reject(StatusCode::BAD_GATEWAY);
                return;
            }
        },
    };
    // The address policies and metrics see is bound to the peer's
    // identity: a claim of someone else's address is refused.
    let claimed = t.forwarded_for();
    let src_ip = match weft_api::policy::source_address(conn_ip, claimed, &t.peer, |ip| {
        snap.workload_by_ip(ip).map(|w| snap.model.identity_of(w))
    }) {
        Ok(ip) => ip,
        Err(forged) => {
            proxy
                .forwarder
                .metrics()
                .denied(weft_api::policy::FORGED_SOURCE, target.label());
            warn!(component = "waypoint", peer = %t.peer, conn = %conn_ip, claimed = %forged, "tunnel claims a source address its identity does not hold; refusing");
            t.reject(StatusCode::UNAUTHORIZED);
            return;
        }
    };
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
    let forwarder = proxy.forwarder.clone();
    match kind {
        Sniffed::Http2 => {
            ctx.proto = Proto::Http2;
            serve_http(forwarder, Arc::new(ctx), io, drain).await
        }
        Sniffed::Http1 => serve_http(forwarder, Arc::new(ctx), io, drain).await,
        Sniffed::Opaque => forwarder.l4(ctx, io).await,
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

/// Runs a hyper server connection to its end; once the drain starts, asks
/// it to finish gracefully (HTTP/1.1: close after the current response;
/// HTTP/2: GOAWAY) and waits for that. A macro: the two connection types
/// share the method but no trait.
macro_rules! until_drained {
    ($conn:expr, $drain:expr) => {{
        let mut conn = pin!($conn);
        tokio::select! {
            // The connection first: a tunnel opened as the drain began
            // still has its first request (already sniffed) read before
            // the shutdown is asked for.
            biased;
            result = conn.as_mut() => result,
            () = $drain.signaled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    }};
}

/// Serves the HTTP connection inside a tunnel until the client closes it,
/// or, once the drain starts, until its current requests are answered.
async fn serve_http<S>(forwarder: Arc<Forwarder>, ctx: Arc<ConnCtx>, io: S, drain: DrainWatcher)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = {
        let ctx = ctx.clone();
        service_fn(move |req: Request<Incoming>| {
            let forwarder = forwarder.clone();
            let ctx = ctx.clone();
            async move { Ok::<_, Infallible>(forwarder.handle(&ctx, req).await) }
        })
    };
    let result = match ctx.proto {
        Proto::Http1 => {
            until_drained!(
                hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .max_buf_size(MAX_HEADER_BYTES.max(8192))
                    .keep_alive(true)
                    .serve_connection(TokioIo::new(io), svc)
                    .with_upgrades(),
                drain
            )
        }
        Proto::Http2 => {
            until_drained!(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .max_concurrent_streams(256)
                    .max_header_list_size(MAX_HEADER_BYTES as u32)
                    .initial_stream_window_size(4 * 1024 * 1024)
                    .initial_connection_window_size(16 * 1024 * 1024)
                    .max_pending_accept_reset_streams(64)
                    .serve_connection(TokioIo::new(io), svc),
                drain
            )
        }
    };
    if let Err(e) = result {
        debug!(component = "waypoint", error = %e, "client connection ended with an error");
    }
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
