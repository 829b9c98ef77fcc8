//! Certificates and the mutual-TLS handshake: the local CA, trust, SPIFFE
//! identity checks, and serve() facing bytes that are not a good HBONE client.

mod common;

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use common::*;
use http::HeaderMap;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use weft_hbone::{
    client_config, connect, identity_of_cert, serve, server_config, FailureReason, HboneError,
    TlsError, TrustBundle, WorkloadCert,
};
use weft_pki::{LocalCa, PkiError};

fn temp_dir(name: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    std::env::temp_dir().join(format!("weft-hbone-{name}-{}-{nanos}", std::process::id()))
}

#[test]
fn leaf_carries_only_the_spiffe_id_with_mesh_key_usages() {
    let mesh = Mesh::new();
    let leaf = mesh.cert(&client_id());
    assert_eq!(leaf.identity, client_id());
    assert_eq!(leaf.chain.len(), 1);
    assert_eq!(identity_of_cert(&leaf.chain[0]).expect("id"), client_id());

    let (_, cert) = x509_parser::parse_x509_certificate(leaf.chain[0].as_ref()).expect("parse");
    assert!(cert.subject().as_raw().len() <= 2, "empty subject");
    let san = cert
        .subject_alternative_name()
        .expect("san ok")
        .expect("san present");
    assert!(san.critical, "SAN must be critical with an empty subject");
    let names: Vec<String> = san
        .value
        .general_names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect();
    assert_eq!(names, vec![format!("URI({:?})", client_id().to_string())]);
    let eku = cert
        .extended_key_usage()
        .expect("eku ok")
        .expect("eku present")
        .value;
    assert!(eku.server_auth && eku.client_auth);
    let ku = cert.key_usage().expect("ku ok").expect("ku present").value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    assert!(!cert.is_ca());
    assert_eq!(
        cert.public_key().algorithm.algorithm,
        x509_parser::oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY
    );

    let now = SystemTime::now();
    let lifetime = leaf
        .not_after
        .duration_since(leaf.not_before)
        .expect("ordered");
    assert!(lifetime >= DAY && lifetime <= DAY + Duration::from_secs(6 * 60));
    assert!(leaf.not_before < now, "backdated");
    assert_eq!(leaf.refresh_at(), leaf.not_before + lifetime / 2);
    assert!(!leaf.is_expired(now));
    assert!(leaf.is_expired(leaf.not_after));
}

#[test]
fn ca_refuses_identities_of_another_trust_domain() {
    let ca = LocalCa::generate("cluster.local").expect("ca");
    let foreign = weft_api::Identity::new("other.domain", "ns", "sa");
    assert!(matches!(
        ca.sign(&foreign, DAY),
        Err(PkiError::WrongTrustDomain { .. })
    ));
}

#[tokio::test]
async fn persisted_ca_reloads_and_its_leaves_chain_to_the_original_root() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("ca");
    let first = LocalCa::load_or_generate(&dir, TD).expect("generate");
    let key_mode = std::fs::metadata(dir.join("root-key.pem"))
        .expect("key")
        .permissions()
        .mode();
    assert_eq!(key_mode & 0o777, 0o600);
    let dir_mode = std::fs::metadata(&dir).expect("dir").permissions().mode();
    assert_eq!(dir_mode & 0o777, 0o700);
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .expect("readdir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    let again = LocalCa::load_or_generate(&dir, TD).expect("reload");
    assert_eq!(again.trust_bundle(), first.trust_bundle());
    assert_eq!(again.trust_domain(), TD);

    // A leaf from the reloaded CA is accepted by peers holding the original
    // bundle, over an in-memory pipe.
    let server_cert = again.sign(&server_id(), DAY).expect("sign");
    let client_cert = first.sign(&client_id(), DAY).expect("sign");
    let bundle = TrustBundle::from_pem(&first.trust_bundle().to_pem()).expect("pem");
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let server_tls = server_config(&server_cert, &bundle).expect("server cfg");
    let server =
        tokio::spawn(async move { serve(server_io, server_tls, &fast_settings(), echo).await });
    let client_tls = client_config(&client_cert, &bundle, &server_id()).expect("client cfg");
    let conn = within("connect", connect(client_io, client_tls, &fast_settings()))
        .await
        .expect("connect");
    let stream = conn.open(target(), HeaderMap::new()).await.expect("open");
    assert_eq!(
        within("echo", echo_round_trip(stream, b"hello")).await,
        b"hello"
    );
    drop(conn);
    within("serve ends", server)
        .await
        .expect("join")
        .expect("serve ok");

    std::fs::remove_file(dir.join("root-cert.pem")).expect("rm");
    assert!(matches!(
        LocalCa::load_or_generate(&dir, TD),
        Err(PkiError::Incomplete(..))
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pem_round_trips() {
    let a = Mesh::new();
    let b = Mesh::new();
    let both = a.trust.merged(&b.trust);
    assert_eq!(both.roots.len(), 2);
    assert_eq!(TrustBundle::from_pem(&both.to_pem()).expect("parse"), both);
    assert!(TrustBundle::from_pem("no pem here").is_err());

    let leaf = a.cert(&client_id());
    let key_pem = leaf.key_pem();
    assert!(key_pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
    let parsed = WorkloadCert::from_pem(&leaf.chain_pem(), &key_pem).expect("from_pem");
    assert_eq!(parsed.identity, leaf.identity);
    assert_eq!(parsed.chain, leaf.chain);
    assert_eq!(parsed.not_after, leaf.not_after);
    assert_eq!(parsed.not_before, leaf.not_before);
}

#[tokio::test]
async fn client_rejects_server_from_another_ca() {
    let ours = Mesh::new();
    let theirs = Mesh::new();
    let (addr, mut results) =
        start_server(theirs.server_tls(&server_id()), fast_settings(), echo).await;
    let err = within(
        "dial",
        dial(addr, ours.client_tls(&client_id(), &server_id())),
    )
    .await
    .expect_err("must fail");
    assert!(
        matches!(err, HboneError::Tls(TlsError::UnknownCa)),
        "{err:?}"
    );
    assert_eq!(err.reason(), FailureReason::UnknownCa);
    // The server learns why from our alert.
    let server_err = within("serve", results.recv())
        .await
        .expect("result")
        .expect_err("fails");
    assert_eq!(
        server_err.reason(),
        FailureReason::PeerRejected,
        "{server_err:?}"
    );
}

#[tokio::test]
async fn server_rejects_client_cert_from_another_ca() {
    let ours = Mesh::new();
    let theirs = Mesh::new();
    let (addr, mut results) =
        start_server(ours.server_tls(&server_id()), fast_settings(), echo).await;
    // The client trusts our root but presents a leaf from another CA.
    let foreign_leaf = theirs.cert(&client_id());
    let tls = client_config(&foreign_leaf, &ours.trust, &server_id()).expect("cfg");
    let client_side = within("client", async {
        let conn = dial(addr, tls).await?;
        conn.open(target(), HeaderMap::new()).await.map(drop)
    })
    .await
    .expect_err("client must not get a tunnel");
    assert_eq!(
        client_side.reason(),
        FailureReason::PeerRejected,
        "{client_side:?}"
    );

    let server_err = within("serve", results.recv())
        .await
        .expect("result")
        .expect_err("fails");
    assert!(
        matches!(server_err, HboneError::Tls(TlsError::UnknownCa)),
        "{server_err:?}"
    );
    assert_eq!(server_err.reason(), FailureReason::UnknownCa);
}

#[tokio::test]
async fn client_rejects_valid_cert_with_unexpected_identity() {
    let mesh = Mesh::new();
    let impostor = id("shop", "payments");
    let (addr, _results) = start_server(mesh.server_tls(&impostor), fast_settings(), echo).await;
    let err = within(
        "dial",
        dial(addr, mesh.client_tls(&client_id(), &server_id())),
    )
    .await
    .expect_err("must fail");
    match &err {
        HboneError::Tls(TlsError::IdentityMismatch { expected, got }) => {
            assert_eq!(expected, &server_id().to_string());
            assert_eq!(got, &impostor.to_string());
        }
        other => panic!("want IdentityMismatch, got {other:?}"),
    }
    let message = err.to_string();
    assert!(
        message.contains("sa/cart") && message.contains("sa/payments"),
        "{message}"
    );
    assert_eq!(err.reason(), FailureReason::BadIdentity);
}

#[tokio::test]
async fn expired_server_cert_is_rejected() {
    let mesh = Mesh::new();
    let expired = mesh.ca.sign(&server_id(), Duration::ZERO).expect("sign");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (addr, _results) = start_server(
        server_config(&expired, &mesh.trust).expect("cfg"),
        fast_settings(),
        echo,
    )
    .await;
    let err = within(
        "dial",
        dial(addr, mesh.client_tls(&client_id(), &server_id())),
    )
    .await
    .expect_err("must fail");
    assert!(matches!(err, HboneError::Tls(TlsError::Expired)), "{err:?}");
}

#[tokio::test]
async fn rotation_overlap_trusts_both_roots() {
    let old = Mesh::new();
    let new = Mesh::new();
    let bundle = old.trust.merged(&new.trust);
    for (server_mesh, client_mesh) in [(&old, &new), (&new, &old)] {
        let server_tls = server_config(&server_mesh.cert(&server_id()), &bundle).expect("cfg");
        let (addr, _results) = start_server(server_tls, fast_settings(), echo).await;
        let client_tls =
            client_config(&client_mesh.cert(&client_id()), &bundle, &server_id()).expect("cfg");
        let conn = within("dial", dial(addr, client_tls)).await.expect("dial");
        let stream = conn.open(target(), HeaderMap::new()).await.expect("open");
        assert_eq!(within("echo", echo_round_trip(stream, b"x")).await, b"x");
    }
}

fn truncated_client_hello(mesh: &Mesh) -> Vec<u8> {
    let cfg = mesh.client_tls(&client_id(), &server_id());
    let name = rustls_pki_types::ServerName::try_from("hbone.weft.invalid").expect("name");
    let mut conn = rustls::ClientConnection::new(cfg, name).expect("client conn");
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).expect("hello");
    hello.truncate(hello.len() / 2);
    hello
}

#[tokio::test]
async fn bad_clients_fail_fast_while_a_good_connection_keeps_working() {
    let mesh = Mesh::new();
    let (addr, mut results) =
        start_server(mesh.server_tls(&server_id()), fast_settings(), echo).await;
    let good = dial(addr, mesh.client_tls(&client_id(), &server_id()))
        .await
        .expect("dial");

    let bad_inputs: Vec<(&str, Vec<u8>, FailureReason)> = vec![
        (
            "garbage",
            b"\x00\x01\x02\x03garbage\xff\xfe".repeat(20),
            FailureReason::NotTls,
        ),
        (
            "http1",
            b"GET / HTTP/1.1\r\nHost: example\r\n\r\n".to_vec(),
            FailureReason::NotTls,
        ),
        // Stays open after half a ClientHello: only the timeout ends it.
        (
            "truncated hello",
            truncated_client_hello(&mesh),
            FailureReason::Timeout,
        ),
        // Closes right away.
        ("empty", Vec::new(), FailureReason::Eof),
    ];
    let mut sockets = Vec::new();
    for (name, bytes, _) in &bad_inputs {
        let mut socket = TcpStream::connect(addr).await.expect("tcp");
        socket.write_all(bytes).await.expect(name);
        if bytes.is_empty() {
            drop(socket);
        } else {
            sockets.push(socket);
        }
    }

    // While the bad connections are pending, the good one carries data.
    let stream = good.open(target(), HeaderMap::new()).await.expect("open");
    assert_eq!(
        within("echo", echo_round_trip(stream, b"still fine")).await,
        b"still fine"
    );

    let mut reasons = Vec::new();
    for _ in &bad_inputs {
        let result = within("serve result", results.recv())
            .await
            .expect("result");
        let err = result.expect_err("bad client must end serve with an error");
        reasons.push(err.reason());
    }
    let mut want: Vec<_> = bad_inputs.iter().map(|(_, _, r)| *r).collect();
    let key = |r: &FailureReason| r.as_str();
    reasons.sort_by_key(key);
    want.sort_by_key(key);
    assert_eq!(reasons, want);

    let stream = good
        .open(target(), HeaderMap::new())
        .await
        .expect("open again");
    assert_eq!(
        within("echo", echo_round_trip(stream, b"and after")).await,
        b"and after"
    );
    drop(sockets);
}

#[tokio::test]
async fn random_garbage_never_hangs_serve() {
    let mesh = Mesh::new();
    let tls = mesh.server_tls(&server_id());
    for len in [1usize, 5, 100, 4096, 20_000] {
        let (mut client, server_io) = tokio::io::duplex(64 * 1024);
        let tls = tls.clone();
        let server =
            tokio::spawn(async move { serve(server_io, tls, &fast_settings(), echo).await });
        let _ = client.write_all(&random_bytes(len)).await;
        // Keep our end open: the server must give up on its own.
        let result = within("serve", server).await.expect("no panic");
        assert!(result.is_err(), "len {len}");
        drop(client);
    }
}

/// The hybrid post-quantum group X25519MLKEM768: a client offering only it
/// completes an HBONE handshake with a Weft server, and a Weft client with
/// its default offer settles on it too (it is offered first).
#[tokio::test]
async fn post_quantum_key_exchange_is_supported_and_preferred() {
    use rustls::NamedGroup;
    let mesh = Mesh::new();
    let (addr, _results) = start_server(mesh.server_tls(&server_id()), fast_settings(), echo).await;
    let mut only_pq = rustls::crypto::aws_lc_rs::default_provider();
    only_pq
        .kx_groups
        .retain(|g| g.name() == NamedGroup::X25519MLKEM768);
    assert_eq!(
        only_pq.kx_groups.len(),
        1,
        "the provider has X25519MLKEM768"
    );
    let cfg = weft_hbone::client_config_with(
        &mesh.cert(&client_id()),
        &mesh.trust,
        &server_id(),
        std::sync::Arc::new(only_pq),
    )
    .expect("client config");
    let conn = within("pq-only connect", dial(addr, cfg))
        .await
        .expect("handshake");
    assert_eq!(conn.key_exchange_group(), Some(NamedGroup::X25519MLKEM768));
    let stream = conn.open(target(), HeaderMap::new()).await.expect("open");
    assert_eq!(within("echo", echo_round_trip(stream, b"pq")).await, b"pq");

    let default = within(
        "default connect",
        dial(addr, mesh.client_tls(&client_id(), &server_id())),
    )
    .await
    .expect("handshake");
    assert_eq!(
        default.key_exchange_group(),
        Some(NamedGroup::X25519MLKEM768)
    );
    assert_eq!(
        weft_hbone::tls::provider().kx_groups[0].name(),
        NamedGroup::X25519MLKEM768,
        "offered first"
    );
    assert!(weft_hbone::tls::provider()
        .kx_groups
        .iter()
        .any(|g| g.name() == NamedGroup::X25519));
}

/// A root that copies the mesh root's subject but has its own key (another
/// mesh with the same names, or an impostor) is an unknown CA, on both
/// sides, whatever its key type: the label must send the operator to the
/// trust bundle, not to the certificate.
#[tokio::test]
async fn an_impostor_root_with_a_familiar_subject_is_an_unknown_ca() {
    let ours = Mesh::new();
    let root_pem = ours.ca.root_pem();
    for alg in [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
    ] {
        let key = rcgen::KeyPair::generate_for(alg).expect("key");
        let params = rcgen::CertificateParams::from_ca_cert_pem(&root_pem).expect("params");
        let impostor = params.self_signed(&key).expect("impostor root");
        let signer = weft_pki::Signer::from_pem(&impostor.pem(), &key.serialize_pem(), vec![], TD)
            .expect("impostor signer");
        let leaf = signer
            .sign_workload(&client_id(), DAY)
            .expect("impostor leaf");

        // Its client is refused by our server...
        let (addr, mut results) =
            start_server(ours.server_tls(&server_id()), fast_settings(), echo).await;
        let tls = client_config(&leaf, &ours.trust, &server_id()).expect("cfg");
        let _ = within("client", async {
            let conn = dial(addr, tls).await?;
            conn.open(target(), HeaderMap::new()).await.map(drop)
        })
        .await;
        let server_err = within("serve", results.recv())
            .await
            .expect("result")
            .expect_err("fails");
        assert_eq!(
            server_err.reason(),
            FailureReason::UnknownCa,
            "{alg:?}: {server_err:?}"
        );

        // ... and its server by our client.
        let server_leaf = signer.sign_workload(&server_id(), DAY).expect("leaf");
        let theirs = weft_hbone::server_config(&server_leaf, &ours.trust).expect("cfg");
        let (addr, _results) = start_server(theirs, fast_settings(), echo).await;
        let err = within(
            "dial",
            dial(addr, ours.client_tls(&client_id(), &server_id())),
        )
        .await
        .expect_err("must fail");
        assert_eq!(err.reason(), FailureReason::UnknownCa, "{alg:?}: {err:?}");
    }
}
