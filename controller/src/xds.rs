//! The config stream to ztunnels: a tonic `weft.v1.MeshConfig` server fed by
//! the mesh model (`watch::Receiver<Arc<MeshModel>>`) and the trust bundle.
//!
//! Every model or bundle change gets the next version (monotonic within this
//! controller instance) and is kept in a bounded history so reconnecting
//! clients can resume. Each subscriber then gets its own filtered view:
//!
//! - all namespaces, all services and all workloads: a ztunnel routes to
//!   endpoints on every node and needs their identities to verify peers, so
//!   these cannot be cut down by node;
//! - AuthorizationPolicies and PeerAuthentications only of the namespaces
//!   that have at least one workload on the subscriber's node: policy is
//!   enforced at the destination's ztunnel (inbound), and both kinds select
//!   workloads of their own namespace only. A namespace's policies arrive
//!   (as upserts) when its first pod lands on the node and are removed when
//!   its last one leaves.
//!
//! The first update of a stream is a full snapshot, unless the client
//! resumes with this instance's id and a version still in the history: then
//! it is a delta from that version (possibly empty). After that, one update
//! is in flight at a time and each is a delta against the last version the
//! client acknowledged. A NACK is logged and counted; the client keeps its
//! last good config and nothing is resent until the model changes.
//!
//! Each open stream is also recorded in [`XdsCounters`] (node, role,
//! versions sent and acknowledged, the last NACK and its reason) with two
//! latency histograms: push (a version's creation to its send on a stream)
//! and apply (send to ACK, the client's check and apply included). The
//! controller shows them on `/metrics` and `/debug/subscribers`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures::Stream;
use imbl::OrdMap;
use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, info, warn};
use weft_api::model::Workload;
use weft_api::proto::mesh_config_server::{MeshConfig, MeshConfigServer};
use weft_api::proto::subscribe_request::Request as Req;
use weft_api::proto::{
    self, ConfigUpdate, Keyed, Removals, ResourceKey, Resources, ResumePoint, SubscribeRequest,
};
use weft_api::MeshModel;
use weft_pki::TrustBundle;

use crate::ca::auth::{authenticate, Authenticator};

/// How many past versions are remembered for resuming clients.
pub const DEFAULT_HISTORY: usize = 64;

/// How many full snapshots may await their client's answer at once. A full
/// snapshot costs the controller about three times its encoded size (about
/// 1 MB per 10,000 pods) until the client has read it; when every ztunnel
/// of a large cluster reconnects at once (a controller restart), the
/// others wait their turn instead of holding one each.
pub const FULL_SNAPSHOTS_IN_FLIGHT: usize = 8;

/// How long a full snapshot keeps its turn without an answer: a client
/// that never answers holds up the others only this long.
pub const FULL_SNAPSHOT_TURN: Duration = Duration::from_secs(10);

/// Counters for metrics and benchmarks; cheap to read at any time.
#[derive(Debug)]
pub struct XdsCounters {
    /// Streams currently open (gauge).
    pub subscribers: AtomicI64,
    /// Updates sent (full or delta).
    pub pushes: AtomicU64,
    /// Protobuf-encoded bytes of those updates.
    pub bytes_pushed: AtomicU64,
    /// Of the pushes, how many were full snapshots.
    pub full_pushes: AtomicU64,
    pub acks: AtomicU64,
    pub nacks: AtomicU64,
    /// Streams refused or ended for a malformed request or failed auth.
    pub rejected: AtomicU64,
    /// Streams that ended because the client went away (closed, reset,
    /// keepalive timeout).
    pub disconnects: AtomicU64,
    /// The newest config version (gauge).
    pub latest_version: AtomicU64,
    /// Seconds from a version's creation to its send on a stream.
    pub push_latency: Histogram,
    /// Seconds from an update's send to its ACK.
    pub apply_latency: Histogram,
    /// Open streams by stream id.
    streams: Mutex<BTreeMap<u64, SubscriberStatus>>,
    next_stream: AtomicU64,
}

/// Latency buckets in seconds: 1 ms to about 16 s.
fn latency_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 15)
}

impl Default for XdsCounters {
    fn default() -> Self {
        Self {
            subscribers: AtomicI64::default(),
            pushes: AtomicU64::default(),
            bytes_pushed: AtomicU64::default(),
            full_pushes: AtomicU64::default(),
            acks: AtomicU64::default(),
            nacks: AtomicU64::default(),
            rejected: AtomicU64::default(),
            disconnects: AtomicU64::default(),
            latest_version: AtomicU64::default(),
            push_latency: Histogram::new(latency_buckets()),
            apply_latency: Histogram::new(latency_buckets()),
            streams: Mutex::default(),
            next_stream: AtomicU64::default(),
        }
    }
}

/// One open config stream as operators see it (`/debug/subscribers`).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct SubscriberStatus {
    pub node: String,
    /// `ztunnel` or `waypoint`.
    pub role: &'static str,
    pub connected_unix: u64,
    /// The newest version sent (0: none yet).
    pub sent_version: u64,
    /// The newest version the client acknowledged (0: none yet).
    pub acked_version: u64,
    pub acked_unix: u64,
    /// Whether an update awaits the client's answer.
    pub in_flight: bool,
    /// The last rejected update on this stream.
    pub last_nack: Option<NackStatus>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NackStatus {
    pub version: u64,
    pub error: String,
    pub unix: u64,
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A plain copy of [`XdsCounters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct XdsStats {
    pub subscribers: i64,
    pub pushes: u64,
    pub bytes_pushed: u64,
    pub full_pushes: u64,
    pub acks: u64,
    pub nacks: u64,
    pub rejected: u64,
    pub disconnects: u64,
}

impl XdsCounters {
    pub fn snapshot(&self) -> XdsStats {
        XdsStats {
            subscribers: self.subscribers.load(Ordering::Relaxed),
            pushes: self.pushes.load(Ordering::Relaxed),
            bytes_pushed: self.bytes_pushed.load(Ordering::Relaxed),
            full_pushes: self.full_pushes.load(Ordering::Relaxed),
            acks: self.acks.load(Ordering::Relaxed),
            nacks: self.nacks.load(Ordering::Relaxed),
            rejected: self.rejected.load(Ordering::Relaxed),
            disconnects: self.disconnects.load(Ordering::Relaxed),
        }
    }

    /// Every open stream, ordered by node then role.
    pub fn subscriber_statuses(&self) -> Vec<SubscriberStatus> {
        let mut all: Vec<SubscriberStatus> = self.lock_streams().values().cloned().collect();
        all.sort_by(|a, b| (&a.node, a.role).cmp(&(&b.node, b.role)));
        all
    }

    fn lock_streams(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, SubscriberStatus>> {
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn open_stream(&self, node: &str, waypoint: bool) -> u64 {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        self.lock_streams().insert(
            id,
            SubscriberStatus {
                node: node.to_owned(),
                role: if waypoint { ROLE_WAYPOINT } else { "ztunnel" },
                connected_unix: unix_now(),
                sent_version: 0,
                acked_version: 0,
                acked_unix: 0,
                in_flight: false,
                last_nack: None,
            },
        );
        id
    }

    fn update_stream(&self, id: u64, f: impl FnOnce(&mut SubscriberStatus)) {
        if let Some(s) = self.lock_streams().get_mut(&id) {
            f(s);
        }
    }
}

#[derive(Clone, Default)]
pub struct XdsOptions {
    /// Versions kept for resume; [`DEFAULT_HISTORY`] when 0.
    pub history: usize,
    /// Checks the bearer token of each stream and that it belongs to the
    /// node named in Hello. `None` accepts every stream (embedded mode on a
    /// trusted host only).
    pub authenticator: Option<Arc<dyn Authenticator>>,
}

type Key = (String, String);

/// The kinds of resources a version holds, in the order of
/// [`ChangeSet::kinds`].
const KINDS: usize = 9;

/// The keys of each kind that changed (upserted or removed) between two
/// versions: found once per version, shared by every subscriber, so a
/// subscriber one step behind gets its delta from the changed keys alone
/// instead of a diff of the whole model.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct ChangeSet {
    kinds: [BTreeSet<Key>; KINDS],
}

impl ChangeSet {
    fn absorb(&mut self, other: &ChangeSet) {
        for (mine, theirs) in self.kinds.iter_mut().zip(&other.kinds) {
            mine.extend(theirs.iter().cloned());
        }
    }
}

/// A resource map of one version. Persistent: a version shares every
/// unchanged entry with the one before it, so making a version costs the
/// changed resources, not the cluster.
type Map<T> = OrdMap<Key, Arc<T>>;

/// Pods per (node, namespace).
type PodTally = OrdMap<(String, String), usize>;

/// The namespaces with a pod on each node.
type NodeNamespaces = OrdMap<String, Arc<BTreeSet<String>>>;

/// One version of the model, converted to wire messages once and shared by
/// every subscriber.
struct Versioned {
    version: u64,
    /// The keys changed since the version before this one (`None` for the
    /// first version).
    changes: Option<ChangeSet>,
    /// Pods per (node, namespace), kept from the version before by the
    /// changed workloads alone.
    pods_per_node_namespace: PodTally,
    /// Namespaces with a workload on each node (the policies a node gets);
    /// a node's set is shared with the previous version while unchanged.
    node_namespaces: NodeNamespaces,
    /// When this version was made (push latency starts here).
    created: Instant,
    trust_domain: String,
    namespaces: Map<proto::Namespace>,
    workloads: Map<proto::Workload>,
    services: Map<proto::Service>,
    policies: Map<proto::AuthorizationPolicy>,
    peer_authentications: Map<proto::PeerAuthentication>,
    waypoints: Map<proto::L7Resource>,
    http_routes: Map<proto::L7Resource>,
    grpc_routes: Map<proto::L7Resource>,
    traffic_policies: Map<proto::L7Resource>,
    trust_bundle_pem: Vec<String>,
}

fn owned_key(m: &impl Keyed) -> Key {
    let (namespace, name) = m.key_parts();
    (namespace.to_owned(), name.to_owned())
}

/// `items` in key order, the last of equal keys kept (as a map built from
/// them would). The builder's models are sorted already: then this only
/// checks.
fn in_key_order<M: Keyed>(items: &[M]) -> Vec<&M> {
    let mut v: Vec<&M> = items.iter().collect();
    if !v.windows(2).all(|w| w[0].key_parts() < w[1].key_parts()) {
        v.sort_by(|a, b| a.key_parts().cmp(&b.key_parts()));
        v.reverse();
        v.dedup_by(|a, b| a.key_parts() == b.key_parts());
        v.reverse();
    }
    v
}

/// How `items` differ from `previous`, by key: `(old, new)` for each item
/// added (`old` None), removed (`new` None) or changed. Model items are
/// compared before anything is converted, so an unchanged resource costs
/// one comparison.
fn changed_items<'a, M: Keyed + PartialEq>(
    previous: &'a [M],
    items: &'a [M],
) -> Vec<ItemChange<'a, M>> {
    let (old, new) = (in_key_order(previous), in_key_order(items));
    let (mut i, mut j) = (0, 0);
    let mut out = Vec::new();
    loop {
        match (old.get(i).copied(), new.get(j).copied()) {
            (None, None) => return out,
            (Some(o), Some(n)) if o.key_parts() == n.key_parts() => {
                if o != n {
                    out.push((Some(o), Some(n)));
                }
                i += 1;
                j += 1;
            }
            (Some(o), n) if n.is_none_or(|n| o.key_parts() < n.key_parts()) => {
                out.push((Some(o), None));
                i += 1;
            }
            (_, n) => {
                out.push((None, n));
                j += 1;
            }
        }
    }
}

/// An item's change between two models: `(old, new)`, `None` on the side
/// where it is absent.
type ItemChange<'a, M> = (Option<&'a M>, Option<&'a M>);

/// The wire messages of `items` by key: all converted for a first version;
/// otherwise the previous version's map with only the items of `diff` (the
/// [`changed_items`] since the previous model) converted again. The keys
/// whose message changed go into `changed`.
fn index<M: Keyed + PartialEq, P: for<'b> From<&'b M> + PartialEq>(
    items: &[M],
    previous: Option<(&Map<P>, &[ItemChange<'_, M>])>,
    changed: &mut BTreeSet<Key>,
) -> Map<P> {
    let Some((old_map, diff)) = previous else {
        return in_key_order(items)
            .into_iter()
            .map(|m| (owned_key(m), Arc::new(P::from(m))))
            .collect();
    };
    let mut map = old_map.clone();
    for &(old, new) in diff {
        match new {
            Some(n) => {
                let key = owned_key(n);
                let msg = P::from(n);
                // A model change the wire message does not carry is no
                // change to send.
                if map.get(&key).is_none_or(|o| **o != msg) {
                    map.insert(key.clone(), Arc::new(msg));
                    changed.insert(key);
                }
            }
            None => {
                let key = old.map(owned_key).unwrap_or_default();
                if map.remove(&key).is_some() {
                    changed.insert(key);
                }
            }
        }
    }
    map
}

/// The pods-per-(node, namespace) tally and each node's namespaces after
/// the workload changes `diff`, starting from `previous` (both empty for a
/// first version).
fn tally_nodes(
    previous: Option<&Versioned>,
    diff: &[ItemChange<'_, Workload>],
) -> (PodTally, NodeNamespaces) {
    let mut counts = previous
        .map(|p| p.pods_per_node_namespace.clone())
        .unwrap_or_default();
    let mut nodes = previous
        .map(|p| p.node_namespaces.clone())
        .unwrap_or_default();
    // Nodes whose set of namespaces moved (a count went to or from zero).
    let mut moved: BTreeSet<&str> = BTreeSet::new();
    for (old, new) in diff {
        if let Some(o) = old {
            let key = (o.node.clone(), o.namespace.clone());
            match counts.get(&key).copied() {
                Some(n) if n > 1 => {
                    counts.insert(key, n - 1);
                }
                _ => {
                    counts.remove(&key);
                    moved.insert(&o.node);
                }
            }
        }
        if let Some(n) = new {
            let key = (n.node.clone(), n.namespace.clone());
            let count = counts.get(&key).copied().unwrap_or(0);
            if count == 0 {
                moved.insert(&n.node);
            }
            counts.insert(key, count + 1);
        }
    }
    for node in moved {
        let from = (node.to_owned(), String::new());
        let set: BTreeSet<String> = counts
            .range(from..)
            .take_while(|((n, _), _)| n == node)
            .map(|((_, ns), _)| ns.clone())
            .collect();
        if set.is_empty() {
            nodes.remove(node);
        } else if nodes.get(node).is_none_or(|s| **s != set) {
            nodes.insert(node.to_owned(), Arc::new(set));
        }
    }
    (counts, nodes)
}

impl Versioned {
    /// Version `version` of `model`; with `previous` (the version before
    /// and the model it was made from), made from it and the items that
    /// changed.
    fn new(
        version: u64,
        model: &MeshModel,
        bundle: &TrustBundle,
        previous: Option<(&Versioned, &MeshModel)>,
    ) -> Self {
        let mut c = ChangeSet::default();
        let [c_ns, c_wl, c_svc, c_pol, c_pa, c_wp, c_http, c_grpc, c_tp] = &mut c.kinds;
        let (p, pm) = (previous.map(|p| p.0), previous.map(|p| p.1));
        let workload_diff = match pm {
            Some(pm) => changed_items(&pm.workloads, &model.workloads),
            None => in_key_order(&model.workloads)
                .into_iter()
                .map(|w| (None, Some(w)))
                .collect(),
        };
        let (pods_per_node_namespace, node_namespaces) = tally_nodes(p, &workload_diff);
        macro_rules! index {
            ($field:ident, $changed:expr) => {{
                let diff = pm.map(|pm| changed_items(&pm.$field, &model.$field));
                index(
                    &model.$field,
                    p.map(|p| &p.$field).zip(diff.as_deref()),
                    $changed,
                )
            }};
        }
        Self {
            version,
            created: Instant::now(),
            trust_domain: model.trust_domain.clone(),
            namespaces: index!(namespaces, c_ns),
            // The workloads' diff is the one the tally above used.
            workloads: index(
                &model.workloads,
                p.map(|p| (&p.workloads, &workload_diff[..])),
                c_wl,
            ),
            services: index!(services, c_svc),
            policies: index!(policies, c_pol),
            peer_authentications: index!(peer_authentications, c_pa),
            waypoints: index!(waypoints, c_wp),
            http_routes: index!(http_routes, c_http),
            grpc_routes: index!(grpc_routes, c_grpc),
            traffic_policies: index!(traffic_policies, c_tp),
            changes: previous.map(|_| c),
            pods_per_node_namespace,
            node_namespaces,
            trust_bundle_pem: bundle
                .roots
                .iter()
                .map(|r| {
                    TrustBundle {
                        roots: vec![r.clone()],
                    }
                    .to_pem()
                })
                .collect(),
        }
    }
}

/// What one node sees of one version.
#[derive(Clone)]
struct NodeView {
    base: Arc<Versioned>,
    /// Namespaces with a workload on the node: their policies are included.
    policy_namespaces: Arc<BTreeSet<String>>,
    /// A waypoint: gets routes, traffic policies and every policy.
    waypoint: bool,
}

/// Subscriber role named in Hello.
pub const ROLE_WAYPOINT: &str = "waypoint";

impl NodeView {
    fn new(base: Arc<Versioned>, node: &str, waypoint: bool) -> Self {
        let policy_namespaces = base.node_namespaces.get(node).cloned().unwrap_or_default();
        Self {
            base,
            policy_namespaces,
            waypoint,
        }
    }

    fn wants_policy(&self, key: &Key) -> bool {
        self.waypoint || self.policy_namespaces.contains(&key.0)
    }
}

/// One side of a diff: a resource map and which keys the node wants.
type Side<'a, T> = (&'a Map<T>, &'a dyn Fn(&Key) -> bool);

/// Upserts and removals taking `old` to `new`. With `only`, just those keys
/// are looked at (the ones changed between the two versions); without it,
/// every key of both.
fn diff_map<T: PartialEq + Clone>(
    old: Option<Side<'_, T>>,
    new: Side<'_, T>,
    upserts: &mut Vec<T>,
    removals: &mut Vec<ResourceKey>,
    only: Option<&BTreeSet<Key>>,
) {
    let (new_map, new_wants) = new;
    if let (Some(keys), Some((old_map, old_wants))) = (only, old) {
        for k in keys {
            let now = new_map.get(k).filter(|_| new_wants(k));
            let before = old_map.get(k).filter(|_| old_wants(k));
            match (before, now) {
                (Some(o), Some(v)) if Arc::ptr_eq(o, v) || **o == **v => {}
                (_, Some(v)) => upserts.push((**v).clone()),
                (Some(_), None) => removals.push(ResourceKey::new(&k.0, &k.1)),
                (None, None) => {}
            }
        }
        return;
    }
    for (k, v) in new_map.iter().filter(|(k, _)| new_wants(k)) {
        let unchanged = old.is_some_and(|(old_map, old_wants)| {
            old_wants(k)
                && old_map
                    .get(k)
                    .is_some_and(|o| Arc::ptr_eq(o, v) || **o == **v)
        });
        if !unchanged {
            upserts.push((**v).clone());
        }
    }
    if let Some((old_map, old_wants)) = old {
        for k in old_map.keys().filter(|k| old_wants(k)) {
            if !(new_wants(k) && new_map.contains_key(k)) {
                removals.push(ResourceKey::new(&k.0, &k.1));
            }
        }
    }
}

/// The update taking a client from `old` (None: nothing, send everything)
/// to `new`.
///
/// `changes`: the keys changed between the two versions, when known (see
/// [`Shared::changes_between`]); the delta is then built from those keys
/// alone. Policies are diffed whole when the node's set of namespaces
/// moved (a namespace's policies arrive or leave with its first or last
/// pod on the node).
fn update_between(
    instance_id: &str,
    old: Option<&NodeView>,
    new: &NodeView,
    changes: Option<&ChangeSet>,
) -> ConfigUpdate {
    let all = |_: &Key| true;
    let same_policy_view = old.is_some_and(|o| {
        Arc::ptr_eq(&o.policy_namespaces, &new.policy_namespaces)
            || o.policy_namespaces == new.policy_namespaces
    });
    let only = |kind: usize| changes.map(|c| &c.kinds[kind]);
    let only_policies = |kind: usize| only(kind).filter(|_| same_policy_view);
    let mut up = Resources::default();
    let mut rm = Removals::default();
    let o = old.map(|o| &o.base);
    let n = &new.base;
    diff_map(
        o.map(|o| (&o.namespaces, &all as &dyn Fn(&Key) -> bool)),
        (&n.namespaces, &all),
        &mut up.namespaces,
        &mut rm.namespaces,
        only(0),
    );
    diff_map(
        o.map(|o| (&o.workloads, &all as &dyn Fn(&Key) -> bool)),
        (&n.workloads, &all),
        &mut up.workloads,
        &mut rm.workloads,
        only(1),
    );
    diff_map(
        o.map(|o| (&o.services, &all as &dyn Fn(&Key) -> bool)),
        (&n.services, &all),
        &mut up.services,
        &mut rm.services,
        only(2),
    );
    let old_wants = |k: &Key| old.is_some_and(|o| o.wants_policy(k));
    let new_wants = |k: &Key| new.wants_policy(k);
    diff_map(
        o.map(|o| (&o.policies, &old_wants as &dyn Fn(&Key) -> bool)),
        (&n.policies, &new_wants),
        &mut up.policies,
        &mut rm.policies,
        only_policies(3),
    );
    diff_map(
        o.map(|o| (&o.peer_authentications, &old_wants as &dyn Fn(&Key) -> bool)),
        (&n.peer_authentications, &new_wants),
        &mut up.peer_authentications,
        &mut rm.peer_authentications,
        only_policies(4),
    );
    diff_map(
        o.map(|o| (&o.waypoints, &all as &dyn Fn(&Key) -> bool)),
        (&n.waypoints, &all),
        &mut up.waypoints,
        &mut rm.waypoints,
        only(5),
    );
    let old_l7 = |_: &Key| old.is_some_and(|o| o.waypoint);
    let new_l7 = |_: &Key| new.waypoint;
    diff_map(
        o.map(|o| (&o.http_routes, &old_l7 as &dyn Fn(&Key) -> bool)),
        (&n.http_routes, &new_l7),
        &mut up.http_routes,
        &mut rm.http_routes,
        only(6),
    );
    diff_map(
        o.map(|o| (&o.grpc_routes, &old_l7 as &dyn Fn(&Key) -> bool)),
        (&n.grpc_routes, &new_l7),
        &mut up.grpc_routes,
        &mut rm.grpc_routes,
        only(7),
    );
    diff_map(
        o.map(|o| (&o.traffic_policies, &old_l7 as &dyn Fn(&Key) -> bool)),
        (&n.traffic_policies, &new_l7),
        &mut up.traffic_policies,
        &mut rm.traffic_policies,
        only(8),
    );
    ConfigUpdate {
        instance_id: instance_id.to_owned(),
        version: n.version,
        full: old.is_none(),
        trust_domain: n.trust_domain.clone(),
        upserts: Some(up),
        removals: Some(rm),
        // A delta carries the roots only when they changed (empty:
        // unchanged), so a pod change costs only the pod.
        trust_bundle_pem: match old {
            Some(o) if o.base.trust_bundle_pem == n.trust_bundle_pem => Vec::new(),
            _ => n.trust_bundle_pem.clone(),
        },
    }
}

fn is_noop(update: &ConfigUpdate, old: &NodeView) -> bool {
    !update.full
        && update.upserts.as_ref().is_none_or(Resources::is_empty)
        && update.removals.as_ref().is_none_or(Removals::is_empty)
        && update.trust_domain == old.base.trust_domain
        && update.trust_bundle_pem.is_empty()
}

struct Shared {
    instance_id: String,
    history_len: usize,
    history: Mutex<VecDeque<Arc<Versioned>>>,
    current: watch::Receiver<Arc<Versioned>>,
    counters: Arc<XdsCounters>,
    authenticator: Option<Arc<dyn Authenticator>>,
    /// Turns for full snapshots ([`FULL_SNAPSHOTS_IN_FLIGHT`]).
    full_snapshots: Arc<Semaphore>,
}

impl Shared {
    fn at_version(&self, version: u64) -> Option<Arc<Versioned>> {
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        h.iter().find(|v| v.version == version).cloned()
    }

    /// The keys changed from version `from` to version `to`: the union of
    /// the change sets of every version after `from` up to `to`, if the
    /// history still holds them all.
    fn changes_between(&self, from: u64, to: u64) -> Option<ChangeSet> {
        if from >= to {
            return None;
        }
        let h = self.history.lock().unwrap_or_else(|p| p.into_inner());
        union_of_changes(h.iter().map(|v| &**v), from, to)
    }
}

/// The union of the change sets of the versions after `from` up to `to`
/// among `history` (in version order); `None` if one is missing.
fn union_of_changes<'a>(
    history: impl Iterator<Item = &'a Versioned>,
    from: u64,
    to: u64,
) -> Option<ChangeSet> {
    if from >= to {
        return None;
    }
    let mut steps = history.filter(|v| v.version > from && v.version <= to);
    let first = steps.next()?;
    if first.version != from + 1 {
        return None;
    }
    let mut all = first.changes.clone()?;
    let mut last = first.version;
    for v in steps {
        if v.version != last + 1 {
            return None;
        }
        all.absorb(v.changes.as_ref()?);
        last = v.version;
    }
    (last == to).then_some(all)
}

/// The `MeshConfig` service. Cheap to clone.
#[derive(Clone)]
pub struct XdsServer {
    shared: Arc<Shared>,
}

/// A random id for this controller process (not a secret: it only tells a
/// resuming client whether its version numbers still mean anything).
fn random_instance_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

impl XdsServer {
    /// Starts versioning `models` and `trust` (spawns a task: call inside a
    /// Tokio runtime). The task ends when both senders are dropped; the
    /// last version keeps being served.
    pub fn new(
        models: watch::Receiver<Arc<MeshModel>>,
        trust: watch::Receiver<TrustBundle>,
        options: XdsOptions,
    ) -> Self {
        let history_len = if options.history == 0 {
            DEFAULT_HISTORY
        } else {
            options.history
        };
        let first_model = models.borrow().clone();
        let first = Arc::new(Versioned::new(1, &first_model, &trust.borrow(), None));
        let (tx, current) = watch::channel(first.clone());
        let counters = Arc::new(XdsCounters::default());
        counters.latest_version.store(1, Ordering::Relaxed);
        let shared = Arc::new(Shared {
            instance_id: random_instance_id(),
            history_len,
            history: Mutex::new(VecDeque::from([first])),
            current,
            counters,
            authenticator: options.authenticator,
            full_snapshots: Arc::new(Semaphore::new(FULL_SNAPSHOTS_IN_FLIGHT)),
        });
        tokio::spawn(version_changes(
            models,
            first_model,
            trust,
            tx,
            shared.clone(),
        ));
        Self { shared }
    }

    pub fn instance_id(&self) -> &str {
        &self.shared.instance_id
    }

    /// The version the latest model/bundle got.
    pub fn current_version(&self) -> u64 {
        self.shared.current.borrow().version
    }

    pub fn counters(&self) -> Arc<XdsCounters> {
        self.shared.counters.clone()
    }

    /// The tonic service to add to a `tonic::transport::Server`.
    pub fn into_service(self) -> MeshConfigServer<Self> {
        MeshConfigServer::new(self)
    }
}

/// Makes a version per model or bundle change, each from the one before
/// and the model it was made from (`last_model`, held here only: the
/// history keeps the versions, not the models).
async fn version_changes(
    mut models: watch::Receiver<Arc<MeshModel>>,
    mut last_model: Arc<MeshModel>,
    mut trust: watch::Receiver<TrustBundle>,
    tx: watch::Sender<Arc<Versioned>>,
    shared: Arc<Shared>,
) {
    let (mut models_open, mut trust_open) = (true, true);
    while models_open || trust_open {
        tokio::select! {
            r = models.changed(), if models_open => if r.is_err() { models_open = false; continue },
            r = trust.changed(), if trust_open => if r.is_err() { trust_open = false; continue },
        }
        let prev = tx.borrow().clone();
        // Clones of the Arcs: the watches' locks are not held while the
        // version is made.
        let model = models.borrow_and_update().clone();
        let bundle = trust.borrow_and_update().clone();
        let next = Arc::new(Versioned::new(
            prev.version + 1,
            &model,
            &bundle,
            Some((&prev, &last_model)),
        ));
        // Dropped once the version is out: freeing a large model takes a
        // while, and no subscriber should wait for it.
        let replaced = std::mem::replace(&mut last_model, model);
        {
            let mut h = shared.history.lock().unwrap_or_else(|p| p.into_inner());
            h.push_back(next.clone());
            while h.len() > shared.history_len {
                h.pop_front();
            }
        }
        debug!(
            component = "xds",
            version = next.version,
            "new config version"
        );
        shared
            .counters
            .latest_version
            .store(next.version, Ordering::Relaxed);
        tx.send_replace(next);
        drop(replaced);
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<ConfigUpdate, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl MeshConfig for XdsServer {
    type SubscribeStream = UpdateStream;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<UpdateStream>, Status> {
        let shared = &self.shared;
        let reject = |s: Status| {
            shared.counters.rejected.fetch_add(1, Ordering::Relaxed);
            warn!(component = "xds", code = ?s.code(), error = s.message(), "config stream refused");
            s
        };
        let token_node = match &shared.authenticator {
            Some(auth) => Some(
                authenticate(auth.as_ref(), request.metadata())
                    .await
                    .map_err(reject)?,
            ),
            None => None,
        };
        let mut inbound = request.into_inner();
        let hello = match inbound.message().await {
            Ok(Some(SubscribeRequest {
                request: Some(Req::Hello(h)),
            })) if !h.node_name.is_empty() => h,
            Ok(Some(_)) => {
                return Err(reject(Status::invalid_argument(
                    "the first SubscribeRequest must be a Hello with a node_name",
                )))
            }
            Ok(None) => {
                return Err(reject(Status::invalid_argument(
                    "stream closed before Hello",
                )))
            }
            Err(s) => {
                return Err(reject(Status::invalid_argument(format!(
                    "undecodable SubscribeRequest: {}",
                    s.message()
                ))))
            }
        };
        if let Some(node) = token_node {
            if node != hello.node_name {
                return Err(reject(Status::permission_denied(format!(
                    "token belongs to node {node:?}, not {:?}",
                    hello.node_name
                ))));
            }
        }
        let (tx, rx) = mpsc::channel(4);
        let waypoint = hello.role == ROLE_WAYPOINT;
        let sub = Subscriber {
            stream_id: shared.counters.open_stream(&hello.node_name, waypoint),
            waypoint,
            node: hello.node_name,
            shared: shared.clone(),
            models: shared.current.clone(),
            acked: None,
            in_flight: None,
            considered: 0,
            tx,
            full_turn: None,
        };
        tokio::spawn(sub.run(hello.resume, inbound));
        let stream = futures::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|item| (item, rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Sleeps until `at` (forever without one).
async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Whether a stream error is the client's message failing to decode (a bad
/// request), as opposed to the transport ending (client gone).
fn is_decode_error(s: &Status) -> bool {
    s.code() == tonic::Code::Internal && s.message().contains("decode")
}

struct Subscriber {
    /// This stream's entry in `XdsCounters`.
    stream_id: u64,
    node: String,
    waypoint: bool,
    shared: Arc<Shared>,
    models: watch::Receiver<Arc<Versioned>>,
    /// What the client has applied (and we diff against).
    acked: Option<(u64, NodeView)>,
    /// The one update awaiting ACK/NACK, and when it was sent.
    in_flight: Option<(u64, NodeView, Instant)>,
    /// Newest version already turned into an update (or found empty).
    considered: u64,
    tx: mpsc::Sender<Result<ConfigUpdate, Status>>,
    /// This stream's turn for a full snapshot, held until the client
    /// answers it or [`FULL_SNAPSHOT_TURN`] passes.
    full_turn: Option<(OwnedSemaphorePermit, tokio::time::Instant)>,
}

/// Client went away.
struct Gone;

/// Counts the stream as open and keeps its status entry while it lives.
struct SubscriberGauge(Arc<XdsCounters>, u64);

impl Drop for SubscriberGauge {
    fn drop(&mut self) {
        self.0.subscribers.fetch_sub(1, Ordering::Relaxed);
        self.0.lock_streams().remove(&self.1);
    }
}

impl Subscriber {
    async fn run(mut self, resume: Option<ResumePoint>, mut inbound: Streaming<SubscribeRequest>) {
        self.shared
            .counters
            .subscribers
            .fetch_add(1, Ordering::Relaxed);
        let _gauge = SubscriberGauge(self.shared.counters.clone(), self.stream_id);
        info!(component = "xds", node = %self.node, "config subscriber connected");
        if self.start(resume).await.is_err() {
            return;
        }
        let mut models_open = true;
        loop {
            let turn_ends = self.full_turn.as_ref().map(|(_, ends)| *ends);
            tokio::select! {
                _ = sleep_until_some(turn_ends), if turn_ends.is_some() => {
                    warn!(component = "xds", node = %self.node, "no answer to the full snapshot within {FULL_SNAPSHOT_TURN:?}; giving its turn to the next stream");
                    self.full_turn = None;
                    continue;
                }
                msg = inbound.message() => match msg {
                    Ok(Some(req)) => {
                        if let Err(status) = self.on_request(req) {
                            self.shared.counters.rejected.fetch_add(1, Ordering::Relaxed);
                            let _ = self.tx.send(Err(status)).await;
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(s) if !is_decode_error(&s) => {
                        info!(component = "xds", node = %self.node, code = ?s.code(), error = s.message(), "config subscriber went away");
                        break;
                    }
                    Err(s) => {
                        self.shared.counters.rejected.fetch_add(1, Ordering::Relaxed);
                        warn!(component = "xds", node = %self.node, error = s.message(), "bad request on config stream; closing it");
                        let _ = self.tx.send(Err(Status::invalid_argument(format!("undecodable SubscribeRequest: {}", s.message())))).await;
                        return;
                    }
                },
                r = self.models.changed(), if models_open && self.in_flight.is_none() => {
                    if r.is_err() { models_open = false; }
                }
            }
            if self.in_flight.is_none() && self.push_latest().await.is_err() {
                break;
            }
        }
        self.shared
            .counters
            .disconnects
            .fetch_add(1, Ordering::Relaxed);
        info!(component = "xds", node = %self.node, "config subscriber disconnected");
    }

    async fn start(&mut self, resume: Option<ResumePoint>) -> Result<(), Gone> {
        let base = resume
            .filter(|r| r.instance_id == self.shared.instance_id)
            .and_then(|r| self.shared.at_version(r.version))
            .map(|v| (v.version, NodeView::new(v, &self.node, self.waypoint)));
        if base.is_none() {
            self.take_full_turn().await?;
        }
        let current = self.models.borrow_and_update().clone();
        let view = NodeView::new(current.clone(), &self.node, self.waypoint);
        let changes = base
            .as_ref()
            .and_then(|(v, _)| self.shared.changes_between(*v, current.version));
        let update = update_between(
            &self.shared.instance_id,
            base.as_ref().map(|(_, v)| v),
            &view,
            changes.as_ref(),
        );
        match &base {
            Some((v, _)) => {
                info!(component = "xds", node = %self.node, from = v, to = current.version, "resuming config stream with a delta")
            }
            None => {
                debug!(component = "xds", node = %self.node, version = current.version, "sending full config")
            }
        }
        self.considered = current.version;
        self.acked = base;
        self.send(update, view).await
    }

    /// Sends the newest version if it is new and means something for this
    /// node.
    async fn push_latest(&mut self) -> Result<(), Gone> {
        let current = self.models.borrow_and_update().clone();
        if current.version <= self.considered {
            return Ok(());
        }
        if self.acked.is_none() && self.full_turn.is_none() {
            // Nothing acknowledged yet (the first snapshot was rejected):
            // this one is full too.
            self.take_full_turn().await?;
        }
        self.considered = current.version;
        let changes = self
            .acked
            .as_ref()
            .and_then(|(v, _)| self.shared.changes_between(*v, current.version));
        let view = NodeView::new(current, &self.node, self.waypoint);
        let old = self.acked.as_ref().map(|(_, v)| v);
        let update = update_between(&self.shared.instance_id, old, &view, changes.as_ref());
        if old.is_some_and(|o| is_noop(&update, o)) {
            return Ok(());
        }
        self.send(update, view).await
    }

    /// Waits for a turn to send a full snapshot.
    async fn take_full_turn(&mut self) -> Result<(), Gone> {
        let permit = self
            .shared
            .full_snapshots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Gone)?;
        self.full_turn = Some((permit, tokio::time::Instant::now() + FULL_SNAPSHOT_TURN));
        Ok(())
    }

    async fn send(&mut self, update: ConfigUpdate, view: NodeView) -> Result<(), Gone> {
        let c = &self.shared.counters;
        c.pushes.fetch_add(1, Ordering::Relaxed);
        if update.full {
            c.full_pushes.fetch_add(1, Ordering::Relaxed);
        }
        c.bytes_pushed.fetch_add(
            prost::Message::encoded_len(&update) as u64,
            Ordering::Relaxed,
        );
        c.push_latency
            .observe(view.base.created.elapsed().as_secs_f64());
        let version = update.version;
        c.update_stream(self.stream_id, |s| {
            s.sent_version = version;
            s.in_flight = true;
        });
        self.in_flight = Some((update.version, view, Instant::now()));
        self.tx.send(Ok(update)).await.map_err(|_| Gone)
    }

    fn on_request(&mut self, req: SubscribeRequest) -> Result<(), Status> {
        if matches!(req.request, Some(Req::Ack(_) | Req::Nack(_))) {
            // One update is in flight at a time: an answer is to it.
            self.full_turn = None;
        }
        match req.request {
            Some(Req::Ack(ack)) => match self.in_flight.take() {
                Some((v, view, sent)) if v == ack.version => {
                    let c = &self.shared.counters;
                    c.acks.fetch_add(1, Ordering::Relaxed);
                    c.apply_latency.observe(sent.elapsed().as_secs_f64());
                    c.update_stream(self.stream_id, |s| {
                        s.acked_version = v;
                        s.acked_unix = unix_now();
                        s.in_flight = false;
                    });
                    debug!(component = "xds", node = %self.node, version = v, "config acknowledged");
                    self.acked = Some((v, view));
                }
                other => {
                    warn!(component = "xds", node = %self.node, version = ack.version, "ACK for a version that is not in flight; ignored");
                    self.in_flight = other;
                }
            },
            Some(Req::Nack(nack)) => match self.in_flight.take() {
                Some((v, _, _)) if v == nack.version => {
                    let c = &self.shared.counters;
                    c.nacks.fetch_add(1, Ordering::Relaxed);
                    c.update_stream(self.stream_id, |s| {
                        s.in_flight = false;
                        s.last_nack = Some(NackStatus {
                            version: v,
                            error: nack.error.clone(),
                            unix: unix_now(),
                        });
                    });
                    warn!(component = "xds", node = %self.node, version = v, error = %nack.error, "config rejected by the client; it keeps its last good config");
                }
                other => {
                    warn!(component = "xds", node = %self.node, version = nack.version, error = %nack.error, "NACK for a version that is not in flight; ignored");
                    self.in_flight = other;
                }
            },
            Some(Req::Hello(_)) => {
                return Err(Status::invalid_argument(
                    "Hello may only be the first SubscribeRequest",
                ))
            }
            None => {
                return Err(Status::invalid_argument(
                    "empty SubscribeRequest (want Ack or Nack)",
                ))
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_api::model::{AuthorizationPolicy, Namespace, Service, Workload};

    fn workload(ns: &str, name: &str, node: &str, ip: [u8; 4]) -> Workload {
        Workload {
            uid: format!("{ns}-{name}"),
            name: name.into(),
            namespace: ns.into(),
            service_account: "default".into(),
            node: node.into(),
            ips: vec![std::net::IpAddr::from(ip)],
            ..Default::default()
        }
    }

    fn policy(ns: &str, name: &str) -> AuthorizationPolicy {
        AuthorizationPolicy {
            name: name.into(),
            namespace: ns.into(),
            ..Default::default()
        }
    }

    /// A sequence of models, each a small change of the one before: pods
    /// added, changed, removed, moved onto and off a node (so a node's
    /// policy namespaces move), policies and services added and removed.
    fn models() -> Vec<MeshModel> {
        let mut m = MeshModel {
            trust_domain: "cluster.local".into(),
            namespaces: ["a", "b", "c"]
                .map(|n| Namespace {
                    name: n.into(),
                    ..Default::default()
                })
                .to_vec(),
            workloads: vec![
                workload("a", "a1", "n1", [10, 0, 0, 1]),
                workload("b", "b1", "n2", [10, 0, 0, 2]),
            ],
            policies: vec![policy("a", "pa"), policy("b", "pb"), policy("c", "pc")],
            ..Default::default()
        };
        let mut out = vec![m.clone()];
        let mut step = |f: &dyn Fn(&mut MeshModel)| {
            f(&mut m);
            out.push(m.clone());
        };
        step(&|m| m.workloads.push(workload("a", "a2", "n1", [10, 0, 0, 3])));
        step(&|m| {
            m.workloads[0].labels.insert("v".into(), "2".into());
        });
        step(&|m| m.workloads.push(workload("c", "c1", "n1", [10, 0, 0, 4])));
        step(&|m| {
            m.services.push(Service {
                name: "s".into(),
                namespace: "a".into(),
                vips: vec![std::net::IpAddr::from([10, 96, 0, 1])],
                ..Default::default()
            })
        });
        step(&|m| m.policies.retain(|p| p.name != "pc"));
        step(&|m| m.workloads.retain(|w| w.name != "c1"));
        step(&|m| m.workloads[1].node = "n1".into());
        step(&|m| m.policies.push(policy("b", "pb2")));
        step(&|m| m.services.clear());
        step(&|_| {});
        out
    }

    /// The delta built from the changed keys alone is the delta a whole
    /// diff finds, for every pair of versions, every node and both roles.
    #[test]
    fn deltas_from_changed_keys_equal_whole_diffs() {
        let bundle = TrustBundle { roots: Vec::new() };
        let mut versions: Vec<Arc<Versioned>> = Vec::new();
        let models = models();
        for (i, m) in models.iter().enumerate() {
            let previous = versions.last().map(|v| (&**v, &models[i - 1]));
            let v = Versioned::new(i as u64 + 1, m, &bundle, previous);
            // Made from the one before, it holds what one made from the
            // model alone holds.
            let whole = Versioned::new(i as u64 + 1, m, &bundle, None);
            assert!(
                v.namespaces == whole.namespaces
                    && v.workloads == whole.workloads
                    && v.services == whole.services
                    && v.policies == whole.policies
                    && v.pods_per_node_namespace == whole.pods_per_node_namespace
                    && v.node_namespaces == whole.node_namespaces,
                "version {} made from the one before differs from one made whole",
                i + 1
            );
            versions.push(Arc::new(v));
        }
        let mut checked = 0;
        for from in &versions {
            for to in versions.iter().filter(|t| t.version > from.version) {
                let changes =
                    union_of_changes(versions.iter().map(|v| &**v), from.version, to.version)
                        .expect("every version is in the history");
                for node in ["n1", "n2", "n3"] {
                    for waypoint in [false, true] {
                        let old = NodeView::new(from.clone(), node, waypoint);
                        let new = NodeView::new(to.clone(), node, waypoint);
                        let whole = update_between("i", Some(&old), &new, None);
                        let keyed = update_between("i", Some(&old), &new, Some(&changes));
                        assert_eq!(
                            keyed, whole,
                            "{} -> {}, node {node}, waypoint {waypoint}",
                            from.version, to.version
                        );
                        checked += 1;
                    }
                }
            }
        }
        assert_eq!(checked, 55 * 6, "every pair of the 11 versions");
        // A gap in the history: no change set, so a whole diff.
        let gapped: Vec<&Versioned> = versions
            .iter()
            .map(|v| &**v)
            .filter(|v| v.version != 3)
            .collect();
        assert!(union_of_changes(gapped.into_iter(), 1, 5).is_none());
    }
}
