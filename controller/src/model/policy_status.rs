//! The `Accepted` condition the controller owes each `weft.dev` policy
//! object (AuthorizationPolicy, PeerAuthentication, TrafficPolicy), and how
//! the builder fills it in. The status writer (`status`) puts it on the
//! object.

use std::fmt;

use kube::ResourceExt;
use serde::{Deserialize, Serialize};

use crate::reasons;

/// Which custom resource a `PolicyStatus` is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyKind {
    AuthorizationPolicy,
    PeerAuthentication,
    TrafficPolicy,
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyKind::AuthorizationPolicy => "AuthorizationPolicy",
            PolicyKind::PeerAuthentication => "PeerAuthentication",
            PolicyKind::TrafficPolicy => "TrafficPolicy",
        })
    }
}

/// The `Accepted` condition the controller owes one policy object.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyStatus {
    pub kind: PolicyKind,
    pub namespace: String,
    pub name: String,
    /// `metadata.generation` of the object this was computed from.
    pub observed_generation: Option<i64>,
    pub accepted: bool,
    pub reason: String,
    pub message: String,
}

/// The status of `obj` as decided: accepted or not, why, and what to tell
/// the user.
pub(crate) fn status_for<K: ResourceExt>(
    kind: PolicyKind,
    obj: &K,
    accepted: bool,
    reason: &str,
    message: String,
) -> PolicyStatus {
    PolicyStatus {
        kind,
        namespace: obj.namespace().unwrap_or_default(),
        name: obj.name_any(),
        observed_generation: obj.meta().generation,
        accepted,
        reason: reason.to_owned(),
        message,
    }
}

/// The status of a policy in a namespace that does not exist.
pub(crate) fn unknown_namespace<K: ResourceExt>(
    kind: PolicyKind,
    obj: &K,
    ns: &str,
) -> PolicyStatus {
    status_for(
        kind,
        obj,
        false,
        reasons::UNKNOWN_NAMESPACE,
        format!("namespace {ns:?} does not exist; this {kind} is ignored until it does"),
    )
}
