//! The mesh model as the waypoint reads it: one compiled, immutable version
//! (services by VIP and name, their endpoints, routes, L7 policy), swapped
//! whole when the controller sends a new model.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};

use tokio::sync::watch;
use weft_api::model::{Service, Workload};
use weft_api::MeshModel;

use crate::plan::{Policies, Routes};
use crate::upstream::Endpoint;

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
    pub routes: Routes,
    pub authz: Policies,
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
                    .map(|&i| endpoint_of(&model, &model.workloads[i], sp.target()))
                    .collect();
                endpoints.insert((si, sp.port), list);
            }
        }
        let routes = Routes::build(&model);
        let authz = Policies::build(&model);
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

    /// A workload addressed directly (`ip:port` not a service VIP).
    pub fn workload_endpoint(&self, addr: SocketAddr) -> Option<Endpoint> {
        let w = self.workload_by_ip(addr.ip())?;
        Some(endpoint_of(&self.model, w, addr.port()))
    }
}

fn endpoint_of(model: &MeshModel, w: &Workload, port: u16) -> Endpoint {
    Endpoint {
        addr: SocketAddr::new(w.ips[0], port),
        identity: model.is_captured(w).then(|| Arc::new(model.identity_of(w))),
        workload: Arc::from(w.name.as_str()),
        namespace: Arc::from(w.namespace.as_str()),
    }
}

/// The current compiled model; readers take an `Arc` and keep it for a
/// request, so a swap never disturbs one in flight.
#[derive(Clone)]
pub struct WaypointState {
    current: Arc<RwLock<Arc<Compiled>>>,
    version_tx: Arc<watch::Sender<u64>>,
}

impl Default for WaypointState {
    fn default() -> Self {
        Self {
            current: Arc::new(RwLock::new(Arc::new(Compiled::new(
                MeshModel::default(),
                0,
            )))),
            version_tx: Arc::new(watch::channel(0).0),
        }
    }
}

impl WaypointState {
    pub fn load(&self) -> Arc<Compiled> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn store(&self, model: MeshModel, version: u64) {
        let compiled = Arc::new(Compiled::new(model, version));
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = compiled;
        self.version_tx.send_replace(version);
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version_tx.subscribe()
    }
}
