//! The protocol between the `weft-cni` plugin and the node's ztunnel: one
//! JSON line each way over a unix socket. The plugin returns to the runtime
//! only after the ztunnel answers, so capture is in place before the pod's
//! app runs. Also what both ends keep on the node: the pod record the
//! ztunnel remembers pods by (and the plugin leaves for it while it is
//! away), and the name rules that make those records safe file names.

use std::net::IpAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Default path of the ztunnel's CNI socket on a node.
pub const DEFAULT_SOCKET: &str = "/var/run/weft/cni.sock";
/// Default state directory of the ztunnel on a node; pod records live in
/// its `pods/` folder.
pub const DEFAULT_STATE_DIR: &str = "/var/run/weft/ztunnel";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum CniCommand {
    Add,
    Del,
    Check,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniRequest {
    pub command: CniCommand,
    pub container_id: String,
    /// Path of the pod's network namespace (CNI_NETNS).
    pub netns: String,
    pub pod_namespace: String,
    pub pod_name: String,
    /// The pod's addresses, from the previous plugin's result.
    #[serde(default)]
    pub ips: Vec<IpAddr>,
}

impl CniRequest {
    /// The namespace and pod name as Kubernetes would accept them.
    pub fn check_names(&self) -> Result<(), NameError> {
        check_namespace(&self.pod_namespace)?;
        check_pod_name(&self.pod_name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CniResponse {
    pub ok: bool,
    /// Whether the pod's traffic is captured now.
    #[serde(default)]
    pub enrolled: bool,
    /// Whether the ztunnel holds a mesh model. Without one, `enrolled:
    /// false` means "not yet", not "this pod stays out of the mesh".
    #[serde(default)]
    pub has_model: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the node remembers about a pod handed over by the CNI plugin, as
/// `<state dir>/pods/<namespace>__<name>.json`: written by the ztunnel at
/// ADD, or by the plugin when the ztunnel is away, so the next ztunnel
/// finds the pod without touching it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    pub namespace: String,
    pub name: String,
    pub container_id: String,
    pub netns: PathBuf,
    pub ips: Vec<IpAddr>,
}

impl PodRecord {
    /// "namespace/name".
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// This record's file name inside `pods/`.
    pub fn file_name(&self) -> Result<String, NameError> {
        record_file_name(&self.namespace, &self.name)
    }
}

/// `<namespace>__<name>.json`, for names that pass [`check_namespace`] and
/// [`check_pod_name`] only: neither can hold `/`, `_` or a `..` component,
/// so the result is one plain file name and no two pods share it.
pub fn record_file_name(namespace: &str, name: &str) -> Result<String, NameError> {
    check_namespace(namespace)?;
    check_pod_name(name)?;
    Ok(format!("{namespace}__{name}.json"))
}

/// A namespace or pod name Kubernetes would refuse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{what} {value:?} is not a valid Kubernetes name: {why}")]
pub struct NameError {
    pub what: &'static str,
    pub value: String,
    pub why: &'static str,
}

/// A namespace name: an RFC 1123 label (at most 63 characters of `a-z`,
/// `0-9` and `-`, starting and ending with a letter or digit), as the API
/// server validates it.
pub fn check_namespace(s: &str) -> Result<(), NameError> {
    dns1123_label(s).map_err(|why| NameError {
        what: "namespace",
        value: s.to_owned(),
        why,
    })
}

/// A pod name: an RFC 1123 subdomain (at most 253 characters, dot-separated
/// labels of `a-z`, `0-9` and `-`, each starting and ending with a letter or
/// digit), as the API server validates it.
pub fn check_pod_name(s: &str) -> Result<(), NameError> {
    let err = |why| NameError {
        what: "pod name",
        value: s.to_owned(),
        why,
    };
    if s.len() > 253 {
        return Err(err("longer than 253 characters"));
    }
    for label in s.split('.') {
        label_chars(label).map_err(err)?;
    }
    Ok(())
}

fn dns1123_label(s: &str) -> Result<(), &'static str> {
    if s.len() > 63 {
        return Err("longer than 63 characters");
    }
    if s.contains('.') {
        return Err("contains '.'");
    }
    label_chars(s)
}

fn label_chars(s: &str) -> Result<(), &'static str> {
    let b = s.as_bytes();
    let (Some(first), Some(last)) = (b.first(), b.last()) else {
        return Err("empty (or an empty dot-separated part)");
    };
    if !b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    {
        return Err("only lowercase letters, digits, '-' and '.' are allowed");
    }
    if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_kubernetes_rules() {
        for ok in ["shop", "a", "kube-system", "x1", &"a".repeat(63)] {
            assert!(check_namespace(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "..",
            "../../..",
            "a/b",
            "Shop",
            "-a",
            "a-",
            "a.b",
            "a_b",
            "a b",
            "a\0",
            "é",
            &"a".repeat(64),
        ] {
            assert!(check_namespace(bad).is_err(), "{bad:?}");
        }
        for ok in ["web-1", "web.v1.abc", "x", &format!("{}.b", "a".repeat(63))] {
            assert!(check_pod_name(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            "a..b",
            ".a",
            "a.",
            "a/b",
            "A",
            "a_b",
            &"a".repeat(254),
        ] {
            assert!(check_pod_name(bad).is_err(), "{bad:?}");
        }
        let e = check_namespace("../../..").unwrap_err().to_string();
        assert!(e.contains("namespace \"../../..\""), "{e}");
    }

    #[test]
    fn record_file_names_are_plain_and_distinct() {
        assert_eq!(
            record_file_name("shop", "web-1").unwrap(),
            "shop__web-1.json"
        );
        assert!(record_file_name("../../..", "x").is_err());
        assert!(record_file_name("shop", "../x").is_err());
        // `_` is in neither alphabet, so the separator cannot be forged.
        assert!(record_file_name("a__b", "c").is_err());
    }

    #[test]
    fn old_answers_without_has_model_still_parse() {
        let r: CniResponse = serde_json::from_str(r#"{"ok":true,"enrolled":true}"#).unwrap();
        assert!(r.ok && r.enrolled && !r.has_model);
    }
}
