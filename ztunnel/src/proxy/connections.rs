//! Inbound connections that are open now, with what policy decided them
//! on. When the mesh model changes, each is evaluated again against the new
//! policies and mTLS mode; one that is no longer allowed is closed, so a
//! new DENY (or STRICT) takes effect on live traffic, not only on new
//! connections.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use weft_api::Identity;

use crate::metrics::{DenialLabels, Metrics};
use crate::state::Snapshot;

#[derive(Clone)]
struct Tracked {
    src_ip: IpAddr,
    src_identity: Option<Identity>,
    target: SocketAddr,
    close: CancellationToken,
}

#[derive(Default)]
pub struct Connections {
    open: Mutex<HashMap<u64, Tracked>>,
    next: AtomicU64,
}

/// Removes its connection from the registry when dropped.
pub struct Registration {
    registry: Arc<Connections>,
    id: u64,
    pub closed_by_policy: CancellationToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.registry.lock().remove(&self.id);
    }
}

pub use weft_api::authorize::Refusal;

/// Counts one denied connection to `dst`.
pub fn record_denial(metrics: &Metrics, dst: &weft_api::model::Workload, policy: &str) {
    metrics
        .denials
        .get_or_create(&DenialLabels {
            policy: policy.to_owned(),
            destination_workload: dst.name.clone(),
            destination_workload_namespace: dst.namespace.clone(),
        })
        .inc();
}

/// Evaluates one inbound connection against the current model (the
/// decision itself is `weft_api::authorize::inbound`, which `weftctl
/// policy explain` runs too).
pub fn check(
    snap: &Snapshot,
    src_ip: IpAddr,
    src_identity: Option<&Identity>,
    target: SocketAddr,
) -> Result<(), Refusal> {
    let Some(dst) = snap.workload_by_ip(target.ip()) else {
        return Err(Refusal::Policy(Some("unknown-destination".into())));
    };
    weft_api::authorize::inbound(
        snap.policy_model(&dst.workload.namespace),
        dst.workload,
        snap.required_waypoints(dst.workload),
        src_ip,
        src_identity,
        target.port(),
    )
    .map(drop)
    .map_err(|(refusal, _)| refusal)
}

impl Connections {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Tracked>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(
        self: &Arc<Self>,
        src_ip: IpAddr,
        src_identity: Option<Identity>,
        target: SocketAddr,
    ) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let close = CancellationToken::new();
        self.lock().insert(
            id,
            Tracked {
                src_ip,
                src_identity,
                target,
                close: close.clone(),
            },
        );
        Registration {
            registry: self.clone(),
            id,
            closed_by_policy: close,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// At the drain deadline: closes every connection still open, logging
    /// each (source, destination, identity); returns how many.
    pub fn close_at_drain_deadline(&self) -> usize {
        let open: Vec<Tracked> = self.lock().values().cloned().collect();
        for t in &open {
            warn!(
                component = "drain",
                src = %t.src_ip,
                dst = %t.target,
                identity = %t.src_identity.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                "drain deadline reached: closing a connection still open"
            );
            t.close.cancel();
        }
        open.len()
    }

    /// Closes every open connection the model no longer allows; returns how
    /// many were closed.
    pub fn revalidate(&self, snap: &Snapshot, metrics: &Metrics) -> usize {
        let open: Vec<Tracked> = self.lock().values().cloned().collect();
        let mut closed = 0;
        for t in open {
            if t.close.is_cancelled() {
                continue;
            }
            if let Err(refusal) = check(snap, t.src_ip, t.src_identity.as_ref(), t.target) {
                let policy = refusal.policy_name();
                if let Some(dst) = snap.workload_by_ip(t.target.ip()) {
                    record_denial(metrics, dst.workload, &policy);
                }
                info!(
                    component = "inbound",
                    src = %t.src_ip,
                    dst = %t.target,
                    identity = %t.src_identity.as_ref().map(|i| i.to_string()).unwrap_or_default(),
                    policy,
                    "open connection closed: policy now denies it"
                );
                t.close.cancel();
                closed += 1;
            }
        }
        closed
    }
}
