//! The nouns every stage of the waypoint shares, and nothing else: where a
//! tunnel points and where a request goes ([`Target`], [`Backend`]), one
//! endpoint as the waypoint reaches it ([`Endpoint`]), and what a client
//! connection is ([`ConnCtx`], with what its requests derive from it once,
//! [`Derived`]). A leaf: it imports no other module of the crate, so every
//! other one may import it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{HeaderMap, HeaderValue};
use weft_api::Identity;
use weft_dataplane::dial::tunnel_headers;

/// The HTTP version spoken inside a tunnel, kept end to end: the request
/// goes upstream in the version the client used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Proto {
    Http1,
    Http2,
}

/// One endpoint of a service, as the waypoint reaches it. Cheap to clone
/// (shared strings): every request copies the one it picked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Pod IP and target port.
    pub addr: SocketAddr,
    /// `Some` for a mesh workload (HBONE to its 15008 with this identity),
    /// `None` for plain TCP.
    pub identity: Option<Arc<Identity>>,
    pub workload: Arc<str>,
    pub namespace: Arc<str>,
}

/// Hashes the address only (equal endpoints share it): the connection
/// pools look endpoints up on every request.
impl std::hash::Hash for Endpoint {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.addr.hash(state);
    }
}

/// Where a tunnel points, or where a request goes once routed: a service
/// (by name, so its endpoints come from the model the request started
/// with) or one workload addressed directly.
#[derive(Clone, Debug)]
pub enum Target {
    Service {
        namespace: String,
        name: String,
        port: u16,
    },
    Workload(Endpoint),
}

/// A route may send a request to another service than the one its tunnel
/// named; what it can name is the same.
pub type Backend = Target;

impl Target {
    /// `name.namespace`, the metric label.
    pub fn label(&self) -> String {
        match self {
            Target::Service {
                namespace, name, ..
            } => format!("{name}.{namespace}"),
            Target::Workload(ep) => format!("{}.{}", ep.workload, ep.namespace),
        }
    }
}

/// What the client asked for, from the tunnel.
#[derive(Clone, Debug)]
pub struct ConnCtx {
    pub target: Target,
    /// The CONNECT authority (service VIP or pod address and port).
    pub original_dst: SocketAddr,
    pub peer: Identity,
    pub src_ip: IpAddr,
    pub src_workload: String,
    pub src_namespace: String,
    pub proto: Proto,
    /// What every request of the connection derives from the above,
    /// computed once per connection rather than per request.
    pub derived: Derived,
}

#[derive(Clone, Debug)]
pub struct Derived {
    /// `name.namespace` of the target (metric label).
    pub service: String,
    /// The client's SPIFFE id.
    pub peer: String,
    /// `x-forwarded-client-cert` sent upstream.
    pub xfcc: Option<HeaderValue>,
    /// Headers of the HBONE CONNECT to an endpoint (`forwarded`).
    pub tunnel: HeaderMap,
}

impl Derived {
    /// For a client `peer` at `src_ip` reaching `target` through the
    /// waypoint `me`.
    pub fn new(target: &Target, peer: &Identity, src_ip: IpAddr, me: &Identity) -> Self {
        // The endpoint sees the waypoint's identity in mTLS; this names the
        // original client for the app (Envoy's XFCC shape).
        let xfcc = HeaderValue::from_str(&format!("By={me};URI={peer}")).ok();
        Self {
            service: target.label(),
            peer: peer.to_string(),
            xfcc,
            tunnel: tunnel_headers(src_ip, None),
        }
    }
}
