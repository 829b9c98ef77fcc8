//! weftctl: inspect a node's ztunnel. `weftctl status` reads the admin
//! endpoint (`/config_dump`, localhost only, so run it on the node or in the
//! ztunnel's network namespace) and the readiness endpoint, and prints what
//! an operator checks first: ready or not, model version, pods and whether
//! they are captured, workload certificates and when they expire.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::Value;

#[derive(Parser)]
#[command(name = "weftctl", version, about = "Inspect Weft's data plane")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Health and state of the ztunnel on this node.
    Status {
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
        #[arg(long, default_value = "127.0.0.1:15021")]
        readiness: SocketAddr,
        /// Print the raw config dump as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> std::process::ExitCode {
    match run(Cli::parse()) {
        Ok(healthy) if healthy => std::process::ExitCode::SUCCESS,
        Ok(_) => std::process::ExitCode::from(3),
        Err(e) => {
            eprintln!("weftctl: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A bounded HTTP/1.0 GET: (status code, body).
fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3)).with_context(|| {
        format!("cannot reach the ztunnel at {addr} (is it running on this node?)")
    })?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut raw = Vec::new();
    s.take(64 * 1024 * 1024).read_to_end(&mut raw)?;
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

fn run(cli: Cli) -> Result<bool> {
    match cli.command {
        Cmd::Status {
            admin,
            readiness,
            json,
        } => {
            let (code, body) = get(admin, "/config_dump")?;
            if code != 200 {
                bail!("/config_dump answered {code}");
            }
            let dump: Value = serde_json::from_str(&body).context("config dump is not JSON")?;
            if json {
                println!("{}", serde_json::to_string_pretty(&dump)?);
            }
            let ready = get(readiness, "/healthz/ready")
                .map(|(c, _)| c == 200)
                .unwrap_or(false);
            print!("{}", render(&dump, ready, SystemTime::now()));
            Ok(ready)
        }
    }
}

fn render(dump: &Value, ready: bool, now: SystemTime) -> String {
    let mut out = String::new();
    let now = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    out += &format!(
        "ztunnel on {}: {}, mesh model version {}\n",
        dump["node"].as_str().unwrap_or("?"),
        if ready { "READY" } else { "NOT READY" },
        dump["model_version"]
    );
    let pods = dump["pods"].as_array().cloned().unwrap_or_default();
    out += &format!("pods ({}):\n", pods.len());
    for p in &pods {
        out += &format!(
            "  {:<40} {:<10} {}\n",
            p["pod"].as_str().unwrap_or("?"),
            if p["enrolled"] == true {
                "captured"
            } else {
                "direct"
            },
            p["ips"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(","))
                .unwrap_or_default()
        );
    }
    let certs = dump["certificates"].as_array().cloned().unwrap_or_default();
    out += &format!("workload certificates ({}):\n", certs.len());
    for c in &certs {
        let exp = c["expires_unix"].as_u64().unwrap_or(0);
        let left = exp.saturating_sub(now);
        let state = if exp <= now {
            "EXPIRED".to_owned()
        } else {
            format!("expires in {}h{:02}m", left / 3600, left % 3600 / 60)
        };
        out += &format!(
            "  {:<60} {}\n",
            c["identity"].as_str().unwrap_or("?"),
            state
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_pods_and_certificate_expiry() {
        let dump = serde_json::json!({
            "node": "node1", "model_version": 3,
            "pods": [{"pod": "shop/web", "enrolled": true, "ips": ["10.0.0.2"]}, {"pod": "legacy/job", "enrolled": false, "ips": []}],
            "certificates": [{"identity": "spiffe://cluster.local/ns/shop/sa/web", "expires_unix": 1000 + 7260}, {"identity": "spiffe://x/ns/a/sa/b", "expires_unix": 10}],
        });
        let text = render(&dump, true, UNIX_EPOCH + Duration::from_secs(1000));
        assert!(
            text.contains("node1: READY, mesh model version 3"),
            "{text}"
        );
        assert!(
            text.contains("shop/web") && text.contains("captured") && text.contains("10.0.0.2"),
            "{text}"
        );
        assert!(
            text.contains("legacy/job") && text.contains("direct"),
            "{text}"
        );
        assert!(text.contains("expires in 2h01m"), "{text}");
        assert!(text.contains("EXPIRED"), "{text}");
    }
}
