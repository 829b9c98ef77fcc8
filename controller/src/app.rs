//! Start-up: picks the source of Kubernetes objects (the API server, or a
//! folder of manifests in embedded mode), the CA's root storage and the
//! node authenticator, and serves the config stream and the CA on one gRPC
//! port, with metrics and readiness beside them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::watch;
use tracing::{info, warn};
use weft_api::MeshModel;

use crate::ca::auth::{Authenticator, BootstrapTokens, TokenReviewAuthenticator};
use crate::ca::secret_store::{publish_trust_bundle, read_intermediate, SecretRootStore};
use crate::ca::service::CaService;
use crate::ca::serving::{self, ServingCertificate};
use crate::ca::store::{DirRootStore, RootStore};
use crate::ca::{rotation, MeshCa};
use crate::metrics::{ControllerMetrics, Sources};
use crate::model::{GatewayApiOutput, PolicyStatus};
use crate::xds::{XdsOptions, XdsServer};

#[derive(clap::Args, Clone, Debug)]
pub struct Config {
    /// Embedded mode: build the mesh from this folder of Kubernetes YAML
    /// manifests (watched) instead of an API server.
    #[arg(long, env = "WEFT_MANIFESTS")]
    pub manifests: Option<PathBuf>,
    /// Config stream and CA (gRPC).
    #[arg(long, default_value = "0.0.0.0:15010")]
    pub grpc_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15014")]
    pub metrics_addr: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    pub readiness_addr: SocketAddr,
    #[arg(long, default_value = weft_api::identity::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Embedded mode: where the CA keeps its root (generated on first
    /// start).
    #[arg(long, env = "WEFT_CA_DIR")]
    pub ca_dir: Option<PathBuf>,
    /// Embedded mode: `node: token` lines, the bearer tokens ztunnels
    /// present.
    #[arg(long, env = "WEFT_BOOTSTRAP_TOKENS")]
    pub bootstrap_tokens: Option<PathBuf>,
    /// In a cluster: Secret holding the CA root.
    #[arg(long, env = "WEFT_CA_SECRET", default_value = "weft-ca-root")]
    pub ca_secret: String,
    /// The CA Secret is a user-supplied intermediate (`tls.crt`: the
    /// intermediate then its chain, `tls.key`, `ca.crt`: the root), read
    /// only, instead of a root the controller manages.
    #[arg(long, env = "WEFT_CA_EXTERNAL")]
    pub ca_external: bool,
    /// Namespace the controller runs in (Lease, CA Secret).
    #[arg(long, env = "POD_NAMESPACE", default_value = "weft-system")]
    pub namespace: String,
    /// Extra DNS names for the gRPC serving certificate.
    #[arg(long = "serving-dns", value_delimiter = ',')]
    pub serving_dns: Vec<String>,
    /// In a cluster: ConfigMap where the root certificate is published.
    #[arg(long, env = "WEFT_CA_CONFIGMAP", default_value = "weft-ca-root-cert")]
    pub ca_configmap: String,
    /// Lease that elects the replica writing status.
    #[arg(
        long,
        env = "WEFT_LEADER_LEASE",
        default_value = "weft-controller-leader"
    )]
    pub leader_lease: String,
    /// Lifetime of workload certificates when the request does not ask for
    /// one (ztunnels and waypoints ask for none unless given `--cert-ttl`).
    #[arg(long, env = "WEFT_CERT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub cert_ttl: Duration,
    /// Longest workload certificate lifetime granted (longer requests are
    /// capped); defaults to `--cert-ttl`. At least one minute.
    #[arg(long, env = "WEFT_MAX_CERT_TTL", value_parser = parse_duration)]
    pub max_cert_ttl: Option<Duration>,
    /// Lifetime of the gRPC port's own serving certificate; it is renewed
    /// at two thirds of it (and when the root rotates) without a restart.
    #[arg(long, env = "WEFT_SERVING_CERT_TTL", default_value = "720h", value_parser = parse_duration)]
    pub serving_cert_ttl: Duration,
    /// After a root rotation (annotation `weft.dev/rotate-root` on the root
    /// Secret, or the file `rotate-root` in the CA directory), how long the
    /// previous root stays trusted. At least the longest workload
    /// certificate lifetime (`--max-cert-ttl`), so every certificate is
    /// renewed in time.
    #[arg(long, env = "WEFT_ROOT_OVERLAP", default_value = "48h", value_parser = parse_duration)]
    pub root_overlap: Duration,
    #[arg(long, env = "WEFT_LOG_JSON")]
    pub log_json: bool,
    /// In a cluster: image of the waypoint Deployments the controller runs
    /// for Gateways of class weft-waypoint (it holds `weft-waypoint`).
    #[arg(
        long,
        env = "WEFT_WAYPOINT_IMAGE",
        default_value = "ghcr.io/weft-mesh/weft:latest"
    )]
    pub waypoint_image: String,
    #[arg(
        long,
        env = "WEFT_WAYPOINT_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    pub waypoint_image_pull_policy: String,
}

/// Shortest workload certificate lifetime the CA issues (renewal at half
/// life must stay well above the round trip to the CA).
const MIN_CERT_TTL: Duration = Duration::from_secs(60);

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {s:?} needs a unit (s, m, h)"))?;
    let (n, unit) = s.split_at(split);
    let n: u64 = n.parse().map_err(|_| format!("bad duration {s:?}"))?;
    match unit {
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("duration {s:?}: unit must be s, m or h")),
    }
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let max_ttl = cfg.max_cert_ttl.unwrap_or(cfg.cert_ttl);
    if max_ttl < MIN_CERT_TTL || cfg.cert_ttl < MIN_CERT_TTL {
        anyhow::bail!("--cert-ttl and --max-cert-ttl must be at least {MIN_CERT_TTL:?}");
    }
    if cfg.cert_ttl > max_ttl {
        anyhow::bail!(
            "--cert-ttl {:?} is longer than --max-cert-ttl {max_ttl:?}",
            cfg.cert_ttl
        );
    }
    let (model_tx, model_rx) = watch::channel(Arc::new(MeshModel::default()));
    let (status_tx, status_rx) = watch::channel(Arc::new(Vec::<PolicyStatus>::new()));
    let (gateway_tx, gateway_rx) = watch::channel(Arc::new(GatewayApiOutput::default()));

    // The self-managed root's store and who may rotate it (not for a
    // user-supplied intermediate).
    let rotation: Option<(Arc<dyn RootStore>, watch::Receiver<bool>)>;
    let (ca, auth): (Arc<MeshCa>, Arc<dyn Authenticator>) = match &cfg.manifests {
        Some(dir) => {
            let ca_dir = cfg
                .ca_dir
                .clone()
                .ok_or_else(|| anyhow::anyhow!("--manifests needs --ca-dir for the CA root"))?;
            let tokens = cfg.bootstrap_tokens.as_ref().ok_or_else(|| {
                anyhow::anyhow!("--manifests needs --bootstrap-tokens (node: token lines)")
            })?;
            let tokens = BootstrapTokens::from_file(tokens).map_err(anyhow::Error::msg)?;
            let store: Arc<dyn RootStore> = Arc::new(DirRootStore::new(ca_dir));
            let ca = MeshCa::load_or_generate(store.clone(), &cfg.trust_domain).await?;
            rotation = Some((store, watch::channel(true).1));
            let dir = dir.clone();
            let td = cfg.trust_domain.clone();
            let (tx, stx, gtx) = (model_tx.clone(), status_tx.clone(), gateway_tx.clone());
            tokio::spawn(async move {
                if let Err(e) = crate::manifests::run(dir, td, tx, stx, gtx).await {
                    warn!(component = "manifests", error = %e, "manifest source ended");
                }
            });
            info!(
                component = "controller",
                mode = "embedded",
                "building the mesh from manifests"
            );
            (
                Arc::new(ca.with_ttl(cfg.cert_ttl, max_ttl)),
                Arc::new(tokens),
            )
        }
        None => {
            let client = kube::Client::try_default().await.map_err(|e| {
                anyhow::anyhow!("no Kubernetes API ({e}); outside a cluster, run with --manifests")
            })?;
            let mut root_store: Option<Arc<dyn RootStore>> = None;
            let ca = if cfg.ca_external {
                let (cert, key, chain) =
                    read_intermediate(client.clone(), &cfg.namespace, &cfg.ca_secret).await?;
                MeshCa::from_intermediate(&cert, &key, &chain, &cfg.trust_domain)?
            } else {
                let store: Arc<dyn RootStore> = Arc::new(SecretRootStore::new(
                    client.clone(),
                    &cfg.namespace,
                    &cfg.ca_secret,
                ));
                root_store = Some(store.clone());
                MeshCa::load_or_generate(store, &cfg.trust_domain).await?
            };
            let auth = TokenReviewAuthenticator::new(client.clone(), vec!["weft-ca".into()])
                .with_node_agents([format!("{}/weft-ztunnel", cfg.namespace).as_str()]);
            let td = cfg.trust_domain.clone();
            let (tx, stx, gtx) = (model_tx.clone(), status_tx.clone(), gateway_tx.clone());
            let kube = client.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::kube_source::run(kube, td, tx, stx, gtx).await {
                    warn!(component = "kube", error = %e, "Kubernetes source ended");
                }
            });
            tokio::spawn(publish_trust_bundle(
                client.clone(),
                cfg.namespace.clone(),
                cfg.ca_configmap.clone(),
                ca.subscribe_bundle(),
            ));
            // Every replica serves config; only the leader writes status.
            let identity = std::env::var("POD_NAME")
                .unwrap_or_else(|_| format!("weft-controller-{}", std::process::id()));
            let mut lease =
                crate::leader::LeaderConfig::new(cfg.namespace.clone(), identity.clone());
            lease.lease_name = cfg.leader_lease.clone();
            let (is_leader, _elector) = crate::leader::spawn(client.clone(), lease);
            rotation = root_store.map(|s| (s, is_leader.clone()));
            let statuses = status_rx.clone();
            let writer = client.clone();
            let (leader1, leader2, leader3) = (is_leader.clone(), is_leader.clone(), is_leader);
            let instance = identity.clone();
            tokio::spawn(async move {
                if let Err(e) = crate::status::run(writer, statuses, leader1, instance).await {
                    warn!(component = "status", error = %e, "status writer ended");
                }
            });
            let (writer, gateway_statuses) = (client.clone(), gateway_rx.clone());
            tokio::spawn(async move {
                if let Err(e) =
                    crate::gateway_status::run(writer, gateway_statuses, leader2, identity).await
                {
                    warn!(component = "gateway_status", error = %e, "Gateway status writer ended");
                }
            });
            let deploy = crate::waypoint_deploy::DeployConfig {
                image: cfg.waypoint_image.clone(),
                image_pull_policy: cfg.waypoint_image_pull_policy.clone(),
                controller_url: format!("https://weft-controller.{}.svc:15010", cfg.namespace),
                trust_domain: cfg.trust_domain.clone(),
                trust: ca.subscribe_bundle(),
            };
            let (deployer, desired) = (client.clone(), gateway_rx.clone());
            tokio::spawn(async move {
                if let Err(e) =
                    crate::waypoint_deploy::run(deployer, deploy, desired, leader3).await
                {
                    warn!(component = "waypoint_deploy", error = %e, "waypoint deployer ended");
                }
            });
            info!(
                component = "controller",
                mode = "cluster",
                "watching the Kubernetes API"
            );
            (Arc::new(ca.with_ttl(cfg.cert_ttl, max_ttl)), Arc::new(auth))
        }
    };

    if let Some((store, is_leader)) = rotation {
        if cfg.root_overlap < ca.max_ttl() {
            anyhow::bail!(
                "--root-overlap {:?} is shorter than the longest workload certificate lifetime: certificates from the old root would stop verifying before they are renewed",
                cfg.root_overlap
            );
        }
        tokio::spawn(rotation::run(
            ca.clone(),
            store,
            is_leader,
            cfg.root_overlap,
        ));
    }

    let xds = XdsServer::new(
        model_rx.clone(),
        ca.subscribe_bundle(),
        XdsOptions {
            history: 0,
            authenticator: Some(auth.clone()),
        },
    );
    let metrics = ControllerMetrics::new(Sources {
        counters: xds.counters(),
        instance_id: xds.instance_id().to_owned(),
        models: model_rx.clone(),
        status: status_rx.clone(),
        trust: ca.subscribe_bundle(),
    });
    let ca_service = CaService::new(ca.clone(), auth, model_rx.clone());

    let endpoints = Arc::new(Endpoints {
        metrics,
        status: status_rx,
        gateway_status: gateway_rx,
    });
    for (addr, which) in [
        (cfg.metrics_addr, Which::Metrics),
        (cfg.readiness_addr, Which::Ready),
    ] {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        tokio::spawn(serve_http(l, endpoints.clone(), which));
    }

    // The gRPC port is TLS, with a serving certificate from the mesh root;
    // ztunnels verify it with the root (the CA directory in embedded mode,
    // the ConfigMap the controller publishes in a cluster).
    let mut dns = vec![
        format!("weft-controller.{}", cfg.namespace),
        format!("weft-controller.{}.svc", cfg.namespace),
        format!("weft-controller.{}.svc.cluster.local", cfg.namespace),
    ];
    dns.extend(cfg.serving_dns.iter().cloned());
    // Renewed at two thirds of its life and when the root rotates.
    let serving = ServingCertificate::issue(ca.clone(), dns, cfg.serving_cert_ttl)?;
    let tls = serving.server_config()?;
    tokio::spawn(serving.renew_forever());
    let grpc_listener = tokio::net::TcpListener::bind(cfg.grpc_addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.grpc_addr))?;
    info!(component = "controller", grpc = %cfg.grpc_addr, "serving config stream and CA (TLS)");
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return,
            };
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
        }
    };
    tonic::transport::Server::builder()
        .add_service(xds.into_service())
        .add_service(ca_service.into_service())
        .serve_with_incoming_shutdown(serving::incoming(grpc_listener, tls), shutdown)
        .await
        .map_err(|e| anyhow::anyhow!("gRPC server on {}: {e}", cfg.grpc_addr))?;
    info!(component = "controller", "shut down");
    Ok(())
}

struct Endpoints {
    metrics: ControllerMetrics,
    status: watch::Receiver<Arc<Vec<PolicyStatus>>>,
    gateway_status: watch::Receiver<Arc<GatewayApiOutput>>,
}

#[derive(Clone, Copy)]
enum Which {
    Metrics,
    Ready,
}

async fn serve_http(listener: tokio::net::TcpListener, e: Arc<Endpoints>, which: Which) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let e = e.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let e = e.clone();
                async move {
                    let accept = req
                        .headers()
                        .get(http::header::ACCEPT)
                        .and_then(|v| v.to_str().ok());
                    Ok::<_, Infallible>(respond(&e, which, req.uri().path(), accept))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn respond(
    e: &Endpoints,
    which: Which,
    path: &str,
    accept: Option<&str>,
) -> http::Response<Full<Bytes>> {
    let mut content_type = match path {
        p if p.starts_with("/debug/") => "application/json",
        _ => "text/plain",
    };
    let (code, body) = match (which, path) {
        (Which::Ready, "/healthz/ready") => (200, "ready\n".to_owned()),
        (Which::Metrics, "/metrics") => {
            let (ty, body) = weft_dataplane::metrics::negotiate(accept, e.metrics.encode());
            content_type = ty;
            (200, body)
        }
        (Which::Metrics, "/debug/status") => (200, debug_status(e)),
        (Which::Metrics, "/debug/model") => (
            200,
            serde_json::to_string_pretty(&e.metrics.model_json()).unwrap_or_default(),
        ),
        (Which::Metrics, "/debug/subscribers") => (
            200,
            serde_json::to_string_pretty(&e.metrics.subscribers_json()).unwrap_or_default(),
        ),
        _ => (404, "not found\n".to_owned()),
    };
    let mut r = http::Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::OK);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

/// Policy, Gateway and route status in one tree: namespace, kind, name.
fn debug_status(e: &Endpoints) -> String {
    let mut all = crate::status::status_json(&e.status.borrow());
    let gateway_api = crate::gateway_status::status_json(&e.gateway_status.borrow());
    if let (Some(all), serde_json::Value::Object(gw)) = (all.as_object_mut(), gateway_api) {
        for (ns, kinds) in gw {
            let entry = all.entry(ns).or_insert_with(|| serde_json::json!({}));
            if let (Some(entry), serde_json::Value::Object(kinds)) = (entry.as_object_mut(), kinds)
            {
                entry.extend(kinds);
            }
        }
    }
    serde_json::to_string_pretty(&all).unwrap_or_default()
}
