//! weft-cni: a chained CNI plugin. On ADD it hands the pod's network
//! namespace to the node's ztunnel and returns only once the ztunnel has
//! answered, so capture is in place before the app runs; DEL and CHECK are
//! forwarded the same way. It passes the previous plugin's result through
//! unchanged. Errors follow the CNI spec: a JSON error on stdout, exit 1.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::IpAddr;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};
use weft_api::cni::{CniCommand, CniRequest, CniResponse, DEFAULT_SOCKET};

const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// CNI well-known error codes.
const ERR_INCOMPATIBLE: u32 = 1;
const ERR_INVALID_ENV: u32 = 4;
const ERR_IO: u32 = 5;
const ERR_DECODE: u32 = 6;
const ERR_TRY_AGAIN: u32 = 11;
/// Plugin-specific: ztunnel refused the pod.
const ERR_ZTUNNEL: u32 = 100;

struct Failure {
    code: u32,
    msg: String,
    details: String,
}

fn fail(code: u32, msg: &str, details: impl ToString) -> Failure {
    Failure {
        code,
        msg: msg.to_owned(),
        details: details.to_string(),
    }
}

fn main() {
    let mut stdin = String::new();
    let _ = std::io::stdin().read_to_string(&mut stdin);
    let conf: Value = serde_json::from_str(&stdin).unwrap_or(Value::Null);
    let version = conf
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("1.0.0")
        .to_owned();
    match run(&conf, &version) {
        Ok(Some(out)) => {
            println!("{out}");
        }
        Ok(None) => {}
        Err(f) => {
            println!(
                "{}",
                json!({ "cniVersion": version, "code": f.code, "msg": f.msg, "details": f.details })
            );
            let _ = std::io::stdout().flush();
            std::process::exit(1);
        }
    }
}

fn env(name: &str) -> Result<String, Failure> {
    std::env::var(name).map_err(|_| fail(ERR_INVALID_ENV, "missing CNI environment variable", name))
}

fn run(conf: &Value, version: &str) -> Result<Option<String>, Failure> {
    let command = env("CNI_COMMAND")?;
    if command == "VERSION" {
        return Ok(Some(
            json!({ "cniVersion": version, "supportedVersions": SUPPORTED }).to_string(),
        ));
    }
    if conf.is_null() {
        return Err(fail(
            ERR_DECODE,
            "network configuration on stdin is not JSON",
            "",
        ));
    }
    if !SUPPORTED.contains(&version) {
        return Err(fail(ERR_INCOMPATIBLE, "unsupported cniVersion", version));
    }
    let cmd = match command.as_str() {
        "ADD" => CniCommand::Add,
        "DEL" => CniCommand::Del,
        "CHECK" => CniCommand::Check,
        "GC" | "STATUS" => return Ok(None),
        other => return Err(fail(ERR_INVALID_ENV, "unknown CNI_COMMAND", other)),
    };
    let prev = conf.get("prevResult").cloned();
    let passthrough = || -> Option<String> {
        match cmd {
            CniCommand::Add => Some(
                prev.clone()
                    .unwrap_or_else(|| json!({ "cniVersion": version }))
                    .to_string(),
            ),
            _ => None,
        }
    };
    let args = std::env::var("CNI_ARGS").unwrap_or_default();
    let (Some(ns), Some(name)) = (
        cni_arg(&args, "K8S_POD_NAMESPACE"),
        cni_arg(&args, "K8S_POD_NAME"),
    ) else {
        // Not a Kubernetes pod: nothing for the mesh to do.
        return Ok(passthrough());
    };
    let netns = if cmd == CniCommand::Del {
        std::env::var("CNI_NETNS").unwrap_or_default()
    } else {
        env("CNI_NETNS")?
    };
    let req = CniRequest {
        command: cmd,
        container_id: env("CNI_CONTAINERID")?,
        netns,
        pod_namespace: ns,
        pod_name: name,
        ips: prev.as_ref().map(ips_of).unwrap_or_default(),
    };
    let socket = conf
        .get("ztunnel_socket")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_SOCKET);
    let timeout = Duration::from_secs(
        conf.get("timeout_seconds")
            .and_then(Value::as_u64)
            .unwrap_or(30),
    );
    match ask_ztunnel(socket, &req, timeout) {
        Ok(resp) if resp.ok => Ok(passthrough()),
        Ok(resp) => Err(fail(
            ERR_ZTUNNEL,
            "weft ztunnel refused the pod",
            resp.error.unwrap_or_default(),
        )),
        // A pod being deleted must not get stuck because the ztunnel is
        // away; a restarted ztunnel forgets pods whose netns is gone.
        Err(_) if cmd == CniCommand::Del => Ok(None),
        Err(e) => Err(e),
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

fn cni_arg(args: &str, key: &str) -> Option<String> {
    args.split(';').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key && !v.is_empty()).then(|| v.to_owned())
    })
}

/// Addresses from a CNI result (`ips[].address`, CIDR form).
fn ips_of(result: &Value) -> Vec<IpAddr> {
    result
        .get("ips")
        .and_then(Value::as_array)
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip.get("address")?.as_str())
                .filter_map(|a| a.split('/').next()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_cni_args_and_result_ips() {
        let a = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1";
        assert_eq!(cni_arg(a, "K8S_POD_NAMESPACE").as_deref(), Some("shop"));
        assert_eq!(cni_arg(a, "K8S_POD_NAME").as_deref(), Some("web-1"));
        assert_eq!(cni_arg(a, "K8S_POD_UID"), None);
        let r = json!({"ips": [{"address": "10.1.0.5/32"}, {"address": "fd00::5/128"}, {"address": "bogus"}]});
        assert_eq!(
            ips_of(&r),
            vec![
                "10.1.0.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
    }
}
