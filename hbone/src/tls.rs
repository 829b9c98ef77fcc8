//! rustls configurations for HBONE: TLS 1.3 only, ALPN `h2`, mutual
//! authentication where peers are named by the SPIFFE id in their
//! certificate's URI SAN rather than by a DNS name.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{
    CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use weft_api::Identity;
use weft_pki::{PkiError, TrustBundle, WorkloadCert};

/// ALPN protocol id HBONE negotiates.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, Clone, thiserror::Error)]
pub enum TlsError {
    #[error("peer certificate is not signed by a trusted mesh CA (check that both sides share the trust bundle)")]
    UnknownCa,
    #[error("peer identity mismatch: expected {expected}, got {got}")]
    IdentityMismatch { expected: String, got: String },
    #[error("peer certificate has no SPIFFE URI SAN")]
    NoSpiffeId,
    #[error("peer certificate carries an invalid SPIFFE id: {0}")]
    InvalidSpiffeId(String),
    #[error("certificate expired or not yet valid (check clocks and certificate rotation)")]
    Expired,
    #[error("bad certificate: {0}")]
    BadCertificate(String),
    #[error("peer presented no certificate")]
    NoPeerCertificate,
    #[error("peer rejected the handshake with alert {0}")]
    PeerRejected(String),
    #[error("peer did not speak TLS: {0}")]
    NotTls(String),
    #[error("peer did not negotiate ALPN h2")]
    NoH2,
    #[error("invalid PEM: {0}")]
    Pem(String),
    #[error("TLS: {0}")]
    Rustls(rustls::Error),
}

impl From<rustls::Error> for TlsError {
    fn from(err: rustls::Error) -> Self {
        use rustls::Error as E;
        match err {
            E::InvalidCertificate(cert_err) => match cert_err {
                // A chain that names a trusted root's subject but is not
                // signed by its key (another mesh with the same trust domain)
                // is, for the operator, the same problem as an unknown root.
                CertificateError::UnknownIssuer | CertificateError::BadSignature => {
                    TlsError::UnknownCa
                }
                CertificateError::Expired
                | CertificateError::ExpiredContext { .. }
                | CertificateError::NotValidYet
                | CertificateError::NotValidYetContext { .. } => TlsError::Expired,
                CertificateError::Other(OtherError(inner)) => {
                    match inner.downcast_ref::<TlsError>() {
                        Some(ours) => ours.clone(),
                        None => TlsError::BadCertificate(inner.to_string()),
                    }
                }
                other => TlsError::BadCertificate(format!("{other:?}")),
            },
            E::NoCertificatesPresented => TlsError::NoPeerCertificate,
            E::AlertReceived(alert) => TlsError::PeerRejected(format!("{alert:?}")),
            E::InvalidMessage(m) => TlsError::NotTls(format!("{m:?}")),
            E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
                TlsError::NotTls(err.to_string())
            }
            E::NoApplicationProtocol => TlsError::NoH2,
            other => TlsError::Rustls(other),
        }
    }
}

impl From<PkiError> for TlsError {
    fn from(err: PkiError) -> Self {
        match err {
            PkiError::NoSpiffeId => TlsError::NoSpiffeId,
            PkiError::InvalidSpiffeId(id) => TlsError::InvalidSpiffeId(id),
            PkiError::Pem(m) => TlsError::Pem(m),
            other => TlsError::BadCertificate(other.to_string()),
        }
    }
}

impl TlsError {
    /// Recovers a `TlsError` from an I/O error produced by tokio-rustls, if the
    /// I/O error wraps a TLS failure.
    pub fn from_io(err: &std::io::Error) -> Option<TlsError> {
        let inner = err.get_ref()?;
        if let Some(r) = inner.downcast_ref::<rustls::Error>() {
            return Some(TlsError::from(r.clone()));
        }
        if let Some(t) = inner.downcast_ref::<TlsError>() {
            return Some(t.clone());
        }
        // h2 keeps only the message of I/O errors, so an alert that arrives
        // after the handshake (the server rejecting our certificate in TLS
        // 1.3) is recognised by rustls' wording.
        let message = inner.to_string();
        message
            .strip_prefix("received fatal alert: ")
            .map(|alert| TlsError::PeerRejected(alert.to_owned()))
    }

    fn into_rustls(self) -> rustls::Error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(self))))
    }
}

/// The crypto provider every Weft TLS configuration uses (aws-lc-rs; it
/// offers X25519MLKEM768 first, then x25519 and the NIST curves).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Server side of HBONE: TLS 1.3 only, ALPN h2, a client certificate is
/// required, must chain to `trust` and carry a SPIFFE id.
pub fn server_config(
    cert: &WorkloadCert,
    trust: &TrustBundle,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let mut roots = rustls::RootCertStore::empty();
    for root in &trust.roots {
        roots.add(root.clone()).map_err(TlsError::from)?;
    }
    let webpki = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::BadCertificate(format!("trust bundle: {e}")))?;
    let verifier = Arc::new(SpiffeClientVerifier { inner: webpki });
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::from)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(TlsError::from)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Clients do not resume (see client_config), so tickets would be wasted bytes.
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Client side of HBONE: presents `cert`, and accepts the server only if its
/// chain leads to `trust` and its SPIFFE id is exactly `expected_peer`.
pub fn client_config(
    cert: &WorkloadCert,
    trust: &TrustBundle,
    expected_peer: &Identity,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    client_config_with(cert, trust, expected_peer, provider())
}

/// [`client_config`] with another crypto provider (tests that offer only
/// some key-exchange groups, say).
pub fn client_config_with(
    cert: &WorkloadCert,
    trust: &TrustBundle,
    expected_peer: &Identity,
    provider: Arc<CryptoProvider>,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let verifier = Arc::new(SpiffeServerVerifier::new(
        trust,
        expected_peer.clone(),
        provider.signature_verification_algorithms,
    )?);
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(TlsError::from)?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert.chain.clone(), cert.key.clone_key())
        .map_err(TlsError::from)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // Every connection uses the same placeholder server name, so a resumption
    // cache keyed by it could hand a ticket to the wrong peer; connections are
    // pooled and long lived, so full handshakes are cheap enough.
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// The SPIFFE identity of the peer of an established TLS connection.
pub fn peer_identity(conn: &rustls::CommonState) -> Result<Identity, TlsError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    identity_of_cert(leaf)
}

/// The SPIFFE identity in a certificate's URI SAN.
pub fn identity_of_cert(der: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    weft_pki::identity_of_cert(der).map_err(TlsError::from)
}

/// Placeholder server name: HBONE peers are verified by SPIFFE id, never by
/// name, so the name only has to be syntactically valid.
pub(crate) fn placeholder_server_name() -> ServerName<'static> {
    ServerName::try_from("hbone.weft.invalid").unwrap_or(ServerName::IpAddress(
        rustls_pki_types::IpAddr::V4(rustls_pki_types::Ipv4Addr::from([0, 0, 0, 0])),
    ))
}

/// Verifies a server chain against the trust roots with webpki (no DNS name
/// check), then requires its SPIFFE id to equal the one we dialled for.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Vec<TrustAnchor<'static>>,
    expected: Identity,
    algs: WebPkiSupportedAlgorithms,
}

impl SpiffeServerVerifier {
    fn new(
        trust: &TrustBundle,
        expected: Identity,
        algs: WebPkiSupportedAlgorithms,
    ) -> Result<Self, TlsError> {
        let roots = trust
            .roots
            .iter()
            .map(|r| {
                webpki::anchor_from_trusted_cert(r)
                    .map(|a| a.to_owned())
                    .map_err(|e| TlsError::BadCertificate(format!("trust bundle: {e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            roots,
            expected,
            algs,
        })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(pki_error)?;
        cert.verify_for_usage(
            self.algs.all,
            &self.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(pki_error)?;
        let got = identity_of_cert(end_entity).map_err(TlsError::into_rustls)?;
        if got != self.expected {
            return Err(TlsError::IdentityMismatch {
                expected: self.expected.to_string(),
                got: got.to_string(),
            }
            .into_rustls());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

/// rustls' webpki client verifier (chain, validity, clientAuth EKU), plus the
/// requirement that the leaf carries a parseable SPIFFE id.
#[derive(Debug)]
struct SpiffeClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        identity_of_cert(end_entity).map_err(TlsError::into_rustls)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn offer_client_auth(&self) -> bool {
        true
    }
}

fn pki_error(err: webpki::Error) -> rustls::Error {
    use webpki::Error as W;
    let cert_err = match err {
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::BadDer | W::BadDerTime => CertificateError::BadEncoding,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        W::RequiredEkuNotFoundContext(_) => CertificateError::InvalidPurpose,
        other => CertificateError::Other(OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_err)
}
