//! Start-up and shutdown: wires the model source, CA, kernel capture, pods,
//! proxy and operator endpoints together.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::info;
use weft_hbone::ca::LocalCa;

use crate::admin::{self, Admin, Endpoint};
use crate::ca_client::{GrpcCaProvider, SharedTrustBundle};
use crate::capture::ebpf::Capture;
use crate::config::Config;
use crate::controller_client::ControllerAddr;
use crate::identity::{CertManager, LocalCaProvider};
use crate::inpod::InPod;
use crate::metrics::Metrics;
use crate::proxy::ProxyInputs;
use crate::state::MeshState;
use crate::{cni_server, source};

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let metrics = Metrics::new();
    let state = MeshState::default();
    let certs = match (&cfg.model_file, &cfg.ca_dir, cfg.controller_uri()) {
        (Some(model_file), Some(ca_dir), None) => {
            state.store(source::file::load(model_file)?);
            metrics.config_updates.inc();
            tokio::spawn(source::file::watch(
                model_file.clone(),
                state.clone(),
                metrics.clone(),
            ));
            let ca = LocalCa::load_or_generate(ca_dir, &cfg.trust_domain)
                .map_err(|e| anyhow::anyhow!("local CA in {}: {e}", ca_dir.display()))?;
            CertManager::new(Arc::new(LocalCaProvider::new(ca, cfg.cert_ttl)))
        }
        (None, None, Some(endpoint)) => {
            let token = match &cfg.token_file {
                Some(f) => std::fs::read_to_string(f)
                    .map_err(|e| anyhow::anyhow!("token file {}: {e}", f.display()))?
                    .trim()
                    .to_owned(),
                None => anyhow::bail!("--controller needs --token-file (this node's bearer token)"),
            };
            let addr =
                ControllerAddr {
                    uri: endpoint.clone(),
                    ca_pem: match &cfg.controller_ca_file {
                        Some(f) => Some(std::fs::read_to_string(f).map_err(|e| {
                            anyhow::anyhow!("controller CA file {}: {e}", f.display())
                        })?),
                        None => None,
                    },
                };
            if endpoint.starts_with("http://") {
                tracing::warn!(component = "ztunnel", controller = %endpoint, "talking to the controller without TLS: the node token travels in the clear");
            }
            let trust = SharedTrustBundle::default();
            tokio::spawn(source::grpc::run(
                addr.clone(),
                cfg.node_name.clone(),
                token.clone(),
                state.clone(),
                metrics.clone(),
                trust.clone(),
            ));
            let provider = GrpcCaProvider::new(addr, token, cfg.cert_ttl, trust)?;
            // Serve nothing until the controller has said what the mesh is.
            let mut waited = 0u64;
            while state.version() == 0 {
                if tokio::time::timeout(std::time::Duration::from_secs(5), state.changed())
                    .await
                    .is_err()
                {
                    waited += 5;
                    info!(component = "ztunnel", controller = %endpoint, waited_s = waited, "waiting for the first mesh model from the controller");
                }
            }
            CertManager::new(Arc::new(provider))
        }
        _ => anyhow::bail!(
            "give either --controller (with --token-file) or --model-file with --ca-dir"
        ),
    };

    let capture = Arc::new(Capture::install(&cfg.bpf_pin_dir)?);
    let pi = ProxyInputs::new(cfg.clone(), state.clone(), certs, metrics, capture);
    let inpod = InPod::new(pi.clone(), &cfg.state_dir)?;
    inpod.restore().await?;
    inpod.reconcile().await;

    let admin_state = Arc::new(Admin {
        pi: pi.clone(),
        inpod: inpod.clone(),
        ready: Default::default(),
    });
    for (addr, which) in [
        (cfg.admin_addr, Endpoint::Admin),
        (cfg.metrics_addr, Endpoint::Metrics),
        (cfg.readiness_addr, Endpoint::Readiness),
    ] {
        let l = admin::bind(addr).await?;
        tokio::spawn(admin::serve(l, admin_state.clone(), which));
    }

    let cni = cni_server::bind(&cfg.cni_socket)?;
    tokio::spawn(cni_server::serve(cni, inpod.clone()));

    let reconciler = inpod.clone();
    let watched = state.clone();
    let proxy = pi.clone();
    tokio::spawn(async move {
        loop {
            watched.changed().await;
            reconciler.reconcile().await;
            let closed = proxy
                .connections
                .revalidate(&watched.load(), &proxy.metrics);
            if closed > 0 {
                info!(
                    component = "ztunnel",
                    closed, "closed connections the new policy denies"
                );
            }
        }
    });

    admin_state.ready.store(true, Ordering::SeqCst);
    info!(component = "ztunnel", node = %cfg.node_name, "ready");

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    // Kernel steering stays pinned: until a ztunnel is back, enrolled pods'
    // connections are refused, never sent around the mesh.
    info!(
        component = "ztunnel",
        "shutting down; enrolled pods stay captured (fail closed)"
    );
    let _ = std::fs::remove_file(&cfg.cni_socket);
    Ok(())
}
