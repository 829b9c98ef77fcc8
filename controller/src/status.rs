//! Writes what the builder decided about each policy back where users look:
//! the `Accepted` condition in `status.conditions` of AuthorizationPolicy,
//! PeerAuthentication and TrafficPolicy (merge patch of the status subresource, only when
//! it changed), plus a Warning Event (events.k8s.io/v1) when a policy is
//! not accepted. Only the leader writes. In manifest mode there is no API
//! server: `status_json` gives the same conditions as data for the admin
//! endpoint.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use tokio::sync::watch;
use weft_api::crd::{
    AuthorizationPolicy, Condition, PeerAuthentication, PolicyConditions, TrafficPolicy,
};

use crate::model::{PolicyKind, PolicyStatus};
use crate::reasons::{ACCEPTED, FIELD_MANAGER};

/// Failed writes are retried this often.
pub const RETRY: Duration = Duration::from_secs(5);

/// The `Accepted` condition for a status, keeping `last_transition_time`
/// from `previous` when the condition's status did not flip.
pub fn accepted_condition(s: &PolicyStatus, previous: Option<&Condition>, now: &str) -> Condition {
    let status = if s.accepted { "True" } else { "False" };
    let last_transition_time = match previous {
        Some(p) if p.status == status => p.last_transition_time.clone(),
        _ => Some(now.to_owned()),
    };
    Condition {
        type_: ACCEPTED.to_owned(),
        status: status.to_owned(),
        reason: s.reason.clone(),
        message: s.message.clone(),
        observed_generation: s.observed_generation,
        last_transition_time,
    }
}

/// Policy status as JSON, for the admin endpoint in manifest mode:
/// `{ "<namespace>": { "<Kind>": { "<name>": { "conditions": [ … ] } } } }`.
pub fn status_json(statuses: &[PolicyStatus]) -> Value {
    let mut out: BTreeMap<&str, BTreeMap<String, BTreeMap<&str, Value>>> = BTreeMap::new();
    for s in statuses {
        let cond = accepted_condition(s, None, "");
        let mut cond = serde_json::to_value(cond).unwrap_or(Value::Null);
        if let Some(c) = cond.as_object_mut() {
            c.remove("lastTransitionTime");
        }
        out.entry(&s.namespace)
            .or_default()
            .entry(s.kind.to_string())
            .or_default()
            .insert(&s.name, json!({ "conditions": [cond] }));
    }
    serde_json::to_value(out).unwrap_or(Value::Null)
}

pub(crate) fn same_condition(a: &Condition, b: &Condition) -> bool {
    a.status == b.status
        && a.reason == b.reason
        && a.message == b.message
        && a.observed_generation == b.observed_generation
}

type Key = (PolicyKind, String, String);

/// Writes policy status while `is_leader` is true. Each change of
/// `statuses` is reconciled against what the API server holds (read, compare,
/// patch only on a difference); failures are retried every `RETRY`.
/// `instance` identifies this replica in Events. Returns when `statuses`'
/// sender is gone.
pub async fn run(
    client: Client,
    mut statuses: watch::Receiver<Arc<Vec<PolicyStatus>>>,
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
    // What the API server was last seen or made to hold, per object.
    let mut written: BTreeMap<Key, PolicyStatus> = BTreeMap::new();
    loop {
        let leader = *is_leader.borrow_and_update();
        let mut failed = false;
        if leader {
            let current = statuses.borrow_and_update().clone();
            written.retain(|k, _| current.iter().any(|s| key(s) == *k));
            for s in current.iter() {
                if written.get(&key(s)) == Some(s) {
                    continue;
                }
                let r = match s.kind {
                    PolicyKind::AuthorizationPolicy => {
                        write_one::<AuthorizationPolicy>(&client, &recorder, s, |o| &o.status).await
                    }
                    PolicyKind::PeerAuthentication => {
                        write_one::<PeerAuthentication>(&client, &recorder, s, |o| &o.status).await
                    }
                    PolicyKind::TrafficPolicy => {
                        write_one::<TrafficPolicy>(&client, &recorder, s, |o| &o.status).await
                    }
                };
                match r {
                    Ok(()) => {
                        written.insert(key(s), s.clone());
                    }
                    Err(e) => {
                        failed = true;
                        tracing::warn!(component = "status", kind = %s.kind, namespace = %s.namespace, name = %s.name, error = %e, "cannot write policy status; will retry");
                    }
                }
            }
        } else {
            // A new leader re-reads everything before writing.
            written.clear();
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

fn key(s: &PolicyStatus) -> Key {
    (s.kind, s.namespace.clone(), s.name.clone())
}

async fn write_one<K>(
    client: &Client,
    recorder: &Recorder,
    s: &PolicyStatus,
    status_of: impl Fn(&K) -> &Option<PolicyConditions>,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), &s.namespace);
    let obj = match api.get_status(&s.name).await {
        Ok(o) => o,
        // Deleted since the build: nothing to write.
        Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut conditions = status_of(&obj).clone().unwrap_or_default().conditions;
    let previous = conditions.iter().find(|c| c.type_ == ACCEPTED).cloned();
    let now = Timestamp::now().to_string();
    let desired = accepted_condition(s, previous.as_ref(), &now);
    if previous
        .as_ref()
        .is_some_and(|p| same_condition(p, &desired))
    {
        return Ok(());
    }
    // Keep conditions other writers own; replace ours.
    conditions.retain(|c| c.type_ != ACCEPTED);
    conditions.push(desired.clone());
    let patch = json!({ "status": { "conditions": conditions } });
    api.patch_status(&s.name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    tracing::info!(component = "status", kind = %s.kind, namespace = %s.namespace, name = %s.name, accepted = s.accepted, reason = %s.reason, "policy status written");

    let flipped_to_false = !s.accepted
        && previous
            .as_ref()
            .is_none_or(|p| p.status != desired.status || p.reason != desired.reason);
    if flipped_to_false {
        let reference = ObjectReference {
            api_version: Some(K::api_version(&()).into_owned()),
            kind: Some(K::kind(&()).into_owned()),
            name: Some(s.name.clone()),
            namespace: Some(s.namespace.clone()),
            uid: obj.uid(),
            resource_version: obj.resource_version(),
            ..Default::default()
        };
        let event = Event {
            type_: EventType::Warning,
            reason: s.reason.clone(),
            note: Some(s.message.chars().take(1000).collect()),
            action: "Validate".to_owned(),
            secondary: None,
        };
        if let Err(e) = recorder.publish(&event, &reference).await {
            // The condition is written; a lost Event is not worth a retry.
            tracing::warn!(component = "status", error = %e, "cannot publish Event");
        }
    }
    Ok(())
}
