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
use tracing::info;
use weft_api::model::MtlsMode;
use weft_api::Identity;

use crate::metrics::{DenialLabels, Metrics};
use crate::rbac::{self, Decision};
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

/// Why an inbound connection may not proceed (or continue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    Policy(Option<String>),
    StrictMtls,
    /// A Service selecting the pod uses this waypoint (`namespace/name`),
    /// and the connection did not come from it.
    WaypointRequired(String),
}

impl Refusal {
    /// The `policy` label of the denial: the policy's namespace/name, or
    /// what denied it when no single policy did.
    pub fn policy_name(&self) -> String {
        match self {
            Refusal::Policy(p) => p.clone().unwrap_or_else(|| "no-matching-allow".into()),
            Refusal::StrictMtls => "peer-authentication-strict".into(),
            Refusal::WaypointRequired(w) => format!("waypoint-required:{w}"),
        }
    }
}

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

/// Evaluates one inbound connection against the current model.
pub fn check(
    snap: &Snapshot,
    src_ip: IpAddr,
    src_identity: Option<&Identity>,
    target: SocketAddr,
) -> Result<(), Refusal> {
    let Some(dst) = snap.workload_by_ip(target.ip()) else {
        return Err(Refusal::Policy(Some("unknown-destination".into())));
    };
    if src_identity.is_none() && snap.model.mtls_mode(dst.workload) == MtlsMode::Strict {
        return Err(Refusal::StrictMtls);
    }
    // L7 policy lives in the waypoint: a client that skips it is refused.
    let waypoints = snap.required_waypoints(dst.workload);
    if !waypoints.is_empty() && !waypoints.iter().any(|(id, _)| src_identity == Some(id)) {
        return Err(Refusal::WaypointRequired(waypoints[0].1.clone()));
    }
    let conn = rbac::Connection {
        src_ip,
        src_identity,
        dst_port: target.port(),
    };
    match rbac::evaluate(snap, dst.workload, &conn) {
        Decision::Allow => Ok(()),
        Decision::Deny { policy } => Err(Refusal::Policy(policy)),
    }
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
