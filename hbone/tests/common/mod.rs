//! Helpers shared by the HBONE integration tests: a test mesh (CA + trust),
//! servers on 127.0.0.1, and echo handlers.

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use weft_api::Identity;
use weft_hbone::{
    client_config, connect, serve, server_config, H2Settings, HboneConnection, HboneError,
    InboundTunnel, TrustBundle, WorkloadCert,
};
use weft_pki::LocalCa;

pub const TD: &str = "cluster.local";
pub const DAY: Duration = Duration::from_secs(24 * 3600);
/// Upper bound for anything a test waits on, so a bug hangs nothing.
pub const TEST_DEADLINE: Duration = Duration::from_secs(20);

pub fn id(ns: &str, sa: &str) -> Identity {
    Identity::new(TD, ns, sa)
}

pub fn client_id() -> Identity {
    id("shop", "frontend")
}

pub fn server_id() -> Identity {
    id("shop", "cart")
}

/// One CA and everything signed by it.
pub struct Mesh {
    pub ca: LocalCa,
    pub trust: TrustBundle,
}

impl Mesh {
    pub fn new() -> Mesh {
        let ca = LocalCa::generate(TD).expect("generate CA");
        let trust = ca.trust_bundle();
        Mesh { ca, trust }
    }

    pub fn cert(&self, identity: &Identity) -> WorkloadCert {
        self.ca.sign(identity, DAY).expect("sign leaf")
    }

    pub fn server_tls(&self, identity: &Identity) -> Arc<rustls::ServerConfig> {
        server_config(&self.cert(identity), &self.trust).expect("server config")
    }

    pub fn client_tls(&self, me: &Identity, peer: &Identity) -> Arc<rustls::ClientConfig> {
        client_config(&self.cert(me), &self.trust, peer).expect("client config")
    }
}

pub fn fast_settings() -> H2Settings {
    H2Settings {
        handshake_timeout: Duration::from_secs(1),
        ..H2Settings::default()
    }
}

/// A TCP HBONE server on 127.0.0.1. Every connection's `serve` result is
/// sent on the returned channel.
pub async fn start_server<H, Fut>(
    tls: Arc<rustls::ServerConfig>,
    settings: H2Settings,
    handler: H,
) -> (SocketAddr, mpsc::UnboundedReceiver<Result<(), HboneError>>)
where
    H: Fn(InboundTunnel) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let (results, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            // As in production: WINDOW_UPDATEs must not wait for Nagle.
            let _ = socket.set_nodelay(true);
            let tls = tls.clone();
            let settings = settings.clone();
            let handler = handler.clone();
            let results = results.clone();
            tokio::spawn(async move {
                let result = serve(socket, tls, &settings, handler).await;
                let _ = results.send(result);
            });
        }
    });
    (addr, rx)
}

pub async fn dial(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
) -> Result<HboneConnection, HboneError> {
    let socket = TcpStream::connect(addr).await?;
    socket.set_nodelay(true)?;
    connect(socket, tls, &fast_settings()).await
}

/// Accepts the tunnel and echoes until the client half-closes, then
/// half-closes back.
pub async fn echo(tunnel: InboundTunnel) {
    let Ok(stream) = tunnel.accept() else { return };
    let (mut r, mut w) = tokio::io::split(stream);
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

/// Sends `data` and reads the echo concurrently (the windows are smaller
/// than the data, so doing one after the other would deadlock).
pub async fn echo_round_trip<S>(stream: S, data: &[u8]) -> Vec<u8>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (mut r, mut w) = tokio::io::split(stream);
    let write = async {
        w.write_all(data).await.expect("write");
        w.shutdown().await.expect("shutdown");
    };
    let read = async {
        let mut out = Vec::with_capacity(data.len());
        r.read_to_end(&mut out).await.expect("read");
        out
    };
    let ((), out) = tokio::join!(write, read);
    out
}

pub fn random_bytes(len: usize) -> Vec<u8> {
    use rand::RngCore;
    let mut data = vec![0u8; len];
    rand::thread_rng().fill_bytes(&mut data);
    data
}

pub fn sha256(data: &[u8]) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(data).to_vec()
}

pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(TEST_DEADLINE, fut)
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {TEST_DEADLINE:?}"))
}

pub fn target() -> SocketAddr {
    "10.1.2.3:8080".parse().expect("addr")
}
