//! In-pod routing that lets ztunnel keep the client's IP on the inbound leg:
//! with `tcp_fwmark_accept` the app's accepted socket carries the mark of
//! ztunnel's transparent socket, and a `fwmark` rule sends its replies to a
//! table that delivers everything locally, back to ztunnel's socket.

use std::io;
use std::process::{Command, Stdio};

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

/// Sets `tcp_fwmark_accept`, the `fwmark MARK_INBOUND` rule and the local
/// route table inside the pod netns (IPv6 too when the pod has IPv6).
/// Idempotent.
pub fn install(netns: &Netns) -> io::Result<()> {
    netns.run(|| -> io::Result<()> {
        std::fs::write(fwmark_accept_path(), "1")?;
        for family in families() {
            let mark = format!("{MARK_INBOUND:#x}");
            let table = INBOUND_ROUTE_TABLE.to_string();
            let shown = ip_output(&[family, "rule", "show", "fwmark", &mark, "lookup", &table])?;
            if shown.trim().is_empty() {
                ip(&[family, "rule", "add", "fwmark", &mark, "lookup", &table])?;
            }
            let any = if family == "-4" { "0.0.0.0/0" } else { "::/0" };
            ip(&[
                family, "route", "replace", "local", any, "dev", "lo", "table", &table,
            ])?;
        }
        Ok(())
    })?
}

/// Undoes [`install`]. Idempotent.
pub fn remove(netns: &Netns) -> io::Result<()> {
    netns.run(|| -> io::Result<()> {
        let mark = format!("{MARK_INBOUND:#x}");
        let table = INBOUND_ROUTE_TABLE.to_string();
        for family in families() {
            // `ip rule del` removes one matching rule per call.
            for _ in 0..16 {
                let shown =
                    ip_output(&[family, "rule", "show", "fwmark", &mark, "lookup", &table])?;
                if shown.trim().is_empty() {
                    break;
                }
                ip(&[family, "rule", "del", "fwmark", &mark, "lookup", &table])?;
            }
            let routes = ip_output(&[family, "route", "show", "table", &table])?;
            if !routes.trim().is_empty() {
                ip(&[family, "route", "flush", "table", &table])?;
            }
        }
        std::fs::write(fwmark_accept_path(), "0")?;
        Ok(())
    })?
}

/// Whether `tcp_fwmark_accept` is on in this netns (for checks and tests).
pub fn fwmark_accept_enabled(netns: &Netns) -> io::Result<bool> {
    netns.run(|| std::fs::read_to_string(fwmark_accept_path()).map(|s| s.trim() == "1"))?
}

/// `-4`, plus `-6` when the netns has IPv6 enabled.
fn families() -> Vec<&'static str> {
    let has_v6 = std::fs::read_to_string(IF_INET6).is_ok_and(|s| !s.trim().is_empty());
    if has_v6 {
        vec!["-4", "-6"]
    } else {
        vec!["-4"]
    }
}

/// Runs `ip`; the child starts in the calling thread's netns.
fn ip(args: &[&str]) -> io::Result<()> {
    ip_output(args).map(drop)
}

fn ip_output(args: &[&str]) -> io::Result<String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("running 'ip' (iproute2): {e}")))?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
