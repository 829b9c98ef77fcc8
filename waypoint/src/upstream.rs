//! Connections from the waypoint to endpoints: HBONE (mTLS with the
//! waypoint's own identity) to mesh workloads, plain TCP to workloads
//! outside the mesh, and on top of each tunnel an HTTP/1.1 or HTTP/2 client
//! connection, pooled per endpoint.
//!
//! HTTP/2 endpoints share one client connection (multiplexed); HTTP/1.1
//! endpoints keep a bounded stack of idle connections, each on its own
//! CONNECT stream (the HBONE connection underneath is shared).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::debug;
use weft_api::Identity;
use weft_hbone::control::CertManager;
use weft_hbone::{client, tls, H2Settings, HboneError, Pool};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type Body = BoxBody<Bytes, BoxError>;

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_H1: usize = 256;

/// One endpoint of a service, as the waypoint reaches it. Cheap to clone
/// (shared strings): every request copies the one it picked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Pod IP and target port.
    pub addr: SocketAddr,
    /// `Some` for a mesh workload (HBONE to its 15008 with this identity),
    /// `None` for plain TCP.
    pub identity: Option<Arc<Identity>>,
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
}

/// Hashes the address only (equal endpoints share it): the connection
/// pools look endpoints up on every request.
impl std::hash::Hash for Endpoint {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.addr.hash(state);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Http1,
    Http2,
}

/// Why an attempt got no response: the retry logic needs to know whether
/// the request may have reached the app.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Nothing was sent: safe to retry anything.
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, String),
    /// Sent (maybe partly), then the connection or stream broke.
    #[error("upstream reset: {0}")]
    Reset(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct HboneKey {
    dst: SocketAddr,
    identity: Identity,
}

pub struct Upstream {
    certs: Arc<CertManager>,
    me: Identity,
    h2: H2Settings,
    hbone: Pool<HboneKey>,
    h1_idle: Mutex<HashMap<Endpoint, Vec<H1Conn>>>,
    h2_conns: Mutex<HashMap<Endpoint, http2::SendRequest<Body>>>,
}

impl Upstream {
    pub fn new(certs: Arc<CertManager>, me: Identity) -> Arc<Self> {
        Arc::new(Self {
            certs,
            me,
            h2: H2Settings::default(),
            hbone: Pool::new(100, Duration::from_secs(60)),
            h1_idle: Mutex::new(HashMap::new()),
            h2_conns: Mutex::new(HashMap::new()),
        })
    }

    /// A byte stream to `ep`: a CONNECT tunnel or a TCP connection.
    pub async fn open_stream(
        &self,
        ep: &Endpoint,
        headers: HeaderMap,
    ) -> Result<Box<dyn Io>, UpstreamError> {
        let connect_err = |e: String| UpstreamError::Connect(ep.addr, e);
        match &ep.identity {
            Some(identity) => {
                let hbone_addr = SocketAddr::new(ep.addr.ip(), weft_hbone::HBONE_PORT);
                let key = HboneKey {
                    dst: hbone_addr,
                    identity: Identity::clone(identity),
                };
                let dial = || async {
                    let cert = self
                        .certs
                        .fetch(&self.me)
                        .await
                        .map_err(|e| HboneError::Io(std::io::Error::other(e.to_string())))?;
                    let cfg = tls::client_config(&cert, &self.certs.trust_bundle(), identity)?;
                    let tcp = TcpStream::connect(hbone_addr).await?;
                    let _ = tcp.set_nodelay(true);
                    client::connect(tcp, cfg, &self.h2).await
                };
                let stream = self
                    .hbone
                    .open(&key, dial, ep.addr, headers)
                    .await
                    .map_err(|e| connect_err(e.to_string()))?;
                Ok(Box::new(stream))
            }
            None => {
                let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(ep.addr))
                    .await
                    .map_err(|_| connect_err("timed out".into()))?
                    .map_err(|e| connect_err(e.to_string()))?;
                let _ = tcp.set_nodelay(true);
                Ok(Box::new(tcp))
            }
        }
    }

    /// Sends `req` to `ep` over a pooled HTTP connection of `proto`.
    pub async fn send(
        &self,
        ep: &Endpoint,
        proto: Proto,
        req: Request<Body>,
        tunnel_headers: &HeaderMap,
    ) -> Result<Response<Body>, UpstreamError> {
        match proto {
            Proto::Http1 => self.send_h1(ep, req, tunnel_headers).await,
            Proto::Http2 => self
                .send_h2(ep, req, tunnel_headers)
                .await
                .map(|r| r.map(crate::body::boxed)),
        }
    }

    async fn send_h1(
        &self,
        ep: &Endpoint,
        req: Request<Body>,
        tunnel_headers: &HeaderMap,
    ) -> Result<Response<Body>, UpstreamError> {
        let mut conn = match self.idle_h1(ep) {
            Some(c) => c,
            None => {
                let io = self.open_stream(ep, tunnel_headers.clone()).await?;
                let (sender, conn) = http1::Builder::new()
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(|e| UpstreamError::Connect(ep.addr, e.to_string()))?;
                let task = tokio::spawn(async move {
                    // With upgrades: a 101 hands the connection to the
                    // tunnel (WebSocket and the like).
                    if let Err(e) = conn.with_upgrades().await {
                        debug!(component = "upstream", error = %e, "HTTP/1.1 upstream connection ended");
                    }
                });
                H1Conn {
                    sender,
                    abort: task.abort_handle(),
                }
            }
        };
        // HTTP/1.1 cannot cancel one request: if the client goes away before
        // the exchange ends, the upstream connection is closed so the app
        // sees the cancellation (and the connection is not reused mid-way).
        let guard = AbortOnDrop(Some(conn.abort.clone()));
        let res = conn.sender.send_request(req).await;
        match res {
            Ok(resp) => {
                // Back to the pool: reusable once this response's body is
                // read (`idle_h1` skips it until then).
                let mut idle = self.h1_idle.lock().unwrap_or_else(|p| p.into_inner());
                let list = idle.entry(ep.clone()).or_default();
                if list.len() < MAX_IDLE_H1 {
                    list.push(conn);
                }
                Ok(resp.map(|b| {
                    if http_body::Body::is_end_stream(&b) {
                        guard.disarm();
                        return crate::body::boxed(b);
                    }
                    crate::body::boxed(GuardedBody { inner: b, guard })
                }))
            }
            Err(e) if e.is_canceled() => {
                guard.disarm();
                Err(UpstreamError::Connect(ep.addr, e.to_string()))
            }
            Err(e) => {
                guard.disarm();
                Err(UpstreamError::Reset(e.to_string()))
            }
        }
    }

    fn idle_h1(&self, ep: &Endpoint) -> Option<H1Conn> {
        let mut idle = self.h1_idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(ep)?;
        list.retain(|c| !c.sender.is_closed());
        let i = list.iter().rposition(|c| c.sender.is_ready())?;
        Some(list.swap_remove(i))
    }

    async fn send_h2(
        &self,
        ep: &Endpoint,
        req: Request<Body>,
        tunnel_headers: &HeaderMap,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let existing = {
            let conns = self.h2_conns.lock().unwrap_or_else(|p| p.into_inner());
            conns.get(ep).filter(|s| !s.is_closed()).cloned()
        };
        let mut sender = match existing {
            Some(s) => s,
            None => {
                let io = self.open_stream(ep, tunnel_headers.clone()).await?;
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .initial_stream_window_size(4 * 1024 * 1024)
                    .initial_connection_window_size(16 * 1024 * 1024)
                    .adaptive_window(false)
                    .keep_alive_interval(Duration::from_secs(30))
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(|e| UpstreamError::Connect(ep.addr, e.to_string()))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(component = "upstream", error = %e, "HTTP/2 upstream connection ended");
                    }
                });
                self.h2_conns
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(ep.clone(), sender.clone());
                sender
            }
        };
        sender
            .ready()
            .await
            .map_err(|e| UpstreamError::Connect(ep.addr, e.to_string()))?;
        sender.send_request(req).await.map_err(|e| {
            if e.is_canceled() {
                UpstreamError::Connect(ep.addr, e.to_string())
            } else {
                UpstreamError::Reset(e.to_string())
            }
        })
    }

    /// Forgets pooled connections to endpoints no longer in `keep`.
    pub fn retain(&self, keep: impl Fn(&Endpoint) -> bool) {
        self.h1_idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|ep, _| keep(ep));
        self.h2_conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|ep, _| keep(ep));
    }
}

/// A bidirectional byte stream (tunnel or TCP).
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static> Io for T {}

/// A pooled HTTP/1.1 client connection and its driver task.
struct H1Conn {
    sender: http1::SendRequest<Body>,
    abort: tokio::task::AbortHandle,
}

/// Aborts the connection task when dropped while armed.
struct AbortOnDrop(Option<tokio::task::AbortHandle>);

impl AbortOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(a) = self.0.take() {
            a.abort();
        }
    }
}

/// A response body that closes its HTTP/1.1 connection if dropped before
/// its end.
struct GuardedBody {
    inner: Incoming,
    guard: AbortOnDrop,
}

impl http_body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        // Disarm at the end, whether it is seen as `None` or (what the
        // server does when the length is known) as `is_end_stream` after
        // the last frame.
        match &polled {
            std::task::Poll::Ready(None) => this.guard.0 = None,
            std::task::Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => {
                this.guard.0 = None
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}
