//! The core of the mesh model: namespaces, pods as workloads, Services
//! with their ports (named target ports resolved through EndpointSlices or
//! the pods) and the waypoint each Service's traffic goes through.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, PodSpec, Probe};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::ResourceExt;
use weft_api::model::{self, Labels, GATEWAY_NAME_LABEL};

use super::cluster::{by_key, ClusterState};

/// Every namespace with its labels (which decide capture and waypoints).
pub(crate) fn build_namespaces(state: &ClusterState) -> Vec<model::Namespace> {
    by_key(&state.namespaces)
        .into_values()
        .map(|ns| model::Namespace {
            name: ns.name_any(),
            labels: ns.labels().clone(),
        })
        .collect()
}

/// Scheduled, running pods with an IP as workloads; a pod of a namespace
/// that does not exist is kept (not captured) and reported.
pub(crate) fn build_workloads(
    state: &ClusterState,
    known_ns: &BTreeSet<&str>,
    problems: &mut BTreeSet<String>,
) -> Vec<model::Workload> {
    let mut out = Vec::new();
    for ((ns, name), pod) in by_key(&state.pods) {
        let (Some(spec), Some(status)) = (&pod.spec, &pod.status) else {
            continue;
        };
        let Some(node) = spec.node_name.clone().filter(|n| !n.is_empty()) else {
            continue; // not scheduled yet
        };
        if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
            continue; // terminated: its IPs may already belong to another pod
        }
        // A waypoint replica being deleted leaves the model at once, so
        // ztunnels send it no new connection while it drains (the
        // destination ztunnels admit the waypoint by identity, not by pod,
        // so the tunnels it still carries keep flowing).
        if pod.metadata.deletion_timestamp.is_some()
            && pod.labels().contains_key(GATEWAY_NAME_LABEL)
        {
            continue;
        }
        let mut raw_ips: Vec<&str> = status
            .pod_ips
            .iter()
            .flatten()
            .map(|p| p.ip.as_str())
            .collect();
        if raw_ips.is_empty() {
            raw_ips.extend(status.pod_ip.as_deref());
        }
        let mut ips = Vec::new();
        for raw in raw_ips {
            match raw.parse::<IpAddr>() {
                Ok(ip) if !ips.contains(&ip) => ips.push(ip),
                Ok(_) => {}
                Err(_) => {
                    problems.insert(format!(
                        "pod {ns}/{name}: pod IP {raw:?} is not an IP address"
                    ));
                }
            }
        }
        if ips.is_empty() {
            continue; // no network yet
        }
        if !known_ns.contains(ns.as_str()) {
            problems.insert(format!(
                "pod {ns}/{name}: namespace {ns:?} does not exist; the pod is not captured"
            ));
        }
        #[allow(deprecated)] // `serviceAccount` is the old spelling some manifests still use
        let sa = spec
            .service_account_name
            .clone()
            .or_else(|| spec.service_account.clone())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "default".to_owned());
        let probe_ports = probe_ports(spec, &format!("{ns}/{name}"), problems);
        out.push(model::Workload {
            uid: pod.metadata.uid.clone().unwrap_or_default(),
            name,
            namespace: ns,
            service_account: sa,
            node,
            ips,
            labels: pod.labels().clone(),
            probe_ports,
        });
    }
    out
}

/// The container ports the kubelet probes (liveness, readiness, startup;
/// HTTP, TCP and gRPC probes; named ports resolved against the container's
/// ports), sorted, at most `model::MAX_PROBE_PORTS`. Exec probes use no
/// port. A named port the container does not declare, or more ports than
/// fit, is reported: the kubelet's connection to such a port meets the
/// pod's policy like any other.
pub(crate) fn probe_ports(spec: &PodSpec, pod: &str, problems: &mut BTreeSet<String>) -> Vec<u16> {
    let mut ports = BTreeSet::new();
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        let named = |name: &str| {
            c.ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name))
                .and_then(|p| u16::try_from(p.container_port).ok())
        };
        let probes: [&Option<Probe>; 3] = [&c.liveness_probe, &c.readiness_probe, &c.startup_probe];
        for probe in probes.into_iter().flatten() {
            let port = if let Some(h) = &probe.http_get {
                Some(&h.port)
            } else {
                probe.tcp_socket.as_ref().map(|t| &t.port)
            };
            let resolved = match port {
                Some(IntOrString::Int(p)) => u16::try_from(*p).ok().filter(|p| *p != 0),
                Some(IntOrString::String(name)) => {
                    let p = named(name);
                    if p.is_none() {
                        problems.insert(format!(
                            "pod {pod}: container {} probes port {name:?}, which it does not declare",
                            c.name
                        ));
                    }
                    p
                }
                None => probe
                    .grpc
                    .as_ref()
                    .and_then(|g| u16::try_from(g.port).ok())
                    .filter(|p| *p != 0),
            };
            ports.extend(resolved);
        }
    }
    let mut ports: Vec<u16> = ports.into_iter().collect();
    if ports.len() > model::MAX_PROBE_PORTS {
        problems.insert(format!(
            "pod {pod}: probes use {} ports; only the first {} ({:?}) bypass the ztunnel from the node",
            ports.len(),
            model::MAX_PROBE_PORTS,
            &ports[..model::MAX_PROBE_PORTS]
        ));
        ports.truncate(model::MAX_PROBE_PORTS);
    }
    ports
}

/// Services (not ExternalName) with their cluster IPs, ports (named target
/// ports resolved) and waypoint.
pub(crate) fn build_services(
    state: &ClusterState,
    problems: &mut BTreeSet<String>,
) -> Vec<model::Service> {
    let pods = by_key(&state.pods);
    let namespaces = by_key(&state.namespaces);
    // Each Service looks at its own namespace's pods and its own slices
    // only: found by key, not by a scan of the cluster per Service.
    let mut slices_of: HashMap<(&str, &str), Vec<&EndpointSlice>> = HashMap::new();
    for s in state.endpoint_slices.iter().map(Arc::as_ref) {
        if let (Some(ns), Some(svc)) = (
            s.metadata.namespace.as_deref(),
            s.labels().get("kubernetes.io/service-name"),
        ) {
            slices_of.entry((ns, svc)).or_default().push(s);
        }
    }
    let mut out = Vec::new();
    for ((ns, name), svc) in by_key(&state.services) {
        let Some(spec) = &svc.spec else { continue };
        if spec.type_.as_deref() == Some("ExternalName") {
            continue; // a DNS alias: nothing to route
        }
        let mut raw_vips: Vec<&str> = spec
            .cluster_ips
            .iter()
            .flatten()
            .map(String::as_str)
            .collect();
        if raw_vips.is_empty() {
            raw_vips.extend(spec.cluster_ip.as_deref());
        }
        let mut vips = Vec::new();
        for raw in raw_vips {
            if raw.is_empty() || raw == "None" {
                continue; // headless
            }
            match raw.parse::<IpAddr>() {
                Ok(ip) if !vips.contains(&ip) => vips.push(ip),
                Ok(_) => {}
                Err(_) => {
                    problems.insert(format!(
                        "service {ns}/{name}: cluster IP {raw:?} is not an IP address"
                    ));
                }
            }
        }
        let selector: Labels = spec.selector.clone().unwrap_or_default();
        let selected: Vec<&Pod> = if selector.is_empty() {
            Vec::new()
        } else {
            pods.range((ns.clone(), String::new())..)
                .take_while(|((pns, _), _)| *pns == ns)
                .filter(|(_, p)| selector.iter().all(|(k, v)| p.labels().get(k) == Some(v)))
                .map(|(_, p)| *p)
                .collect()
        };
        let slices: &[&EndpointSlice] = slices_of
            .get(&(ns.as_str(), name.as_str()))
            .map_or(&[], Vec::as_slice);
        let mut ports = Vec::new();
        for sp in spec.ports.iter().flatten() {
            let Ok(port) = u16::try_from(sp.port).map_err(|_| ()).and_then(|p| {
                if p == 0 {
                    Err(())
                } else {
                    Ok(p)
                }
            }) else {
                problems.insert(format!(
                    "service {ns}/{name}: port {} is out of range",
                    sp.port
                ));
                continue;
            };
            let target_port = match &sp.target_port {
                None => None,
                Some(IntOrString::Int(t)) => match u16::try_from(*t) {
                    Ok(t) if t != 0 => Some(t),
                    _ => {
                        problems.insert(format!(
                            "service {ns}/{name}: targetPort {t} is out of range; using port {port}"
                        ));
                        None
                    }
                },
                Some(IntOrString::String(named)) => match named.parse::<u16>() {
                    Ok(t) if t != 0 => Some(t),
                    _ => {
                        let resolved =
                            resolve_named_port(named, sp.name.as_deref(), slices, &selected);
                        if resolved.is_none() && !selected.is_empty() {
                            problems.insert(format!(
                                "service {ns}/{name}: targetPort {named:?} names no container port of the selected pods; using port {port}"
                            ));
                        }
                        resolved
                    }
                },
            };
            ports.push(model::ServicePort { port, target_port });
        }
        // Set even when the Gateway is missing (reported by
        // `check_waypoints`): ztunnel then refuses the traffic rather than
        // let it bypass the waypoint's L7 policy.
        let waypoint = service_waypoint(
            svc.labels(),
            namespaces
                .get(&(String::new(), ns.clone()))
                .map(|n| n.labels()),
        );
        out.push(model::Service {
            name,
            namespace: ns,
            vips,
            ports,
            selector,
            waypoint,
        });
    }
    out
}

/// A named targetPort: the EndpointSlice controller already resolved it
/// (slice ports carry the service port's name and the pod's port number);
/// without slices, look it up in the selected pods' container ports.
fn resolve_named_port(
    target: &str,
    service_port_name: Option<&str>,
    slices: &[&EndpointSlice],
    selected: &[&Pod],
) -> Option<u16> {
    let from_slices = slices
        .iter()
        .flat_map(|s| s.ports.iter().flatten())
        .find(|p| p.name.as_deref().unwrap_or("") == service_port_name.unwrap_or(""))
        .and_then(|p| p.port)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|p| *p != 0);
    from_slices.or_else(|| {
        selected
            .iter()
            .filter_map(|p| p.spec.as_ref())
            .flat_map(|s| s.containers.iter())
            .flat_map(|c| c.ports.iter().flatten())
            .find(|cp| cp.name.as_deref() == Some(target))
            .and_then(|cp| u16::try_from(cp.container_port).ok())
            .filter(|p| *p != 0)
    })
}

/// The waypoint a Service's traffic goes through: its own
/// `weft.dev/use-waypoint` label, else its namespace's; `none` opts out. A
/// waypoint's own Service never goes through a waypoint.
fn service_waypoint(
    service_labels: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> Option<String> {
    if service_labels.contains_key(GATEWAY_NAME_LABEL) {
        return None;
    }
    let label = service_labels
        .get(model::USE_WAYPOINT_LABEL)
        .or_else(|| namespace_labels.and_then(|l| l.get(model::USE_WAYPOINT_LABEL)))?;
    if label == "none" || label.is_empty() {
        None
    } else {
        Some(label.clone())
    }
}
