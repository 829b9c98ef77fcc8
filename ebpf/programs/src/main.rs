//! Weft's in-kernel capture: `cgroup/connect4|6` send enrolled pods' outbound
//! TCP to ztunnel's in-pod 15001 listener, `sockops` files the original
//! destination under the client's tuple for ztunnel to read, `getpeername4|6`
//! show the app the address it asked for, and `sk_lookup` (per pod netns) hands
//! inbound TCP to ztunnel's in-pod listeners, dropping it when they are gone.
#![no_std]
#![no_main]

use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{bpf_sock_addr, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB},
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LruHashMap, SockMap},
    programs::{SkLookupContext, SockAddrContext, SockOpsContext},
    EbpfContext,
};
use weft_ebpf_common::{
    IpKey, LegKey, OrigKey, PodSteer, SockAddr, SockOrig, FAMILY_V4, FAMILY_V6, HBONE_PORT,
    LISTENER_SLOTS, MARK_INBOUND, MARK_OUTBOUND, MAX_PROBE_PORTS, MAX_PROBE_SOURCES, OUTBOUND_PORT,
};

const IPPROTO_TCP: u32 = 6;
const LOOPBACK_IFINDEX: u32 = 1;
/// Return codes of cgroup sock_addr programs.
const ALLOW: i32 = 1;
/// Return codes of sk_lookup programs.
const SK_PASS: u32 = 1;
const SK_DROP: u32 = 0;

#[map]
static ENROLLED: HashMap<u64, u32> = HashMap::pinned(16384, 0);

#[map]
static POD_STEER: HashMap<IpKey, PodSteer> = HashMap::pinned(16384, 0);

#[map]
static mut LISTENERS: SockMap = SockMap::pinned(LISTENER_SLOTS, 0);

#[map]
static SOCK_ORIG: LruHashMap<u64, SockOrig> = LruHashMap::pinned(65536, 0);

#[map]
static ORIG_DST: LruHashMap<OrigKey, SockAddr> = LruHashMap::pinned(65536, 0);

#[map]
static INBOUND_LEGS: LruHashMap<LegKey, u32> = LruHashMap::pinned(65536, 0);

/// 127.0.0.1 as the kernel's network-order word.
const LOCALHOST_V4: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// ::1 as network-order words.
const LOCALHOST_V6: [u32; 4] = [0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])];
/// ::ffff:0:0 prefix word.
const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

#[inline(always)]
fn is_loopback_v4(ip_be: u32) -> bool {
    u32::from_be(ip_be) >> 24 == 127
}

/// Context fields must be read and written one u32 at a time; volatile keeps
/// the compiler from merging the accesses.
#[inline(always)]
unsafe fn read_ip6(p: *const [u32; 4]) -> [u32; 4] {
    let p = p as *const u32;
    [
        read_volatile(p),
        read_volatile(p.add(1)),
        read_volatile(p.add(2)),
        read_volatile(p.add(3)),
    ]
}

#[inline(always)]
unsafe fn write_ip6(p: *mut [u32; 4], v: [u32; 4]) {
    let p = p as *mut u32;
    write_volatile(p, v[0]);
    write_volatile(p.add(1), v[1]);
    write_volatile(p.add(2), v[2]);
    write_volatile(p.add(3), v[3]);
}

/// Common gate of the connect hooks: enrolled netns, TCP, not ztunnel's own
/// socket. ztunnel's connections toward the app (`MARK_INBOUND`) are filed in
/// `INBOUND_LEGS` so that `sk_lookup` lets them through to the app.
#[inline(always)]
unsafe fn should_capture(ctx: &SockAddrContext, sa: *const bpf_sock_addr, v6: bool) -> Option<u64> {
    if read_volatile(addr_of!((*sa).protocol)) != IPPROTO_TCP {
        return None;
    }
    let netns = bpf_get_netns_cookie(ctx.as_ptr());
    ENROLLED.get(&netns)?;
    let sk = (*sa).__bindgen_anon_1.sk;
    if sk.is_null() {
        return None;
    }
    let mark = read_volatile(addr_of!((*sk).mark));
    if mark == MARK_INBOUND {
        let src_port = read_volatile(addr_of!((*sk).src_port)) as u16;
        let dst_port = u16::from_be(read_volatile(addr_of!((*sa).user_port)) as u16);
        if src_port != 0 {
            let key = if v6 {
                LegKey {
                    app: SockAddr::v6(read_ip6(addr_of!((*sa).user_ip6)), dst_port),
                    client: SockAddr::v6(read_ip6(addr_of!((*sk).src_ip6)), src_port),
                }
            } else {
                LegKey {
                    app: SockAddr::v4(read_volatile(addr_of!((*sa).user_ip4)), dst_port),
                    client: SockAddr::v4(read_volatile(addr_of!((*sk).src_ip4)), src_port),
                }
            };
            let _ = INBOUND_LEGS.insert(&key, &1, 0);
        }
        return None;
    }
    if mark == MARK_OUTBOUND {
        return None;
    }
    Some(netns)
}

#[inline(always)]
fn record(ctx: &SockAddrContext, dst: SockAddr, netns_cookie: u64) {
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let _ = SOCK_ORIG.insert(&cookie, &SockOrig { dst, netns_cookie }, 0);
}

#[cgroup_sock_addr(connect4)]
pub fn weft_connect4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    unsafe {
        let Some(netns) = should_capture(&ctx, sa, false) else {
            return ALLOW;
        };
        let ip = read_volatile(addr_of!((*sa).user_ip4));
        if is_loopback_v4(ip) {
            return ALLOW;
        }
        let port = u16::from_be(read_volatile(addr_of!((*sa).user_port)) as u16);
        record(&ctx, SockAddr::v4(ip, port), netns);
        write_volatile(addr_of_mut!((*sa).user_ip4), LOCALHOST_V4);
        write_volatile(addr_of_mut!((*sa).user_port), OUTBOUND_PORT.to_be() as u32);
    }
    ALLOW
}

#[cgroup_sock_addr(connect6)]
pub fn weft_connect6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    unsafe {
        let Some(netns) = should_capture(&ctx, sa, true) else {
            return ALLOW;
        };
        let ip = read_ip6(addr_of!((*sa).user_ip6));
        let mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_WORD;
        if ip == LOCALHOST_V6 || (mapped && is_loopback_v4(ip[3])) {
            return ALLOW;
        }
        let port = u16::from_be(read_volatile(addr_of!((*sa).user_port)) as u16);
        record(&ctx, SockAddr::v6(ip, port), netns);
        // A dual-stack socket asking for an IPv4 peer goes to the IPv4 listener.
        let target = if mapped {
            [0, 0, V4_MAPPED_WORD, LOCALHOST_V4]
        } else {
            LOCALHOST_V6
        };
        write_ip6(addr_of_mut!((*sa).user_ip6), target);
        write_volatile(addr_of_mut!((*sa).user_port), OUTBOUND_PORT.to_be() as u32);
    }
    ALLOW
}

#[sock_ops]
pub fn weft_sockops(ctx: SockOpsContext) -> u32 {
    let ops = ctx.ops;
    unsafe {
        if read_volatile(addr_of!((*ops).op)) != BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB {
            return 1;
        }
        let family = read_volatile(addr_of!((*ops).family));
        let local_port = read_volatile(addr_of!((*ops).local_port)) as u16;
        // Network order in the upper half (see bpf_sock_ops docs).
        let remote_port = u32::from_be(read_volatile(addr_of!((*ops).remote_port))) as u16;
        let (local, remote) = if family == FAMILY_V4 as u32 {
            (
                SockAddr::v4(read_volatile(addr_of!((*ops).local_ip4)), local_port),
                SockAddr::v4(read_volatile(addr_of!((*ops).remote_ip4)), remote_port),
            )
        } else if family == FAMILY_V6 as u32 {
            (
                SockAddr::v6(read_ip6(addr_of!((*ops).local_ip6)), local_port),
                SockAddr::v6(read_ip6(addr_of!((*ops).remote_ip6)), remote_port),
            )
        } else {
            return 1;
        };
        let cookie = bpf_get_socket_cookie(ctx.as_ptr());
        match SOCK_ORIG.get(&cookie) {
            Some(orig) => {
                let key = OrigKey {
                    netns_cookie: orig.netns_cookie,
                    client: local,
                };
                let _ = ORIG_DST.insert(&key, &orig.dst, 0);
            }
            // Possibly ztunnel's leg toward an app: established, so SYN
            // retransmits are over and sk_lookup needs the entry no more.
            None => {
                let _ = INBOUND_LEGS.remove(&LegKey {
                    app: remote,
                    client: local,
                });
            }
        }
    }
    1
}

/// Restores the original destination as the peer of a captured socket.
#[inline(always)]
unsafe fn original_peer(ctx: &SockAddrContext) -> Option<SockAddr> {
    let cookie = bpf_get_socket_cookie(ctx.as_ptr());
    SOCK_ORIG.get(&cookie).map(|o| o.dst)
}

#[cgroup_sock_addr(getpeername4)]
pub fn weft_getpeername4(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    unsafe {
        if read_volatile(addr_of!((*sa).user_ip4)) != LOCALHOST_V4
            || read_volatile(addr_of!((*sa).user_port)) != OUTBOUND_PORT.to_be() as u32
        {
            return ALLOW;
        }
        let Some(dst) = original_peer(&ctx) else {
            return ALLOW;
        };
        if dst.family != FAMILY_V4 {
            return ALLOW;
        }
        write_volatile(addr_of_mut!((*sa).user_ip4), dst.addr[0]);
        write_volatile(addr_of_mut!((*sa).user_port), dst.port.to_be() as u32);
    }
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn weft_getpeername6(ctx: SockAddrContext) -> i32 {
    let sa = ctx.sock_addr;
    unsafe {
        if read_volatile(addr_of!((*sa).user_port)) != OUTBOUND_PORT.to_be() as u32 {
            return ALLOW;
        }
        let ip = read_ip6(addr_of!((*sa).user_ip6));
        let mapped = ip[0] == 0 && ip[1] == 0 && ip[2] == V4_MAPPED_WORD;
        if ip != LOCALHOST_V6 && !(mapped && ip[3] == LOCALHOST_V4) {
            return ALLOW;
        }
        let Some(dst) = original_peer(&ctx) else {
            return ALLOW;
        };
        let restored = if dst.family == FAMILY_V4 {
            [0, 0, V4_MAPPED_WORD, dst.addr[0]]
        } else {
            dst.addr
        };
        write_ip6(addr_of_mut!((*sa).user_ip6), restored);
        write_volatile(addr_of_mut!((*sa).user_port), dst.port.to_be() as u32);
    }
    ALLOW
}

#[sk_lookup]
pub fn weft_sk_lookup(ctx: SkLookupContext) -> u32 {
    let l = ctx.lookup;
    unsafe {
        if read_volatile(addr_of!((*l).protocol)) != IPPROTO_TCP {
            return SK_PASS;
        }
        // Pod-local traffic to 127.0.0.1/::1. (Traffic to the pod's own IP
        // reports the veth's index, hence the checks below.)
        if read_volatile(addr_of!((*l).ingress_ifindex)) == LOOPBACK_IFINDEX {
            return SK_PASS;
        }
        let family = read_volatile(addr_of!((*l).family));
        let (local, remote) = if family == FAMILY_V4 as u32 {
            (
                IpKey::v4(read_volatile(addr_of!((*l).local_ip4))),
                IpKey::v4(read_volatile(addr_of!((*l).remote_ip4))),
            )
        } else if family == FAMILY_V6 as u32 {
            (
                IpKey::v6(read_ip6(addr_of!((*l).local_ip6))),
                IpKey::v6(read_ip6(addr_of!((*l).remote_ip6))),
            )
        } else {
            return SK_PASS;
        };
        let Some(steer) = POD_STEER.get(&local) else {
            return SK_PASS;
        };
        // The pod talking to itself (a martian from outside).
        if local == remote {
            return SK_PASS;
        }
        let local_port = read_volatile(addr_of!((*l).local_port));
        let leg = LegKey {
            app: SockAddr {
                addr: local.addr,
                port: local_port as u16,
                family: local.family as u16,
                _pad: 0,
            },
            client: SockAddr {
                addr: remote.addr,
                port: u16::from_be(read_volatile(addr_of!((*l).remote_port))),
                family: remote.family as u16,
                _pad: 0,
            },
        };
        // ztunnel's own connection toward the app.
        if INBOUND_LEGS.get(&leg).is_some() {
            return SK_PASS;
        }
        // The kubelet's probes: from the node's own addresses to a port the
        // pod's probes use, and nothing else, reach the app directly.
        let mut from_node = false;
        let mut i = 0;
        while i < MAX_PROBE_SOURCES {
            if (i as u32) < steer.probe_count && steer.probe_sources[i] == remote {
                from_node = true;
            }
            i += 1;
        }
        if from_node {
            let mut j = 0;
            while j < MAX_PROBE_PORTS {
                if (j as u32) < steer.probe_port_count
                    && u32::from(steer.probe_ports[j]) == local_port
                {
                    return SK_PASS;
                }
                j += 1;
            }
        }
        let slot = if local_port == HBONE_PORT as u32 {
            steer.hbone_slot
        } else {
            steer.inbound_slot
        };
        #[allow(static_mut_refs)]
        match LISTENERS.redirect_sk_lookup(&ctx, slot, 0) {
            Ok(()) => SK_PASS,
            // ztunnel's listener is gone: never let the app be reached around it.
            Err(_) => SK_DROP,
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
