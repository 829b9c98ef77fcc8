//! Map keys, map values and constants shared by Weft's eBPF programs and the
//! ztunnel loader. Everything here is `#[repr(C)]` with explicit padding, so
//! the byte layout the kernel hashes is the same on both sides.
#![no_std]

/// Socket mark of ztunnel's own sockets leaving a pod: connect hooks skip them.
pub const MARK_OUTBOUND: u32 = 0x5eb1;
/// Socket mark of ztunnel's transparent sockets toward the app: connect hooks
/// skip them, and the pod's `fwmark` rule routes the app's replies with it.
pub const MARK_INBOUND: u32 = 0x5eb2;
/// Routing table (inside each pod netns) that delivers `MARK_INBOUND` replies locally.
pub const INBOUND_ROUTE_TABLE: u32 = 1515;

/// In-pod outbound capture listener (127.0.0.1 and [::1]).
pub const OUTBOUND_PORT: u16 = 15001;
/// In-pod inbound plaintext capture listener.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// In-pod inbound HBONE listener.
pub const HBONE_PORT: u16 = 15008;

/// Linux `AF_INET`.
pub const FAMILY_V4: u16 = 2;
/// Linux `AF_INET6`.
pub const FAMILY_V6: u16 = 10;

/// Capacity of the `LISTENERS` SOCKMAP: two slots (inbound plaintext, HBONE) per pod.
pub const LISTENER_SLOTS: u32 = 4096;
/// Probe-source addresses (the node's IPs) kept per pod.
pub const MAX_PROBE_SOURCES: usize = 4;
/// Probe ports kept per pod (`weft_api::model::MAX_PROBE_PORTS`).
pub const MAX_PROBE_PORTS: usize = 8;

/// Map names; the maps are pinned by these names under the loader's pin dir.
pub mod maps {
    /// `HashMap<u64 netns cookie, u32 flags>`: pods whose outbound is captured.
    pub const ENROLLED: &str = "ENROLLED";
    /// `HashMap<IpKey pod ip, PodSteer>`: inbound steering per pod IP.
    pub const POD_STEER: &str = "POD_STEER";
    /// `SockMap` of ztunnel's in-pod inbound listeners (slots from `PodSteer`).
    pub const LISTENERS: &str = "LISTENERS";
    /// `LruHashMap<u64 socket cookie, SockOrig>`: original destination per app socket.
    pub const SOCK_ORIG: &str = "SOCK_ORIG";
    /// `LruHashMap<OrigKey, SockAddr>`: original destination by client tuple.
    pub const ORIG_DST: &str = "ORIG_DST";
    /// `LruHashMap<LegKey, u32>`: ztunnel's own connections toward apps, which
    /// `sk_lookup` must not steer back to ztunnel.
    pub const INBOUND_LEGS: &str = "INBOUND_LEGS";
}

/// An IPv4 or IPv6 socket address.
///
/// `addr` holds the address in network byte order, word by word as the kernel
/// exposes it (`user_ip4`, `user_ip6[4]`): an IPv4 address is `addr[0]` with the
/// other words zero. IPv4-mapped IPv6 addresses are stored as IPv4, so both
/// sides agree on one form. `port` is in host byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockAddr {
    pub addr: [u32; 4],
    pub port: u16,
    pub family: u16,
    pub _pad: u32,
}

/// An IPv4 or IPv6 address in the same form as [`SockAddr::addr`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IpKey {
    pub addr: [u32; 4],
    pub family: u32,
}

/// Original destination recorded at `connect()` time, keyed by socket cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SockOrig {
    pub dst: SockAddr,
    /// Netns cookie of the connecting socket.
    pub netns_cookie: u64,
}

/// Key of `ORIG_DST`: the client end of a captured connection, as ztunnel sees
/// it after `accept()` on the pod's outbound listener. The netns cookie is part
/// of the key because every pod has its own 127.0.0.1.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct OrigKey {
    pub netns_cookie: u64,
    pub client: SockAddr,
}

/// Key of `INBOUND_LEGS`: one of ztunnel's (`MARK_INBOUND`) connections to an
/// app inside a pod, recorded by the connect hooks from the socket's bound
/// address, looked up by `sk_lookup` and dropped once established.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LegKey {
    pub app: SockAddr,
    pub client: SockAddr,
}

/// Inbound steering for one pod, stored under each of its IPs in `POD_STEER`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodSteer {
    pub netns_cookie: u64,
    /// `LISTENERS` slot of the inbound plaintext (15006) listener.
    pub inbound_slot: u32,
    /// `LISTENERS` slot of the HBONE (15008) listener.
    pub hbone_slot: u32,
    /// Sources that reach the app directly (the node: kubelet health
    /// probes), and only on `probe_ports`.
    pub probe_sources: [IpKey; MAX_PROBE_SOURCES],
    pub probe_count: u32,
    pub probe_port_count: u32,
    /// The pod's probe ports (host order); from the node's addresses to
    /// any other port, a connection goes through the ztunnel.
    pub probe_ports: [u16; MAX_PROBE_PORTS],
}

impl SockAddr {
    /// IPv4 address (network order word) and host-order port.
    #[inline(always)]
    pub const fn v4(ip_be: u32, port: u16) -> SockAddr {
        SockAddr {
            addr: [ip_be, 0, 0, 0],
            port,
            family: FAMILY_V4,
            _pad: 0,
        }
    }

    /// IPv6 address (network order words) and host-order port; IPv4-mapped
    /// addresses become IPv4.
    #[inline(always)]
    pub const fn v6(ip: [u32; 4], port: u16) -> SockAddr {
        if is_v4_mapped(ip) {
            SockAddr::v4(ip[3], port)
        } else {
            SockAddr {
                addr: ip,
                port,
                family: FAMILY_V6,
                _pad: 0,
            }
        }
    }
}

impl IpKey {
    #[inline(always)]
    pub const fn v4(ip_be: u32) -> IpKey {
        IpKey {
            addr: [ip_be, 0, 0, 0],
            family: FAMILY_V4 as u32,
        }
    }

    /// IPv4-mapped addresses become IPv4.
    #[inline(always)]
    pub const fn v6(ip: [u32; 4]) -> IpKey {
        if is_v4_mapped(ip) {
            IpKey::v4(ip[3])
        } else {
            IpKey {
                addr: ip,
                family: FAMILY_V6 as u32,
            }
        }
    }
}

/// `::ffff:a.b.c.d`, given as network-order words.
#[inline(always)]
pub const fn is_v4_mapped(ip: [u32; 4]) -> bool {
    ip[0] == 0 && ip[1] == 0 && ip[2] == u32::from_be(0x0000_ffff) && ip[2] != 0
}

#[cfg(feature = "user")]
mod user {
    use super::*;
    use core::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

    unsafe impl aya::Pod for SockAddr {}
    unsafe impl aya::Pod for IpKey {}
    unsafe impl aya::Pod for SockOrig {}
    unsafe impl aya::Pod for OrigKey {}
    unsafe impl aya::Pod for PodSteer {}
    unsafe impl aya::Pod for LegKey {}

    fn words(ip: Ipv6Addr) -> [u32; 4] {
        let o = ip.octets();
        let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
        [w(0), w(4), w(8), w(12)]
    }

    fn ip_of(addr: [u32; 4], family: u32) -> IpAddr {
        if family == FAMILY_V4 as u32 {
            IpAddr::V4(Ipv4Addr::from(addr[0].to_ne_bytes()))
        } else {
            let mut o = [0u8; 16];
            for (i, w) in addr.iter().enumerate() {
                o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
    }

    impl From<IpAddr> for IpKey {
        fn from(ip: IpAddr) -> IpKey {
            match ip {
                IpAddr::V4(v4) => IpKey::v4(u32::from_ne_bytes(v4.octets())),
                IpAddr::V6(v6) => IpKey::v6(words(v6)),
            }
        }
    }

    impl From<IpKey> for IpAddr {
        fn from(k: IpKey) -> IpAddr {
            ip_of(k.addr, k.family)
        }
    }

    impl From<SocketAddr> for SockAddr {
        fn from(sa: SocketAddr) -> SockAddr {
            match sa.ip() {
                IpAddr::V4(v4) => SockAddr::v4(u32::from_ne_bytes(v4.octets()), sa.port()),
                IpAddr::V6(v6) => SockAddr::v6(words(v6), sa.port()),
            }
        }
    }

    impl From<SockAddr> for SocketAddr {
        fn from(sa: SockAddr) -> SocketAddr {
            SocketAddr::new(ip_of(sa.addr, sa.family as u32), sa.port)
        }
    }
}

#[cfg(all(test, feature = "user"))]
mod tests {
    extern crate std;
    use super::*;
    use core::net::SocketAddr;

    #[test]
    fn sockaddr_round_trips_and_unmaps_v4() {
        for s in [
            "10.1.2.3:80",
            "[fd00::1]:15008",
            "127.0.0.1:15001",
            "[::1]:15001",
        ] {
            let sa: SocketAddr = s.parse().unwrap();
            assert_eq!(SocketAddr::from(SockAddr::from(sa)), sa);
        }
        let mapped: SocketAddr = "[::ffff:10.1.2.3]:80".parse().unwrap();
        let plain: SocketAddr = "10.1.2.3:80".parse().unwrap();
        assert_eq!(SockAddr::from(mapped), SockAddr::from(plain));
        assert_eq!(core::mem::size_of::<SockAddr>(), 24);
        assert_eq!(core::mem::size_of::<OrigKey>(), 32);
        assert_eq!(core::mem::size_of::<SockOrig>(), 32);
        assert_eq!(core::mem::size_of::<PodSteer>(), 104);
    }
}
