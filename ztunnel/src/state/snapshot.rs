//! One indexed version of the mesh model.
//!
//! Workloads and Services, the part that grows with the cluster, live in
//! persistent maps: a new version shares everything it did not change with
//! the one before, so a pod change costs that pod's entries and the
//! endpoint lists of its namespace (Services select within their own
//! namespace), not a copy of the model. AuthorizationPolicies and
//! PeerAuthentications apply within their own namespace, so they are kept
//! as one small model per namespace: a policy change rebuilds that
//! namespace's, and a connection's check reads only its destination's
//! namespace. The rest (namespaces, waypoints, routes) is a small model
//! shared by `Arc` until one of those changes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use imbl::OrdMap;
use weft_api::authorize::service_waypoint;
use weft_api::config_cache::{Changes, ConfigCache, Key};
use weft_api::model::{AuthorizationPolicy, Service, Workload, GATEWAY_NAME_LABEL};
use weft_api::{Identity, MeshModel};

pub struct Snapshot {
    pub version: u64,
    /// Everything but the workloads, Services, AuthorizationPolicies and
    /// PeerAuthentications (empty in it): read those through the methods
    /// below.
    pub model: Arc<MeshModel>,
    /// Each namespace's AuthorizationPolicies and PeerAuthentications, as
    /// a model holding only those (namespaces without any are absent).
    policies: imbl::HashMap<String, Arc<MeshModel>>,
    workloads: OrdMap<Key, Arc<Workload>>,
    services: OrdMap<Key, Arc<Service>>,
    /// The workloads with each address (one, but for a misconfiguration:
    /// then the last in key order answers).
    workload_by_ip: imbl::HashMap<IpAddr, Vec<Key>>,
    service_by_vip: imbl::HashMap<IpAddr, Vec<Key>>,
    /// What is derived per namespace, by namespace.
    namespaces: imbl::HashMap<String, Arc<NamespaceIndex>>,
    round_robin: AtomicUsize,
}

/// What one namespace's workloads and Services give: a Service selects
/// pods of its own namespace only.
#[derive(Default)]
struct NamespaceIndex {
    /// Endpoint workloads of each Service, by Service name.
    endpoints: HashMap<String, Vec<Arc<Workload>>>,
    /// Pods of each waypoint, by Gateway name.
    waypoint_pods: HashMap<String, Vec<Arc<Workload>>>,
    /// Workloads (by name) that accept traffic only from a waypoint: the
    /// waypoint's identity and `namespace/name`, in Service key order.
    waypoint_required: HashMap<String, Vec<(Identity, String)>>,
}

fn in_namespace<'a, T>(
    map: &'a OrdMap<Key, Arc<T>>,
    ns: &'a str,
) -> impl Iterator<Item = &'a Arc<T>> + 'a {
    map.range((ns.to_owned(), String::new())..)
        .take_while(move |(k, _)| k.0 == ns)
        .map(|(_, v)| v)
}

impl NamespaceIndex {
    fn build(
        ns: &str,
        workloads: &OrdMap<Key, Arc<Workload>>,
        services: &OrdMap<Key, Arc<Service>>,
        rest: &MeshModel,
    ) -> Self {
        let pods: Vec<&Arc<Workload>> = in_namespace(workloads, ns)
            .filter(|w| !w.ips.is_empty())
            .collect();
        let mut idx = NamespaceIndex::default();
        for w in &pods {
            if let Some(gw) = w.labels.get(GATEWAY_NAME_LABEL) {
                idx.waypoint_pods
                    .entry(gw.clone())
                    .or_default()
                    .push(Arc::clone(w));
            }
        }
        for s in in_namespace(services, ns) {
            let eps: Vec<Arc<Workload>> = pods
                .iter()
                .filter(|w| s.selects(w))
                .map(|w| Arc::clone(w))
                .collect();
            if let Some(entry) = service_waypoint(rest, s) {
                for w in &eps {
                    let list = idx.waypoint_required.entry(w.name.clone()).or_default();
                    if !list.contains(&entry) {
                        list.push(entry.clone());
                    }
                }
            }
            idx.endpoints.insert(s.name.clone(), eps);
        }
        idx
    }

    fn is_empty(&self) -> bool {
        self.endpoints.is_empty() && self.waypoint_pods.is_empty()
    }
}

/// Adds `key` under each of `addrs`.
fn index_addrs(map: &mut imbl::HashMap<IpAddr, Vec<Key>>, addrs: &[IpAddr], key: &Key) {
    for a in addrs {
        let keys = map.entry(*a).or_default();
        if let Err(at) = keys.binary_search(key) {
            keys.insert(at, key.clone());
        }
    }
}

/// Removes `key` from under each of `addrs`.
fn unindex_addrs(map: &mut imbl::HashMap<IpAddr, Vec<Key>>, addrs: &[IpAddr], key: &Key) {
    for a in addrs {
        if let Some(keys) = map.get_mut(a) {
            keys.retain(|k| k != key);
            if keys.is_empty() {
                map.remove(a);
            }
        }
    }
}

/// Resources of one kind by key, and the keys under each of their
/// addresses.
type Indexed<T> = (OrdMap<Key, Arc<T>>, imbl::HashMap<IpAddr, Vec<Key>>);

/// `map` and its address index `by_addr` with each of `keys` as it is now
/// in `source` (absent there: removed).
fn patch<T>(
    map: &OrdMap<Key, Arc<T>>,
    by_addr: &imbl::HashMap<IpAddr, Vec<Key>>,
    keys: &[Key],
    source: &BTreeMap<Key, Arc<T>>,
    addrs: impl Fn(&T) -> &[IpAddr],
) -> Indexed<T> {
    let (mut map, mut by_addr) = (map.clone(), by_addr.clone());
    for k in keys {
        if let Some(old) = map.remove(k) {
            unindex_addrs(&mut by_addr, addrs(&old), k);
        }
        if let Some(new) = source.get(k) {
            index_addrs(&mut by_addr, addrs(new), k);
            map.insert(k.clone(), new.clone());
        }
    }
    (map, by_addr)
}

/// A workload plus what the data plane derives from it.
#[derive(Clone, Copy)]
pub struct WorkloadRef<'a> {
    pub workload: &'a Workload,
    pub captured: bool,
}

/// Where an outbound connection goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutboundRoute {
    /// To an enrolled workload: HBONE to `hbone`, CONNECT `target`.
    Hbone {
        target: SocketAddr,
        hbone: SocketAddr,
        identity: Identity,
        workload: String,
        namespace: String,
        service: Option<String>,
    },
    /// Outside the mesh (or to a workload that is not enrolled): plain TCP.
    Passthrough {
        target: SocketAddr,
        service: Option<String>,
    },
    /// A Service with no endpoint for the port: refuse.
    NoEndpoint { service: String },
}

impl Default for Snapshot {
    fn default() -> Self {
        Snapshot::new(MeshModel::default(), 0)
    }
}

/// The policy model of `namespace` in `by_ns`, made empty if absent.
fn namespace_model<'a>(
    by_ns: &'a mut HashMap<String, MeshModel>,
    namespace: &str,
    trust_domain: &str,
) -> &'a mut MeshModel {
    by_ns
        .entry(namespace.to_owned())
        .or_insert_with(|| MeshModel {
            trust_domain: trust_domain.to_owned(),
            ..MeshModel::default()
        })
}

/// The model of a namespace without policies.
static NO_POLICIES: std::sync::LazyLock<MeshModel> = std::sync::LazyLock::new(MeshModel::default);

impl Snapshot {
    /// Indexes a whole model (from a file, or a test). An empty trust
    /// domain is the default one, as in a model read from YAML and in the
    /// config cache.
    pub fn new(mut model: MeshModel, version: u64) -> Self {
        if model.trust_domain.is_empty() {
            model.trust_domain = weft_api::identity::DEFAULT_TRUST_DOMAIN.to_owned();
        }
        let workloads = std::mem::take(&mut model.workloads)
            .into_iter()
            .map(|w| ((w.namespace.clone(), w.name.clone()), Arc::new(w)))
            .collect();
        let services = std::mem::take(&mut model.services)
            .into_iter()
            .map(|s| ((s.namespace.clone(), s.name.clone()), Arc::new(s)))
            .collect();
        let mut by_ns: HashMap<String, MeshModel> = HashMap::new();
        for p in std::mem::take(&mut model.policies) {
            namespace_model(&mut by_ns, &p.namespace, &model.trust_domain)
                .policies
                .push(p);
        }
        for p in std::mem::take(&mut model.peer_authentications) {
            namespace_model(&mut by_ns, &p.namespace, &model.trust_domain)
                .peer_authentications
                .push(p);
        }
        let policies = by_ns.into_iter().map(|(k, v)| (k, Arc::new(v))).collect();
        Self::build(Arc::new(model), policies, workloads, services, version, 0)
    }

    /// Indexes the whole of `cache`, sharing its workloads and services.
    pub fn from_cache(cache: &ConfigCache, version: u64) -> Self {
        let workloads = cache
            .workloads()
            .iter()
            .map(|(k, w)| (k.clone(), w.clone()))
            .collect();
        let services = cache
            .services()
            .iter()
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        let policies = cache
            .policy_namespaces()
            .into_iter()
            .map(|ns| (ns.to_owned(), Arc::new(cache.namespace_policies(ns))))
            .collect();
        Self::build(
            Arc::new(cache.global_model()),
            policies,
            workloads,
            services,
            version,
            0,
        )
    }

    /// Indexes `workloads` and `services` whole: their addresses and every
    /// namespace's index.
    fn build(
        model: Arc<MeshModel>,
        policies: imbl::HashMap<String, Arc<MeshModel>>,
        workloads: OrdMap<Key, Arc<Workload>>,
        services: OrdMap<Key, Arc<Service>>,
        version: u64,
        round_robin: usize,
    ) -> Self {
        let mut workload_by_ip = imbl::HashMap::new();
        for (k, w) in &workloads {
            index_addrs(&mut workload_by_ip, &w.ips, k);
        }
        let mut service_by_vip = imbl::HashMap::new();
        for (k, s) in &services {
            index_addrs(&mut service_by_vip, &s.vips, k);
        }
        Self {
            version,
            model,
            policies,
            workloads,
            services,
            workload_by_ip,
            service_by_vip,
            namespaces: imbl::HashMap::new(),
            round_robin: AtomicUsize::new(round_robin),
        }
        .with_namespace_indexes(None)
    }

    /// This version with the index of each of `only`'s namespaces built
    /// again from its workloads and Services (every namespace: `None`).
    fn with_namespace_indexes(mut self, only: Option<BTreeSet<&str>>) -> Self {
        let names: BTreeSet<&str> = match only {
            Some(names) => names,
            None => {
                self.namespaces = imbl::HashMap::new();
                self.workloads
                    .keys()
                    .chain(self.services.keys())
                    .map(|k| k.0.as_str())
                    .collect()
            }
        };
        for ns in names {
            let idx = NamespaceIndex::build(ns, &self.workloads, &self.services, &self.model);
            if idx.is_empty() {
                self.namespaces.remove(ns);
            } else {
                self.namespaces.insert(ns.to_owned(), Arc::new(idx));
            }
        }
        self
    }

    /// The next version: this one with `changes` applied from `cache`.
    /// Costs what the changes touch (their entries, and the index of each
    /// namespace they are in); a full snapshot, or a change to waypoints
    /// or the trust domain (which every namespace's waypoint requirements
    /// read), rebuilds the namespace indexes whole.
    pub fn update(&self, cache: &ConfigCache, changes: &Changes, version: u64) -> Self {
        let round_robin = self.round_robin.load(Ordering::Relaxed);
        if changes.full {
            let mut s = Self::from_cache(cache, version);
            s.round_robin = AtomicUsize::new(round_robin);
            return s;
        }
        let model = if changes.rest {
            Arc::new(cache.global_model())
        } else {
            self.model.clone()
        };
        let mut policies = self.policies.clone();
        for ns in &changes.policies {
            let m = cache.namespace_policies(ns);
            if m.policies.is_empty() && m.peer_authentications.is_empty() {
                policies.remove(ns);
            } else {
                policies.insert(ns.clone(), Arc::new(m));
            }
        }
        let (workloads, workload_by_ip) = patch(
            &self.workloads,
            &self.workload_by_ip,
            &changes.workloads,
            cache.workloads(),
            |w| &w.ips,
        );
        let (services, service_by_vip) = patch(
            &self.services,
            &self.service_by_vip,
            &changes.services,
            cache.services(),
            |s| &s.vips,
        );
        let dirty = changes
            .workloads
            .iter()
            .chain(&changes.services)
            .map(|k| k.0.as_str())
            .collect();
        Self {
            version,
            model,
            policies,
            workloads,
            services,
            workload_by_ip,
            service_by_vip,
            namespaces: self.namespaces.clone(),
            round_robin: AtomicUsize::new(round_robin),
        }
        .with_namespace_indexes((!changes.waypoints).then_some(dirty))
    }

    /// The whole model (a copy: for dumps, not for the data path).
    pub fn to_model(&self) -> MeshModel {
        let mut namespaces: Vec<_> = self.policies.iter().collect();
        namespaces.sort_by(|a, b| a.0.cmp(b.0));
        MeshModel {
            workloads: self.workloads.values().map(|w| (**w).clone()).collect(),
            services: self.services.values().map(|s| (**s).clone()).collect(),
            policies: namespaces
                .iter()
                .flat_map(|(_, m)| m.policies.iter().cloned())
                .collect(),
            peer_authentications: namespaces
                .iter()
                .flat_map(|(_, m)| m.peer_authentications.iter().cloned())
                .collect(),
            ..(*self.model).clone()
        }
    }

    /// The AuthorizationPolicies and PeerAuthentications of `namespace`,
    /// as a model holding only those: what `weft_api::authorize` decides
    /// a connection to a pod of that namespace from.
    pub fn policy_model(&self, namespace: &str) -> &MeshModel {
        self.policies
            .get(namespace)
            .map(|m| &**m)
            .unwrap_or(&NO_POLICIES)
    }

    pub fn workload_count(&self) -> usize {
        self.workloads.len()
    }

    pub fn service_count(&self) -> usize {
        self.services.len()
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<WorkloadRef<'_>> {
        let key = self.workload_by_ip.get(&ip)?.last()?;
        self.workload_ref(self.workloads.get(key)?)
    }

    fn workload_ref<'a>(&'a self, w: &'a Workload) -> Option<WorkloadRef<'a>> {
        Some(WorkloadRef {
            workload: w,
            captured: self.model.is_captured(w),
        })
    }

    pub fn workload(&self, namespace: &str, name: &str) -> Option<WorkloadRef<'_>> {
        let w = self
            .workloads
            .get(&(namespace.to_owned(), name.to_owned()))?;
        self.workload_ref(w)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Service> {
        let key = self.service_by_vip.get(&ip)?.last()?;
        self.services.get(key).map(|s| &**s)
    }

    pub fn identity(&self, w: &Workload) -> Identity {
        self.model.identity_of(w)
    }

    fn endpoints(&self, svc: &Service) -> &[Arc<Workload>] {
        self.namespaces
            .get(svc.namespace.as_str())
            .and_then(|idx| idx.endpoints.get(&svc.name))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    fn waypoint_pods(&self, namespace: &str, waypoint: &str) -> &[Arc<Workload>] {
        self.namespaces
            .get(namespace)
            .and_then(|idx| idx.waypoint_pods.get(waypoint))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    /// Decides where a connection to `dst` goes.
    pub fn route_outbound(&self, dst: SocketAddr) -> OutboundRoute {
        if let Some(svc) = self.service_by_vip(dst.ip()) {
            let Some(port) = svc.ports.iter().find(|p| p.port == dst.port()) else {
                return OutboundRoute::NoEndpoint {
                    service: format!("{}/{}", svc.namespace, svc.name),
                };
            };
            if let Some(wp) = &svc.waypoint {
                let service = format!("{}.{}", svc.name, svc.namespace);
                return self.route_to_waypoint(&svc.namespace, wp, dst, Some(service));
            }
            let eps = self.endpoints(svc);
            if eps.is_empty() {
                return OutboundRoute::NoEndpoint {
                    service: format!("{}/{}", svc.namespace, svc.name),
                };
            }
            let w = &eps[self.round_robin.fetch_add(1, Ordering::Relaxed) % eps.len()];
            let ip = pick_family(&w.ips, dst.ip());
            return self.route_to_workload(
                w,
                SocketAddr::new(ip, port.target()),
                Some(format!("{}.{}", svc.name, svc.namespace)),
            );
        }
        match self.workload_by_ip(dst.ip()) {
            // A pod that takes traffic only from its waypoint is reached
            // through it when dialled by address too (the waypoint forwards
            // such a request unrouted, its L7 policy applied): through the
            // first of its waypoints that has a pod.
            Some(w) => {
                let required = self.required_waypoints(w.workload);
                let names = || {
                    required
                        .iter()
                        .map(|(_, wp)| wp.split_once('/').unwrap_or(("", wp)))
                };
                match names()
                    .find(|(ns, name)| !self.waypoint_pods(ns, name).is_empty())
                    .or_else(|| names().next())
                {
                    Some((ns, name)) => self.route_to_waypoint(ns, name, dst, None),
                    None => self.route_to_workload(w.workload, dst, None),
                }
            }
            None => OutboundRoute::Passthrough {
                target: dst,
                service: None,
            },
        }
    }

    /// Through waypoint `namespace/waypoint`: HBONE to one of its pods,
    /// CONNECT to the address the app dialled (the waypoint routes it). No
    /// waypoint pod: refuse rather than bypass its policy.
    fn route_to_waypoint(
        &self,
        namespace: &str,
        waypoint: &str,
        dst: SocketAddr,
        service: Option<String>,
    ) -> OutboundRoute {
        let pods = self.waypoint_pods(namespace, waypoint);
        if pods.is_empty() {
            return OutboundRoute::NoEndpoint {
                service: format!(
                    "{} (waypoint {namespace}/{waypoint} has no pod)",
                    service.as_deref().unwrap_or(&dst.to_string())
                ),
            };
        }
        let w = &pods[self.round_robin.fetch_add(1, Ordering::Relaxed) % pods.len()];
        let ip = pick_family(&w.ips, dst.ip());
        OutboundRoute::Hbone {
            target: dst,
            hbone: SocketAddr::new(ip, weft_api::ports::HBONE),
            identity: self.identity(w),
            workload: w.name.clone(),
            namespace: w.namespace.clone(),
            service,
        }
    }

    /// The waypoints `w` accepts traffic only from (identity and
    /// `namespace/name` each), when Services selecting it use one; empty
    /// when it accepts any client.
    pub fn required_waypoints(&self, w: &Workload) -> &[(Identity, String)] {
        self.namespaces
            .get(w.namespace.as_str())
            .and_then(|idx| idx.waypoint_required.get(&w.name))
            .map(Vec::as_slice)
            .unwrap_or_default()
    }

    fn route_to_workload(
        &self,
        w: &Workload,
        target: SocketAddr,
        service: Option<String>,
    ) -> OutboundRoute {
        if !self.model.is_captured(w) {
            return OutboundRoute::Passthrough { target, service };
        }
        OutboundRoute::Hbone {
            target,
            hbone: SocketAddr::new(target.ip(), weft_api::ports::HBONE),
            identity: self.identity(w),
            workload: w.name.clone(),
            namespace: w.namespace.clone(),
            service,
        }
    }

    /// Policies of `w`'s namespace that select it and that the ztunnel
    /// enforces.
    pub fn policies_for<'a>(
        &'a self,
        w: &'a Workload,
    ) -> impl Iterator<Item = &'a AuthorizationPolicy> + 'a {
        weft_api::authorize::l4_policies(self.policy_model(&w.namespace), w)
    }

    /// One line per index entry in a stable order (what each address
    /// answers, each Service's endpoints, each waypoint's pods and each
    /// workload's required waypoints): two versions that hold the same
    /// model list the same lines however each was built.
    pub fn indexes(&self) -> Vec<String> {
        let names = |ws: &[Arc<Workload>]| -> Vec<String> {
            ws.iter()
                .map(|w| format!("{}/{}", w.namespace, w.name))
                .collect()
        };
        let mut out = Vec::new();
        let mut ips: Vec<_> = self.workload_by_ip.keys().copied().collect();
        ips.sort();
        for ip in ips {
            let w = self
                .workload_by_ip(ip)
                .map(|w| (&w.workload.namespace, &w.workload.name, w.captured));
            out.push(format!("ip {ip} -> {w:?}"));
        }
        let mut vips: Vec<_> = self.service_by_vip.keys().copied().collect();
        vips.sort();
        for vip in vips {
            let s = self.service_by_vip(vip).map(|s| (&s.namespace, &s.name));
            out.push(format!("vip {vip} -> {s:?}"));
        }
        for s in self.services.values() {
            out.push(format!(
                "endpoints {}/{}: {:?}",
                s.namespace,
                s.name,
                names(self.endpoints(s))
            ));
        }
        let mut policies: Vec<_> = self.policies.iter().collect();
        policies.sort_by(|a, b| a.0.cmp(b.0));
        for (ns, m) in policies {
            let names = |keys: Vec<&str>| keys.join(",");
            out.push(format!(
                "policies {ns}: [{}] peer authentications: [{}]",
                names(m.policies.iter().map(|p| p.name.as_str()).collect()),
                names(
                    m.peer_authentications
                        .iter()
                        .map(|p| p.name.as_str())
                        .collect()
                )
            ));
        }
        let mut namespaces: Vec<_> = self.namespaces.iter().collect();
        namespaces.sort_by(|a, b| a.0.cmp(b.0));
        for (ns, idx) in namespaces {
            let mut pods: Vec<_> = idx.waypoint_pods.iter().collect();
            pods.sort_by(|a, b| a.0.cmp(b.0));
            for (gw, ws) in pods {
                out.push(format!("waypoint {ns}/{gw}: {:?}", names(ws)));
            }
        }
        for w in self.workloads() {
            let required = self.required_waypoints(w);
            if !required.is_empty() {
                out.push(format!("required {}/{}: {required:?}", w.namespace, w.name));
            }
        }
        out
    }

    /// Every workload, in (namespace, name) order.
    pub fn workloads(&self) -> impl Iterator<Item = &Workload> + '_ {
        self.workloads.values().map(|w| &**w)
    }

    /// Workloads scheduled on `node`.
    pub fn workloads_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.workloads().filter(move |w| w.node == node)
    }
}

fn pick_family(ips: &[IpAddr], like: IpAddr) -> IpAddr {
    ips.iter()
        .copied()
        .find(|ip| ip.is_ipv4() == like.is_ipv4())
        .unwrap_or(ips[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> Snapshot {
        let m = MeshModel::from_yaml(
            r#"
namespaces:
  - { name: shop, labels: { weft.dev/dataplane-mode: ambient } }
  - { name: plain }
workloads:
  - { name: web, namespace: shop, service_account: web, node: n1, ips: [10.1.0.2], labels: { app: web } }
  - { name: db, namespace: plain, node: n2, ips: [10.1.1.2], labels: { app: db } }
services:
  - { name: web, namespace: shop, vips: [10.96.0.1], ports: [{ port: 80, target_port: 8080 }], selector: { app: web } }
  - { name: db, namespace: plain, vips: [10.96.0.2], ports: [{ port: 5432 }], selector: { app: db } }
  - { name: empty, namespace: shop, vips: [10.96.0.3], ports: [{ port: 80 }], selector: { app: none } }
"#,
        )
        .unwrap();
        Snapshot::new(m, 1)
    }

    #[test]
    fn service_vip_to_enrolled_endpoint_is_hbone() {
        let s = snap();
        match s.route_outbound("10.96.0.1:80".parse().unwrap()) {
            OutboundRoute::Hbone {
                target,
                hbone,
                identity,
                service,
                ..
            } => {
                assert_eq!(target, "10.1.0.2:8080".parse().unwrap());
                assert_eq!(hbone, "10.1.0.2:15008".parse().unwrap());
                assert_eq!(
                    identity.to_string(),
                    "spiffe://cluster.local/ns/shop/sa/web"
                );
                assert_eq!(service.as_deref(), Some("web.shop"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn non_mesh_and_unknown_destinations_pass_through() {
        let s = snap();
        assert!(matches!(
            s.route_outbound("10.96.0.2:5432".parse().unwrap()),
            OutboundRoute::Passthrough { target, .. } if target == "10.1.1.2:5432".parse().unwrap()
        ));
        assert!(matches!(
            s.route_outbound("192.0.2.1:443".parse().unwrap()),
            OutboundRoute::Passthrough { .. }
        ));
        assert!(matches!(
            s.route_outbound("10.96.0.3:80".parse().unwrap()),
            OutboundRoute::NoEndpoint { .. }
        ));
        assert!(matches!(
            s.route_outbound("10.96.0.1:81".parse().unwrap()),
            OutboundRoute::NoEndpoint { .. }
        ));
    }

    #[test]
    fn service_with_waypoint_goes_through_it_and_its_pods_require_it() {
        let m = MeshModel::from_yaml(
            r#"
namespaces:
  - { name: shop, labels: { weft.dev/dataplane-mode: ambient } }
workloads:
  - { name: web, namespace: shop, service_account: web, node: n1, ips: [10.1.0.2], labels: { app: web } }
  - { name: wp-0, namespace: shop, service_account: wp, node: n1, ips: [10.1.0.9], labels: { gateway.networking.k8s.io/gateway-name: wp, weft.dev/dataplane-mode: none } }
services:
  - { name: web, namespace: shop, vips: [10.96.0.1], ports: [{ port: 80, target_port: 8080 }], selector: { app: web }, waypoint: wp }
  - { name: lost, namespace: shop, vips: [10.96.0.2], ports: [{ port: 80 }], selector: { app: web }, waypoint: gone }
waypoints:
  - { name: wp, namespace: shop, service_account: wp }
"#,
        )
        .unwrap();
        let s = Snapshot::new(m, 1);
        match s.route_outbound("10.96.0.1:80".parse().unwrap()) {
            OutboundRoute::Hbone {
                target,
                hbone,
                identity,
                ..
            } => {
                assert_eq!(target, "10.96.0.1:80".parse().unwrap());
                assert_eq!(hbone, "10.1.0.9:15008".parse().unwrap());
                assert_eq!(identity.to_string(), "spiffe://cluster.local/ns/shop/sa/wp");
            }
            other => panic!("{other:?}"),
        }
        // A waypoint with no pod refuses instead of bypassing it.
        assert!(matches!(
            s.route_outbound("10.96.0.2:80".parse().unwrap()),
            OutboundRoute::NoEndpoint { .. }
        ));
        // Dialled by its address, the pod is still reached through wp.
        match s.route_outbound("10.1.0.2:8080".parse().unwrap()) {
            OutboundRoute::Hbone {
                target,
                hbone,
                service,
                ..
            } => {
                assert_eq!(target, "10.1.0.2:8080".parse().unwrap());
                assert_eq!(hbone, "10.1.0.9:15008".parse().unwrap());
                assert_eq!(service, None);
            }
            other => panic!("{other:?}"),
        }
        let web = s.workload("shop", "web").unwrap().workload;
        let required: Vec<String> = s
            .required_waypoints(web)
            .iter()
            .map(|(id, name)| format!("{name}={id}"))
            .collect();
        assert_eq!(
            required,
            // In Service key order: `lost` (waypoint gone) before `web`.
            [
                "shop/gone=spiffe://cluster.local/ns/shop/sa/gone",
                "shop/wp=spiffe://cluster.local/ns/shop/sa/wp",
            ]
        );
        let wp = s.workload("shop", "wp-0").unwrap();
        assert!(!wp.captured);
        assert!(s.required_waypoints(wp.workload).is_empty());
    }

    /// Applies `u` to `cache` and `prev`; the result must list exactly
    /// what a snapshot built whole from the cache lists.
    fn step(
        cache: &mut ConfigCache,
        prev: &Snapshot,
        u: weft_api::proto::ConfigUpdate,
    ) -> Snapshot {
        let changes = cache.apply_changes(&u).unwrap();
        let next = prev.update(cache, &changes, u.version);
        let whole = Snapshot::from_cache(cache, u.version);
        assert_eq!(
            next.indexes(),
            whole.indexes(),
            "after version {}",
            u.version
        );
        assert_eq!(next.to_model(), whole.to_model());
        next
    }

    #[test]
    fn a_delta_applied_in_place_equals_the_snapshot_built_whole() {
        use weft_api::proto::{ConfigUpdate, Removals, ResourceKey, Resources};
        let m = MeshModel::from_yaml(
            r#"
namespaces:
  - { name: shop, labels: { weft.dev/dataplane-mode: ambient } }
  - { name: ops }
workloads:
  - { name: web-1, namespace: shop, service_account: web, node: n1, ips: [10.1.0.2], labels: { app: web } }
  - { name: web-2, namespace: shop, service_account: web, node: n2, ips: [10.1.0.3], labels: { app: web } }
  - { name: wp-0, namespace: shop, service_account: wp, node: n1, ips: [10.1.0.9], labels: { gateway.networking.k8s.io/gateway-name: wp } }
  - { name: job, namespace: ops, node: n2, ips: [10.2.0.2], labels: { app: job } }
services:
  - { name: web, namespace: shop, vips: [10.96.0.1], ports: [{ port: 80 }], selector: { app: web } }
  - { name: job, namespace: ops, vips: [10.96.1.1], ports: [{ port: 80 }], selector: { app: job } }
waypoints:
  - { name: wp, namespace: shop, service_account: wp }
"#,
        )
        .unwrap();
        let update =
            |version: u64, full: bool, upserts: Resources, removals: Removals| ConfigUpdate {
                instance_id: "i".into(),
                version,
                full,
                trust_domain: "cluster.local".into(),
                upserts: Some(upserts),
                removals: Some(removals),
                trust_bundle_pem: vec![],
            };
        let proto_of = |yaml: &str| Resources::from(&MeshModel::from_yaml(yaml).unwrap());
        let delta = |version: u64, yaml: &str, removals: Removals| {
            update(version, false, proto_of(yaml), removals)
        };
        let mut cache = ConfigCache::default();
        let s = step(
            &mut cache,
            &Snapshot::default(),
            update(1, true, Resources::from(&m), Removals::default()),
        );
        // A pod added, one relabelled out of the Service, one removed.
        let s = step(
            &mut cache,
            &s,
            delta(
                2,
                r#"
workloads:
  - { name: web-3, namespace: shop, service_account: web, node: n1, ips: [10.1.0.4], labels: { app: web } }
  - { name: web-2, namespace: shop, service_account: web, node: n2, ips: [10.1.0.3], labels: { app: other } }
"#,
                Removals {
                    workloads: vec![ResourceKey::new("ops", "job")],
                    ..Default::default()
                },
            ),
        );
        assert_eq!(s.workload_count(), 4);
        assert!(s.workload_by_ip("10.2.0.2".parse().unwrap()).is_none());
        assert!(
            s.indexes()
                .contains(&"endpoints shop/web: [\"shop/web-1\", \"shop/web-3\"]".to_owned()),
            "{:#?}",
            s.indexes()
        );
        // The Service takes a waypoint: its pods now require it.
        let s = step(
            &mut cache,
            &s,
            delta(
                3,
                r#"
services:
  - { name: web, namespace: shop, vips: [10.96.0.1], ports: [{ port: 80 }], selector: { app: web }, waypoint: wp }
"#,
                Removals::default(),
            ),
        );
        assert_eq!(
            s.required_waypoints(s.workload("shop", "web-1").unwrap().workload)
                .len(),
            1
        );
        // The waypoint's service account changes (every namespace's
        // requirements are rebuilt), and an address moves to a new pod.
        let s = step(
            &mut cache,
            &s,
            delta(
                4,
                r#"
waypoints:
  - { name: wp, namespace: shop, service_account: wp-2 }
workloads:
  - { name: web-4, namespace: shop, service_account: web, node: n1, ips: [10.1.0.2], labels: { app: web } }
"#,
                Removals {
                    workloads: vec![ResourceKey::new("shop", "web-1")],
                    ..Default::default()
                },
            ),
        );
        assert_eq!(
            s.workload_by_ip("10.1.0.2".parse().unwrap())
                .unwrap()
                .workload
                .name,
            "web-4"
        );
        // The namespace label goes: nothing of shop is captured any more.
        let s = step(
            &mut cache,
            &s,
            update(
                5,
                false,
                proto_of("namespaces: [{ name: shop }]"),
                Removals {
                    services: vec![ResourceKey::new("ops", "job")],
                    ..Default::default()
                },
            ),
        );
        assert!(!s.workload("shop", "web-4").unwrap().captured);
        assert!(s.service_by_vip("10.96.1.1".parse().unwrap()).is_none());
        // Policies of two namespaces arrive; only shop's then go.
        let s = step(
            &mut cache,
            &s,
            delta(
                6,
                r#"
policies:
  - { name: deny-job, namespace: ops, action: DENY, rules: [{ from: [{ ip_blocks: [192.0.2.1/32] }] }] }
  - { name: allow-web, namespace: shop, selector: { app: web }, rules: [{ from: [{ namespaces: [shop] }] }] }
peer_authentications:
  - { name: strict, namespace: shop, mode: STRICT }
"#,
                Removals::default(),
            ),
        );
        let web = s.workload("shop", "web-4").unwrap().workload;
        assert_eq!(s.policies_for(web).count(), 1);
        assert_eq!(
            s.policy_model("shop").mtls_mode(web),
            weft_api::model::MtlsMode::Strict
        );
        let s = step(
            &mut cache,
            &s,
            update(
                7,
                false,
                Resources::default(),
                Removals {
                    policies: vec![ResourceKey::new("shop", "allow-web")],
                    peer_authentications: vec![ResourceKey::new("shop", "strict")],
                    ..Default::default()
                },
            ),
        );
        assert_eq!(
            s.policies_for(s.workload("shop", "web-4").unwrap().workload)
                .count(),
            0
        );
        assert_eq!(s.policy_model("ops").policies.len(), 1);
        // A full snapshot back to the start.
        let s = step(
            &mut cache,
            &s,
            update(8, true, Resources::from(&m), Removals::default()),
        );
        assert_eq!(s.indexes(), Snapshot::new(m, 8).indexes());
    }
}
