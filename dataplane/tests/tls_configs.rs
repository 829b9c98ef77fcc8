//! Cached TLS configurations follow the trust roots: a client whose
//! certificate chains only to a root added after start-up is refused
//! before the change and accepted after it, over real loopback sockets and
//! real HBONE handshakes, without rebuilding anything by hand.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use weft_api::Identity;
use weft_dataplane::certs::{CertManager, LocalCaProvider, TrustRoots};
use weft_dataplane::tls::TlsConfigs;
use weft_hbone::{client_config, connect, FailureReason, H2Settings, HboneError, InboundTunnel};
use weft_pki::LocalCa;

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "shop", sa)
}

/// An HBONE server that takes its configuration from `tls` for every
/// connection, as the proxies do, and reports each connection's result.
async fn server(
    tls: Arc<TlsConfigs>,
    me: Identity,
) -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<Result<(), HboneError>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let cfg = tls.server(&me).await.expect("server config");
            let tx = tx.clone();
            tokio::spawn(async move {
                let settings = H2Settings {
                    handshake_timeout: Duration::from_secs(2),
                    ..H2Settings::default()
                };
                let r = weft_hbone::serve(stream, cfg, &settings, |t: InboundTunnel| async move {
                    if let Ok(mut s) = t.accept() {
                        use tokio::io::AsyncWriteExt;
                        let _ = s.write_all(b"hello").await;
                        let _ = s.shutdown().await;
                    }
                })
                .await;
                let _ = tx.send(r);
            });
        }
    });
    (addr, rx)
}

#[tokio::test]
async fn a_root_added_at_run_time_reaches_the_server_configuration() {
    let mesh = LocalCa::generate("cluster.local").unwrap();
    let newer = LocalCa::generate("cluster.local").unwrap();
    let trust = TrustRoots::default();
    let provider = LocalCaProvider::new(mesh, Duration::from_secs(3600), &trust);
    let certs = CertManager::new(Arc::new(provider), trust.clone());
    let tls = TlsConfigs::new(certs.clone());
    let me = id("cart");
    let (addr, mut results) = server(tls.clone(), me.clone()).await;

    // A client holding a certificate of the newer root only, which trusts
    // both roots (so the only question is whether the server trusts it).
    let client_cert = newer.sign(&id("web"), Duration::from_secs(3600)).unwrap();
    let both = trust.get().merged(&newer.trust_bundle());
    let dial = || async {
        let cfg = client_config(&client_cert, &both, &me).unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let conn = connect(tcp, cfg, &H2Settings::default()).await?;
        let mut s = conn
            .open("10.0.0.1:80".parse().unwrap(), Default::default())
            .await?;
        let mut got = Vec::new();
        use tokio::io::AsyncReadExt;
        s.read_to_end(&mut got).await?;
        Ok::<_, HboneError>(got)
    };

    let refused = tokio::time::timeout(Duration::from_secs(5), dial())
        .await
        .unwrap();
    assert!(
        refused.is_err(),
        "a certificate of an untrusted root is refused"
    );
    let server_side = tokio::time::timeout(Duration::from_secs(5), results.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        server_side.expect_err("server refused").reason(),
        FailureReason::UnknownCa
    );

    let before = tls.server(&me).await.unwrap();
    assert!(
        Arc::ptr_eq(&before, &tls.server(&me).await.unwrap()),
        "cached"
    );
    assert!(trust.set(both.clone()));
    let after = tls.server(&me).await.unwrap();
    assert!(!Arc::ptr_eq(&before, &after), "rebuilt for the new roots");

    let got = tokio::time::timeout(Duration::from_secs(5), dial())
        .await
        .unwrap()
        .expect("accepted once the root is trusted");
    assert_eq!(got, b"hello");
    assert_eq!(
        certs
            .stats()
            .requests
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}
