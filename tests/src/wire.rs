//! What the end-to-end tests check on the wire: a file whose bytes must
//! never be seen in clear, served over HTTP from a pod, and the packets
//! that crossed the fabric being HBONE (TLS on 15008) only. Shared by the
//! IPv4 and IPv6 cross-node tests.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anyhow::Result;

use crate::cluster::{Packet, Pod};
use crate::mesh::Mesh;

/// Starts python's `http.server` (which logs each client address) in
/// `pod` on `bind`:8080 as process `name`, serving `marker.txt`; returns
/// the marker, whose bytes must never cross the fabric in clear. The file
/// holds it 50 times.
pub fn serve_marker_file(mesh: &mut Mesh, pod: &Pod, name: &str, bind: &str) -> Result<String> {
    let marker = format!("WEFT-PLAINTEXT-MARKER-{name}-{}", std::process::id());
    let www = mesh.cluster.run_dir().join(format!("www-{name}"));
    std::fs::create_dir_all(&www)?;
    std::fs::write(www.join("marker.txt"), marker.repeat(50))?;
    let mut http = pod.command("python3");
    http.args([
        "-u",
        "-m",
        "http.server",
        "8080",
        "--bind",
        bind,
        "--directory",
    ])
    .arg(&www);
    mesh.cluster.spawn(name, http)?;
    mesh.cluster
        .wait_for_log(name, "Serving HTTP", Duration::from_secs(10))?;
    Ok(marker)
}

/// Every packet is on the HBONE port, none carries `marker` in clear, and
/// TLS application data was seen (panics otherwise, naming the packet).
pub fn assert_hbone_only(packets: &[Packet], marker: &str) {
    assert!(!packets.is_empty(), "the capture saw no cross-node packets");
    for p in packets {
        assert!(
            p.src_port == 15008 || p.dst_port == 15008,
            "cross-node packet not on the HBONE port: {}:{} -> {}:{}",
            p.src,
            p.src_port,
            p.dst,
            p.dst_port
        );
        assert!(
            !p.payload_contains(marker.as_bytes()),
            "plaintext marker seen on the wire: {}:{} -> {}:{}",
            p.src,
            p.src_port,
            p.dst,
            p.dst_port
        );
    }
    assert!(
        packets.iter().any(|p| p.payload.first() == Some(&0x17)),
        "no TLS application data records seen"
    );
}

/// GETs `url` (a `serve_marker_file` server, `[v6]` literals allowed) from
/// `client` and checks it got the whole file.
pub fn get_marker_file(client: &Pod, url: &str, marker: &str) {
    let out = client
        .command("curl")
        .args(["-sS", "--http1.1", "--max-time", "10", "-g", url])
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl {url} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), marker.repeat(50));
}

/// Sends `bytes` random bytes from `client` to a `weft-testapp serve` at
/// `target`, which checks their SHA-256; returns the client address the
/// server saw (IPv4-mapped addresses unmapped).
pub fn send_checksummed(mesh: &Mesh, client: &Pod, target: &str, bytes: u64) -> IpAddr {
    let (out, v) = mesh
        .testapp(
            client,
            &[
                "send",
                "--connect",
                target,
                "--bytes",
                &bytes.to_string(),
                "--timeout",
                "60",
            ],
        )
        .expect("run weft-testapp");
    assert!(
        out.status.success() && v["ok"] == true,
        "checksummed transfer to {target}: {v} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    v["peer_seen_by_server"]
        .as_str()
        .and_then(|s| s.parse::<SocketAddr>().ok())
        .map(|a| a.ip().to_canonical())
        .unwrap_or_else(|| panic!("no peer address in {v}"))
}
