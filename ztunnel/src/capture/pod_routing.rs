//! In-pod routing that lets ztunnel keep the client's IP on the inbound leg:
//! with `tcp_fwmark_accept` the app's accepted socket carries the mark of
//! ztunnel's transparent socket, and a `fwmark` rule sends its replies to a
//! table that delivers everything locally, back to ztunnel's socket.
//!
//! Rules and routes are programmed over rtnetlink from a socket made inside
//! the pod's netns (a netlink socket belongs to the namespace it was created
//! in), so enrollment runs no program and the image needs no iproute2.

use std::io;

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL,
    NLM_F_REPLACE, NLM_F_REQUEST,
};
use netlink_packet_route::route::{
    RouteAttribute, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::rule::{RuleAction, RuleAttribute, RuleMessage};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use weft_ebpf_common::{INBOUND_ROUTE_TABLE, MARK_INBOUND};

use super::netns::Netns;

/// Read through the calling thread's netns (unlike `/proc/sys/net`, which
/// also follows the thread, `/proc/net` follows the process).
const FWMARK_ACCEPT: &str = "/proc/sys/net/ipv4/tcp_fwmark_accept";

/// Where `tcp_fwmark_accept` is written: `$WEFT_PROC_SYS_NET/ipv4/...` when
/// set (in a container, /proc/sys is read-only; the DaemonSet bind-mounts
/// the host's /proc/sys/net there, which still follows the writing
/// thread's netns).
fn fwmark_accept_path() -> std::path::PathBuf {
    match std::env::var_os("WEFT_PROC_SYS_NET") {
        Some(dir) => std::path::PathBuf::from(dir).join("ipv4/tcp_fwmark_accept"),
        None => FWMARK_ACCEPT.into(),
    }
}
const IF_INET6: &str = "/proc/thread-self/net/if_inet6";
/// `lo` has this index in every network namespace (the kernel's
/// `LOOPBACK_IFINDEX`).
const LOOPBACK_IFINDEX: u32 = 1;

/// Sets `tcp_fwmark_accept`, the `fwmark MARK_INBOUND` rule and the local
/// route table inside the pod netns (IPv6 too when the pod has IPv6).
/// Idempotent.
pub fn install(netns: &Netns) -> io::Result<()> {
    netns.run(|| -> io::Result<()> {
        std::fs::write(fwmark_accept_path(), "1")?;
        let nl = Rtnl::open()?;
        for family in families() {
            if nl.our_rules(family)?.is_empty() {
                nl.ack(
                    RouteNetlinkMessage::NewRule(our_rule(family)),
                    NLM_F_CREATE | NLM_F_EXCL,
                )?;
            }
            nl.ack(
                RouteNetlinkMessage::NewRoute(our_route(family)),
                NLM_F_CREATE | NLM_F_REPLACE,
            )?;
        }
        Ok(())
    })?
}

/// Undoes [`install`]. Idempotent.
pub fn remove(netns: &Netns) -> io::Result<()> {
    netns.run(|| -> io::Result<()> {
        let nl = Rtnl::open()?;
        for family in families() {
            for rule in nl.our_rules(family)? {
                nl.ack_tolerating_gone(RouteNetlinkMessage::DelRule(rule))?;
            }
            for route in nl.table_routes(family)? {
                nl.ack_tolerating_gone(RouteNetlinkMessage::DelRoute(route))?;
            }
        }
        std::fs::write(fwmark_accept_path(), "0")?;
        Ok(())
    })?
}

/// What of [`install`]'s routing is absent from the pod netns, in words
/// (empty when all of it is in place): what CNI CHECK reports.
pub fn missing(netns: &Netns) -> io::Result<Vec<String>> {
    netns.run(|| -> io::Result<Vec<String>> {
        let mut gone = Vec::new();
        if !read_fwmark_accept()? {
            gone.push("net.ipv4.tcp_fwmark_accept is 0".to_owned());
        }
        let nl = Rtnl::open()?;
        for family in families() {
            let v = if family == AddressFamily::Inet { 4 } else { 6 };
            if nl.our_rules(family)?.is_empty() {
                gone.push(format!(
                    "IPv{v} rule fwmark {MARK_INBOUND:#x} lookup {INBOUND_ROUTE_TABLE}"
                ));
            }
            let present = nl.table_routes(family)?.iter().any(|r| {
                r.header.kind == RouteType::Local
                    && r.header.destination_prefix_length == 0
                    && r.attributes
                        .contains(&RouteAttribute::Oif(LOOPBACK_IFINDEX))
            });
            if !present {
                let any = if v == 4 { "0.0.0.0/0" } else { "::/0" };
                gone.push(format!(
                    "IPv{v} route local {any} dev lo table {INBOUND_ROUTE_TABLE}"
                ));
            }
        }
        Ok(gone)
    })?
}

/// Whether `tcp_fwmark_accept` is on in this netns (for checks and tests).
pub fn fwmark_accept_enabled(netns: &Netns) -> io::Result<bool> {
    netns.run(read_fwmark_accept)?
}

fn read_fwmark_accept() -> io::Result<bool> {
    std::fs::read_to_string(fwmark_accept_path()).map(|s| s.trim() == "1")
}

/// IPv4, plus IPv6 when the netns has IPv6 enabled.
fn families() -> Vec<AddressFamily> {
    let has_v6 = std::fs::read_to_string(IF_INET6).is_ok_and(|s| !s.trim().is_empty());
    if has_v6 {
        vec![AddressFamily::Inet, AddressFamily::Inet6]
    } else {
        vec![AddressFamily::Inet]
    }
}

/// `fwmark MARK_INBOUND lookup INBOUND_ROUTE_TABLE` (the table id is above
/// 255, so it travels as an attribute and the header says "unspecified").
fn our_rule(family: AddressFamily) -> RuleMessage {
    let mut rule = RuleMessage::default();
    rule.header.family = family;
    rule.header.table = RouteHeader::RT_TABLE_UNSPEC;
    rule.header.action = RuleAction::ToTable;
    rule.attributes = vec![
        RuleAttribute::FwMark(MARK_INBOUND),
        RuleAttribute::Table(INBOUND_ROUTE_TABLE),
    ];
    rule
}

/// `local 0.0.0.0/0 dev lo table INBOUND_ROUTE_TABLE` (or `::/0`).
fn our_route(family: AddressFamily) -> RouteMessage {
    let mut route = RouteMessage::default();
    route.header.address_family = family;
    route.header.destination_prefix_length = 0;
    route.header.table = RouteHeader::RT_TABLE_UNSPEC;
    route.header.protocol = RouteProtocol::Boot;
    route.header.scope = RouteScope::Host;
    route.header.kind = RouteType::Local;
    route.attributes = vec![
        RouteAttribute::Table(INBOUND_ROUTE_TABLE),
        RouteAttribute::Oif(LOOPBACK_IFINDEX),
    ];
    route
}

/// A synchronous rtnetlink socket of the calling thread's netns.
struct Rtnl {
    socket: Socket,
    seq: std::cell::Cell<u32>,
}

/// Large enough for any one datagram of a rule or route dump.
const RECV_BUF: usize = 64 * 1024;

impl Rtnl {
    fn open() -> io::Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE)?;
        socket.bind_auto()?;
        socket.connect(&SocketAddr::new(0, 0))?;
        Ok(Self {
            socket,
            seq: std::cell::Cell::new(1),
        })
    }

    fn send(&self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<u32> {
        let seq = self.seq.get();
        self.seq.set(seq.wrapping_add(1));
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | flags;
        header.sequence_number = seq;
        let mut packet = NetlinkMessage::new(header, NetlinkPayload::from(msg));
        packet.finalize();
        let mut buf = vec![0; packet.buffer_len()];
        packet.serialize(&mut buf);
        self.socket.send(&buf, 0)?;
        Ok(seq)
    }

    /// Sends a change and waits for the kernel's acknowledgement.
    fn ack(&self, msg: RouteNetlinkMessage, flags: u16) -> io::Result<()> {
        let seq = self.send(msg, flags | NLM_F_ACK)?;
        self.receive(seq, |_| {}).map(drop)
    }

    /// Like `ack`, but something already gone (ENOENT, ESRCH) is done.
    fn ack_tolerating_gone(&self, msg: RouteNetlinkMessage) -> io::Result<()> {
        match self.ack(msg, 0) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ESRCH)) => Ok(()),
            other => other,
        }
    }

    /// Every message of a dump.
    fn dump(&self, msg: RouteNetlinkMessage) -> io::Result<Vec<RouteNetlinkMessage>> {
        let seq = self.send(msg, NLM_F_DUMP)?;
        let mut out = Vec::new();
        self.receive(seq, |m| out.push(m))?;
        Ok(out)
    }

    /// Reads the answers to request `seq` until its ACK, error or end of
    /// dump, handing each data message to `each`.
    fn receive(&self, seq: u32, mut each: impl FnMut(RouteNetlinkMessage)) -> io::Result<()> {
        let mut buf = vec![0u8; RECV_BUF];
        loop {
            let n = self.socket.recv(&mut &mut buf[..], 0)?;
            let mut offset = 0;
            while offset < n {
                let msg = NetlinkMessage::<RouteNetlinkMessage>::deserialize(&buf[offset..n])
                    .map_err(|e| io::Error::other(format!("malformed rtnetlink answer: {e}")))?;
                let len = msg.header.length as usize;
                if len == 0 {
                    break;
                }
                offset += len;
                if msg.header.sequence_number != seq {
                    continue;
                }
                match msg.payload {
                    NetlinkPayload::Done(_) => return Ok(()),
                    NetlinkPayload::Error(e) => {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                        }
                    }
                    NetlinkPayload::InnerMessage(m) => each(m),
                    _ => {}
                }
            }
        }
    }

    /// This netns's rules of `family` that are ours.
    fn our_rules(&self, family: AddressFamily) -> io::Result<Vec<RuleMessage>> {
        let mut req = RuleMessage::default();
        req.header.family = family;
        let want = our_rule(family);
        Ok(self
            .dump(RouteNetlinkMessage::GetRule(req))?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRule(r) => Some(r),
                _ => None,
            })
            .filter(|r| {
                r.header.family == family
                    && r.header.action == RuleAction::ToTable
                    && want.attributes.iter().all(|a| r.attributes.contains(a))
            })
            .collect())
    }

    /// Every route of `family` in the inbound table.
    fn table_routes(&self, family: AddressFamily) -> io::Result<Vec<RouteMessage>> {
        let mut req = RouteMessage::default();
        req.header.address_family = family;
        Ok(self
            .dump(RouteNetlinkMessage::GetRoute(req))?
            .into_iter()
            .filter_map(|m| match m {
                RouteNetlinkMessage::NewRoute(r) => Some(r),
                _ => None,
            })
            .filter(|r| {
                r.header.address_family == family
                    && r.attributes
                        .contains(&RouteAttribute::Table(INBOUND_ROUTE_TABLE))
            })
            .collect())
    }
}
