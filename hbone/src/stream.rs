//! `H2Stream`: one HTTP/2 CONNECT stream seen as a byte stream
//! (`AsyncRead + AsyncWrite`), with half-close mapped to END_STREAM.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Size of the buffers `copy_bidirectional` uses in each direction.
pub const COPY_BUFFER_SIZE: usize = 64 * 1024;

/// Bytes copied per `poll_write` are staged in a reused `BytesMut`; it is
/// grown by at least this much so most writes do not allocate.
const WRITE_STAGING: usize = 64 * 1024;

/// Counts the streams of one connection and remembers when it last went
/// idle, so the pool can close connections nobody uses.
#[derive(Debug)]
pub(crate) struct StreamCounter {
    active: AtomicUsize,
    /// Milliseconds since `clock_base()` when `active` last dropped to 0.
    idle_since_ms: AtomicU64,
}

fn clock_base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(clock_base().elapsed().as_millis()).unwrap_or(u64::MAX)
}

impl StreamCounter {
    pub(crate) fn new() -> StreamCounter {
        StreamCounter {
            active: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(now_ms()),
        }
    }

    pub(crate) fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    /// How long the connection has had no stream, or `None` while busy.
    pub(crate) fn idle_for(&self) -> Option<Duration> {
        if self.active() > 0 {
            return None;
        }
        let since = self.idle_since_ms.load(Ordering::Acquire);
        Some(Duration::from_millis(now_ms().saturating_sub(since)))
    }
}

/// One counted stream; dropping it uncounts it.
#[derive(Debug)]
pub(crate) struct StreamSlot(Arc<StreamCounter>);

impl StreamSlot {
    pub(crate) fn acquire(counter: &Arc<StreamCounter>) -> StreamSlot {
        counter.active.fetch_add(1, Ordering::AcqRel);
        StreamSlot(counter.clone())
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        // Stamp first so a reader seeing 0 never sees an older idle time.
        self.0.idle_since_ms.store(now_ms(), Ordering::Release);
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A CONNECT tunnel over one HTTP/2 stream.
///
/// Reading returns `Ok(0)` at the peer's END_STREAM; `poll_shutdown` sends
/// END_STREAM (half-close) and the read side stays open. Received data is
/// handed back to HTTP/2 flow control as soon as it is read; writes only go
/// out as the peer's window allows, so nothing is buffered without bound.
/// Dropping the stream before both sides ended it resets it (RST_STREAM).
#[derive(Debug)]
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet read by the caller.
    pending: Bytes,
    read_eof: bool,
    write_closed: bool,
    staging: BytesMut,
    _slot: Option<StreamSlot>,
}

impl H2Stream {
    pub(crate) fn new(
        send: SendStream<Bytes>,
        recv: RecvStream,
        slot: Option<StreamSlot>,
    ) -> H2Stream {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            read_eof: false,
            write_closed: false,
            staging: BytesMut::new(),
            _slot: slot,
        }
    }
}

impl H2Stream {
    /// Makes `pending` non-empty with the next received chunk; `false` at
    /// the peer's END_STREAM.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        while self.pending.is_empty() {
            if self.read_eof {
                return Poll::Ready(Ok(false));
            }
            match ready!(self.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    // Give the window back now: `pending` holds at most one
                    // frame, so memory stays bounded by the frame size.
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    self.pending = data;
                }
                Some(Err(e)) => {
                    // A peer that finished sending and then resets with
                    // NO_ERROR ("stop sending") still delivered everything.
                    if e.reason() == Some(h2::Reason::NO_ERROR) {
                        self.read_eof = true;
                        continue;
                    }
                    return Poll::Ready(Err(h2_to_io(e)));
                }
                None => self.read_eof = true,
            }
        }
        Poll::Ready(Ok(true))
    }

    /// Waits for send window and queues up to that much of `data` (taken
    /// off its front, without copying); returns how many bytes went.
    fn poll_send(&mut self, cx: &mut Context<'_>, data: &mut Bytes) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        self.send.reserve_capacity(data.len());
        let capacity = match ready!(self.send.poll_capacity(cx)) {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            None => return Poll::Ready(Err(self.closed_for_sending(cx))),
        };
        let n = capacity.min(data.len());
        let chunk = data.split_to(n);
        self.send.send_data(chunk, false).map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    /// Why the stream can no longer send, if we can tell.
    fn closed_for_sending(&mut self, cx: &mut Context<'_>) -> io::Error {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("stream reset by peer: {reason}"),
            ),
            Poll::Ready(Err(e)) => h2_to_io(e),
            Poll::Pending => io::Error::new(
                io::ErrorKind::BrokenPipe,
                "HTTP/2 stream closed for sending",
            ),
        }
    }
}

fn h2_to_io(err: h2::Error) -> io::Error {
    if err.is_io() {
        return err
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    let kind = if err.is_reset() || err.is_go_away() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, err)
}

impl AsyncRead for H2Stream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if !ready!(this.poll_fill(cx))? {
            return Poll::Ready(Ok(()));
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        if this.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "write after shutdown",
            )));
        }
        this.send.reserve_capacity(buf.len());
        let capacity = match ready!(this.send.poll_capacity(cx)) {
            Some(Ok(n)) => n,
            Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
            None => return Poll::Ready(Err(this.closed_for_sending(cx))),
        };
        let n = capacity.min(buf.len());
        if this.staging.capacity() < n {
            // Reclaims the old allocation once h2 has written earlier chunks.
            this.staging.reserve(n.max(WRITE_STAGING));
        }
        this.staging.extend_from_slice(&buf[..n]);
        let chunk = this.staging.split().freeze();
        this.send.send_data(chunk, false).map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection task writes queued frames out on its own.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.write_closed {
            return Poll::Ready(Ok(()));
        }
        this.write_closed = true;
        // Drop any reservation we will never use so other streams get it.
        this.send.reserve_capacity(0);
        match this.send.send_data(Bytes::new(), true) {
            Ok(()) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(h2_to_io(e))),
        }
    }
}

/// Bytes a copy has moved so far, readable while it runs: a connection
/// closed in the middle (by policy, by a drain deadline) still reports what
/// it carried.
#[derive(Debug, Default)]
pub struct Transferred {
    up: AtomicU64,
    down: AtomicU64,
}

impl Transferred {
    /// Bytes from the first side to the second (for a proxy: toward the
    /// destination).
    pub fn up(&self) -> u64 {
        self.up.load(Ordering::Relaxed)
    }

    /// Bytes from the second side to the first (back to the client).
    pub fn down(&self) -> u64 {
        self.down.load(Ordering::Relaxed)
    }

    fn add_up(&self, n: usize) {
        self.up.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn add_down(&self, n: usize) {
        self.down.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Copies both ways until both sides finished, preserving half-close: when
/// one side reaches EOF, the other side's write half is shut down and the
/// opposite direction keeps flowing. Bytes a->b count as `up`, b->a as
/// `down` in `moved`, as they are read.
pub async fn copy_bidirectional<A, B>(a: &mut A, b: &mut B, moved: &Transferred) -> io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut a = CountReads {
        io: a,
        count: |n| moved.add_up(n),
    };
    let mut b = CountReads {
        io: b,
        count: |n| moved.add_down(n),
    };
    tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, COPY_BUFFER_SIZE, COPY_BUFFER_SIZE)
        .await
        .map(|_| ())
}

/// Counts what is read through it; writes pass straight on.
struct CountReads<'a, T: ?Sized, F> {
    io: &'a mut T,
    count: F,
}

impl<T: AsyncRead + Unpin + ?Sized, F: Fn(usize) + Unpin> AsyncRead for CountReads<'_, T, F> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let this = &mut *self;
        ready!(Pin::new(&mut *this.io).poll_read(cx, buf))?;
        (this.count)(buf.filled().len() - before);
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin + ?Sized, F: Unpin> AsyncWrite for CountReads<'_, T, F> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}

/// Copies between a plain byte stream (the app's TCP connection) and an
/// HBONE tunnel until both sides finished, like `copy_bidirectional` but
/// without the intermediate copies: bytes read from `io` are handed to
/// HTTP/2 as the very buffer they were read into, and received DATA frames
/// are written to `io` straight from HTTP/2's buffer. Half-close is kept.
/// Bytes io->tunnel count as `up`, tunnel->io as `down` in `moved`.
pub async fn copy_tunnel<T>(
    io: &mut T,
    tunnel: &mut H2Stream,
    moved: &Transferred,
) -> io::Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut up = Upstream {
        buf: BytesMut::new(),
        out: Bytes::new(),
        read_eof: false,
        done: false,
    };
    let mut down = Downstream {
        need_flush: false,
        done: false,
    };
    std::future::poll_fn(|cx| {
        if !up.done {
            if let Poll::Ready(r) = up.poll(cx, io, tunnel, moved) {
                r?;
            }
        }
        if !down.done {
            if let Poll::Ready(r) = down.poll(cx, io, tunnel, moved) {
                r?;
            }
        }
        if up.done && down.done {
            Poll::Ready(Ok(()))
        } else {
            Poll::Pending
        }
    })
    .await
}

/// The app-to-tunnel direction of `copy_tunnel`.
struct Upstream {
    /// Read buffer; each read is split off and sent as its own `Bytes`, and
    /// the allocation is reused once HTTP/2 has written those out.
    buf: BytesMut,
    /// Read but not yet accepted by HTTP/2 flow control.
    out: Bytes,
    read_eof: bool,
    done: bool,
}

impl Upstream {
    fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut T,
        tunnel: &mut H2Stream,
        moved: &Transferred,
    ) -> Poll<io::Result<()>>
    where
        T: AsyncRead + Unpin + ?Sized,
    {
        loop {
            if !self.out.is_empty() {
                ready!(tunnel.poll_send(cx, &mut self.out))?;
                continue;
            }
            if self.read_eof {
                ready!(Pin::new(&mut *tunnel).poll_shutdown(cx))?;
                self.done = true;
                return Poll::Ready(Ok(()));
            }
            if self.buf.capacity() - self.buf.len() < MIN_READ {
                self.buf.reserve(COPY_BUFFER_SIZE);
            }
            let n = ready!(poll_read_into(Pin::new(&mut *io), cx, &mut self.buf))?;
            if n == 0 {
                self.read_eof = true;
            } else {
                moved.add_up(n);
                self.out = self.buf.split().freeze();
            }
        }
    }
}

/// Below this much free space, the upstream buffer is renewed before a read.
const MIN_READ: usize = 4 * 1024;

/// Reads once from `io` into the spare capacity of `buf`.
fn poll_read_into<T>(
    io: Pin<&mut T>,
    cx: &mut Context<'_>,
    buf: &mut BytesMut,
) -> Poll<io::Result<usize>>
where
    T: AsyncRead + ?Sized,
{
    let spare = buf.spare_capacity_mut();
    let start = spare.as_ptr();
    let mut rb = ReadBuf::uninit(spare);
    ready!(io.poll_read(cx, &mut rb))?;
    if rb.filled().as_ptr() != start.cast() {
        return Poll::Ready(Err(io::Error::other("reader swapped the read buffer")));
    }
    let n = rb.filled().len();
    // SAFETY: the reader initialised the first `n` bytes of the spare
    // capacity (ReadBuf tracks what was filled, and the buffer is the same).
    unsafe { buf.set_len(buf.len() + n) };
    Poll::Ready(Ok(n))
}

/// The tunnel-to-app direction of `copy_tunnel`.
struct Downstream {
    need_flush: bool,
    done: bool,
}

impl Downstream {
    fn poll<T>(
        &mut self,
        cx: &mut Context<'_>,
        io: &mut T,
        tunnel: &mut H2Stream,
        moved: &Transferred,
    ) -> Poll<io::Result<()>>
    where
        T: AsyncWrite + Unpin + ?Sized,
    {
        loop {
            if tunnel.pending.is_empty() {
                let more = match tunnel.poll_fill(cx) {
                    Poll::Ready(r) => r?,
                    Poll::Pending => {
                        if self.need_flush {
                            ready!(Pin::new(&mut *io).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                };
                if !more {
                    ready!(Pin::new(&mut *io).poll_flush(cx))?;
                    ready!(Pin::new(&mut *io).poll_shutdown(cx))?;
                    self.done = true;
                    return Poll::Ready(Ok(()));
                }
            }
            let n = ready!(Pin::new(&mut *io).poll_write(cx, &tunnel.pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            tunnel.pending.advance(n);
            moved.add_down(n);
            self.need_flush = true;
        }
    }
}
