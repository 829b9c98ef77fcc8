//! What one invocation of the `weft-cni` plugin asks, read from its stdin
//! (the network configuration) and its environment (`CNI_COMMAND`,
//! `CNI_ARGS`, `CNI_NETNS`, `CNI_CONTAINERID`), with no I/O: the plugin
//! binary (`src/bin/weft-cni/plugin.rs`) acts on the answer, and the fuzz
//! target `cni` feeds it arbitrary input. Names that reach a
//! [`CniRequest`] passed the Kubernetes rules, so they are safe in paths.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use weft_api::cni::{check_namespace, check_pod_name, CniCommand, CniRequest, DEFAULT_SOCKET};

/// The CNI versions the plugin speaks.
pub const SUPPORTED: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// CNI well-known error codes.
pub const ERR_INCOMPATIBLE: u32 = 1;
pub const ERR_INVALID_ENV: u32 = 4;
pub const ERR_IO: u32 = 5;
pub const ERR_DECODE: u32 = 6;
pub const ERR_TRY_AGAIN: u32 = 11;
/// Plugin-specific: ztunnel refused the pod, or its capture is not right.
pub const ERR_ZTUNNEL: u32 = 100;

/// A CNI error: code, message and details, printed as the spec says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

pub fn fail(code: u32, msg: &str, details: impl ToString) -> Failure {
    Failure {
        code,
        msg: msg.to_owned(),
        details: details.to_string(),
    }
}

impl Failure {
    /// The JSON error the runtime reads on stdout.
    pub fn to_json(&self, version: &str) -> String {
        json!({ "cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details })
            .to_string()
    }
}

/// The plugin's part of the network configuration (the chained entry the
/// installer writes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    pub socket: String,
    pub timeout: Duration,
    pub state_dir: Option<PathBuf>,
    pub kubeconfig: Option<PathBuf>,
    pub exclude: Vec<String>,
}

impl Settings {
    pub fn from(conf: &Value) -> Self {
        let path = |k: &str| conf.get(k).and_then(Value::as_str).map(PathBuf::from);
        Settings {
            socket: conf
                .get("ztunnel_socket")
                .and_then(Value::as_str)
                .unwrap_or(DEFAULT_SOCKET)
                .to_owned(),
            timeout: Duration::from_secs(
                conf.get("timeout_seconds")
                    .and_then(Value::as_u64)
                    .unwrap_or(30)
                    .min(600),
            ),
            state_dir: path("state_dir"),
            kubeconfig: path("kubeconfig"),
            exclude: conf
                .get("exclude_namespaces")
                .and_then(Value::as_array)
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

/// What the invocation asks of the plugin.
#[derive(Debug, Clone, PartialEq)]
pub enum Invocation {
    /// Print this and succeed (VERSION, the previous result passed through,
    /// or nothing for a DEL, GC or STATUS with nothing of ours to do).
    Done(Option<String>),
    /// A Kubernetes pod of a namespace not excluded: the plugin decides
    /// with the API and the ztunnel. On ADD, `passthrough` is printed on
    /// success.
    Pod(Box<PodInvocation>),
}

/// A pod's ADD, DEL or CHECK for the plugin to carry out.
#[derive(Debug, Clone, PartialEq)]
pub struct PodInvocation {
    pub settings: Settings,
    pub req: CniRequest,
    /// What ADD prints on success (the previous plugin's result).
    pub passthrough: Option<String>,
}

/// The version to answer in (the configuration's, else 1.0.0) and what the
/// invocation asks. `env` reads the plugin's environment.
pub fn parse(
    stdin: &[u8],
    env: &dyn Fn(&str) -> Option<String>,
) -> (String, Result<Invocation, Failure>) {
    let conf: Value = serde_json::from_slice(stdin).unwrap_or(Value::Null);
    let version = conf
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("1.0.0")
        .to_owned();
    let result = decide(&conf, &version, env);
    (version, result)
}

fn decide(
    conf: &Value,
    version: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Invocation, Failure> {
    let required = |name: &str| {
        env(name).ok_or_else(|| fail(ERR_INVALID_ENV, "missing CNI environment variable", name))
    };
    let command = required("CNI_COMMAND")?;
    if command == "VERSION" {
        return Ok(Invocation::Done(Some(
            json!({ "cniVersion": version, "supportedVersions": SUPPORTED }).to_string(),
        )));
    }
    if !conf.is_object() {
        return Err(fail(
            ERR_DECODE,
            "network configuration on stdin is not a JSON object",
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
        "GC" | "STATUS" => return Ok(Invocation::Done(None)),
        other => return Err(fail(ERR_INVALID_ENV, "unknown CNI_COMMAND", other)),
    };
    let prev = conf.get("prevResult").cloned();
    let passthrough = match cmd {
        CniCommand::Add => Some(
            prev.clone()
                .unwrap_or_else(|| json!({ "cniVersion": version }))
                .to_string(),
        ),
        _ => None,
    };
    let args = env("CNI_ARGS").unwrap_or_default();
    let (Some(ns), Some(name)) = (
        cni_arg(&args, "K8S_POD_NAMESPACE"),
        cni_arg(&args, "K8S_POD_NAME"),
    ) else {
        // Not a Kubernetes pod: nothing for the mesh to do.
        return Ok(Invocation::Done(passthrough));
    };
    // Names become file names on the node: only what Kubernetes accepts.
    // A DEL of something that cannot be a pod of ours has nothing to undo.
    if let Err(e) = check_namespace(&ns).and_then(|_| check_pod_name(&name)) {
        if cmd == CniCommand::Del {
            return Ok(Invocation::Done(None));
        }
        return Err(fail(ERR_INVALID_ENV, "invalid pod name in CNI_ARGS", e));
    }
    let settings = Settings::from(conf);
    let netns = if cmd == CniCommand::Del {
        env("CNI_NETNS").unwrap_or_default()
    } else {
        required("CNI_NETNS")?
    };
    if settings.exclude.contains(&ns) {
        return Ok(Invocation::Done(passthrough));
    }
    let req = CniRequest {
        command: cmd,
        container_id: required("CNI_CONTAINERID")?,
        netns,
        pod_namespace: ns,
        pod_name: name,
        ips: prev.as_ref().map(ips_of).unwrap_or_default(),
    };
    Ok(Invocation::Pod(Box::new(PodInvocation {
        settings,
        req,
        passthrough,
    })))
}

/// One `KEY=value` of `CNI_ARGS` (`;`-separated); an empty value is none.
pub fn cni_arg(args: &str, key: &str) -> Option<String> {
    args.split(';').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key && !v.is_empty()).then(|| v.to_owned())
    })
}

/// Addresses from a CNI result (`ips[].address`, CIDR form).
pub fn ips_of(result: &Value) -> Vec<IpAddr> {
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

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| (*v).to_owned())
        }
    }

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

    #[test]
    fn invocations_from_stdin_and_environment() {
        let conf = br#"{"cniVersion":"1.0.0","name":"k8s","type":"weft-cni","exclude_namespaces":["kube-system"],
            "prevResult":{"cniVersion":"1.0.0","ips":[{"address":"10.1.0.5/24"}]}}"#;
        let vars = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_CONTAINERID", "abc"),
        ];
        let (version, r) = parse(conf, &env(&vars));
        assert_eq!(version, "1.0.0");
        match r.unwrap() {
            Invocation::Pod(p) => {
                assert_eq!(p.req.pod_namespace, "shop");
                assert_eq!(p.req.ips, ["10.1.0.5".parse::<IpAddr>().unwrap()]);
                assert!(p.passthrough.unwrap().contains("10.1.0.5/24"));
            }
            other => panic!("{other:?}"),
        }
        // A namespace Kubernetes would refuse never reaches a path.
        let bad = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=../../..;K8S_POD_NAME=x"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_CONTAINERID", "abc"),
        ];
        let (_, r) = parse(conf, &env(&bad));
        assert_eq!(r.unwrap_err().code, ERR_INVALID_ENV);
        // ... and its DEL has nothing to undo.
        let del = [("CNI_COMMAND", "DEL"), bad[1]];
        assert_eq!(parse(conf, &env(&del)).1.unwrap(), Invocation::Done(None));
        // Excluded namespaces pass the previous result through.
        let ks = [
            ("CNI_COMMAND", "ADD"),
            ("CNI_ARGS", "K8S_POD_NAMESPACE=kube-system;K8S_POD_NAME=dns"),
            ("CNI_NETNS", "/run/netns/x"),
            ("CNI_CONTAINERID", "abc"),
        ];
        assert!(matches!(
            parse(conf, &env(&ks)).1.unwrap(),
            Invocation::Done(Some(_))
        ));
        // Not JSON, no command, an unknown version.
        assert_eq!(parse(b"{", &env(&vars)).1.unwrap_err().code, ERR_DECODE);
        assert_eq!(parse(conf, &env(&[])).1.unwrap_err().code, ERR_INVALID_ENV);
        let old = br#"{"cniVersion":"0.1.0"}"#;
        assert_eq!(
            parse(old, &env(&vars)).1.unwrap_err().code,
            ERR_INCOMPATIBLE
        );
    }
}
