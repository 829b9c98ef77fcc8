//! The mesh model as the waypoint reads it: one compiled, immutable version
//! (services by VIP and name, their endpoints, the Gateway API route
//! tables, the L7 authorizer), swapped whole by `weft_dataplane::state`
//! when the controller sends a new model.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use weft_api::model::{Service, Workload};
use weft_api::MeshModel;
use weft_dataplane::state::ModelState;

use crate::authz::Authorizer;
use crate::context::{Endpoint, Target};
use crate::route::RouteTable;

/// The current compiled model; readers take an `Arc` and keep it for a
/// request, so a swap never disturbs one in flight.
pub type WaypointState = ModelState<Compiled>;

pub struct Compiled {
    pub version: u64,
    pub model: MeshModel,
    service_by_vip: HashMap<IpAddr, usize>,
    /// namespace -> name -> index (looked up without allocating).
    service_by_name: HashMap<String, HashMap<String, usize>>,
    workload_by_ip: HashMap<IpAddr, usize>,
    /// Endpoints of each (service index, service port), built once per
    /// model version: requests share them instead of building a list each.
    endpoints: HashMap<(usize, u16), Arc<[Endpoint]>>,
    pub routes: RouteTable,
    pub authz: Authorizer,
}

impl weft_dataplane::state::Compiled for Compiled {
    fn compile(model: MeshModel, version: u64) -> Self {
        Compiled::new(model, version)
    }

    fn version(&self) -> u64 {
        self.version
    }
}

impl Compiled {
    pub fn new(model: MeshModel, version: u64) -> Self {
        let mut workload_by_ip = HashMap::new();
        for (i, w) in model.workloads.iter().enumerate() {
            for ip in &w.ips {
                workload_by_ip.insert(*ip, i);
            }
        }
        let mut service_by_vip = HashMap::new();
        let mut service_by_name: HashMap<String, HashMap<String, usize>> = HashMap::new();
        for (si, s) in model.services.iter().enumerate() {
            for vip in &s.vips {
                service_by_vip.insert(*vip, si);
            }
            service_by_name
                .entry(s.namespace.clone())
                .or_default()
                .insert(s.name.clone(), si);
        }
        let mut endpoints = HashMap::new();
        for (si, members) in model.service_endpoints().into_iter().enumerate() {
            for sp in &model.services[si].ports {
                let list: Arc<[Endpoint]> = members
                    .iter()
                    .filter_map(|&i| endpoint_of(&model, &model.workloads[i], sp.target()))
                    .collect();
                endpoints.insert((si, sp.port), list);
            }
        }
        let routes = RouteTable::build(&model);
        let authz = Authorizer::build(&model);
        Self {
            version,
            model,
            service_by_vip,
            service_by_name,
            workload_by_ip,
            endpoints,
            routes,
            authz,
        }
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Service> {
        Some(&self.model.services[*self.service_by_vip.get(&ip)?])
    }

    pub fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        Some(&self.model.services[self.service_index(namespace, name)?])
    }

    fn service_index(&self, namespace: &str, name: &str) -> Option<usize> {
        self.service_by_name.get(namespace)?.get(name).copied()
    }

    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Workload> {
        Some(&self.model.workloads[*self.workload_by_ip.get(&ip)?])
    }

    /// Endpoints of `service` for its `port`: mesh workloads are reached
    /// over HBONE, others in plain TCP.
    pub fn endpoints(&self, namespace: &str, name: &str, port: u16) -> Arc<[Endpoint]> {
        self.service_index(namespace, name)
            .and_then(|si| self.endpoints.get(&(si, port)))
            .cloned()
            .unwrap_or_else(|| Arc::from([]))
    }

    /// Where traffic for `target` may go: the service's endpoints for its
    /// port, or the one workload addressed.
    pub fn endpoints_of(&self, target: &Target) -> Arc<[Endpoint]> {
        match target {
            Target::Service {
                namespace,
                name,
                port,
            } => self.endpoints(namespace, name, *port),
            Target::Workload(ep) => Arc::from([ep.clone()]),
        }
    }

    /// A workload addressed directly (`ip:port` not a service VIP).
    pub fn workload_endpoint(&self, addr: SocketAddr) -> Option<Endpoint> {
        let w = self.workload_by_ip(addr.ip())?;
        endpoint_of(&self.model, w, addr.port())
    }
}

/// `w` reached at its first address; `None` for a workload without one.
fn endpoint_of(model: &MeshModel, w: &Workload, port: u16) -> Option<Endpoint> {
    Some(Endpoint {
        addr: SocketAddr::new(*w.ips.first()?, port),
        identity: model.is_captured(w).then(|| Arc::new(model.identity_of(w))),
        workload: Arc::from(w.name.as_str()),
        namespace: Arc::from(w.namespace.as_str()),
    })
}
