//! Outbound: connections an enrolled pod's app makes are rewritten in the
//! kernel to the pod's 127.0.0.1:15001; here they are matched with their
//! original destination and carried in HBONE to a mesh workload, or passed
//! through in plain TCP to anything outside the mesh.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};
use weft_dataplane::dial::{tunnel_headers, Dial};
use weft_ebpf_common::MARK_OUTBOUND;
use weft_hbone::stream::{copy_bidirectional, copy_tunnel};

use super::{accept_loop, socket, EnrolledPod, PoolKey, ProxyInputs, Side};
use crate::metrics::{ConnectionGuard, Failure, Reporter, SecurityPolicy};
use crate::state::OutboundRoute;

/// How long a connection waits for the model to describe its pod.
pub(super) const MODEL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub async fn run(
    pi: Arc<ProxyInputs>,
    pod: Arc<EnrolledPod>,
    listener: TcpListener,
    cancel: CancellationToken,
) {
    let pod_name = format!("{}/{}", pod.namespace, pod.name);
    let side = Side {
        reporter: Reporter::source,
        open: pod.outbound_open.clone(),
    };
    accept_loop(&pi, &side, listener, cancel, "outbound", |stream, peer| {
        let id = pi.conn_id();
        let span = tracing::info_span!("outbound", conn = id, pod = %pod_name);
        handle(pi.clone(), pod.clone(), stream, peer).instrument(span)
    })
    .await
}

async fn handle(pi: Arc<ProxyInputs>, pod: Arc<EnrolledPod>, mut app: TcpStream, peer: SocketAddr) {
    let _ = app.set_nodelay(true);
    let mut guard = ConnectionGuard::new(pi.metrics.clone(), Reporter::source);
    let Some(orig) = pi.capture.original_dst(pod.netns.cookie(), peer) else {
        // Not a captured connection (someone dialled 15001 directly).
        debug!(component = "outbound", src = %peer, "no original destination recorded; closing");
        return guard.fail(Failure::NoOriginalDestination);
    };
    if weft_api::ports::is_proxy_port(orig.port()) && pod.ips.contains(&orig.ip()) {
        return guard.fail(Failure::ProxyPort);
    }
    let src_ip = pod.ip_like(orig.ip()).unwrap_or(peer.ip());
    let snap = pi
        .state
        .wait_until(MODEL_WAIT, |s| s.workload_by_ip(src_ip).is_some())
        .await
        .unwrap_or_else(|| pi.state.load());
    let Some(src) = snap.workload_by_ip(src_ip) else {
        warn!(component = "outbound", src = %src_ip, dst = %orig, "source pod is not in the mesh model; refusing");
        return guard.fail(Failure::UnknownSourceWorkload);
    };
    let src_identity = snap.identity(src.workload);
    let labels = &mut guard.labels;
    labels.source_workload = src.workload.name.clone();
    labels.source_workload_namespace = src.workload.namespace.clone();
    labels.source_principal = src_identity.to_string();
    match snap.route_outbound(orig) {
        OutboundRoute::NoEndpoint { service } => {
            warn!(component = "outbound", dst = %orig, service, "service has no endpoint for this port; refusing");
            guard.fail(Failure::NoHealthyEndpoint);
        }
        OutboundRoute::Passthrough { target, service } => {
            labels.destination_service = service.unwrap_or_default();
            if let Some(dst) = snap.workload_by_ip(target.ip()) {
                labels.destination_workload = dst.workload.name.clone();
                labels.destination_workload_namespace = dst.workload.namespace.clone();
            }
            drop(snap);
            let sock = match socket::tcp_in(&pod.netns, target, MARK_OUTBOUND, None) {
                Ok(s) => s,
                Err(e) => {
                    warn!(component = "outbound", error = %e, "cannot create socket in pod netns");
                    return guard.fail(Failure::Socket);
                }
            };
            let mut upstream = match sock.connect(target).await {
                Ok(s) => s,
                Err(e) => {
                    info!(component = "outbound", dst = %target, error = %e, "passthrough connect failed");
                    return guard.fail(Failure::Connect);
                }
            };
            guard.established();
            debug!(component = "outbound", src = %src_ip, dst = %target, "passthrough");
            let res = copy_bidirectional(&mut app, &mut upstream, guard.moved()).await;
            finish(&guard, res, "passthrough");
        }
        OutboundRoute::Hbone {
            target,
            hbone,
            identity,
            workload,
            namespace,
            service,
        } => {
            labels.destination_workload = workload;
            labels.destination_workload_namespace = namespace;
            labels.destination_principal = identity.to_string();
            labels.destination_service = service.unwrap_or_default();
            labels.connection_security_policy = SecurityPolicy::mutual_tls;
            let headers =
                tunnel_headers(src_ip, Some((&src.workload.namespace, &src.workload.name)));
            drop(snap);
            let key = PoolKey {
                src_netns: pod.netns.cookie(),
                src_identity: src_identity.clone(),
                dst_identity: identity.clone(),
                dst: hbone,
            };
            let dial = Dial {
                me: &src_identity,
                peer: &identity,
                hbone,
                target,
                headers,
            };
            let netns = &pod.netns;
            let opened = pi
                .dialer
                .open(&key, dial, |addr| async move {
                    socket::tcp_in(netns, addr, MARK_OUTBOUND, None)?
                        .connect(addr)
                        .await
                })
                .await;
            let mut tunnel = match opened {
                Ok(t) => t,
                Err(e) => {
                    warn!(component = "outbound", dst = %target, hbone = %hbone, identity = %identity, error = %e, "HBONE tunnel failed");
                    return guard.fail(Failure::of_hbone(&e));
                }
            };
            guard.established();
            debug!(component = "outbound", src = %src_ip, dst = %target, identity = %identity, "hbone");
            let res = copy_tunnel(&mut app, &mut tunnel, guard.moved()).await;
            finish(&guard, res, "hbone");
        }
    }
}

/// Logs how a copy ended; the guard counts it when it drops.
pub(super) fn finish(guard: &ConnectionGuard, res: std::io::Result<()>, kind: &str) {
    let (sent, received) = guard.bytes();
    match res {
        Ok(()) => debug!(component = "proxy", kind, sent, received, "closed"),
        Err(e) => {
            debug!(component = "proxy", kind, sent, received, error = %e, "closed with error")
        }
    }
}
