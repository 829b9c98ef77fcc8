//! Prometheus metrics (`weft_` prefix, mesh-standard labels). Connection
//! counters are recorded by `ConnectionGuard`, an RAII guard: no early
//! return can skip "closed" or the byte counts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    source,
    destination,
}

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SecurityPolicy {
    mutual_tls,
    none,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConnectionLabels {
    pub reporter: Reporter,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_service: String,
    pub connection_security_policy: SecurityPolicy,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub reporter: Reporter,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HandshakeLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    pub policy: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
}

pub struct Metrics {
    pub opened: Family<ConnectionLabels, Counter>,
    pub closed: Family<ConnectionLabels, Counter>,
    pub sent_bytes: Family<ConnectionLabels, Counter>,
    pub received_bytes: Family<ConnectionLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub handshake_failures: Family<HandshakeLabels, Counter>,
    pub denials: Family<DenialLabels, Counter>,
    pub enrolled_pods: Gauge,
    pub config_updates: Counter,
    pub config_rejections: Counter,
    pub active_connections: Gauge,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("weft");
        let m = Metrics {
            opened: Family::default(),
            closed: Family::default(),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            failures: Family::default(),
            handshake_failures: Family::default(),
            denials: Family::default(),
            enrolled_pods: Gauge::default(),
            config_updates: Counter::default(),
            config_rejections: Counter::default(),
            active_connections: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "tcp_connections_opened",
            "TCP connections opened through the proxy",
            m.opened.clone(),
        );
        registry.register(
            "tcp_connections_closed",
            "TCP connections closed",
            m.closed.clone(),
        );
        registry.register(
            "tcp_sent_bytes",
            "Bytes sent toward the destination, counted when a connection closes",
            m.sent_bytes.clone(),
        );
        registry.register(
            "tcp_received_bytes",
            "Bytes received from the destination, counted when a connection closes",
            m.received_bytes.clone(),
        );
        registry.register(
            "connection_failures",
            "Connections that failed, by reason",
            m.failures.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "Inbound mTLS handshakes rejected, by reason",
            m.handshake_failures.clone(),
        );
        registry.register(
            "authorization_denials",
            "Connections denied by authorization policy",
            m.denials.clone(),
        );
        registry.register(
            "enrolled_pods",
            "Pods whose traffic this ztunnel captures",
            m.enrolled_pods.clone(),
        );
        registry.register(
            "config_updates",
            "Mesh model versions applied",
            m.config_updates.clone(),
        );
        registry.register(
            "config_rejections",
            "Mesh model updates rejected (the last good one stays)",
            m.config_rejections.clone(),
        );
        registry.register(
            "active_connections",
            "Connections being proxied now",
            m.active_connections.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    pub fn failure(&self, reporter: Reporter, reason: &str) {
        self.failures
            .get_or_create(&FailureLabels {
                reporter,
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// Counts one connection: "opened" now, "closed" and the bytes on drop.
pub struct ConnectionGuard {
    metrics: Arc<Metrics>,
    labels: ConnectionLabels,
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

impl ConnectionGuard {
    pub fn open(metrics: Arc<Metrics>, labels: ConnectionLabels) -> Self {
        metrics.opened.get_or_create(&labels).inc();
        metrics.active_connections.inc();
        Self {
            metrics,
            labels,
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
        }
    }

    pub fn record(&self, sent: u64, received: u64) {
        self.sent.fetch_add(sent, Ordering::Relaxed);
        self.received.fetch_add(received, Ordering::Relaxed);
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let m = &self.metrics;
        m.active_connections.dec();
        m.closed.get_or_create(&self.labels).inc();
        m.sent_bytes
            .get_or_create(&self.labels)
            .inc_by(self.sent.load(Ordering::Relaxed));
        m.received_bytes
            .get_or_create(&self.labels)
            .inc_by(self.received.load(Ordering::Relaxed));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guard_records_once_on_drop() {
        let m = Metrics::new();
        let labels = ConnectionLabels {
            reporter: Reporter::source,
            source_workload: "a".into(),
            source_workload_namespace: "ns".into(),
            source_principal: "spiffe://cluster.local/ns/ns/sa/a".into(),
            destination_workload: "b".into(),
            destination_workload_namespace: "ns".into(),
            destination_principal: "spiffe://cluster.local/ns/ns/sa/b".into(),
            destination_service: "b.ns".into(),
            connection_security_policy: SecurityPolicy::mutual_tls,
        };
        {
            let g = ConnectionGuard::open(m.clone(), labels.clone());
            g.record(10, 20);
        }
        let text = m.encode();
        assert!(
            text.contains("weft_tcp_connections_opened_total{reporter=\"source\""),
            "{text}"
        );
        assert!(
            text.contains("weft_tcp_connections_closed_total{"),
            "{text}"
        );
        assert!(text.contains("} 10\n"), "{text}");
        assert!(text.contains("} 20\n"), "{text}");
        assert!(text.contains("weft_active_connections 0"), "{text}");
    }
}
