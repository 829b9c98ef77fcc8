//! The mesh CA over real loopback gRPC: node authorization, tokens, chains
//! that verify against the bundle, and root rotation with overlap.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType};
use tokio::sync::watch;
use tonic::transport::server::TcpIncoming;
use tonic::Code;
use weft_api::proto::ca_client::CaClient;
use weft_api::proto::CreateCertificateRequest;
use weft_api::{Identity, MeshModel};
use weft_controller::ca::service::CaService;
use weft_controller::ca::{BootstrapTokens, Csr, DirRootStore, MeshCa, RootStore};
use weft_pki::{TrustBundle, WorkloadCert};

const MODEL: &str = r#"
workloads:
  - { name: cart-1, namespace: shop, service_account: cart, node: n1, ips: [10.0.1.2] }
  - { name: pay-1, namespace: shop, service_account: pay, node: n2, ips: [10.0.2.2] }
"#;

fn cart() -> Identity {
    Identity::new("cluster.local", "shop", "cart")
}

fn pay() -> Identity {
    Identity::new("cluster.local", "shop", "pay")
}

/// A CSR exactly as a ztunnel makes one, and its key.
fn csr_for(id: &Identity) -> (String, KeyPair) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (pem, key)
}

fn issue(ca: &MeshCa, id: &Identity) -> WorkloadCert {
    let (pem, key) = csr_for(id);
    let issued = ca
        .sign(Csr::from_pem(&pem).unwrap(), Duration::ZERO)
        .unwrap();
    WorkloadCert::from_pem(&issued.chain_pem.concat(), &key.serialize_pem()).unwrap()
}

/// Whether `client` and `server` complete a mutual TLS 1.3 handshake with
/// the HBONE configs, each trusting `trust`.
async fn mtls_ok(client: &WorkloadCert, server: &WorkloadCert, trust: &TrustBundle) -> bool {
    let scfg = weft_hbone::server_config(server, trust).unwrap();
    let ccfg = weft_hbone::client_config(client, trust, &server.identity).unwrap();
    let (a, b) = tokio::io::duplex(64 * 1024);
    let acceptor = tokio_rustls::TlsAcceptor::from(scfg);
    let connector = tokio_rustls::TlsConnector::from(ccfg);
    let name = rustls::pki_types::ServerName::try_from("hbone.weft.invalid").unwrap();
    let (s, c) = tokio::join!(acceptor.accept(b), connector.connect(name, a));
    s.is_ok() && c.is_ok()
}

struct Harness {
    addr: SocketAddr,
    ca: Arc<MeshCa>,
    _models: watch::Sender<Arc<MeshModel>>,
    _dir: tempfile::TempDir,
}

async fn start() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn RootStore> = Arc::new(DirRootStore::new(dir.path().join("ca")));
    let ca = Arc::new(
        MeshCa::load_or_generate(store, "cluster.local")
            .await
            .unwrap(),
    );
    let (models, models_rx) = watch::channel(Arc::new(MeshModel::from_yaml(MODEL).unwrap()));
    let tokens = BootstrapTokens::parse("n1: tok-1\nn2: tok-2\n").unwrap();
    let svc = CaService::new(ca.clone(), Arc::new(tokens), models_rx).into_service();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    Harness {
        addr,
        ca,
        _models: models,
        _dir: dir,
    }
}

async fn request(
    addr: SocketAddr,
    token: Option<&str>,
    csr_pem: String,
    ttl: u64,
) -> Result<weft_api::proto::CreateCertificateResponse, tonic::Status> {
    let mut client = CaClient::connect(format!("http://{addr}")).await.unwrap();
    let mut req = tonic::Request::new(CreateCertificateRequest {
        csr_pem,
        requested_ttl_seconds: ttl,
    });
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    client.create_certificate(req).await.map(|r| r.into_inner())
}

#[tokio::test]
async fn ca_node_gets_a_chain_for_its_pod_that_verifies_against_the_bundle() {
    let h = start().await;
    let (csr, key) = csr_for(&cart());
    let resp = request(h.addr, Some("tok-1"), csr, 0).await.unwrap();
    assert_eq!(
        resp.cert_chain_pem.len(),
        1,
        "leaf only: the root is not sent"
    );
    let cert = WorkloadCert::from_pem(&resp.cert_chain_pem.concat(), &key.serialize_pem()).unwrap();
    assert_eq!(cert.identity, cart());
    let lifetime = cert.not_after.duration_since(SystemTime::now()).unwrap();
    assert!(
        lifetime > Duration::from_secs(23 * 3600) && lifetime <= Duration::from_secs(24 * 3600)
    );

    let bundle = TrustBundle::from_pem(&resp.trust_bundle_pem).unwrap();
    assert_eq!(bundle, h.ca.trust_bundle());
    let server = issue(&h.ca, &pay());
    assert!(mtls_ok(&cert, &server, &bundle).await);
    // And not against some other CA.
    let stranger = weft_pki::LocalCa::generate("cluster.local")
        .unwrap()
        .trust_bundle();
    assert!(!mtls_ok(&cert, &server, &stranger).await);

    // Requested lifetimes are capped (48 h by default).
    let (csr, key) = csr_for(&cart());
    let resp = request(h.addr, Some("tok-1"), csr, 1000 * 3600)
        .await
        .unwrap();
    let long = WorkloadCert::from_pem(&resp.cert_chain_pem.concat(), &key.serialize_pem()).unwrap();
    assert!(
        long.not_after.duration_since(SystemTime::now()).unwrap() <= Duration::from_secs(48 * 3600)
    );
}

#[tokio::test]
async fn ca_refuses_identities_of_pods_on_other_nodes() {
    let h = start().await;
    let (csr, _) = csr_for(&pay());
    let s = request(h.addr, Some("tok-1"), csr, 0).await.unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    assert!(
        s.message()
            .contains("spiffe://cluster.local/ns/shop/sa/pay"),
        "{}",
        s.message()
    );
    assert!(s.message().contains("n1"), "{}", s.message());

    // Nor identities nobody runs, nor another trust domain.
    let (csr, _) = csr_for(&Identity::new("cluster.local", "shop", "ghost"));
    assert_eq!(
        request(h.addr, Some("tok-1"), csr, 0)
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
    let (csr, _) = csr_for(&Identity::new("evil.example", "shop", "cart"));
    assert_eq!(
        request(h.addr, Some("tok-1"), csr, 0)
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied
    );
}

#[tokio::test]
async fn ca_bad_or_missing_tokens_and_bad_csrs() {
    let h = start().await;
    let (csr, _) = csr_for(&cart());
    let s = request(h.addr, Some("wrong"), csr.clone(), 0)
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    let s = request(h.addr, None, csr, 0).await.unwrap_err();
    assert_eq!(s.code(), Code::Unauthenticated);
    let s = request(h.addr, Some("tok-1"), "not a csr".into(), 0)
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    // A CSR with a DNS name besides the URI.
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::new(vec!["x.example".to_owned()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::URI(cart().to_string().try_into().unwrap()));
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let s = request(h.addr, Some("tok-1"), csr, 0).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
}

/// During the overlap a leaf from the old root and one from the new root
/// trust each other (the bundle holds both roots); once the old root is
/// retired the old leaf no longer verifies. The rotation survives a
/// restart.
#[tokio::test]
async fn ca_rotation_overlap_keeps_old_leaves_trusted_until_retired() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn RootStore> = Arc::new(DirRootStore::new(dir.path()));
    let ca = MeshCa::load_or_generate(store.clone(), "cluster.local")
        .await
        .unwrap();
    let before = ca.trust_bundle();
    let bundle_rx = ca.subscribe_bundle();
    let old_leaf = issue(&ca, &cart());

    ca.rotate().await.unwrap();
    assert!(bundle_rx.has_changed().unwrap());
    let overlap = ca.trust_bundle();
    assert_eq!(overlap.roots.len(), 2);
    assert_eq!(
        overlap.roots[1], before.roots[0],
        "old root kept, new one first"
    );
    let new_leaf = issue(&ca, &pay());
    assert!(mtls_ok(&old_leaf, &new_leaf, &overlap).await);
    assert!(mtls_ok(&new_leaf, &old_leaf, &overlap).await);
    // The new leaf is from the new root, and carries it cross-signed by
    // the old one: a peer that still trusts only the old root (it has not
    // got the new bundle yet) accepts it either way round; stripped of the
    // cross-signed certificate it would not.
    assert_eq!(new_leaf.chain.len(), 2);
    assert!(mtls_ok(&new_leaf, &old_leaf, &before).await);
    assert!(mtls_ok(&old_leaf, &new_leaf, &before).await);
    let mut bare = new_leaf.clone();
    bare.chain.truncate(1);
    assert!(!mtls_ok(&bare, &old_leaf, &before).await);
    assert!(mtls_ok(&bare, &issue(&ca, &cart()), &overlap).await);

    // A restart during the overlap comes back with the same two roots.
    let reloaded = MeshCa::load_or_generate(store.clone(), "cluster.local")
        .await
        .unwrap();
    assert_eq!(reloaded.trust_bundle(), overlap);

    ca.retire_previous_roots().await.unwrap();
    let after = ca.trust_bundle();
    assert_eq!(after.roots, vec![overlap.roots[0].clone()]);
    assert!(!mtls_ok(&old_leaf, &new_leaf, &after).await);
    // Leaves of the overlap (with the cross-signed root) keep working;
    // new ones are the leaf alone.
    let fresh = issue(&ca, &cart());
    assert_eq!(fresh.chain.len(), 1);
    assert!(mtls_ok(&fresh, &new_leaf, &after).await);
    assert!(mtls_ok(&new_leaf, &fresh, &after).await);
    let reloaded = MeshCa::load_or_generate(store, "cluster.local")
        .await
        .unwrap();
    assert_eq!(reloaded.trust_bundle(), after);
}

#[tokio::test]
async fn ca_signs_with_a_user_supplied_intermediate() {
    // A root and an intermediate made outside Weft.
    let root_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut rp = CertificateParams::default();
    rp.distinguished_name
        .push(rcgen::DnType::CommonName, "Corp root");
    rp.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root = rp.self_signed(&root_key).unwrap();
    let int_key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut ip = CertificateParams::default();
    ip.distinguished_name
        .push(rcgen::DnType::CommonName, "Corp mesh intermediate");
    ip.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let int = ip.signed_by(&int_key, &root, &root_key).unwrap();

    let ca = MeshCa::from_intermediate(
        &int.pem(),
        &int_key.serialize_pem(),
        &root.pem(),
        "cluster.local",
    )
    .unwrap();
    let bundle = ca.trust_bundle();
    assert_eq!(bundle.roots, vec![root.der().clone()]);
    let (a, b) = (issue(&ca, &cart()), issue(&ca, &pay()));
    assert_eq!(a.chain.len(), 2, "leaf + intermediate");
    assert!(mtls_ok(&a, &b, &bundle).await);
    assert!(ca.rotate().await.is_err());
}
