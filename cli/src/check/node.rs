//! Checks of one node's facts (from its ztunnel's `/debug/node`, or of this
//! machine with `--local`): kernel, cgroup v2, bpffs, the capture hooks,
//! and the workload certificates the ztunnel holds.

use weft_api::node_report::{
    cert_health, kernel_at_least, CertHealth, NodeFacts, NodeReport, MIN_KERNEL,
};

use super::{Check, Group};

/// `hooks`: whether the capture hooks must be attached (a ztunnel runs).
pub fn facts(who: &str, f: &NodeFacts, hooks: bool, g: &mut Group) {
    let (maj, min) = MIN_KERNEL;
    g.push(match kernel_at_least(&f.kernel, MIN_KERNEL) {
        Some(true) => Check::ok(format!("{who}: kernel {} (at least {maj}.{min})", f.kernel)),
        Some(false) => Check::error(
            format!("{who}: kernel"),
            format!("{} is older than {maj}.{min}", f.kernel),
            "capture needs cgroup bpf_link, getpeername hooks, sk_lookup and SO_NETNS_COOKIE: run nodes on a kernel of 5.14 or later",
        ),
        None => Check::warn(
            format!("{who}: kernel"),
            format!("cannot read the version of {:?}", f.kernel),
            "check `uname -r` on the node: Weft needs 5.14 or later",
        ),
    });
    g.push(match &f.cgroup2 {
        Some(at) => Check::ok(format!("{who}: cgroup v2 mounted at {at}")),
        None => Check::error(
            format!("{who}: cgroup v2"),
            "no cgroup v2 hierarchy is mounted",
            "the capture programs attach to the cgroup v2 root: boot with systemd.unified_cgroup_hierarchy=1, or `mount -t cgroup2 none /sys/fs/cgroup/unified`",
        ),
    });
    g.push(if f.pin_dir_on_bpffs {
        Check::ok(format!("{who}: bpffs mounted ({})", f.pin_dir))
    } else {
        Check::error(
            format!("{who}: bpffs"),
            format!("{} is not on a bpffs (bpffs mounts: {})", f.pin_dir, if f.bpffs.is_empty() { "none".to_owned() } else { f.bpffs.join(", ") }),
            "mount it with `mount -t bpf bpf /sys/fs/bpf` (persist with `bpffs /sys/fs/bpf bpf defaults 0 0` in /etc/fstab): capture's programs, maps and links are pinned there so they outlive a ztunnel restart",
        )
    });
    if hooks {
        let missing: Vec<&str> = f
            .hooks
            .iter()
            .filter(|h| !h.pinned)
            .map(|h| h.attach.as_str())
            .collect();
        g.push(if missing.is_empty() {
            Check::ok(format!(
                "{who}: capture hooks attached ({}), {} pod sk_lookup link(s)",
                f.hooks.iter().map(|h| h.attach.as_str()).collect::<Vec<_>>().join(", "),
                f.sk_lookup_links
            ))
        } else {
            Check::error(
                format!("{who}: capture hooks"),
                format!("not attached: {}", missing.join(", ")),
                "restart the node's ztunnel (it attaches and pins them at start); if it fails again, its log names the kernel's refusal",
            )
        });
    }
}

/// The workload certificates a ztunnel holds.
pub fn certificates(who: &str, r: &NodeReport, now_unix: u64, g: &mut Group) {
    let mut fine = 0;
    for c in &r.certificates {
        let left = c.expires_unix.saturating_sub(now_unix);
        let why = c
            .last_error
            .as_deref()
            .map(|e| format!("; last renewal failed: {e}"))
            .unwrap_or_default();
        match cert_health(c.valid_from_unix, c.expires_unix, now_unix) {
            CertHealth::Fine => fine += 1,
            CertHealth::ExpiresSoon => g.push(Check::warn(
                format!("{who}: certificate of {}", c.identity),
                format!("expires in {}{why}", human(left)),
                "renewal is due at half its lifetime and has not happened: check that the ztunnel reaches the controller (`weftctl proxy-status`) and the controller's CA log",
            )),
            CertHealth::Expired => g.push(Check::error(
                format!("{who}: certificate of {}", c.identity),
                format!("expired{why}"),
                "the ztunnel cannot renew it: check that it reaches the controller (`weftctl proxy-status`) and the controller's CA log",
            )),
        }
    }
    if fine > 0 {
        g.push(Check::ok(format!(
            "{who}: {fine} workload certificate(s) valid"
        )));
    }
}

/// `3h05m`, `12m`, `40s`.
pub fn human(secs: u64) -> String {
    match secs {
        s if s >= 86400 => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        s if s >= 60 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::node_report::{CertificateState, HookState};

    #[test]
    fn missing_bpffs_hooks_and_expiring_certificates_are_named() {
        let f = NodeFacts {
            kernel: "6.1.0".into(),
            cgroup2: Some("/sys/fs/cgroup".into()),
            pin_dir: "/sys/fs/bpf/weft".into(),
            pin_dir_on_bpffs: false,
            hooks: vec![HookState {
                name: "connect4".into(),
                attach: "cgroup/connect4".into(),
                pinned: false,
            }],
            ..Default::default()
        };
        let mut g = Group::new("node");
        facts("node1", &f, true, &mut g);
        let r = NodeReport {
            certificates: vec![CertificateState {
                identity: "spiffe://td/ns/a/sa/b".into(),
                valid_from_unix: 0,
                expires_unix: 1000,
                last_error: None,
            }],
            ..Default::default()
        };
        certificates("node1", &r, 900, &mut g);
        let text: Vec<String> = g
            .checks
            .iter()
            .map(|c| format!("{:?} {} {:?}", c.status, c.name, c.detail))
            .collect();
        assert!(
            text.iter().any(|t| t.starts_with("Error node1: bpffs")),
            "{text:?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("not attached: cgroup/connect4")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t
                .starts_with("Warning node1: certificate of spiffe://td/ns/a/sa/b")
                && t.contains("expires in 1m")),
            "{text:?}"
        );
        assert!(
            text.iter().any(|t| t.starts_with("Ok node1: kernel 6.1.0")),
            "{text:?}"
        );
    }
}
