//! The operator endpoints every proxy serves: `/config_dump` on the admin
//! port (localhost), Prometheus `/metrics` and, where the proxy has one, a
//! `/debug/node` report (non-secret node facts for `weftctl check`) on the
//! metrics port, and `/healthz/ready` for the kubelet, which goes false as
//! soon as a drain starts. Plain HTTP/1.1 with
//! a bound on header time and on open connections per port, so a slow or
//! flooding client cannot hold the ports.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::debug;

use crate::certs::BoxFuture;

/// A request head must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections open at once per port; more are closed on accept.
pub const MAX_CONNECTIONS: usize = 256;

/// What a proxy shows on its ops ports.
pub trait OpsHandler: Send + Sync + 'static {
    /// Prometheus text exposition of every metric.
    fn metrics(&self) -> String;
    /// Everything the proxy knows, as JSON.
    fn config_dump(&self) -> BoxFuture<'_, serde_json::Value>;
    /// What `/debug/node` shows (no secrets: it is on the metrics port);
    /// `None`: 404.
    fn node_report(&self) -> BoxFuture<'_, Option<serde_json::Value>> {
        Box::pin(async { None })
    }
}

/// Ready once start-up is done; not ready again from the start of a drain,
/// so the kubelet takes the pod out of its Services.
#[derive(Debug, Default)]
pub struct Readiness {
    ready: AtomicBool,
    draining: AtomicBool,
}

impl Readiness {
    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::SeqCst);
    }

    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.draining.load(Ordering::SeqCst)
    }
}

/// Where the three ports listen.
#[derive(Clone, Copy, Debug)]
pub struct OpsAddrs {
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    pub readiness: SocketAddr,
}

/// The bound listeners: bind first, so a bad address fails start-up.
pub struct OpsListeners {
    admin: TcpListener,
    metrics: TcpListener,
    readiness: TcpListener,
}

#[derive(Clone, Copy)]
enum Port {
    Admin,
    Metrics,
    Readiness,
}

pub async fn bind(addrs: OpsAddrs) -> anyhow::Result<OpsListeners> {
    bind_or_adopt(addrs, Vec::new()).await
}

/// Like [`bind`], taking over listeners a predecessor handed on (see
/// [`OpsListeners::handover`]) for the addresses they listen on; the others
/// are bound. Listeners for addresses no longer configured are closed.
pub async fn bind_or_adopt(
    addrs: OpsAddrs,
    mut inherited: Vec<std::net::TcpListener>,
) -> anyhow::Result<OpsListeners> {
    let mut one = |addr: SocketAddr| {
        let found = inherited
            .iter()
            .position(|l| l.local_addr().is_ok_and(|a| a == addr));
        found.map(|i| inherited.swap_remove(i))
    };
    let (admin, metrics, readiness) = (one(addrs.admin), one(addrs.metrics), one(addrs.readiness));
    Ok(OpsListeners {
        admin: bind_one(addrs.admin, admin).await?,
        metrics: bind_one(addrs.metrics, metrics).await?,
        readiness: bind_one(addrs.readiness, readiness).await?,
    })
}

async fn bind_one(
    addr: SocketAddr,
    inherited: Option<std::net::TcpListener>,
) -> anyhow::Result<TcpListener> {
    if let Some(l) = inherited {
        l.set_nonblocking(true)?;
        return Ok(TcpListener::from_std(l)?);
    }
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

/// Stops serving the ops ports (a process that handed them to its
/// successor): accept loops end and their listeners close here; the
/// successor's copies keep the ports open.
#[derive(Clone, Default)]
pub struct OpsHandle {
    stop: tokio_util::sync::CancellationToken,
}

impl OpsHandle {
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl OpsListeners {
    pub fn metrics_addr(&self) -> std::io::Result<SocketAddr> {
        self.metrics.local_addr()
    }

    /// Copies of the three listening sockets, for a successor process to
    /// serve the same ports from the first moment (no instant without a
    /// readiness or metrics endpoint).
    pub fn handover(&self) -> std::io::Result<Vec<std::os::fd::OwnedFd>> {
        use std::os::fd::AsFd;
        [&self.admin, &self.metrics, &self.readiness]
            .iter()
            .map(|l| l.as_fd().try_clone_to_owned())
            .collect()
    }

    /// Serves the three ports until the process ends or the handle stops them.
    pub fn spawn(self, handler: Arc<dyn OpsHandler>, readiness: Arc<Readiness>) -> OpsHandle {
        let handle = OpsHandle::default();
        for (listener, port) in [
            (self.admin, Port::Admin),
            (self.metrics, Port::Metrics),
            (self.readiness, Port::Readiness),
        ] {
            tokio::spawn(serve(
                listener,
                port,
                handler.clone(),
                readiness.clone(),
                handle.stop.clone(),
            ));
        }
        handle
    }
}

async fn serve(
    listener: TcpListener,
    port: Port,
    handler: Arc<dyn OpsHandler>,
    readiness: Arc<Readiness>,
    stop: tokio_util::sync::CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                debug!(component = "ops", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            debug!(
                component = "ops",
                "too many ops connections; closing a new one"
            );
            continue;
        };
        let handler = handler.clone();
        let readiness = readiness.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let svc = service_fn(move |req: Request<Incoming>| {
                let handler = handler.clone();
                let readiness = readiness.clone();
                async move {
                    let accept = req
                        .headers()
                        .get(header::ACCEPT)
                        .and_then(|v| v.to_str().ok());
                    Ok::<_, Infallible>(
                        answer(port, &*handler, &readiness, req.uri().path(), accept).await,
                    )
                }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                debug!(component = "ops", error = %e, "ops connection ended with an error");
            }
        });
    }
}

async fn answer(
    port: Port,
    handler: &dyn OpsHandler,
    readiness: &Readiness,
    path: &str,
    accept: Option<&str>,
) -> Response<Full<Bytes>> {
    match (port, path) {
        (Port::Metrics, "/metrics") => {
            let (content_type, body) = crate::metrics::negotiate(accept, handler.metrics());
            text(StatusCode::OK, content_type, body)
        }
        (Port::Metrics, "/debug/node") => match handler.node_report().await {
            Some(report) => text(
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&report).unwrap_or_default(),
            ),
            None => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
        },
        (Port::Readiness, "/healthz/ready") if readiness.is_ready() => {
            text(StatusCode::OK, "text/plain", "ready\n".into())
        }
        (Port::Readiness, "/healthz/ready") => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "text/plain",
            "not ready\n".into(),
        ),
        (Port::Admin, "/config_dump") => text(
            StatusCode::OK,
            "application/json",
            serde_json::to_string_pretty(&handler.config_dump().await).unwrap_or_default(),
        ),
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}
