//! Kernel tests of in-pod capture (needs root, bpffs, cgroup v2): builds a
//! node, a pod and a non-mesh client as network namespaces joined by veth
//! pairs, loads Weft's eBPF programs and checks what each connection reaches.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use weft_ebpf_common::{MARK_INBOUND, MARK_OUTBOUND};
use weft_ztunnel::capture::ebpf::{Capture, PodCapture};
use weft_ztunnel::capture::netns::Netns;
use weft_ztunnel::capture::pod_routing;

const WAIT: Duration = Duration::from_secs(2);

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        panic!("capture_netns tests need root with eBPF, netns and cgroup v2: run them as root (e.g. 'sudo -E cargo test -p weft-ztunnel --test capture_netns')");
    }
}

fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("running {args:?}: {e} (is iproute2 installed?)"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Named netns made with `ip netns add`, deleted (with their veths) on drop.
struct Namespaces {
    names: Vec<String>,
}

impl Namespaces {
    fn add(&mut self, name: String) -> Netns {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        sh(&["ip", "netns", "add", &name]);
        self.names.push(name.clone());
        sh(&["ip", "-n", &name, "link", "set", "lo", "up"]);
        let netns = Netns::open(&Path::new("/var/run/netns").join(&name))
            .unwrap_or_else(|e| panic!("opening netns {name}: {e}"));
        // No duplicate address detection: link-local addresses (IPv6
        // next hops) are usable at once.
        netns
            .run(|| std::fs::write("/proc/sys/net/ipv6/conf/default/accept_dad", "0"))
            .and_then(|r| r)
            .unwrap_or_else(|e| panic!("disabling DAD in {name}: {e}"));
        netns
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
    }
}

/// Unpins everything a test's Capture pinned, even when the test panics.
struct PinDir(PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Err(e) = Capture::remove_all(&self.0) {
            eprintln!("cleanup of {}: {e}", self.0.display());
        }
    }
}

/// node (N) -- veth -- pod (P), enrolled
///          -- veth -- other (O), not in the mesh
struct Topology {
    _ns: Namespaces,
    node: Netns,
    pod: Netns,
    other: Netns,
    node_ip: Ipv4Addr,
    pod_ip: Ipv4Addr,
    other_ip: Ipv4Addr,
    other_ip6: Ipv6Addr,
}

fn topology(tag: &str) -> Topology {
    let pid = std::process::id();
    let x = (pid % 250) as u8;
    let mut ns = Namespaces { names: Vec::new() };
    let (n, p, o) = (
        format!("wt{pid}{tag}n"),
        format!("wt{pid}{tag}p"),
        format!("wt{pid}{tag}o"),
    );
    let node = ns.add(n.clone());
    let pod = ns.add(p.clone());
    let other = ns.add(o.clone());
    let (vpa, vpb, voa, vob) = (
        format!("wt{pid}{tag}pa"),
        format!("wt{pid}{tag}pb"),
        format!("wt{pid}{tag}oa"),
        format!("wt{pid}{tag}ob"),
    );
    sh(&[
        "ip", "link", "add", &vpa, "netns", &n, "type", "veth", "peer", "name", &vpb, "netns", &p,
    ]);
    sh(&[
        "ip", "link", "add", &voa, "netns", &n, "type", "veth", "peer", "name", &vob, "netns", &o,
    ]);
    let ip = |netns: &str, cmd: String| {
        let mut args = vec!["ip", "-n", netns];
        args.extend(cmd.split_whitespace());
        sh(&args);
    };
    ip(&n, format!("addr add 10.253.{x}.1/30 dev {vpa}"));
    ip(&n, format!("addr add 10.253.{x}.5/30 dev {voa}"));
    ip(&p, format!("addr add 10.253.{x}.2/30 dev {vpb}"));
    ip(&o, format!("addr add 10.253.{x}.6/30 dev {vob}"));
    ip(&n, format!("addr add fd00:253:{x}:1::1/64 dev {vpa} nodad"));
    ip(&n, format!("addr add fd00:253:{x}:2::1/64 dev {voa} nodad"));
    ip(&p, format!("addr add fd00:253:{x}:1::2/64 dev {vpb} nodad"));
    ip(&o, format!("addr add fd00:253:{x}:2::2/64 dev {vob} nodad"));
    for (netns, dev) in [(&n, &vpa), (&n, &voa), (&p, &vpb), (&o, &vob)] {
        ip(netns, format!("link set {dev} up"));
    }
    ip(&p, format!("route add default via 10.253.{x}.1"));
    ip(&o, format!("route add default via 10.253.{x}.5"));
    ip(&p, format!("-6 route add default via fd00:253:{x}:1::1"));
    ip(&o, format!("-6 route add default via fd00:253:{x}:2::1"));
    node.run(|| {
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
        std::fs::write("/proc/sys/net/ipv6/conf/all/forwarding", "1")
    })
    .and_then(|r| r)
    .unwrap_or_else(|e| panic!("enabling forwarding in the node netns: {e}"));
    Topology {
        _ns: ns,
        node,
        pod,
        other,
        node_ip: Ipv4Addr::new(10, 253, x, 1),
        pod_ip: Ipv4Addr::new(10, 253, x, 2),
        other_ip: Ipv4Addr::new(10, 253, x, 6),
        other_ip6: format!("fd00:253:{x}:2::2").parse().expect("IPv6 address"),
    }
}

fn listen_in(ns: &Netns, addr: &str) -> TcpListener {
    let l = ns
        .run(|| TcpListener::bind(addr))
        .and_then(|r| r)
        .unwrap_or_else(|e| panic!("listening on {addr} in {}: {e}", ns.path().display()));
    l.set_nonblocking(true).expect("nonblocking listener");
    l
}

/// Connects from inside `ns` on a helper thread, as a process in it would.
fn connect_from(ns: &Netns, dst: SocketAddr) -> std::io::Result<TcpStream> {
    std::thread::scope(|s| {
        s.spawn(|| ns.run(|| TcpStream::connect_timeout(&dst, Duration::from_secs(1)))?)
            .join()
            .expect("client thread panicked")
    })
}

/// Connects from `ns` with a socket as ztunnel makes it: marked, optionally
/// transparent and bound to another address.
fn connect_marked_from(
    ns: &Netns,
    mark: u32,
    bind: Option<SocketAddr>,
    dst: SocketAddr,
) -> std::io::Result<TcpStream> {
    ns.run(|| {
        let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
        s.set_mark(mark)?;
        if let Some(b) = bind {
            s.set_ip_transparent(true)?;
            s.bind(&SockAddr::from(b))?;
        }
        s.connect_timeout(&SockAddr::from(dst), Duration::from_secs(1))?;
        Ok(TcpStream::from(s))
    })?
}

fn accept_within(l: &TcpListener, wait: Duration) -> Option<(TcpStream, SocketAddr)> {
    let deadline = Instant::now() + wait;
    loop {
        match l.accept() {
            Ok(c) => return Some(c),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > deadline {
                    return None;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
}

fn assert_nothing_accepted(l: &TcpListener, what: &str) {
    if let Some((_, peer)) = accept_within(l, Duration::from_millis(200)) {
        panic!("{what} accepted a connection from {peer}, expected none");
    }
}

fn sa(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(ip), port)
}

fn install(pin: &Path) -> Capture {
    Capture::install(pin).unwrap_or_else(|e| panic!("Capture::install({}): {e}", pin.display()))
}

struct Listeners {
    outbound: TcpListener,
    outbound6: TcpListener,
    inbound: TcpListener,
    hbone: TcpListener,
}

/// ztunnel's in-pod listeners. HBONE and inbound bind to loopback, so only
/// sk_lookup can bring outside connections to them.
fn open_listeners(pod: &Netns) -> Listeners {
    Listeners {
        outbound: listen_in(pod, "127.0.0.1:15001"),
        outbound6: listen_in(pod, "[::1]:15001"),
        inbound: listen_in(pod, "127.0.0.1:15006"),
        hbone: listen_in(pod, "127.0.0.1:15008"),
    }
}

fn enroll(capture: &Capture, t: &Topology, l: &Listeners) {
    capture
        .enroll(&PodCapture {
            netns: &t.pod,
            ips: vec![IpAddr::V4(t.pod_ip)],
            probe_sources: vec![IpAddr::V4(t.node_ip)],
            probe_ports: &[8080],
            inbound: l.inbound.as_fd(),
            hbone: l.hbone.as_fd(),
        })
        .unwrap_or_else(|e| panic!("enroll: {e}"));
}

fn assert_outbound_captured(capture: &Capture, t: &Topology, l: &Listeners, remote: &TcpListener) {
    let dst = sa(t.other_ip, 9000);
    let mut client = connect_from(&t.pod, dst).expect("outbound connect from the enrolled pod");
    let (mut accepted, peer) = accept_within(&l.outbound, WAIT).expect(
        "outbound connect from the enrolled pod did not reach its 127.0.0.1:15001 listener",
    );
    assert_eq!(
        capture.original_dst(t.pod.cookie(), peer),
        Some(dst),
        "original_dst of the captured connection"
    );
    assert_eq!(
        capture.original_dst(t.pod.cookie(), peer),
        None,
        "entry removed"
    );
    assert_eq!(
        client.peer_addr().expect("getpeername"),
        dst,
        "getpeername4 restores the address the app asked for"
    );
    client.write_all(b"ping").expect("write");
    let mut buf = [0u8; 4];
    accepted.read_exact(&mut buf).expect("read at proxy");
    assert_eq!(&buf, b"ping");
    assert_nothing_accepted(remote, "the remote server (capture bypassed)");
}

fn assert_outbound6_captured(capture: &Capture, t: &Topology, l: &Listeners, remote: &TcpListener) {
    let dst = SocketAddr::new(IpAddr::V6(t.other_ip6), 9006);
    let client = connect_from(&t.pod, dst).expect("IPv6 outbound connect from the enrolled pod");
    let (_, peer) = accept_within(&l.outbound6, WAIT)
        .expect("IPv6 outbound connect did not reach the pod's [::1]:15001 listener");
    assert_eq!(
        capture.original_dst(t.pod.cookie(), peer),
        Some(dst),
        "IPv6 original_dst"
    );
    assert_eq!(
        client.peer_addr().expect("getpeername"),
        dst,
        "getpeername6 restores the address"
    );
    assert_nothing_accepted(remote, "the IPv6 remote server (capture bypassed)");
}

#[test]
fn netns_capture_steers_outbound_and_inbound_and_fails_closed() {
    require_root();
    let t = topology("c");
    let pin = PinDir(PathBuf::from(format!(
        "/sys/fs/bpf/weft-test-{}",
        std::process::id()
    )));
    let capture = install(&pin.0);

    let app = listen_in(&t.pod, "0.0.0.0:8080");
    let other_srv = listen_in(&t.other, "0.0.0.0:9000");
    let other_srv6 = listen_in(&t.other, "[::]:9006");
    let node_srv = listen_in(&t.node, "0.0.0.0:9000");
    // Baseline: before enrollment the pod reaches the other side directly.
    let _c = connect_from(&t.pod, sa(t.other_ip, 9000)).expect("baseline IPv4 connect");
    accept_within(&other_srv, WAIT).expect("baseline IPv4 connect reaches the server");
    let _c = connect_from(&t.pod, SocketAddr::new(IpAddr::V6(t.other_ip6), 9006))
        .expect("baseline IPv6 connect");
    accept_within(&other_srv6, WAIT).expect("baseline IPv6 connect reaches the server");

    let l = open_listeners(&t.pod);
    pod_routing::install(&t.pod).expect("pod routing");
    enroll(&capture, &t, &l);
    assert!(capture.enrolled_cookies().contains(&t.pod.cookie()));

    // Outbound from the enrolled pod lands on its 15001 listener.
    assert_outbound_captured(&capture, &t, &l, &other_srv);
    assert_outbound6_captured(&capture, &t, &l, &other_srv6);

    // The non-enrolled netns is untouched.
    connect_from(
        &t.other,
        sa(Ipv4Addr::new(10, 253, t.pod_ip.octets()[2], 5), 9000),
    )
    .expect("connect from the non-enrolled netns");
    accept_within(&node_srv, WAIT).expect("non-enrolled client reaches its server directly");

    // ztunnel's own outbound socket (MARK_OUTBOUND) is not captured.
    connect_marked_from(&t.pod, MARK_OUTBOUND, None, sa(t.other_ip, 9000))
        .expect("ztunnel outbound socket connects");
    accept_within(&other_srv, WAIT).expect("MARK_OUTBOUND socket goes direct");
    assert_nothing_accepted(
        &l.outbound,
        "the outbound listener (for a MARK_OUTBOUND socket)",
    );

    // Inbound to an app port lands on the inbound listener, original dst intact.
    let _c = connect_from(&t.other, sa(t.pod_ip, 8080)).expect("inbound connect to the pod");
    let (s, peer) =
        accept_within(&l.inbound, WAIT).expect("inbound connect reached the inbound listener");
    assert_eq!(s.local_addr().expect("getsockname"), sa(t.pod_ip, 8080));
    assert_eq!(peer.ip(), IpAddr::V4(t.other_ip));
    assert_nothing_accepted(&app, "the app (inbound bypassed ztunnel)");

    // Inbound to 15008 lands on the HBONE listener.
    let _c = connect_from(&t.other, sa(t.pod_ip, 15008)).expect("inbound connect to 15008");
    let (s, _) = accept_within(&l.hbone, WAIT).expect("15008 reached the HBONE listener");
    assert_eq!(s.local_addr().expect("getsockname"), sa(t.pod_ip, 15008));

    // A probe from the node to the probe port reaches the app directly.
    let _c = connect_from(&t.node, sa(t.pod_ip, 8080)).expect("probe connect");
    let (_, peer) = accept_within(&app, WAIT).expect("node probe reaches the app directly");
    assert_eq!(peer.ip(), IpAddr::V4(t.node_ip));
    // From the node to any other port: through the ztunnel, like any client.
    let _c = connect_from(&t.node, sa(t.pod_ip, 9090)).expect("node connect to a non-probe port");
    let (s, peer) = accept_within(&l.inbound, WAIT)
        .expect("the node's connection to a non-probe port reached the inbound listener");
    assert_eq!(s.local_addr().expect("getsockname"), sa(t.pod_ip, 9090));
    assert_eq!(peer.ip(), IpAddr::V4(t.node_ip));
    // The probe ports follow the model: without them, 8080 from the node
    // meets the ztunnel too; restored, the probe goes direct again.
    capture
        .set_probe_ports(t.pod.cookie(), &[])
        .expect("clear probe ports");
    let _c = connect_from(&t.node, sa(t.pod_ip, 8080)).expect("node connect, no probe ports");
    accept_within(&l.inbound, WAIT).expect("without probe ports the node meets the ztunnel");
    assert_nothing_accepted(&app, "the app (no probe ports)");
    capture
        .set_probe_ports(t.pod.cookie(), &[8080])
        .expect("restore probe ports");
    let _c = connect_from(&t.node, sa(t.pod_ip, 8080)).expect("probe connect again");
    accept_within(&app, WAIT).expect("the probe port goes direct again");

    // ztunnel's inbound leg: transparent, MARK_INBOUND, bound to the client's
    // IP; not captured, and the app sees the client's IP thanks to pod routing.
    let _c = connect_marked_from(
        &t.pod,
        MARK_INBOUND,
        Some(sa(t.other_ip, 0)),
        sa(t.pod_ip, 8080),
    )
    .expect("ztunnel's transparent connect to the app (pod routing installed?)");
    let (_, peer) = accept_within(&app, WAIT).expect("inbound leg reaches the app");
    assert_eq!(
        peer.ip(),
        IpAddr::V4(t.other_ip),
        "app sees the client's IP"
    );

    // ztunnel goes down (listeners and loader gone; pins stay): fail closed.
    drop(l);
    drop(capture);
    let inbound = connect_from(&t.other, sa(t.pod_ip, 8080));
    assert!(
        inbound.is_err(),
        "inbound connect with ztunnel down must fail, got {inbound:?}"
    );
    assert_nothing_accepted(&app, "the app while ztunnel is down");
    let outbound = connect_from(&t.pod, sa(t.other_ip, 9000));
    assert!(
        outbound.is_err(),
        "outbound connect with ztunnel down must be refused, got {outbound:?}"
    );
    assert_nothing_accepted(&other_srv, "the remote server while ztunnel is down");

    // ztunnel restarts: pinned state is picked up, links replaced, capture resumes.
    let capture = install(&pin.0);
    assert!(
        capture.enrolled_cookies().contains(&t.pod.cookie()),
        "enrolled pods survive a restart"
    );
    let l = open_listeners(&t.pod);
    enroll(&capture, &t, &l);
    assert_outbound_captured(&capture, &t, &l, &other_srv);

    // Unenroll: both directions go direct.
    capture
        .unenroll(t.pod.cookie(), &[IpAddr::V4(t.pod_ip)])
        .expect("unenroll");
    pod_routing::remove(&t.pod).expect("pod routing removal");
    assert!(!capture.enrolled_cookies().contains(&t.pod.cookie()));
    let _c = connect_from(&t.pod, sa(t.other_ip, 9000)).expect("outbound after unenroll");
    accept_within(&other_srv, WAIT).expect("outbound after unenroll goes direct");
    let _c = connect_from(&t.pod, SocketAddr::new(IpAddr::V6(t.other_ip6), 9006))
        .expect("IPv6 outbound after unenroll");
    accept_within(&other_srv6, WAIT).expect("IPv6 outbound after unenroll goes direct");
    assert_nothing_accepted(&l.outbound, "the outbound listener after unenroll");
    let _c = connect_from(&t.other, sa(t.pod_ip, 8080)).expect("inbound after unenroll");
    accept_within(&app, WAIT).expect("inbound after unenroll reaches the app");
    assert_nothing_accepted(&l.inbound, "the inbound listener after unenroll");
    assert!(
        !pin.0
            .join(format!("links/sk_lookup-{}", t.pod.cookie()))
            .exists(),
        "sk_lookup link unpinned"
    );
}

#[test]
fn netns_pod_routing_lands_in_pod_netns_and_is_idempotent() {
    require_root();
    let mut ns = Namespaces { names: Vec::new() };
    let pod = ns.add(format!("wt{}r", std::process::id()));
    let host = Netns::current().expect("current netns");
    assert_ne!(pod.cookie(), host.cookie());
    let host_before =
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fwmark_accept").expect("host sysctl");

    // Netlink, not iproute2: with no `ip` to be found, routing still
    // installs (nextest runs each test in its own process, so PATH is ours).
    let path = std::env::var_os("PATH");
    std::env::set_var("PATH", "/nonexistent");
    let installed = pod_routing::install(&pod).and_then(|()| pod_routing::install(&pod));
    let missing = pod_routing::missing(&pod);
    if let Some(p) = path {
        std::env::set_var("PATH", p);
    }
    installed.expect("install twice without iproute2 on PATH");
    assert_eq!(missing.expect("missing"), Vec::<String>::new());
    assert!(pod_routing::fwmark_accept_enabled(&pod).expect("read"));
    assert_eq!(
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_fwmark_accept").expect("host sysctl"),
        host_before,
        "the node's sysctl is untouched"
    );
    let rules = |ns: &Netns| {
        ns.run(|| Command::new("ip").args(["-4", "rule", "show"]).output())
            .and_then(|r| r)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .expect("ip rule show")
    };
    let fwmark = format!("fwmark {MARK_INBOUND:#x} lookup 1515");
    assert_eq!(
        rules(&pod).matches(&fwmark).count(),
        1,
        "one rule after two installs"
    );
    assert!(
        !rules(&host).contains(&fwmark),
        "the node's rules are untouched"
    );
    // The same for IPv6 (the netns has ::1), and the local routes.
    let show = |ns: &Netns, args: &[&str]| {
        ns.run(|| Command::new("ip").args(args).output())
            .and_then(|r| r)
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .expect("ip show")
    };
    assert_eq!(
        show(&pod, &["-6", "rule", "show"]).matches(&fwmark).count(),
        1,
        "one IPv6 rule"
    );
    assert_eq!(
        show(&pod, &["-4", "route", "show", "table", "1515"]).trim(),
        "local default dev lo scope host"
    );
    let v6 = show(&pod, &["-6", "route", "show", "table", "1515"]);
    assert!(v6.trim().starts_with("local default dev lo"), "{v6}");
    // CHECK's view: a rule deleted behind our back is reported.
    pod.run(|| {
        sh(&[
            "ip",
            "-4",
            "rule",
            "del",
            "fwmark",
            &format!("{MARK_INBOUND:#x}"),
            "lookup",
            "1515",
        ])
    })
    .expect("rule del");
    pod.run(|| sh(&["ip", "-6", "route", "flush", "table", "1515"]))
        .expect("route flush");
    let gone = pod_routing::missing(&pod).expect("missing");
    assert_eq!(
        gone,
        vec![
            format!("IPv4 rule fwmark {MARK_INBOUND:#x} lookup 1515"),
            "IPv6 route local ::/0 dev lo table 1515".to_owned()
        ]
    );
    pod_routing::install(&pod).expect("install repairs");
    assert!(pod_routing::missing(&pod).expect("missing").is_empty());

    pod_routing::remove(&pod).expect("remove");
    pod_routing::remove(&pod).expect("remove twice");
    assert!(!pod_routing::fwmark_accept_enabled(&pod).expect("read"));
    assert!(!rules(&pod).contains(&fwmark));
    // The calling thread is back in its own netns.
    assert_eq!(Netns::current().expect("current").cookie(), host.cookie());
}
