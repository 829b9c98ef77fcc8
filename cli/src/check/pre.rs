//! `weftctl check --pre`: before install. The API server's version, RBAC
//! to install the chart (SelfSubjectAccessReview), an existing Weft or
//! another mesh, NetworkPolicies in namespaces already labelled for
//! enrollment, and with `--local` this machine's kernel, cgroup v2 and
//! bpffs.

use std::path::Path;

use anyhow::Result;
use serde_json::json;

use super::cluster::{compatibility, crd, kubernetes, WEFT_CRDS};
use super::{node, progress, Check, Group, Report};
use crate::kube_api::Api;

/// (API group, resource) the chart creates.
const INSTALLS: &[(&str, &str)] = &[
    ("apiextensions.k8s.io", "customresourcedefinitions"),
    ("rbac.authorization.k8s.io", "clusterroles"),
    ("rbac.authorization.k8s.io", "clusterrolebindings"),
    ("", "namespaces"),
    ("", "serviceaccounts"),
    ("", "secrets"),
    ("", "configmaps"),
    ("", "services"),
    ("apps", "daemonsets"),
    ("apps", "deployments"),
    ("policy", "poddisruptionbudgets"),
];

/// CRDs that show another mesh is installed.
const OTHER_MESH_CRDS: &[(&str, &str)] = &[
    ("authorizationpolicies.security.istio.io", "Istio"),
    ("servers.policy.linkerd.io", "Linkerd"),
];

pub async fn run(
    api: Option<&Api>,
    local_bpf_dir: Option<&Path>,
    namespace: &str,
) -> Result<Report> {
    let mut report = Report::default();
    if let Some(api) = api {
        progress("Kubernetes API");
        let mut g = Group::new("Kubernetes API");
        let reachable = kubernetes(api, &mut g).await.is_some();
        report.add(g);
        if reachable {
            progress("RBAC");
            let mut g = Group::new("Permissions to install");
            for (group, resource) in INSTALLS {
                let review = json!({
                    "apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview",
                    "spec": {"resourceAttributes": {"verb": "create", "group": group, "resource": resource,
                        "namespace": if ["clusterroles", "clusterrolebindings", "customresourcedefinitions", "namespaces"].contains(resource) { "" } else { namespace }}},
                });
                let answer = api
                    .post(
                        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
                        &review,
                    )
                    .await?;
                let what = if group.is_empty() {
                    resource.to_string()
                } else {
                    format!("{resource}.{group}")
                };
                g.push(if answer["status"]["allowed"] == true {
                    Check::ok(format!("can create {what}"))
                } else {
                    Check::error(format!("can create {what}"), format!("not allowed{}", answer["status"]["reason"].as_str().map(|r| format!(": {r}")).unwrap_or_default()), "install as a cluster administrator (the chart creates cluster-wide RBAC and CRDs)")
                });
            }
            report.add(g);

            progress("existing installations");
            let mut g = Group::new("Existing installations");
            let mut present = 0;
            for (c, v) in WEFT_CRDS {
                if crd(api, c, v).await?.is_some() {
                    present += 1;
                }
            }
            g.push(if present == 0 {
                Check::ok("Weft is not installed yet")
            } else {
                Check::warn(
                    "Weft",
                    format!("{present} of Weft's CRDs already exist"),
                    "this is an upgrade: use `helm upgrade` and apply charts/weft/crds/ first",
                )
            });
            for (c, mesh) in OTHER_MESH_CRDS {
                if crd(api, c, "v1").await?.is_some() || crd(api, c, "v1beta1").await?.is_some() {
                    g.push(Check::warn(mesh.to_string(), format!("is installed (CRD {c})"), format!("do not enroll a namespace in both meshes; `weftctl check` names namespaces and pods {mesh} also captures")));
                }
            }
            report.add(g);
            let namespaces = api.list("/api/v1/namespaces").await?;
            let pods = api.list("/api/v1/pods").await?;
            let policies = api
                .list("/apis/networking.k8s.io/v1/networkpolicies")
                .await?;
            report.add(compatibility(&namespaces, &pods, &policies));
        }
    }
    if let Some(dir) = local_bpf_dir {
        progress("this node");
        let mut g = Group::new("This node");
        let facts = weft_dataplane::node::gather(dir);
        node::facts("this node", &facts, false, &mut g);
        report.add(g);
    }
    Ok(report)
}
