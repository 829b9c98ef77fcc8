//! Gathers the facts of this machine that capture depends on (kernel,
//! cgroup v2, bpffs, BTF, the pinned capture hooks, the clock) for the
//! ztunnel's `/debug/node` report and `weftctl check --local`.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use weft_api::node_report::{HookState, NodeFacts, CAPTURE_HOOKS};

/// bpffs's `statfs` magic.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// The facts of this machine for a ztunnel pinning under `pin_dir`.
pub fn gather(pin_dir: &Path) -> NodeFacts {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let of_type = |ty: &str| -> Vec<String> {
        mounts
            .lines()
            .filter_map(|l| {
                let (left, right) = l.split_once(" - ")?;
                (right.split_whitespace().next()? == ty)
                    .then(|| left.split_whitespace().nth(4).map(str::to_owned))
                    .flatten()
            })
            .collect()
    };
    let links = pin_dir.join("links");
    let sk_lookup_links = std::fs::read_dir(&links)
        .map(|d| {
            d.filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().starts_with("sk_lookup-"))
                .count()
        })
        .unwrap_or(0);
    NodeFacts {
        kernel: kernel_release(),
        cgroup2: std::env::var("WEFT_CGROUP_ROOT")
            .ok()
            .or_else(|| of_type("cgroup2").into_iter().next()),
        bpffs: of_type("bpf"),
        pin_dir: pin_dir.display().to_string(),
        pin_dir_on_bpffs: is_bpffs(pin_dir),
        btf: Path::new("/sys/kernel/btf/vmlinux").exists(),
        hooks: CAPTURE_HOOKS
            .iter()
            .map(|(name, attach)| HookState {
                name: (*name).to_owned(),
                attach: (*attach).to_owned(),
                pinned: links.join(name).exists(),
            })
            .collect(),
        sk_lookup_links,
        unix_time_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
    }
}

/// `uname -r`.
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Whether `path` (or, when it does not exist yet, its nearest existing
/// parent) is on a bpffs.
pub fn is_bpffs(path: &Path) -> bool {
    let Some(existing) = path.ancestors().find(|p| p.exists()) else {
        return false;
    };
    let Ok(c) = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we pass; `c` is a valid
    // NUL-terminated path.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn facts_of_this_machine() {
        let dir = std::env::temp_dir();
        let f = gather(&dir.join("weft-no-such-pin-dir"));
        assert!(!f.kernel.is_empty());
        // A temporary directory is not a bpffs.
        assert!(!f.pin_dir_on_bpffs);
        assert!(f.hooks.iter().all(|h| !h.pinned));
        assert!(f.unix_time_ms > 0);
    }
}
