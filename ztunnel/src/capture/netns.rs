//! Network namespaces as ztunnel uses them: an open handle with its kernel
//! cookie (the key of the eBPF maps), running a closure inside one from the
//! current thread, and finding the cgroup v2 root and the bpffs.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};

/// `SO_NETNS_COOKIE` (Linux 5.14+), not yet in every libc.
const SO_NETNS_COOKIE: libc::c_int = 71;
/// `statfs.f_type` of a bpffs mount.
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;
const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// An open network namespace and its cookie.
#[derive(Debug)]
pub struct Netns {
    file: File,
    cookie: u64,
    path: PathBuf,
}

impl Netns {
    /// Opens the netns at `path` (e.g. `/proc/<pid>/ns/net` or
    /// `/var/run/netns/<name>`) and reads its cookie from a socket made inside it.
    pub fn open(path: &Path) -> io::Result<Netns> {
        let file = File::open(path)?;
        let mut ns = Netns {
            file,
            cookie: 0,
            path: path.to_owned(),
        };
        ns.cookie = ns.run(socket_netns_cookie)??;
        Ok(ns)
    }

    /// The netns of the calling thread.
    pub fn current() -> io::Result<Netns> {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        let path = PathBuf::from(format!("/proc/{}/task/{tid}/ns/net", std::process::id()));
        let file = File::open("/proc/thread-self/ns/net")?;
        Ok(Netns {
            file,
            cookie: socket_netns_cookie()?,
            path,
        })
    }

    /// The kernel's netns cookie (what `bpf_get_netns_cookie` returns).
    pub fn cookie(&self) -> u64 {
        self.cookie
    }

    /// The path this netns was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `setns()` the current thread into this netns, run `f`, `setns` back.
    /// Safe to call from a tokio worker because `f` is synchronous: sockets
    /// created by `f` stay in this netns, and processes spawned by `f` start in
    /// it. The thread is restored even if `f` panics; if restoring is
    /// impossible the process aborts rather than run on in the wrong netns.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> io::Result<T> {
        let home = File::open("/proc/thread-self/ns/net")?;
        setns(self.file.as_fd())?;
        let _back = Restore(home);
        Ok(f())
    }
}

impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

struct Restore(File);

impl Drop for Restore {
    fn drop(&mut self) {
        if let Err(e) = setns(self.0.as_fd()) {
            eprintln!("weft: cannot return thread to its network namespace: {e}; aborting");
            std::process::abort();
        }
    }
}

fn setns(fd: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: fd is a valid open netns file for the duration of the call.
    if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Cookie of the calling thread's netns, from a throwaway socket.
fn socket_netns_cookie() -> io::Result<u64> {
    // SAFETY: plain socket(2); the result is checked and owned below.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: raw is a fresh fd we own.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    netns_cookie_of(sock.as_fd())
}

/// Netns cookie of the namespace a socket lives in.
pub fn netns_cookie_of(sock: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: cookie/len point to valid memory of the advertised size.
    let r = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Mount point of the cgroup v2 hierarchy (`/sys/fs/cgroup` or, on hybrid
/// layouts, `/sys/fs/cgroup/unified`), from `/proc/self/mountinfo`.
pub fn cgroup2_root() -> io::Result<PathBuf> {
    // In a container with its own cgroup namespace the mount table shows
    // only the container's subtree; the DaemonSet mounts the host's
    // hierarchy and names it here.
    if let Some(root) = std::env::var_os("WEFT_CGROUP_ROOT") {
        return Ok(PathBuf::from(root));
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    let mut found: Option<PathBuf> = None;
    for line in info.lines() {
        // <id> <parent> <maj:min> <root> <mount point> <opts> [optional...] - <fstype> <source> <superopts>
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() != Some("cgroup2") {
            continue;
        }
        let fields: Vec<&str> = left.split_whitespace().collect();
        let (Some(root), Some(mount_point)) = (fields.get(3), fields.get(4)) else {
            continue;
        };
        if *root != "/" {
            continue;
        }
        let mount_point = PathBuf::from(unescape_mountinfo(mount_point));
        // Prefer the conventional locations if several are mounted.
        let conventional = mount_point == Path::new("/sys/fs/cgroup")
            || mount_point == Path::new("/sys/fs/cgroup/unified");
        if found.is_none() || conventional {
            found = Some(mount_point);
        }
    }
    found.ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no cgroup v2 mount in /proc/self/mountinfo: mount one with 'mount -t cgroup2 none /sys/fs/cgroup/unified'",
        )
    })
}

/// mountinfo escapes space, tab, newline and backslash as octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Makes sure `path` is a directory on a bpffs, mounting the bpffs at
/// `/sys/fs/bpf` (or, for a path elsewhere, at `path` itself) if needed.
pub fn ensure_bpffs(path: &Path) -> io::Result<()> {
    let default = Path::new(DEFAULT_BPFFS);
    let mount_at = if path.starts_with(default) {
        default
    } else {
        path
    };
    if !is_bpffs(mount_at)? {
        std::fs::create_dir_all(mount_at)?;
        mount_bpffs(mount_at)?;
    }
    std::fs::create_dir_all(path)?;
    if !is_bpffs(path)? {
        return Err(io::Error::other(format!(
            "{} is not on a bpf filesystem: mount one with 'mount -t bpf bpf {}'",
            path.display(),
            mount_at.display()
        )));
    }
    Ok(())
}

/// Whether `path` (or, if it does not exist yet, its nearest existing
/// ancestor) is on a bpffs.
fn is_bpffs(path: &Path) -> io::Result<bool> {
    let mut p = path;
    while !p.exists() {
        match p.parent() {
            Some(parent) => p = parent,
            None => return Ok(false),
        }
    }
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: zeroed statfs is a valid out-parameter.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is NUL-terminated and st is valid for writes.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)]
    Ok(st.f_type as i64 == BPF_FS_MAGIC)
}

fn mount_bpffs(at: &Path) -> io::Result<()> {
    let target = std::ffi::CString::new(at.as_os_str().as_encoded_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: all pointers are valid NUL-terminated strings or null.
    let r = unsafe {
        libc::mount(
            c"bpf".as_ptr(),
            target.as_ptr(),
            c"bpf".as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if r != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!(
                "mounting bpffs at {}: {e} (needs root / CAP_SYS_ADMIN; or run 'mount -t bpf bpf {}')",
                at.display(),
                at.display()
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_unescapes_octal() {
        assert_eq!(unescape_mountinfo(r"/a\040b"), "/a b");
        assert_eq!(unescape_mountinfo("/sys/fs/cgroup"), "/sys/fs/cgroup");
    }
}
