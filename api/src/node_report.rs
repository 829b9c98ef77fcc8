//! What a ztunnel reports about its node on `/debug/node` (metrics port,
//! 15020), and what `weftctl check` concludes from it: the kernel, cgroup
//! v2, bpffs and the capture hooks Weft loads, the node's clock, and the
//! workload certificates the ztunnel holds. The same facts are gathered on
//! a machine without a ztunnel by `weftctl check --local`.

use serde::{Deserialize, Serialize};

/// Oldest kernel with everything capture uses: `bpf_link` on cgroups (5.7),
/// cgroup `getpeername` hooks (5.8), `sk_lookup` (5.9), `SO_NETNS_COOKIE`
/// (5.14).
pub const MIN_KERNEL: (u32, u32) = (5, 14);

/// The cgroup-root links a running ztunnel pins under `<pin dir>/links/`,
/// with their attach type.
pub const CAPTURE_HOOKS: &[(&str, &str)] = &[
    ("connect4", "cgroup/connect4"),
    ("connect6", "cgroup/connect6"),
    ("sockops", "sockops"),
    ("getpeername4", "cgroup/getpeername4"),
    ("getpeername6", "cgroup/getpeername6"),
];

/// Facts of one machine.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeFacts {
    /// `uname -r`.
    pub kernel: String,
    /// Where cgroup v2 is mounted, if anywhere.
    pub cgroup2: Option<String>,
    /// Every bpffs mount point.
    pub bpffs: Vec<String>,
    /// The ztunnel's pin directory and whether it is on a bpffs.
    pub pin_dir: String,
    pub pin_dir_on_bpffs: bool,
    /// Kernel BTF (`/sys/kernel/btf/vmlinux`) is present.
    pub btf: bool,
    /// The capture hooks and whether each is pinned (attached).
    pub hooks: Vec<HookState>,
    /// Per-pod `sk_lookup` links pinned.
    pub sk_lookup_links: usize,
    /// Wall clock when the facts were gathered, ms since the Unix epoch.
    pub unix_time_ms: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookState {
    pub name: String,
    pub attach: String,
    pub pinned: bool,
}

/// `/debug/node` of a ztunnel.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    pub node: String,
    /// The ztunnel's version (`CARGO_PKG_VERSION`).
    pub version: String,
    pub ready: bool,
    /// Mesh model version in force (the controller's config version).
    pub model_version: u64,
    pub pods_enrolled: usize,
    pub facts: NodeFacts,
    pub certificates: Vec<CertificateState>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertificateState {
    pub identity: String,
    pub valid_from_unix: u64,
    pub expires_unix: u64,
    pub last_error: Option<String>,
}

/// Whether a kernel release (`6.1.0-18-amd64`) is at least `min`.
pub fn kernel_at_least(release: &str, min: (u32, u32)) -> Option<bool> {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .filter(|p| !p.is_empty());
    let major: u32 = parts.next()?.parse().ok()?;
    let minor: u32 = parts.next()?.parse().ok()?;
    Some((major, minor) >= min)
}

/// How close a certificate is to expiry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertHealth {
    Fine,
    /// Less than a quarter of its lifetime left: renewal (due at half) has
    /// been failing for a while.
    ExpiresSoon,
    Expired,
}

pub fn cert_health(valid_from_unix: u64, expires_unix: u64, now_unix: u64) -> CertHealth {
    if expires_unix <= now_unix {
        return CertHealth::Expired;
    }
    let lifetime = expires_unix.saturating_sub(valid_from_unix).max(1);
    let left = expires_unix - now_unix;
    if left * 4 < lifetime {
        CertHealth::ExpiresSoon
    } else {
        CertHealth::Fine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_versions() {
        assert_eq!(kernel_at_least("6.1.0-18-amd64", MIN_KERNEL), Some(true));
        assert_eq!(kernel_at_least("5.14.0", MIN_KERNEL), Some(true));
        assert_eq!(kernel_at_least("5.10.209", MIN_KERNEL), Some(false));
        assert_eq!(kernel_at_least("4.19", MIN_KERNEL), Some(false));
        assert_eq!(kernel_at_least("garbage", MIN_KERNEL), None);
    }

    #[test]
    fn certificate_health_by_lifetime_left() {
        assert_eq!(cert_health(0, 100, 40), CertHealth::Fine);
        assert_eq!(cert_health(0, 100, 80), CertHealth::ExpiresSoon);
        assert_eq!(cert_health(0, 100, 100), CertHealth::Expired);
    }
}
