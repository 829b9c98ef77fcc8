//! The data plane's side of the controller: where it is ([`addr`]) and how
//! to trust it ([`trust`]: the CA file as it changes and the mesh roots the
//! controller sends), workload certificates from its CA ([`ca_client`]),
//! and the config stream ([`config_stream`]); [`connect`] wires them for a
//! proxy from its flags.

pub mod addr;
pub mod ca_client;
pub mod config_stream;
pub mod trust;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use prometheus_client::metrics::counter::Counter;
use weft_api::config_cache::{Changes, ConfigCache};

pub use addr::{ControllerAddr, CONTROLLER_SERVER_NAME};
pub use ca_client::GrpcCaProvider;
pub use config_stream::{ConfigSink, ConfigStream, Role};
pub use trust::{error_chain, ControllerConnectError, ControllerTrust};

use crate::certs::{CertManager, TrustRoots};
use crate::metrics::CommonMetrics;
use crate::state::{Compiled, ModelState};

/// How a proxy reaches the controller (from its flags).
#[derive(Clone, Debug)]
pub struct ControllerSettings {
    /// `host:port` (TLS) or a URI with `https://` or `http://`.
    pub address: String,
    /// Roots that verify the controller's serving certificate (re-read at
    /// every connection; the mesh roots the controller sends are trusted
    /// too).
    pub ca_file: Option<PathBuf>,
    /// This process's bearer token (a ServiceAccount or bootstrap token).
    pub token_file: PathBuf,
    /// The node this process serves.
    pub node: String,
    pub role: Role,
    /// Workload certificate lifetime asked for (zero: the CA's default).
    pub cert_ttl: Duration,
}

/// The controller address as a URI tonic accepts: `https://` unless the
/// address says otherwise.
pub fn controller_uri(address: &str) -> String {
    if address.contains("://") {
        address.to_owned()
    } else {
        format!("https://{address}")
    }
}

/// Starts the config stream into `state` (counting updates and rejections
/// in `metrics`) and returns the certificate manager backed by the
/// controller's CA; both share the trust roots the controller sends.
pub fn connect<T: Compiled>(
    settings: &ControllerSettings,
    state: ModelState<T>,
    metrics: &CommonMetrics,
) -> anyhow::Result<Arc<CertManager>> {
    let uri = controller_uri(&settings.address);
    let token = std::fs::read_to_string(&settings.token_file)
        .with_context(|| format!("token file {}", settings.token_file.display()))?
        .trim()
        .to_owned();
    if uri.starts_with("http://") {
        tracing::warn!(component = "config", controller = %uri, "talking to the controller without TLS: the token travels in the clear");
    }
    let trust = TrustRoots::default();
    let who = match settings.role {
        Role::Ztunnel => "ztunnel",
        Role::Waypoint => "waypoint",
    };
    let controller_trust = match &settings.ca_file {
        Some(f) => Some(Arc::new(ControllerTrust::from_file(f, trust.clone(), who)?)),
        None => None,
    };
    let addr = ControllerAddr {
        uri,
        trust: controller_trust,
    };
    tokio::spawn(
        ConfigStream {
            endpoint: addr.clone(),
            node: settings.node.clone(),
            token: token.clone(),
            role: settings.role,
            trust: trust.clone(),
            sink: Arc::new(StateSink {
                state,
                updates: metrics.config_updates.clone(),
                rejections: metrics.config_rejections.clone(),
            }),
        }
        .run(),
    );
    let provider = GrpcCaProvider::new(addr, token, settings.cert_ttl, trust.clone())?;
    Ok(CertManager::new(Arc::new(provider), trust))
}

/// Installs each accepted model in a [`ModelState`] and counts it.
pub struct StateSink<T> {
    pub state: ModelState<T>,
    pub updates: Counter,
    pub rejections: Counter,
}

impl<T: Compiled> ConfigSink for StateSink<T> {
    fn model_changed(&self, cache: &ConfigCache, changes: &Changes, _version: u64) {
        self.state.apply(cache, changes);
        self.updates.inc();
    }

    fn rejected(&self, _version: u64, _error: &str) {
        self.rejections.inc();
    }
}
