//! One indexed version of the mesh model.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};

use weft_api::model::{AuthorizationPolicy, Service, Workload, GATEWAY_NAME_LABEL};
use weft_api::{Identity, MeshModel};

pub struct Snapshot {
    pub version: u64,
    pub model: MeshModel,
    workload_by_ip: HashMap<IpAddr, usize>,
    workload_by_name: HashMap<(String, String), usize>,
    service_by_vip: HashMap<IpAddr, usize>,
    /// Endpoint workloads of each service (index into `model.workloads`).
    endpoints: Vec<Vec<usize>>,
    /// Pods of each waypoint, by (namespace, gateway name).
    waypoint_pods: HashMap<(String, String), Vec<usize>>,
    /// Workloads that accept traffic only from a waypoint: workload index
    /// to the waypoint's identity and `namespace/name`.
    waypoint_required: HashMap<usize, Vec<(Identity, String)>>,
    round_robin: AtomicUsize,
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

impl Snapshot {
    pub fn new(model: MeshModel, version: u64) -> Self {
        let mut workload_by_ip = HashMap::new();
        let mut workload_by_name = HashMap::new();
        // Services select pods of their own namespace only: index once so
        // endpoints cost (services x pods of the namespace), not x all pods.
        let mut by_namespace: HashMap<&str, Vec<usize>> = HashMap::new();
        for (i, w) in model.workloads.iter().enumerate() {
            for ip in &w.ips {
                workload_by_ip.insert(*ip, i);
            }
            workload_by_name.insert((w.namespace.clone(), w.name.clone()), i);
            if !w.ips.is_empty() {
                by_namespace
                    .entry(w.namespace.as_str())
                    .or_default()
                    .push(i);
            }
        }
        let mut service_by_vip = HashMap::new();
        for (si, s) in model.services.iter().enumerate() {
            for vip in &s.vips {
                service_by_vip.insert(*vip, si);
            }
        }
        let endpoints = model.service_endpoints();
        let mut waypoint_pods: HashMap<(String, String), Vec<usize>> = HashMap::new();
        for (i, w) in model.workloads.iter().enumerate() {
            if let Some(gw) = w.labels.get(GATEWAY_NAME_LABEL) {
                if !w.ips.is_empty() {
                    waypoint_pods
                        .entry((w.namespace.clone(), gw.clone()))
                        .or_default()
                        .push(i);
                }
            }
        }
        let waypoint_required = weft_api::authorize::waypoint_requirements(&model, &endpoints);
        Self {
            version,
            model,
            workload_by_ip,
            workload_by_name,
            service_by_vip,
            endpoints,
            waypoint_pods,
            waypoint_required,
            round_robin: AtomicUsize::new(0),
        }
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<WorkloadRef<'_>> {
        let w = &self.model.workloads[*self.workload_by_ip.get(&ip)?];
        Some(WorkloadRef {
            workload: w,
            captured: self.model.is_captured(w),
        })
    }

    pub fn workload(&self, namespace: &str, name: &str) -> Option<WorkloadRef<'_>> {
        let i = self
            .workload_by_name
            .get(&(namespace.to_owned(), name.to_owned()))?;
        let w = &self.model.workloads[*i];
        Some(WorkloadRef {
            workload: w,
            captured: self.model.is_captured(w),
        })
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Service> {
        Some(&self.model.services[*self.service_by_vip.get(&ip)?])
    }

    pub fn identity(&self, w: &Workload) -> Identity {
        self.model.identity_of(w)
    }

    /// Decides where a connection to `dst` goes.
    pub fn route_outbound(&self, dst: SocketAddr) -> OutboundRoute {
        if let Some(&si) = self.service_by_vip.get(&dst.ip()) {
            let svc = &self.model.services[si];
            let Some(port) = svc.ports.iter().find(|p| p.port == dst.port()) else {
                return OutboundRoute::NoEndpoint {
                    service: format!("{}/{}", svc.namespace, svc.name),
                };
            };
            if let Some(wp) = &svc.waypoint {
                let service = format!("{}.{}", svc.name, svc.namespace);
                return self.route_to_waypoint(&svc.namespace, wp, dst, Some(service));
            }
            let eps = &self.endpoints[si];
            if eps.is_empty() {
                return OutboundRoute::NoEndpoint {
                    service: format!("{}/{}", svc.namespace, svc.name),
                };
            }
            let pick = eps[self.round_robin.fetch_add(1, Ordering::Relaxed) % eps.len()];
            let w = &self.model.workloads[pick];
            let ip = pick_family(&w.ips, dst.ip());
            return self.route_to_workload(
                w,
                SocketAddr::new(ip, port.target()),
                Some(format!("{}.{}", svc.name, svc.namespace)),
            );
        }
        match self.workload_by_ip.get(&dst.ip()) {
            // A pod that takes traffic only from its waypoint is reached
            // through it when dialled by address too (the waypoint forwards
            // such a request unrouted, its L7 policy applied).
            Some(&wi) => match self.waypoint_required.get(&wi).and_then(|l| l.first()) {
                Some((_, wp)) => {
                    let (ns, name) = wp.split_once('/').unwrap_or(("", wp));
                    self.route_to_waypoint(ns, name, dst, None)
                }
                None => self.route_to_workload(&self.model.workloads[wi], dst, None),
            },
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
        let pods = self
            .waypoint_pods
            .get(&(namespace.to_owned(), waypoint.to_owned()))
            .map(Vec::as_slice)
            .unwrap_or_default();
        if pods.is_empty() {
            return OutboundRoute::NoEndpoint {
                service: format!(
                    "{} (waypoint {namespace}/{waypoint} has no pod)",
                    service.as_deref().unwrap_or(&dst.to_string())
                ),
            };
        }
        let w = &self.model.workloads
            [pods[self.round_robin.fetch_add(1, Ordering::Relaxed) % pods.len()]];
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
        self.workload_by_name
            .get(&(w.namespace.clone(), w.name.clone()))
            .and_then(|i| self.waypoint_required.get(i))
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
        weft_api::authorize::l4_policies(&self.model, w)
    }

    /// Workloads scheduled on `node`.
    pub fn workloads_on<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Workload> + 'a {
        self.model.workloads.iter().filter(move |w| w.node == node)
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
            [
                "shop/wp=spiffe://cluster.local/ns/shop/sa/wp",
                "shop/gone=spiffe://cluster.local/ns/shop/sa/gone"
            ]
        );
        let wp = s.workload("shop", "wp-0").unwrap();
        assert!(!wp.captured);
        assert!(s.required_waypoints(wp.workload).is_empty());
    }
}
