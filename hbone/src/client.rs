//! HBONE client: one mutual-TLS HTTP/2 connection to a peer, on which
//! CONNECT tunnels are opened.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::{debug, Instrument};
use weft_api::Identity;

use crate::error::HboneError;
use crate::stream::{H2Stream, StreamCounter, StreamSlot};
use crate::tls::{self, TlsError, ALPN_H2};

/// HTTP/2 and handshake tuning shared by client and server.
#[derive(Clone, Debug)]
pub struct H2Settings {
    /// Per-stream receive window. Bounds one tunnel's in-flight bytes; 4 MiB
    /// keeps a single stream fast on high bandwidth-delay paths.
    pub initial_stream_window: u32,
    /// Connection receive window, shared by all streams.
    pub initial_connection_window: u32,
    /// Largest DATA frame we accept (the peer may send up to this).
    pub max_frame_size: u32,
    /// Streams the peer may open concurrently on a connection we serve.
    pub max_concurrent_streams: u32,
    /// Per-stream limit on queued, unsent data.
    pub max_send_buffer_size: usize,
    /// Largest header block accepted.
    pub max_header_list_size: u32,
    /// TLS plus HTTP/2 handshake deadline.
    pub handshake_timeout: Duration,
    /// Client connections send an HTTP/2 PING this often; a peer that does
    /// not answer within `keepalive_timeout` is taken for dead and the
    /// connection is retired (the pool dials a new one). `None`: no PINGs.
    pub keepalive_interval: Option<Duration>,
    pub keepalive_timeout: Duration,
    /// Server connections with no open stream for this long are closed
    /// with GOAWAY (an authenticated peer cannot hold a connection it does
    /// not use). `None`: kept while the peer keeps it.
    pub idle_timeout: Option<Duration>,
}

impl Default for H2Settings {
    fn default() -> Self {
        H2Settings {
            initial_stream_window: 4 * 1024 * 1024,
            initial_connection_window: 16 * 1024 * 1024,
            max_frame_size: 1024 * 1024,
            max_concurrent_streams: 1024,
            max_send_buffer_size: 1024 * 1024,
            max_header_list_size: 64 * 1024,
            handshake_timeout: Duration::from_secs(10),
            keepalive_interval: Some(Duration::from_secs(30)),
            keepalive_timeout: Duration::from_secs(10),
            idle_timeout: Some(Duration::from_secs(300)),
        }
    }
}

/// A live HBONE connection. Cheap to clone; all clones share one HTTP/2
/// connection whose driver runs in its own task. The connection closes when
/// the last clone and the last stream are dropped.
#[derive(Clone)]
pub struct HboneConnection {
    inner: Arc<ConnInner>,
}

struct ConnInner {
    send: h2::client::SendRequest<Bytes>,
    peer: Identity,
    /// The TLS key-exchange group negotiated (`X25519MLKEM768`, ...).
    kx_group: Option<rustls::NamedGroup>,
    closed: Arc<AtomicBool>,
    /// Open streams plus slots reserved by the pool.
    streams: Arc<StreamCounter>,
}

impl std::fmt::Debug for HboneConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HboneConnection")
            .field("peer", &self.inner.peer.to_string())
            .field("active_streams", &self.active_streams())
            .field("closed", &self.is_closed())
            .finish()
    }
}

/// TLS handshake (verifying the peer's SPIFFE id via `tls`), then the HTTP/2
/// handshake; both bounded by `settings.handshake_timeout`. Set
/// `TCP_NODELAY` on sockets: flow-control updates are small frames that must
/// not wait for Nagle (it costs an order of magnitude in throughput).
pub async fn connect<IO>(
    io: IO,
    tls: Arc<rustls::ClientConfig>,
    settings: &H2Settings,
) -> Result<HboneConnection, HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let deadline = settings.handshake_timeout;
    match tokio::time::timeout(deadline, handshake(io, tls, settings)).await {
        Ok(result) => result.map_err(HboneError::classify),
        Err(_) => Err(HboneError::HandshakeTimeout(deadline)),
    }
}

async fn handshake<IO>(
    io: IO,
    tls: Arc<rustls::ClientConfig>,
    settings: &H2Settings,
) -> Result<HboneConnection, HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let tls_stream = tokio_rustls::TlsConnector::from(tls)
        .connect(tls::placeholder_server_name(), io)
        .await?;
    let (_, conn) = tls_stream.get_ref();
    if conn.alpn_protocol() != Some(ALPN_H2) {
        return Err(TlsError::NoH2.into());
    }
    let peer = tls::peer_identity(conn)?;
    let kx_group = conn.negotiated_key_exchange_group().map(|g| g.name());

    let (send, mut connection) = h2::client::Builder::new()
        .initial_window_size(settings.initial_stream_window)
        .initial_connection_window_size(settings.initial_connection_window)
        .max_frame_size(settings.max_frame_size)
        .max_send_buffer_size(settings.max_send_buffer_size)
        .max_header_list_size(settings.max_header_list_size)
        .enable_push(false)
        .handshake::<_, Bytes>(tls_stream)
        .await?;

    let closed = Arc::new(AtomicBool::new(false));
    let driver_closed = closed.clone();
    let pings = connection.ping_pong();
    let keepalive = settings
        .keepalive_interval
        .map(|every| (every, settings.keepalive_timeout));
    let span = tracing::debug_span!("hbone_client_conn", peer = %peer);
    tokio::spawn(
        async move {
            let driven = async {
                if let Err(e) = connection.await {
                    debug!(error = %e, "HBONE connection ended with error");
                }
            };
            match (pings, keepalive) {
                (Some(pings), Some((every, timeout))) => tokio::select! {
                    () = driven => {}
                    () = keep_alive(pings, every, timeout) => {
                        debug!("HBONE peer did not answer PING; retiring the connection");
                    }
                },
                _ => driven.await,
            }
            driver_closed.store(true, Ordering::Release);
        }
        .instrument(span),
    );

    Ok(HboneConnection {
        inner: Arc::new(ConnInner {
            send,
            peer,
            kx_group,
            closed,
            streams: Arc::new(StreamCounter::new()),
        }),
    })
}

/// Sends a PING every `every`; returns when one is not answered within
/// `timeout` (or the connection is gone).
async fn keep_alive(mut pings: h2::PingPong, every: Duration, timeout: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match tokio::time::timeout(timeout, pings.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => return,
        }
    }
}

impl HboneConnection {
    /// Opens a CONNECT tunnel to `target` (sent as `:authority`), with extra
    /// request headers such as `forwarded`, `baggage`, `traceparent`.
    /// Resolves once the peer answered; anything but 200 is
    /// `HboneError::Status`.
    pub async fn open(
        &self,
        target: SocketAddr,
        headers: http::HeaderMap,
    ) -> Result<H2Stream, HboneError> {
        let slot = StreamSlot::acquire(&self.inner.streams);
        self.open_with_slot(target, headers, slot).await
    }

    pub(crate) async fn open_with_slot(
        &self,
        target: SocketAddr,
        headers: http::HeaderMap,
        slot: StreamSlot,
    ) -> Result<H2Stream, HboneError> {
        if self.is_closed() {
            return Err(HboneError::ConnectionClosed);
        }
        let mut request = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .version(http::Version::HTTP_2)
            .body(())?;
        *request.headers_mut() = headers;

        let result = async {
            // Waits while the peer's concurrent-stream limit is reached.
            let mut send = self.inner.send.clone().ready().await?;
            let (response, send_stream) = send.send_request(request, false)?;
            let response = response.await?;
            Ok::<_, h2::Error>((response, send_stream))
        }
        .await;
        let (response, send_stream) = match result {
            Ok(ok) => ok,
            Err(e) => {
                if e.is_go_away() || e.is_io() {
                    // No new stream will succeed here: let the pool move on
                    // before the driver has drained the old streams.
                    self.inner.closed.store(true, Ordering::Release);
                }
                return Err(HboneError::H2(e).classify());
            }
        };
        let status = response.status();
        if status != StatusCode::OK {
            return Err(HboneError::Status(status));
        }
        Ok(H2Stream::new(send_stream, response.into_body(), Some(slot)))
    }

    /// True once no new stream can be opened: the connection driver has
    /// finished (peer closed, I/O error) or the peer sent GOAWAY.
    pub fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    /// The SPIFFE id the peer proved in the handshake.
    pub fn peer_identity(&self) -> &Identity {
        &self.inner.peer
    }

    /// The TLS key-exchange group the handshake settled on.
    pub fn key_exchange_group(&self) -> Option<rustls::NamedGroup> {
        self.inner.kx_group
    }

    /// Tunnels open (or being opened) on this connection.
    pub fn active_streams(&self) -> usize {
        self.inner.streams.active()
    }

    /// How long no stream has been open, `None` while streams are open.
    pub fn idle_for(&self) -> Option<Duration> {
        self.inner.streams.idle_for()
    }

    pub(crate) fn reserve_slot(&self) -> StreamSlot {
        StreamSlot::acquire(&self.inner.streams)
    }

    /// True when both handles refer to the same HTTP/2 connection.
    pub fn same_connection(&self, other: &HboneConnection) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}
