//! The config-stream client against a scripted controller over loopback
//! gRPC: deltas land in the `ModelState`, bad updates are NACKed while the
//! last good model keeps serving, and a dropped stream resumes.

use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use tokio::sync::mpsc;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};
use weft_api::proto::mesh_config_server::{MeshConfig, MeshConfigServer};
use weft_api::proto::subscribe_request::Request as Req;
use weft_api::proto::{
    ConfigUpdate, Removals, ResourceKey, Resources, Service, ServicePort, SubscribeRequest,
    Workload,
};
use weft_api::MeshModel;
use weft_dataplane::certs::TrustRoots;
use weft_dataplane::control::{ConfigStream, Role, StateSink};
use weft_dataplane::metrics::CommonMetrics;
use weft_dataplane::state::{Compiled, ModelState};
use weft_pki::LocalCa;

/// The model as received, with a by-IP lookup.
struct Received {
    version: u64,
    model: MeshModel,
}

impl Compiled for Received {
    fn compile(model: MeshModel, version: u64) -> Self {
        Self { version, model }
    }
    fn version(&self) -> u64 {
        self.version
    }
}

impl Received {
    fn has_ip(&self, ip: &str) -> bool {
        let ip: std::net::IpAddr = ip.parse().unwrap();
        self.model.workloads.iter().any(|w| w.ips.contains(&ip))
    }
}

type MeshState = ModelState<Received>;

type Conn = (
    Streaming<SubscribeRequest>,
    mpsc::Sender<Result<ConfigUpdate, Status>>,
    Option<String>,
);

/// Hands each stream to the test, which plays the controller.
struct Scripted {
    conns: mpsc::UnboundedSender<Conn>,
}

#[tonic::async_trait]
impl MeshConfig for Scripted {
    type SubscribeStream =
        Pin<Box<dyn Stream<Item = Result<ConfigUpdate, Status>> + Send + 'static>>;

    async fn subscribe(
        &self,
        request: Request<Streaming<SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let auth = request
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (tx, rx) = mpsc::channel(8);
        let _ = self.conns.send((request.into_inner(), tx, auth));
        Ok(Response::new(Box::pin(futures::stream::unfold(
            rx,
            |mut rx| async move { rx.recv().await.map(|m| (m, rx)) },
        ))))
    }
}

struct Harness {
    conns: mpsc::UnboundedReceiver<Conn>,
    state: MeshState,
    metrics: CommonMetrics,
    trust: TrustRoots,
    bundle_pem: String,
}

async fn start() -> Harness {
    let (conns_tx, conns) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr: SocketAddr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MeshConfigServer::new(Scripted { conns: conns_tx }))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    let state = MeshState::default();
    let metrics = CommonMetrics::register(&mut Default::default(), "test");
    let trust = TrustRoots::default();
    tokio::spawn(
        ConfigStream {
            endpoint: format!("http://{addr}").into(),
            node: "n1".into(),
            token: "tok-1".into(),
            role: Role::Ztunnel,
            trust: trust.clone(),
            sink: std::sync::Arc::new(StateSink {
                state: state.clone(),
                updates: metrics.config_updates.clone(),
                rejections: metrics.config_rejections.clone(),
            }),
        }
        .run(),
    );
    let bundle_pem = LocalCa::generate("cluster.local").unwrap().root_pem();
    Harness {
        conns,
        state,
        metrics,
        trust,
        bundle_pem,
    }
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("timed out")
}

async fn next_request(inbound: &mut Streaming<SubscribeRequest>) -> Req {
    within(inbound.message())
        .await
        .unwrap()
        .unwrap()
        .request
        .unwrap()
}

fn workload(name: &str, ip: &str) -> Workload {
    Workload {
        name: name.into(),
        namespace: "shop".into(),
        node: "n1".into(),
        service_account: "default".into(),
        ips: vec![ip.into()],
        ..Default::default()
    }
}

fn update(version: u64, full: bool, up: Resources, rm: Removals, bundle: &str) -> ConfigUpdate {
    ConfigUpdate {
        instance_id: "controller-1".into(),
        version,
        full,
        trust_domain: "cluster.local".into(),
        upserts: Some(up),
        removals: Some(rm),
        trust_bundle_pem: vec![bundle.to_owned()],
    }
}

fn names(state: &MeshState) -> Vec<String> {
    state
        .load()
        .model
        .workloads
        .iter()
        .map(|w| w.name.clone())
        .collect()
}

#[tokio::test]
async fn grpc_client_applies_full_snapshot_then_deltas_into_mesh_state() {
    let mut h = start().await;
    let (mut inbound, tx, auth) = within(h.conns.recv()).await.unwrap();
    assert_eq!(auth.as_deref(), Some("Bearer tok-1"));
    match next_request(&mut inbound).await {
        Req::Hello(hello) => {
            assert_eq!(hello.node_name, "n1");
            assert!(hello.resume.is_none());
        }
        other => panic!("want Hello, got {other:?}"),
    }
    assert!(h.trust.get().roots.is_empty());

    let full = Resources {
        workloads: vec![workload("a", "10.0.0.1"), workload("b", "10.0.0.2")],
        ..Default::default()
    };
    tx.send(Ok(update(
        1,
        true,
        full,
        Removals::default(),
        &h.bundle_pem,
    )))
    .await
    .unwrap();
    assert!(matches!(next_request(&mut inbound).await, Req::Ack(a) if a.version == 1));
    assert_eq!(names(&h.state), vec!["a", "b"]);
    assert_eq!(h.trust.get().roots.len(), 1);

    let up = Resources {
        workloads: vec![workload("c", "10.0.0.3")],
        ..Default::default()
    };
    let rm = Removals {
        workloads: vec![ResourceKey::new("shop", "b")],
        ..Default::default()
    };
    tx.send(Ok(update(2, false, up, rm, &h.bundle_pem)))
        .await
        .unwrap();
    assert!(matches!(next_request(&mut inbound).await, Req::Ack(a) if a.version == 2));
    assert_eq!(names(&h.state), vec!["a", "c"]);
    let snap = h.state.load();
    assert!(snap.has_ip("10.0.0.3"));
    assert!(!snap.has_ip("10.0.0.2"));
    assert_eq!(h.metrics.config_updates.get(), 2);
}

#[tokio::test]
async fn a_full_snapshot_over_grpcs_default_4_mib_is_applied() {
    let mut h = start().await;
    let (mut inbound, tx, _) = within(h.conns.recv()).await.unwrap();
    next_request(&mut inbound).await;
    // 120,000 small pods: about 5.4 MB in one message.
    let workloads: Vec<Workload> = (0..120_000u32)
        .map(|i| {
            let ip = std::net::Ipv4Addr::from(u32::from(std::net::Ipv4Addr::new(10, 0, 0, 1)) + i);
            workload(&format!("pod-{i:06}"), &ip.to_string())
        })
        .collect();
    let u = update(
        1,
        true,
        Resources {
            workloads,
            ..Default::default()
        },
        Removals::default(),
        &h.bundle_pem,
    );
    let size = prost::Message::encoded_len(&u);
    assert!(size > 4 << 20, "the update must exceed 4 MiB, is {size} B");
    tx.send(Ok(u)).await.unwrap();
    assert!(matches!(next_request(&mut inbound).await, Req::Ack(a) if a.version == 1));
    assert_eq!(h.state.load().model.workloads.len(), 120_000);
}

#[tokio::test]
async fn grpc_client_nacks_a_bad_update_and_keeps_serving_the_last_good_model() {
    let mut h = start().await;
    let (mut inbound, tx, _) = within(h.conns.recv()).await.unwrap();
    next_request(&mut inbound).await;
    let full = Resources {
        workloads: vec![workload("a", "10.0.0.1")],
        ..Default::default()
    };
    tx.send(Ok(update(
        1,
        true,
        full,
        Removals::default(),
        &h.bundle_pem,
    )))
    .await
    .unwrap();
    next_request(&mut inbound).await;
    let good_version = h.state.version();

    // Fails validation (port 0), alongside an otherwise fine change.
    let bad = Resources {
        workloads: vec![workload("b", "10.0.0.2")],
        services: vec![Service {
            name: "s".into(),
            namespace: "shop".into(),
            ports: vec![ServicePort {
                port: 0,
                target_port: None,
            }],
            ..Default::default()
        }],
        ..Default::default()
    };
    tx.send(Ok(update(
        2,
        false,
        bad,
        Removals::default(),
        &h.bundle_pem,
    )))
    .await
    .unwrap();
    match next_request(&mut inbound).await {
        Req::Nack(n) => {
            assert_eq!(n.version, 2);
            assert!(n.error.contains("port 0"), "{}", n.error);
        }
        other => panic!("want Nack, got {other:?}"),
    }
    // Does not convert (bad IP).
    let bad_ip = Resources {
        workloads: vec![workload("c", "not-an-ip")],
        ..Default::default()
    };
    tx.send(Ok(update(
        3,
        false,
        bad_ip,
        Removals::default(),
        &h.bundle_pem,
    )))
    .await
    .unwrap();
    match next_request(&mut inbound).await {
        Req::Nack(n) => assert!(n.error.contains("shop/c"), "{}", n.error),
        other => panic!("want Nack, got {other:?}"),
    }
    // An unusable trust bundle is refused too.
    tx.send(Ok(update(
        4,
        false,
        Resources::default(),
        Removals::default(),
        "garbage",
    )))
    .await
    .unwrap();
    assert!(matches!(next_request(&mut inbound).await, Req::Nack(_)));

    assert_eq!(h.state.version(), good_version);
    assert_eq!(names(&h.state), vec!["a"]);
    assert_eq!(h.metrics.config_rejections.get(), 3);

    // The next good delta applies on top of the last good model (no trace
    // of the rejected ones).
    let next = Resources {
        workloads: vec![workload("d", "10.0.0.4")],
        ..Default::default()
    };
    tx.send(Ok(update(
        5,
        false,
        next,
        Removals::default(),
        &h.bundle_pem,
    )))
    .await
    .unwrap();
    assert!(matches!(next_request(&mut inbound).await, Req::Ack(a) if a.version == 5));
    assert_eq!(names(&h.state), vec!["a", "d"]);
}

#[tokio::test]
async fn grpc_client_reconnects_resumes_and_serves_the_last_model_meanwhile() {
    let mut h = start().await;
    let (mut inbound, tx, _) = within(h.conns.recv()).await.unwrap();
    next_request(&mut inbound).await;
    let full = Resources {
        workloads: vec![workload("a", "10.0.0.1")],
        ..Default::default()
    };
    tx.send(Ok(update(
        7,
        true,
        full,
        Removals::default(),
        &h.bundle_pem,
    )))
    .await
    .unwrap();
    next_request(&mut inbound).await;

    // The controller goes away mid-stream.
    tx.send(Err(Status::unavailable("restarting")))
        .await
        .unwrap();
    drop(tx);
    drop(inbound);
    assert_eq!(names(&h.state), vec!["a"], "last good model keeps serving");

    let (mut inbound, tx, _) = within(h.conns.recv()).await.unwrap();
    match next_request(&mut inbound).await {
        Req::Hello(hello) => {
            let r = hello.resume.expect("resume point");
            assert_eq!((r.instance_id.as_str(), r.version), ("controller-1", 7));
        }
        other => panic!("want Hello, got {other:?}"),
    }
    // An empty resume delta: acknowledged, model untouched.
    let before = h.state.version();
    tx.send(Ok(update(
        7,
        false,
        Resources::default(),
        Removals::default(),
        &h.bundle_pem,
    )))
    .await
    .unwrap();
    assert!(matches!(next_request(&mut inbound).await, Req::Ack(a) if a.version == 7));
    assert_eq!(h.state.version(), before);

    // A new controller instance sends a full snapshot: it replaces the model.
    let mut u = update(
        1,
        true,
        Resources {
            workloads: vec![workload("z", "10.0.0.9")],
            ..Default::default()
        },
        Removals::default(),
        &h.bundle_pem,
    );
    u.instance_id = "controller-2".into();
    tx.send(Ok(u)).await.unwrap();
    assert!(matches!(next_request(&mut inbound).await, Req::Ack(a) if a.version == 1));
    assert_eq!(names(&h.state), vec!["z"]);
}
