//! The L4 proxy: outbound capture (15001) to HBONE or passthrough, inbound
//! HBONE (15008) and inbound plaintext (15006) to the app. Every connection
//! runs in its own task inside a span with a connection id; everything a
//! connection needs comes from one `ProxyInputs` bundle.

pub mod connections;
pub mod inbound;
pub mod outbound;
pub mod socket;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use weft_api::Identity;
use weft_hbone::client::H2Settings;
use weft_hbone::pool::Pool;

use crate::capture::ebpf::Capture;
use crate::config::Config;
use crate::identity::CertManager;
use crate::metrics::Metrics;
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
    pub certs: Arc<CertManager>,
    pub metrics: Arc<Metrics>,
    pub capture: Arc<Capture>,
    pub pool: Pool<PoolKey>,
    pub h2: H2Settings,
    pub connections: Arc<connections::Connections>,
    next_conn_id: AtomicU64,
}

impl ProxyInputs {
    pub fn new(
        cfg: Arc<Config>,
        state: MeshState,
        certs: Arc<CertManager>,
        metrics: Arc<Metrics>,
        capture: Arc<Capture>,
    ) -> Arc<Self> {
        Arc::new(Self {
            pool: Pool::new(cfg.max_streams_per_connection, Duration::from_secs(60)),
            cfg,
            state,
            certs,
            metrics,
            capture,
            h2: H2Settings::default(),
            connections: Default::default(),
            next_conn_id: AtomicU64::new(1),
        })
    }

    pub fn conn_id(&self) -> u64 {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// A pod whose traffic this ztunnel captures, as the proxy sees it.
pub struct EnrolledPod {
    pub namespace: String,
    pub name: String,
    pub ips: Vec<IpAddr>,
    pub netns: crate::capture::netns::Netns,
}

impl EnrolledPod {
    pub fn ip_like(&self, other: IpAddr) -> Option<IpAddr> {
        self.ips
            .iter()
            .copied()
            .find(|ip| ip.is_ipv4() == other.is_ipv4())
    }
}
