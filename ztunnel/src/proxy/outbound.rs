//! Outbound: connections an enrolled pod's app makes are rewritten in the
//! kernel to the pod's 127.0.0.1:15001; here they are matched with their
//! original destination and carried in HBONE to a mesh workload, or passed
//! through in plain TCP to anything outside the mesh.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{HeaderMap, HeaderValue};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};
use weft_ebpf_common::MARK_OUTBOUND;
use weft_hbone::stream::{copy_bidirectional, copy_tunnel};
use weft_hbone::{client, tls};

use super::{socket, EnrolledPod, PoolKey, ProxyInputs};
use crate::metrics::{ConnectionGuard, ConnectionLabels, Reporter, SecurityPolicy};
use crate::state::OutboundRoute;

/// How long a connection waits for the model to describe its pod.
pub(super) const MODEL_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

pub async fn run(
    pi: Arc<ProxyInputs>,
    pod: Arc<EnrolledPod>,
    listener: TcpListener,
    cancel: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = cancel.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                let id = pi.conn_id();
                let span = tracing::info_span!("outbound", conn = id, pod = %format!("{}/{}", pod.namespace, pod.name));
                tokio::spawn(handle(pi.clone(), pod.clone(), stream, peer).instrument(span));
            }
            Err(e) => {
                warn!(component = "outbound", error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

async fn handle(pi: Arc<ProxyInputs>, pod: Arc<EnrolledPod>, mut app: TcpStream, peer: SocketAddr) {
    let _ = app.set_nodelay(true);
    let Some(orig) = pi.capture.original_dst(pod.netns.cookie(), peer) else {
        // Not a captured connection (someone dialled 15001 directly).
        pi.metrics
            .failure(Reporter::source, "no_original_destination");
        debug!(component = "outbound", src = %peer, "no original destination recorded; closing");
        return;
    };
    if weft_api::ports::is_proxy_port(orig.port()) && pod.ips.contains(&orig.ip()) {
        pi.metrics.failure(Reporter::source, "proxy_port");
        return;
    }
    let src_ip = pod.ip_like(orig.ip()).unwrap_or(peer.ip());
    let snap = pi
        .state
        .load_when(MODEL_WAIT, |s| s.workload_by_ip(src_ip).is_some())
        .await
        .unwrap_or_else(|| pi.state.load());
    let Some(src) = snap.workload_by_ip(src_ip) else {
        pi.metrics
            .failure(Reporter::source, "unknown_source_workload");
        warn!(component = "outbound", src = %src_ip, dst = %orig, "source pod is not in the mesh model; refusing");
        return;
    };
    let src_identity = snap.identity(src.workload);
    let route = snap.route_outbound(orig);
    let mut labels = ConnectionLabels {
        reporter: Reporter::source,
        source_workload: src.workload.name.clone(),
        source_workload_namespace: src.workload.namespace.clone(),
        source_principal: src_identity.to_string(),
        destination_workload: String::new(),
        destination_workload_namespace: String::new(),
        destination_principal: String::new(),
        destination_service: String::new(),
        connection_security_policy: SecurityPolicy::none,
    };
    match route {
        OutboundRoute::NoEndpoint { service } => {
            pi.metrics.failure(Reporter::source, "no_healthy_endpoint");
            warn!(component = "outbound", dst = %orig, service, "service has no endpoint for this port; refusing");
        }
        OutboundRoute::Passthrough { target, service } => {
            labels.destination_service = service.unwrap_or_default();
            if let Some(dst) = snap.workload_by_ip(target.ip()) {
                labels.destination_workload = dst.workload.name.clone();
                labels.destination_workload_namespace = dst.workload.namespace.clone();
            }
            let sock = match socket::tcp_in(&pod.netns, target, MARK_OUTBOUND, None) {
                Ok(s) => s,
                Err(e) => {
                    pi.metrics.failure(Reporter::source, "socket");
                    warn!(component = "outbound", error = %e, "cannot create socket in pod netns");
                    return;
                }
            };
            let mut upstream = match sock.connect(target).await {
                Ok(s) => s,
                Err(e) => {
                    pi.metrics.failure(Reporter::source, "connect");
                    info!(component = "outbound", dst = %target, error = %e, "passthrough connect failed");
                    return;
                }
            };
            let guard = ConnectionGuard::open(pi.metrics.clone(), labels);
            debug!(component = "outbound", src = %src_ip, dst = %target, "passthrough");
            let res = copy_bidirectional(&mut app, &mut upstream).await;
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
            let key = PoolKey {
                src_netns: pod.netns.cookie(),
                src_identity: src_identity.clone(),
                dst_identity: identity.clone(),
                dst: hbone,
            };
            let dial = || async {
                let cert = pi.certs.fetch(&src_identity).await.map_err(|e| {
                    weft_hbone::HboneError::Io(std::io::Error::other(e.to_string()))
                })?;
                let cfg = tls::client_config(&cert, &pi.certs.trust_bundle(), &identity)?;
                let sock = socket::tcp_in(&pod.netns, hbone, MARK_OUTBOUND, None)?;
                let tcp = sock.connect(hbone).await?;
                let _ = tcp.set_nodelay(true);
                client::connect(tcp, cfg, &pi.h2).await
            };
            let mut headers = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&forwarded_for(src_ip)) {
                headers.insert("forwarded", v);
            }
            if let Ok(v) = HeaderValue::from_str(&format!(
                "k8s.namespace.name={},k8s.pod.name={}",
                src.workload.namespace, src.workload.name
            )) {
                headers.insert("baggage", v);
            }
            let mut tunnel = match pi.pool.open(&key, dial, target, headers).await {
                Ok(t) => t,
                Err(e) => {
                    pi.metrics.failure(Reporter::source, &hbone_reason(&e));
                    warn!(component = "outbound", dst = %target, hbone = %hbone, identity = %identity, error = %e, "HBONE tunnel failed");
                    return;
                }
            };
            let guard = ConnectionGuard::open(pi.metrics.clone(), labels);
            debug!(component = "outbound", src = %src_ip, dst = %target, identity = %identity, "hbone");
            let res = copy_tunnel(&mut app, &mut tunnel).await;
            finish(&guard, res, "hbone");
        }
    }
}

fn forwarded_for(ip: std::net::IpAddr) -> String {
    match ip {
        std::net::IpAddr::V4(v4) => format!("for={v4}"),
        std::net::IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

fn hbone_reason(e: &weft_hbone::HboneError) -> String {
    match e {
        weft_hbone::HboneError::Status(code) => format!("hbone_status_{}", code.as_u16()),
        other => format!("hbone_{}", other.reason().as_str()),
    }
}

pub(super) fn finish(guard: &ConnectionGuard, res: std::io::Result<(u64, u64)>, kind: &str) {
    match res {
        Ok((sent, received)) => {
            guard.record(sent, received);
            debug!(component = "proxy", kind, sent, received, "closed");
        }
        Err(e) => debug!(component = "proxy", kind, error = %e, "closed with error"),
    }
}
