//! HBONE server: accepts a mutual-TLS HTTP/2 connection and hands each
//! CONNECT request to a handler as an `InboundTunnel`, which the handler
//! accepts (200) or rejects (401, 503, ...).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use http::{Method, Response, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, Instrument};
use weft_api::Identity;

use crate::client::H2Settings;
use crate::error::HboneError;
use crate::stream::{H2Stream, StreamCounter, StreamSlot};
use crate::tls::{self, TlsError, ALPN_H2};

/// One CONNECT request waiting for the handler's verdict.
///
/// Dropping it without `accept` or `reject` answers 503, so a handler that
/// bails out early never leaves the client hanging.
pub struct InboundTunnel {
    /// The `:authority` of the CONNECT: where the client wants to go.
    pub target: SocketAddr,
    /// The client's SPIFFE id, proven in the TLS handshake.
    pub peer: Identity,
    /// Request headers (`forwarded`, `baggage`, `traceparent`, ...).
    pub headers: http::HeaderMap,
    respond: Option<SendResponse<Bytes>>,
    recv: Option<RecvStream>,
}

impl std::fmt::Debug for InboundTunnel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundTunnel")
            .field("target", &self.target)
            .field("peer", &self.peer.to_string())
            .field("headers", &self.headers)
            .finish_non_exhaustive()
    }
}

impl InboundTunnel {
    /// Answers `status` (401 policy denied, 503 target unreachable, ...) and
    /// ends the stream.
    pub fn reject(mut self, status: StatusCode) {
        if let Some(respond) = self.respond.take() {
            send_status(respond, status);
        }
    }

    /// Answers 200 and returns the tunnel's byte stream.
    pub fn accept(mut self) -> Result<H2Stream, HboneError> {
        let (mut respond, recv) = match (self.respond.take(), self.recv.take()) {
            (Some(respond), Some(recv)) => (respond, recv),
            _ => return Err(HboneError::ConnectionClosed),
        };
        let response = Response::builder().status(StatusCode::OK).body(())?;
        let send = respond.send_response(response, false)?;
        Ok(H2Stream::new(send, recv, None))
    }

    /// The client address from the `forwarded` header's `for=` parameter,
    /// if present and parseable.
    pub fn forwarded_for(&self) -> Option<std::net::IpAddr> {
        parse_forwarded_for(self.headers.get(http::header::FORWARDED)?.to_str().ok()?)
    }
}

impl Drop for InboundTunnel {
    fn drop(&mut self) {
        if let Some(respond) = self.respond.take() {
            send_status(respond, StatusCode::SERVICE_UNAVAILABLE);
        }
    }
}

fn send_status(mut respond: SendResponse<Bytes>, status: StatusCode) {
    match Response::builder().status(status).body(()) {
        Ok(response) => {
            if let Err(e) = respond.send_response(response, true) {
                debug!(error = %e, %status, "could not send HBONE response");
            }
        }
        Err(_) => respond.send_reset(h2::Reason::INTERNAL_ERROR),
    }
}

/// `for=` of the first element of a `Forwarded` header (RFC 7239), with
/// optional quotes, brackets and port.
pub fn parse_forwarded_for(value: &str) -> Option<std::net::IpAddr> {
    let first = value.split(',').next()?;
    for pair in first.split(';') {
        let (key, val) = pair.trim().split_once('=')?;
        if !key.eq_ignore_ascii_case("for") {
            continue;
        }
        let val = val.trim().trim_matches('"');
        if let Ok(addr) = val.parse::<SocketAddr>() {
            return Some(addr.ip());
        }
        let val = val.trim_start_matches('[').trim_end_matches(']');
        return val.parse().ok();
    }
    None
}

/// Serves HBONE on one accepted connection until the client goes away.
///
/// The TLS and HTTP/2 handshakes are bounded by `settings.handshake_timeout`.
/// Each valid CONNECT runs `handler` in its own task; a request with another
/// method gets 405 and one whose `:authority` is not `ip:port` gets 400,
/// without reaching the handler. Handshake failures come back as errors whose
/// [`HboneError::reason`] labels metrics (unknown CA, bad identity, not TLS,
/// timeout, ...). Set `TCP_NODELAY` on sockets: flow-control updates are
/// small frames that must not wait for Nagle.
pub async fn serve<IO, H, Fut>(
    io: IO,
    tls: Arc<rustls::ServerConfig>,
    settings: &H2Settings,
    handler: H,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(InboundTunnel) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve_until(io, tls, settings, handler, std::future::pending()).await
}

/// [`serve`] with graceful drain: once `drain` completes, the server sends
/// GOAWAY (the client stops opening streams here and dials elsewhere),
/// lets open tunnels finish, and returns. A connection without an open
/// tunnel for `settings.idle_timeout` is closed the same way.
pub async fn serve_until<IO, H, Fut, D>(
    io: IO,
    tls: Arc<rustls::ServerConfig>,
    settings: &H2Settings,
    handler: H,
    drain: D,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(InboundTunnel) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
    D: Future<Output = ()>,
{
    let deadline = settings.handshake_timeout;
    let handshake = tokio::time::timeout(deadline, handshake(io, tls, settings));
    tokio::pin!(drain);
    let (connection, peer) = tokio::select! {
        result = handshake => match result {
            Ok(result) => result.map_err(HboneError::classify)?,
            Err(_) => return Err(HboneError::HandshakeTimeout(deadline)),
        },
        () = &mut drain => return Ok(()),
    };
    serve_tunnels(connection, peer, settings, handler, drain).await
}

/// The HBONE server above TLS: an HTTP/2 server on `io` for a client
/// already authenticated as `peer`. For driving the CONNECT handling with
/// arbitrary HTTP/2 input (fuzzing) and in-memory tests; production
/// connections go through [`serve_until`], which authenticates first.
pub async fn serve_h2<IO, H, Fut, D>(
    io: IO,
    peer: Identity,
    settings: &H2Settings,
    handler: H,
    drain: D,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(InboundTunnel) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
    D: Future<Output = ()>,
{
    let deadline = settings.handshake_timeout;
    let connection = match tokio::time::timeout(deadline, h2_handshake(io, settings)).await {
        Ok(result) => result?,
        Err(_) => return Err(HboneError::HandshakeTimeout(deadline)),
    };
    tokio::pin!(drain);
    serve_tunnels(connection, peer, settings, handler, drain).await
}

/// Accepts CONNECT streams on an established HTTP/2 connection until the
/// client goes away, the drain starts, or the connection idles out.
async fn serve_tunnels<IO, H, Fut, D>(
    mut connection: h2::server::Connection<IO, Bytes>,
    peer: Identity,
    settings: &H2Settings,
    handler: H,
    mut drain: std::pin::Pin<&mut D>,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    H: Fn(InboundTunnel) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
    D: Future<Output = ()>,
{
    let tunnels = Arc::new(StreamCounter::new());
    let idle_check = settings
        .idle_timeout
        .map(|t| (t, (t / 4).max(std::time::Duration::from_millis(50))));
    let mut draining = false;
    loop {
        let next = if draining {
            connection.accept().await
        } else {
            let idle = async {
                let Some((limit, every)) = idle_check else {
                    return std::future::pending().await;
                };
                loop {
                    tokio::time::sleep(every).await;
                    if tunnels.idle_for().is_some_and(|idle| idle >= limit) {
                        return;
                    }
                }
            };
            tokio::select! {
                next = connection.accept() => next,
                () = &mut drain => {
                    debug!("draining HBONE connection");
                    connection.graceful_shutdown();
                    draining = true;
                    continue;
                }
                () = idle => {
                    debug!(peer = %peer, "HBONE connection idle with no tunnel; closing it");
                    connection.graceful_shutdown();
                    draining = true;
                    continue;
                }
            }
        };
        let Some(next) = next else { return Ok(()) };
        let (request, respond) = match next {
            Ok(accepted) => accepted,
            // A client may drop the TCP connection without a GOAWAY once it
            // is done: that is an ordinary end, not a failure.
            Err(e) if e.get_io().is_some_and(is_peer_gone) => {
                debug!(error = %e, "HBONE client went away");
                return Ok(());
            }
            Err(e) => return Err(HboneError::H2(e).classify()),
        };
        if request.method() != Method::CONNECT {
            send_status(respond, StatusCode::METHOD_NOT_ALLOWED);
            continue;
        }
        let target = match request
            .uri()
            .authority()
            .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
        {
            Some(target) => target,
            None => {
                send_status(respond, StatusCode::BAD_REQUEST);
                continue;
            }
        };
        let (parts, recv) = request.into_parts();
        let tunnel = InboundTunnel {
            target,
            peer: peer.clone(),
            headers: parts.headers,
            respond: Some(respond),
            recv: Some(recv),
        };
        let span = tracing::debug_span!("hbone_tunnel", src = %peer, dst = %target);
        let slot = StreamSlot::acquire(&tunnels);
        let tunnel_done = handler.clone()(tunnel);
        tokio::spawn(
            async move {
                tunnel_done.await;
                drop(slot);
            }
            .instrument(span),
        );
    }
}

fn is_peer_gone(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::BrokenPipe
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::UnexpectedEof
    )
}

type ServerConnection<IO> = h2::server::Connection<tokio_rustls::server::TlsStream<IO>, Bytes>;

async fn handshake<IO>(
    io: IO,
    tls: Arc<rustls::ServerConfig>,
    settings: &H2Settings,
) -> Result<(ServerConnection<IO>, Identity), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let tls_stream = tokio_rustls::TlsAcceptor::from(tls).accept(io).await?;
    let (_, conn) = tls_stream.get_ref();
    if conn.alpn_protocol() != Some(ALPN_H2) {
        return Err(TlsError::NoH2.into());
    }
    let peer = tls::peer_identity(conn)?;
    let connection = h2_handshake(tls_stream, settings).await?;
    Ok((connection, peer))
}

async fn h2_handshake<IO>(
    io: IO,
    settings: &H2Settings,
) -> Result<h2::server::Connection<IO, Bytes>, HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    Ok(h2::server::Builder::new()
        .initial_window_size(settings.initial_stream_window)
        .initial_connection_window_size(settings.initial_connection_window)
        .max_frame_size(settings.max_frame_size)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_send_buffer_size(settings.max_send_buffer_size)
        .max_header_list_size(settings.max_header_list_size)
        .handshake::<_, Bytes>(io)
        .await?)
}
