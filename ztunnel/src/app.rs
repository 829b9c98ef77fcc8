//! Start-up and shutdown: wires the model source, certificates, kernel
//! capture, pods, proxy and operator endpoints together, and drains at
//! SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tracing::{info, warn};
use weft_dataplane::certs::{CertManager, LocalCaProvider, TrustRoots};
use weft_dataplane::control::{self, ControllerSettings, Role};
use weft_dataplane::ops::{self, OpsAddrs, Readiness};
use weft_dataplane::{drain, logging};
use weft_pki::LocalCa;

use crate::admin::Admin;
use crate::capture::ebpf::Capture;
use crate::config::Config;
use crate::inpod::InPod;
use crate::metrics::Metrics;
use crate::proxy::ProxyInputs;
use crate::state::MeshState;
use crate::{cni_server, handover, source};

/// How this ztunnel starts: as the node's only one, or taking over from
/// the one running (an upgrade).
enum Start {
    Alone(ops::OpsListeners),
    After(handover::Predecessor),
}

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let metrics = Metrics::new();
    let state = MeshState::default();
    let certs = model_and_certificates(&cfg, &state, &metrics)?;
    metrics.common.certificates.watch(&certs);
    let capture = Arc::new(Capture::install(&cfg.bpf_pin_dir)?);
    let (drain, _) = drain::channel();
    let drain = Arc::new(drain);
    let pi = ProxyInputs::new(
        cfg.clone(),
        state.clone(),
        certs,
        metrics,
        capture,
        drain.clone(),
    );
    let inpod = InPod::new(pi.clone(), &cfg.state_dir)?;
    let readiness = Arc::new(Readiness::default());
    let ops_addrs = OpsAddrs {
        admin: cfg.admin_addr,
        metrics: cfg.metrics_addr,
        readiness: cfg.readiness_addr,
    };
    let admin = Arc::new(Admin {
        pi: pi.clone(),
        inpod: inpod.clone(),
        readiness: readiness.clone(),
    });

    // Another ztunnel on this node (an upgrade rolling with surge): it
    // keeps serving every pod until this one has the mesh model and has
    // taken its sockets over; until then this one touches nothing.
    let start = match handover::find(&cfg.state_dir) {
        Some(p) => {
            info!(
                component = "ztunnel",
                "another ztunnel serves this node: taking its pods over once the mesh model is here"
            );
            Start::After(p)
        }
        None => {
            // The CNI socket comes before the mesh model: a node must keep
            // starting the pods that stay out of the mesh while the
            // controller is away, and the plugin can only tell those from
            // the others by asking. Bound before the pod records are read,
            // so a plugin that found no socket (and left its record behind)
            // is seen by this restore; requests wait in the backlog until
            // it is done.
            serve_cni(&cfg, &inpod).await?;
            Start::Alone(ops::bind(ops_addrs).await?)
        }
    };

    // Capture nothing until the mesh model is known: policy must be.
    tokio::select! {
        _ = state.first_model("controller", Duration::from_secs(5)) => {}
        signal = logging::shutdown_signal() => {
            info!(component = "ztunnel", signal = signal?, "stopped before the first mesh model");
            if matches!(start, Start::Alone(_)) {
                let _ = std::fs::remove_file(&cfg.cni_socket);
            }
            return Ok(());
        }
    }

    let (inherited, ops) = match start {
        Start::After(p) => take_over(p, &cfg, &inpod, ops_addrs).await?,
        Start::Alone(ops) => (None, ops),
    };
    let ops_sockets = ops.handover()?;
    let ops = ops.spawn(admin, readiness.clone());

    inpod.reconcile().await;
    inpod.release_unadopted().await;
    tokio::spawn(follow_model(pi.clone(), inpod.clone()));
    // Bound before the predecessor lets go of the path, so a later
    // ztunnel always finds one of the two.
    let successor = handover::bind(&cfg.state_dir)?;
    if let Some(i) = inherited {
        // Every socket is served here now: the predecessor stops accepting.
        if let Err(e) = i.done().await {
            warn!(component = "ztunnel", error = %format!("{e:#}"), "telling the previous ztunnel it is replaced failed");
        }
    }
    let handed_over = tokio::spawn(handover::serve(successor, inpod.clone(), ops_sockets));

    readiness.set_ready();
    info!(component = "ztunnel", node = %cfg.node_name, "ready");

    let replaced = tokio::select! {
        signal = logging::shutdown_signal() => {
            let signal = signal?;
            readiness.start_drain();
            // With no successor the pods' listening sockets close with the
            // accept loops: new connections fail closed.
            inpod.release_listeners().await;
            info!(
                component = "ztunnel",
                signal,
                open = pi.connections.len(),
                deadline_s = cfg.drain_timeout.as_secs(),
                "draining: pods' listeners closed, open connections run on"
            );
            false
        }
        _ = handed_over => {
            readiness.start_drain();
            ops.stop();
            drain.start();
            info!(
                component = "ztunnel",
                open = pi.connections.len(),
                "replaced: the new ztunnel serves every pod; finishing the open connections until told to stop"
            );
            let signal = logging::shutdown_signal().await?;
            info!(
                component = "ztunnel",
                signal,
                open = pi.connections.len(),
                deadline_s = cfg.drain_timeout.as_secs(),
                "draining the connections still open"
            );
            true
        }
    };
    shut_down(&cfg, &pi, &drain, replaced).await
}

/// Takes the running ztunnel's sockets (or, if it does not hand them over,
/// starts on its own), then serves CNI and binds the ops ports.
async fn take_over(
    predecessor: handover::Predecessor,
    cfg: &Config,
    inpod: &Arc<InPod>,
    ops_addrs: OpsAddrs,
) -> anyhow::Result<(Option<handover::Inherited>, ops::OpsListeners)> {
    let mut inherited = match predecessor.take().await {
        Ok(i) => {
            info!(
                component = "ztunnel",
                pods = i.pods.len(),
                "received the running ztunnel's sockets"
            );
            Some(i)
        }
        Err(e) => {
            warn!(component = "ztunnel", error = %format!("{e:#}"), "the running ztunnel did not hand over; starting on our own");
            None
        }
    };
    let (pods, ops_sockets) = match &mut inherited {
        Some(i) => (std::mem::take(&mut i.pods), std::mem::take(&mut i.ops)),
        None => Default::default(),
    };
    // Before the CNI socket: a request for a handed-over pod must find its
    // sockets, not try to bind the ports its predecessor still holds.
    inpod.adopt(pods);
    serve_cni(cfg, inpod).await?;
    let ops = ops::bind_or_adopt(ops_addrs, ops_sockets).await?;
    Ok((inherited, ops))
}

/// Waits for the open connections up to the drain deadline, closes what is
/// left, and says how it went.
async fn shut_down(
    cfg: &Config,
    pi: &ProxyInputs,
    drain: &drain::DrainTrigger,
    replaced: bool,
) -> anyhow::Result<()> {
    let outcome = drain.drain(cfg.drain_timeout).await;
    if outcome.remaining > 0 {
        let closed = pi.connections.close_at_drain_deadline();
        warn!(
            component = "ztunnel",
            still_open = outcome.remaining,
            closed,
            deadline_s = cfg.drain_timeout.as_secs(),
            "drain deadline reached: closed the connections still open"
        );
        // Let the closes reach the peers before the process goes.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if replaced {
        info!(
            component = "ztunnel",
            still_open = outcome.remaining,
            took_ms = outcome.took.as_millis() as u64,
            "shutting down; the new ztunnel has the pods"
        );
        return Ok(());
    }
    // Kernel steering stays pinned: until a ztunnel is back, enrolled pods'
    // connections are refused, never sent around the mesh.
    info!(
        component = "ztunnel",
        still_open = outcome.remaining,
        took_ms = outcome.took.as_millis() as u64,
        "shutting down; enrolled pods stay captured (fail closed)"
    );
    let _ = std::fs::remove_file(&cfg.cni_socket);
    Ok(())
}

/// Binds the CNI socket, reads the pods remembered in the state folder,
/// and serves the plugin.
async fn serve_cni(cfg: &Config, inpod: &Arc<InPod>) -> anyhow::Result<()> {
    let cni = cni_server::bind(&cfg.cni_socket)?;
    inpod.restore().await?;
    tokio::spawn(cni_server::serve(cni, inpod.clone()));
    info!(
        component = "ztunnel",
        socket = %cfg.cni_socket.display(),
        "serving CNI requests; pods wait for capture until the mesh model arrives"
    );
    Ok(())
}

/// Starts the model source and returns the certificate manager: the
/// controller's config stream and CA, or (standalone) a watched model file
/// and a local CA.
fn model_and_certificates(
    cfg: &Config,
    state: &MeshState,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Arc<CertManager>> {
    match (&cfg.model_file, &cfg.ca_dir, &cfg.controller) {
        (Some(model_file), Some(ca_dir), None) => {
            state.store(source::file::load(model_file)?);
            metrics.common.config_updates.inc();
            tokio::spawn(source::file::watch(
                model_file.clone(),
                state.clone(),
                metrics.clone(),
            ));
            let ca = LocalCa::load_or_generate(ca_dir, &cfg.trust_domain)
                .with_context(|| format!("local CA in {}", ca_dir.display()))?;
            let trust = TrustRoots::default();
            let provider = LocalCaProvider::new(ca, cfg.cert_ttl, &trust);
            Ok(CertManager::new(Arc::new(provider), trust))
        }
        (None, None, Some(address)) => {
            let token_file = cfg.token_file.clone().ok_or_else(|| {
                anyhow::anyhow!("--controller needs --token-file (this node's bearer token)")
            })?;
            control::connect(
                &ControllerSettings {
                    address: address.clone(),
                    ca_file: cfg.controller_ca_file.clone(),
                    token_file,
                    node: cfg.node_name.clone(),
                    role: Role::Ztunnel,
                    cert_ttl: cfg.cert_ttl,
                },
                state.clone(),
                &metrics.common,
            )
        }
        _ => anyhow::bail!(
            "give either --controller (with --token-file) or --model-file with --ca-dir"
        ),
    }
}

/// Applies every model version: pods to enroll or release, and open
/// connections the new policy denies. A version that lands while a
/// reconcile runs is applied right after it: none is missed.
async fn follow_model(pi: Arc<ProxyInputs>, inpod: Arc<InPod>) {
    pi.state
        .clone()
        .for_each_version(|snap| {
            let (pi, inpod) = (pi.clone(), inpod.clone());
            async move {
                inpod.reconcile().await;
                let closed = pi.connections.revalidate(&snap, &pi.metrics);
                if closed > 0 {
                    info!(
                        component = "ztunnel",
                        closed, "closed connections the new policy denies"
                    );
                }
            }
        })
        .await
}
