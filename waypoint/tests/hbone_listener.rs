//! The waypoint's HBONE listener on loopback, with certificates from a
//! local CA instead of the controller: a trust-bundle change reaches the
//! server TLS of a running listener, and a drain stops new connections
//! while open tunnels finish.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_api::model::Workload;
use weft_api::{Identity, MeshModel};
use weft_dataplane::certs::{CertManager, LocalCaProvider, TrustRoots};
use weft_dataplane::dial::tunnel_headers;
use weft_dataplane::drain::{self, DrainTrigger};
use weft_dataplane::tls::TlsConfigs;
use weft_hbone::{H2Settings, H2Stream, HboneConnection, HboneError, WorkloadCert};
use weft_pki::LocalCa;
use weft_waypoint::forward::Forwarder;
use weft_waypoint::metrics::Metrics;
use weft_waypoint::proxy::{self, Proxy};
use weft_waypoint::state::WaypointState;
use weft_waypoint::telemetry::{AccessLog, SpanExporter};
use weft_waypoint::upstream::Upstream;

const TRUST_DOMAIN: &str = "cluster.local";
const LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A waypoint serving HBONE on loopback, its certificates from `ca`.
struct Running {
    hbone: SocketAddr,
    /// An echo server the model knows as a workload outside the mesh: a
    /// tunnel to it is carried at L4 over plain TCP.
    echo: SocketAddr,
    me: Identity,
    certs: Arc<CertManager>,
    trust: TrustRoots,
    metrics: Arc<Metrics>,
    proxy: Arc<Proxy>,
}

/// The waypoint, and the trigger of its drain (dropping it drains too).
async fn start() -> (Running, DrainTrigger) {
    let echo = echo_server().await;
    let state = WaypointState::default();
    state.store(MeshModel {
        trust_domain: TRUST_DOMAIN.into(),
        workloads: vec![Workload {
            name: "echo".into(),
            namespace: "shop".into(),
            service_account: "echo".into(),
            node: "node-1".into(),
            ips: vec![echo.ip()],
            ..Workload::default()
        }],
        ..MeshModel::default()
    });
    let trust = TrustRoots::default();
    let ca = LocalCa::generate(TRUST_DOMAIN).expect("CA");
    let provider = LocalCaProvider::new(ca, Duration::from_secs(3600), &trust);
    let certs = CertManager::new(Arc::new(provider), trust.clone());
    let me = Identity::new(TRUST_DOMAIN, "shop", "waypoint");
    let metrics = Metrics::new();
    let tls = TlsConfigs::new(certs.clone());
    let upstream = Upstream::new(tls.clone(), me.clone());
    let forwarder = Forwarder::new(
        state,
        upstream,
        metrics.clone(),
        "waypoint".into(),
        AccessLog::disabled(),
        SpanExporter::disabled(),
    );
    let proxy = Proxy::new(forwarder, tls, me.clone());
    let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let hbone = listener.local_addr().expect("addr");
    let (drain, watcher) = drain::channel();
    tokio::spawn(proxy::serve_hbone(proxy.clone(), listener, watcher));
    let running = Running {
        hbone,
        echo,
        me,
        certs,
        trust,
        metrics,
        proxy,
    };
    (running, drain)
}

/// Echoes every byte back until the client half-closes.
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind((LOOPBACK, 0)).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

impl Running {
    /// A client of the waypoint presenting `cert`, trusting the roots the
    /// waypoint has now.
    fn client(&self, cert: &WorkloadCert) -> Arc<rustls::ClientConfig> {
        weft_hbone::client_config(cert, &self.trust.get(), &self.me).expect("client config")
    }

    /// A new HBONE connection and a tunnel on it to the echo workload.
    async fn tunnel(
        &self,
        cfg: Arc<rustls::ClientConfig>,
    ) -> Result<(HboneConnection, H2Stream), HboneError> {
        let tcp = TcpStream::connect(self.hbone).await?;
        let conn = weft_hbone::connect(tcp, cfg, &H2Settings::default()).await?;
        let stream = self.open(&conn).await?;
        Ok((conn, stream))
    }

    /// Another tunnel to the echo workload on `conn`.
    async fn open(&self, conn: &HboneConnection) -> Result<H2Stream, HboneError> {
        conn.open(self.echo, tunnel_headers(LOOPBACK, None)).await
    }

    /// Polls the metrics until `line` shows (the handshake fails in the
    /// connection's task, after the client has seen it).
    async fn wait_for_metric(&self, line: &str) {
        for _ in 0..100 {
            if self.metrics.encode().lines().any(|l| l == line) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("no `{line}` in\n{}", self.metrics.encode());
    }
}

/// Sends `msg` through the tunnel and reads it back. The first bytes are
/// no HTTP, so the waypoint carries the tunnel at L4.
async fn exchange(stream: &mut H2Stream, msg: &[u8]) -> std::io::Result<()> {
    stream.write_all(msg).await?;
    let mut back = vec![0; msg.len()];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut back)).await??;
    assert_eq!(back, msg);
    Ok(())
}

#[tokio::test]
async fn a_trust_bundle_change_reaches_the_listener_without_a_restart() {
    let (wp, _drain) = start().await;
    let other = LocalCa::generate(TRUST_DOMAIN).expect("second CA");
    let web = Identity::new(TRUST_DOMAIN, "shop", "web");
    let cfg = wp.client(&other.sign(&web, Duration::from_secs(3600)).expect("sign"));

    // In TLS 1.3 the server judges the client certificate after the client
    // has finished its handshake: the refusal may surface on the CONNECT.
    let refused = match wp.tunnel(cfg.clone()).await {
        Ok((_conn, mut stream)) => exchange(&mut stream, b"\0refused?").await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a certificate from an unknown CA was accepted");
    wp.wait_for_metric(r#"weft_tls_handshake_failures_total{reason="unknown_ca"} 1"#)
        .await;

    // The second CA's root joins the bundle; the same listener now accepts.
    assert!(wp.trust.set(wp.trust.get().merged(&other.trust_bundle())));
    let (_conn, mut stream) = wp
        .tunnel(cfg)
        .await
        .expect("accepted after the bundle changed");
    exchange(&mut stream, b"\0accepted")
        .await
        .expect("exchange");
}

#[tokio::test]
async fn a_drain_refuses_new_connections_and_waits_for_open_tunnels() {
    let (wp, drain) = start().await;
    let web = Identity::new(TRUST_DOMAIN, "shop", "web");
    let cfg = wp.client(&wp.certs.fetch(&web).await.expect("client certificate"));
    // The client keeps its connection open throughout, as a pool would.
    let (conn, mut stream) = wp.tunnel(cfg).await.expect("tunnel");
    exchange(&mut stream, b"\0before the drain")
        .await
        .expect("exchange");

    let drained = tokio::spawn(async move { drain.drain(Duration::from_secs(20)).await });
    // The listener closes: a new connection is refused.
    let mut refused = false;
    for _ in 0..100 {
        match TcpStream::connect(wp.hbone).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                refused = true;
                break;
            }
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    assert!(refused, "the HBONE listener still accepts during the drain");
    // The open connection got GOAWAY: no new tunnel on it either.
    let mut goaway = false;
    for _ in 0..100 {
        match wp.open(&conn).await {
            Err(_) => {
                goaway = true;
                break;
            }
            Ok(extra) => {
                drop(extra);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(
        goaway,
        "the connection still takes new tunnels during the drain"
    );

    // The open tunnel still works, and the drain waits for it.
    exchange(&mut stream, b"\0during the drain")
        .await
        .expect("exchange");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !drained.is_finished(),
        "the drain did not wait for the tunnel"
    );
    assert_eq!(wp.proxy.open_connections(), 1);

    // The client ends the tunnel (half-close, the echo's end read back):
    // the server closes the connection, and the drain ends, while the
    // client still holds its side.
    stream.shutdown().await.expect("half-close");
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("the echo ends")
        .expect("read");
    assert!(rest.is_empty());
    drop(stream);
    let outcome = tokio::time::timeout(Duration::from_secs(5), drained)
        .await
        .expect("the drain ends once the tunnel closed")
        .expect("drain task");
    assert_eq!(outcome.remaining, 0);
    assert_eq!(wp.proxy.open_connections(), 0);
    drop(conn);
}
