//! Start-up and shutdown: wires the model source, CA, kernel capture, pods,
//! proxy and operator endpoints together.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use tracing::info;
use weft_hbone::ca::LocalCa;

use crate::admin::{self, Admin, Endpoint};
use crate::capture::ebpf::Capture;
use crate::config::Config;
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
    state.store(source::file::load(&cfg.model_file)?);
    metrics.config_updates.inc();

    let ca = LocalCa::load_or_generate(&cfg.ca_dir, &cfg.trust_domain)
        .map_err(|e| anyhow::anyhow!("local CA in {}: {e}", cfg.ca_dir.display()))?;
    let certs = CertManager::new(Arc::new(LocalCaProvider::new(ca, cfg.cert_ttl)));

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

    tokio::spawn(source::file::watch(
        cfg.model_file.clone(),
        state.clone(),
        pi.metrics.clone(),
    ));
    let reconciler = inpod.clone();
    let watched = state.clone();
    tokio::spawn(async move {
        loop {
            watched.changed().await;
            reconciler.reconcile().await;
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
