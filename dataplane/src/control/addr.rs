//! Where the controller is and how to trust it: its gRPC address and, for
//! `https://`, the mesh root that signed its serving certificate. Shared by
//! the config stream and the CA client.

use std::time::Duration;

use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// The name the controller's serving certificate carries, whatever address
/// it is reached at.
pub const CONTROLLER_SERVER_NAME: &str = "weft-controller";

#[derive(Clone, Debug)]
pub struct ControllerAddr {
    pub uri: String,
    /// Root certificate(s) PEM that verify the controller (https only).
    pub ca_pem: Option<String>,
}

impl ControllerAddr {
    pub fn tls(uri: impl Into<String>, ca_pem: impl Into<String>) -> Self {
        Self {
            uri: uri.into(),
            ca_pem: Some(ca_pem.into()),
        }
    }

    /// A tonic endpoint with TLS verification against the mesh root when
    /// the address is `https://`.
    pub fn endpoint(&self) -> Result<Endpoint, String> {
        let mut ep = Endpoint::from_shared(self.uri.clone())
            .map_err(|e| format!("bad controller address {:?}: {e}", self.uri))?
            .connect_timeout(Duration::from_secs(5));
        if self.uri.starts_with("https://") {
            let ca = self.ca_pem.as_ref().ok_or_else(|| {
                format!(
                    "{} is https but no root certificate to verify it was given (--controller-ca-file)",
                    self.uri
                )
            })?;
            ep = ep
                .tls_config(
                    ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(ca))
                        .domain_name(CONTROLLER_SERVER_NAME),
                )
                .map_err(|e| format!("TLS to the controller: {e}"))?;
        }
        Ok(ep)
    }
}

impl From<String> for ControllerAddr {
    fn from(uri: String) -> Self {
        Self { uri, ca_pem: None }
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
