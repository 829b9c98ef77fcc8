//! Connections from the waypoint to endpoints: HBONE (mTLS with the
//! waypoint's own identity) to mesh workloads, plain TCP to workloads
//! outside the mesh, and on top of each tunnel an HTTP/1.1 or HTTP/2 client
//! connection, pooled per endpoint.
//!
//! HTTP/2 endpoints share one client connection (multiplexed); HTTP/1.1
//! endpoints keep a bounded stack of idle connections, each on its own
//! CONNECT stream (the HBONE connection underneath is shared). Every new
//! connection takes a slot under the service's `maxConnections` for as
//! long as it is open; an HTTP/1.1 request that finds no idle connection
//! and no free slot waits (one of `maxPendingRequests`) for either, and
//! past that is turned away as an overflow.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use http::{HeaderMap, Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tracing::debug;
use weft_api::Identity;
use weft_dataplane::dial::{Dial, HboneDialer};
use weft_dataplane::tls::TlsConfigs;
use weft_hbone::{H2Settings, HboneError};

use crate::body::{self, Body};
use crate::context::{Endpoint, Proto};
use crate::resilience::{Admission, ConnectionPermit, Limits, Overflow};

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_H1: usize = 256;
/// CONNECT streams per pooled HBONE connection before another is dialled.
const MAX_STREAMS_PER_HBONE: usize = 100;
/// An HBONE connection with no stream for this long is closed.
const HBONE_IDLE: Duration = Duration::from_secs(60);
/// Plain TCP connect deadline (HBONE's handshake has its own).
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a request waits for an HTTP/1.1 connection past
/// `maxConnections` before it is turned away as a pending overflow.
const PENDING_TIMEOUT: Duration = Duration::from_secs(5);
/// A waiting request looks again at least this often (a connection turns
/// reusable inside hyper a moment after its body ends).
const PENDING_RECHECK: Duration = Duration::from_millis(10);

/// Why an attempt got no response: the retry logic needs to know whether
/// the request may have reached the app.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// Nothing was sent: safe to retry anything.
    #[error("connect to {0}: {1}")]
    Connect(SocketAddr, #[source] ConnectError),
    /// Sent (maybe partly), then the connection or stream broke.
    #[error("upstream reset: {0}")]
    Reset(#[source] hyper::Error),
    /// Not sent: a circuit-breaker limit (connections, pending requests)
    /// turned it away.
    #[error("{0}")]
    Overflow(Overflow),
}

/// What failed while reaching an endpoint, before the request was sent.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("HBONE: {0}")]
    Hbone(#[from] HboneError),
    #[error("TCP: {0}")]
    Tcp(#[from] std::io::Error),
    /// The HTTP handshake on the stream, or a connection that closed
    /// before taking the request.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct HboneKey {
    dst: SocketAddr,
    identity: Identity,
}

pub struct Upstream {
    me: Identity,
    hbone: HboneDialer<HboneKey>,
    h1_idle: Mutex<HashMap<Endpoint, Vec<H1Conn>>>,
    h2_conns: Mutex<HashMap<Endpoint, http2::SendRequest<Body>>>,
    /// Per endpoint: woken when an HTTP/1.1 connection may have become
    /// reusable or closed (requests waiting past `maxConnections`).
    h1_freed: Mutex<HashMap<SocketAddr, Arc<Notify>>>,
}

impl Upstream {
    /// Dials endpoints as `me`, with client configurations from `tls`.
    pub fn new(tls: Arc<TlsConfigs>, me: Identity) -> Arc<Self> {
        Arc::new(Self {
            me,
            hbone: HboneDialer::new(
                tls,
                H2Settings::default(),
                MAX_STREAMS_PER_HBONE,
                HBONE_IDLE,
            ),
            h1_idle: Mutex::new(HashMap::new()),
            h2_conns: Mutex::new(HashMap::new()),
            h1_freed: Mutex::new(HashMap::new()),
        })
    }

    /// A byte stream to `ep`: a CONNECT tunnel or a TCP connection.
    pub async fn open_stream(
        &self,
        ep: &Endpoint,
        headers: HeaderMap,
    ) -> Result<Box<dyn Io>, UpstreamError> {
        self.connect(ep, headers)
            .await
            .map_err(|e| UpstreamError::Connect(ep.addr, e))
    }

    async fn connect(
        &self,
        ep: &Endpoint,
        headers: HeaderMap,
    ) -> Result<Box<dyn Io>, ConnectError> {
        match &ep.identity {
            Some(identity) => {
                let hbone = SocketAddr::new(ep.addr.ip(), weft_hbone::HBONE_PORT);
                let key = HboneKey {
                    dst: hbone,
                    identity: Identity::clone(identity),
                };
                let dial = Dial {
                    me: &self.me,
                    peer: identity,
                    hbone,
                    target: ep.addr,
                    headers,
                };
                let stream = self.hbone.open(&key, dial, TcpStream::connect).await?;
                Ok(Box::new(stream))
            }
            None => {
                let tcp = tokio::time::timeout(TCP_CONNECT_TIMEOUT, TcpStream::connect(ep.addr))
                    .await
                    .map_err(|_| ConnectError::Timeout(TCP_CONNECT_TIMEOUT))??;
                let _ = tcp.set_nodelay(true);
                Ok(Box::new(tcp))
            }
        }
    }

    /// Sends `req` to `ep` over a pooled HTTP connection of `proto`; a new
    /// connection counts against `limits`.
    pub async fn send(
        &self,
        ep: &Endpoint,
        proto: Proto,
        req: Request<Body>,
        tunnel_headers: &HeaderMap,
        limits: &Limits,
    ) -> Result<Response<Body>, UpstreamError> {
        match proto {
            Proto::Http1 => self.send_h1(ep, req, tunnel_headers, limits).await,
            Proto::Http2 => self
                .send_h2(ep, req, tunnel_headers, limits)
                .await
                .map(|r| r.map(body::boxed)),
        }
    }

    async fn send_h1(
        &self,
        ep: &Endpoint,
        req: Request<Body>,
        tunnel_headers: &HeaderMap,
        limits: &Limits,
    ) -> Result<Response<Body>, UpstreamError> {
        let mut conn = self.h1_conn(ep, tunnel_headers, limits).await?;
        // HTTP/1.1 cannot cancel one request: if the client goes away before
        // the exchange ends, the upstream connection is closed so the app
        // sees the cancellation (and the connection is not reused mid-way).
        let guard = AbortOnDrop(Some(conn.abort.clone()));
        let freed = self.freed(ep.addr);
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
                        freed.notify_waiters();
                        return body::boxed(b);
                    }
                    body::boxed(GuardedBody {
                        inner: b,
                        guard,
                        freed: Some(freed),
                    })
                }))
            }
            Err(e) => {
                guard.disarm();
                Err(sent_error(ep, e))
            }
        }
    }

    /// An idle HTTP/1.1 connection to `ep`, or a new one under
    /// `maxConnections`, or (waiting as one of `maxPendingRequests`) the
    /// first of those to come free.
    async fn h1_conn(
        &self,
        ep: &Endpoint,
        tunnel_headers: &HeaderMap,
        limits: &Limits,
    ) -> Result<H1Conn, UpstreamError> {
        if let Some(c) = self.idle_h1(ep) {
            return Ok(c);
        }
        let _waiting = match limits
            .connect_or_queue(ep.addr)
            .map_err(UpstreamError::Overflow)?
        {
            Admission::Connect(slot) => return self.new_h1(ep, tunnel_headers, slot).await,
            Admission::Wait(place) => place,
        };
        let freed = self.freed(ep.addr);
        let deadline = tokio::time::Instant::now() + PENDING_TIMEOUT;
        loop {
            let notified = freed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(c) = self.idle_h1(ep) {
                return Ok(c);
            }
            if let Some(slot) = limits.try_connect_waiting(ep.addr) {
                return self.new_h1(ep, tunnel_headers, slot).await;
            }
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Err(UpstreamError::Overflow(Overflow::Pending));
            }
            let _ = tokio::time::timeout((deadline - now).min(PENDING_RECHECK), notified).await;
        }
    }

    /// A new HTTP/1.1 connection to `ep`, holding `slot` while it is open.
    async fn new_h1(
        &self,
        ep: &Endpoint,
        tunnel_headers: &HeaderMap,
        slot: ConnectionPermit,
    ) -> Result<H1Conn, UpstreamError> {
        let io = self.open_stream(ep, tunnel_headers.clone()).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| UpstreamError::Connect(ep.addr, e.into()))?;
        let freed = self.freed(ep.addr);
        let task = tokio::spawn(async move {
            // With upgrades: a 101 hands the connection to the tunnel
            // (WebSocket and the like).
            if let Err(e) = conn.with_upgrades().await {
                debug!(component = "upstream", error = %e, "HTTP/1.1 upstream connection ended");
            }
            drop(slot);
            freed.notify_waiters();
        });
        Ok(H1Conn {
            sender,
            abort: task.abort_handle(),
        })
    }

    /// The wake-up of requests waiting for a connection to `addr`.
    fn freed(&self, addr: SocketAddr) -> Arc<Notify> {
        self.h1_freed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(addr)
            .or_default()
            .clone()
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
        limits: &Limits,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let existing = {
            let conns = self.h2_conns.lock().unwrap_or_else(|p| p.into_inner());
            conns.get(ep).filter(|s| !s.is_closed()).cloned()
        };
        let mut sender = match existing {
            Some(s) => s,
            None => {
                // One multiplexed connection per endpoint: only a limit of
                // zero connections turns it away.
                let slot = limits
                    .try_connect(ep.addr)
                    .map_err(UpstreamError::Overflow)?;
                let io = self.open_stream(ep, tunnel_headers.clone()).await?;
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .initial_stream_window_size(4 * 1024 * 1024)
                    .initial_connection_window_size(16 * 1024 * 1024)
                    .adaptive_window(false)
                    .keep_alive_interval(Duration::from_secs(30))
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(|e| UpstreamError::Connect(ep.addr, e.into()))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        debug!(component = "upstream", error = %e, "HTTP/2 upstream connection ended");
                    }
                    drop(slot);
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
            .map_err(|e| UpstreamError::Connect(ep.addr, e.into()))?;
        sender
            .send_request(req)
            .await
            .map_err(|e| sent_error(ep, e))
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
        self.h1_freed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            // Held by nobody: no connection, body or waiter of it is left.
            .retain(|_, freed| Arc::strong_count(freed) > 1);
    }
}

/// A request hyper gave up on: cancelled means the connection closed
/// before taking it (nothing sent), anything else broke an exchange that
/// had started.
fn sent_error(ep: &Endpoint, e: hyper::Error) -> UpstreamError {
    if e.is_canceled() {
        UpstreamError::Connect(ep.addr, e.into())
    } else {
        UpstreamError::Reset(e)
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
/// its end, and at its end (or drop) wakes requests waiting for a
/// connection.
struct GuardedBody {
    inner: Incoming,
    guard: AbortOnDrop,
    freed: Option<Arc<Notify>>,
}

impl GuardedBody {
    fn ended(&mut self) {
        self.guard.0 = None;
        if let Some(f) = self.freed.take() {
            f.notify_waiters();
        }
    }
}

impl Drop for GuardedBody {
    fn drop(&mut self) {
        if let Some(f) = self.freed.take() {
            f.notify_waiters();
        }
    }
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
            std::task::Poll::Ready(None) => this.ended(),
            std::task::Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.ended(),
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
