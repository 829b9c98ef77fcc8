//! Writes Gateway API status where users look for it: `Accepted` and
//! `Programmed` (plus addresses) on waypoint Gateways, and this
//! controller's `status.parents[]` entries (`controllerName:
//! weft.dev/waypoint-controller`) on HTTPRoutes and GRPCRoutes, leaving
//! other controllers' entries alone. Merge patches of the status
//! subresource, only on a difference; a Warning Event when a route is not
//! accepted or its references do not resolve. Only the leader writes. In
//! manifest mode `status_json` gives the same as data for `/debug/status`.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::watch;
use weft_api::crd::{self, Condition, GRPCRoute, Gateway, HTTPRoute};

use crate::model::gateway_api::{Cond, GatewayApiOutput, GatewayStatus, RouteKind, RouteStatus};
use crate::reasons::{CONTROLLER_NAME, FIELD_MANAGER};
use crate::status::{same_condition, RETRY};

/// `metav1.Condition`s for `conds`, keeping each one's
/// `lastTransitionTime` from `previous` when its status did not flip.
pub fn conditions(
    conds: &[Cond],
    generation: Option<i64>,
    previous: &[Condition],
    now: &str,
) -> Vec<Condition> {
    conds
        .iter()
        .map(|c| {
            let status = if c.status { "True" } else { "False" };
            let last_transition_time = match previous.iter().find(|p| p.type_ == c.type_) {
                Some(p) if p.status == status => p.last_transition_time.clone(),
                _ => Some(now.to_owned()),
            };
            Condition {
                type_: c.type_.clone(),
                status: status.to_owned(),
                reason: c.reason.clone(),
                message: c.message.clone(),
                observed_generation: generation,
                last_transition_time,
            }
        })
        .collect()
}

fn same_conditions(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter()
            .zip(b)
            .all(|(x, y)| x.type_ == y.type_ && same_condition(x, y))
}

/// As `status::status_json`: `{ "<namespace>": { "<Kind>": { "<name>":
/// <status> } } }`, for the admin endpoint in manifest mode.
pub fn status_json(out: &GatewayApiOutput) -> Value {
    let mut tree: BTreeMap<&str, BTreeMap<String, BTreeMap<&str, Value>>> = BTreeMap::new();
    let strip = |mut v: Vec<Condition>| -> Value {
        for c in &mut v {
            c.last_transition_time = None;
        }
        serde_json::to_value(v).unwrap_or(Value::Null)
    };
    for g in &out.gateways {
        let addresses: Vec<Value> = g
            .addresses
            .iter()
            .map(|a| json!({"type": "IPAddress", "value": a}))
            .collect();
        tree.entry(&g.namespace)
            .or_default()
            .entry("Gateway".to_owned())
            .or_default()
            .insert(
                &g.name,
                json!({
                    "conditions": strip(conditions(&g.conditions, g.observed_generation, &[], "")),
                    "addresses": addresses,
                }),
            );
    }
    for r in &out.routes {
        let parents: Vec<Value> = r
            .parents
            .iter()
            .map(|p| {
                json!({
                    "parentRef": p.parent_ref,
                    "controllerName": CONTROLLER_NAME,
                    "conditions": strip(conditions(&p.conditions, r.observed_generation, &[], "")),
                })
            })
            .collect();
        tree.entry(&r.namespace)
            .or_default()
            .entry(r.kind.to_string())
            .or_default()
            .insert(&r.name, json!({ "parents": parents }));
    }
    serde_json::to_value(tree).unwrap_or(Value::Null)
}

type Key = (String, String, String); // (kind, namespace, name)

/// Writes Gateway and route status while `is_leader` is true, reconciling
/// each change of `statuses` against what the API server holds; failures
/// are retried every `status::RETRY`. Returns when `statuses`' sender is
/// gone.
pub async fn run(
    client: Client,
    mut statuses: watch::Receiver<Arc<GatewayApiOutput>>,
    mut is_leader: watch::Receiver<bool>,
    instance: String,
) -> anyhow::Result<()> {
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: FIELD_MANAGER.to_owned(),
            instance: Some(instance),
        },
    );
    let mut gateways_written: BTreeMap<Key, GatewayStatus> = BTreeMap::new();
    let mut routes_written: BTreeMap<Key, RouteStatus> = BTreeMap::new();
    loop {
        let leader = *is_leader.borrow_and_update();
        let mut failed = false;
        if leader {
            let current = statuses.borrow_and_update().clone();
            gateways_written.retain(|k, _| current.gateways.iter().any(|g| gateway_key(g) == *k));
            for g in &current.gateways {
                if gateways_written.get(&gateway_key(g)) == Some(g) {
                    continue;
                }
                match write_gateway(&client, g).await {
                    Ok(()) => {
                        gateways_written.insert(gateway_key(g), g.clone());
                    }
                    Err(e) => {
                        failed = true;
                        tracing::warn!(component = "gateway_status", kind = "Gateway", namespace = %g.namespace, name = %g.name, error = %e, "cannot write Gateway status; will retry");
                    }
                }
            }
            // Routes no parent of ours references any more: take our
            // entries out of their status.
            let gone: Vec<RouteStatus> = routes_written
                .iter()
                .filter(|(k, _)| !current.routes.iter().any(|r| route_key(r) == **k))
                .map(|(_, r)| RouteStatus {
                    parents: Vec::new(),
                    ..r.clone()
                })
                .collect();
            for r in current.routes.iter().chain(&gone) {
                if routes_written.get(&route_key(r)) == Some(r) {
                    continue;
                }
                let res = match r.kind {
                    RouteKind::HTTPRoute => {
                        write_route::<HTTPRoute>(&client, &recorder, r, |o| o.status.as_ref()).await
                    }
                    RouteKind::GRPCRoute => {
                        write_route::<GRPCRoute>(&client, &recorder, r, |o| o.status.as_ref()).await
                    }
                };
                match res {
                    Ok(()) if r.parents.is_empty() => {
                        routes_written.remove(&route_key(r));
                    }
                    Ok(()) => {
                        routes_written.insert(route_key(r), r.clone());
                    }
                    Err(e) => {
                        failed = true;
                        tracing::warn!(component = "gateway_status", kind = %r.kind, namespace = %r.namespace, name = %r.name, error = %e, "cannot write route status; will retry");
                    }
                }
            }
        } else {
            // A new leader re-reads everything before writing.
            gateways_written.clear();
            routes_written.clear();
        }
        let retry = async {
            if failed {
                tokio::time::sleep(RETRY).await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            r = statuses.changed() => if r.is_err() { return Ok(()) },
            r = is_leader.changed() => if r.is_err() { return Ok(()) },
            _ = retry => {}
        }
    }
}

fn gateway_key(g: &GatewayStatus) -> Key {
    ("Gateway".to_owned(), g.namespace.clone(), g.name.clone())
}

fn route_key(r: &RouteStatus) -> Key {
    (r.kind.to_string(), r.namespace.clone(), r.name.clone())
}

async fn write_gateway(client: &Client, g: &GatewayStatus) -> Result<(), kube::Error> {
    let api: Api<Gateway> = Api::namespaced(client.clone(), &g.namespace);
    let obj = match api.get_status(&g.name).await {
        Ok(o) => o,
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(e) => return Err(e),
    };
    let current = obj.status.clone().unwrap_or_default();
    let now = Timestamp::now().to_string();
    let ours = conditions(
        &g.conditions,
        g.observed_generation,
        &current.conditions,
        &now,
    );
    let previous: Vec<Condition> = ours
        .iter()
        .filter_map(|c| {
            current
                .conditions
                .iter()
                .find(|p| p.type_ == c.type_)
                .cloned()
        })
        .collect();
    let addresses: Vec<crd::GatewayStatusAddress> = g
        .addresses
        .iter()
        .map(|a| crd::GatewayStatusAddress {
            type_: Some("IPAddress".to_owned()),
            value: a.clone(),
        })
        .collect();
    if same_conditions(&previous, &ours) && current.addresses == addresses {
        return Ok(());
    }
    // Keep conditions other writers own; replace ours.
    let mut all: Vec<Condition> = current
        .conditions
        .into_iter()
        .filter(|c| !ours.iter().any(|o| o.type_ == c.type_))
        .collect();
    all.extend(ours);
    let patch = json!({ "status": { "conditions": all, "addresses": addresses } });
    api.patch_status(&g.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    tracing::info!(component = "gateway_status", kind = "Gateway", namespace = %g.namespace, name = %g.name, "Gateway status written");
    Ok(())
}

async fn write_route<K>(
    client: &Client,
    recorder: &Recorder,
    r: &RouteStatus,
    status_of: impl Fn(&K) -> Option<&crd::RouteStatus>,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), &r.namespace);
    let obj = match api.get_status(&r.name).await {
        Ok(o) => o,
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(e) => return Err(e),
    };
    let current = status_of(&obj)
        .map(|s| s.parents.clone())
        .unwrap_or_default();
    let (mine, others): (Vec<_>, Vec<_>) = current
        .into_iter()
        .partition(|p| p.controller_name == CONTROLLER_NAME);
    let now = Timestamp::now().to_string();
    let desired: Vec<crd::RouteParentStatus> = r
        .parents
        .iter()
        .map(|p| {
            let previous = mine
                .iter()
                .find(|m| m.parent_ref == p.parent_ref)
                .map(|m| m.conditions.as_slice())
                .unwrap_or_default();
            crd::RouteParentStatus {
                parent_ref: p.parent_ref.clone(),
                controller_name: CONTROLLER_NAME.to_owned(),
                conditions: conditions(&p.conditions, r.observed_generation, previous, &now),
            }
        })
        .collect();
    let unchanged = mine.len() == desired.len()
        && mine.iter().zip(&desired).all(|(a, b)| {
            a.parent_ref == b.parent_ref && same_conditions(&a.conditions, &b.conditions)
        });
    if unchanged {
        return Ok(());
    }
    let mut parents = others;
    parents.extend(desired.iter().cloned());
    let patch = json!({ "status": { "parents": parents } });
    api.patch_status(&r.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    tracing::info!(component = "gateway_status", kind = %r.kind, namespace = %r.namespace, name = %r.name, "route status written");

    // A Warning Event for each newly failing condition.
    for p in &desired {
        let before = mine.iter().find(|m| m.parent_ref == p.parent_ref);
        for c in p.conditions.iter().filter(|c| c.status == "False") {
            let was = before.and_then(|b| b.conditions.iter().find(|x| x.type_ == c.type_));
            if was.is_some_and(|w| w.status == c.status && w.reason == c.reason) {
                continue;
            }
            let reference = ObjectReference {
                api_version: Some(K::api_version(&()).into_owned()),
                kind: Some(K::kind(&()).into_owned()),
                name: Some(r.name.clone()),
                namespace: Some(r.namespace.clone()),
                uid: obj.uid(),
                resource_version: obj.resource_version(),
                ..Default::default()
            };
            let event = Event {
                type_: EventType::Warning,
                reason: c.reason.clone(),
                note: Some(
                    format!("parent {}: {}", p.parent_ref.name, c.message)
                        .chars()
                        .take(1000)
                        .collect(),
                ),
                action: "Validate".to_owned(),
                secondary: None,
            };
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::warn!(component = "gateway_status", error = %e, "cannot publish Event");
            }
        }
    }
    Ok(())
}
