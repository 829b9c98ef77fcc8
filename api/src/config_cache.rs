//! A config-stream client's copy of what the controller sent, keyed for
//! deltas. Pure: no I/O, used by ztunnels and waypoints alike.
//!
//! An update is checked whole before anything is applied (every upsert
//! converted and validated), then applied in place, so a rejected update
//! leaves the cache exactly as it was and an accepted one costs no copy of
//! the resources it does not touch. Workloads and Services, the resources
//! that grow with the cluster, are held behind an `Arc`: a proxy's compiled
//! model shares them with the cache instead of copying them, and
//! [`Changes`] names the ones an update touched, so a proxy can rebuild only
//! what depends on those.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use crate::identity::DEFAULT_TRUST_DOMAIN;
use crate::model::{self, MeshModel};
use crate::proto::{self, ConfigUpdate, ConversionError, Keyed};

/// A resource's (namespace, name).
pub type Key = (String, String);

fn key_of(k: &proto::ResourceKey) -> Key {
    (k.namespace.clone(), k.name.clone())
}

fn keyed<T: Keyed>(t: T) -> (Key, T) {
    let k = t.key();
    ((k.namespace, k.name), t)
}

/// Everything one update changes, converted and validated.
#[derive(Default)]
struct Staged {
    namespaces: Vec<(Key, model::Namespace)>,
    workloads: Vec<(Key, Arc<model::Workload>)>,
    services: Vec<(Key, Arc<model::Service>)>,
    policies: Vec<(Key, model::AuthorizationPolicy)>,
    peer_authentications: Vec<(Key, model::PeerAuthentication)>,
    waypoints: Vec<(Key, model::Waypoint)>,
    http_routes: Vec<(Key, model::HttpRoute)>,
    grpc_routes: Vec<(Key, model::GrpcRoute)>,
    traffic_policies: Vec<(Key, model::TrafficPolicy)>,
}

/// What an applied update changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// A full snapshot replaced the cache: everything may have changed.
    pub full: bool,
    /// Workloads upserted (with a different value) or removed.
    pub workloads: Vec<Key>,
    /// Services upserted (with a different value) or removed.
    pub services: Vec<Key>,
    /// Waypoints or the trust domain changed (what a Service's waypoint
    /// identity is derived from).
    pub waypoints: bool,
    /// Namespaces whose AuthorizationPolicies or PeerAuthentications
    /// changed: their [`ConfigCache::namespace_policies`] is different.
    /// Both kinds apply within their own namespace only, so a policy change
    /// costs a proxy that namespace's policies, not the cluster's.
    pub policies: BTreeSet<String>,
    /// Anything else changed (namespaces, waypoints, routes, traffic
    /// policies, the trust domain): [`ConfigCache::global_model`] is
    /// different.
    pub rest: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        !self.full
            && self.workloads.is_empty()
            && self.services.is_empty()
            && self.policies.is_empty()
            && !self.rest
    }
}

/// The client's copy of the controller's model.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ConfigCache {
    trust_domain: String,
    namespaces: BTreeMap<Key, model::Namespace>,
    workloads: BTreeMap<Key, Arc<model::Workload>>,
    services: BTreeMap<Key, Arc<model::Service>>,
    policies: BTreeMap<Key, model::AuthorizationPolicy>,
    peer_authentications: BTreeMap<Key, model::PeerAuthentication>,
    waypoints: BTreeMap<Key, model::Waypoint>,
    http_routes: BTreeMap<Key, model::HttpRoute>,
    grpc_routes: BTreeMap<Key, model::GrpcRoute>,
    traffic_policies: BTreeMap<Key, model::TrafficPolicy>,
}

fn convert<'a, P: 'a, M>(
    items: &'a [P],
    f: impl Fn(&'a P) -> Result<M, ConversionError>,
) -> Result<Vec<(Key, M)>, ConversionError>
where
    M: Keyed,
{
    items.iter().map(|p| f(p).map(keyed)).collect()
}

fn shared<T>(items: Vec<(Key, T)>) -> Vec<(Key, Arc<T>)> {
    items.into_iter().map(|(k, v)| (k, Arc::new(v))).collect()
}

/// Applies removals then upserts to one map; the keys that changed.
fn apply_map<T: PartialEq>(
    map: &mut BTreeMap<Key, T>,
    removals: Option<&[proto::ResourceKey]>,
    upserts: Vec<(Key, T)>,
) -> Vec<Key> {
    let mut changed = Vec::new();
    for k in removals.unwrap_or_default() {
        let k = key_of(k);
        if map.remove(&k).is_some() {
            changed.push(k);
        }
    }
    for (k, v) in upserts {
        match map.get_mut(&k) {
            Some(old) if *old == v => {}
            Some(old) => {
                *old = v;
                changed.push(k);
            }
            None => {
                map.insert(k.clone(), v);
                changed.push(k);
            }
        }
    }
    // A key removed and upserted again in one update is named once.
    changed.sort_unstable();
    changed.dedup();
    changed
}

fn l7<T: serde::de::DeserializeOwned + Keyed>(
    kind: &str,
    items: &[proto::L7Resource],
) -> Result<Vec<(Key, T)>, ConversionError> {
    Ok(proto::decode_l7::<T>(kind, items)?
        .into_iter()
        .map(keyed)
        .collect())
}

impl ConfigCache {
    /// Applies `u` (a full snapshot replaces everything). Returns whether
    /// the model changed; on error nothing was applied.
    pub fn apply(&mut self, u: &ConfigUpdate) -> Result<bool, String> {
        self.apply_changes(u).map(|c| !c.is_empty())
    }

    /// Applies `u` like [`ConfigCache::apply`] and says what changed.
    pub fn apply_changes(&mut self, u: &ConfigUpdate) -> Result<Changes, String> {
        let staged = Self::stage(u).map_err(|e| e.to_string())?;
        if u.full {
            let mut fresh = ConfigCache::default();
            fresh.apply_staged(u, staged);
            let changed = fresh != *self;
            *self = fresh;
            return Ok(Changes {
                full: changed,
                ..Changes::default()
            });
        }
        Ok(self.apply_staged(u, staged))
    }

    fn apply_staged(&mut self, u: &ConfigUpdate, staged: Staged) -> Changes {
        let mut trust_domain = false;
        if !u.trust_domain.is_empty() && u.trust_domain != self.trust_domain {
            self.trust_domain = u.trust_domain.clone();
            trust_domain = true;
        }
        let rm = u.removals.as_ref();
        let workloads = apply_map(
            &mut self.workloads,
            rm.map(|r| &r.workloads[..]),
            staged.workloads,
        );
        let services = apply_map(
            &mut self.services,
            rm.map(|r| &r.services[..]),
            staged.services,
        );
        let waypoints = !apply_map(
            &mut self.waypoints,
            rm.map(|r| &r.waypoints[..]),
            staged.waypoints,
        )
        .is_empty();
        let mut rest = trust_domain || waypoints;
        rest |= !apply_map(
            &mut self.namespaces,
            rm.map(|r| &r.namespaces[..]),
            staged.namespaces,
        )
        .is_empty();
        let policies = apply_map(
            &mut self.policies,
            rm.map(|r| &r.policies[..]),
            staged.policies,
        )
        .into_iter()
        .chain(apply_map(
            &mut self.peer_authentications,
            rm.map(|r| &r.peer_authentications[..]),
            staged.peer_authentications,
        ))
        .map(|(namespace, _)| namespace)
        .collect();
        rest |= !apply_map(
            &mut self.http_routes,
            rm.map(|r| &r.http_routes[..]),
            staged.http_routes,
        )
        .is_empty();
        rest |= !apply_map(
            &mut self.grpc_routes,
            rm.map(|r| &r.grpc_routes[..]),
            staged.grpc_routes,
        )
        .is_empty();
        rest |= !apply_map(
            &mut self.traffic_policies,
            rm.map(|r| &r.traffic_policies[..]),
            staged.traffic_policies,
        )
        .is_empty();
        Changes {
            full: false,
            workloads,
            services,
            waypoints: waypoints || trust_domain,
            policies,
            rest,
        }
    }

    fn stage(u: &ConfigUpdate) -> Result<Staged, ConversionError> {
        let Some(up) = &u.upserts else {
            return Ok(Staged::default());
        };
        let workloads = convert(&up.workloads, model::Workload::try_from)?;
        let services = convert(&up.services, model::Service::try_from)?;
        for (_, w) in &workloads {
            model::validate_workload(w).map_err(|reason| ConversionError {
                resource: format!("workload {}/{}", w.namespace, w.name),
                reason,
            })?;
        }
        for (_, s) in &services {
            model::validate_service(s).map_err(|reason| ConversionError {
                resource: format!("service {}/{}", s.namespace, s.name),
                reason,
            })?;
        }
        Ok(Staged {
            namespaces: convert(&up.namespaces, |n| Ok(model::Namespace::from(n)))?,
            workloads: shared(workloads),
            services: shared(services),
            policies: convert(&up.policies, model::AuthorizationPolicy::try_from)?,
            peer_authentications: convert(
                &up.peer_authentications,
                model::PeerAuthentication::try_from,
            )?,
            waypoints: l7("waypoint", &up.waypoints)?,
            http_routes: l7("HTTPRoute", &up.http_routes)?,
            grpc_routes: l7("GRPCRoute", &up.grpc_routes)?,
            traffic_policies: l7("traffic policy", &up.traffic_policies)?,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.workloads.is_empty()
            && self.services.is_empty()
            && self.policies.is_empty()
            && self.peer_authentications.is_empty()
            && self.waypoints.is_empty()
            && self.http_routes.is_empty()
            && self.grpc_routes.is_empty()
            && self.traffic_policies.is_empty()
    }

    /// The workloads, by (namespace, name).
    pub fn workloads(&self) -> &BTreeMap<Key, Arc<model::Workload>> {
        &self.workloads
    }

    /// The services, by (namespace, name).
    pub fn services(&self) -> &BTreeMap<Key, Arc<model::Service>> {
        &self.services
    }

    /// The cache as a model (one copy of every resource; keys are unique,
    /// so it needs no further validation).
    pub fn to_model(&self) -> MeshModel {
        MeshModel {
            workloads: self.workloads.values().map(|w| (**w).clone()).collect(),
            services: self.services.values().map(|s| (**s).clone()).collect(),
            ..self.rest_model()
        }
    }

    /// Everything but the workloads and services, as a model whose
    /// `workloads` and `services` are empty.
    pub fn rest_model(&self) -> MeshModel {
        MeshModel {
            policies: self.policies.values().cloned().collect(),
            peer_authentications: self.peer_authentications.values().cloned().collect(),
            ..self.global_model()
        }
    }

    fn effective_trust_domain(&self) -> String {
        if self.trust_domain.is_empty() {
            DEFAULT_TRUST_DOMAIN.to_owned()
        } else {
            self.trust_domain.clone()
        }
    }

    /// What is not kept per namespace: everything but the workloads,
    /// Services, AuthorizationPolicies and PeerAuthentications (empty in
    /// it). Its size does not grow with the pods of the cluster.
    pub fn global_model(&self) -> MeshModel {
        MeshModel {
            trust_domain: self.effective_trust_domain(),
            namespaces: self.namespaces.values().cloned().collect(),
            workloads: Vec::new(),
            services: Vec::new(),
            policies: Vec::new(),
            peer_authentications: Vec::new(),
            waypoints: self.waypoints.values().cloned().collect(),
            http_routes: self.http_routes.values().cloned().collect(),
            grpc_routes: self.grpc_routes.values().cloned().collect(),
            traffic_policies: self.traffic_policies.values().cloned().collect(),
        }
    }

    /// The AuthorizationPolicies and PeerAuthentications of `namespace`
    /// (and the trust domain), as a model holding nothing else.
    pub fn namespace_policies(&self, namespace: &str) -> MeshModel {
        fn of<T: Clone>(map: &BTreeMap<Key, T>, namespace: &str) -> Vec<T> {
            map.range((namespace.to_owned(), String::new())..)
                .take_while(|((ns, _), _)| ns == namespace)
                .map(|(_, v)| v.clone())
                .collect()
        }
        MeshModel {
            trust_domain: self.effective_trust_domain(),
            policies: of(&self.policies, namespace),
            peer_authentications: of(&self.peer_authentications, namespace),
            ..MeshModel::default()
        }
    }

    /// The namespaces with an AuthorizationPolicy or a PeerAuthentication.
    pub fn policy_namespaces(&self) -> BTreeSet<&str> {
        self.policies
            .keys()
            .chain(self.peer_authentications.keys())
            .map(|(ns, _)| ns.as_str())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Removals, ResourceKey, Resources};

    fn model() -> MeshModel {
        MeshModel::from_yaml(
            r#"
namespaces: [{ name: shop }]
workloads:
  - { name: a, namespace: shop, node: n1, ips: [10.0.0.2] }
  - { name: b, namespace: shop, node: n1, ips: [10.0.0.3] }
services:
  - { name: s, namespace: shop, vips: [10.96.0.1], ports: [{ port: 80 }], selector: { app: a } }
http_routes:
  - name: r
    namespace: shop
    parents: [{ name: s }]
    rules: [{ backends: [{ name: s, port: 80, weight: 9 }] }]
"#,
        )
        .unwrap()
    }

    fn full(m: &MeshModel) -> ConfigUpdate {
        ConfigUpdate {
            instance_id: "i".into(),
            version: 1,
            full: true,
            trust_domain: m.trust_domain.clone(),
            upserts: Some(Resources::from(m)),
            removals: None,
            trust_bundle_pem: vec![],
        }
    }

    #[test]
    fn full_then_delta_round_trips() {
        let m = model();
        let mut c = ConfigCache::default();
        assert!(c.apply(&full(&m)).unwrap());
        assert_eq!(c.to_model(), m);
        // The same snapshot again changes nothing.
        assert!(!c.apply(&full(&m)).unwrap());
        let delta = ConfigUpdate {
            version: 2,
            full: false,
            removals: Some(Removals {
                workloads: vec![ResourceKey::new("shop", "b")],
                ..Default::default()
            }),
            upserts: None,
            ..full(&m)
        };
        assert!(c.apply(&delta).unwrap());
        let got = c.to_model();
        assert_eq!(got.workloads.len(), 1);
        assert_eq!(got.http_routes, m.http_routes);
    }

    #[test]
    fn a_bad_upsert_changes_nothing() {
        let m = model();
        let mut c = ConfigCache::default();
        c.apply(&full(&m)).unwrap();
        let mut bad = Resources::from(&m);
        bad.workloads[0].ips = vec!["not-an-ip".into()];
        bad.services[0].ports[0].port = 0;
        let err = c
            .apply(&ConfigUpdate {
                full: false,
                upserts: Some(bad),
                ..full(&m)
            })
            .unwrap_err();
        assert!(err.contains("workload shop/a"), "{err}");
        assert_eq!(c.to_model(), m);
        let bad_route = Resources {
            http_routes: vec![proto::L7Resource {
                namespace: "shop".into(),
                name: "r".into(),
                json: "{\"name\": 3}".into(),
            }],
            ..Default::default()
        };
        let err = c
            .apply(&ConfigUpdate {
                full: false,
                upserts: Some(bad_route),
                ..full(&m)
            })
            .unwrap_err();
        assert!(err.contains("HTTPRoute shop/r"), "{err}");
        assert_eq!(c.to_model(), m);
    }
}
