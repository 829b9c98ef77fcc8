//! Trust in the controller follows what it sends and the mounted CA file,
//! against a controller stand-in over loopback gRPC with real TLS whose
//! serving certificate the test swaps between roots: the CA client and the
//! config stream reconnect under roots learnt from the controller (while
//! the CA file still names only the old root), pick up a CA file replaced
//! in place (as kubelet updates a ConfigMap volume), and a certificate no
//! trusted root signed is reported as such, not as "transport error".

use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use futures::{Stream, StreamExt};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::PrivateKeyDer;
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status, Streaming};
use weft_api::proto::ca_server::{Ca, CaServer};
use weft_api::proto::mesh_config_server::{MeshConfig, MeshConfigServer};
use weft_api::proto::{
    ConfigUpdate, CreateCertificateRequest, CreateCertificateResponse, Removals, Resources,
    SubscribeRequest,
};
use weft_api::Identity;
use weft_dataplane::certs::{CertProvider, IdentityError, TrustRoots};
use weft_dataplane::control::{
    error_chain, ConfigSink, ConfigStream, ControllerAddr, ControllerTrust, GrpcCaProvider, Role,
    CONTROLLER_SERVER_NAME,
};
use weft_hbone::tls::provider;
use weft_pki::params::serving_params;
use weft_pki::pem::certs_from_pem;
use weft_pki::signer::{generate_root, Csr};
use weft_pki::{Signer, TrustBundle};

/// A mesh root: its certificate and key.
struct Root {
    pem: String,
    key: String,
    signer: Signer,
}

fn root() -> Root {
    let r = generate_root("cluster.local").unwrap();
    let signer = Signer::from_pem(&r.cert_pem, &r.key_pem, vec![], "cluster.local").unwrap();
    Root {
        pem: r.cert_pem,
        key: r.key_pem,
        signer,
    }
}

/// A serving certificate for the controller's name, from `root`.
fn serving_key(root: &Root) -> CertifiedKey {
    let params = serving_params(
        CONTROLLER_SERVER_NAME,
        vec![CONTROLLER_SERVER_NAME.into()],
        Duration::from_secs(3600),
    )
    .unwrap();
    let (chain, key) = root.signer.sign_with_new_key(params).unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    CertifiedKey::new(
        certs_from_pem(&chain).unwrap(),
        provider().key_provider.load_private_key(key).unwrap(),
    )
}

/// The certificate new handshakes get; the test swaps it.
#[derive(Debug)]
struct Swappable(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Swappable {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap().clone())
    }
}

type UpdateTx = mpsc::Sender<Result<ConfigUpdate, Status>>;

/// The controller's two services: the CA signs with `signer` and answers
/// with `bundle`; each config stream is handed to the test.
struct StandIn {
    signer: Mutex<Signer>,
    bundle: Mutex<String>,
    streams: mpsc::UnboundedSender<(Streaming<SubscribeRequest>, UpdateTx)>,
}

#[tonic::async_trait]
impl Ca for StandIn {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let csr = Csr::from_pem(&request.get_ref().csr_pem)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let issued = self
            .signer
            .lock()
            .unwrap()
            .sign_csr(csr, Duration::from_secs(3600))
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(CreateCertificateResponse {
            cert_chain_pem: issued.chain_pem,
            trust_bundle_pem: self.bundle.lock().unwrap().clone(),
        }))
    }
}

#[tonic::async_trait]
impl MeshConfig for StandIn {
    type SubscribeStream =
        Pin<Box<dyn Stream<Item = Result<ConfigUpdate, Status>> + Send + 'static>>;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let (tx, rx) = mpsc::channel(8);
        let _ = self.streams.send((request.into_inner(), tx));
        Ok(Response::new(Box::pin(futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
        ))))
    }
}

/// The stand-in served over TLS on `addr` until `stop`.
struct Server {
    addr: SocketAddr,
    cert: Arc<Swappable>,
    stop: Option<oneshot::Sender<()>>,
    done: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(addr: SocketAddr, key: CertifiedKey, service: Arc<StandIn>) -> Server {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let cert = Arc::new(Swappable(RwLock::new(Arc::new(key))));
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_cert_resolver(cert.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        // Failed handshakes are dropped; the rest go to tonic.
        let incoming = futures::stream::unfold(listener, move |l| {
            let acceptor = acceptor.clone();
            async move {
                loop {
                    let (tcp, _) = l.accept().await.ok()?;
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        return Some((Ok::<_, std::io::Error>(tls), l));
                    }
                }
            }
        })
        .boxed();
        let (stop, stopped) = oneshot::channel::<()>();
        let done = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(CaServer::from_arc(service.clone()))
                .add_service(MeshConfigServer::from_arc(service))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        Server {
            addr,
            cert,
            stop: Some(stop),
            done,
        }
    }

    fn serve_from(&self, root: &Root) {
        *self.cert.0.write().unwrap() = Arc::new(serving_key(root));
    }

    /// Closes every connection (graceful: GOAWAY) and the listener.
    async fn stop(mut self) -> SocketAddr {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.done)
            .await
            .expect("server stops")
            .unwrap();
        self.addr
    }
}

fn stand_in(
    signer: &Root,
    bundle: &[&Root],
) -> (
    Arc<StandIn>,
    mpsc::UnboundedReceiver<(Streaming<SubscribeRequest>, UpdateTx)>,
) {
    let (tx, rx) = mpsc::unbounded_channel();
    let signer = Signer::from_pem(&signer.pem, &signer.key, vec![], "cluster.local").unwrap();
    (
        Arc::new(StandIn {
            signer: Mutex::new(signer),
            bundle: Mutex::new(bundle.iter().map(|r| r.pem.as_str()).collect()),
            streams: tx,
        }),
        rx,
    )
}

/// Replaces `path` the way kubelet updates a ConfigMap volume: the new
/// content appears at once, by rename.
fn replace_file(path: &Path, content: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[tokio::test]
async fn the_ca_client_follows_the_roots_it_is_sent_and_the_ca_file() {
    let (r1, r2, r3) = (root(), root(), root());
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("root-cert.pem");
    std::fs::write(&ca_file, &r1.pem).unwrap();
    // The overlap of a rotation from r1 to r2: the CA answers with both.
    let (service, _streams) = stand_in(&r2, &[&r2, &r1]);
    let server = Server::start(loopback(), serving_key(&r1), service.clone()).await;
    let trust = TrustRoots::default();
    let controller =
        Arc::new(ControllerTrust::from_file(&ca_file, trust.clone(), "ztunnel").unwrap());
    let provider = GrpcCaProvider::new(
        ControllerAddr::tls(format!("https://{}", server.addr), controller),
        "tok".into(),
        Duration::ZERO,
        trust.clone(),
    )
    .unwrap();
    let id = Identity::new("cluster.local", "shop", "cart");
    provider
        .fetch(&id)
        .await
        .expect("verified by the CA file's root");
    assert_eq!(
        trust.get(),
        TrustBundle::from_pem(&format!("{}{}", r2.pem, r1.pem)).unwrap()
    );

    // The controller restarts with a serving certificate from r2 alone; the
    // CA file still names only r1. The same client reconnects, verifying it
    // under the root the controller sent.
    let addr = server.stop().await;
    let server = Server::start(addr, serving_key(&r2), service.clone()).await;
    provider
        .fetch(&id)
        .await
        .expect("verified by the root learnt from the CA's answer");

    // A root nobody sent: refused, and the error says why.
    let addr = server.stop().await;
    let server = Server::start(addr, serving_key(&r3), service.clone()).await;
    match provider.fetch(&id).await {
        Err(IdentityError::Unavailable(why)) => {
            assert!(
                why.contains(
                    "unknown issuer: the controller's certificate is not signed by a root this ztunnel trusts"
                ),
                "{why}"
            );
            assert!(why.contains(&ca_file.display().to_string()), "{why}");
            assert!(!why.ends_with("transport error"), "{why}");
        }
        other => panic!("want Unavailable naming the TLS cause, got {other:?}"),
    }

    // The CA file is updated in place (the ConfigMap now names r3): the
    // next connection trusts it, without a new client.
    replace_file(&ca_file, &r3.pem);
    provider
        .fetch(&id)
        .await
        .expect("verified by the CA file's new root");

    // An unreadable file keeps the roots last read from it.
    std::fs::remove_file(&ca_file).unwrap();
    let addr = server.stop().await;
    let server = Server::start(addr, serving_key(&r3), service).await;
    provider
        .fetch(&id)
        .await
        .expect("the last good file roots stay");
    server.stop().await;
}

/// Counts accepted models.
#[derive(Default)]
struct Sink(Mutex<Vec<u64>>);

impl ConfigSink for Sink {
    fn model_changed(
        &self,
        _cache: &weft_api::config_cache::ConfigCache,
        _changes: &weft_api::config_cache::Changes,
        version: u64,
    ) {
        self.0.lock().unwrap().push(version);
    }
}

fn full_update(version: u64, bundle: &[&Root]) -> ConfigUpdate {
    ConfigUpdate {
        instance_id: "controller-1".into(),
        version,
        full: true,
        trust_domain: "cluster.local".into(),
        upserts: Some(Resources {
            workloads: vec![weft_api::proto::Workload {
                name: format!("w{version}"),
                namespace: "shop".into(),
                node: "n1".into(),
                service_account: "default".into(),
                ips: vec!["10.0.0.1".into()],
                ..Default::default()
            }],
            ..Default::default()
        }),
        removals: Some(Removals::default()),
        trust_bundle_pem: bundle.iter().map(|r| r.pem.clone()).collect(),
    }
}

async fn within<T>(what: &str, f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .unwrap_or_else(|_| panic!("timed out: {what}"))
}

#[tokio::test]
async fn the_config_stream_reconnects_under_the_roots_it_was_sent() {
    let (r1, r2, r3) = (root(), root(), root());
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("root-cert.pem");
    std::fs::write(&ca_file, &r1.pem).unwrap();
    let (service, mut streams) = stand_in(&r2, &[&r2, &r1]);
    let server = Server::start(loopback(), serving_key(&r1), service).await;
    let trust = TrustRoots::default();
    let controller =
        Arc::new(ControllerTrust::from_file(&ca_file, trust.clone(), "ztunnel").unwrap());
    let addr = ControllerAddr::tls(format!("https://{}", server.addr), controller);
    let sink = Arc::new(Sink::default());
    let client = tokio::spawn(
        ConfigStream {
            endpoint: addr.clone(),
            node: "n1".into(),
            token: "tok".into(),
            role: Role::Ztunnel,
            trust: trust.clone(),
            sink: sink.clone(),
        }
        .run(),
    );

    // First session, verified by the CA file: the controller sends the
    // overlap's bundle (the new signer r2 first).
    let (mut inbound, tx) = within("first subscribe", streams.recv()).await.unwrap();
    within("hello", inbound.message()).await.unwrap().unwrap();
    tx.send(Ok(full_update(1, &[&r2, &r1]))).await.unwrap();
    within("ack", inbound.message()).await.unwrap().unwrap();
    assert_eq!(trust.get().roots.len(), 2);

    // The controller now serves a certificate from r2 alone and the stream
    // drops: the client reconnects, trusting r2 because the stream said so.
    server.serve_from(&r2);
    drop(tx);
    drop(inbound);
    let (mut inbound, tx) = within("resubscribe under r2", streams.recv())
        .await
        .unwrap();
    within("hello again", inbound.message())
        .await
        .unwrap()
        .unwrap();
    // The old root retired: only r2 from now on.
    tx.send(Ok(full_update(2, &[&r2]))).await.unwrap();
    within("ack", inbound.message()).await.unwrap().unwrap();
    assert_eq!(trust.get(), TrustBundle::from_pem(&r2.pem).unwrap());
    assert_eq!(*sink.0.lock().unwrap(), vec![1, 2]);

    // A certificate from a root neither the file nor the stream named: the
    // error names the cause.
    server.serve_from(&r3);
    let ep = addr.endpoint().unwrap();
    let err = addr.connect(ep).await.expect_err("r3 is not trusted");
    let text = error_chain(&err);
    assert!(
        text.contains("unknown issuer: the controller's certificate is not signed by a root this ztunnel trusts (2 roots: 1 from"),
        "{text}"
    );
    client.abort();
    drop(tx);
    server.stop().await;
}
