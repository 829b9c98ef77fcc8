//! Runs a CNI plugin the way a container runtime does, so the real
//! `weft-cni` binary can be tested against simulated pods.

use std::fmt;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Stdio;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::{Node, Pod, POD_GATEWAY, POD_GATEWAY6};

/// How long a plugin may run before it is killed.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A plugin that exited non-zero. Reach it with `err.downcast_ref::<CniError>()`.
#[derive(Debug)]
pub struct CniError {
    pub command: String,
    pub exit_code: Option<i32>,
    /// The CNI error object the plugin printed (`{"cniVersion","code","msg","details"}`), if any.
    pub error: Option<Value>,
    pub stdout: String,
    pub stderr: String,
}

impl CniError {
    /// The CNI error code, if the plugin printed an error object.
    pub fn code(&self) -> Option<u64> {
        self.error.as_ref()?.get("code")?.as_u64()
    }

    pub fn msg(&self) -> Option<&str> {
        self.error.as_ref()?.get("msg")?.as_str()
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CNI {} failed (exit {:?})", self.command, self.exit_code)?;
        match &self.error {
            Some(e) => write!(f, ": {e}")?,
            None => write!(f, ": stdout {:?}", self.stdout.trim())?,
        }
        if !self.stderr.trim().is_empty() {
            write!(f, "; stderr: {}", self.stderr.trim())?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}

/// The CNI 1.0.0 result the previous (IPAM/main) plugin would have produced
/// for this pod.
pub fn prev_result(pod: &Pod) -> Value {
    json!({
        "cniVersion": "1.0.0",
        "interfaces": [{"name": "eth0", "sandbox": pod.netns_path}],
        "ips": [
            {"address": format!("{}/32", pod.ip), "interface": 0, "gateway": POD_GATEWAY.to_string()},
            {"address": format!("{}/128", pod.ip6), "interface": 0, "gateway": POD_GATEWAY6.to_string()},
        ],
        "routes": [
            {"dst": "0.0.0.0/0", "gw": POD_GATEWAY.to_string()},
            {"dst": "::/0", "gw": POD_GATEWAY6.to_string()},
        ],
    })
}

/// Invokes `plugin` with `command` (ADD, DEL, CHECK, VERSION) for `pod`,
/// inside `node`'s netns, with `netconf` on stdin (cniVersion defaults to
/// 1.0.0, name to "weft"; ADD and CHECK get a `prevResult` unless netconf
/// has one). Returns the parsed stdout (`Null` if empty), or a `CniError`.
pub fn invoke_cni(
    plugin: &Path,
    command: &str,
    pod: &Pod,
    node: &Node,
    netconf: &Value,
) -> Result<Value> {
    let mut conf = netconf.clone();
    let Some(obj) = conf.as_object_mut() else {
        bail!("CNI network config must be a JSON object, got {netconf}")
    };
    obj.entry("cniVersion").or_insert_with(|| json!("1.0.0"));
    obj.entry("name").or_insert_with(|| json!("weft"));
    if matches!(command, "ADD" | "CHECK") {
        obj.entry("prevResult").or_insert_with(|| prev_result(pod));
    }
    let stdin_bytes = serde_json::to_vec(&conf)?;
    let cni_path = plugin.parent().unwrap_or(Path::new("/"));
    let mut cmd = node.command_os(plugin);
    cmd.env_clear()
        .env(
            "PATH",
            std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into()),
        )
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.container_id)
        .env("CNI_NETNS", &pod.netns_path)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", cni_path)
        .env(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={};K8S_POD_UID={}",
                pod.namespace, pod.name, pod.container_id, pod.uid
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(v) = std::env::var_os("RUST_LOG") {
        cmd.env("RUST_LOG", v);
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting CNI plugin {}", plugin.display()))?;
    let mut stdin = child.stdin.take().context("plugin stdin")?;
    let writer = thread::spawn(move || stdin.write_all(&stdin_bytes));
    let mut stdout = child.stdout.take().context("plugin stdout")?;
    let mut stderr = child.stderr.take().context("plugin stderr")?;
    let out_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let deadline = Instant::now() + PLUGIN_TIMEOUT;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "CNI plugin {} {command} did not finish within {PLUGIN_TIMEOUT:?}",
                plugin.display()
            );
        }
        thread::sleep(Duration::from_millis(5));
    };
    // A plugin that exits without reading stdin makes this write fail; that is fine.
    let _ = writer.join();
    let stdout = out_reader.join().unwrap_or_default();
    let stderr = err_reader.join().unwrap_or_default();
    if !status.success() {
        return Err(CniError {
            command: command.to_owned(),
            exit_code: status.code(),
            error: serde_json::from_str(stdout.trim()).ok(),
            stdout,
            stderr,
        }
        .into());
    }
    if stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(stdout.trim()).with_context(|| {
        format!("CNI plugin {command} printed invalid JSON: {stdout:?} (stderr: {stderr})")
    })
}
