//! Leader election over a `coordination.k8s.io/v1` Lease, for the parts
//! that write to the API server (status, Events). Every replica serves
//! config; writers check `is_leader` first.
//!
//! The holder renews `renewTime` every `retry_period`. A candidate takes
//! the Lease when it has no holder, or when its record has not changed for
//! `lease_duration` by the candidate's own clock (as client-go does, so
//! clock skew between replicas does not matter). Every write carries the
//! `resourceVersion` it read: a 409 Conflict means another replica wrote
//! first, and this round is lost.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::watch;

#[derive(Clone, Debug)]
pub struct LeaderConfig {
    pub namespace: String,
    pub lease_name: String,
    /// This replica (its pod name).
    pub identity: String,
    pub lease_duration: Duration,
    pub retry_period: Duration,
}

impl LeaderConfig {
    /// Lease `weft-controller` in `namespace`, 15 s lease, 2 s retry.
    pub fn new(namespace: impl Into<String>, identity: impl Into<String>) -> Self {
        LeaderConfig {
            namespace: namespace.into(),
            lease_name: "weft-controller".to_owned(),
            identity: identity.into(),
            lease_duration: Duration::from_secs(15),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// Starts the election; the receiver says whether this replica leads now.
pub fn spawn(
    client: Client,
    cfg: LeaderConfig,
) -> (watch::Receiver<bool>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(false);
    (rx, tokio::spawn(run(client, cfg, tx)))
}

/// Runs the election until every receiver of `is_leader` is gone.
pub async fn run(client: Client, cfg: LeaderConfig, is_leader: watch::Sender<bool>) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut elector = Elector {
        cfg,
        observed: None,
        last_renew: None,
    };
    loop {
        let leading = match elector.try_acquire_or_renew(&api).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(component = "leader", error = %e, "lease update failed");
                // Keep leading only while the lease we hold cannot have expired.
                elector
                    .last_renew
                    .is_some_and(|t| t.elapsed() < elector.cfg.lease_duration)
            }
        };
        if !leading {
            elector.last_renew = None;
        }
        is_leader.send_if_modified(|cur| {
            if *cur != leading {
                tracing::info!(component = "leader", identity = %elector.cfg.identity, leading, "leadership changed");
                *cur = leading;
                true
            } else {
                false
            }
        });
        if is_leader.is_closed() {
            return;
        }
        tokio::time::sleep(elector.cfg.retry_period).await;
    }
}

struct Elector {
    cfg: LeaderConfig,
    /// The other holder's record as last seen, and when it last changed.
    observed: Option<(Option<String>, Option<MicroTime>, Instant)>,
    last_renew: Option<Instant>,
}

impl Elector {
    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.cfg.lease_duration.as_secs()).unwrap_or(i32::MAX)
    }

    /// One round: Ok(true) when this replica holds the Lease afterwards.
    async fn try_acquire_or_renew(&mut self, api: &Api<Lease>) -> Result<bool, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let current = match api.get_opt(&self.cfg.lease_name).await? {
            Some(l) => l,
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.cfg.lease_name.clone()),
                        namespace: Some(self.cfg.namespace.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.cfg.identity.clone()),
                        lease_duration_seconds: Some(self.lease_seconds()),
                        acquire_time: Some(now.clone()),
                        renew_time: Some(now),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                return match api.create(&PostParams::default(), &lease).await {
                    Ok(_) => {
                        self.last_renew = Some(Instant::now());
                        Ok(true)
                    }
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e),
                };
            }
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.cfg.identity.as_str());
        if !mine && holder.is_some() {
            let record = (holder.clone(), spec.renew_time.clone());
            let changed = self
                .observed
                .as_ref()
                .is_none_or(|(h, r, _)| (h, r) != (&record.0, &record.1));
            if changed {
                self.observed = Some((record.0, record.1, Instant::now()));
            }
            let duration = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(self.cfg.lease_duration);
            let expired = self
                .observed
                .as_ref()
                .is_some_and(|(_, _, seen)| seen.elapsed() >= duration);
            if !expired {
                return Ok(false);
            }
        }
        let mut lease = current;
        let mut new_spec = spec.clone();
        if !mine {
            new_spec.holder_identity = Some(self.cfg.identity.clone());
            new_spec.acquire_time = Some(now.clone());
            new_spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        new_spec.lease_duration_seconds = Some(self.lease_seconds());
        new_spec.renew_time = Some(now);
        lease.spec = Some(new_spec);
        // `replace` sends the resourceVersion we read: a concurrent writer
        // makes this a 409.
        match api
            .replace(&self.cfg.lease_name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                self.last_renew = Some(Instant::now());
                self.observed = None;
                Ok(true)
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
