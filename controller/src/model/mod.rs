//! Kubernetes objects in, mesh model and status out. Pure and
//! level-based: [`build`] computes the whole model from what is there now,
//! never from the event that woke it, and equal inputs give equal outputs
//! (everything is sorted by namespace/name). Both sources (`kube_source`,
//! `manifests`) feed this one function.
//!
//! `build` (here) calls each part in turn; the arrows run one way, down:
//! - `core`: namespaces, pods as workloads, Services and their endpoints;
//! - `policies`: AuthorizationPolicy and PeerAuthentication, and their
//!   status;
//! - `traffic`: the `weft.dev` TrafficPolicy, and its status;
//! - `gateway_api`: waypoint Gateways, HTTPRoute and GRPCRoute, their
//!   status and the waypoint Deployments to run;
//! - below them all, `cluster` (what is read: [`ClusterState`] and its
//!   helpers) and `policy_status` (the condition owed to each policy).
//!
//! Condition reasons come from `crate::reasons`.

mod cluster;
mod core;
pub mod gateway_api;
mod policies;
mod policy_status;
mod traffic;

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::sync::Arc;

use tokio::sync::watch;
use weft_api::model::MeshModel;

pub use self::cluster::ClusterState;
pub use self::gateway_api::GatewayApiOutput;
pub use self::policy_status::{PolicyKind, PolicyStatus};

/// Builds the mesh model from the cluster state.
pub fn build(state: &ClusterState, trust_domain: &str) -> BuildOutput {
    let mut problems = BTreeSet::new();

    let namespaces = core::build_namespaces(state);
    let known_ns: BTreeSet<&str> = namespaces.iter().map(|n| n.name.as_str()).collect();

    let workloads = core::build_workloads(state, &known_ns, &mut problems);
    let services = core::build_services(state, &mut problems);
    let waypoints = gateway_api::build_waypoints(state);

    let mut policy_status = Vec::new();
    let policies = policies::build_authorization_policies(
        state,
        &known_ns,
        &services,
        &waypoints,
        &mut policy_status,
    );
    let peer_authentications =
        policies::build_peer_authentications(state, &known_ns, &mut policy_status);
    let traffic_policies =
        traffic::build_traffic_policies(state, &known_ns, &services, &mut policy_status);
    policy_status
        .sort_by(|a, b| (a.kind, &a.namespace, &a.name).cmp(&(b.kind, &b.namespace, &b.name)));

    gateway_api::check_waypoints(state, &mut problems);

    let inputs = gateway_api::Inputs {
        state,
        services: &services,
        workloads: &workloads,
    };
    let (http_routes, grpc_routes, routes) = gateway_api::build_routes(&inputs, &mut problems);
    let (gateways, deployments) = gateway_api::build_gateways(&inputs, &mut problems);

    BuildOutput {
        model: MeshModel {
            trust_domain: trust_domain.to_owned(),
            namespaces,
            workloads,
            services,
            policies,
            peer_authentications,
            waypoints,
            http_routes,
            grpc_routes,
            traffic_policies,
        },
        policy_status,
        gateway_api: GatewayApiOutput {
            gateways,
            routes,
            deployments,
        },
        problems: problems.into_iter().collect(),
    }
}

/// What one build decides: the model, and what to tell users about the
/// objects it came from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BuildOutput {
    pub model: MeshModel,
    /// One entry per AuthorizationPolicy, PeerAuthentication and
    /// TrafficPolicy, sorted by kind, namespace, name.
    pub policy_status: Vec<PolicyStatus>,
    /// Gateway and route status, and the waypoints to deploy.
    pub gateway_api: GatewayApiOutput,
    /// Things a user should look at that are not tied to a policy (bad pod
    /// IPs, unresolvable ports, …). Sorted.
    pub problems: Vec<String>,
}

impl BuildOutput {
    /// Publishes a build: the model and each status only when changed.
    pub fn publish(
        self,
        out: &watch::Sender<Arc<MeshModel>>,
        status: &watch::Sender<Arc<Vec<PolicyStatus>>>,
        gateway_api: &watch::Sender<Arc<GatewayApiOutput>>,
    ) {
        let BuildOutput {
            model,
            policy_status,
            gateway_api: gw,
            ..
        } = self;
        gateway_api.send_if_modified(|cur| {
            if **cur == gw {
                return false;
            }
            *cur = Arc::new(gw);
            true
        });
        let changed = out.send_if_modified(|cur| {
            if **cur == model {
                return false;
            }
            *cur = Arc::new(model);
            true
        });
        if changed {
            let m = out.borrow();
            tracing::info!(
                workloads = m.workloads.len(),
                services = m.services.len(),
                policies = m.policies.len(),
                waypoints = m.waypoints.len(),
                http_routes = m.http_routes.len(),
                grpc_routes = m.grpc_routes.len(),
                "mesh model updated"
            );
        }
        status.send_if_modified(|cur| {
            if **cur == policy_status {
                return false;
            }
            *cur = Arc::new(policy_status);
            true
        });
    }
}
