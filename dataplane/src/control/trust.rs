//! How a proxy trusts the controller's gRPC port, and the connection it
//! makes to it.
//!
//! Trusted: the roots in `--controller-ca-file`, re-read at every
//! connection (in a cluster the file is a ConfigMap volume that kubelet
//! replaces in place), together with the mesh roots the config stream and
//! the CA's answers deliver ([`TrustRoots`]). A proxy started before a
//! root rotation therefore keeps verifying the controller after it, even
//! while its file still names only the old root; the controller's chain
//! also carries the new root cross-signed by the old one during the
//! overlap (`controller/src/ca/`).
//!
//! tonic dials through [`ControllerConnector`]: TCP, then TLS verified
//! against the roots as they are at that moment; its errors name the TLS
//! cause ("unknown issuer: ..."), and [`error_chain`] spells out tonic's
//! wrapped errors so logs say more than "transport error".

use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::{CertificateError, RootCertStore};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tracing::{info, warn};
use weft_hbone::tls::provider;
use weft_pki::TrustBundle;

use super::addr::CONTROLLER_SERVER_NAME;
use crate::certs::TrustRoots;

/// Why a connection to the controller failed.
#[derive(Debug, thiserror::Error)]
pub enum ControllerConnectError {
    #[error("bad controller address {0}")]
    Address(String),
    #[error("controller CA file {path}: {reason}")]
    CaFile { path: String, reason: String },
    #[error("cannot reach the controller at {addr}: {error}")]
    Tcp { addr: String, error: io::Error },
    #[error("TLS with the controller at {addr}: {cause}")]
    Tls { addr: String, cause: String },
}

/// Roots that verify the controller: a file (re-read) and the mesh roots
/// as last delivered.
pub struct ControllerTrust {
    file: PathBuf,
    mesh: TrustRoots,
    /// What the file held at its last good read (its text, its roots).
    last_file: Mutex<Option<(String, Vec<CertificateDer<'static>>)>>,
    /// Who is connecting, for messages ("ztunnel", "waypoint").
    who: &'static str,
}

impl ControllerTrust {
    /// Trusts the roots in `file` (read now: a missing or unusable file
    /// fails start-up) and, as they arrive, the mesh roots in `mesh`.
    pub fn from_file(
        file: &Path,
        mesh: TrustRoots,
        who: &'static str,
    ) -> Result<Self, ControllerConnectError> {
        let trust = Self {
            file: file.to_owned(),
            mesh,
            last_file: Mutex::new(None),
            who,
        };
        let bad = |reason: String| ControllerConnectError::CaFile {
            path: file.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(file).map_err(|e| bad(e.to_string()))?;
        let roots = parse_roots(&text).map_err(bad)?;
        *trust.lock() = Some((text, roots));
        Ok(trust)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(String, Vec<CertificateDer<'static>>)>> {
        self.last_file.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The file's roots now: re-read; an unreadable or unusable file keeps
    /// the last good roots (a ConfigMap update is never half-visible, but
    /// an operator's edit can be).
    fn file_roots(&self) -> Vec<CertificateDer<'static>> {
        let path = &self.file;
        let mut last = self.lock();
        let read = std::fs::read_to_string(path)
            .map_err(|e| e.to_string())
            .and_then(|text| parse_roots(&text).map(|roots| (text, roots)));
        match read {
            Ok((text, roots)) => {
                if last.as_ref().is_none_or(|(t, _)| *t != text) {
                    info!(component = "config", file = %path.display(), roots = roots.len(), "controller CA file changed; trusting its roots from now on");
                    *last = Some((text, roots));
                }
            }
            Err(error) => {
                warn!(component = "config", file = %path.display(), error = %error, "cannot read the controller CA file; keeping the roots last read from it");
            }
        }
        last.as_ref().map(|(_, r)| r.clone()).unwrap_or_default()
    }

    /// Every root that verifies the controller now, and a description of
    /// where they come from for error messages.
    pub fn roots(&self) -> (Vec<CertificateDer<'static>>, String) {
        let file = self.file_roots();
        let mesh = self.mesh.get();
        let mut all: Vec<CertificateDer<'static>> = Vec::new();
        for r in file.iter().chain(&mesh.roots) {
            if !all.contains(r) {
                all.push(r.clone());
            }
        }
        let summary = format!(
            "{} roots: {} from {}, {} from the mesh trust bundle",
            all.len(),
            file.len(),
            self.file.display(),
            mesh.roots.len()
        );
        (all, summary)
    }

    fn client_config(&self) -> Result<(Arc<rustls::ClientConfig>, String), String> {
        let (roots, summary) = self.roots();
        let mut store = RootCertStore::empty();
        for r in roots {
            store.add(r).map_err(|e| format!("unusable root: {e}"))?;
        }
        let mut config = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS versions: {e}"))?
            .with_root_certificates(store)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok((Arc::new(config), summary))
    }

    /// Why a handshake failed, in words an operator can act on.
    fn explain(&self, error: &io::Error, roots: &str) -> String {
        let Some(tls) = error
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
        else {
            return format!("handshake failed: {error}");
        };
        let who = self.who;
        match tls {
            rustls::Error::InvalidCertificate(c) => match c {
                CertificateError::UnknownIssuer => format!(
                    "unknown issuer: the controller's certificate is not signed by a root this {who} trusts ({roots})"
                ),
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    format!("expired: the controller's certificate has expired (or this node's clock is wrong): {tls}")
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    format!("not yet valid: the controller's certificate is not valid yet (or this node's clock is wrong): {tls}")
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => format!(
                    "wrong name: the controller's certificate is not valid for {CONTROLLER_SERVER_NAME}: {tls}"
                ),
                CertificateError::BadSignature => format!(
                    "bad signature: the controller's certificate chain does not verify under the roots this {who} trusts ({roots})"
                ),
                _ => format!("the controller's certificate is not acceptable: {tls}"),
            },
            rustls::Error::NoApplicationProtocol => {
                "no common ALPN protocol: the controller does not speak h2 on this port".into()
            }
            rustls::Error::AlertReceived(alert) => {
                format!("the controller ended the handshake with alert {alert:?}")
            }
            other => format!("handshake failed: {other}"),
        }
    }
}

fn parse_roots(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    TrustBundle::from_pem(pem)
        .map(|b| b.roots)
        .map_err(|e| e.to_string())
}

/// The connector tonic dials the controller through: TCP to the address's
/// host and port, then TLS for server name [`CONTROLLER_SERVER_NAME`]
/// under the roots trusted at that moment.
#[derive(Clone)]
pub struct ControllerConnector {
    trust: Arc<ControllerTrust>,
}

impl ControllerConnector {
    pub fn new(trust: Arc<ControllerTrust>) -> Self {
        Self { trust }
    }

    async fn connect(
        trust: Arc<ControllerTrust>,
        uri: http::Uri,
    ) -> Result<TokioIo<TlsStream<TcpStream>>, ControllerConnectError> {
        let host = uri
            .host()
            .ok_or_else(|| ControllerConnectError::Address(format!("{uri} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(443);
        let addr = format!("{host}:{port}");
        let tcp = TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|error| ControllerConnectError::Tcp {
                addr: addr.clone(),
                error,
            })?;
        let _ = tcp.set_nodelay(true);
        let (config, roots) =
            trust
                .client_config()
                .map_err(|cause| ControllerConnectError::Tls {
                    addr: addr.clone(),
                    cause,
                })?;
        let name = ServerName::try_from(CONTROLLER_SERVER_NAME)
            .map_err(|e| ControllerConnectError::Address(e.to_string()))?
            .to_owned();
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await
            .map_err(|e| ControllerConnectError::Tls {
                cause: trust.explain(&e, &roots),
                addr,
            })?;
        Ok(TokioIo::new(tls))
    }
}

type ConnectFuture = Pin<
    Box<dyn Future<Output = Result<TokioIo<TlsStream<TcpStream>>, ControllerConnectError>> + Send>,
>;

impl tonic::codegen::Service<http::Uri> for ControllerConnector {
    type Response = TokioIo<TlsStream<TcpStream>>;
    type Error = ControllerConnectError;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(Self::connect(self.trust.clone(), uri))
    }
}

/// `error` and every error below it, joined with ": ", skipping messages
/// already said (tonic wraps the cause in "transport error" and more).
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut next = error.source();
    while let Some(e) = next {
        let msg = e.to_string();
        if !msg.is_empty() && !out.contains(&msg) {
            out.push_str(": ");
            out.push_str(&msg);
        }
        next = e.source();
    }
    out
}

/// A tonic status with the errors it carries, for logs and
/// [`crate::certs::IdentityError`].
pub fn status_text(status: &tonic::Status) -> String {
    let mut out = format!("{:?}: {}", status.code(), status.message());
    if let Some(source) = std::error::Error::source(status) {
        // tonic often copies the cause into the message already.
        let mut deepest = source;
        while let Some(e) = deepest.source() {
            deepest = e;
        }
        if !status.message().contains(&deepest.to_string()) {
            out.push_str(": ");
            out.push_str(&error_chain(source));
        }
    }
    out
}
