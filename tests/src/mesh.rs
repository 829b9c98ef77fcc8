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
use weft_api::model::{Namespace, Service, ServicePort, Workload};
use weft_api::MeshModel;

use crate::cluster::{invoke_cni, Cluster, Pod};

/// Where the workspace's binaries are (next to this test binary's deps).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace --bins`, which `cargo xtask test` does)",
        p.display()
    );
    p
}

pub struct Mesh {
    pub cluster: Cluster,
    pub model: MeshModel,
    model_path: PathBuf,
    ca_dir: PathBuf,
    ztunnel_names: Vec<Option<String>>,
    generation: u32,
    next_vip: u8,
}

impl Mesh {
    /// A cluster of `nodes` nodes with a ztunnel on each; namespaces listed
    /// in `ambient` carry the enrollment label.
    pub fn new(nodes: usize, ambient: &[&str]) -> Result<Mesh> {
        let cluster = Cluster::new(nodes)?;
        let model_path = cluster.run_dir().join("mesh.yaml");
        let ca_dir = cluster.run_dir().join("ca");
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
        };
        for ns in ambient {
            mesh.set_ambient(ns, true);
        }
        mesh.write_model()?;
        for i in 0..nodes {
            mesh.start_ztunnel(i)?;
        }
        Ok(mesh)
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
                &format!("{},{}", n.ip, crate::cluster::POD_GATEWAY),
            ])
            .arg("--model-file")
            .arg(&self.model_path)
            .arg("--ca-dir")
            .arg(&self.ca_dir)
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--bpf-pin-dir")
            .arg(self.cluster.bpf_pin_dir().join(&n.name))
            .arg("--cni-socket")
            .arg(self.cni_socket(node))
            .env("WEFT_LOG", "info,weft_ztunnel=debug");
        self.cluster.spawn(&name, cmd)?;
        self.cluster
            .wait_for_log(&name, "ready", Duration::from_secs(30))
            .context("ztunnel did not become ready")?;
        self.ztunnel_names[node] = Some(name);
        Ok(())
    }

    /// Stops the node's ztunnel (SIGTERM, then SIGKILL).
    pub fn stop_ztunnel(&mut self, node: usize) -> Result<()> {
        if let Some(name) = self.ztunnel_names[node].take() {
            self.cluster.stop(&name, Duration::from_secs(5))?;
        }
        Ok(())
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

    /// Writes the model file atomically; ztunnels pick it up within a
    /// fraction of a second.
    pub fn write_model(&self) -> Result<()> {
        let tmp = self.model_path.with_extension("tmp");
        std::fs::write(&tmp, serde_yaml::to_string(&self.model)?)?;
        std::fs::rename(&tmp, &self.model_path)?;
        self.wait_model_applied()
    }

    /// Waits until every running ztunnel serves exactly the model last
    /// written (its `/config_dump` shows it).
    pub fn wait_model_applied(&self) -> Result<()> {
        let want = serde_json::to_value(&self.model)?;
        for (node, name) in self.ztunnel_names.iter().enumerate() {
            if name.is_none() {
                continue;
            }
            wait_until(Duration::from_secs(10), || {
                let dump = self.config_dump(node).ok()?;
                (dump.get("model")? == &want).then_some(())
            })
            .with_context(|| format!("ztunnel on node {node} did not apply the new mesh model"))?;
        }
        Ok(())
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
        if self.model.namespace(namespace).is_none() {
            self.set_ambient(namespace, false);
        }
        let pod = self.cluster.add_pod(node, namespace, name)?;
        let mut labels = BTreeMap::new();
        labels.insert("app".to_owned(), name.to_owned());
        self.model.workloads.push(Workload {
            uid: pod.uid.clone(),
            name: name.into(),
            namespace: namespace.into(),
            service_account: service_account.into(),
            node: self.cluster.node(node).name.clone(),
            ips: vec![IpAddr::V4(pod.ip)],
            labels,
        });
        self.write_model()?;
        self.cni(&pod, "ADD")?;
        Ok(pod)
    }

    pub fn cni(&self, pod: &Pod, command: &str) -> Result<Value> {
        let netconf = json!({
            "cniVersion": "1.0.0",
            "name": "weft",
            "type": "weft-cni",
            "ztunnel_socket": self.cni_socket(pod.node),
        });
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
        let vip = self.cluster.vip(self.next_vip);
        self.next_vip += 1;
        let mut selector = BTreeMap::new();
        selector.insert("app".to_owned(), app.to_owned());
        self.model.services.push(Service {
            name: name.into(),
            namespace: namespace.into(),
            vips: vec![IpAddr::V4(vip)],
            ports: ports
                .iter()
                .map(|&(port, target)| ServicePort {
                    port,
                    target_port: Some(target),
                })
                .collect(),
            selector,
        });
        self.write_model()?;
        Ok(vip)
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

    /// Starts `weft-testapp serve` in a pod on `port`.
    pub fn serve_testapp(&mut self, pod: &Pod, port: u16) -> Result<()> {
        let mut cmd = pod.command_os(bin_path("weft-testapp"));
        cmd.args(["serve", "--port", &port.to_string()]);
        let name = format!("testapp-{}-{}-{port}", pod.namespace, pod.name);
        self.cluster.spawn(&name, cmd)?;
        self.cluster
            .wait_for_log(&name, "listening", Duration::from_secs(10))
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
        // Remove this run's pinned programs before the cluster goes.
        for n in self.cluster.nodes() {
            let _ = Command::new(bin_path("weft-ztunnel"))
                .args(["uninstall", "--bpf-pin-dir"])
                .arg(self.cluster.bpf_pin_dir().join(&n.name))
                .output();
        }
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
