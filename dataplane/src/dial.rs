//! Dialling HBONE: pooled connections to peers, each verified against the
//! identity the destination must prove, and the request headers every
//! tunnel carries. The socket comes from the caller (ztunnel makes it
//! inside the client pod's network namespace; the waypoint from its own).

use std::future::Future;
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderMap, HeaderValue};
use tokio::net::TcpStream;
use weft_api::Identity;
use weft_hbone::{client, H2Settings, H2Stream, HboneError, Pool};

use crate::tls::TlsConfigs;

/// HBONE client side of a proxy: a connection pool keyed by `K` and the
/// TLS configurations to dial with.
pub struct HboneDialer<K: Hash + Eq + Clone + Send + Sync + 'static> {
    pool: Pool<K>,
    tls: Arc<TlsConfigs>,
    h2: H2Settings,
}

/// Where one tunnel goes and who opens it.
pub struct Dial<'a> {
    /// The identity the tunnel is opened with.
    pub me: &'a Identity,
    /// The identity the peer must prove.
    pub peer: &'a Identity,
    /// The peer's HBONE address (`ip:15008`).
    pub hbone: SocketAddr,
    /// The CONNECT `:authority`.
    pub target: SocketAddr,
    pub headers: HeaderMap,
}

/// How many times a CONNECT the peer never took on is opened in all.
pub const OPEN_ATTEMPTS: u32 = 3;

impl<K: Hash + Eq + Clone + Send + Sync + 'static> HboneDialer<K> {
    pub fn new(tls: Arc<TlsConfigs>, h2: H2Settings, max_streams: usize, idle: Duration) -> Self {
        Self {
            pool: Pool::new(max_streams, idle),
            tls,
            h2,
        }
    }

    /// A CONNECT stream on a pooled connection for `key`, dialling with a
    /// socket from `connect` when no connection has room. A CONNECT the peer
    /// never took on (its connection was going away or broke first) is
    /// opened again on another connection, up to [`OPEN_ATTEMPTS`] in all
    /// (during a peer's hand-over both the old connection and a fresh one
    /// can be going away): see [`HboneError::is_retryable`].
    pub async fn open<C, Fut>(
        &self,
        key: &K,
        d: Dial<'_>,
        connect: C,
    ) -> Result<H2Stream, HboneError>
    where
        C: Fn(SocketAddr) -> Fut,
        Fut: Future<Output = std::io::Result<TcpStream>>,
    {
        let dial = || async {
            let cfg = self.tls.client(d.me, d.peer).await?;
            let tcp = connect(d.hbone).await?;
            let _ = tcp.set_nodelay(true);
            client::connect(tcp, cfg, &self.h2).await
        };
        let mut attempt = 1;
        loop {
            match self.pool.open(key, dial, d.target, d.headers.clone()).await {
                Err(e) if e.is_retryable() && attempt < OPEN_ATTEMPTS => {
                    tracing::debug!(peer = %d.hbone, attempt, error = %e, "CONNECT not taken on; opening it again on another connection");
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    pub fn pool(&self) -> &Pool<K> {
        &self.pool
    }
}

/// The `forwarded` header (RFC 7239 `for=`) naming the client address.
pub fn forwarded_for(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("for={v4}"),
        IpAddr::V6(v6) => format!("for=\"[{v6}]\""),
    }
}

/// Headers of a CONNECT opened for a client at `src_ip`: `forwarded`, and
/// `baggage` with the client workload's namespace and name when known.
pub fn tunnel_headers(src_ip: IpAddr, workload: Option<(&str, &str)>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Ok(v) = HeaderValue::from_str(&forwarded_for(src_ip)) {
        headers.insert(http::header::FORWARDED, v);
    }
    if let Some((namespace, name)) = workload {
        if let Ok(v) = HeaderValue::from_str(&format!(
            "k8s.namespace.name={namespace},k8s.pod.name={name}"
        )) {
            headers.insert("baggage", v);
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_name_the_client_like_istio() {
        let h = tunnel_headers("10.0.0.7".parse().unwrap(), Some(("shop", "web-1")));
        assert_eq!(h["forwarded"], "for=10.0.0.7");
        assert_eq!(h["baggage"], "k8s.namespace.name=shop,k8s.pod.name=web-1");
        let h = tunnel_headers("fd00::7".parse().unwrap(), None);
        assert_eq!(h["forwarded"], "for=\"[fd00::7]\"");
        assert!(!h.contains_key("baggage"));
        assert_eq!(
            weft_hbone::server::parse_forwarded_for(h["forwarded"].to_str().unwrap()),
            Some("fd00::7".parse().unwrap())
        );
    }
}
