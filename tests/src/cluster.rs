//! A simulated Kubernetes cluster built from kernel objects, for end-to-end
//! tests that need real sockets, routing and cgroups but no API server.
//!
//! Layout for slot `n` (one slot per live `Cluster`, held by a flock on
//! `/run/weft-e2e/slot-<n>.lock`):
//! - fabric netns `wft<n>-fabric` holding bridge `wft<n>-br`; nothing else is
//!   attached to it, so no traffic can leave the simulated cluster;
//! - node `i` (0-based): netns `wft<n>-n<i+1>`, `eth0` at `10.(64+n).255.(i+1)/24`
//!   and `fd00:<n>:ff::<i+1>/64` on the bridge (fabric side veth `wft<n>-n<i+1>`),
//!   pod CIDRs `10.(64+n).(i+1).0/24` and `fd00:<n>:<i+1>::/64`, routes to the
//!   other nodes' pod CIDRs, no default route;
//! - pod: netns `wft<n>-p<k>-<namespace>-<name>`, `eth0` with a /32 and a /128
//!   (both families, like a dual-stack cluster), `default via 169.254.1.1 dev eth0
//!   onlink` and `default via fe80::1 dev eth0`; node side veth `wft<n>p<k>` with
//!   proxy_arp, the address `fe80::1`, and a /32 and a /128 route; a `sleep
//!   infinity` pause process in the pod's netns and cgroup
//!   `<cgroup2>/weft-e2e-<n>/node<i+1>/pods/p<k>-<namespace>-<name>`;
//! - service VIPs: `10.(64+n).200.0/24` and `fd00:<n>:c8::/64`, model addresses only;
//! - IPv6 addresses skip duplicate address detection, so they are usable at once;
//! - `/run/weft-e2e/<n>/` run dir, `/sys/fs/bpf/weft-e2e-<n>` pin dir.
//!
//! Dropping the `Cluster` (also while a test panics) kills everything it
//! started and removes every namespace, cgroup and directory of its slot.

mod capture;
mod cni;
pub mod pcap;
mod sys;

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::Rng;

pub use capture::Capture;
pub use cni::{invoke_cni, prev_result, CniError};
pub use pcap::{parse_pcap, Packet};

/// Number of concurrent clusters a machine can host.
pub const MAX_SLOTS: u32 = 64;
/// Nodes per cluster (pod CIDRs `10.x.1.0/24`..; VIPs start at `10.x.200.0`).
pub const MAX_NODES: usize = 16;
/// The pods' default gateway; every node answers ARP for it on pod veths.
pub const POD_GATEWAY: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// The pods' IPv6 default gateway: a link-local address every node's pod
/// veth carries.
pub const POD_GATEWAY6: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1);
/// Root of all per-slot run dirs and slot locks.
pub const RUN_ROOT: &str = "/run/weft-e2e";

/// A simulated cluster. Drop tears it down.
pub struct Cluster {
    slot: u32,
    run_dir: PathBuf,
    cgroup2: PathBuf,
    cgroup_root: PathBuf,
    fabric_netns: String,
    bridge: String,
    nodes: Vec<Node>,
    pods: Vec<Pod>,
    next_pod_seq: u32,
    next_pod_host: Vec<u8>,
    children: Vec<Tracked>,
    // Released last (in Drop, after teardown), so no other run can take the
    // slot while its objects still exist.
    slot_lock: Option<File>,
}

struct Tracked {
    name: String,
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

/// A node: a network namespace with an address on the fabric bridge.
#[derive(Clone, Debug)]
pub struct Node {
    /// 0-based position in `Cluster::nodes()`.
    pub index: usize,
    /// "node1", "node2", ...
    pub name: String,
    pub netns: String,
    pub netns_path: PathBuf,
    /// Address on the fabric bridge (`eth0` in the node netns).
    pub ip: Ipv4Addr,
    /// IPv6 address on the fabric bridge.
    pub ip6: Ipv6Addr,
    pub pod_cidr: (Ipv4Addr, u8),
    pub pod_cidr6: (Ipv6Addr, u8),
    /// Parent cgroup of every pod on this node: the attach point for this
    /// node's cgroup eBPF programs. Holds no processes itself.
    pub pods_cgroup: PathBuf,
    /// Cgroup of node-level processes started with `Node::command` (ztunnel).
    pub system_cgroup: PathBuf,
}

/// A pod: a network namespace and cgroup with a pause process.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    /// Index of the pod's node.
    pub node: usize,
    pub netns: String,
    /// `/run/netns/<netns>`, what a runtime passes as CNI_NETNS.
    pub netns_path: PathBuf,
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address (every pod has both families).
    pub ip6: Ipv6Addr,
    pub cgroup: PathBuf,
    /// 64 hex characters, like a containerd sandbox id.
    pub container_id: String,
    /// Random UUID.
    pub uid: String,
    /// Name of the node-side veth (in the node netns).
    pub host_veth: String,
    /// The pause process (`sleep infinity`) in the pod's netns and cgroup.
    pub pause_pid: u32,
}

impl Node {
    /// A command that runs inside this node's netns and system cgroup.
    pub fn command(&self, program: &str) -> Command {
        self.command_os(program)
    }

    /// Like `command`, for a program given as a path.
    pub fn command_os(&self, program: impl AsRef<OsStr>) -> Command {
        sys::command_in(program, &self.netns_path, Some(&self.system_cgroup))
    }
}

impl Pod {
    /// A command that runs inside this pod's netns and cgroup.
    pub fn command(&self, program: &str) -> Command {
        self.command_os(program)
    }

    /// Like `command`, for a program given as a path.
    pub fn command_os(&self, program: impl AsRef<OsStr>) -> Command {
        sys::command_in(program, &self.netns_path, Some(&self.cgroup))
    }

    /// "namespace/name".
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl Cluster {
    /// Builds a cluster of `nodes` nodes (1..=16) in a free slot.
    pub fn new(nodes: usize) -> Result<Cluster> {
        if !(1..=MAX_NODES).contains(&nodes) {
            bail!("a simulated cluster has 1..={MAX_NODES} nodes, not {nodes}");
        }
        preflight()?;
        let cgroup2 = sys::cgroup2_root()?;
        fs::create_dir_all(RUN_ROOT).with_context(|| format!("creating {RUN_ROOT}"))?;
        let (slot, lock) = take_slot()?;
        sweep_slot(slot, &cgroup2)
            .with_context(|| format!("cleaning leftovers of slot {slot} from an earlier run"))?;
        let mut cluster = Cluster {
            slot,
            run_dir: Path::new(RUN_ROOT).join(slot.to_string()),
            cgroup_root: cgroup2.join(format!("weft-e2e-{slot}")),
            cgroup2,
            fabric_netns: format!("wft{slot}-fabric"),
            bridge: format!("wft{slot}-br"),
            nodes: Vec::new(),
            pods: Vec::new(),
            next_pod_seq: 1,
            next_pod_host: vec![2; nodes],
            children: Vec::new(),
            slot_lock: Some(lock),
        };
        // On error the partly built cluster drops here and tears down.
        cluster.build(nodes)?;
        Ok(cluster)
    }

    fn build(&mut self, nodes: usize) -> Result<()> {
        fs::create_dir_all(self.run_dir.join("logs"))?;
        fs::create_dir_all(&self.cgroup_root)
            .with_context(|| format!("creating cgroup {}", self.cgroup_root.display()))?;
        let fab = self.fabric_netns.clone();
        sys::ip(&["netns", "add", &fab])?;
        sys::ip(&["-n", &fab, "link", "set", "lo", "up"])?;
        sys::ip(&[
            "-n",
            &fab,
            "link",
            "add",
            "name",
            &self.bridge,
            "type",
            "bridge",
        ])?;
        sys::ip(&["-n", &fab, "link", "set", &self.bridge, "up"])?;

        let slot = self.slot;
        for index in 0..nodes {
            let n = index + 1;
            let netns = format!("wft{slot}-n{n}");
            let node_cgroup = self.cgroup_root.join(format!("node{n}"));
            let node = Node {
                index,
                name: format!("node{n}"),
                netns_path: Path::new("/run/netns").join(&netns),
                netns,
                ip: Ipv4Addr::new(10, self.net_octet(), 255, n as u8),
                ip6: self.v6(0xff, n as u16),
                pod_cidr: (Ipv4Addr::new(10, self.net_octet(), n as u8, 0), 24),
                pod_cidr6: (self.v6(n as u16, 0), 64),
                pods_cgroup: node_cgroup.join("pods"),
                system_cgroup: node_cgroup.join("system"),
            };
            fs::create_dir_all(&node.pods_cgroup)?;
            fs::create_dir_all(&node.system_cgroup)?;
            let ns = node.netns.as_str();
            let fab_veth = format!("wft{slot}-n{n}");
            sys::ip(&["netns", "add", ns])?;
            no_dad(&node.netns_path)?;
            sys::ip(&["-n", ns, "link", "set", "lo", "up"])?;
            sys::ip(&[
                "-n", &fab, "link", "add", "name", &fab_veth, "type", "veth", "peer", "name",
                "eth0", "netns", ns,
            ])?;
            sys::ip(&[
                "-n",
                &fab,
                "link",
                "set",
                &fab_veth,
                "master",
                &self.bridge,
                "up",
            ])?;
            sys::ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", node.ip),
                "dev",
                "eth0",
            ])?;
            sys::ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/64", node.ip6),
                "dev",
                "eth0",
                "nodad",
            ])?;
            sys::ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            // Pods ARP for the gateway; it is local to every node. Scope
            // link keeps it from ever being picked as a source address.
            let gateway = format!("{POD_GATEWAY}/32");
            sys::ip(&[
                "-n", ns, "addr", "add", &gateway, "dev", "lo", "scope", "link",
            ])?;
            // Unknown addresses in our own pod CIDR fail fast.
            let cidr = format!("{}/{}", node.pod_cidr.0, node.pod_cidr.1);
            sys::ip(&["-n", ns, "route", "add", "unreachable", &cidr])?;
            let cidr6 = format!("{}/{}", node.pod_cidr6.0, node.pod_cidr6.1);
            sys::ip(&["-n", ns, "route", "add", "unreachable", &cidr6])?;
            sysctl(
                &node.netns_path,
                &[
                    ("net/ipv4/ip_forward", "1"),
                    ("net/ipv6/conf/all/forwarding", "1"),
                ],
            )?;
            self.nodes.push(node);
        }
        for node in &self.nodes {
            for other in self.nodes.iter().filter(|o| o.index != node.index) {
                let cidr = format!("{}/{}", other.pod_cidr.0, other.pod_cidr.1);
                sys::ip(&[
                    "-n",
                    &node.netns,
                    "route",
                    "add",
                    &cidr,
                    "via",
                    &other.ip.to_string(),
                    "dev",
                    "eth0",
                ])?;
                let cidr6 = format!("{}/{}", other.pod_cidr6.0, other.pod_cidr6.1);
                sys::ip(&[
                    "-n",
                    &node.netns,
                    "route",
                    "add",
                    &cidr6,
                    "via",
                    &other.ip6.to_string(),
                    "dev",
                    "eth0",
                ])?;
            }
        }
        Ok(())
    }

    fn net_octet(&self) -> u8 {
        64 + self.slot as u8
    }

    /// `fd00:<slot>:<net>::<host>`: this slot's IPv6 addresses (ULA).
    fn v6(&self, net: u16, host: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, self.slot as u16, net, 0, 0, 0, 0, host)
    }

    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// `/run/weft-e2e/<slot>/`: sockets, manifests, logs. Removed on drop.
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// `/sys/fs/bpf/weft-e2e-<slot>`: where this cluster's eBPF objects are
    /// pinned. Not created; see `ensure_bpf_pin_dir`. Removed on drop.
    pub fn bpf_pin_dir(&self) -> PathBuf {
        PathBuf::from(format!("/sys/fs/bpf/weft-e2e-{}", self.slot))
    }

    /// Creates `bpf_pin_dir()`, first mounting bpffs at /sys/fs/bpf if the
    /// host has none there (as systemd does on most distributions).
    pub fn ensure_bpf_pin_dir(&self) -> Result<PathBuf> {
        let bpffs = Path::new("/sys/fs/bpf");
        if !sys::is_bpffs(bpffs) {
            sys::run(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"])).context(
                "mounting bpffs at /sys/fs/bpf (needs root and a kernel with CONFIG_BPF_SYSCALL)",
            )?;
        }
        let dir = self.bpf_pin_dir();
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// This cluster's cgroup: parent of every node and pod cgroup.
    pub fn cgroup_root(&self) -> &Path {
        &self.cgroup_root
    }

    /// Mount point of the cgroup2 hierarchy on this host.
    pub fn cgroup2_mount(&self) -> &Path {
        &self.cgroup2
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node by 0-based index. Panics if out of range (a test bug).
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i]
    }

    pub fn pods(&self) -> &[Pod] {
        &self.pods
    }

    /// The pod named `namespace/name`, if it exists.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
    }

    /// Address `index` of the service VIP range `10.(64+slot).200.0/24`.
    /// Nothing is configured for it: only the mesh can make it reachable.
    pub fn vip(&self, index: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, self.net_octet(), 200, index)
    }

    /// Address `index` of the IPv6 service VIP range `fd00:<slot>:c8::/64`
    /// (model addresses only, like `vip`).
    pub fn vip6(&self, index: u8) -> Ipv6Addr {
        self.v6(0xc8, u16::from(index))
    }

    /// The netns holding the bridge, for tcpdump.
    pub fn fabric_netns(&self) -> &str {
        &self.fabric_netns
    }

    pub fn bridge_name(&self) -> &str {
        &self.bridge
    }

    /// A command inside the fabric netns (no cgroup).
    pub fn fabric_command(&self, program: &str) -> Command {
        sys::command_in(
            program,
            &Path::new("/run/netns").join(&self.fabric_netns),
            None,
        )
    }

    /// Creates a pod on node `node`: netns, veth, routes, cgroup, pause.
    pub fn add_pod(&mut self, node: usize, namespace: &str, name: &str) -> Result<Pod> {
        let Some(n) = self.nodes.get(node).cloned() else {
            bail!("no node {node}: the cluster has {} nodes", self.nodes.len());
        };
        if self.pod(namespace, name).is_some() {
            bail!("pod {namespace}/{name} already exists");
        }
        let host = self.next_pod_host[node];
        if host == 255 {
            bail!("node {} has no pod addresses left", n.name);
        }
        self.next_pod_host[node] += 1;
        let seq = self.next_pod_seq;
        self.next_pod_seq += 1;
        let slot = self.slot;
        let label = sanitize(&format!("p{seq}-{namespace}-{name}"), 40);
        let netns = format!("wft{slot}-{label}");
        let host_veth = format!("wft{slot}p{seq}");
        let ip = Ipv4Addr::new(10, self.net_octet(), n.pod_cidr.0.octets()[2], host);
        let ip6 = self.v6(n.index as u16 + 1, u16::from(host));
        let mut rng = rand::thread_rng();
        let container_id: String = (0..32)
            .map(|_| format!("{:02x}", rng.gen::<u8>()))
            .collect();
        let u: [u8; 16] = rng.gen();
        let uid = format!(
            "{}-{}-{}-{}-{}",
            hex(&u[0..4]),
            hex(&u[4..6]),
            hex(&u[6..8]),
            hex(&u[8..10]),
            hex(&u[10..16])
        );
        let mut pod = Pod {
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            node,
            netns_path: Path::new("/run/netns").join(&netns),
            netns,
            ip,
            ip6,
            cgroup: n.pods_cgroup.join(&label),
            container_id,
            uid,
            host_veth,
            pause_pid: 0,
        };
        let (pns, nns, veth) = (pod.netns.as_str(), n.netns.as_str(), pod.host_veth.as_str());
        fs::create_dir_all(&pod.cgroup)
            .with_context(|| format!("creating cgroup {}", pod.cgroup.display()))?;
        sys::ip(&["netns", "add", pns])?;
        no_dad(&pod.netns_path)?;
        sys::ip(&["-n", pns, "link", "set", "lo", "up"])?;
        sys::ip(&[
            "-n", nns, "link", "add", "name", veth, "type", "veth", "peer", "name", "eth0",
            "netns", pns,
        ])?;
        sys::ip(&["-n", pns, "addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        sys::ip(&[
            "-n",
            pns,
            "addr",
            "add",
            &format!("{ip6}/128"),
            "dev",
            "eth0",
            "nodad",
        ])?;
        sys::ip(&["-n", pns, "link", "set", "eth0", "up"])?;
        sys::ip(&[
            "-n",
            pns,
            "route",
            "add",
            "default",
            "via",
            &POD_GATEWAY.to_string(),
            "dev",
            "eth0",
            "onlink",
        ])?;
        sys::ip(&["-n", nns, "link", "set", veth, "up"])?;
        sys::ip(&[
            "-n",
            nns,
            "addr",
            "add",
            &format!("{POD_GATEWAY6}/64"),
            "dev",
            veth,
            "nodad",
        ])?;
        sys::ip(&[
            "-n",
            pns,
            "route",
            "add",
            "default",
            "via",
            &POD_GATEWAY6.to_string(),
            "dev",
            "eth0",
        ])?;
        // Node-originated traffic to the pod (kubelet probes) leaves from
        // the node IP, as on a real node.
        let node_ip = n.ip.to_string();
        sys::ip(&[
            "-n",
            nns,
            "route",
            "add",
            &format!("{ip}/32"),
            "dev",
            veth,
            "src",
            &node_ip,
        ])?;
        sys::ip(&[
            "-n",
            nns,
            "route",
            "add",
            &format!("{ip6}/128"),
            "dev",
            veth,
            "src",
            &n.ip6.to_string(),
        ])?;
        sysctl(
            &n.netns_path,
            &[(&format!("net/ipv4/conf/{veth}/proxy_arp"), "1")],
        )?;
        let mut pause = pod.command("sleep");
        pause.arg("infinity");
        pod.pause_pid = self.spawn(&format!("pause-{}", pod.netns), pause)?;
        self.pods.push(pod.clone());
        Ok(pod)
    }

    /// Deletes a pod: kills its processes, removes netns, veth, route, cgroup.
    pub fn remove_pod(&mut self, pod: &Pod) -> Result<()> {
        let Some(pos) = self.pods.iter().position(|p| p.netns == pod.netns) else {
            bail!("pod {} is not in this cluster", pod.key());
        };
        let pod = self.pods.remove(pos);
        sys::destroy_cgroup_tree(&pod.cgroup)?;
        self.reap();
        sys::delete_netns(&pod.netns)?;
        // The veth dies with the pod netns; deleting it here makes that
        // synchronous. It is already gone if the netns was freed.
        let _ = sys::run(
            Command::new("ip")
                .args([
                    "-n",
                    &self.nodes[pod.node].netns,
                    "link",
                    "del",
                    &pod.host_veth,
                ])
                .stderr(Stdio::null()),
        );
        Ok(())
    }

    /// Starts `cmd` as a tracked child (killed with its process group on
    /// drop), stdout and stderr going to `run_dir/logs/<name>.log`.
    pub fn spawn(&mut self, name: &str, mut cmd: Command) -> Result<u32> {
        if self.children.iter().any(|c| c.name == name) {
            bail!("a process named {name:?} was already spawned in this cluster");
        }
        let log = self.log_path(name);
        let out = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {name}: {cmd:?}"))?;
        let pid = child.id();
        self.children.push(Tracked {
            name: name.to_owned(),
            child,
            log,
            exited: None,
        });
        Ok(pid)
    }

    /// `run_dir/logs/<name>.log`.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.run_dir
            .join("logs")
            .join(format!("{}.log", sanitize(name, 100)))
    }

    /// The log of a spawned process so far.
    pub fn log(&self, name: &str) -> String {
        fs::read_to_string(self.log_path(name)).unwrap_or_default()
    }

    /// Waits until the log of `name` contains `needle`; fails early if the
    /// process exits first.
    pub fn wait_for_log(&mut self, name: &str, needle: &str, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log(name).contains(needle) {
                return Ok(());
            }
            if let Some(status) = self.exit_status(name) {
                bail!(
                    "{name} exited ({status}) before logging {needle:?}; log:\n{}",
                    self.log(name)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{name} did not log {needle:?} within {timeout:?}; log:\n{}",
                    self.log(name)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Exit status of a spawned process, `None` while it runs (or if unknown).
    pub fn exit_status(&mut self, name: &str) -> Option<ExitStatus> {
        self.reap();
        self.children
            .iter()
            .find(|c| c.name == name)
            .and_then(|c| c.exited)
    }

    /// Sends `signal` (SIGSTOP, SIGCONT, ...) to a running spawned process.
    pub fn signal(&mut self, name: &str, signal: libc::c_int) -> Result<()> {
        let Some(t) = self.children.iter().find(|c| c.name == name) else {
            bail!("no process named {name:?} was spawned");
        };
        if t.exited.is_some() {
            bail!("{name} has exited");
        }
        // SAFETY: plain kill(2) on our own child.
        if unsafe { libc::kill(t.child.id() as i32, signal) } != 0 {
            bail!(
                "kill({name}, {signal}): {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// Sends SIGTERM to a spawned process group, SIGKILL after `grace`, and reaps it.
    pub fn stop(&mut self, name: &str, grace: Duration) -> Result<Option<ExitStatus>> {
        let Some(t) = self.children.iter_mut().find(|c| c.name == name) else {
            bail!("no process named {name:?} was spawned");
        };
        if t.exited.is_none() {
            let pid = t.child.id() as i32;
            // SAFETY: plain kill(2) on our own child's group.
            unsafe { libc::kill(-pid, libc::SIGTERM) };
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(s)) = t.child.try_wait() {
                    t.exited = Some(s);
                    break;
                }
                thread::sleep(Duration::from_millis(10));
            }
            if t.exited.is_none() {
                sys::kill_group(t.child.id());
                t.exited = t.child.wait().ok();
            }
        }
        Ok(t.exited)
    }

    fn reap(&mut self) {
        for t in &mut self.children {
            if t.exited.is_none() {
                if let Ok(Some(s)) = t.child.try_wait() {
                    t.exited = Some(s);
                }
            }
        }
    }

    /// Tears the cluster down now and checks that nothing of its slot is
    /// left, before the slot is released. Drop does the same, but can only
    /// report problems on stderr.
    pub fn teardown(mut self) -> Result<()> {
        self.teardown_inner()
    }

    fn teardown_inner(&mut self) -> Result<()> {
        if self.slot_lock.is_none() {
            return Ok(());
        }
        if thread::panicking() {
            self.dump_logs();
        }
        for t in &mut self.children {
            if t.exited.is_none() {
                sys::kill_group(t.child.id());
                t.exited = t.child.wait().ok();
            }
        }
        let swept = sweep_slot(self.slot, &self.cgroup2);
        let left = leftovers(self.slot, &self.cgroup2);
        self.slot_lock = None;
        swept?;
        if !left.is_empty() {
            bail!(
                "teardown of slot {} left behind: {}",
                self.slot,
                left.join(", ")
            );
        }
        Ok(())
    }

    fn dump_logs(&self) {
        for t in &self.children {
            let Ok(f) = File::open(&t.log) else { continue };
            let lines: Vec<String> = BufReader::new(f).lines().map_while(Result::ok).collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            if !tail.is_empty() {
                eprintln!(
                    "--- weft-e2e slot {} log of {} (last {} lines) ---",
                    self.slot,
                    t.name,
                    tail.len()
                );
                for l in tail {
                    eprintln!("{l}");
                }
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.teardown_inner() {
            eprintln!("weft-e2e: {e:#}");
        }
    }
}

fn preflight() -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("weft-e2e builds network namespaces, veths and cgroups and needs root: run the tests as root (e.g. `sudo -E cargo test -p weft-e2e`)");
    }
    if !Path::new("/proc/self/ns/net").exists() {
        bail!("this kernel has no network namespaces (CONFIG_NET_NS): run the e2e tests on a Linux host or VM with namespaces enabled");
    }
    if Command::new("ip").arg("-V").output().is_err() {
        bail!("the `ip` command is missing: install iproute2 (`apt-get install iproute2`)");
    }
    Ok(())
}

/// Removes the leftovers of every slot no live run holds (a run killed
/// with SIGKILL cannot run its teardown), for CI cleanup steps. Returns the
/// slots that had something to remove. Slots in use are not touched.
pub fn sweep_unlocked_slots() -> Result<Vec<u32>> {
    preflight()?;
    let cgroup2 = sys::cgroup2_root()?;
    fs::create_dir_all(RUN_ROOT).with_context(|| format!("creating {RUN_ROOT}"))?;
    let mut swept = Vec::new();
    for slot in 0..MAX_SLOTS {
        let Some(_lock) = sys::try_flock(&Path::new(RUN_ROOT).join(format!("slot-{slot}.lock")))?
        else {
            continue;
        };
        if !leftovers(slot, &cgroup2).is_empty() {
            sweep_slot(slot, &cgroup2)?;
            swept.push(slot);
        }
    }
    Ok(swept)
}

fn take_slot() -> Result<(u32, File)> {
    for slot in 0..MAX_SLOTS {
        if let Some(lock) = sys::try_flock(&Path::new(RUN_ROOT).join(format!("slot-{slot}.lock")))?
        {
            return Ok((slot, lock));
        }
    }
    bail!("all {MAX_SLOTS} weft-e2e slots are in use: wait for other test runs to finish, or lower test parallelism (--test-threads)")
}

fn netns_prefix(slot: u32) -> String {
    format!("wft{slot}-")
}

/// Removes everything a run in `slot` may have created. The caller holds the
/// slot lock.
fn sweep_slot(slot: u32, cgroup2: &Path) -> Result<()> {
    let prefix = netns_prefix(slot);
    let mut errors = Vec::new();
    // Stop processes first so nothing recreates state while we remove it.
    let cg = cgroup2.join(format!("weft-e2e-{slot}"));
    if cg.exists() {
        let _ = fs::write(cg.join("cgroup.kill"), "1");
    }
    let mut names: Vec<String> = sys::netns_names()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .collect();
    // Pods first, then nodes, the fabric last.
    names.sort_by_key(|n| {
        let rest = &n[prefix.len()..];
        (
            if rest.starts_with('p') {
                0
            } else if rest.starts_with('n') {
                1
            } else {
                2
            },
            n.clone(),
        )
    });
    for name in &names {
        sys::kill_netns_processes(name);
    }
    if let Err(e) = sys::destroy_cgroup_tree(&cg) {
        errors.push(format!("{e:#}"));
    }
    for name in &names {
        if let Err(e) = sys::delete_netns(name) {
            errors.push(format!("{e:#}"));
        }
    }
    for dir in [
        PathBuf::from(format!("/sys/fs/bpf/weft-e2e-{slot}")),
        Path::new(RUN_ROOT).join(slot.to_string()),
    ] {
        if dir.exists() {
            if let Err(e) = fs::remove_dir_all(&dir) {
                errors.push(format!("removing {}: {e}", dir.display()));
            }
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        bail!("{}", errors.join("; "))
    }
}

/// What of `slot` still exists.
fn leftovers(slot: u32, cgroup2: &Path) -> Vec<String> {
    let prefix = netns_prefix(slot);
    let mut left: Vec<String> = sys::netns_names()
        .into_iter()
        .filter(|n| n.starts_with(&prefix))
        .map(|n| format!("netns {n}"))
        .collect();
    for dir in [
        cgroup2.join(format!("weft-e2e-{slot}")),
        PathBuf::from(format!("/sys/fs/bpf/weft-e2e-{slot}")),
        Path::new(RUN_ROOT).join(slot.to_string()),
    ] {
        if dir.exists() {
            left.push(dir.display().to_string());
        }
    }
    left
}

/// Writes `/proc/sys/<key>` values inside a netns (net sysctls are per netns
/// of the writer, so this must run in a child that entered it).
fn sysctl(netns_path: &Path, settings: &[(&str, &str)]) -> Result<()> {
    let script: String = settings
        .iter()
        .map(|(k, v)| format!("echo {v} > /proc/sys/{k} && "))
        .collect::<String>()
        + "true";
    sys::run(sys::command_in("sh", netns_path, None).args(["-c", &script]))
        .with_context(|| format!("setting sysctls in {}", netns_path.display()))
        .map(drop)
}

/// Turns duplicate address detection off for interfaces created in the
/// netns from now on: IPv6 addresses (link-local ones too) are usable at
/// once instead of after a second of "tentative".
fn no_dad(netns_path: &Path) -> Result<()> {
    sysctl(
        netns_path,
        &[
            ("net/ipv6/conf/all/accept_dad", "0"),
            ("net/ipv6/conf/default/accept_dad", "0"),
        ],
    )
}

/// Lowercase alphanumerics and '-', at most `max` bytes.
fn sanitize(s: &str, max: usize) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    out.truncate(max);
    out.trim_end_matches('-').to_owned()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
