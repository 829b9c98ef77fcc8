//! Errors of HBONE connections and tunnels, and the coarse failure reasons
//! callers label handshake metrics with.

use std::sync::Arc;
use std::time::Duration;

use crate::tls::TlsError;

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP/2: {0}")]
    H2(#[from] h2::Error),
    /// The peer answered the CONNECT with something other than 200.
    #[error("CONNECT refused with status {0}")]
    Status(http::StatusCode),
    #[error("handshake did not complete within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("HBONE connection is closed")]
    ConnectionClosed,
    #[error("invalid request: {0}")]
    Http(#[from] http::Error),
    /// No certificate to present (the CA refused or is unreachable); the
    /// cause is kept whole for callers that need it.
    #[error("no certificate: {0}")]
    Credentials(Arc<dyn std::error::Error + Send + Sync>),
    /// A dial shared by several pool callers failed; every waiter gets the
    /// same cause instead of dialling again.
    #[error("dial failed: {0}")]
    Dial(Arc<HboneError>),
}

/// Why a connection failed before carrying any tunnel, for metrics labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FailureReason {
    /// Peer chain does not lead to a trusted root.
    UnknownCa,
    /// Peer's SPIFFE id is missing, malformed or not the expected one.
    BadIdentity,
    /// Expired, not yet valid, wrong key usage, unparseable, ...
    BadCertificate,
    /// The peer rejected our certificate (TLS alert).
    PeerRejected,
    /// The bytes were not TLS (plain HTTP, garbage).
    NotTls,
    /// TLS or HTTP/2 spoken, but not as HBONE wants (no ALPN h2, bad frames).
    Protocol,
    Timeout,
    /// Peer closed the connection mid-handshake.
    Eof,
    Io,
    /// CONNECT answered with a non-200 status.
    Status,
    /// We had no certificate to present.
    NoCertificate,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::UnknownCa => "unknown_ca",
            FailureReason::BadIdentity => "bad_identity",
            FailureReason::BadCertificate => "bad_certificate",
            FailureReason::PeerRejected => "peer_rejected",
            FailureReason::NotTls => "not_tls",
            FailureReason::Protocol => "protocol",
            FailureReason::Timeout => "timeout",
            FailureReason::Eof => "eof",
            FailureReason::Io => "io",
            FailureReason::Status => "status",
            FailureReason::NoCertificate => "no_certificate",
        }
    }
}

impl std::fmt::Display for FailureReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl HboneError {
    /// The metrics label for this failure.
    pub fn reason(&self) -> FailureReason {
        match self {
            HboneError::Tls(t) => tls_reason(t),
            HboneError::Io(e) => io_reason(e),
            HboneError::H2(e) => match e.get_io() {
                Some(io) => io_reason(io),
                None => FailureReason::Protocol,
            },
            HboneError::Status(_) => FailureReason::Status,
            HboneError::HandshakeTimeout(_) => FailureReason::Timeout,
            HboneError::ConnectionClosed => FailureReason::Eof,
            HboneError::Http(_) => FailureReason::Protocol,
            HboneError::Credentials(_) => FailureReason::NoCertificate,
            HboneError::Dial(inner) => inner.reason(),
        }
    }

    /// True when the peer never took the tunnel on: the connection was going
    /// away (GOAWAY, `REFUSED_STREAM`) or broke before the peer answered the
    /// CONNECT. Nothing reached the destination, so opening the tunnel again
    /// on another connection is safe; a proxy being replaced sends GOAWAY on
    /// every connection it holds, and a CONNECT racing it lands here.
    pub fn is_retryable(&self) -> bool {
        match self {
            HboneError::ConnectionClosed => true,
            HboneError::H2(e) => {
                e.is_go_away() || e.reason() == Some(h2::Reason::REFUSED_STREAM) || e.is_io()
            }
            _ => false,
        }
    }

    /// The TLS failure behind this error, wherever it surfaced (handshake,
    /// or an alert read later by the HTTP/2 layer).
    pub fn tls_error(&self) -> Option<TlsError> {
        match self {
            HboneError::Tls(t) => Some(t.clone()),
            HboneError::Io(e) => TlsError::from_io(e),
            HboneError::H2(e) => e.get_io().and_then(TlsError::from_io),
            HboneError::Dial(inner) => inner.tls_error(),
            _ => None,
        }
    }

    /// A copy for sharing one failure with several waiters: exact for TLS,
    /// status and timeout failures, kind and message for the rest.
    pub(crate) fn duplicate(&self) -> HboneError {
        if let Some(tls) = self.tls_error() {
            return HboneError::Tls(tls);
        }
        match self {
            HboneError::Status(s) => HboneError::Status(*s),
            HboneError::HandshakeTimeout(d) => HboneError::HandshakeTimeout(*d),
            HboneError::ConnectionClosed => HboneError::ConnectionClosed,
            HboneError::Dial(inner) => HboneError::Dial(inner.clone()),
            HboneError::Credentials(inner) => HboneError::Credentials(inner.clone()),
            HboneError::Io(e) => HboneError::Io(std::io::Error::new(e.kind(), e.to_string())),
            other => HboneError::Io(std::io::Error::other(other.to_string())),
        }
    }

    /// Lifts TLS failures hidden inside I/O errors into `Tls`, so callers can
    /// match on them.
    pub(crate) fn classify(self) -> HboneError {
        match &self {
            HboneError::Io(_) | HboneError::H2(_) => match self.tls_error() {
                Some(t) => HboneError::Tls(t),
                None => self,
            },
            _ => self,
        }
    }
}

fn tls_reason(t: &TlsError) -> FailureReason {
    match t {
        TlsError::UnknownCa => FailureReason::UnknownCa,
        TlsError::IdentityMismatch { .. } | TlsError::NoSpiffeId | TlsError::InvalidSpiffeId(_) => {
            FailureReason::BadIdentity
        }
        TlsError::Expired | TlsError::BadCertificate(_) | TlsError::NoPeerCertificate => {
            FailureReason::BadCertificate
        }
        TlsError::PeerRejected(_) => FailureReason::PeerRejected,
        TlsError::NotTls(_) => FailureReason::NotTls,
        TlsError::NoH2 | TlsError::Pem(_) | TlsError::Rustls(_) => FailureReason::Protocol,
    }
}

fn io_reason(e: &std::io::Error) -> FailureReason {
    if let Some(t) = TlsError::from_io(e) {
        return tls_reason(&t);
    }
    match e.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::BrokenPipe => FailureReason::Eof,
        std::io::ErrorKind::TimedOut => FailureReason::Timeout,
        _ => FailureReason::Io,
    }
}
