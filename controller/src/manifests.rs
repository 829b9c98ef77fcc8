//! The embedded mode: the cluster state read from a folder of Kubernetes
//! manifests (as `kubectl get -o yaml` would show the objects, pods with
//! `spec.nodeName` and `status.podIPs`) instead of an API server, fed
//! through the same `model::build`. Used by the demo and the tests.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file under the folder is read
//! (multi-document; a `kind: List` is unpacked). A malformed file or
//! document is reported (file, document index, error) and skipped; the rest
//! still applies. The folder is polled every 200 ms so edits apply live.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use serde::de::DeserializeOwned;
use tokio::sync::watch;
use weft_api::MeshModel;

use crate::model::{self, BuildOutput, ClusterState, GatewayApiOutput, PolicyStatus};

/// How often the folder is checked for changes.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// Reads the folder once and builds the model. Problems with files and
/// documents come first in `problems`, then the builder's own.
pub fn load(dir: &Path, trust_domain: &str) -> BuildOutput {
    let (state, mut problems) = read_dir(dir);
    let mut out = model::build(&state, trust_domain);
    problems.append(&mut out.problems);
    out.problems = problems;
    out
}

/// Watches `dir` and publishes the model, the policy status and the
/// Gateway API status (each only when it changed). Runs until every
/// receiver is gone.
pub async fn run(
    dir: PathBuf,
    trust_domain: String,
    out: watch::Sender<Arc<MeshModel>>,
    status: watch::Sender<Arc<Vec<PolicyStatus>>>,
    gateway_api: watch::Sender<Arc<GatewayApiOutput>>,
) -> anyhow::Result<()> {
    let mut last_seen: Option<Vec<(PathBuf, Option<SystemTime>, u64)>> = None;
    let mut last_problems: Vec<String> = Vec::new();
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if out.is_closed() && status.is_closed() && gateway_api.is_closed() {
            return Ok(());
        }
        let seen = fingerprint(&dir);
        if last_seen.as_ref() == Some(&seen) {
            continue;
        }
        last_seen = Some(seen);
        let built = load(&dir, &trust_domain);
        if built.problems != last_problems {
            for p in &built.problems {
                tracing::warn!(component = "manifests", dir = %dir.display(), problem = %p, "manifest problem");
            }
            last_problems = built.problems.clone();
        }
        built.publish(&out, &status, &gateway_api);
    }
}

fn manifest_files(dir: &Path, out: &mut Vec<PathBuf>, problems: &mut Vec<String>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            problems.push(format!("{}: cannot read the folder: {e}", dir.display()));
            return;
        }
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let hidden = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_none_or(|n| n.starts_with('.'));
        if hidden {
            continue; // editors' swap files, `..data` links of mounted ConfigMaps
        }
        if path.is_dir() {
            manifest_files(&path, out, problems);
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push(path);
        }
    }
}

fn fingerprint(dir: &Path) -> Vec<(PathBuf, Option<SystemTime>, u64)> {
    let mut files = Vec::new();
    manifest_files(dir, &mut files, &mut Vec::new());
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let md = std::fs::metadata(&p).ok();
            let mtime = md.as_ref().and_then(|m| m.modified().ok());
            let len = md.map(|m| m.len()).unwrap_or(0);
            (p, mtime, len)
        })
        .collect()
}

/// Reads every manifest under `dir` into a cluster state.
pub fn read_dir(dir: &Path) -> (ClusterState, Vec<String>) {
    let mut problems = Vec::new();
    let mut files = Vec::new();
    manifest_files(dir, &mut files, &mut problems);
    files.sort();
    let mut state = ClusterState::default();
    for file in files {
        let shown = file
            .strip_prefix(dir)
            .unwrap_or(&file)
            .display()
            .to_string();
        match std::fs::read_to_string(&file) {
            Ok(text) => read_text(&shown, &text, &mut state, &mut problems),
            Err(e) => problems.push(format!("{shown}: cannot read: {e}")),
        }
    }
    (state, problems)
}

/// Splits a YAML stream at `---` lines, so a syntax error in one document
/// does not hide the others.
fn split_documents(text: &str) -> Vec<String> {
    let mut docs = vec![String::new()];
    for line in text.lines() {
        let t = line.trim_end();
        if t == "---" || t.starts_with("--- ") {
            docs.push(t.trim_start_matches("---").trim_start().to_owned() + "\n");
        } else if t == "..." {
            docs.push(String::new());
        } else if let Some(d) = docs.last_mut() {
            d.push_str(line);
            d.push('\n');
        }
    }
    docs
}

/// Adds every object of one manifest file's text (`file` names it in
/// problems) to `state`; malformed documents are reported and skipped.
pub fn read_text(file: &str, text: &str, state: &mut ClusterState, problems: &mut Vec<String>) {
    let mut index = 0;
    for doc in split_documents(text) {
        if doc.lines().all(|l| {
            let l = l.trim();
            l.is_empty() || l.starts_with('#')
        }) {
            continue;
        }
        let at = format!("{file}: document {index}");
        index += 1;
        match serde_yaml::from_str::<serde_yaml::Value>(&doc) {
            Ok(v) => add_object(&at, v, state, problems),
            Err(e) => problems.push(format!("{at}: not valid YAML: {e}")),
        }
    }
}

fn add_object(
    at: &str,
    v: serde_yaml::Value,
    state: &mut ClusterState,
    problems: &mut Vec<String>,
) {
    if v.is_null() {
        return;
    }
    let api_version = v
        .get("apiVersion")
        .and_then(|x| x.as_str())
        .unwrap_or("")
        .to_owned();
    let kind = v
        .get("kind")
        .and_then(|x| x.as_str())
        .unwrap_or("")
        .to_owned();
    let name = v
        .get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(|x| x.as_str())
        .unwrap_or("")
        .to_owned();
    let at = format!("{at} ({kind} {name:?})");
    fn push<K>(
        at: &str,
        v: serde_yaml::Value,
        into: &mut Vec<Arc<K>>,
        problems: &mut Vec<String>,
        namespaced: bool,
    ) where
        K: DeserializeOwned + kube::Resource,
        K::DynamicType: Default,
    {
        match serde_yaml::from_value::<K>(v) {
            Ok(mut obj) => {
                if obj.meta().name.as_deref().unwrap_or("").is_empty() {
                    problems.push(format!("{at}: metadata.name is missing"));
                    return;
                }
                if namespaced && obj.meta().namespace.is_none() {
                    // As `kubectl apply` without `-n` would.
                    obj.meta_mut().namespace = Some("default".to_owned());
                }
                into.push(Arc::new(obj));
            }
            Err(e) => problems.push(format!(
                "{at}: does not match the {} schema: {e}",
                K::kind(&Default::default())
            )),
        }
    }
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = v.get("items").and_then(|i| i.as_sequence()).cloned().unwrap_or_default();
            for (i, item) in items.into_iter().enumerate() {
                add_object(&format!("{at} item {i}"), item, state, problems);
            }
        }
        ("v1", "Namespace") => push(&at, v, &mut state.namespaces, problems, false),
        ("v1", "Pod") => push(&at, v, &mut state.pods, problems, true),
        ("v1", "Service") => push(&at, v, &mut state.services, problems, true),
        ("v1", "ServiceAccount") => push(&at, v, &mut state.service_accounts, problems, true),
        ("discovery.k8s.io/v1", "EndpointSlice") => push(&at, v, &mut state.endpoint_slices, problems, true),
        ("weft.dev/v1alpha1", "AuthorizationPolicy") => {
            push(&at, v, &mut state.authorization_policies, problems, true)
        }
        ("weft.dev/v1alpha1", "PeerAuthentication") => {
            push(&at, v, &mut state.peer_authentications, problems, true)
        }
        ("weft.dev/v1alpha1", "TrafficPolicy") => {
            push(&at, v, &mut state.traffic_policies, problems, true)
        }
        ("gateway.networking.k8s.io/v1", "Gateway") => push(&at, v, &mut state.gateways, problems, true),
        ("gateway.networking.k8s.io/v1", "HTTPRoute") => push(&at, v, &mut state.http_routes, problems, true),
        ("gateway.networking.k8s.io/v1", "GRPCRoute") => push(&at, v, &mut state.grpc_routes, problems, true),
        (av, k @ ("Gateway" | "HTTPRoute" | "GRPCRoute")) if av.starts_with("gateway.networking.k8s.io/") => {
            problems.push(format!(
                "{at}: {av} {k} is not read; use gateway.networking.k8s.io/v1"
            ))
        }
        ("", _) | (_, "") => problems.push(format!("{at}: apiVersion and kind are required")),
        (av, k) if av.starts_with("weft.dev/") => problems.push(format!(
            "{at}: unknown Weft resource {av} {k} (known: weft.dev/v1alpha1 AuthorizationPolicy, PeerAuthentication, TrafficPolicy)"
        )),
        (av, k) => tracing::debug!(component = "manifests", api_version = av, kind = k, at = %at, "kind not used by the mesh; ignored"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_documents_and_keeps_indexes() {
        let docs = split_documents("a: 1\n---\nb: 2\n--- \n\n---\nc: [\n");
        assert_eq!(docs.len(), 4);
        let mut st = ClusterState::default();
        let mut problems = Vec::new();
        read_text(
            "f.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: [\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n",
            &mut st,
            &mut problems,
        );
        assert_eq!(st.namespaces.len(), 2);
        assert_eq!(problems.len(), 1);
        assert!(
            problems[0].starts_with("f.yaml: document 1"),
            "{problems:?}"
        );
    }
}
