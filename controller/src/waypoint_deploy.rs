//! Runs the waypoints (cluster mode, leader only): for each Gateway of
//! class `weft-waypoint`, a ServiceAccount, a Deployment, a
//! PodDisruptionBudget and a ClusterIP Service on 15008, all named after
//! the Gateway and owned by it (deleting the Gateway deletes them).
//!
//! Rollouts drop nothing: the Deployment surges one new pod before an old
//! one goes (`maxSurge: 1, maxUnavailable: 0`); a stopping waypoint keeps
//! accepting for `DRAIN_ANNOUNCE` while the controller leaves it out of
//! the model (ztunnels stop choosing it), then drains its open tunnels
//! for up to `DRAIN_TIMEOUT`, within the pod's termination grace; the
//! budget lets evictions take one replica at a time. Written by server-side apply with field
//! manager `weft-controller`, so a re-apply of the same body is a no-op on
//! the API server and fields others set are left alone. Replicas come from
//! the Gateway's `weft.dev/waypoint-replicas` annotation (default 1).
//!
//! In embedded (manifests) mode nothing is deployed: whoever writes the
//! manifests runs the waypoint processes and writes their Pods.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use tokio::sync::watch;
use weft_api::model::GATEWAY_NAME_LABEL;
use weft_api::ports;

use crate::model::gateway_api::{GatewayApiOutput, WaypointDeployment};
use crate::reasons::FIELD_MANAGER;
use crate::status::RETRY;

/// What every waypoint Deployment shares.
#[derive(Clone, Debug)]
pub struct DeployConfig {
    /// Image holding `weft-waypoint`.
    pub image: String,
    pub image_pull_policy: String,
    /// The controller's config stream and CA, as waypoints reach it.
    pub controller_url: String,
    pub trust_domain: String,
    /// The mesh roots: published in each waypoint namespace (ConfigMap
    /// `weft-ca-root-cert`) so the waypoint can verify the controller.
    pub trust: watch::Receiver<weft_pki::TrustBundle>,
}

/// ConfigMap (in each waypoint's namespace) holding the mesh root.
pub const ROOT_CONFIGMAP: &str = "weft-ca-root-cert";

/// How long a stopping waypoint keeps accepting new connections (ready:
/// false) before it drains: time for the model without it to reach every
/// ztunnel.
pub const DRAIN_ANNOUNCE_SECS: u64 = 5;
/// How long it then lets open tunnels finish.
pub const DRAIN_TIMEOUT_SECS: u64 = 30;
/// The pod's termination grace: both, and a margin for the exit.
pub const TERMINATION_GRACE_SECS: u64 = DRAIN_ANNOUNCE_SECS + DRAIN_TIMEOUT_SECS + 10;

const HBONE_PORT: u16 = ports::HBONE;
const METRICS_PORT: u16 = ports::METRICS;
const READINESS_PORT: u16 = ports::READINESS;

fn labels(name: &str) -> Value {
    json!({
        GATEWAY_NAME_LABEL: name,
        "app.kubernetes.io/name": name,
        "app.kubernetes.io/component": "waypoint",
        "app.kubernetes.io/managed-by": FIELD_MANAGER,
    })
}

fn metadata(w: &WaypointDeployment) -> Value {
    json!({
        "name": w.name,
        "namespace": w.namespace,
        "labels": labels(&w.name),
        "ownerReferences": [{
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "name": w.name,
            "uid": w.uid,
            "controller": true,
            "blockOwnerDeletion": true,
        }],
    })
}

/// The ServiceAccount the waypoint runs as (its SPIFFE identity).
pub fn service_account(w: &WaypointDeployment) -> Value {
    json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": metadata(w) })
}

/// The waypoint's Deployment.
pub fn deployment(w: &WaypointDeployment, cfg: &DeployConfig) -> Value {
    json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(w),
        "spec": {
            "replicas": w.replicas,
            "selector": { "matchLabels": { GATEWAY_NAME_LABEL: w.name } },
            // A new pod is ready before an old one stops.
            "strategy": {
                "type": "RollingUpdate",
                "rollingUpdate": { "maxSurge": 1, "maxUnavailable": 0 },
            },
            "template": {
                "metadata": {
                    "labels": {
                        GATEWAY_NAME_LABEL: w.name,
                        "app.kubernetes.io/name": w.name,
                        "app.kubernetes.io/component": "waypoint",
                        // The waypoint speaks HBONE itself; ztunnel must
                        // not capture it.
                        weft_api::DATAPLANE_MODE_LABEL: weft_api::DATAPLANE_MODE_NONE,
                    },
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": METRICS_PORT.to_string(),
                        "prometheus.io/path": "/metrics",
                    },
                },
                "spec": {
                    "serviceAccountName": w.name,
                    "terminationGracePeriodSeconds": TERMINATION_GRACE_SECS,
                    "securityContext": {
                        "runAsNonRoot": true,
                        "runAsUser": 65532,
                        "runAsGroup": 65532,
                        "seccompProfile": { "type": "RuntimeDefault" },
                    },
                    "containers": [{
                        "name": "waypoint",
                        "image": cfg.image,
                        "imagePullPolicy": cfg.image_pull_policy,
                        "command": ["weft-waypoint"],
                        "env": [
                            { "name": "WEFT_WAYPOINT_NAME", "value": w.name },
                            { "name": "WEFT_WAYPOINT_NAMESPACE", "valueFrom": { "fieldRef": { "fieldPath": "metadata.namespace" } } },
                            { "name": "WEFT_WAYPOINT_SERVICE_ACCOUNT", "valueFrom": { "fieldRef": { "fieldPath": "spec.serviceAccountName" } } },
                            { "name": "WEFT_NODE_NAME", "valueFrom": { "fieldRef": { "fieldPath": "spec.nodeName" } } },
                            { "name": "WEFT_POD_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.podIP" } } },
                            { "name": "WEFT_CONTROLLER", "value": cfg.controller_url },
                            { "name": "WEFT_CONTROLLER_CA_FILE", "value": "/etc/weft/ca/root-cert.pem" },
                            { "name": "WEFT_CA_TOKEN_FILE", "value": "/var/run/secrets/tokens/weft-ca/token" },
                            { "name": "WEFT_LOG_JSON", "value": "true" },
                            { "name": "WEFT_DRAIN_ANNOUNCE", "value": format!("{DRAIN_ANNOUNCE_SECS}s") },
                            { "name": "WEFT_DRAIN_TIMEOUT", "value": format!("{DRAIN_TIMEOUT_SECS}s") },
                        ],
                        "ports": [
                            { "name": "hbone", "containerPort": HBONE_PORT, "protocol": "TCP" },
                            { "name": "http-metrics", "containerPort": METRICS_PORT, "protocol": "TCP" },
                            { "name": "http-ready", "containerPort": READINESS_PORT, "protocol": "TCP" },
                        ],
                        "readinessProbe": {
                            "httpGet": { "path": "/healthz/ready", "port": READINESS_PORT },
                            "periodSeconds": 5,
                            "failureThreshold": 3,
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": { "drop": ["ALL"] },
                        },
                        "volumeMounts": [
                            { "name": "weft-ca-token", "mountPath": "/var/run/secrets/tokens/weft-ca", "readOnly": true },
                            { "name": "weft-ca-root", "mountPath": "/etc/weft/ca", "readOnly": true },
                            { "name": "tmp", "mountPath": "/tmp" },
                        ],
                    }],
                    "volumes": [
                        { "name": "weft-ca-token", "projected": { "sources": [
                            { "serviceAccountToken": { "audience": "weft-ca", "expirationSeconds": 43200, "path": "token" } },
                        ] } },
                        { "name": "weft-ca-root", "configMap": { "name": ROOT_CONFIGMAP } },
                        { "name": "tmp", "emptyDir": {} },
                    ],
                },
            },
        },
    })
}

/// Evictions (node drains) take one replica at a time; a single-replica
/// waypoint can still be evicted (a budget of `minAvailable: 1` would
/// block every node drain).
pub fn disruption_budget(w: &WaypointDeployment) -> Value {
    json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(w),
        "spec": {
            "maxUnavailable": 1,
            "selector": { "matchLabels": { GATEWAY_NAME_LABEL: w.name } },
        },
    })
}

/// The ClusterIP Service clients' ztunnels send HBONE to.
pub fn service(w: &WaypointDeployment) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(w),
        "spec": {
            "type": "ClusterIP",
            "selector": { GATEWAY_NAME_LABEL: w.name },
            "ports": [{ "name": "hbone", "port": HBONE_PORT, "targetPort": HBONE_PORT, "protocol": "TCP" }],
        },
    })
}

/// The mesh root, for the waypoint to verify the controller with.
pub fn root_config_map(namespace: &str, pem: &str) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": ROOT_CONFIGMAP,
            "namespace": namespace,
            "labels": { "app.kubernetes.io/managed-by": FIELD_MANAGER },
        },
        "data": { "root-cert.pem": pem },
    })
}

async fn apply_one(
    client: &Client,
    w: &WaypointDeployment,
    cfg: &DeployConfig,
) -> Result<(), kube::Error> {
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    let ns = &w.namespace;
    let pem = cfg.trust.borrow().to_pem();
    Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), ns)
        .patch(
            ROOT_CONFIGMAP,
            &pp,
            &Patch::Apply(&root_config_map(ns, &pem)),
        )
        .await?;
    Api::<ServiceAccount>::namespaced(client.clone(), ns)
        .patch(&w.name, &pp, &Patch::Apply(&service_account(w)))
        .await?;
    Api::<Deployment>::namespaced(client.clone(), ns)
        .patch(&w.name, &pp, &Patch::Apply(&deployment(w, cfg)))
        .await?;
    Api::<PodDisruptionBudget>::namespaced(client.clone(), ns)
        .patch(&w.name, &pp, &Patch::Apply(&disruption_budget(w)))
        .await?;
    Api::<Service>::namespaced(client.clone(), ns)
        .patch(&w.name, &pp, &Patch::Apply(&service(w)))
        .await?;
    Ok(())
}

/// Applies the waypoints of each build while `is_leader` is true (each
/// only when its desired state changed since it was last applied; a new
/// leader applies them all once). Failures are retried every
/// `status::RETRY`. Returns when `desired`'s sender is gone.
pub async fn run(
    client: Client,
    mut cfg: DeployConfig,
    mut desired: watch::Receiver<Arc<GatewayApiOutput>>,
    mut is_leader: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut applied: BTreeMap<(String, String), WaypointDeployment> = BTreeMap::new();
    loop {
        let leader = *is_leader.borrow_and_update();
        let mut failed = false;
        if leader {
            let current = desired.borrow_and_update().clone();
            applied.retain(|k, _| {
                current
                    .deployments
                    .iter()
                    .any(|d| (&d.namespace, &d.name) == (&k.0, &k.1))
            });
            for w in &current.deployments {
                let key = (w.namespace.clone(), w.name.clone());
                if applied.get(&key) == Some(w) {
                    continue;
                }
                match apply_one(&client, w, &cfg).await {
                    Ok(()) => {
                        tracing::info!(component = "waypoint_deploy", namespace = %w.namespace, name = %w.name, replicas = w.replicas, "waypoint applied");
                        applied.insert(key, w.clone());
                    }
                    Err(e) => {
                        failed = true;
                        tracing::warn!(component = "waypoint_deploy", namespace = %w.namespace, name = %w.name, error = %e, "cannot apply waypoint; will retry");
                    }
                }
            }
        } else {
            applied.clear();
        }
        let retry = async {
            if failed {
                tokio::time::sleep(RETRY).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            r = desired.changed() => if r.is_err() { return Ok(()) },
            r = is_leader.changed() => if r.is_err() { return Ok(()) },
            // New roots (rotation): re-apply everything, ConfigMaps included.
            r = cfg.trust.changed() => {
                if r.is_ok() { applied.clear(); }
            }
            _ = retry => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollouts_surge_drain_and_evict_one_at_a_time() {
        let w = WaypointDeployment {
            namespace: "shop".into(),
            name: "wp".into(),
            uid: "u".into(),
            replicas: 2,
        };
        let (_tx, trust) = watch::channel(weft_pki::TrustBundle::default());
        let cfg = DeployConfig {
            image: "weft-waypoint:test".into(),
            image_pull_policy: "IfNotPresent".into(),
            controller_url: "https://weft-controller:15012".into(),
            trust_domain: "cluster.local".into(),
            trust,
        };
        let d = deployment(&w, &cfg);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxSurge"], 1);
        assert_eq!(d["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"], 0);
        let pod = &d["spec"]["template"]["spec"];
        let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
        assert!(grace > DRAIN_ANNOUNCE_SECS + DRAIN_TIMEOUT_SECS, "{grace}");
        let env = pod["containers"][0]["env"].as_array().unwrap();
        let value = |name: &str| {
            env.iter()
                .find(|e| e["name"] == name)
                .and_then(|e| e["value"].as_str())
                .map(str::to_owned)
        };
        assert_eq!(value("WEFT_DRAIN_ANNOUNCE").as_deref(), Some("5s"));
        assert_eq!(value("WEFT_DRAIN_TIMEOUT").as_deref(), Some("30s"));
        assert_eq!(
            pod["containers"][0]["readinessProbe"]["httpGet"]["path"],
            "/healthz/ready"
        );
        let pdb = disruption_budget(&w);
        assert_eq!(pdb["spec"]["maxUnavailable"], 1);
        assert_eq!(pdb["metadata"]["ownerReferences"][0]["kind"], "Gateway");
    }
}
