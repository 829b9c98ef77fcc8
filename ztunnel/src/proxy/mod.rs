//! The L4 proxy: outbound capture (15001) to HBONE or passthrough, inbound
//! HBONE (15008) and inbound plaintext (15006) to the app. Every connection
//! runs in its own task inside a span with a connection id, holding a drain
//! watcher; everything a connection needs comes from one `ProxyInputs`
//! bundle.

pub mod connections;
pub mod inbound;
pub mod outbound;
pub mod socket;

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};
use weft_api::Identity;
use weft_dataplane::certs::CertManager;
use weft_dataplane::dial::HboneDialer;
use weft_dataplane::drain::DrainTrigger;
use weft_dataplane::tls::TlsConfigs;
use weft_hbone::client::H2Settings;

use crate::capture::ebpf::Capture;
use crate::config::Config;
use crate::metrics::{Failure, Metrics, Reporter};
use crate::state::MeshState;

/// Pooled HBONE connections are per source pod (their sockets live in its
/// network namespace, so the server sees the pod's own IP), destination
/// identity and destination address.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PoolKey {
    pub src_netns: u64,
    pub src_identity: Identity,
    pub dst_identity: Identity,
    pub dst: SocketAddr,
}

pub struct ProxyInputs {
    pub cfg: Arc<Config>,
    pub state: MeshState,
    pub tls: Arc<TlsConfigs>,
    pub metrics: Arc<Metrics>,
    pub capture: Arc<Capture>,
    pub dialer: HboneDialer<PoolKey>,
    pub h2: H2Settings,
    pub connections: Arc<connections::Connections>,
    /// Hands out the drain watcher every accept loop and connection holds
    /// until it is done.
    pub drain: Arc<DrainTrigger>,
    /// Connections proxied now, all pods together (`--max-connections`).
    open_connections: Arc<AtomicUsize>,
    next_conn_id: AtomicU64,
}

impl ProxyInputs {
    pub fn new(
        cfg: Arc<Config>,
        state: MeshState,
        certs: Arc<CertManager>,
        metrics: Arc<Metrics>,
        capture: Arc<Capture>,
        drain: Arc<DrainTrigger>,
    ) -> Arc<Self> {
        let tls = TlsConfigs::new(certs);
        let h2 = H2Settings {
            keepalive_interval: Some(cfg.hbone_keepalive),
            keepalive_timeout: cfg.hbone_keepalive_timeout,
            idle_timeout: Some(cfg.hbone_idle_timeout),
            ..H2Settings::default()
        };
        Arc::new(Self {
            dialer: HboneDialer::new(
                tls.clone(),
                h2.clone(),
                cfg.max_streams_per_connection,
                Duration::from_secs(60),
            ),
            cfg,
            state,
            tls,
            metrics,
            capture,
            h2,
            connections: Default::default(),
            drain,
            open_connections: Arc::default(),
            next_conn_id: AtomicU64::new(1),
        })
    }

    pub fn certs(&self) -> &Arc<CertManager> {
        self.tls.certs()
    }

    pub fn conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// A connection's place under the node's and its pod's limits, given
/// back on drop.
struct Place {
    node: Arc<AtomicUsize>,
    pod: Arc<AtomicUsize>,
}

impl Place {
    fn take(pi: &ProxyInputs, side: &Side) -> Result<Place, Failure> {
        let take = |counter: &AtomicUsize, max: usize| {
            counter
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok()
        };
        if !take(&pi.open_connections, pi.cfg.max_connections) {
            return Err(Failure::NodeConnectionLimit);
        }
        if !take(&side.open, pi.cfg.max_connections_per_pod) {
            pi.open_connections.fetch_sub(1, Ordering::AcqRel);
            return Err(Failure::PodConnectionLimit);
        }
        Ok(Place {
            node: pi.open_connections.clone(),
            pod: side.open.clone(),
        })
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        self.node.fetch_sub(1, Ordering::AcqRel);
        self.pod.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One side of a pod's traffic, for its connection limit and metrics.
pub(crate) struct Side {
    pub reporter: Reporter,
    /// Connections open now on this side of the pod.
    pub open: Arc<AtomicUsize>,
}

/// Accepts on one of a pod's listeners until the pod is unenrolled
/// (`cancel`) or the ztunnel drains; each connection runs `handle` in its
/// own task holding a drain watcher (a drain waits for it) and a place
/// under the node's and the pod's connection limits (past either the
/// connection is closed at once and counted). Returning drops the
/// listener: new connections are refused (fail closed), never sent around
/// the proxy.
pub(crate) async fn accept_loop<F, Fut>(
    pi: &ProxyInputs,
    side: &Side,
    listener: TcpListener,
    cancel: CancellationToken,
    component: &'static str,
    mut handle: F,
) where
    F: FnMut(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let drain = pi.drain.watcher();
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            () = drain.signaled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let place = match Place::take(pi, side) {
                    Ok(place) => place,
                    Err(failure) => {
                        pi.metrics.failure(side.reporter, failure);
                        debug!(component, src = %peer, reason = failure.label(), "connection limit reached; closing");
                        drop(stream);
                        continue;
                    }
                };
                let connection = handle(stream, peer);
                let holds = drain.clone();
                tokio::spawn(async move {
                    connection.await;
                    drop((holds, place));
                });
            }
            Err(e) => {
                warn!(component, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// A pod whose traffic this ztunnel captures, as the proxy sees it.
pub struct EnrolledPod {
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub netns: crate::capture::netns::Netns,
    /// Connections open now from the pod's apps (outbound) and to them
    /// (inbound), for `--max-connections-per-pod`.
    pub outbound_open: Arc<AtomicUsize>,
    pub inbound_open: Arc<AtomicUsize>,
}

impl EnrolledPod {
    pub fn ip_like(&self, other: IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == other.is_ipv4())
    }
}
