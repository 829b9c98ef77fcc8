//! The TLS side of the controller's gRPC port. Its serving certificate is
//! issued by the mesh CA, renewed before it expires and again whenever the
//! trust bundle changes (a rotated root), and swapped under the listener:
//! new handshakes get the new certificate, established streams carry on.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::Stream;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use weft_hbone::tls::provider;
use weft_pki::params::serving_params;
use weft_pki::pem::certs_from_pem;
use weft_pki::{PkiError, TrustBundle};

use super::MeshCa;

/// The name ztunnels expect the controller's serving certificate to carry
/// (they connect by Service name or by IP; either way they verify this).
pub const CONTROLLER_SERVER_NAME: &str = "weft-controller";

/// A handshake that has not finished in this long is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The certificate new handshakes are answered with.
#[derive(Debug)]
pub struct ServingIdentity {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ServingIdentity {
    fn new(key: CertifiedKey) -> Arc<Self> {
        Arc::new(Self {
            current: RwLock::new(Arc::new(key)),
        })
    }

    fn replace(&self, key: CertifiedKey) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
    }

    /// The leaf certificate served now (DER).
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).cert[0].clone()
    }
}

impl ResolvesServerCert for ServingIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

/// A serving certificate for the gRPC port from the mesh CA's current
/// signer, ready for rustls: DNS names `dns` (always including
/// [`CONTROLLER_SERVER_NAME`]), serverAuth only, valid for `ttl`.
fn issue_serving_key(ca: &MeshCa, dns: &[String], ttl: Duration) -> anyhow::Result<CertifiedKey> {
    let mut names = vec![CONTROLLER_SERVER_NAME.to_owned()];
    names.extend(
        dns.iter()
            .filter(|d| d.as_str() != CONTROLLER_SERVER_NAME)
            .cloned(),
    );
    let params = serving_params(CONTROLLER_SERVER_NAME, names, ttl).map_err(PkiError::from)?;
    let (chain_pem, key_pem) = ca.sign_with_new_key(params)?;
    let chain = certs_from_pem(&chain_pem)
        .map_err(|e| anyhow::anyhow!("serving certificate chain: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
        .map_err(|e| anyhow::anyhow!("serving certificate key: {e}"))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| anyhow::anyhow!("serving certificate key: {e}"))?;
    Ok(CertifiedKey::new(chain, signing))
}

/// Issues the serving certificate and keeps it fresh.
pub struct ServingCertificate {
    ca: Arc<MeshCa>,
    dns: Vec<String>,
    ttl: Duration,
    identity: Arc<ServingIdentity>,
    /// Subscribed when the first certificate is issued, so a rotation
    /// right after is not missed.
    bundle: tokio::sync::watch::Receiver<TrustBundle>,
}

impl ServingCertificate {
    /// Issues the first certificate (valid `ttl`) for `dns`.
    pub fn issue(ca: Arc<MeshCa>, dns: Vec<String>, ttl: Duration) -> anyhow::Result<Self> {
        let bundle = ca.subscribe_bundle();
        let first = issue_serving_key(&ca, &dns, ttl)?;
        Ok(Self {
            bundle,
            ca,
            dns,
            ttl,
            identity: ServingIdentity::new(first),
        })
    }

    pub fn identity(&self) -> Arc<ServingIdentity> {
        self.identity.clone()
    }

    /// A TLS 1.2/1.3 server configuration (ALPN h2) that answers with the
    /// current certificate.
    pub fn server_config(&self) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| anyhow::anyhow!("TLS versions: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(self.identity.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(config))
    }

    /// Renews at two thirds of the lifetime, and at once when the trust
    /// bundle changes; a failed issue is retried a minute later while the
    /// current certificate is still served.
    pub async fn renew_forever(mut self) {
        let every = (self.ttl * 2 / 3).max(Duration::from_millis(500));
        let mut wait = every;
        loop {
            let reason = tokio::select! {
                _ = tokio::time::sleep(wait) => "lifetime",
                changed = self.bundle.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    "trust bundle changed"
                }
            };
            match issue_serving_key(&self.ca, &self.dns, self.ttl) {
                Ok(key) => {
                    self.identity.replace(key);
                    info!(
                        component = "controller",
                        reason,
                        ttl_s = self.ttl.as_secs(),
                        "gRPC serving certificate renewed"
                    );
                    wait = every;
                }
                Err(e) => {
                    warn!(component = "controller", error = %e, "cannot renew the gRPC serving certificate; retrying in a minute");
                    wait = Duration::from_secs(60).min(every);
                }
            }
        }
    }
}

/// One accepted TLS connection, as tonic's server takes it.
pub struct TlsConn(TlsStream<TcpStream>);

impl tonic::transport::server::Connected for TlsConn {
    type ConnectInfo = ();

    fn connect_info(&self) -> Self::ConnectInfo {}
}

impl AsyncRead for TlsConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Accepts on `listener` and yields finished TLS handshakes. Each handshake
/// runs in its own task (bounded by [`HANDSHAKE_TIMEOUT`]), so a slow or
/// hostile client cannot hold up the others.
pub fn incoming(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
) -> impl Stream<Item = Result<TlsConn, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel::<TlsConn>(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    warn!(component = "controller", error = %e, "gRPC accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if tx.is_closed() {
                return;
            }
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(TlsConn(tls)).await;
                    }
                    Ok(Err(e)) => {
                        debug!(component = "controller", %peer, error = %e, "gRPC TLS handshake failed")
                    }
                    Err(_) => {
                        debug!(component = "controller", %peer, "gRPC TLS handshake timed out")
                    }
                }
            });
        }
    });
    futures::stream::unfold(
        rx,
        |mut rx| async move { rx.recv().await.map(|c| (Ok(c), rx)) },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ca::store::{DirRootStore, RootStore, CROSS_SIGNED_FILE};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn ca(dir: &std::path::Path) -> Arc<MeshCa> {
        let store: Arc<dyn RootStore> = Arc::new(DirRootStore::new(dir.join("ca")));
        Arc::new(
            MeshCa::load_or_generate(store, "cluster.local")
                .await
                .unwrap(),
        )
    }

    type Client = tokio_rustls::client::TlsStream<TcpStream>;

    /// A TLS client trusting the CA's current bundle; returns the stream
    /// and the leaf it was served.
    async fn connect(ca: &MeshCa, addr: std::net::SocketAddr) -> (Client, CertificateDer<'static>) {
        let tls = connect_trusting(&ca.trust_bundle().roots, addr)
            .await
            .expect("handshake with the serving certificate");
        let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
        (tls, leaf)
    }

    /// A TLS client trusting only `trusted`.
    async fn connect_trusting(
        trusted: &[CertificateDer<'static>],
        addr: std::net::SocketAddr,
    ) -> std::io::Result<Client> {
        let mut roots = rustls::RootCertStore::empty();
        for r in trusted {
            roots.add(r.clone()).unwrap();
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from(CONTROLLER_SERVER_NAME)
            .unwrap()
            .to_owned();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
    }

    async fn echo_server(serving: &ServingCertificate) -> std::net::SocketAddr {
        use futures::StreamExt;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut conns = Box::pin(incoming(listener, serving.server_config().unwrap()));
        tokio::spawn(async move {
            while let Some(Ok(mut c)) = conns.next().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = c.read(&mut buf).await {
                        if n == 0 || c.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        addr
    }

    /// Waits (at most 10 s) until the served leaf is no longer `old`.
    async fn wait_for_new_leaf(identity: &ServingIdentity, old: &CertificateDer<'_>, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while identity.leaf() == *old {
            assert!(tokio::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A CA in `dir`, the serving certificate (valid `ttl`) and an echo
    /// server behind it.
    async fn setup(
        dir: &std::path::Path,
        ttl: Duration,
    ) -> (Arc<MeshCa>, ServingCertificate, std::net::SocketAddr) {
        let ca = ca(dir).await;
        let serving = ServingCertificate::issue(ca.clone(), vec![], ttl).unwrap();
        let addr = echo_server(&serving).await;
        (ca, serving, addr)
    }

    async fn echo(tls: &mut tokio_rustls::client::TlsStream<TcpStream>, msg: &[u8]) {
        tls.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tls.read_exact(&mut back).await.unwrap();
        assert_eq!(back, msg);
    }

    #[tokio::test]
    async fn renewed_before_expiry_without_dropping_connections() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, serving, addr) = setup(dir.path(), Duration::from_millis(1500)).await;
        let identity = serving.identity();
        let (mut first, leaf1) = connect(&ca, addr).await;
        echo(&mut first, b"before").await;
        tokio::spawn(serving.renew_forever());
        // Renewal is due at 1 s; bounded wait for it.
        wait_for_new_leaf(&identity, &leaf1, "not renewed").await;
        let (mut second, leaf2) = connect(&ca, addr).await;
        assert_ne!(leaf1, leaf2, "a new handshake gets the renewed certificate");
        echo(&mut second, b"after").await;
        echo(&mut first, b"still open").await;
    }

    /// The chain a handshake trusting `trusted` was served, or the error.
    async fn served_chain(
        trusted: &[CertificateDer<'static>],
        addr: std::net::SocketAddr,
    ) -> Result<Vec<CertificateDer<'static>>, String> {
        let mut tls = connect_trusting(trusted, addr)
            .await
            .map_err(|e| e.to_string())?;
        echo(&mut tls, b"hello").await;
        Ok(tls.get_ref().1.peer_certificates().unwrap().to_vec())
    }

    #[tokio::test]
    async fn reissued_from_the_new_root_when_the_root_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, serving, addr) = setup(dir.path(), Duration::from_secs(3600)).await;
        let identity = serving.identity();
        let old_root = ca.trust_bundle().roots[0].clone();
        let (mut before, leaf1) = connect(&ca, addr).await;
        tokio::spawn(serving.renew_forever());
        ca.rotate().await.unwrap();
        wait_for_new_leaf(&identity, &leaf1, "not reissued").await;
        let new_root = ca.trust_bundle().roots[0].clone();
        assert_ne!(new_root, old_root);

        // The overlap: the chain is the leaf and the new root cross-signed
        // by the old one, so a client that knows only the old root (a
        // ztunnel started before the rotation) verifies it, and so does
        // one that knows only the new root.
        let chain = served_chain(std::slice::from_ref(&old_root), addr)
            .await
            .expect("a client trusting only the old root verifies the overlap's chain");
        assert_eq!(chain.len(), 2, "leaf and the cross-signed new root");
        let stored =
            std::fs::read_to_string(dir.path().join("ca").join(CROSS_SIGNED_FILE)).unwrap();
        assert_eq!(
            certs_from_pem(&stored).unwrap(),
            vec![chain[1].clone()],
            "the stored cross-signed root"
        );
        served_chain(std::slice::from_ref(&new_root), addr)
            .await
            .expect("a client trusting only the new root verifies it too");

        // Once the old root is retired, the chain is the new leaf alone:
        // only the new root verifies it.
        let leaf2 = identity.leaf();
        ca.retire_previous_roots().await.unwrap();
        wait_for_new_leaf(&identity, &leaf2, "not reissued at retirement").await;
        let err = served_chain(std::slice::from_ref(&old_root), addr)
            .await
            .expect_err("the old root no longer verifies the controller");
        assert!(err.contains("UnknownIssuer"), "{err}");
        let chain = served_chain(std::slice::from_ref(&new_root), addr)
            .await
            .unwrap();
        assert_eq!(chain.len(), 1);
        let (mut after, _) = connect(&ca, addr).await;
        echo(&mut after, b"new root").await;
        echo(&mut before, b"old stream lives").await;
    }

    #[tokio::test]
    async fn a_stalled_handshake_does_not_block_others() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _serving, addr) = setup(dir.path(), Duration::from_secs(3600)).await;
        // Connects and says nothing.
        let _silent = TcpStream::connect(addr).await.unwrap();
        let mut garbage = TcpStream::connect(addr).await.unwrap();
        garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
        let (mut ok, _) = connect(&ca, addr).await;
        echo(&mut ok, b"served").await;
    }

    #[tokio::test]
    async fn a_post_quantum_only_client_is_served() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _serving, addr) = setup(dir.path(), Duration::from_secs(3600)).await;
        let mut only_pq = rustls::crypto::aws_lc_rs::default_provider();
        only_pq
            .kx_groups
            .retain(|g| g.name() == rustls::NamedGroup::X25519MLKEM768);
        let mut roots = rustls::RootCertStore::empty();
        for r in &ca.trust_bundle().roots {
            roots.add(r.clone()).unwrap();
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(only_pq))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from(CONTROLLER_SERVER_NAME)
            .unwrap()
            .to_owned();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(name, tcp)
            .await
            .expect("a handshake offering only X25519MLKEM768");
        assert_eq!(
            tls.get_ref()
                .1
                .negotiated_key_exchange_group()
                .map(|g| g.name()),
            Some(rustls::NamedGroup::X25519MLKEM768)
        );
        echo(&mut tls, b"pq").await;
    }
}
