//! Start-up and shutdown: the config stream and certificates from the
//! controller, the HBONE listener and the operator endpoints, then, at
//! SIGTERM or SIGINT, a graceful drain bounded by `--drain-timeout`.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tracing::{info, warn};
use weft_api::Identity;
use weft_dataplane::certs::{BoxFuture, CertManager};
use weft_dataplane::control::{self, ControllerSettings, Role};
use weft_dataplane::drain;
use weft_dataplane::logging::shutdown_signal;
use weft_dataplane::ops::{self, OpsAddrs, OpsHandler, Readiness};
use weft_dataplane::tls::TlsConfigs;

use crate::config::Config;
use crate::forward::Forwarder;
use crate::metrics::Metrics;
use crate::proxy::{self, Proxy};
use crate::state::WaypointState;
use crate::telemetry::{AccessLog, SpanExporter};
use crate::upstream::Upstream;

/// How often the wait for the first model says it is still waiting.
const FIRST_MODEL_LOG_EVERY: Duration = Duration::from_secs(5);

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let state = WaypointState::default();
    let certs = control::connect(
        &ControllerSettings {
            address: cfg.controller.clone(),
            ca_file: cfg.controller_ca_file.clone(),
            token_file: cfg.token_file.clone(),
            node: cfg.node_name.clone(),
            role: Role::Waypoint,
            cert_ttl: cfg.cert_ttl,
        },
        state.clone(),
        &metrics.common,
    )?;
    metrics.common.certificates.watch(&certs);

    // Listeners first, so a bad address fails start-up at once.
    let hbone = match TcpListener::bind(cfg.hbone_addr).await {
        // The IPv6 wildcard on a node without IPv6: IPv4 alone.
        Err(e) if cfg.hbone_addr.ip() == std::net::Ipv6Addr::UNSPECIFIED => {
            let v4 = std::net::SocketAddr::from((
                std::net::Ipv4Addr::UNSPECIFIED,
                cfg.hbone_addr.port(),
            ));
            TcpListener::bind(v4)
                .await
                .map_err(|_| anyhow::anyhow!("cannot listen on {}: {e}", cfg.hbone_addr))?
        }
        bound => bound.map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.hbone_addr))?,
    };
    let ops = ops::bind(OpsAddrs {
        admin: cfg.admin_addr,
        metrics: cfg.metrics_addr,
        readiness: cfg.readiness_addr,
    })
    .await?;
    let readiness = Arc::new(Readiness::default());
    ops.spawn(
        Arc::new(Ops {
            metrics: metrics.clone(),
            state: state.clone(),
            certs: certs.clone(),
        }),
        readiness.clone(),
    );

    // Routes and policy must be known before traffic is accepted, or
    // requests would bypass them.
    let controller = control::controller_uri(&cfg.controller);
    let first = state.first_model(&controller, FIRST_MODEL_LOG_EVERY).await;
    let me = Identity::new(
        &first.model.trust_domain,
        &cfg.namespace,
        cfg.service_account(),
    );
    drop(first);
    wait_for_certificate(&certs, &me).await;

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
    let tls = TlsConfigs::new(certs);
    let forwarder = Forwarder::new(
        state,
        Upstream::new(tls.clone(), me.clone()),
        metrics,
        cfg.name.clone(),
        access_log,
        spans,
    );
    let proxy = Proxy::new(forwarder, tls, me.clone());
    let (trigger, watcher) = drain::channel();
    tokio::spawn(proxy::serve_hbone(proxy.clone(), hbone, watcher));
    readiness.set_ready();
    info!(component = "waypoint", identity = %me, hbone = %cfg.hbone_addr, "waypoint ready");

    let signal = shutdown_signal().await?;
    info!(
        component = "waypoint",
        signal,
        drain_announce_s = cfg.drain_announce.as_secs_f64(),
        drain_timeout_s = cfg.drain_timeout.as_secs_f64(),
        "shutting down: not ready; accepting for the announce period, then draining HBONE connections"
    );
    readiness.start_drain();
    if !cfg.drain_announce.is_zero() {
        // Still accepting: ztunnels that have not yet seen this replica
        // leave the model keep getting served.
        tokio::time::sleep(cfg.drain_announce).await;
    }
    let outcome = trigger.drain(cfg.drain_timeout).await;
    match proxy.open_connections() {
        0 => info!(
            component = "waypoint",
            took_ms = outcome.took.as_millis() as u64,
            "drained; exiting"
        ),
        open => warn!(
            component = "waypoint",
            connections = open,
            "drain deadline reached with HBONE connections still open; exiting"
        ),
    }
    Ok(())
}

/// Waits for the waypoint's own certificate, saying so loudly while the CA
/// refuses it (the manager retries on its own; this only waits).
async fn wait_for_certificate(certs: &Arc<CertManager>, me: &Identity) {
    let mut delay = Duration::from_millis(200);
    while let Err(e) = certs.fetch(me).await {
        warn!(component = "waypoint", identity = %me, error = %e, retry_in_ms = delay.as_millis() as u64, "no certificate yet");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// What the ops ports show: the metrics, and the model with what in its
/// routes did not compile.
struct Ops {
    metrics: Arc<Metrics>,
    state: WaypointState,
    certs: Arc<CertManager>,
}

impl OpsHandler for Ops {
    fn metrics(&self) -> String {
        self.metrics.encode()
    }

    fn config_dump(&self) -> BoxFuture<'_, serde_json::Value> {
        let snap = self.state.load();
        Box::pin(async move {
            serde_json::json!({
                "model_version": snap.version,
                "model": snap.model,
                "route_problems": snap.routes.problems,
                "certificates": self.certs.to_json(),
                "trust_roots": self.certs.trust().get().roots.len(),
            })
        })
    }
}
