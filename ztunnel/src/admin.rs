//! Operator endpoints: `/config_dump` on the admin port (localhost only),
//! `/metrics` for Prometheus, `/healthz/ready` for the kubelet.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::warn;

use crate::inpod::InPod;
use crate::proxy::ProxyInputs;

pub struct Admin {
    pub pi: Arc<ProxyInputs>,
    pub inpod: Arc<InPod>,
    pub ready: AtomicBool,
}

#[derive(Clone, Copy)]
pub enum Endpoint {
    Admin,
    Metrics,
    Readiness,
}

pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

pub async fn serve(listener: TcpListener, admin: Arc<Admin>, which: Endpoint) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(route(&admin, which, req).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await
            {
                warn!(component = "admin", error = %e, "admin connection error");
            }
        });
    }
}

async fn route(admin: &Admin, which: Endpoint, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (which, req.uri().path()) {
        (Endpoint::Metrics, "/metrics") => text(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            admin.pi.metrics.encode(),
        ),
        (Endpoint::Readiness, "/healthz/ready") => {
            if admin.ready.load(Ordering::SeqCst) {
                text(StatusCode::OK, "text/plain", "ready\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not ready\n".into(),
                )
            }
        }
        (Endpoint::Admin, "/config_dump") => {
            let snap = admin.pi.state.load();
            let certs: Vec<_> = admin
                .pi
                .certs
                .snapshot()
                .into_iter()
                .map(|(id, exp)| {
                    serde_json::json!({
                        "identity": id,
                        "expires_unix": exp.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
                    })
                })
                .collect();
            let dump = serde_json::json!({
                "node": admin.pi.cfg.node_name,
                "model_version": snap.version,
                "model": snap.model,
                "pods": admin.inpod.status().await,
                "certificates": certs,
                "pooled_connections": admin.pi.pool.len(),
            });
            text(
                StatusCode::OK,
                "application/json",
                serde_json::to_string_pretty(&dump).unwrap_or_default(),
            )
        }
        _ => text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

fn text(status: StatusCode, ctype: &str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(ctype) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}
