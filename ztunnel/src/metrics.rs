//! Prometheus metrics of the ztunnel (`weft_` prefix, mesh-standard
//! labels), next to the families every data-plane process has
//! (`weft_dataplane::metrics::CommonMetrics`). A connection's outcome is one
//! RAII guard, [`ConnectionGuard`]: it owns the labels, counts bytes while
//! they are copied, and on drop records "closed", the bytes, and the typed
//! reason a connection failed, so no early return (and no close by policy)
//! can lose any of it.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use weft_dataplane::metrics::CommonMetrics;
use weft_hbone::Transferred;

#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Reporter {
    #[default]
    source,
    destination,
}

#[derive(Clone, Copy, Debug, Default, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum SecurityPolicy {
    mutual_tls,
    #[default]
    none,
}

#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
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

/// Why a connection did not get through, as the `reason` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// Outbound: nothing recorded where the app meant to go.
    NoOriginalDestination,
    /// Outbound: the app dialled one of ztunnel's own ports in its pod.
    ProxyPort,
    UnknownSourceWorkload,
    UnknownDestinationWorkload,
    /// A Service with no endpoint for the port.
    NoHealthyEndpoint,
    /// A socket inside the pod's network namespace could not be made.
    Socket,
    /// Passthrough connect failed.
    Connect,
    /// The HBONE tunnel could not be opened.
    Hbone(weft_hbone::FailureReason),
    /// The peer answered the CONNECT with this status.
    HboneStatus(u16),
    /// Inbound: no certificate for the destination pod.
    NoCertificate,
    /// Inbound: the CONNECT target is not this pod (or a proxy port).
    BadTarget,
    /// Inbound: the app did not accept the connection (or not in time).
    AppUnreachable,
    /// The node's `--max-connections` was reached.
    NodeConnectionLimit,
    /// The pod's `--max-connections-per-pod` was reached.
    PodConnectionLimit,
    /// Plaintext inbound: no byte moved either way within
    /// `--first-byte-timeout`.
    FirstByteTimeout,
}

impl Failure {
    pub fn label(&self) -> String {
        match self {
            Failure::NoOriginalDestination => "no_original_destination".into(),
            Failure::ProxyPort => "proxy_port".into(),
            Failure::UnknownSourceWorkload => "unknown_source_workload".into(),
            Failure::UnknownDestinationWorkload => "unknown_destination_workload".into(),
            Failure::NoHealthyEndpoint => "no_healthy_endpoint".into(),
            Failure::Socket => "socket".into(),
            Failure::Connect => "connect".into(),
            Failure::Hbone(r) => format!("hbone_{}", r.as_str()),
            Failure::HboneStatus(code) => format!("hbone_status_{code}"),
            Failure::NoCertificate => "no_certificate".into(),
            Failure::BadTarget => "bad_target".into(),
            Failure::AppUnreachable => "app_unreachable".into(),
            Failure::NodeConnectionLimit => "node_connection_limit".into(),
            Failure::PodConnectionLimit => "pod_connection_limit".into(),
            Failure::FirstByteTimeout => "first_byte_timeout".into(),
        }
    }

    /// The failure behind an error opening an HBONE tunnel.
    pub fn of_hbone(e: &weft_hbone::HboneError) -> Failure {
        match e {
            weft_hbone::HboneError::Status(code) => Failure::HboneStatus(code.as_u16()),
            other => Failure::Hbone(other.reason()),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub reporter: Reporter,
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DenialLabels {
    pub policy: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
}

pub struct Metrics {
    pub common: CommonMetrics,
    pub opened: Family<ConnectionLabels, Counter>,
    pub closed: Family<ConnectionLabels, Counter>,
    pub sent_bytes: Family<ConnectionLabels, Counter>,
    pub received_bytes: Family<ConnectionLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub denials: Family<DenialLabels, Counter>,
    pub enrolled_pods: Gauge,
    pub active_connections: Gauge,
    registry: Registry,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("weft");
        let common = CommonMetrics::register(&mut registry, "ztunnel");
        let m = Metrics {
            common,
            opened: Family::default(),
            closed: Family::default(),
            sent_bytes: Family::default(),
            received_bytes: Family::default(),
            failures: Family::default(),
            denials: Family::default(),
            enrolled_pods: Gauge::default(),
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
            "active_connections",
            "Connections being proxied now",
            m.active_connections.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    pub fn encode(&self) -> String {
        weft_dataplane::metrics::encode(&self.registry)
    }

    /// Counts a failure that happened before any connection guard existed.
    pub fn failure(&self, reporter: Reporter, failure: Failure) {
        self.failures
            .get_or_create(&FailureLabels {
                reporter,
                reason: failure.label(),
            })
            .inc();
    }
}

/// One proxied connection's outcome. Created when handling starts; labels
/// are filled in as they become known. [`ConnectionGuard::established`]
/// counts it opened; on drop an established connection is counted closed
/// with the bytes [`ConnectionGuard::moved`] saw, and a connection marked
/// with [`ConnectionGuard::fail`] is counted as that failure.
pub struct ConnectionGuard {
    metrics: Arc<Metrics>,
    pub labels: ConnectionLabels,
    moved: Transferred,
    /// The copy's second side is the client (its `up` flows back to it).
    reversed: bool,
    established: bool,
    failure: Option<Failure>,
}

impl ConnectionGuard {
    pub fn new(metrics: Arc<Metrics>, reporter: Reporter) -> Self {
        Self {
            metrics,
            labels: ConnectionLabels {
                reporter,
                ..Default::default()
            },
            moved: Transferred::default(),
            reversed: false,
            established: false,
            failure: None,
        }
    }

    /// The connection carries bytes from now on: counted opened.
    pub fn established(&mut self) {
        if !self.established {
            self.established = true;
            self.metrics.opened.get_or_create(&self.labels).inc();
            self.metrics.active_connections.inc();
        }
    }

    /// Where the copy counts its bytes (up: toward the destination).
    pub fn moved(&self) -> &Transferred {
        &self.moved
    }

    /// For a copy whose first side is the destination (the app, inbound):
    /// its `down` is what was sent toward the destination.
    pub fn reverse_direction(&mut self) {
        self.reversed = true;
    }

    /// Bytes (sent toward the destination, received from it) so far.
    pub fn bytes(&self) -> (u64, u64) {
        let (up, down) = (self.moved.up(), self.moved.down());
        if self.reversed {
            (down, up)
        } else {
            (up, down)
        }
    }

    /// Records why the connection failed (the last call wins).
    pub fn fail(&mut self, failure: Failure) {
        self.failure = Some(failure);
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        let m = &self.metrics;
        if let Some(f) = self.failure {
            m.failure(self.labels.reporter, f);
        }
        if self.established {
            let (sent, received) = self.bytes();
            m.active_connections.dec();
            m.closed.get_or_create(&self.labels).inc();
            m.sent_bytes.get_or_create(&self.labels).inc_by(sent);
            m.received_bytes
                .get_or_create(&self.labels)
                .inc_by(received);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> ConnectionLabels {
        ConnectionLabels {
            reporter: Reporter::source,
            source_workload: "a".into(),
            source_workload_namespace: "ns".into(),
            source_principal: "spiffe://cluster.local/ns/ns/sa/a".into(),
            destination_workload: "b".into(),
            destination_workload_namespace: "ns".into(),
            destination_principal: "spiffe://cluster.local/ns/ns/sa/b".into(),
            destination_service: "b.ns".into(),
            connection_security_policy: SecurityPolicy::mutual_tls,
        }
    }

    #[tokio::test]
    async fn guard_counts_bytes_as_they_move_even_when_the_copy_is_cut_off() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let m = Metrics::new();
        {
            let mut g = ConnectionGuard::new(m.clone(), Reporter::source);
            g.labels = labels();
            g.established();
            let (mut client, mut a) = tokio::io::duplex(1024);
            let (mut b, mut server) = tokio::io::duplex(1024);
            client.write_all(&[7u8; 10]).await.unwrap();
            server.write_all(&[9u8; 20]).await.unwrap();
            // Cut off (as a policy close would) once the bytes are through:
            // neither side ever reaches EOF.
            let copy = weft_hbone::copy_bidirectional(&mut a, &mut b, g.moved());
            let reads = async {
                let mut buf = [0u8; 20];
                server.read_exact(&mut buf[..10]).await.unwrap();
                client.read_exact(&mut buf).await.unwrap();
            };
            tokio::select! {
                _ = copy => panic!("the copy cannot end"),
                () = reads => {}
            }
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

    #[test]
    fn a_failed_connection_is_counted_by_its_reason_and_never_opened() {
        let m = Metrics::new();
        {
            let mut g = ConnectionGuard::new(m.clone(), Reporter::destination);
            g.fail(Failure::AppUnreachable);
        }
        {
            let mut g = ConnectionGuard::new(m.clone(), Reporter::source);
            g.fail(Failure::of_hbone(&weft_hbone::HboneError::Status(
                http::StatusCode::UNAUTHORIZED,
            )));
        }
        let text = m.encode();
        assert!(
            text.contains("weft_connection_failures_total{reporter=\"destination\",reason=\"app_unreachable\"} 1"),
            "{text}"
        );
        assert!(text.contains("reason=\"hbone_status_401\"} 1"), "{text}");
        assert!(
            !text.contains("weft_tcp_connections_opened_total{"),
            "{text}"
        );
    }
}
