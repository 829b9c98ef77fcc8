//! A Weft mesh on the simulated cluster: one real `weft-ztunnel` per node,
//! pods enrolled through the real `weft-cni` plugin, and the mesh model
//! written as the file the ztunnels watch. Shared by the end-to-end tests
//! and the demo.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use weft_api::model::{Namespace, Workload};
use weft_api::MeshModel;

use crate::cluster::{invoke_cni, Cluster, Pod};

/// Where the workspace's binaries are (next to this test binary's deps).
pub fn bin_path(name: &str) -> PathBuf {
    let p = bin_path_unchecked(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace --bins`, which `cargo xtask test` does)",
        p.display()
    );
    p
}

fn bin_path_unchecked(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir.join(name)
}

pub struct Mesh {
    pub cluster: Cluster,
    pub model: MeshModel,
    model_path: PathBuf,
    ca_dir: PathBuf,
    ztunnel_names: Vec<Option<String>>,
    generation: u32,
    next_vip: u8,
    /// With a controller (embedded mode, fed by manifests) instead of the
    /// ztunnels reading the model file themselves.
    controller: Option<ControllerRun>,
    /// Running waypoints: their pod and spawn name.
    pub(crate) waypoints: Vec<(Pod, String, u32)>,
    /// Extra flags for every ztunnel started from now on.
    pub ztunnel_args: Vec<String>,
    /// Extra flags for the controller from its next start on.
    pub controller_args: Vec<String>,
    /// The `--controller-ca-file` of ztunnels and waypoints started from
    /// now on, instead of the controller's own root file (as a ConfigMap
    /// volume the test updates, with a kubelet's delay).
    pub controller_ca_file: Option<PathBuf>,
}

struct ControllerRun {
    manifests: PathBuf,
    ca_dir: PathBuf,
    tokens: PathBuf,
    /// Spawn name while running.
    running: Option<String>,
}

/// The controller runs in node 1's namespace; ztunnels reach it there.
pub const CONTROLLER_GRPC_PORT: u16 = 15010;

impl Mesh {
    /// A cluster of `nodes` nodes with a ztunnel on each; namespaces listed
    /// in `ambient` carry the enrollment label.
    pub fn new(nodes: usize, ambient: &[&str]) -> Result<Mesh> {
        Self::build(nodes, ambient, false)
    }

    /// Like `new`, with a `weft-controller` (embedded mode, fed by a folder
    /// of Kubernetes manifests the mesh writes) streaming config and
    /// signing certificates for the ztunnels.
    pub fn with_controller(nodes: usize, ambient: &[&str]) -> Result<Mesh> {
        Self::build(nodes, ambient, true)
    }

    fn build(nodes: usize, ambient: &[&str], with_controller: bool) -> Result<Mesh> {
        let mut mesh = Self::unstarted(nodes, ambient, with_controller)?;
        if mesh.controller.is_some() {
            mesh.start_controller()?;
        }
        for i in 0..nodes {
            mesh.start_ztunnel(i)?;
        }
        Ok(mesh)
    }

    /// Like `new` or `with_controller`, with nothing started yet: the
    /// bootstrap tests start the controller and the ztunnels themselves, in
    /// either order (`start_controller`, `start_ztunnel_before_model`).
    pub fn unstarted(nodes: usize, ambient: &[&str], with_controller: bool) -> Result<Mesh> {
        let cluster = Cluster::new(nodes)?;
        let model_path = cluster.run_dir().join("mesh.yaml");
        let ca_dir = cluster.run_dir().join("ca");
        let controller = if with_controller {
            let manifests = cluster.run_dir().join("manifests");
            std::fs::create_dir_all(&manifests)?;
            let tokens = cluster.run_dir().join("bootstrap-tokens");
            let mut text = String::new();
            for n in cluster.nodes() {
                let token: u128 = rand::random();
                text += &format!("{}: {token:032x}\n", n.name);
                std::fs::write(
                    cluster.run_dir().join(format!("{}.token", n.name)),
                    format!("{token:032x}\n"),
                )?;
            }
            std::fs::write(&tokens, text)?;
            Some(ControllerRun {
                manifests,
                ca_dir: cluster.run_dir().join("controller-ca"),
                tokens,
                running: None,
            })
        } else {
            None
        };
        let mut mesh = Mesh {
            cluster,
            model: MeshModel {
                trust_domain: "cluster.local".into(),
                ..Default::default()
            },
            model_path,
            ca_dir,
            ztunnel_names: vec![None; nodes],
            generation: 0,
            next_vip: 1,
            controller,
            waypoints: Vec::new(),
            ztunnel_args: Vec::new(),
            controller_args: Vec::new(),
            controller_ca_file: None,
        };
        for ns in ambient {
            mesh.set_ambient(ns, true);
        }
        mesh.write_files()?;
        Ok(mesh)
    }

    /// Starts (or restarts) the controller in node 1's namespace.
    pub fn start_controller(&mut self) -> Result<()> {
        let node = self.cluster.node(0).clone();
        self.generation += 1;
        let name = format!("controller-{}", self.generation);
        let Some(c) = &self.controller else {
            bail!("this mesh has no controller");
        };
        if c.running.is_some() {
            bail!("the controller is already running");
        }
        let mut cmd = node.command_os(bin_path("weft-controller"));
        cmd.arg("run")
            .arg("--manifests")
            .arg(&c.manifests)
            .arg("--ca-dir")
            .arg(&c.ca_dir)
            .arg("--bootstrap-tokens")
            .arg(&c.tokens)
            .args(["--grpc-addr", &format!("0.0.0.0:{CONTROLLER_GRPC_PORT}")])
            // 15021 belongs to node 1's ztunnel.
            .args(["--readiness-addr", "0.0.0.0:15031"])
            .args(&self.controller_args)
            .env("WEFT_LOG", "info,weft_controller=debug");
        self.cluster.spawn(&name, cmd)?;
        self.cluster
            .wait_for_log(&name, "serving config stream", Duration::from_secs(30))
            .context("controller did not start")?;
        if let Some(c) = &mut self.controller {
            c.running = Some(name);
        }
        Ok(())
    }

    /// Stops the controller (SIGTERM, then SIGKILL).
    pub fn stop_controller(&mut self) -> Result<()> {
        if let Some(name) = self.controller.as_mut().and_then(|c| c.running.take()) {
            self.cluster.stop(&name, Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// `--controller`, `--controller-ca-file`, `--token-file` for a
    /// process on `node_name` (controller mode only).
    pub(crate) fn controller_args(&self, node_name: &str) -> Result<Vec<std::ffi::OsString>> {
        if self.controller.is_none() {
            bail!("this mesh has no controller");
        }
        Ok(self.control_args(node_name))
    }

    pub fn controller_log(&self) -> String {
        self.controller
            .as_ref()
            .and_then(|c| c.running.as_ref())
            .map(|n| self.cluster.log(n))
            .unwrap_or_default()
    }

    /// The controller's root certificate (controller mode): what verifies
    /// its TLS serving certificate.
    pub fn controller_root(&self) -> Option<PathBuf> {
        self.controller
            .as_ref()
            .map(|c| c.ca_dir.join("root-cert.pem"))
    }

    /// The folder of manifests the controller reads (controller mode).
    pub fn manifests_dir(&self) -> Option<&Path> {
        self.controller.as_ref().map(|c| c.manifests.as_path())
    }

    pub fn ca_dir(&self) -> &Path {
        &self.ca_dir
    }

    fn node_dir(&self, node: usize) -> PathBuf {
        self.cluster.run_dir().join(&self.cluster.node(node).name)
    }

    pub fn cni_socket(&self, node: usize) -> PathBuf {
        self.node_dir(node).join("cni.sock")
    }

    /// Starts (or restarts) the node's ztunnel and waits until it is ready.
    pub fn start_ztunnel(&mut self, node: usize) -> Result<()> {
        self.spawn_ztunnel(node, "ready")
    }

    /// Starts the node's ztunnel and waits only until it serves CNI
    /// requests, which it does before it has a mesh model (with the
    /// controller away, it never gets further); `wait_ztunnel_ready` waits
    /// for the rest.
    pub fn start_ztunnel_before_model(&mut self, node: usize) -> Result<()> {
        self.spawn_ztunnel(node, "serving CNI requests")
    }

    /// Waits until the node's running ztunnel has its model and is ready.
    pub fn wait_ztunnel_ready(&mut self, node: usize) -> Result<()> {
        let Some(name) = self.ztunnel_names[node].clone() else {
            bail!("no ztunnel runs on node {node}");
        };
        self.cluster
            .wait_for_log(&name, "ready", Duration::from_secs(30))
            .context("ztunnel did not become ready")
    }

    fn spawn_ztunnel(&mut self, node: usize, until: &str) -> Result<()> {
        if self.ztunnel_names[node].is_some() {
            bail!("ztunnel on node {node} is already running");
        }
        let n = self.cluster.node(node).clone();
        let dir = self.node_dir(node);
        std::fs::create_dir_all(&dir)?;
        self.generation += 1;
        let name = format!("ztunnel-{}-{}", n.name, self.generation);
        let mut cmd = n.command_os(bin_path("weft-ztunnel"));
        cmd.arg("run")
            .args(["--node-name", &n.name])
            // Kubelet probes come from the node: its fabric address, or the
            // gateway address it uses toward its pods.
            .args([
                "--node-ip",
                &format!("{},{},{}", n.ip, crate::cluster::POD_GATEWAY, n.ip6),
            ])
            .args(self.control_args(&n.name))
            .arg("--state-dir")
            .arg(self.ztunnel_state_dir(node))
            .arg("--bpf-pin-dir")
            .arg(self.cluster.bpf_pin_dir().join(&n.name))
            .arg("--cni-socket")
            .arg(self.cni_socket(node))
            .args(&self.ztunnel_args)
            .env("WEFT_LOG", "info,weft_ztunnel=debug");
        self.cluster.spawn(&name, cmd)?;
        self.cluster
            .wait_for_log(&name, until, Duration::from_secs(30))
            .with_context(|| format!("ztunnel did not log {until:?}"))?;
        self.ztunnel_names[node] = Some(name);
        Ok(())
    }

    fn control_args(&self, node_name: &str) -> Vec<std::ffi::OsString> {
        match &self.controller {
            None => vec![
                "--model-file".into(),
                self.model_path.clone().into(),
                "--ca-dir".into(),
                self.ca_dir.clone().into(),
            ],
            Some(c) => vec![
                "--controller".into(),
                format!("https://{}:{CONTROLLER_GRPC_PORT}", self.cluster.node(0).ip).into(),
                "--controller-ca-file".into(),
                self.controller_ca_file
                    .clone()
                    .unwrap_or_else(|| c.ca_dir.join("root-cert.pem"))
                    .into(),
                "--token-file".into(),
                self.cluster
                    .run_dir()
                    .join(format!("{node_name}.token"))
                    .into(),
            ],
        }
    }

    /// Stops the node's ztunnel (SIGTERM, then SIGKILL).
    pub fn stop_ztunnel(&mut self, node: usize) -> Result<()> {
        if let Some(name) = self.ztunnel_names[node].take() {
            self.cluster.stop(&name, Duration::from_secs(5))?;
        }
        Ok(())
    }

    /// Replaces the node's ztunnel the way the DaemonSet rolls one with
    /// surge: a new ztunnel starts beside the running one and takes its
    /// pods' sockets over; once it is ready the old one gets SIGTERM and
    /// finishes its connections in the background. Returns the old one's
    /// spawn name (for its log and `Cluster::exit_status`).
    pub fn upgrade_ztunnel(&mut self, node: usize) -> Result<String> {
        let Some(old) = self.ztunnel_names[node].take() else {
            bail!("no ztunnel runs on node {node}");
        };
        if let Err(e) = self.spawn_ztunnel(node, "ready") {
            self.ztunnel_names[node] = Some(old);
            return Err(e);
        }
        self.cluster.signal(&old, libc::SIGTERM)?;
        Ok(old)
    }

    /// The spawn name of the node's running ztunnel.
    pub fn ztunnel_name(&self, node: usize) -> Option<&str> {
        self.ztunnel_names[node].as_deref()
    }

    pub fn ztunnel_log(&self, node: usize) -> String {
        self.ztunnel_names[node]
            .as_ref()
            .map(|n| self.cluster.log(n))
            .unwrap_or_default()
    }

    pub fn set_ambient(&mut self, namespace: &str, on: bool) {
        let ns = match self
            .model
            .namespaces
            .iter_mut()
            .find(|n| n.name == namespace)
        {
            Some(n) => n,
            None => {
                self.model.namespaces.push(Namespace {
                    name: namespace.into(),
                    labels: BTreeMap::new(),
                });
                self.model.namespaces.last_mut().expect("just pushed")
            }
        };
        if on {
            ns.labels.insert(
                weft_api::DATAPLANE_MODE_LABEL.into(),
                weft_api::DATAPLANE_MODE_AMBIENT.into(),
            );
        } else {
            ns.labels.remove(weft_api::DATAPLANE_MODE_LABEL);
        }
    }

    /// Writes the model (as the model file, or as Kubernetes manifests for
    /// the controller) and waits until every running ztunnel serves it.
    /// With the controller stopped, only the files are written (nothing can
    /// apply them until it is back: see `wait_model_applied`).
    pub fn write_model(&self) -> Result<()> {
        self.write_files()?;
        if self
            .controller
            .as_ref()
            .is_some_and(|c| c.running.is_none())
        {
            return Ok(());
        }
        self.wait_model_applied()
    }

    /// Writes the model's files only, as a user's `kubectl apply` would:
    /// for tests that time how long the mesh takes to apply it.
    pub fn write_model_files(&self) -> Result<()> {
        self.write_files()
    }

    fn write_files(&self) -> Result<()> {
        let (path, text) = match &self.controller {
            None => (self.model_path.clone(), serde_yaml::to_string(&self.model)?),
            Some(c) => (
                c.manifests.join("mesh.yaml"),
                crate::manifests::render(&self.model)?,
            ),
        };
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &path)?;
        Ok(())
    }

    /// Waits until every running ztunnel serves exactly the model last
    /// written (its `/config_dump` shows it).
    pub fn wait_model_applied(&self) -> Result<()> {
        // ztunnels get no routes or traffic policies (the waypoints do).
        let mut for_ztunnels = self.model.clone();
        for_ztunnels.http_routes.clear();
        for_ztunnels.grpc_routes.clear();
        for_ztunnels.traffic_policies.clear();
        let want = normalized(serde_json::to_value(&for_ztunnels)?);
        for (node, name) in self.ztunnel_names.iter().enumerate() {
            if name.is_none() {
                continue;
            }
            wait_until(Duration::from_secs(10), || {
                let dump = self.config_dump(node).ok()?;
                (normalized(dump.get("model")?.clone()) == want).then_some(())
            })
            .with_context(|| {
                let got = self
                    .config_dump(node)
                    .ok()
                    .and_then(|d| d.get("model").cloned())
                    .map(normalized)
                    .unwrap_or_default();
                format!("ztunnel on node {node} did not apply the new mesh model\nwant: {want}\ngot:  {got}")
            })?;
        }
        self.wait_waypoints_applied()
    }

    /// Creates a pod with labels `app=<name>` plus `labels`, records it in
    /// the model, and runs the CNI plugin's ADD for it as a runtime would.
    pub fn add_pod(
        &mut self,
        node: usize,
        namespace: &str,
        name: &str,
        service_account: &str,
    ) -> Result<Pod> {
        let pod = self.create_pod(node, namespace, name)?;
        self.record_pod(&pod, service_account, &[])?;
        self.cni(&pod, "ADD")?;
        Ok(pod)
    }

    /// The runtime's half of `add_pod`: the pod's sandbox (netns, veth,
    /// cgroup, pause), no model entry and no CNI call yet, so a test can
    /// enroll in either order a real cluster may (`record_pod`, `cni`).
    pub fn create_pod(&mut self, node: usize, namespace: &str, name: &str) -> Result<Pod> {
        if self.model.namespace(namespace).is_none() {
            self.set_ambient(namespace, false);
        }
        self.cluster.add_pod(node, namespace, name)
    }

    /// The controller's half of `add_pod`: the pod's workload (labels
    /// `app=<name>` plus `labels`) enters the mesh model, which is written.
    pub fn record_pod(
        &mut self,
        pod: &Pod,
        service_account: &str,
        labels: &[(&str, &str)],
    ) -> Result<()> {
        let mut all = BTreeMap::new();
        all.insert("app".to_owned(), pod.name.clone());
        for (k, v) in labels {
            all.insert((*k).to_owned(), (*v).to_owned());
        }
        self.model.workloads.push(Workload {
            uid: pod.uid.clone(),
            name: pod.name.clone(),
            namespace: pod.namespace.clone(),
            service_account: service_account.into(),
            node: self.cluster.node(pod.node).name.clone(),
            ips: vec![IpAddr::V4(pod.ip), IpAddr::V6(pod.ip6)],
            labels: all,
            probe_ports: Vec::new(),
        });
        self.write_model()
    }

    /// Gives a recorded pod probe ports, as the controller does from the
    /// pod spec's probes (the only ports the node reaches without the
    /// ztunnel), and writes the model.
    pub fn set_probe_ports(&mut self, pod: &Pod, ports: &[u16]) -> Result<()> {
        let w = self
            .model
            .workloads
            .iter_mut()
            .find(|w| w.namespace == pod.namespace && w.name == pod.name)
            .with_context(|| format!("pod {}/{} is not in the model", pod.namespace, pod.name))?;
        w.probe_ports = ports.to_vec();
        self.write_model()
    }

    /// Deletes a pod as a runtime and the controller do: CNI DEL, the
    /// sandbox torn down, the workload out of the model.
    pub fn delete_pod(&mut self, pod: &Pod) -> Result<()> {
        self.cni(pod, "DEL")?;
        self.cluster.remove_pod(pod)?;
        self.model
            .workloads
            .retain(|w| !(w.namespace == pod.namespace && w.name == pod.name));
        self.write_model()
    }

    /// A hostNetwork pod as a runtime describes it to CNI: its sandbox is
    /// the node's own network namespace.
    pub fn host_network_pod(&self, node: usize, namespace: &str, name: &str) -> Pod {
        let n = self.cluster.node(node);
        Pod {
            name: name.into(),
            namespace: namespace.into(),
            node,
            netns: n.netns.clone(),
            netns_path: n.netns_path.clone(),
            ip: n.ip,
            ip6: n.ip6,
            cgroup: n.system_cgroup.clone(),
            container_id: format!("{:064x}", rand::random::<u128>()),
            uid: format!("{:032x}", rand::random::<u128>()),
            host_veth: String::new(),
            pause_pid: 0,
        }
    }

    /// The ztunnel's state directory on `node` (pod records in `pods/`).
    pub fn ztunnel_state_dir(&self, node: usize) -> PathBuf {
        self.node_dir(node).join("state")
    }

    pub fn cni(&self, pod: &Pod, command: &str) -> Result<Value> {
        self.cni_with(pod, command, &json!({}))
    }

    /// `cni` with more keys in the plugin's network configuration (the
    /// chained entry the installer writes: `kubeconfig`,
    /// `exclude_namespaces`, `state_dir`, ...).
    pub fn cni_with(&self, pod: &Pod, command: &str, extra: &Value) -> Result<Value> {
        let mut netconf = json!({
            "cniVersion": "1.0.0",
            "name": "weft",
            "type": "weft-cni",
            "ztunnel_socket": self.cni_socket(pod.node),
        });
        if let (Some(conf), Some(more)) = (netconf.as_object_mut(), extra.as_object()) {
            conf.extend(more.clone());
        }
        invoke_cni(
            &bin_path("weft-cni"),
            command,
            pod,
            self.cluster.node(pod.node),
            &netconf,
        )
    }

    /// A Service `name` selecting pods labelled `app=<app>`; returns its VIP.
    pub fn add_service(
        &mut self,
        namespace: &str,
        name: &str,
        app: &str,
        ports: &[(u16, u16)],
    ) -> Result<Ipv4Addr> {
        self.add_service_selecting(namespace, name, &[("app", app)], ports)
    }

    pub(crate) fn next_vip(&mut self) -> Ipv4Addr {
        let vip = self.cluster.vip(self.next_vip);
        self.next_vip += 1;
        vip
    }

    /// Runs `program args` inside the node's netns and returns stdout.
    pub fn node_exec(&self, node: usize, program: &str, args: &[&str]) -> Result<String> {
        let out = self
            .cluster
            .node(node)
            .command(program)
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} in node {node} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The node ztunnel's Prometheus text.
    pub fn metrics(&self, node: usize) -> Result<String> {
        self.node_exec(
            node,
            "curl",
            &["-sS", "--max-time", "5", "http://127.0.0.1:15020/metrics"],
        )
    }

    pub fn config_dump(&self, node: usize) -> Result<Value> {
        let text = self.node_exec(
            node,
            "curl",
            &[
                "-sS",
                "--max-time",
                "5",
                "http://127.0.0.1:15000/config_dump",
            ],
        )?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Waits until the node's ztunnel reports `pod` enrolled == `want`.
    pub fn wait_enrolled(&self, node: usize, pod: &Pod, want: bool) -> Result<()> {
        let key = pod.key();
        wait_until(Duration::from_secs(10), || {
            let dump = self.config_dump(node).ok()?;
            let pods = dump.get("pods")?.as_array()?;
            let p = pods
                .iter()
                .find(|p| p.get("pod").and_then(Value::as_str) == Some(&key))?;
            (p.get("enrolled")?.as_bool()? == want).then_some(())
        })
        .with_context(|| format!("pod {key} did not become enrolled={want}"))
    }

    /// The source ztunnel counts an mTLS connection from `client`, and the
    /// server sees the client's own address.
    pub fn assert_mtls_from(&self, client: &Pod, target: &str, principal: &str) {
        let labels = [
            ("reporter", "source"),
            ("connection_security_policy", "mutual_tls"),
            ("source_principal", principal),
        ];
        let before = metric_sum(
            &self.metrics(client.node).expect("metrics"),
            "weft_tcp_connections_opened_total",
            &labels,
        );
        let v = wait_until(Duration::from_secs(10), || {
            let v = self.connect(client, target);
            (v["ok"] == true).then_some(v)
        })
        .unwrap_or_else(|_| panic!("{} cannot reach {target}", client.key()));
        assert!(
            v["peer_seen_by_server"]
                .as_str()
                .unwrap_or_default()
                .starts_with(&format!("{}:", client.ip)),
            "{v}"
        );
        wait_until(Duration::from_secs(5), || {
            let m = self.metrics(client.node).ok()?;
            (metric_sum(&m, "weft_tcp_connections_opened_total", &labels) > before).then_some(())
        })
        .unwrap_or_else(|_| {
            panic!(
                "{}'s connection did not go through its ztunnel",
                client.key()
            )
        });
    }

    /// Starts `weft-testapp serve` in a pod on `port`.
    pub fn serve_testapp(&mut self, pod: &Pod, port: u16) -> Result<()> {
        let mut cmd = pod.command_os(bin_path("weft-testapp"));
        cmd.args(["serve", "--port", &port.to_string()]);
        let name = format!("testapp-{}-{}-{port}", pod.namespace, pod.name);
        self.cluster.spawn(&name, cmd)?;
        self.cluster
            .wait_for_log(&name, "listening", Duration::from_secs(10))
    }

    /// `weft-testapp connect` from `pod` to `target` (5 s timeout): its JSON
    /// answer (`ok`, `peer_seen_by_server`, `error`).
    pub fn connect(&self, pod: &Pod, target: &str) -> Value {
        match self.testapp(pod, &["connect", "--connect", target, "--timeout", "5"]) {
            Ok((_, v)) => v,
            Err(e) => serde_json::json!({ "ok": false, "error": format!("{e:#}") }),
        }
    }

    /// Starts `weft-testapp hold` in `pod`, tracked as `name`: `conns`
    /// connections to `target`, each exchanging a line every 100 ms for
    /// `rounds` rounds (40 s at most).
    pub fn spawn_holder(
        &mut self,
        name: &str,
        pod: &Pod,
        target: &str,
        conns: u32,
        rounds: u32,
    ) -> Result<()> {
        let mut hold = pod.command_os(bin_path("weft-testapp"));
        hold.args([
            "hold",
            "--connect",
            target,
            "--conns",
            &conns.to_string(),
            "--rounds",
            &rounds.to_string(),
            "--interval-ms",
            "100",
            "--timeout",
            "40",
        ]);
        self.cluster.spawn(name, hold)?;
        Ok(())
    }

    /// Runs `weft-testapp <args>` in a pod; returns its JSON output.
    pub fn testapp(&self, pod: &Pod, args: &[&str]) -> Result<(Output, Value)> {
        let out = pod
            .command_os(bin_path("weft-testapp"))
            .args(args)
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let v = stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
            .unwrap_or(Value::Null);
        Ok((out, v))
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for i in 0..self.ztunnel_names.len() {
            let _ = self.stop_ztunnel(i);
        }
        // Remove this run's pinned programs before the cluster goes (not
        // `bin_path`: a panic here, while unwinding, would abort the run).
        let ztunnel = bin_path_unchecked("weft-ztunnel");
        if !ztunnel.exists() {
            return;
        }
        for n in self.cluster.nodes() {
            let _ = Command::new(&ztunnel)
                .args(["uninstall", "--bpf-pin-dir"])
                .arg(self.cluster.bpf_pin_dir().join(&n.name))
                .output();
        }
    }
}

/// A model as JSON with every list of named objects sorted by
/// (namespace, name), so models built in different orders compare equal.
pub(crate) fn normalized(mut v: Value) -> Value {
    if let Some(obj) = v.as_object_mut() {
        for list in obj.values_mut() {
            if let Some(items) = list.as_array_mut() {
                items.sort_by_key(|i| {
                    (
                        i.get("namespace")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned(),
                        i.get("name")
                            .and_then(Value::as_str)
                            .unwrap_or("")
                            .to_owned(),
                    )
                });
            }
        }
    }
    v
}

/// A DENY policy in `namespace` against one source principal.
pub fn deny_from(
    namespace: &str,
    name: &str,
    principal: &str,
) -> weft_api::model::AuthorizationPolicy {
    use weft_api::model::{AuthorizationPolicy, PolicyAction, Rule, Source};
    AuthorizationPolicy {
        name: name.into(),
        namespace: namespace.into(),
        selector: None,
        action: PolicyAction::Deny,
        rules: vec![Rule {
            from: vec![Source {
                principals: vec![principal.into()],
                ..Default::default()
            }],
            to: vec![],
        }],
        targets: vec![],
    }
}

/// Polls `f` every 50 ms until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("condition not met within {timeout:?}");
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// Sum of every sample of `metric` whose labels include all of `labels`.
pub fn metric_sum(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name_labels, value) = l.rsplit_once(' ')?;
            let (name, rest) = match name_labels.split_once('{') {
                Some((n, r)) => (n, r),
                None => (name_labels, ""),
            };
            if name != metric {
                return None;
            }
            let ok = labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}
