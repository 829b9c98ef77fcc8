//! Loads Weft's eBPF object, attaches its programs, and keeps the maps that
//! steer enrolled pods' traffic to ztunnel's in-pod listeners.
//!
//! Everything is pinned under one directory on the bpffs (`pin_dir`), so
//! capture outlives a ztunnel restart: enrolled pods stay captured and fail
//! closed while ztunnel is down, and the next ztunnel picks the state up.
//!
//! ```text
//! <pin_dir>/ENROLLED  POD_STEER  LISTENERS  SOCK_ORIG  ORIG_DST   maps (see weft_ebpf_common::maps)
//! <pin_dir>/links/connect4  connect6  sockops  getpeername4  getpeername6   cgroup2-root links
//! <pin_dir>/links/sk_lookup-<netns cookie>                                  one per enrolled pod
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use aya::maps::{HashMap, MapData, MapError, SockMap};
use aya::programs::{CgroupSockAddr, ProgramError, SkLookup, SockOps};
use aya::{Ebpf, EbpfError, EbpfLoader};
use weft_ebpf_common::{
    maps, IpKey, OrigKey, PodSteer, SockAddr, LISTENER_SLOTS, MAX_PROBE_PORTS, MAX_PROBE_SOURCES,
};

use super::netns::{cgroup2_root, ensure_bpffs, Netns};

/// The eBPF object built by `build.rs` from `ebpf/programs`.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/weft-ebpf"));

const LINKS_DIR: &str = "links";

/// Program names in the object.
const PROG_CONNECT4: &str = "weft_connect4";
const PROG_CONNECT6: &str = "weft_connect6";
const PROG_SOCKOPS: &str = "weft_sockops";
const PROG_GETPEERNAME4: &str = "weft_getpeername4";
const PROG_GETPEERNAME6: &str = "weft_getpeername6";
const PROG_SK_LOOKUP: &str = "weft_sk_lookup";

/// Errors of capture set-up; each says what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error(
        "in-kernel capture needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN): run ztunnel as root"
    )]
    NotRoot,
    #[error("bpffs at {path}: {source} (mount it with 'mount -t bpf bpf /sys/fs/bpf')")]
    Bpffs { path: PathBuf, source: io::Error },
    #[error("cgroup v2: {0} (Weft attaches at the cgroup v2 root; mount cgroup2, e.g. 'mount -t cgroup2 none /sys/fs/cgroup/unified')")]
    Cgroup2(io::Error),
    #[error("loading the eBPF object with maps pinned under {pin_dir}: {source} (if an incompatible older Weft left pins there, remove them with Capture::remove_all / 'rm -r {pin_dir}')")]
    Load {
        pin_dir: PathBuf,
        source: Box<EbpfError>,
    },
    #[error("eBPF program {name}: {source}")]
    Program {
        name: &'static str,
        source: Box<ProgramError>,
    },
    #[error("the eBPF object has no {0}: ztunnel was built from mismatched sources, rebuild it")]
    Missing(&'static str),
    #[error("eBPF map {name}: {source}")]
    Map {
        name: &'static str,
        source: Box<MapError>,
    },
    #[error("attaching {what}: {source}")]
    Attach { what: String, source: io::Error },
    #[error("{path}: {source}")]
    Pin { path: PathBuf, source: io::Error },
    #[error("all {LISTENER_SLOTS} listener slots are in use: too many enrolled pods on this node")]
    SlotsExhausted,
    #[error("cannot enroll pod: {0}")]
    InvalidPod(String),
}

/// What [`Capture::enroll`] needs to steer one pod.
pub struct PodCapture<'a> {
    pub netns: &'a Netns,
    /// The pod's IPs (inbound traffic to them is steered).
    pub ips: Vec<IpAddr>,
    /// Sources that reach the app directly: the node's IPs (kubelet probes). At most 4.
    pub probe_sources: Vec<IpAddr>,
    /// The only ports `probe_sources` reach directly: the pod's probe ports
    /// (from the model). At most 8; none until the model names the pod.
    pub probe_ports: &'a [u16],
    /// ztunnel's inbound plaintext (15006) listener inside the pod. For a pod
    /// with IPv6 it must be an IPv6 dual-stack socket (`[::]`, not v6-only):
    /// the kernel hands IPv4 connections to IPv6 sockets, not the reverse.
    pub inbound: BorrowedFd<'a>,
    /// ztunnel's HBONE (15008) listener inside the pod; same family rule.
    pub hbone: BorrowedFd<'a>,
}

/// Loaded and attached capture programs plus their maps. `Send + Sync`:
/// [`Capture::original_dst`] is lock-free; enrollment takes a mutex.
pub struct Capture {
    pin_dir: PathBuf,
    /// Duplicate of the `ORIG_DST` map fd for lock-free lookups.
    orig_dst: OwnedFd,
    attach: Mutex<Attach>,
}

struct Attach {
    ebpf: Ebpf,
    enrolled: HashMap<MapData, u64, u32>,
    pod_steer: HashMap<MapData, IpKey, PodSteer>,
    listeners: SockMap<MapData>,
    /// Netns cookie -> first of its two `LISTENERS` slots.
    slots: BTreeMap<u64, u32>,
}

impl Capture {
    /// Loads the object, reusing maps pinned under `pin_dir` (ENROLLED etc.
    /// survive a ztunnel restart so enrolled pods stay captured and fail closed
    /// while ztunnel is down), attaches the cgroup programs at the cgroup2 root
    /// as multi-attach links (several ztunnels, one per simulated node, share
    /// one kernel), pins the links under `pin_dir/links`, replacing links a
    /// previous run pinned (the new link is attached before the old goes).
    pub fn install(pin_dir: &Path) -> Result<Capture, CaptureError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(CaptureError::NotRoot);
        }
        ensure_bpffs(pin_dir).map_err(|source| CaptureError::Bpffs {
            path: pin_dir.to_owned(),
            source,
        })?;
        let links_dir = pin_dir.join(LINKS_DIR);
        std::fs::create_dir_all(&links_dir).map_err(|source| CaptureError::Pin {
            path: links_dir.clone(),
            source,
        })?;
        let cgroup_path = cgroup2_root().map_err(CaptureError::Cgroup2)?;
        let cgroup = File::open(&cgroup_path).map_err(CaptureError::Cgroup2)?;

        let mut ebpf = EbpfLoader::new()
            .map_pin_path(pin_dir)
            .load(OBJECT)
            .map_err(|source| CaptureError::Load {
                pin_dir: pin_dir.to_owned(),
                source: Box::new(source),
            })?;

        let cgroup_progs: [(&'static str, u32, &str); 5] = [
            (PROG_CONNECT4, sys::BPF_CGROUP_INET4_CONNECT, "connect4"),
            (PROG_CONNECT6, sys::BPF_CGROUP_INET6_CONNECT, "connect6"),
            (PROG_SOCKOPS, sys::BPF_CGROUP_SOCK_OPS, "sockops"),
            (
                PROG_GETPEERNAME4,
                sys::BPF_CGROUP_INET4_GETPEERNAME,
                "getpeername4",
            ),
            (
                PROG_GETPEERNAME6,
                sys::BPF_CGROUP_INET6_GETPEERNAME,
                "getpeername6",
            ),
        ];
        for (name, attach_type, link_name) in cgroup_progs {
            let fd = load_program(&mut ebpf, name)?;
            let link =
                sys::link_create(fd.as_fd(), cgroup.as_fd(), attach_type).map_err(|source| {
                    CaptureError::Attach {
                        what: format!("{name} to cgroup {}", cgroup_path.display()),
                        source,
                    }
                })?;
            pin_replacing(link.as_fd(), &links_dir.join(link_name))?;
        }
        load_program(&mut ebpf, PROG_SK_LOOKUP)?;

        let enrolled: HashMap<MapData, u64, u32> = take_map(&mut ebpf, maps::ENROLLED)?;
        let pod_steer: HashMap<MapData, IpKey, PodSteer> = take_map(&mut ebpf, maps::POD_STEER)?;
        let listeners: SockMap<MapData> = take_map(&mut ebpf, maps::LISTENERS)?;
        let orig_dst_map = ebpf
            .take_map(maps::ORIG_DST)
            .ok_or(CaptureError::Missing(maps::ORIG_DST))?;
        let orig_dst = match &orig_dst_map {
            aya::maps::Map::LruHashMap(data) => data.fd().as_fd().try_clone_to_owned(),
            _ => return Err(CaptureError::Missing(maps::ORIG_DST)),
        }
        .map_err(|source| CaptureError::Pin {
            path: pin_dir.join(maps::ORIG_DST),
            source,
        })?;

        // Slots of pods a previous run enrolled stay reserved until they are
        // enrolled again or unenrolled.
        let mut slots = BTreeMap::new();
        for entry in pod_steer.iter() {
            let (_, steer) = entry.map_err(map_error(maps::POD_STEER))?;
            slots.insert(steer.netns_cookie, steer.inbound_slot);
        }

        Ok(Capture {
            pin_dir: pin_dir.to_owned(),
            orig_dst,
            attach: Mutex::new(Attach {
                ebpf,
                enrolled,
                pod_steer,
                listeners,
                slots,
            }),
        })
    }

    /// Steers a pod: `sk_lookup` attached to its netns (link pinned under
    /// `pin_dir/links/sk_lookup-<cookie>`, replacing an old one), its two
    /// listener sockets put in `LISTENERS` slots, pod IPs -> steering entry,
    /// netns cookie -> `ENROLLED` (outbound capture on). Idempotent.
    pub fn enroll(&self, pod: &PodCapture) -> Result<(), CaptureError> {
        if pod.ips.is_empty() {
            return Err(CaptureError::InvalidPod("no pod IPs".into()));
        }
        if pod.probe_sources.len() > MAX_PROBE_SOURCES {
            return Err(CaptureError::InvalidPod(format!(
                "{} probe sources, at most {MAX_PROBE_SOURCES}",
                pod.probe_sources.len()
            )));
        }
        let cookie = pod.netns.cookie();
        let mut a = self.lock();
        let base = match a.slots.get(&cookie) {
            Some(base) => *base,
            None => {
                let base = (0..LISTENER_SLOTS)
                    .step_by(2)
                    .find(|s| !a.slots.values().any(|used| used == s))
                    .ok_or(CaptureError::SlotsExhausted)?;
                a.slots.insert(cookie, base);
                base
            }
        };
        a.listeners
            .set(base, &pod.inbound, 0)
            .map_err(map_error(maps::LISTENERS))?;
        a.listeners
            .set(base + 1, &pod.hbone, 0)
            .map_err(map_error(maps::LISTENERS))?;

        let mut steer = PodSteer {
            netns_cookie: cookie,
            inbound_slot: base,
            hbone_slot: base + 1,
            probe_count: pod.probe_sources.len() as u32,
            ..PodSteer::default()
        };
        for (slot, ip) in steer.probe_sources.iter_mut().zip(&pod.probe_sources) {
            *slot = IpKey::from(*ip);
        }
        set_probe_ports(&mut steer, pod.probe_ports)?;
        let wanted: Vec<IpKey> = pod.ips.iter().map(|ip| IpKey::from(*ip)).collect();
        // IPs this pod no longer has.
        for stale in a.steer_keys_of(cookie)? {
            if !wanted.contains(&stale) {
                ignore_missing(a.pod_steer.remove(&stale)).map_err(map_error(maps::POD_STEER))?;
            }
        }
        for key in &wanted {
            a.pod_steer
                .insert(key, steer, 0)
                .map_err(map_error(maps::POD_STEER))?;
        }

        let prog: &SkLookup = program(&a.ebpf, PROG_SK_LOOKUP)?;
        let prog_fd = prog.fd().map_err(program_error(PROG_SK_LOOKUP))?;
        let link = sys::link_create(prog_fd.as_fd(), pod.netns.as_fd(), sys::BPF_SK_LOOKUP)
            .map_err(|source| CaptureError::Attach {
                what: format!("sk_lookup to netns {}", pod.netns.path().display()),
                source,
            })?;
        pin_replacing(link.as_fd(), &self.sk_lookup_pin(cookie))?;

        a.enrolled
            .insert(cookie, 1, 0)
            .map_err(map_error(maps::ENROLLED))?;
        Ok(())
    }

    /// Changes which ports of an enrolled pod the node's addresses reach
    /// directly (the pod's probe ports, once the model names the pod or its
    /// probes change). Connections already open keep their path.
    pub fn set_probe_ports(&self, netns_cookie: u64, ports: &[u16]) -> Result<(), CaptureError> {
        let mut a = self.lock();
        for key in a.steer_keys_of(netns_cookie)? {
            let mut steer = a
                .pod_steer
                .get(&key, 0)
                .map_err(map_error(maps::POD_STEER))?;
            set_probe_ports(&mut steer, ports)?;
            a.pod_steer
                .insert(key, steer, 0)
                .map_err(map_error(maps::POD_STEER))?;
        }
        Ok(())
    }

    /// Reverses [`Capture::enroll`]: traffic of the pod goes direct again.
    /// Idempotent.
    pub fn unenroll(&self, netns_cookie: u64, pod_ips: &[IpAddr]) -> Result<(), CaptureError> {
        let mut a = self.lock();
        ignore_missing(a.enrolled.remove(&netns_cookie)).map_err(map_error(maps::ENROLLED))?;
        let mut keys: Vec<IpKey> = pod_ips.iter().map(|ip| IpKey::from(*ip)).collect();
        keys.extend(a.steer_keys_of(netns_cookie)?);
        for key in keys {
            ignore_missing(a.pod_steer.remove(&key)).map_err(map_error(maps::POD_STEER))?;
        }
        let pin = self.sk_lookup_pin(netns_cookie);
        match std::fs::remove_file(&pin) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(CaptureError::Pin { path: pin, source }),
        }
        if let Some(base) = a.slots.remove(&netns_cookie) {
            for slot in [base, base + 1] {
                ignore_missing(a.listeners.clear_index(&slot))
                    .map_err(map_error(maps::LISTENERS))?;
            }
        }
        Ok(())
    }

    /// Original destination of an outbound connection accepted on the pod's
    /// 127.0.0.1:15001 (or [::1]:15001) listener; `client` is the accepted
    /// socket's peer address. Removes the entry. Lock-free.
    pub fn original_dst(&self, netns_cookie: u64, client: SocketAddr) -> Option<SocketAddr> {
        let key = OrigKey {
            netns_cookie,
            client: SockAddr::from(client),
        };
        sys::lookup_and_delete::<OrigKey, SockAddr>(self.orig_dst.as_fd(), &key)
            .ok()
            .map(SocketAddr::from)
    }

    /// Netns cookies enrolled in the pinned maps (to reconcile after a restart).
    pub fn enrolled_cookies(&self) -> Vec<u64> {
        self.lock().enrolled.keys().filter_map(Result::ok).collect()
    }

    /// The directory everything is pinned under.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// Detaches and unpins everything under `pin_dir` (uninstall / test
    /// teardown). Links are unpinned first, which detaches them unless a
    /// running ztunnel still holds them open.
    pub fn remove_all(pin_dir: &Path) -> Result<(), CaptureError> {
        for dir in [pin_dir.join(LINKS_DIR), pin_dir.to_owned()] {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(CaptureError::Pin { path: dir, source }),
            }
        }
        Ok(())
    }

    fn sk_lookup_pin(&self, netns_cookie: u64) -> PathBuf {
        self.pin_dir
            .join(LINKS_DIR)
            .join(format!("sk_lookup-{netns_cookie}"))
    }

    fn lock(&self) -> MutexGuard<'_, Attach> {
        // A panic while holding the lock leaves the kernel maps consistent
        // enough to go on: each map update is atomic.
        self.attach
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl Attach {
    fn steer_keys_of(&self, netns_cookie: u64) -> Result<Vec<IpKey>, CaptureError> {
        let mut keys = Vec::new();
        for entry in self.pod_steer.iter() {
            let (key, steer) = entry.map_err(map_error(maps::POD_STEER))?;
            if steer.netns_cookie == netns_cookie {
                keys.push(key);
            }
        }
        Ok(keys)
    }
}

fn load_program(ebpf: &mut Ebpf, name: &'static str) -> Result<OwnedFd, CaptureError> {
    let prog = ebpf.program_mut(name).ok_or(CaptureError::Missing(name))?;
    let err = program_error(name);
    let fd = match prog {
        aya::programs::Program::CgroupSockAddr(p) => {
            let p: &mut CgroupSockAddr = p;
            p.load().map_err(&err)?;
            p.fd().map_err(&err)?.as_fd().try_clone_to_owned()
        }
        aya::programs::Program::SockOps(p) => {
            let p: &mut SockOps = p;
            p.load().map_err(&err)?;
            p.fd().map_err(&err)?.as_fd().try_clone_to_owned()
        }
        aya::programs::Program::SkLookup(p) => {
            let p: &mut SkLookup = p;
            p.load().map_err(&err)?;
            p.fd().map_err(&err)?.as_fd().try_clone_to_owned()
        }
        _ => return Err(CaptureError::Missing(name)),
    };
    fd.map_err(|source| CaptureError::Attach {
        what: format!("{name} (dup fd)"),
        source,
    })
}

fn program<'a, T>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a T, CaptureError>
where
    &'a T: TryFrom<&'a aya::programs::Program>,
{
    ebpf.program(name)
        .and_then(|p| p.try_into().ok())
        .ok_or(CaptureError::Missing(name))
}

fn take_map<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, CaptureError>
where
    T: TryFrom<aya::maps::Map, Error = MapError>,
{
    let map = ebpf.take_map(name).ok_or(CaptureError::Missing(name))?;
    T::try_from(map).map_err(map_error(name))
}

fn map_error(name: &'static str) -> impl Fn(MapError) -> CaptureError {
    move |source| CaptureError::Map {
        name,
        source: Box::new(source),
    }
}

fn program_error(name: &'static str) -> impl Fn(ProgramError) -> CaptureError {
    move |source| CaptureError::Program {
        name,
        source: Box::new(source),
    }
}

/// Writes `ports` into a steering entry (at most `MAX_PROBE_PORTS`).
fn set_probe_ports(steer: &mut PodSteer, ports: &[u16]) -> Result<(), CaptureError> {
    if ports.len() > MAX_PROBE_PORTS {
        return Err(CaptureError::InvalidPod(format!(
            "{} probe ports, at most {MAX_PROBE_PORTS}",
            ports.len()
        )));
    }
    steer.probe_ports = [0; MAX_PROBE_PORTS];
    steer.probe_ports[..ports.len()].copy_from_slice(ports);
    steer.probe_port_count = ports.len() as u32;
    Ok(())
}

/// A missing key is what a delete wanted anyway.
fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

/// Pins `link` at `path`, atomically replacing (and so detaching) a link an
/// earlier run pinned there: pin beside it, then rename over it.
fn pin_replacing(link: BorrowedFd<'_>, path: &Path) -> Result<(), CaptureError> {
    let mut tmp = path.as_os_str().to_owned();
    // bpffs refuses names with a dot.
    tmp.push("-new");
    let tmp = PathBuf::from(tmp);
    let pin_err = |path: &Path| {
        let path = path.to_owned();
        move |source| CaptureError::Pin { path, source }
    };
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(source) => return Err(CaptureError::Pin { path: tmp, source }),
    }
    sys::obj_pin(link, &tmp).map_err(pin_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(pin_err(path))
}

/// The few `bpf(2)` commands aya 0.13 does not expose in the form needed:
/// link-based multi-attach at a cgroup with a pinnable link fd, and an atomic
/// lookup-and-delete usable through `&self`.
mod sys {
    use super::*;
    use std::ffi::CString;
    use std::mem::{size_of, MaybeUninit};
    use std::os::unix::ffi::OsStrExt;

    const BPF_OBJ_PIN: libc::c_long = 6;
    const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
    const BPF_LINK_CREATE: libc::c_long = 28;

    pub const BPF_CGROUP_SOCK_OPS: u32 = 3;
    pub const BPF_CGROUP_INET4_CONNECT: u32 = 10;
    pub const BPF_CGROUP_INET6_CONNECT: u32 = 11;
    pub const BPF_CGROUP_INET4_GETPEERNAME: u32 = 29;
    pub const BPF_CGROUP_INET6_GETPEERNAME: u32 = 30;
    pub const BPF_SK_LOOKUP: u32 = 36;

    #[repr(C)]
    #[derive(Default)]
    struct LinkCreate {
        prog_fd: u32,
        target_fd: u32,
        attach_type: u32,
        flags: u32,
        _rest: [u64; 6],
    }

    #[repr(C)]
    #[derive(Default)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }

    #[repr(C)]
    #[derive(Default)]
    struct MapElem {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
        // SAFETY: attr is a valid, zero-padded bpf_attr prefix of the given size.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                cmd,
                attr as *mut T as *mut libc::c_void,
                size_of::<T>() as libc::c_uint,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(r)
    }

    /// `BPF_LINK_CREATE`. Links on cgroups are always multi-attach (the
    /// kernel's `BPF_F_ALLOW_MULTI` semantics), so `flags` stays 0.
    pub fn link_create(
        prog: BorrowedFd<'_>,
        target: BorrowedFd<'_>,
        attach_type: u32,
    ) -> io::Result<OwnedFd> {
        let mut attr = LinkCreate {
            prog_fd: prog.as_raw_fd() as u32,
            target_fd: target.as_raw_fd() as u32,
            attach_type,
            ..LinkCreate::default()
        };
        let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
        // SAFETY: the kernel returned a new fd that we now own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
        let c = CString::new(path.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let mut attr = ObjPin {
            pathname: c.as_ptr() as u64,
            bpf_fd: fd.as_raw_fd() as u32,
            ..ObjPin::default()
        };
        bpf(BPF_OBJ_PIN, &mut attr).map(drop)
    }

    pub fn lookup_and_delete<K: aya::Pod, V: aya::Pod>(
        map: BorrowedFd<'_>,
        key: &K,
    ) -> io::Result<V> {
        let mut value = MaybeUninit::<V>::zeroed();
        let mut attr = MapElem {
            map_fd: map.as_raw_fd() as u32,
            key: key as *const K as u64,
            value: value.as_mut_ptr() as u64,
            ..MapElem::default()
        };
        bpf(BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr)?;
        // SAFETY: the kernel filled the value (V is plain old data).
        Ok(unsafe { value.assume_init() })
    }
}
