//! Sockets made inside a pod's network namespace. The creating syscall runs
//! on the current thread after `setns()` (see `capture::netns`); the socket
//! keeps its namespace for life, so the async work after it runs anywhere.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpSocket;

use crate::capture::netns::Netns;

/// A listener inside `netns`, with a deep backlog (the default 128
/// overflows under connection-per-request load). An IPv6 wildcard listener
/// is dual-stack: the kernel's sk_lookup can hand it IPv4 connections too,
/// never the reverse.
pub fn listener_in(netns: &Netns, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    netns.run(|| -> io::Result<std::net::TcpListener> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        if let SocketAddr::V6(v6) = addr {
            s.set_only_v6(!v6.ip().is_unspecified())?;
        }
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        s.listen(4096)?;
        Ok(s.into())
    })?
}

/// An unconnected TCP socket inside `netns`, carrying `mark` (so the
/// capture programs let it through). With `transparent_src`, it is bound to
/// that (foreign) address so the peer sees the original client.
pub fn tcp_in(
    netns: &Netns,
    dst: SocketAddr,
    mark: u32,
    transparent_src: Option<IpAddr>,
) -> io::Result<TcpSocket> {
    let socket = netns.run(|| -> io::Result<Socket> {
        let s = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
        s.set_mark(mark)?;
        s.set_nodelay(true)?;
        s.set_nonblocking(true)?;
        if let Some(src) = transparent_src {
            if src.is_ipv4() {
                s.set_ip_transparent(true)?;
            } else {
                set_ipv6_transparent(&s)?;
            }
            s.bind(&SocketAddr::new(src, 0).into())?;
        }
        Ok(s)
    })??;
    let std_stream: std::net::TcpStream = socket.into();
    Ok(TcpSocket::from_std_stream(std_stream))
}

fn set_ipv6_transparent(s: &Socket) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: valid fd, pointer to a live c_int of the given size.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_IPV6,
            libc::IPV6_TRANSPARENT,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
