//! A bounded HTTP/1.0 GET to a proxy's or the controller's ops port:
//! connect within 3 s, the whole answer within 5 s, at most 64 MiB.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};

/// (status code, body).
pub fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))
        .with_context(|| format!("cannot reach {addr}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.take(64 * 1024 * 1024)
        .read_to_end(&mut raw)
        .with_context(|| format!("reading {path} from {addr}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("malformed HTTP status line")?;
    Ok((code, body.to_owned()))
}

/// GET `path` expecting 200 and JSON.
pub fn get_json(addr: SocketAddr, path: &str) -> Result<serde_json::Value> {
    let (code, body) = get(addr, path)?;
    if code != 200 {
        anyhow::bail!("GET {path} on {addr} answered {code}");
    }
    serde_json::from_str(&body).with_context(|| format!("{path} on {addr} is not JSON"))
}
