//! The CNI plugin proper. On ADD it decides whether the pod belongs in the
//! mesh without needing the controller or the ztunnel: the host's network
//! namespace and the namespaces named in `exclude_namespaces` never do;
//! otherwise the pod's namespace and labels, read from the Kubernetes API
//! with the kubeconfig the installer wrote, say. A pod that stays out
//! passes at once, whatever state the ztunnel is in (the ztunnel still
//! hears of it, or finds its record later, so it can be enrolled live if
//! its namespace is labelled). A pod that belongs in the mesh is handed to
//! the ztunnel and ADD returns only once the ztunnel has captured it;
//! until then the answer is "try again" (code 11) and the runtime retries,
//! so it never starts uncaptured. DEL always succeeds; CHECK asks the
//! ztunnel, which looks at the kernel. The previous plugin's result passes
//! through unchanged. Errors follow the CNI spec: a JSON error on stdout,
//! exit 1.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use weft_api::cni::{CniCommand, CniRequest, CniResponse, PodRecord};
use weft_ztunnel::cni_plugin::{
    fail, parse, Failure, Invocation, Settings, ERR_IO, ERR_TRY_AGAIN, ERR_ZTUNNEL,
};

use crate::kube;

/// How long a pod that stays out of the mesh waits for the ztunnel to take
/// note of it: it passes either way.
const NOTE_TIMEOUT: Duration = Duration::from_secs(2);

pub fn main() -> ExitCode {
    let mut stdin = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let (version, invocation) = parse(&stdin, &|k| std::env::var(k).ok());
    match invocation.and_then(run) {
        Ok(Some(out)) => {
            println!("{out}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(f) => {
            println!("{}", f.to_json(&version));
            let _ = std::io::stdout().flush();
            ExitCode::FAILURE
        }
    }
}

fn run(invocation: Invocation) -> Result<Option<String>, Failure> {
    let (settings, req, passthrough) = match invocation {
        Invocation::Done(out) => return Ok(out),
        Invocation::Pod(p) => (p.settings, p.req, p.passthrough),
    };
    if is_host_netns(&req.netns) {
        return Ok(passthrough);
    }
    match req.command {
        CniCommand::Add => add(&settings, &req).map(|()| passthrough),
        CniCommand::Del => {
            delete(&settings, &req);
            Ok(None)
        }
        CniCommand::Check => check(&settings, &req).map(|()| None),
    }
}

/// Whether the pod belongs in the mesh, per the Kubernetes API; `None`
/// when that cannot be known now (no kubeconfig, API unreachable).
fn belongs(settings: &Settings, req: &CniRequest) -> Option<bool> {
    let path = settings.kubeconfig.as_ref()?;
    match kube::belongs_in_mesh(path, &req.pod_namespace, &req.pod_name) {
        Ok(b) => Some(b),
        Err(e) => {
            eprintln!(
                "weft-cni: cannot tell from the Kubernetes API whether {}/{} is enrolled ({e}); asking the ztunnel",
                req.pod_namespace, req.pod_name
            );
            None
        }
    }
}

fn add(settings: &Settings, req: &CniRequest) -> Result<(), Failure> {
    let belongs = belongs(settings, req);
    if belongs == Some(false) {
        // Never held up: the ztunnel only takes note (so a label added
        // later enrolls the running pod), and if it is away the record
        // waits for it.
        if ask_ztunnel(&settings.socket, req, NOTE_TIMEOUT).is_err() {
            leave_record(settings, req);
        }
        return Ok(());
    }
    let waiting = |why: &str| {
        fail(
            ERR_TRY_AGAIN,
            "the pod waits for the weft ztunnel to capture its traffic",
            why,
        )
    };
    match ask_ztunnel(&settings.socket, req, settings.timeout)? {
        resp if resp.ok && resp.enrolled => Ok(()),
        resp if resp.ok && !resp.has_model => Err(waiting(
            "the ztunnel has no mesh model from the controller yet",
        )),
        resp if resp.ok => match belongs {
            Some(_) => Err(waiting(
                "its namespace is enrolled, but the ztunnel's mesh model does not capture the pod yet",
            )),
            // Without the API, the model the ztunnel holds decides.
            None => Ok(()),
        },
        resp => Err(fail(
            ERR_ZTUNNEL,
            "weft ztunnel refused the pod",
            resp.error.unwrap_or_default(),
        )),
    }
}

/// A pod being deleted must never get stuck: with the ztunnel away, its
/// record (if any) goes, and a restarted ztunnel forgets pods whose netns
/// is gone anyway.
fn delete(settings: &Settings, req: &CniRequest) {
    match ask_ztunnel(&settings.socket, req, settings.timeout) {
        Ok(_) => {}
        Err(_) => {
            if let Some(path) = record_path(settings, req) {
                let _ = std::fs::remove_file(path);
            }
        }
    }
}

fn check(settings: &Settings, req: &CniRequest) -> Result<(), Failure> {
    let belongs = belongs(settings, req);
    if belongs == Some(false) {
        return Ok(());
    }
    let resp = ask_ztunnel(&settings.socket, req, settings.timeout)?;
    if !resp.ok {
        let code = if resp.has_model {
            ERR_ZTUNNEL
        } else {
            ERR_TRY_AGAIN
        };
        return Err(fail(
            code,
            "weft ztunnel reports the pod's capture is not as it should be",
            resp.error.unwrap_or_default(),
        ));
    }
    if belongs == Some(true) && !resp.enrolled {
        return Err(fail(
            ERR_ZTUNNEL,
            "the pod belongs in the mesh but is not captured",
            format!("{}/{}", req.pod_namespace, req.pod_name),
        ));
    }
    Ok(())
}

/// `<state_dir>/pods/<ns>__<name>.json`, from names already checked.
fn record_path(settings: &Settings, req: &CniRequest) -> Option<PathBuf> {
    let dir = settings.state_dir.as_ref()?;
    let file = weft_api::cni::record_file_name(&req.pod_namespace, &req.pod_name).ok()?;
    Some(dir.join("pods").join(file))
}

/// Leaves the pod's record where the next ztunnel reads its pods from.
fn leave_record(settings: &Settings, req: &CniRequest) {
    let Some(path) = record_path(settings, req) else {
        return;
    };
    let record = PodRecord {
        namespace: req.pod_namespace.clone(),
        name: req.pod_name.clone(),
        container_id: req.container_id.clone(),
        netns: PathBuf::from(&req.netns),
        ips: req.ips.clone(),
    };
    let written = path
        .parent()
        .map(std::fs::create_dir_all)
        .transpose()
        .map_err(|e| e.to_string())
        .and_then(|_| serde_json::to_vec(&record).map_err(|e| e.to_string()))
        .and_then(|bytes| {
            weft_pki::files::write_atomic(&path, &bytes, 0o600).map_err(|e| e.to_string())
        });
    if let Err(e) = written {
        eprintln!(
            "weft-cni: could not leave {} for the ztunnel: {e}",
            path.display()
        );
    }
}

/// A hostNetwork pod's sandbox is the node's own network namespace (the
/// one the runtime runs the plugin in): nothing to capture there.
fn is_host_netns(netns: &str) -> bool {
    let id = |p: &Path| std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino()));
    match (id(Path::new(netns)), id(Path::new("/proc/self/ns/net"))) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    }
}

fn ask_ztunnel(socket: &str, req: &CniRequest, timeout: Duration) -> Result<CniResponse, Failure> {
    let mut stream = UnixStream::connect(socket).map_err(|e| {
        fail(
            ERR_TRY_AGAIN,
            "weft ztunnel is not reachable on this node (is the weft-ztunnel DaemonSet running?)",
            format!("{socket}: {e}"),
        )
    })?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let mut line = serde_json::to_vec(req).map_err(|e| fail(ERR_IO, "encoding request", e))?;
    line.push(b'\n');
    stream
        .write_all(&line)
        .map_err(|e| fail(ERR_TRY_AGAIN, "sending to weft ztunnel", e))?;
    let mut reply = String::new();
    BufReader::new(stream)
        .read_line(&mut reply)
        .map_err(|e| fail(ERR_TRY_AGAIN, "no answer from weft ztunnel", e))?;
    serde_json::from_str(reply.trim())
        .map_err(|e| fail(ERR_IO, "weft ztunnel sent a malformed answer", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plugins_own_netns_is_the_hosts() {
        assert!(is_host_netns("/proc/self/ns/net"));
        assert!(!is_host_netns("/nonexistent/netns"));
    }
}
