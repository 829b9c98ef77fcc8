//! Where the controller is and how to trust it: its gRPC address and, for
//! `https://`, the roots that verify its serving certificate (see
//! [`super::trust`]). Shared by the config stream and the CA client.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use super::trust::{ControllerConnector, ControllerTrust};

/// The name the controller's serving certificate carries, whatever address
/// it is reached at.
pub const CONTROLLER_SERVER_NAME: &str = "weft-controller";

#[derive(Clone)]
pub struct ControllerAddr {
    pub uri: String,
    /// What verifies the controller (https only).
    pub trust: Option<Arc<ControllerTrust>>,
}

impl std::fmt::Debug for ControllerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerAddr")
            .field("uri", &self.uri)
            .field("tls", &self.trust.is_some())
            .finish()
    }
}

impl ControllerAddr {
    pub fn tls(uri: impl Into<String>, trust: Arc<ControllerTrust>) -> Self {
        Self {
            uri: uri.into(),
            trust: Some(trust),
        }
    }

    /// A tonic endpoint to configure (timeouts, keep-alive) and then open
    /// with [`Self::connect`] or [`Self::connect_lazy`]. For `https://`,
    /// TLS is done by [`ControllerConnector`] (tonic's own TLS would fix
    /// the roots when the channel is made): tonic sees the address as
    /// `http://`, and requests still carry the `https` origin.
    pub fn endpoint(&self) -> Result<Endpoint, String> {
        let bad = |e: &dyn std::fmt::Display| format!("bad controller address {:?}: {e}", self.uri);
        let ep = match self.uri.strip_prefix("https://") {
            None => Endpoint::from_shared(self.uri.clone()).map_err(|e| bad(&e))?,
            Some(rest) => {
                if self.trust.is_none() {
                    return Err(format!(
                        "{} is https but no root certificate to verify it was given (--controller-ca-file)",
                        self.uri
                    ));
                }
                let origin = self.uri.parse().map_err(|e| bad(&e))?;
                Endpoint::from_shared(format!("http://{rest}"))
                    .map_err(|e| bad(&e))?
                    .origin(origin)
            }
        };
        Ok(ep.connect_timeout(Duration::from_secs(5)))
    }

    /// Connects `ep` (from [`Self::endpoint`]) now.
    pub async fn connect(&self, ep: Endpoint) -> Result<Channel, tonic::transport::Error> {
        match &self.trust {
            Some(t) if self.is_tls() => {
                ep.connect_with_connector(ControllerConnector::new(t.clone()))
                    .await
            }
            _ => ep.connect().await,
        }
    }

    /// A channel on `ep` (from [`Self::endpoint`]) that connects at first
    /// use and again after each disconnection, verifying the controller
    /// under the roots trusted at that moment.
    pub fn connect_lazy(&self, ep: Endpoint) -> Channel {
        match &self.trust {
            Some(t) if self.is_tls() => {
                ep.connect_with_connector_lazy(ControllerConnector::new(t.clone()))
            }
            _ => ep.connect_lazy(),
        }
    }

    fn is_tls(&self) -> bool {
        self.uri.starts_with("https://")
    }
}

impl From<String> for ControllerAddr {
    fn from(uri: String) -> Self {
        Self { uri, trust: None }
    }
}

impl From<&str> for ControllerAddr {
    fn from(uri: &str) -> Self {
        uri.to_owned().into()
    }
}

impl From<&String> for ControllerAddr {
    fn from(uri: &String) -> Self {
        uri.clone().into()
    }
}
