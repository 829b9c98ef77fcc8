//! Hand-over between two ztunnels on one node: the upgrade without resets.
//!
//! A ztunnel started while another one runs on the node (the DaemonSet
//! rolls with `maxSurge: 1, maxUnavailable: 0`) asks the running one, over
//! a unix socket in the state folder, for the listening sockets of every
//! pod it captures and of its ops ports. The sockets themselves pass
//! (`SCM_RIGHTS`), not addresses: the kernel's steering (the `LISTENERS`
//! sockmap entries, the pods' `127.0.0.1:15001`) refers to the same sockets
//! before, during and after, so no connection attempt ever meets a closed
//! port and none goes out uncaptured. Both processes accept from the
//! shared sockets until the successor says it serves them all; then the
//! predecessor stops accepting, sends GOAWAY on its HBONE connections and
//! finishes the connections it holds, until the kubelet's SIGTERM (and the
//! drain deadline after it).
//!
//! The exchange, one JSON message per `SOCK_SEQPACKET` packet (so the
//! descriptors travel with the message they belong to):
//!
//! ```text
//! successor    -> Take {version}
//! predecessor  -> Pod {key, kinds} + one socket per kind   (per captured pod)
//!                 Ops + the admin, metrics and readiness sockets
//!                 End
//! successor    -> Done            (it accepts on every socket now)
//! ```
//!
//! While it hands over, the predecessor's pods are frozen (CNI requests are
//! answered "retry", the model is not applied to them). If the successor
//! goes away before `Done`, the predecessor carries on as if nothing had
//! happened: it never stopped accepting.

use std::collections::HashMap;
use std::io;
use std::mem::{size_of, zeroed};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use serde::{Deserialize, Serialize};
use socket2::{Domain, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tracing::{info, warn};

use crate::inpod::InPod;

/// The socket's name in the state folder.
pub const SOCKET_NAME: &str = "handover.sock";
/// Longest wait for the other side's next message.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest message (a pod's key and kinds, a few hundred bytes).
const MAX_MESSAGE: usize = 16 * 1024;
/// Most descriptors in one message (a pod's four listeners; the three ops ports).
const MAX_FDS: usize = 4;

/// Which of a pod's listeners a socket is.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ListenerKind {
    /// `127.0.0.1:15001` inside the pod.
    Outbound4,
    /// `[::1]:15001` inside the pod.
    Outbound6,
    /// `15006`, plaintext inbound.
    Inbound,
    /// `15008`, HBONE inbound.
    Hbone,
}

#[derive(Serialize, Deserialize, Debug)]
#[serde(tag = "msg", rename_all = "snake_case")]
enum Msg {
    Take {
        version: String,
    },
    Pod {
        key: String,
        kinds: Vec<ListenerKind>,
    },
    Ops,
    End,
    Done,
}

/// A pod's listening sockets, by kind.
pub type PodSockets = Vec<(ListenerKind, OwnedFd)>;

pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

// ---- successor ----

/// A running ztunnel on this node that answered on the hand-over socket.
pub struct Predecessor {
    path: PathBuf,
}

/// What the predecessor handed over; [`Inherited::done`] tells it to stop.
pub struct Inherited {
    conn: Socket,
    /// Pod key (`namespace/name`) -> its listening sockets.
    pub pods: HashMap<String, PodSockets>,
    /// The ops ports' listening sockets.
    pub ops: Vec<std::net::TcpListener>,
}

/// Whether a ztunnel runs on this node: something accepts on the
/// hand-over socket (the connection is closed at once; [`Predecessor::take`]
/// opens its own once this ztunnel is ready to take over, however long the
/// mesh model takes). `None` when there is none (no socket file, or nobody
/// listening on it: the previous ztunnel has exited).
pub fn find(state_dir: &Path) -> Option<Predecessor> {
    let path = socket_path(state_dir);
    match connect(&path) {
        Ok(_) => Some(Predecessor { path }),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::ENOENT) | Some(libc::ECONNREFUSED)
            ) =>
        {
            None
        }
        Err(e) => {
            warn!(component = "handover", socket = %path.display(), error = %e, "cannot reach the hand-over socket; starting as the node's only ztunnel");
            None
        }
    }
}

fn connect(path: &Path) -> io::Result<Socket> {
    let s = seqpacket()?;
    s.connect(&SockAddr::unix(path)?)?;
    s.set_read_timeout(Some(STEP_TIMEOUT))?;
    s.set_write_timeout(Some(STEP_TIMEOUT))?;
    Ok(s)
}

impl Predecessor {
    /// Asks for the sockets and receives them all.
    pub async fn take(self) -> anyhow::Result<Inherited> {
        tokio::task::spawn_blocking(move || {
            let conn = connect(&self.path)
                .with_context(|| format!("connecting to {}", self.path.display()))?;
            send(
                &conn,
                &Msg::Take {
                    version: env!("CARGO_PKG_VERSION").into(),
                },
                &[],
            )?;
            let mut pods = HashMap::new();
            let mut ops = Vec::new();
            loop {
                let (msg, fds) = recv(&conn)?
                    .ok_or_else(|| anyhow::anyhow!("the running ztunnel closed the hand-over"))?;
                match msg {
                    Msg::Pod { key, kinds } => {
                        anyhow::ensure!(
                            kinds.len() == fds.len(),
                            "pod {key}: {} sockets for {} listeners",
                            fds.len(),
                            kinds.len()
                        );
                        pods.insert(key, kinds.into_iter().zip(fds).collect());
                    }
                    Msg::Ops => ops.extend(fds.into_iter().map(std::net::TcpListener::from)),
                    Msg::End => break,
                    other => anyhow::bail!("unexpected hand-over message {other:?}"),
                }
            }
            Ok(Inherited { conn, pods, ops })
        })
        .await?
    }
}

impl Inherited {
    /// Tells the predecessor that every socket is served here now.
    pub async fn done(self) -> anyhow::Result<()> {
        tokio::task::spawn_blocking(move || send(&self.conn, &Msg::Done, &[])).await??;
        Ok(())
    }
}

// ---- predecessor ----

/// The hand-over socket, listening.
pub struct Listener {
    socket: AsyncFd<Socket>,
}

/// Listens on the state folder's hand-over socket (bound beside it and
/// renamed into place: a successor never finds the path missing), owner only.
pub fn bind(state_dir: &Path) -> anyhow::Result<Listener> {
    let path = socket_path(state_dir);
    let tmp = state_dir.join(format!(".{SOCKET_NAME}.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let socket = seqpacket()?;
    socket
        .bind(&SockAddr::unix(&tmp)?)
        .with_context(|| format!("binding {}", tmp.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
    }
    socket.listen(4)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("moving into {}", path.display()))?;
    socket.set_nonblocking(true)?;
    // SAFETY: the Socket owns its descriptor and keeps it, unchanged, for
    // as long as the AsyncFd owns the Socket.
    let socket = unsafe { AsyncFd::register(socket) }.map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(Listener { socket })
}

/// Serves successors until one has taken over; returns then. `ops`: the
/// ops ports' sockets to hand on.
pub async fn serve(listener: Listener, inpod: Arc<InPod>, ops: Vec<OwnedFd>) {
    let ops = Arc::new(ops);
    loop {
        let conn = match accept(&listener).await {
            Ok(c) => c,
            Err(e) => {
                warn!(component = "handover", error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        match give(conn, &inpod, ops.clone()).await {
            // A starting ztunnel checking that this one runs.
            Ok(None) => {}
            Ok(Some(pods)) => {
                info!(
                    component = "handover",
                    pods, "a new ztunnel took over this node's pods"
                );
                return;
            }
            Err(e) => {
                warn!(component = "handover", error = %format!("{e:#}"), "hand-over to a new ztunnel failed; this one carries on");
                inpod.resume().await;
            }
        }
    }
}

async fn accept(listener: &Listener) -> io::Result<Socket> {
    loop {
        let mut ready = listener.socket.readable().await?;
        match ready.try_io(|s| s.get_ref().accept()) {
            Ok(Ok((conn, _))) => {
                conn.set_nonblocking(false)?;
                conn.set_read_timeout(Some(STEP_TIMEOUT))?;
                conn.set_write_timeout(Some(STEP_TIMEOUT))?;
                return Ok(conn);
            }
            Ok(Err(e)) => return Err(e),
            Err(_would_block) => continue,
        }
    }
}

/// One hand-over; the number of pods handed on (`None`: the connection
/// closed without asking, a starting ztunnel's check that this one runs).
async fn give(
    conn: Socket,
    inpod: &Arc<InPod>,
    ops: Arc<Vec<OwnedFd>>,
) -> anyhow::Result<Option<usize>> {
    let conn = Arc::new(conn);
    let c = conn.clone();
    let version = tokio::task::spawn_blocking(move || match recv(&c)? {
        Some((Msg::Take { version }, _)) => Ok(Some(version)),
        Some((other, _)) => anyhow::bail!("expected Take, got {other:?}"),
        None => Ok(None),
    })
    .await??;
    let Some(version) = version else {
        return Ok(None);
    };
    info!(
        component = "handover",
        successor_version = %version,
        "a new ztunnel asks for this node's pods; handing them over"
    );
    let pods = inpod.begin_handover().await?;
    let count = pods.len();
    let c = conn.clone();
    tokio::task::spawn_blocking(move || {
        for (key, sockets) in &pods {
            let kinds = sockets.iter().map(|(k, _)| *k).collect();
            let fds: Vec<BorrowedFd<'_>> = sockets.iter().map(|(_, fd)| fd.as_fd()).collect();
            send(
                &c,
                &Msg::Pod {
                    key: key.clone(),
                    kinds,
                },
                &fds,
            )?;
        }
        let fds: Vec<BorrowedFd<'_>> = ops.iter().map(|fd| fd.as_fd()).collect();
        send(&c, &Msg::Ops, &fds)?;
        send(&c, &Msg::End, &[])?;
        match recv(&c)? {
            Some((Msg::Done, _)) => Ok(()),
            Some((other, _)) => anyhow::bail!("expected Done, got {other:?}"),
            None => anyhow::bail!("the new ztunnel went away before it took over"),
        }
    })
    .await??;
    inpod.finish_handover().await;
    Ok(Some(count))
}

// ---- the wire ----

fn seqpacket() -> io::Result<Socket> {
    Socket::new(Domain::UNIX, Type::from(libc::SOCK_SEQPACKET), None)
}

fn send(sock: &Socket, msg: &Msg, fds: &[BorrowedFd<'_>]) -> anyhow::Result<()> {
    anyhow::ensure!(fds.len() <= MAX_FDS, "{} sockets in one message", fds.len());
    let body = serde_json::to_vec(msg)?;
    let mut iov = libc::iovec {
        iov_base: body.as_ptr() as *mut libc::c_void,
        iov_len: body.len(),
    };
    let fd_bytes = (fds.len() * size_of::<libc::c_int>()) as u32;
    // SAFETY: CMSG_SPACE is arithmetic.
    let space = unsafe { libc::CMSG_SPACE(fd_bytes) } as usize;
    // u64 words: the control buffer must be aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: an all-zero msghdr is valid (no name, no control).
    let mut hdr: libc::msghdr = unsafe { zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if !fds.is_empty() {
        hdr.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        hdr.msg_controllen = space as _;
        // SAFETY: the control buffer holds one cmsghdr with room for the
        // descriptors (CMSG_SPACE above); CMSG_DATA points inside it.
        unsafe {
            let c = libc::CMSG_FIRSTHDR(&hdr);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
            let data = libc::CMSG_DATA(c) as *mut libc::c_int;
            for (i, fd) in fds.iter().enumerate() {
                data.add(i).write_unaligned(fd.as_raw_fd());
            }
        }
    }
    // SAFETY: hdr points at live buffers for the duration of the call.
    let n = unsafe { libc::sendmsg(sock.as_raw_fd(), &hdr, libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error()).context("sending a hand-over message");
    }
    Ok(())
}

/// One message and the descriptors that came with it; `None` at EOF.
fn recv(sock: &Socket) -> anyhow::Result<Option<(Msg, Vec<OwnedFd>)>> {
    let mut body = vec![0u8; MAX_MESSAGE];
    let mut iov = libc::iovec {
        iov_base: body.as_mut_ptr() as *mut libc::c_void,
        iov_len: body.len(),
    };
    // SAFETY: arithmetic.
    let space = unsafe { libc::CMSG_SPACE((MAX_FDS * size_of::<libc::c_int>()) as u32) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: as in `send`.
    let mut hdr: libc::msghdr = unsafe { zeroed() };
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = control.as_mut_ptr() as *mut libc::c_void;
    hdr.msg_controllen = (control.len() * 8) as _;
    // SAFETY: hdr points at live buffers; the kernel fills at most their sizes.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut hdr, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error()).context("receiving a hand-over message");
    }
    // Own every descriptor first, so none leaks whatever follows.
    let mut fds = Vec::new();
    // SAFETY: walking the control messages the kernel wrote, within
    // msg_controllen; SCM_RIGHTS data is an array of fresh descriptors.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&hdr);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let len = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let data = libc::CMSG_DATA(c) as *const libc::c_int;
                for i in 0..len / size_of::<libc::c_int>() {
                    fds.push(OwnedFd::from_raw_fd(data.add(i).read_unaligned()));
                }
            }
            c = libc::CMSG_NXTHDR(&hdr, c);
        }
    }
    if n == 0 {
        return Ok(None);
    }
    if hdr.msg_flags & (libc::MSG_TRUNC | libc::MSG_CTRUNC) != 0 {
        anyhow::bail!(
            "a hand-over message did not fit ({n} bytes, {} sockets)",
            fds.len()
        );
    }
    let msg = serde_json::from_slice(&body[..n as usize]).context("malformed hand-over message")?;
    Ok(Some((msg, fds)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    /// Sockets cross the wire as sockets: a listener sent over the pair
    /// accepts a connection made to the original's address.
    #[test]
    fn a_listening_socket_crosses_with_its_message() {
        let (a, b) = Socket::pair(Domain::UNIX, Type::from(libc::SOCK_SEQPACKET), None).unwrap();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let fd = OwnedFd::from(listener);
        send(
            &a,
            &Msg::Pod {
                key: "shop/web".into(),
                kinds: vec![ListenerKind::Inbound],
            },
            &[fd.as_fd()],
        )
        .unwrap();
        send(&a, &Msg::End, &[]).unwrap();
        drop(fd);
        let (msg, fds) = recv(&b).unwrap().unwrap();
        assert!(matches!(msg, Msg::Pod { ref key, .. } if key == "shop/web"));
        assert_eq!(fds.len(), 1);
        let (msg, fds2) = recv(&b).unwrap().unwrap();
        assert!(matches!(msg, Msg::End) && fds2.is_empty());
        let received = std::net::TcpListener::from(fds.into_iter().next().unwrap());
        let mut client = std::net::TcpStream::connect(addr).unwrap();
        let (mut server, _) = received.accept().unwrap();
        client.write_all(b"hi").unwrap();
        let mut buf = [0u8; 2];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hi");
        drop(a);
        assert!(recv(&b).unwrap().is_none(), "EOF once the sender is gone");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let (a, b) = Socket::pair(Domain::UNIX, Type::from(libc::SOCK_SEQPACKET), None).unwrap();
        a.send(b"{not json").unwrap();
        assert!(recv(&b).is_err());
    }
}
