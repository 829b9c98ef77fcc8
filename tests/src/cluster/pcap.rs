//! A minimal reader for the pcap files tcpdump writes: IPv4 and IPv6
//! packets over Ethernet (or Linux cooked capture, or raw IP), with TCP/UDP
//! ports and payloads pulled out. Enough to assert what crossed the fabric.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use anyhow::{bail, Result};

pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// One captured IP packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// Capture timestamp since the epoch.
    pub ts: Duration,
    pub src: IpAddr,
    pub dst: IpAddr,
    /// IP protocol number (6 = TCP, 17 = UDP; for IPv6 the upper-layer
    /// header after any extension headers).
    pub protocol: u8,
    /// 0 unless TCP or UDP.
    pub src_port: u16,
    pub dst_port: u16,
    /// TCP flags byte (FIN 0x01, SYN 0x02, RST 0x04, PSH 0x08, ACK 0x10); 0 otherwise.
    pub tcp_flags: u8,
    /// TCP or UDP payload as captured (possibly truncated by the snap length).
    pub payload: Vec<u8>,
}

impl Packet {
    pub fn is_tcp(&self) -> bool {
        self.protocol == PROTO_TCP
    }

    /// A connection-opening SYN (without ACK).
    pub fn is_syn(&self) -> bool {
        self.is_tcp() && self.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
    }

    /// Whether the payload contains `needle`.
    pub fn payload_contains(&self, needle: &[u8]) -> bool {
        !needle.is_empty() && self.payload.windows(needle.len()).any(|w| w == needle)
    }
}

/// Parses a pcap file; non-IP frames and IP fragments after the first are
/// skipped.
pub fn parse_pcap(bytes: &[u8]) -> Result<Vec<Packet>> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    if bytes.len() < 24 {
        bail!("pcap file too short for a header ({} bytes)", bytes.len());
    }
    let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
    let (big_endian, nanos) = match magic {
        [0xd4, 0xc3, 0xb2, 0xa1] => (false, false),
        [0xa1, 0xb2, 0xc3, 0xd4] => (true, false),
        [0x4d, 0x3c, 0xb2, 0xa1] => (false, true),
        [0xa1, 0xb2, 0x3c, 0x4d] => (true, true),
        _ => bail!("not a pcap file (magic {magic:02x?}); pcapng is not supported"),
    };
    let u32_at = |b: &[u8], off: usize| {
        let a = [b[off], b[off + 1], b[off + 2], b[off + 3]];
        if big_endian {
            u32::from_be_bytes(a)
        } else {
            u32::from_le_bytes(a)
        }
    };
    let linktype = u32_at(bytes, 20);
    let mut packets = Vec::new();
    let mut off = 24;
    while off + 16 <= bytes.len() {
        let secs = u32_at(bytes, off) as u64;
        let frac = u32_at(bytes, off + 4) as u64;
        let incl = u32_at(bytes, off + 8) as usize;
        off += 16;
        let Some(frame) = bytes.get(off..off + incl) else {
            break;
        };
        off += incl;
        let ts = Duration::from_secs(secs)
            + if nanos {
                Duration::from_nanos(frac)
            } else {
                Duration::from_micros(frac)
            };
        if let Some(ip) = ip_payload(linktype, frame) {
            if let Some(p) = parse_ipv4(ts, ip).or_else(|| parse_ipv6(ts, ip)) {
                packets.push(p);
            }
        }
    }
    Ok(packets)
}

const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;

fn is_ip(ethertype: u16) -> bool {
    ethertype == ETHERTYPE_IPV4 || ethertype == ETHERTYPE_IPV6
}

/// The IP packet inside a link-layer frame, if it carries one.
fn ip_payload(linktype: u32, frame: &[u8]) -> Option<&[u8]> {
    let be16 = |o: usize| {
        frame
            .get(o..o + 2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
    };
    match linktype {
        // Ethernet, with at most one VLAN tag.
        1 => {
            let mut ethertype = be16(12)?;
            let mut start = 14;
            if ethertype == 0x8100 {
                ethertype = be16(16)?;
                start = 18;
            }
            is_ip(ethertype).then(|| frame.get(start..)).flatten()
        }
        // Linux cooked capture v1 (tcpdump -i any on older libpcap).
        113 => is_ip(be16(14)?).then(|| frame.get(16..)).flatten(),
        // Linux cooked capture v2.
        276 => is_ip(be16(0)?).then(|| frame.get(20..)).flatten(),
        // Raw IP.
        12 | 101 | 228 => Some(frame),
        _ => None,
    }
}

fn parse_ipv4(ts: Duration, ip: &[u8]) -> Option<Packet> {
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return None;
    }
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    let frag_offset = u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff;
    if ihl < 20 || frag_offset != 0 {
        return None;
    }
    let protocol = ip[9];
    let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
    let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
    // Captured bytes may be truncated (snaplen) or padded (Ethernet minimum).
    let body = ip.get(ihl..total.min(ip.len()))?;
    Some(transport(ts, src.into(), dst.into(), protocol, body))
}

fn parse_ipv6(ts: Duration, ip: &[u8]) -> Option<Packet> {
    if ip.len() < 40 || ip[0] >> 4 != 6 {
        return None;
    }
    let payload_len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let octets = |o: usize| -> Option<Ipv6Addr> {
        let b: [u8; 16] = ip.get(o..o + 16)?.try_into().ok()?;
        Some(Ipv6Addr::from(b))
    };
    let (src, dst) = (octets(8)?, octets(24)?);
    let mut body = ip.get(40..(40 + payload_len).min(ip.len()))?;
    let mut next = ip[6];
    // Hop-by-hop, routing and destination options headers: skip them; a
    // fragment header: only the first fragment carries the ports.
    loop {
        match next {
            0 | 43 | 60 => {
                let len = (usize::from(*body.get(1)?) + 1) * 8;
                next = *body.first()?;
                body = body.get(len..)?;
            }
            44 => {
                let offset = u16::from_be_bytes([*body.get(2)?, *body.get(3)?]) >> 3;
                if offset != 0 {
                    return None;
                }
                next = *body.first()?;
                body = body.get(8..)?;
            }
            _ => break,
        }
    }
    Some(transport(ts, src.into(), dst.into(), next, body))
}

/// The packet with its TCP or UDP header read from `body`.
fn transport(ts: Duration, src: IpAddr, dst: IpAddr, protocol: u8, body: &[u8]) -> Packet {
    let mut p = Packet {
        ts,
        src,
        dst,
        protocol,
        src_port: 0,
        dst_port: 0,
        tcp_flags: 0,
        payload: Vec::new(),
    };
    let ports = |b: &[u8]| {
        (
            u16::from_be_bytes([b[0], b[1]]),
            u16::from_be_bytes([b[2], b[3]]),
        )
    };
    match protocol {
        PROTO_TCP if body.len() >= 20 => {
            (p.src_port, p.dst_port) = ports(body);
            p.tcp_flags = body[13];
            let data_off = usize::from(body[12] >> 4) * 4;
            p.payload = body.get(data_off..).unwrap_or_default().to_vec();
        }
        PROTO_UDP if body.len() >= 8 => {
            (p.src_port, p.dst_port) = ports(body);
            p.payload = body[8..].to_vec();
        }
        _ => {}
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pcap_with(frame: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&0xa1b2c3d4u32.to_le_bytes());
        f.extend_from_slice(&2u16.to_le_bytes());
        f.extend_from_slice(&4u16.to_le_bytes());
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&65535u32.to_le_bytes());
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&7u32.to_le_bytes());
        f.extend_from_slice(&9u32.to_le_bytes());
        f.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        f.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        f.extend_from_slice(frame);
        f
    }

    #[test]
    fn parses_tcp_over_ethernet() {
        let payload = b"SINK\n";
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x08, 0x00]);
        let total = 20 + 20 + payload.len();
        let mut ip = vec![
            0x45,
            0,
            (total >> 8) as u8,
            total as u8,
            0,
            0,
            0x40,
            0,
            64,
            6,
            0,
            0,
        ];
        ip.extend_from_slice(&[10, 64, 1, 2, 10, 64, 2, 2]);
        let mut tcp = vec![
            0x9c, 0x40, 0x1f, 0x90, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
        ];
        tcp.extend_from_slice(payload);
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&tcp);
        frame.extend_from_slice(&[0; 4]); // Ethernet padding must not leak into the payload.
        let pkts = parse_pcap(&pcap_with(&frame)).unwrap();
        assert_eq!(pkts.len(), 1);
        let p = &pkts[0];
        assert_eq!(
            (p.src, p.dst),
            (
                IpAddr::from(Ipv4Addr::new(10, 64, 1, 2)),
                IpAddr::from(Ipv4Addr::new(10, 64, 2, 2))
            )
        );
        assert_eq!((p.src_port, p.dst_port), (40000, 8080));
        assert_eq!(p.payload, payload);
        assert_eq!(p.ts, Duration::from_secs(7) + Duration::from_micros(9));
        assert!(!p.is_syn());
    }

    #[test]
    fn parses_tcp_over_ipv6_past_extension_headers() {
        let payload = b"\x16\x03\x01";
        let mut frame = vec![0u8; 12];
        frame.extend_from_slice(&[0x86, 0xdd]);
        // Destination options (8 bytes) then TCP.
        let mut ext = vec![6, 0, 1, 4, 0, 0, 0, 0];
        let mut tcp = vec![
            0x9c, 0x40, 0x3a, 0x98, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
        ];
        tcp.extend_from_slice(payload);
        ext.extend_from_slice(&tcp);
        let mut ip = vec![0x60, 0, 0, 0, 0, ext.len() as u8, 60, 64];
        let src: Ipv6Addr = "fd00:0:1::2".parse().unwrap();
        let dst: Ipv6Addr = "fd00:0:2::2".parse().unwrap();
        ip.extend_from_slice(&src.octets());
        ip.extend_from_slice(&dst.octets());
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&ext);
        let pkts = parse_pcap(&pcap_with(&frame)).unwrap();
        assert_eq!(pkts.len(), 1);
        let p = &pkts[0];
        assert_eq!((p.src, p.dst), (IpAddr::from(src), IpAddr::from(dst)));
        assert!(p.is_tcp());
        assert_eq!((p.src_port, p.dst_port), (40000, 15000));
        assert_eq!(p.payload, payload);
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse_pcap(&[0u8; 30]).is_err());
        assert!(parse_pcap(&[]).unwrap().is_empty());
    }
}
