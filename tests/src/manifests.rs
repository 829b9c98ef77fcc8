//! Renders a mesh model as the Kubernetes objects a cluster would hold
//! (Namespaces, Pods with their status, Services, weft.dev policies), so the
//! same test scenario can drive the controller through its manifest folder.

use serde_json::{json, Value};
use weft_api::model::{MtlsMode, PolicyAction};
use weft_api::MeshModel;

pub fn render(model: &MeshModel) -> anyhow::Result<String> {
    let mut docs: Vec<Value> = Vec::new();
    for ns in &model.namespaces {
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": ns.name, "labels": ns.labels },
        }));
    }
    for w in &model.workloads {
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": { "name": w.name, "namespace": w.namespace, "uid": w.uid, "labels": w.labels },
            "spec": {
                "nodeName": w.node,
                "serviceAccountName": w.service_account,
                "containers": [{ "name": "app", "image": "app" }],
            },
            "status": {
                "phase": "Running",
                "podIP": w.ips.first().map(|i| i.to_string()),
                "podIPs": w.ips.iter().map(|i| json!({ "ip": i.to_string() })).collect::<Vec<_>>(),
            },
        }));
    }
    for s in &model.services {
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": { "name": s.name, "namespace": s.namespace },
            "spec": {
                "clusterIP": s.vips.first().map(|i| i.to_string()),
                "clusterIPs": s.vips.iter().map(|i| i.to_string()).collect::<Vec<_>>(),
                "selector": s.selector,
                "ports": s.ports.iter().map(|p| json!({
                    "name": format!("p{}", p.port),
                    "port": p.port,
                    "targetPort": p.target(),
                    "protocol": "TCP",
                })).collect::<Vec<_>>(),
            },
        }));
    }
    for p in &model.policies {
        let mut spec = json!({
            "action": match p.action { PolicyAction::Allow => "ALLOW", PolicyAction::Deny => "DENY" },
            "rules": p.rules.iter().map(|r| json!({
                "from": r.from.iter().map(|f| json!({ "source": {
                    "principals": f.principals, "namespaces": f.namespaces, "ipBlocks": f.ip_blocks,
                }})).collect::<Vec<_>>(),
                "to": r.to.iter().map(|t| json!({ "operation": {
                    "ports": t.ports, "methods": t.methods, "paths": t.paths,
                }})).collect::<Vec<_>>(),
            })).collect::<Vec<_>>(),
        });
        if let Some(sel) = &p.selector {
            spec["selector"] = json!({ "matchLabels": sel });
        }
        docs.push(json!({
            "apiVersion": "weft.dev/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": { "name": p.name, "namespace": p.namespace },
            "spec": spec,
        }));
    }
    for pa in &model.peer_authentications {
        let mut spec = json!({
            "mtls": { "mode": match pa.mode { MtlsMode::Strict => "STRICT", MtlsMode::Permissive => "PERMISSIVE" } },
        });
        if let Some(sel) = &pa.selector {
            spec["selector"] = json!({ "matchLabels": sel });
        }
        docs.push(json!({
            "apiVersion": "weft.dev/v1alpha1",
            "kind": "PeerAuthentication",
            "metadata": { "name": pa.name, "namespace": pa.namespace },
            "spec": spec,
        }));
    }
    let mut out = String::new();
    for d in docs {
        out += "---\n";
        out += &serde_yaml::to_string(&d)?;
    }
    Ok(out)
}
