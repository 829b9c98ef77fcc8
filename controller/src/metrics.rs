//! What the controller shows operators on its metrics port (15014):
//! `/metrics` (the config stream's counters, push and apply latency,
//! each subscriber's versions, the mesh roots' expiry, build and process)
//! `/debug/subscribers` (every open config stream as JSON: node, role,
//! versions sent and acknowledged, the last NACK and its reason), which
//! `weftctl proxy-status` and `weftctl check` read, and `/debug/model` (the
//! mesh model served, for `weftctl workloads`, `services`, `policies`).

use std::sync::Arc;
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use weft_api::MeshModel;
use weft_pki::TrustBundle;

use crate::model::PolicyStatus;
use crate::xds::XdsCounters;

/// The live inputs of the controller's metrics.
#[derive(Clone)]
pub struct Sources {
    pub counters: Arc<XdsCounters>,
    pub instance_id: String,
    pub models: watch::Receiver<Arc<MeshModel>>,
    pub status: watch::Receiver<Arc<Vec<PolicyStatus>>>,
    pub trust: watch::Receiver<TrustBundle>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").finish_non_exhaustive()
    }
}

/// The registry behind `/metrics`.
pub struct ControllerMetrics {
    registry: Registry,
    sources: Sources,
}

impl ControllerMetrics {
    pub fn new(sources: Sources) -> Self {
        let mut registry = Registry::with_prefix("weft");
        weft_dataplane::metrics::register_process(&mut registry, "controller");
        registry.register(
            "controller_config_push_duration_seconds",
            "From a config version's creation to its send on one stream, in seconds",
            sources.counters.push_latency.clone(),
        );
        registry.register(
            "controller_config_apply_duration_seconds",
            "From an update's send to the subscriber's ACK (its check and apply included), in seconds",
            sources.counters.apply_latency.clone(),
        );
        registry.register_collector(Box::new(sources.clone()));
        Self { registry, sources }
    }

    pub fn encode(&self) -> String {
        weft_dataplane::metrics::encode(&self.registry)
    }

    /// `/debug/model`: the mesh model this controller serves.
    pub fn model_json(&self) -> serde_json::Value {
        serde_json::to_value(&**self.sources.models.borrow()).unwrap_or_default()
    }

    /// `/debug/subscribers`.
    pub fn subscribers_json(&self) -> serde_json::Value {
        let c = &self.sources.counters;
        serde_json::json!({
            "instance_id": self.sources.instance_id,
            "latest_version": c.latest_version.load(std::sync::atomic::Ordering::Relaxed),
            "subscribers": c.subscriber_statuses(),
        })
    }
}

fn gauge(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: f64,
) -> Result<(), std::fmt::Error> {
    let g = ConstGauge::new(v);
    g.encode(encoder.encode_descriptor(name, help, None, g.metric_type())?)
}

fn counter(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    v: u64,
) -> Result<(), std::fmt::Error> {
    let c = ConstCounter::new(v);
    c.encode(encoder.encode_descriptor(name, help, None, c.metric_type())?)
}

impl Collector for Sources {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.counters.snapshot();
        let model = self.models.borrow().clone();
        let rejected = self.status.borrow().iter().filter(|p| !p.accepted).count();
        gauge(
            &mut e,
            "controller_workloads",
            "Workloads in the mesh model",
            model.workloads.len() as f64,
        )?;
        gauge(
            &mut e,
            "controller_services",
            "Services in the mesh model",
            model.services.len() as f64,
        )?;
        gauge(
            &mut e,
            "controller_policies_rejected",
            "Policies whose Accepted condition is False",
            rejected as f64,
        )?;
        gauge(
            &mut e,
            "controller_subscribers",
            "ztunnels and waypoints subscribed to the config stream",
            s.subscribers.max(0) as f64,
        )?;
        gauge(
            &mut e,
            "controller_config_version",
            "The newest config version of this controller process",
            self.counters
                .latest_version
                .load(std::sync::atomic::Ordering::Relaxed) as f64,
        )?;
        for (name, help, v) in [
            ("controller_config_pushes", "Config updates sent", s.pushes),
            (
                "controller_config_full_pushes",
                "Config updates that were full snapshots",
                s.full_pushes,
            ),
            (
                "controller_config_pushed_bytes",
                "Encoded bytes of config updates sent",
                s.bytes_pushed,
            ),
            (
                "controller_config_acks",
                "Config updates acknowledged",
                s.acks,
            ),
            (
                "controller_config_nacks",
                "Config updates rejected by a subscriber",
                s.nacks,
            ),
            (
                "controller_config_streams_rejected",
                "Config streams refused (bad request or authentication)",
                s.rejected,
            ),
            (
                "controller_config_streams_disconnected",
                "Config streams ended because the client went away",
                s.disconnects,
            ),
        ] {
            counter(&mut e, name, help, v)?;
        }
        let subs = self.counters.subscriber_statuses();
        if !subs.is_empty() {
            let mut acked = e.encode_descriptor(
                "controller_subscriber_acked_version",
                "The newest config version each subscriber acknowledged (0: none yet)",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            for sub in &subs {
                let labels = [("node", sub.node.as_str()), ("role", sub.role)];
                ConstGauge::new(sub.acked_version as i64).encode(acked.encode_family(&labels)?)?;
            }
            let mut nacked = e.encode_descriptor(
                "controller_subscriber_nacked",
                "1 while a subscriber's last answer on its stream was a NACK",
                None,
                ConstGauge::new(0i64).metric_type(),
            )?;
            for sub in &subs {
                let labels = [("node", sub.node.as_str()), ("role", sub.role)];
                let v = sub
                    .last_nack
                    .as_ref()
                    .is_some_and(|n| n.version > sub.acked_version);
                ConstGauge::new(i64::from(v)).encode(nacked.encode_family(&labels)?)?;
            }
        }
        let roots: Vec<(String, f64)> = self
            .trust
            .borrow()
            .roots
            .iter()
            .filter_map(|der| {
                let (_, not_after) = weft_pki::validity_of_cert(der).ok()?;
                let t = not_after.duration_since(SystemTime::UNIX_EPOCH).ok()?;
                Some((root_name(der), t.as_secs() as f64))
            })
            .collect();
        if !roots.is_empty() {
            let mut fam = e.encode_descriptor(
                "controller_root_expiration_timestamp_seconds",
                "When each trusted mesh root expires (Unix time)",
                None,
                ConstGauge::new(0.0f64).metric_type(),
            )?;
            for (subject, at) in roots {
                let labels = [("subject", subject)];
                ConstGauge::new(at).encode(fam.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// A root's subject common name (distinct per root), or "unknown".
fn root_name(der: &rustls_pki_types::CertificateDer<'_>) -> String {
    use x509_parser::prelude::FromDer;
    x509_parser::certificate::X509Certificate::from_der(der)
        .ok()
        .and_then(|(_, c)| {
            c.subject()
                .iter_common_name()
                .next()
                .and_then(|cn| cn.as_str().ok().map(str::to_owned))
        })
        .unwrap_or_else(|| "unknown".into())
}
