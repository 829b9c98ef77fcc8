//! Start-up: certificate and config stream from the controller, the HBONE
//! listener, and the operator endpoints.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tracing::{info, warn};
use weft_api::{Identity, MeshModel};
use weft_hbone::control::{
    CertManager, ConfigSink, ConfigStream, ControllerAddr, GrpcCaProvider, Role, SharedTrustBundle,
};

use crate::config::Config;
use crate::metrics::Metrics;
use crate::proxy::{self, Proxy};
use crate::state::WaypointState;
use crate::telemetry::{AccessLog, SpanExporter};
use crate::upstream::Upstream;

struct Sink {
    state: WaypointState,
    metrics: Arc<Metrics>,
}

impl ConfigSink for Sink {
    fn model_changed(&self, model: MeshModel, version: u64, _full: bool) {
        self.state.store(model, version);
        self.metrics.config_updates.inc();
    }

    fn rejected(&self, _version: u64, _error: &str) {
        self.metrics.config_rejections.inc();
    }
}

async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let token = std::fs::read_to_string(&cfg.token_file)
        .map_err(|e| anyhow::anyhow!("token file {}: {e}", cfg.token_file.display()))?
        .trim()
        .to_owned();
    let uri = cfg.controller_uri();
    let addr = ControllerAddr {
        uri: uri.clone(),
        ca_pem: match &cfg.controller_ca_file {
            Some(f) => Some(
                std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("controller CA file {}: {e}", f.display()))?,
            ),
            None => None,
        },
    };
    if uri.starts_with("http://") {
        warn!(component = "waypoint", controller = %uri, "talking to the controller without TLS: the token travels in the clear");
    }
    let metrics = Metrics::new();
    let state = WaypointState::default();
    let trust = SharedTrustBundle::default();
    tokio::spawn(
        ConfigStream {
            endpoint: addr.clone(),
            node: cfg.node_name.clone(),
            token: token.clone(),
            role: Role::Waypoint,
            trust: trust.clone(),
            sink: Arc::new(Sink {
                state: state.clone(),
                metrics: metrics.clone(),
            }),
        }
        .run(),
    );
    let provider = GrpcCaProvider::new(addr, token, cfg.cert_ttl, trust.clone())?;
    let certs = CertManager::new(Arc::new(provider));

    // Listeners first, so a bad address fails start-up at once.
    let hbone = bind(cfg.hbone_addr).await?;
    let metrics_l = bind(cfg.metrics_addr).await?;
    let ready_l = bind(cfg.readiness_addr).await?;
    let admin_l = bind(cfg.admin_addr).await?;

    // Wait for the first model: routes and policy must be known before
    // traffic is accepted, or requests would bypass them.
    let mut versions = state.subscribe();
    let mut waited = 0u64;
    while *versions.borrow_and_update() == 0 {
        if tokio::time::timeout(Duration::from_secs(5), versions.changed())
            .await
            .is_err()
        {
            waited += 5;
            info!(component = "waypoint", controller = %uri, waited_s = waited, "waiting for the first mesh model from the controller");
        }
    }
    let trust_domain = state.load().model.trust_domain.clone();
    let me = Identity::new(&trust_domain, &cfg.namespace, cfg.service_account());
    // The certificate too: fail loudly when the CA refuses us.
    let mut delay = Duration::from_millis(200);
    loop {
        match certs.fetch(&me).await {
            Ok(_) => break,
            Err(e) => {
                warn!(component = "waypoint", identity = %me, error = %e, retry_in_ms = delay.as_millis() as u64, "no certificate yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
    let access_log = if cfg.access_log {
        AccessLog::to_writer(std::io::stdout())
    } else {
        AccessLog::disabled()
    };
    let spans = match &cfg.otlp_endpoint {
        Some(ep) => SpanExporter::otlp_http(ep, format!("{}.{}", cfg.name, cfg.namespace))
            .map_err(anyhow::Error::msg)?,
        None => SpanExporter::disabled(),
    };
    let upstream = Upstream::new(certs.clone(), me.clone());
    let proxy = Proxy::new(
        state.clone(),
        upstream,
        metrics.clone(),
        certs,
        me.clone(),
        cfg.namespace.clone(),
        cfg.name.clone(),
        access_log,
        spans,
    );
    let ops = Arc::new(OpsCtx {
        metrics: metrics.clone(),
        state: state.clone(),
        ready: AtomicBool::new(true),
    });
    tokio::spawn(serve_ops(metrics_l, ops.clone(), Ops::Metrics));
    tokio::spawn(serve_ops(ready_l, ops.clone(), Ops::Readiness));
    tokio::spawn(serve_ops(admin_l, ops, Ops::Admin));
    info!(component = "waypoint", identity = %me, hbone = %cfg.hbone_addr, "waypoint ready");
    tokio::select! {
        () = proxy::serve_hbone(proxy, hbone) => {}
        _ = tokio::signal::ctrl_c() => info!(component = "waypoint", "interrupted; exiting"),
    }
    Ok(())
}

#[derive(Clone, Copy)]
enum Ops {
    Metrics,
    Readiness,
    Admin,
}

struct OpsCtx {
    metrics: Arc<Metrics>,
    state: WaypointState,
    ready: AtomicBool,
}

fn ops_answer(ctx: &OpsCtx, which: Ops, path: &str) -> (StatusCode, String) {
    match (which, path) {
        (Ops::Metrics, "/metrics") => (StatusCode::OK, ctx.metrics.encode()),
        (Ops::Readiness, "/healthz/ready") if ctx.ready.load(Ordering::SeqCst) => {
            (StatusCode::OK, "ready\n".to_owned())
        }
        (Ops::Readiness, "/healthz/ready") => {
            (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_owned())
        }
        (Ops::Admin, "/config_dump") => {
            let snap = ctx.state.load();
            let dump = serde_json::json!({
                "model_version": snap.version,
                "model": snap.model,
                "route_problems": snap.routes.problems(),
            });
            (
                StatusCode::OK,
                serde_json::to_string_pretty(&dump).unwrap_or_default(),
            )
        }
        _ => (StatusCode::NOT_FOUND, "not found\n".to_owned()),
    }
}

async fn serve_ops(listener: TcpListener, ctx: Arc<OpsCtx>, which: Ops) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let (status, body) = ops_answer(&ctx, which, req.uri().path());
                async move {
                    let mut r = Response::new(Full::new(Bytes::from(body)));
                    *r.status_mut() = status;
                    Ok::<_, Infallible>(r)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}
