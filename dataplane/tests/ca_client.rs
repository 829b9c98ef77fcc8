//! `GrpcCaProvider` against a small CA over loopback gRPC: the CSR carries
//! the SPIFFE URI, the bearer token is sent, the chain becomes a
//! `WorkloadCert` and the bundle reaches the shared trust store.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rcgen::{CertificateParams, CertificateSigningRequestParams, IsCa, KeyPair, SanType};
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use weft_api::proto::ca_server::{Ca, CaServer};
use weft_api::proto::{CreateCertificateRequest, CreateCertificateResponse};
use weft_api::Identity;
use weft_dataplane::certs::{CertProvider, IdentityError, TrustRoots};
use weft_dataplane::control::GrpcCaProvider;
use weft_pki::TrustBundle;

struct TestCa {
    root: rcgen::Certificate,
    key: KeyPair,
    seen: Mutex<Vec<(Option<String>, Vec<String>)>>,
}

#[tonic::async_trait]
impl Ca for TestCa {
    async fn create_certificate(
        &self,
        request: Request<CreateCertificateRequest>,
    ) -> Result<Response<CreateCertificateResponse>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let csr = CertificateSigningRequestParams::from_pem(&request.get_ref().csr_pem)
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let sans: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| match s {
                SanType::URI(u) => u.as_str().to_owned(),
                other => format!("{other:?}"),
            })
            .collect();
        self.seen.lock().unwrap().push((auth.clone(), sans.clone()));
        if auth.as_deref() != Some("Bearer tok-1") {
            return Err(Status::unauthenticated("bad token"));
        }
        if sans.iter().any(|s| s.ends_with("/sa/forbidden")) {
            return Err(Status::permission_denied("not on your node"));
        }
        let mut params = csr.params;
        params.is_ca = IsCa::ExplicitNoCa;
        let leaf = CertificateSigningRequestParams {
            params,
            public_key: csr.public_key,
        }
        .signed_by(&self.root, &self.key)
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(CreateCertificateResponse {
            cert_chain_pem: vec![leaf.pem()],
            trust_bundle_pem: self.root.pem(),
        }))
    }
}

async fn start() -> (String, Arc<TestCa>) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "test root");
    params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let root = params.self_signed(&key).unwrap();
    let ca = Arc::new(TestCa {
        root,
        key,
        seen: Mutex::default(),
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = CaServer::from_arc(ca.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    (format!("http://{addr}"), ca)
}

#[tokio::test]
async fn grpc_ca_provider_fetches_a_cert_and_the_trust_bundle() {
    let (endpoint, ca) = start().await;
    let trust = TrustRoots::default();
    let provider = GrpcCaProvider::new(
        &endpoint,
        "tok-1".into(),
        Duration::from_secs(3600),
        trust.clone(),
    )
    .unwrap();
    let id = Identity::new("cluster.local", "shop", "cart");
    let cert = provider.fetch(&id).await.unwrap();
    assert_eq!(cert.identity, id);
    let (auth, sans) = ca.seen.lock().unwrap()[0].clone();
    assert_eq!(auth.as_deref(), Some("Bearer tok-1"));
    assert_eq!(sans, vec![id.to_string()], "URI SAN only");
    let want = TrustBundle::from_pem(&ca.root.pem()).unwrap();
    assert_eq!(trust.get(), want);

    // Refusals are `Refused`, naming the identity.
    let no = Identity::new("cluster.local", "shop", "forbidden");
    match provider.fetch(&no).await {
        Err(IdentityError::Refused { identity, reason }) => {
            assert_eq!(identity, no.to_string());
            assert!(reason.contains("not on your node"), "{reason}");
        }
        other => panic!("want Refused, got {other:?}"),
    }
    let bad_token = GrpcCaProvider::new(
        &endpoint,
        "wrong".into(),
        Duration::from_secs(3600),
        TrustRoots::default(),
    )
    .unwrap();
    assert!(matches!(
        bad_token.fetch(&id).await,
        Err(IdentityError::Refused { .. })
    ));
    // Nobody listening: Unavailable (CertManager then keeps the old cert).
    let gone = GrpcCaProvider::new(
        "http://127.0.0.1:1",
        "tok-1".into(),
        Duration::from_secs(3600),
        TrustRoots::default(),
    )
    .unwrap();
    assert!(matches!(
        gone.fetch(&id).await,
        Err(IdentityError::Unavailable(_))
    ));
}
