//! Thin wrappers over the kernel and iproute2 calls the cluster is built
//! from: entering namespaces and cgroups, running `ip`, killing cgroup trees.

use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Runs a command to completion and returns its stdout; a non-zero exit is an
/// error that carries the command line and its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip <args>`, in the root netns unless the args start with `-n <netns>`.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    run(Command::new("ip").args(args)).map(drop)
}

/// A command whose child joins `cgroup` (if any) and then the network
/// namespace pinned at `netns_path`, right before exec. Unlike
/// `ip netns exec`, this keeps the mount namespace, so `/sys/fs/bpf` and the
/// cgroup2 mount stay visible to the program.
pub(crate) fn command_in(
    program: impl AsRef<OsStr>,
    netns_path: &Path,
    cgroup: Option<&Path>,
) -> Command {
    let mut cmd = Command::new(program);
    let netns = cstring(netns_path.as_os_str());
    let procs = cgroup.map(|c| cstring(c.join("cgroup.procs").as_os_str()));
    // SAFETY: the closure only makes async-signal-safe syscalls (open, write,
    // setns, close) on buffers allocated before fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(procs) = &procs {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(io::Error::last_os_error());
                }
                // Writing "0" to cgroup.procs moves the writing process.
                let n = libc::write(fd, b"0".as_ptr().cast(), 1);
                let err = io::Error::last_os_error();
                libc::close(fd);
                if n != 1 {
                    return Err(err);
                }
            }
            let fd = libc::open(netns.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let rc = libc::setns(fd, libc::CLONE_NEWNET);
            let err = io::Error::last_os_error();
            libc::close(fd);
            if rc != 0 {
                return Err(err);
            }
            Ok(())
        });
    }
    cmd
}

fn cstring(s: &OsStr) -> CString {
    // Paths built by the harness never contain NUL; fall back to an
    // impossible path so the child fails with ENOENT rather than us panicking.
    CString::new(s.as_bytes()).unwrap_or_else(|_| CString::from(c"/nonexistent"))
}

/// Where the cgroup2 hierarchy is mounted, from /proc/self/mountinfo.
pub(crate) fn cgroup2_root() -> Result<PathBuf> {
    let info =
        fs::read_to_string("/proc/self/mountinfo").context("reading /proc/self/mountinfo")?;
    for line in info.lines() {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> ... - <fstype> <source> <super opts>"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        if right.split_whitespace().next() == Some("cgroup2") {
            if let Some(mount) = left.split_whitespace().nth(4) {
                return Ok(PathBuf::from(mount.replace("\\040", " ")));
            }
        }
    }
    bail!("no cgroup2 hierarchy is mounted: mount one with `mount -t cgroup2 none /sys/fs/cgroup` (or /sys/fs/cgroup/unified on hybrid hosts)")
}

/// Whether `path` is on a mounted bpffs.
pub(crate) fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs writes into the zeroed struct we own.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == 0xcafe4a11
    }
}

/// Takes an exclusive, non-blocking flock on `path`; `Ok(None)` if another
/// holder has it. The file is opened close-on-exec so children never inherit
/// the lock.
pub(crate) fn try_flock(path: &Path) -> Result<Option<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o644)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Some(file));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(None)
    } else {
        Err(anyhow!(err).context(format!("flock {}", path.display())))
    }
}

/// Names of all named network namespaces (files under /run/netns).
pub(crate) fn netns_names() -> Vec<String> {
    let Ok(dir) = fs::read_dir("/run/netns") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
        .collect()
}

/// SIGKILLs every process in the named netns, then deletes it.
pub(crate) fn delete_netns(name: &str) -> Result<()> {
    kill_netns_processes(name);
    if Path::new("/run/netns").join(name).exists() {
        ip(&["netns", "del", name])?;
    }
    Ok(())
}

pub(crate) fn kill_netns_processes(name: &str) {
    for _ in 0..3 {
        let Ok(out) = run(Command::new("ip")
            .args(["netns", "pids", name])
            .stderr(Stdio::null()))
        else {
            return;
        };
        let pids: Vec<i32> = out
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect();
        if pids.is_empty() {
            return;
        }
        for pid in pids {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Kills every process in the cgroup subtree at `path` (cgroup.kill, or
/// SIGKILL to each member on kernels before 5.14) and waits until it is
/// empty, then removes the subtree bottom-up.
pub(crate) fn destroy_cgroup_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    if fs::write(path.join("cgroup.kill"), "1").is_err() {
        kill_members_recursive(path);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while populated(path) && Instant::now() < deadline {
        kill_members_recursive(path);
        thread::sleep(Duration::from_millis(10));
    }
    remove_cgroup_dirs(path)
}

fn populated(path: &Path) -> bool {
    fs::read_to_string(path.join("cgroup.events"))
        .map(|e| e.lines().any(|l| l == "populated 1"))
        .unwrap_or(false)
}

fn kill_members_recursive(path: &Path) {
    if let Ok(procs) = fs::read_to_string(path.join("cgroup.procs")) {
        for pid in procs
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            // SAFETY: plain kill(2).
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    for sub in subdirs(path) {
        kill_members_recursive(&sub);
    }
}

fn subdirs(path: &Path) -> Vec<PathBuf> {
    fs::read_dir(path)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
                .map(|e| e.path())
                .collect()
        })
        .unwrap_or_default()
}

fn remove_cgroup_dirs(path: &Path) -> Result<()> {
    for sub in subdirs(path) {
        remove_cgroup_dirs(&sub)?;
    }
    // rmdir can briefly fail with EBUSY while killed tasks finish exiting.
    let mut last = None;
    for _ in 0..100 {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => last = Some(e),
        }
        thread::sleep(Duration::from_millis(10));
    }
    Err(
        anyhow!(last.unwrap_or_else(|| io::Error::other("rmdir failed")))
            .context(format!("removing cgroup {}", path.display())),
    )
}

/// SIGKILL to a process group and its leader.
pub(crate) fn kill_group(pid: u32) {
    let pid = pid as i32;
    // SAFETY: plain kill(2).
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
    }
}
