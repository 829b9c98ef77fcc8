//! Certificate expiry as a metric: `weft_certificate_expiration_timestamp_seconds`
//! per identity, read from the certificate manager at each scrape, so an
//! alert can fire well before a certificate that stopped renewing expires.

use std::sync::{Arc, OnceLock, Weak};
use std::time::SystemTime;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;

use super::CertManager;

/// Registered with the proxy's metrics before its certificate manager
/// exists; [`CertExpiry::watch`] binds it later. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct CertExpiry {
    certs: Arc<OnceLock<Weak<CertManager>>>,
}

impl CertExpiry {
    /// Reports the certificates of `certs` from now on (the first call wins).
    pub fn watch(&self, certs: &Arc<CertManager>) {
        let _ = self.certs.set(Arc::downgrade(certs));
    }
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertManager").finish_non_exhaustive()
    }
}

impl Collector for CertExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(certs) = self.certs.get().and_then(Weak::upgrade) else {
            return Ok(());
        };
        let held: Vec<(String, f64)> = certs
            .status()
            .into_iter()
            .filter_map(|s| {
                let t = s.not_after?.duration_since(SystemTime::UNIX_EPOCH).ok()?;
                Some((s.identity.to_string(), t.as_secs() as f64))
            })
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        let gauge = ConstGauge::new(0.0f64);
        let mut family = encoder.encode_descriptor(
            "certificate_expiration_timestamp_seconds",
            "When each workload certificate this process holds expires (Unix time)",
            None,
            gauge.metric_type(),
        )?;
        for (identity, at) in held {
            let labels = [("identity", identity)];
            ConstGauge::new(at).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
