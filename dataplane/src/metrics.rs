//! The metric families every data-plane process has (`weft_` prefix, base
//! units): config updates applied and rejected, inbound handshake failures
//! by reason, and build information. Each proxy registers these in its own
//! registry next to its specific families.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: &'static str,
    version: &'static str,
}

pub struct CommonMetrics {
    pub config_updates: Counter,
    pub config_rejections: Counter,
    pub handshake_failures: Family<ReasonLabels, Counter>,
}

impl CommonMetrics {
    /// Registers the common families in `registry` (made with the `weft`
    /// prefix), with build info for `component`.
    pub fn register(registry: &mut Registry, component: &'static str) -> Self {
        let m = CommonMetrics {
            config_updates: Counter::default(),
            config_rejections: Counter::default(),
            handshake_failures: Family::default(),
        };
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
            "tls_handshake_failures",
            "Inbound mTLS handshakes rejected, by reason",
            m.handshake_failures.clone(),
        );
        let build: Family<BuildLabels, Gauge> = Family::default();
        build
            .get_or_create(&BuildLabels {
                component,
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "Component and version of this process", build);
        m
    }

    pub fn handshake_failed(&self, reason: &str) {
        self.handshake_failures
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }
}

/// The text exposition of `registry` (empty if encoding fails).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}
