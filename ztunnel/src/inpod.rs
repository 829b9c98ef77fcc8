//! The pods of this node: which ones the CNI plugin has handed over, which
//! of those the mesh model says to capture, and the enrollment itself
//! (listeners inside the pod's netns, kernel steering, in-pod routing).
//! Reconcile is level-based: it compares what is enrolled with what the
//! model wants now, whatever woke it.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use weft_api::cni::{record_file_name, PodRecord};
use weft_api::ports;

use crate::capture::ebpf::PodCapture;
use crate::capture::netns::Netns;
use crate::capture::pod_routing;
use crate::handover::{ListenerKind, PodSockets};
use crate::proxy::{inbound, outbound, socket, EnrolledPod, ProxyInputs};

/// What the CNI plugin told us about a pod; persisted so a restarted
/// ztunnel finds its pods again without touching them. The plugin writes
/// the same record itself for a pod that started while no ztunnel ran.
pub type PodInfo = PodRecord;

struct Known {
    info: PodInfo,
    enrolled: Option<Enrollment>,
}

struct Enrollment {
    pod: Arc<EnrolledPod>,
    cancel: CancellationToken,
    /// The ports the node reaches directly, as last written to the kernel.
    probe_ports: Vec<u16>,
    /// Copies of the pod's listening sockets, for a successor (see
    /// `handover`); dropped at a drain with no successor, so the sockets
    /// close with the accept loops and the pod fails closed.
    sockets: PodSockets,
}

pub struct InPod {
    pi: Arc<ProxyInputs>,
    pods: Mutex<HashMap<String, Known>>,
    state_dir: PathBuf,
    /// Set while the pods are being handed to a successor, and for good
    /// once they have been: CNI changes are refused (the plugin retries,
    /// reaching the successor) and the model is not applied to them.
    frozen: AtomicBool,
    /// Sockets a predecessor handed over, by pod key, until the pod's
    /// enrollment takes them.
    inherited: std::sync::Mutex<HashMap<String, PodSockets>>,
}

#[derive(Serialize)]
pub struct PodStatus {
    pub pod: String,
    pub ips: Vec<IpAddr>,
    pub netns: PathBuf,
    pub enrolled: bool,
}

impl InPod {
    pub fn new(pi: Arc<ProxyInputs>, state_dir: &Path) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(state_dir.join("pods"))
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", state_dir.display()))?;
        Ok(Arc::new(Self {
            pi,
            pods: Mutex::new(HashMap::new()),
            state_dir: state_dir.to_owned(),
            frozen: AtomicBool::new(false),
            inherited: Default::default(),
        }))
    }

    /// Whether a mesh model has arrived: until then nothing is enrolled
    /// and every answer about capture is "not yet".
    pub fn has_model(&self) -> bool {
        self.pi.state.version() > 0
    }

    /// Loads the pods remembered from an earlier run, forgets those whose
    /// network namespace is gone, and drops kernel steering for netns
    /// cookies no remembered pod has any more.
    pub async fn restore(&self) -> anyhow::Result<()> {
        let dir = self.state_dir.join("pods");
        let mut live_cookies = Vec::new();
        let mut pods = self.pods.lock().await;
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            // A record being written (by us or by the CNI plugin) has a
            // hidden temporary name until it is renamed into place.
            if path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            {
                continue;
            }
            let mut info: PodInfo = match std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice::<PodInfo>(&b).ok())
            {
                // A record is only believed under its own, valid, name.
                Some(i)
                    if i.file_name().ok().as_deref()
                        == path.file_name().and_then(|n| n.to_str()) =>
                {
                    i
                }
                _ => {
                    warn!(component = "inpod", file = %path.display(), "unreadable or misnamed pod record; removing");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            };
            // The plugin writes the runtime's path as it is on the host.
            info.netns = host_path(&info.netns);
            match Netns::open(&info.netns) {
                Ok(ns) => live_cookies.push(ns.cookie()),
                Err(_) => {
                    info!(component = "inpod", pod = %info.key(), "pod netns gone; forgetting it");
                    let _ = std::fs::remove_file(&path);
                    continue;
                }
            }
            pods.insert(
                info.key(),
                Known {
                    info,
                    enrolled: None,
                },
            );
        }
        for cookie in self.pi.capture.enrolled_cookies() {
            if !live_cookies.contains(&cookie) {
                let _ = self.pi.capture.unenroll(cookie, &[]);
            }
        }
        Ok(())
    }

    /// CNI ADD: remember the pod and capture it if the model says so.
    /// Returns whether it is captured.
    pub async fn add(&self, mut info: PodInfo) -> anyhow::Result<bool> {
        info.file_name()?;
        info.netns = host_path(&info.netns);
        Netns::open(&info.netns)
            .map_err(|e| anyhow::anyhow!("pod netns {}: {e}", info.netns.display()))?;
        self.persist(&info)?;
        let key = info.key();
        let mut pods = self.pods.lock().await;
        self.refuse_if_frozen()?;
        let known = pods.entry(key).or_insert(Known {
            info: info.clone(),
            enrolled: None,
        });
        if known.info != info {
            if let Some(e) = known.enrolled.take() {
                self.unenroll(e);
            }
            known.info = info;
        }
        self.reconcile_one(known)?;
        Ok(known.enrolled.is_some())
    }

    /// CNI DEL: stop capturing and forget the pod.
    pub async fn delete(&self, namespace: &str, name: &str) -> anyhow::Result<()> {
        let key = format!("{namespace}/{name}");
        let mut pods = self.pods.lock().await;
        self.refuse_if_frozen()?;
        if let Some(mut k) = pods.remove(&key) {
            if let Some(e) = k.enrolled.take() {
                self.unenroll(e);
            }
        }
        let _ = std::fs::remove_file(self.record_path(namespace, name)?);
        Ok(())
    }

    /// CNI CHECK: is the pod in the state the model wants, in the kernel
    /// too? A captured pod whose steering, routing or netns has gone is
    /// reported with what is missing.
    pub async fn check(&self, namespace: &str, name: &str) -> anyhow::Result<bool> {
        let pods = self.pods.lock().await;
        let k = pods
            .get(&format!("{namespace}/{name}"))
            .ok_or_else(|| anyhow::anyhow!("pod {namespace}/{name} is unknown to this ztunnel"))?;
        let want = self.wants_capture(&k.info);
        if want != k.enrolled.is_some() {
            anyhow::bail!(
                "pod {namespace}/{name}: capture is {}, the mesh model wants it {}",
                on_off(k.enrolled.is_some()),
                on_off(want)
            );
        }
        if let Some(e) = &k.enrolled {
            let missing = self.missing_capture(&e.pod);
            if !missing.is_empty() {
                anyhow::bail!(
                    "pod {namespace}/{name} should be captured but its capture is incomplete: missing {}",
                    missing.join(", ")
                );
            }
        }
        Ok(want)
    }

    /// The parts of an enrolled pod's capture that are not in place.
    fn missing_capture(&self, pod: &EnrolledPod) -> Vec<String> {
        let mut missing = Vec::new();
        if let Err(e) = Netns::open(pod.netns.path()) {
            missing.push(format!("its network namespace ({e})"));
            return missing;
        }
        let cookie = pod.netns.cookie();
        if !self.pi.capture.enrolled_cookies().contains(&cookie) {
            missing.push("its netns in the kernel's enrolled set".to_owned());
        }
        let link = self
            .pi
            .capture
            .pin_dir()
            .join(format!("links/sk_lookup-{cookie}"));
        if !link.exists() {
            missing.push(format!("its sk_lookup link ({})", link.display()));
        }
        match pod_routing::missing(&pod.netns) {
            Ok(gone) => missing.extend(gone),
            Err(e) => missing.push(format!("readable in-pod routing ({e})")),
        }
        missing
    }

    /// Brings every known pod to the state the current model wants.
    pub async fn reconcile(&self) {
        let mut pods = self.pods.lock().await;
        if self.frozen.load(Ordering::SeqCst) {
            return;
        }
        for known in pods.values_mut() {
            if let Err(e) = self.reconcile_one(known) {
                warn!(component = "inpod", pod = %known.info.key(), error = %e, "reconcile failed");
            }
        }
        let n = pods.values().filter(|k| k.enrolled.is_some()).count();
        self.pi.metrics.enrolled_pods.set(n as i64);
        // Certificates for exactly the identities of the enrolled pods:
        // requested now (ready before their first connection), and no longer
        // renewed once their last pod has gone.
        let snap = self.pi.state.load();
        let wanted: std::collections::HashSet<_> = pods
            .values()
            .filter(|k| k.enrolled.is_some())
            .filter_map(|k| snap.workload(&k.info.namespace, &k.info.name))
            .map(|w| snap.identity(w.workload))
            .collect();
        let certs = self.pi.certs();
        certs.retain(|id| wanted.contains(id));
        for id in &wanted {
            certs.ensure(id);
        }
    }

    fn refuse_if_frozen(&self) -> anyhow::Result<()> {
        if self.frozen.load(Ordering::SeqCst) {
            anyhow::bail!(
                "this ztunnel is handing the node's pods to a new ztunnel; retry (the new one answers)"
            );
        }
        Ok(())
    }

    /// Freezes the pods and returns copies of every captured pod's
    /// listening sockets, for a successor.
    pub async fn begin_handover(&self) -> anyhow::Result<Vec<(String, PodSockets)>> {
        let pods = self.pods.lock().await;
        self.frozen.store(true, Ordering::SeqCst);
        let mut out = Vec::new();
        for (key, known) in pods.iter() {
            let Some(e) = &known.enrolled else { continue };
            let copies = e
                .sockets
                .iter()
                .map(|(kind, fd)| Ok((*kind, fd.try_clone()?)))
                .collect::<std::io::Result<PodSockets>>();
            match copies {
                Ok(c) => out.push((key.clone(), c)),
                Err(err) => {
                    self.frozen.store(false, Ordering::SeqCst);
                    anyhow::bail!("copying the sockets of {key}: {err}");
                }
            }
        }
        Ok(out)
    }

    /// A hand-over that did not complete: carry on, applying whatever
    /// changed meanwhile.
    pub async fn resume(&self) {
        self.frozen.store(false, Ordering::SeqCst);
        self.reconcile().await;
    }

    /// The successor serves every pod: stop accepting on their sockets and
    /// let go of them; the kernel steering stays as it is (it is the
    /// successor's now). Connections in flight run on.
    pub async fn finish_handover(&self) {
        let mut pods = self.pods.lock().await;
        for known in pods.values_mut() {
            if let Some(e) = &mut known.enrolled {
                e.cancel.cancel();
                e.sockets.clear();
            }
        }
    }

    /// A drain with no successor: let the listening sockets close with the
    /// accept loops, so new connections of enrolled pods are refused (fail
    /// closed) instead of waiting in a backlog nobody accepts from.
    pub async fn release_listeners(&self) {
        let mut pods = self.pods.lock().await;
        for known in pods.values_mut() {
            if let Some(e) = &mut known.enrolled {
                e.sockets.clear();
            }
        }
    }

    /// Sockets handed over by a predecessor, for the enrollments to come.
    pub fn adopt(&self, sockets: HashMap<String, PodSockets>) {
        *self.inherited.lock().unwrap_or_else(|p| p.into_inner()) = sockets;
    }

    /// After the first reconcile: sockets of pods the predecessor captured
    /// and this model does not are closed, and their steering removed.
    pub async fn release_unadopted(&self) {
        let left = std::mem::take(&mut *self.inherited.lock().unwrap_or_else(|p| p.into_inner()));
        let pods = self.pods.lock().await;
        for (key, sockets) in left {
            drop(sockets);
            let Some(known) = pods.get(&key) else {
                continue;
            };
            if known.enrolled.is_some() {
                continue;
            }
            if let Ok(netns) = Netns::open(&known.info.netns) {
                let _ = self.pi.capture.unenroll(netns.cookie(), &known.info.ips);
                let _ = pod_routing::remove(&netns);
            }
            info!(component = "inpod", pod = %key, "the previous ztunnel captured this pod, the mesh model does not: released");
        }
    }

    pub async fn status(&self) -> Vec<PodStatus> {
        let pods = self.pods.lock().await;
        let mut v: Vec<_> = pods
            .values()
            .map(|k| PodStatus {
                pod: k.info.key(),
                ips: k.info.ips.clone(),
                netns: k.info.netns.clone(),
                enrolled: k.enrolled.is_some(),
            })
            .collect();
        v.sort_by(|a, b| a.pod.cmp(&b.pod));
        v
    }

    fn wants_capture(&self, info: &PodInfo) -> bool {
        let snap = self.pi.state.load();
        // Pod labels may opt out; without a workload record yet, the
        // namespace label decides.
        match snap.workload(&info.namespace, &info.name) {
            Some(w) => w.captured,
            None => {
                let probe = weft_api::model::Workload {
                    name: info.name.clone(),
                    namespace: info.namespace.clone(),
                    ..Default::default()
                };
                snap.model.is_captured(&probe)
            }
        }
    }

    /// The pod's probe ports as the model knows them (none until the model
    /// names the pod: until then the kubelet's probes meet policy too).
    fn probe_ports(&self, info: &PodInfo) -> Vec<u16> {
        let snap = self.pi.state.load();
        snap.workload(&info.namespace, &info.name)
            .map(|w| w.workload.probe_ports.clone())
            .unwrap_or_default()
    }

    fn reconcile_one(&self, known: &mut Known) -> anyhow::Result<()> {
        let want = self.wants_capture(&known.info);
        if let (true, Some(e)) = (want, known.enrolled.as_mut()) {
            let ports = self.probe_ports(&known.info);
            if ports != e.probe_ports {
                self.pi
                    .capture
                    .set_probe_ports(e.pod.netns.cookie(), &ports)?;
                info!(component = "inpod", pod = %known.info.key(), ?ports, "probe ports the node reaches directly");
                e.probe_ports = ports;
            }
        }
        match (want, known.enrolled.is_some()) {
            (true, false) => {
                known.enrolled = Some(self.enroll(&known.info)?);
                info!(component = "inpod", pod = %known.info.key(), "pod enrolled: traffic captured");
            }
            (false, true) => {
                if let Some(e) = known.enrolled.take() {
                    self.unenroll(e);
                }
                info!(component = "inpod", pod = %known.info.key(), "pod unenrolled: traffic direct");
            }
            _ => {}
        }
        Ok(())
    }

    fn enroll(&self, info: &PodInfo) -> anyhow::Result<Enrollment> {
        let netns = Netns::open(&info.netns)?;
        let has_v6 = info.ips.iter().any(IpAddr::is_ipv6);
        // A predecessor's sockets for this pod, if it handed any over: the
        // same sockets the kernel steers to, so nothing changes for the pod.
        let mut given: HashMap<ListenerKind, OwnedFd> = self
            .inherited
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&info.key())
            .unwrap_or_default()
            .into_iter()
            .collect();
        let mut sockets = PodSockets::new();
        let mut listener =
            |kind: ListenerKind, addr: SocketAddr| -> anyhow::Result<std::net::TcpListener> {
                let l = match given.remove(&kind) {
                    Some(fd) => {
                        let l = std::net::TcpListener::from(fd);
                        l.set_nonblocking(true)?;
                        l
                    }
                    None => socket::listener_in(&netns, addr)?,
                };
                sockets.push((kind, OwnedFd::from(l.try_clone()?)));
                Ok(l)
            };
        let outbound4 = listener(
            ListenerKind::Outbound4,
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), ports::OUTBOUND),
        )?;
        let outbound6 = if has_v6 {
            Some(listener(
                ListenerKind::Outbound6,
                SocketAddr::new(Ipv6Addr::LOCALHOST.into(), ports::OUTBOUND),
            )?)
        } else {
            None
        };
        let wildcard: IpAddr = if has_v6 {
            Ipv6Addr::UNSPECIFIED.into()
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        };
        let inbound = listener(
            ListenerKind::Inbound,
            SocketAddr::new(wildcard, ports::INBOUND_PLAINTEXT),
        )?;
        let hbone = listener(ListenerKind::Hbone, SocketAddr::new(wildcard, ports::HBONE))?;
        pod_routing::install(&netns)
            .map_err(|e| anyhow::anyhow!("in-pod routing for {}: {e}", info.key()))?;
        let probe_ports = self.probe_ports(info);
        self.pi.capture.enroll(&PodCapture {
            netns: &netns,
            ips: info.ips.clone(),
            probe_sources: self.pi.cfg.node_ips.clone(),
            probe_ports: &probe_ports,
            inbound: inbound.as_fd(),
            hbone: hbone.as_fd(),
        })?;
        let pod = Arc::new(EnrolledPod {
            namespace: info.namespace.clone(),
            name: info.name.clone(),
            ips: info.ips.clone(),
            netns,
            outbound_open: Default::default(),
            inbound_open: Default::default(),
        });
        let cancel = CancellationToken::new();
        let pi = &self.pi;
        let spawn_outbound = |l: std::net::TcpListener| -> anyhow::Result<()> {
            let l = tokio::net::TcpListener::from_std(l)?;
            tokio::spawn(outbound::run(pi.clone(), pod.clone(), l, cancel.clone()));
            Ok(())
        };
        spawn_outbound(outbound4)?;
        if let Some(l) = outbound6 {
            spawn_outbound(l)?;
        }
        for (l, kind) in [
            (inbound, inbound::Kind::Plaintext),
            (hbone, inbound::Kind::Hbone),
        ] {
            let l = tokio::net::TcpListener::from_std(l)?;
            tokio::spawn(inbound::run(
                pi.clone(),
                pod.clone(),
                l,
                kind,
                cancel.clone(),
            ));
        }
        Ok(Enrollment {
            pod,
            cancel,
            probe_ports,
            sockets,
        })
    }

    fn unenroll(&self, e: Enrollment) {
        if let Err(err) = self.pi.capture.unenroll(e.pod.netns.cookie(), &e.pod.ips) {
            warn!(component = "inpod", pod = %e.pod.name, error = %err, "removing kernel steering failed");
        }
        if let Err(err) = pod_routing::remove(&e.pod.netns) {
            warn!(component = "inpod", pod = %e.pod.name, error = %err, "removing in-pod routing failed");
        }
        // Listeners close when their accept loops end; connections in
        // flight keep running to their natural end.
        e.cancel.cancel();
    }

    /// Only ever built from names that passed the Kubernetes rules, so it
    /// stays inside `pods/`.
    fn record_path(&self, namespace: &str, name: &str) -> anyhow::Result<PathBuf> {
        Ok(self
            .state_dir
            .join("pods")
            .join(record_file_name(namespace, name)?))
    }

    fn persist(&self, info: &PodInfo) -> anyhow::Result<()> {
        let path = self.record_path(&info.namespace, &info.name)?;
        weft_pki::files::write_atomic(&path, &serde_json::to_vec(info)?, 0o600)?;
        Ok(())
    }
}

fn on_off(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

/// A runtime may name a pod's netns `/proc/<pid>/ns/net`; in a container the
/// host's /proc is mounted at `$WEFT_HOST_PROC`.
fn host_path(netns: &Path) -> PathBuf {
    match (
        std::env::var_os("WEFT_HOST_PROC"),
        netns.strip_prefix("/proc"),
    ) {
        (Some(host_proc), Ok(rest)) => PathBuf::from(host_proc).join(rest),
        _ => netns.to_owned(),
    }
}
