//! Inbound: connections to an enrolled pod are steered in the kernel to its
//! listeners: HBONE on 15008 (mTLS, the peer's identity verified) and
//! plaintext on 15006 (non-mesh clients, PERMISSIVE). Policy is evaluated
//! for the destination pod, then ztunnel connects to the app from inside
//! the pod's namespace with the client's own IP as source.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::StatusCode;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};
use weft_api::Identity;
use weft_ebpf_common::MARK_INBOUND;
use weft_hbone::server::{self, InboundTunnel};
use weft_hbone::stream::{copy_bidirectional, copy_tunnel};

use super::connections;
use super::outbound::{finish, MODEL_WAIT};
use super::{accept_loop, socket, EnrolledPod, ProxyInputs, Side};
use crate::metrics::{ConnectionGuard, ConnectionLabels, Failure, Reporter, SecurityPolicy};

#[derive(Clone, Copy)]
pub enum Kind {
    Hbone,
    Plaintext,
}

pub async fn run(
    pi: Arc<ProxyInputs>,
    pod: Arc<EnrolledPod>,
    listener: tokio::net::TcpListener,
    kind: Kind,
    cancel: CancellationToken,
) {
    let pod_name = format!("{}/{}", pod.namespace, pod.name);
    let side = Side {
        reporter: Reporter::destination,
        open: pod.inbound_open.clone(),
    };
    accept_loop(&pi, &side, listener, cancel, "inbound", |stream, peer| {
        // Dual-stack listeners report IPv4 peers as mapped IPv6.
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        let id = pi.conn_id();
        let (pi, pod) = (pi.clone(), pod.clone());
        let span = match kind {
            Kind::Hbone => {
                tracing::info_span!("inbound_hbone", conn = id, pod = %pod_name, src = %peer)
            }
            Kind::Plaintext => {
                tracing::info_span!("inbound_plaintext", conn = id, pod = %pod_name, src = %peer)
            }
        };
        async move {
            match kind {
                Kind::Hbone => serve_hbone(pi, pod, stream, peer).await,
                Kind::Plaintext => plaintext(pi, pod, stream, peer).await,
            }
        }
        .instrument(span)
    })
    .await
}

async fn serve_hbone(
    pi: Arc<ProxyInputs>,
    pod: Arc<EnrolledPod>,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let _ = stream.set_nodelay(true);
    let my_ip = pod.ips.first().copied();
    let snap = pi
        .state
        .wait_until(MODEL_WAIT, |s| {
            my_ip.is_some_and(|ip| s.workload_by_ip(ip).is_some())
        })
        .await
        .unwrap_or_else(|| pi.state.load());
    let Some(me) = my_ip.and_then(|ip| snap.workload_by_ip(ip)) else {
        pi.metrics
            .failure(Reporter::destination, Failure::UnknownDestinationWorkload);
        return;
    };
    let my_identity = snap.identity(me.workload);
    drop(snap);
    let cfg = match pi.tls.server(&my_identity).await {
        Ok(cfg) => cfg,
        Err(e) => {
            pi.metrics
                .failure(Reporter::destination, Failure::NoCertificate);
            warn!(component = "inbound", identity = %my_identity, error = %e, "no TLS configuration for pod");
            return;
        }
    };
    let handler_pi = pi.clone();
    let handler_pod = pod.clone();
    let drain = pi.drain.watcher();
    let result = server::serve_until(
        stream,
        cfg,
        &pi.h2,
        move |tunnel: InboundTunnel| {
            let pi = handler_pi.clone();
            let pod = handler_pod.clone();
            async move { tunnel_to_app(pi, pod, tunnel, peer.ip()).await }
        },
        async move { drain.signaled().await },
    )
    .await;
    if let Err(e) = result {
        let reason = e.reason().as_str();
        pi.metrics.common.handshake_failed(reason);
        warn!(component = "inbound", src = %peer, reason, error = %e, "HBONE connection rejected");
    }
}

async fn tunnel_to_app(
    pi: Arc<ProxyInputs>,
    pod: Arc<EnrolledPod>,
    tunnel: InboundTunnel,
    peer_ip: IpAddr,
) {
    let mut guard = ConnectionGuard::new(pi.metrics.clone(), Reporter::destination);
    let target = tunnel.target;
    if !pod.ips.contains(&target.ip()) || weft_api::ports::is_proxy_port(target.port()) {
        info!(component = "inbound", dst = %target, identity = %tunnel.peer, "CONNECT target is not this pod");
        tunnel.reject(StatusCode::BAD_REQUEST);
        return guard.fail(Failure::BadTarget);
    }
    let peer_identity = tunnel.peer.clone();
    match authorize(&pi, &pod, peer_ip, Some(&peer_identity), target).await {
        Ok(labels) => guard.labels = labels,
        Err(failure) => {
            tunnel.reject(StatusCode::UNAUTHORIZED);
            if let Some(f) = failure {
                guard.fail(f);
            }
            return;
        }
    }
    let mut app = match connect_app(&pod, peer_ip, target, pi.cfg.app_connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            info!(component = "inbound", dst = %target, error = %e, "app unreachable");
            tunnel.reject(StatusCode::SERVICE_UNAVAILABLE);
            return guard.fail(Failure::AppUnreachable);
        }
    };
    let mut stream = match tunnel.accept() {
        Ok(s) => s,
        Err(e) => {
            debug!(component = "inbound", error = %e, "client went away before 200");
            return;
        }
    };
    guard.reverse_direction();
    guard.established();
    let reg = pi
        .connections
        .register(peer_ip, Some(peer_identity.clone()), target);
    debug!(component = "inbound", src = %peer_ip, dst = %target, identity = %peer_identity, "hbone tunnel open");
    tokio::select! {
        res = copy_tunnel(&mut app, &mut stream, guard.moved()) => finish(&guard, res, "inbound_hbone"),
        _ = reg.closed_by_policy.cancelled() => {}
    }
}

async fn plaintext(
    pi: Arc<ProxyInputs>,
    pod: Arc<EnrolledPod>,
    mut client: TcpStream,
    peer: SocketAddr,
) {
    let _ = client.set_nodelay(true);
    let mut guard = ConnectionGuard::new(pi.metrics.clone(), Reporter::destination);
    // The kernel steered this connection here without rewriting it: the
    // address the client dialled is our local address.
    let target = match client.local_addr() {
        Ok(a) => SocketAddr::new(a.ip().to_canonical(), a.port()),
        Err(_) => return,
    };
    if !pod.ips.contains(&target.ip()) || weft_api::ports::is_proxy_port(target.port()) {
        return guard.fail(Failure::BadTarget);
    }
    match authorize(&pi, &pod, peer.ip(), None, target).await {
        Ok(labels) => guard.labels = labels,
        Err(failure) => {
            if let Some(f) = failure {
                guard.fail(f);
            }
            return;
        }
    }
    let mut app = match connect_app(&pod, peer.ip(), target, pi.cfg.app_connect_timeout).await {
        Ok(s) => s,
        Err(e) => {
            info!(component = "inbound", dst = %target, error = %e, "app unreachable");
            return guard.fail(Failure::AppUnreachable);
        }
    };
    guard.established();
    let reg = pi.connections.register(peer.ip(), None, target);
    let first_byte = pi.cfg.first_byte_timeout;
    tokio::select! {
        res = copy_bidirectional(&mut client, &mut app, guard.moved()) => finish(&guard, res, "inbound_plaintext"),
        _ = reg.closed_by_policy.cancelled() => {}
        () = silent_for(&guard, first_byte) => {
            info!(component = "inbound", src = %peer, dst = %target, "no byte either way within the first-byte timeout; closing");
            guard.fail(Failure::FirstByteTimeout);
        }
    }
}

/// Evaluates policy for the pod; on allow returns the metric labels of the
/// connection; on deny counts and logs the denial (`Err(None)`); a
/// destination the model does not know is `Err(Some(failure))`.
async fn authorize(
    pi: &ProxyInputs,
    pod: &EnrolledPod,
    src_ip: IpAddr,
    src_identity: Option<&Identity>,
    target: SocketAddr,
) -> Result<ConnectionLabels, Option<Failure>> {
    let snap = pi
        .state
        .wait_until(MODEL_WAIT, |s| s.workload_by_ip(target.ip()).is_some())
        .await
        .unwrap_or_else(|| pi.state.load());
    let Some(dst) = snap.workload_by_ip(target.ip()) else {
        warn!(component = "inbound", pod = %pod.name, dst = %target, "destination pod is not in the mesh model; refusing");
        return Err(Some(Failure::UnknownDestinationWorkload));
    };
    let src = snap.workload_by_ip(src_ip);
    if let Err(refusal) = connections::check(&snap, src_ip, src_identity, target) {
        let policy = refusal.policy_name();
        connections::record_denial(&pi.metrics, dst.workload, &policy);
        info!(
            component = "inbound",
            src = %src_ip,
            dst = %target,
            identity = %src_identity.map(|i| i.to_string()).unwrap_or_default(),
            policy,
            "connection denied by policy"
        );
        return Err(None);
    }
    Ok(ConnectionLabels {
        reporter: Reporter::destination,
        source_workload: src.map(|s| s.workload.name.clone()).unwrap_or_default(),
        source_workload_namespace: src
            .map(|s| s.workload.namespace.clone())
            .unwrap_or_default(),
        source_principal: src_identity.map(|i| i.to_string()).unwrap_or_default(),
        destination_workload: dst.workload.name.clone(),
        destination_workload_namespace: dst.workload.namespace.clone(),
        destination_principal: snap.identity(dst.workload).to_string(),
        destination_service: String::new(),
        connection_security_policy: if src_identity.is_some() {
            SecurityPolicy::mutual_tls
        } else {
            SecurityPolicy::none
        },
    })
}

/// Resolves once `limit` has passed with no byte copied either way (never,
/// once one has).
async fn silent_for(guard: &ConnectionGuard, limit: std::time::Duration) {
    tokio::time::sleep(limit).await;
    if guard.bytes() == (0, 0) {
        return;
    }
    std::future::pending().await
}

/// Connects to the app inside the pod's netns with the client's IP as the
/// source (IP_TRANSPARENT + the inbound mark, routed back by the pod's
/// fwmark rule), within `timeout`.
async fn connect_app(
    pod: &EnrolledPod,
    src: IpAddr,
    target: SocketAddr,
    timeout: std::time::Duration,
) -> std::io::Result<TcpStream> {
    let transparent = if src.is_ipv4() == target.is_ipv4() && !src.is_loopback() {
        Some(src)
    } else {
        None
    };
    let sock = socket::tcp_in(&pod.netns, target, MARK_INBOUND, transparent)?;
    let s = tokio::time::timeout(timeout, sock.connect(target))
        .await
        .map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the app did not accept within {timeout:?}"),
            )
        })??;
    s.set_nodelay(true)?;
    Ok(s)
}
