//! Waypoints on the simulated cluster: a pod (opted out of capture, as the
//! controller's Deployment would make it) running the real `weft-waypoint`,
//! recorded in the model as a Gateway of class `weft-waypoint`; HTTP apps;
//! and curl inside pods.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::process::Output;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use weft_api::model::{Service, ServicePort, Waypoint, GATEWAY_NAME_LABEL};

use crate::cluster::Pod;
use crate::mesh::{bin_path, normalized, wait_until, Mesh};

impl Mesh {
    /// Adds `labels` to a pod's workload in the model and applies it.
    pub fn label_pod(&mut self, pod: &Pod, labels: &[(&str, &str)]) -> Result<()> {
        let w = self
            .model
            .workloads
            .iter_mut()
            .find(|w| w.namespace == pod.namespace && w.name == pod.name)
            .context("pod not in the model")?;
        for (k, v) in labels {
            w.labels.insert((*k).to_owned(), (*v).to_owned());
        }
        self.write_model()
    }

    /// A Service selecting pods carrying all of `selector`; returns its VIP.
    pub fn add_service_selecting(
        &mut self,
        namespace: &str,
        name: &str,
        selector: &[(&str, &str)],
        ports: &[(u16, u16)],
    ) -> Result<Ipv4Addr> {
        let vip = self.next_vip();
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
            selector: selector
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>(),
            waypoint: None,
        });
        self.write_model()?;
        Ok(vip)
    }

    /// Deploys waypoint `name` in `namespace` on `node`: a Gateway in the
    /// model and a pod running `weft-waypoint`; waits until it serves.
    pub fn add_waypoint(&mut self, node: usize, namespace: &str, name: &str) -> Result<Pod> {
        self.add_waypoint_with_env(
            node,
            namespace,
            name,
            &[("WEFT_LOG", "info,weft_waypoint=debug")],
        )
    }

    /// `add_waypoint` with extra environment for the process (log filter,
    /// `WEFT_ACCESS_LOG=false` for benchmarks).
    pub fn add_waypoint_with_env(
        &mut self,
        node: usize,
        namespace: &str,
        name: &str,
        env: &[(&str, &str)],
    ) -> Result<Pod> {
        self.model.waypoints.push(Waypoint {
            name: name.into(),
            namespace: namespace.into(),
            service_account: name.into(),
        });
        self.spawn_waypoint_replica(node, namespace, name, &format!("{name}-waypoint"), env)
    }

    /// One more replica of waypoint `namespace/name` (pod
    /// `<name>-waypoint-<n>`), as the Deployment's surge adds one; ztunnels
    /// spread new connections over the replicas in the model.
    pub fn add_waypoint_replica(
        &mut self,
        node: usize,
        namespace: &str,
        name: &str,
        replica: u32,
    ) -> Result<Pod> {
        self.spawn_waypoint_replica(
            node,
            namespace,
            name,
            &format!("{name}-waypoint-{replica}"),
            &[("WEFT_LOG", "info,weft_waypoint=debug")],
        )
    }

    /// The spawn name (for logs, signals, `exit_status`) of a waypoint pod.
    pub fn waypoint_spawn(&self, pod: &Pod) -> Option<String> {
        self.waypoints
            .iter()
            .find(|(p, _, _)| p.key() == pod.key())
            .map(|(_, spawn, _)| spawn.clone())
    }

    /// Takes a waypoint pod out of the model, as the controller does once
    /// the pod is terminating (its deletionTimestamp is set).
    pub fn remove_waypoint_pod_from_model(&mut self, pod: &Pod) -> Result<()> {
        self.model
            .workloads
            .retain(|w| !(w.namespace == pod.namespace && w.name == pod.name));
        self.write_model()
    }

    fn spawn_waypoint_replica(
        &mut self,
        node: usize,
        namespace: &str,
        name: &str,
        pod_name: &str,
        env: &[(&str, &str)],
    ) -> Result<Pod> {
        let pod_name = pod_name.to_owned();
        if self.model.namespace(namespace).is_none() {
            self.set_ambient(namespace, false);
        }
        // Labelled before the CNI sees it: the waypoint speaks HBONE itself
        // and is never captured.
        let pod = self.cluster.add_pod(node, namespace, &pod_name)?;
        let labels = [
            ("app", pod_name.as_str()),
            (GATEWAY_NAME_LABEL, name),
            (
                weft_api::DATAPLANE_MODE_LABEL,
                weft_api::DATAPLANE_MODE_NONE,
            ),
        ];
        self.model.workloads.push(weft_api::model::Workload {
            uid: pod.uid.clone(),
            name: pod_name.clone(),
            namespace: namespace.into(),
            service_account: name.into(),
            node: self.cluster.node(node).name.clone(),
            ips: vec![IpAddr::V4(pod.ip), IpAddr::V6(pod.ip6)],
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            probe_ports: Vec::new(),
        });
        self.write_model()?;
        self.cni(&pod, "ADD")?;
        let node_name = self.cluster.node(node).name.clone();
        let mut cmd = pod.command_os(bin_path("weft-waypoint"));
        cmd.args([
            "--name",
            name,
            "--namespace",
            namespace,
            "--node-name",
            &node_name,
        ])
        .args(self.controller_args(&node_name)?)
        .envs(env.iter().copied());
        let spawn = match pod_name.strip_prefix(&format!("{name}-waypoint")) {
            Some("") | None => format!("waypoint-{namespace}-{name}"),
            Some(replica) => format!("waypoint-{namespace}-{name}{replica}"),
        };
        let pid = self.cluster.spawn(&spawn, cmd)?;
        self.cluster
            .wait_for_log(&spawn, "waypoint ready", Duration::from_secs(30))
            .with_context(|| format!("waypoint did not start:\n{}", self.cluster.log(&spawn)))?;
        self.waypoints.push((pod.clone(), spawn, pid));
        self.wait_waypoints_applied()?;
        Ok(pod)
    }

    /// Sends `service`'s traffic through `waypoint` (the
    /// `weft.dev/use-waypoint` label on the Service).
    pub fn use_waypoint(
        &mut self,
        namespace: &str,
        service: &str,
        waypoint: Option<&str>,
    ) -> Result<()> {
        let s = self
            .model
            .services
            .iter_mut()
            .find(|s| s.namespace == namespace && s.name == service)
            .context("no such service")?;
        s.waypoint = waypoint.map(str::to_owned);
        self.write_model()
    }

    /// The waypoint process's pid.
    pub fn waypoint_pid(&self, name: &str) -> Option<u32> {
        self.waypoints
            .iter()
            .find(|(p, _, _)| p.name == format!("{name}-waypoint"))
            .map(|(_, _, pid)| *pid)
    }

    pub fn waypoint_log(&self, name: &str) -> String {
        self.waypoints
            .iter()
            .find(|(p, _, _)| p.name == format!("{name}-waypoint"))
            .map(|(_, spawn, _)| self.cluster.log(spawn))
            .unwrap_or_default()
    }

    fn waypoint_get(&self, pod: &Pod, url: &str) -> Result<String> {
        let out = pod
            .command("curl")
            .args(["-sS", "--max-time", "5", url])
            .output()?;
        if !out.status.success() {
            bail!(
                "curl {url} in {}: {}",
                pod.name,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The Prometheus text of one waypoint pod (a replica).
    pub fn waypoint_pod_metrics(&self, pod: &Pod) -> Result<String> {
        self.waypoint_get(pod, "http://127.0.0.1:15020/metrics")
    }

    /// The waypoint's Prometheus text.
    pub fn waypoint_metrics(&self, name: &str) -> Result<String> {
        let (pod, _, _) = self
            .waypoints
            .iter()
            .find(|(p, _, _)| p.name == format!("{name}-waypoint"))
            .context("no such waypoint")?;
        self.waypoint_get(pod, "http://127.0.0.1:15020/metrics")
    }

    /// Waits until every waypoint serves the model last written.
    pub(crate) fn wait_waypoints_applied(&self) -> Result<()> {
        let want = normalized(serde_json::to_value(&self.model)?);
        for (pod, _, _) in &self.waypoints {
            wait_until(Duration::from_secs(10), || {
                let text = self
                    .waypoint_get(pod, "http://127.0.0.1:15000/config_dump")
                    .ok()?;
                let dump: Value = serde_json::from_str(&text).ok()?;
                (normalized(dump.get("model")?.clone()) == want).then_some(())
            })
            .with_context(|| {
                let got = self
                    .waypoint_get(pod, "http://127.0.0.1:15000/config_dump")
                    .ok()
                    .and_then(|t| serde_json::from_str::<Value>(&t).ok())
                    .and_then(|d| d.get("model").cloned())
                    .map(normalized)
                    .unwrap_or_default();
                format!(
                    "waypoint {} did not apply the new mesh model\nwant: {want}\ngot:  {got}",
                    pod.name
                )
            })?;
        }
        Ok(())
    }

    /// Starts `weft-httpapp serve` in a pod (HTTP on `port`, gRPC health on
    /// `grpc_port`), answering with its pod name.
    pub fn serve_httpapp(&mut self, pod: &Pod, port: u16, grpc_port: Option<u16>) -> Result<()> {
        let mut cmd = pod.command_os(bin_path("weft-httpapp"));
        cmd.args(["serve", "--port", &port.to_string(), "--name", &pod.name]);
        if let Some(g) = grpc_port {
            cmd.args(["--grpc-port", &g.to_string()]);
        }
        let name = format!("httpapp-{}-{}-{port}", pod.namespace, pod.name);
        self.cluster.spawn(&name, cmd)?;
        self.cluster
            .wait_for_log(&name, "listening", Duration::from_secs(10))
    }

    /// Runs curl in `pod` (bounded by `--max-time 20` unless `args` says
    /// otherwise).
    pub fn curl(&self, pod: &Pod, args: &[&str]) -> Result<Output> {
        let mut cmd = pod.command("curl");
        cmd.arg("-sS");
        if !args.contains(&"--max-time") {
            cmd.args(["--max-time", "20"]);
        }
        Ok(cmd.args(args).output()?)
    }

    /// `weft-httpapp <args>` in a pod (gRPC client); its JSON output.
    pub fn httpapp(&self, pod: &Pod, args: &[&str]) -> Result<Value> {
        let out = pod
            .command_os(bin_path("weft-httpapp"))
            .args(args)
            .output()?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        stdout
            .lines()
            .rev()
            .find_map(|l| serde_json::from_str::<Value>(l).ok())
            .with_context(|| {
                format!(
                    "weft-httpapp {args:?}: no JSON output; stderr: {}",
                    String::from_utf8_lossy(&out.stderr)
                )
            })
    }
}
