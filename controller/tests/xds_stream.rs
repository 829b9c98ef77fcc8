//! The config stream over real loopback gRPC: full sync, deltas, per-node
//! policy filtering, ACK/NACK, resume, malformed requests and auth.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tonic::transport::server::TcpIncoming;
use tonic::{Code, Status, Streaming};
use weft_api::proto::mesh_config_client::MeshConfigClient;
use weft_api::proto::{ConfigUpdate, ResourceKey, ResumePoint, SubscribeRequest};
use weft_api::MeshModel;
use weft_controller::ca::BootstrapTokens;
use weft_controller::xds::{XdsOptions, XdsServer, FULL_SNAPSHOTS_IN_FLIGHT, FULL_SNAPSHOT_TURN};
use weft_pki::{LocalCa, TrustBundle};

const MODEL: &str = r#"
namespaces:
  - { name: shop, labels: { weft.dev/dataplane-mode: ambient } }
  - { name: bank, labels: { weft.dev/dataplane-mode: ambient } }
workloads:
  - { name: a, namespace: shop, node: n1, ips: [10.0.1.2], labels: { app: a } }
  - { name: b, namespace: bank, node: n2, ips: [10.0.2.2], labels: { app: b } }
services:
  - { name: a, namespace: shop, vips: [10.96.0.1], ports: [{ port: 80 }], selector: { app: a } }
  - { name: b, namespace: bank, vips: [10.96.0.2], ports: [{ port: 80 }], selector: { app: b } }
policies:
  - { name: shop-allow, namespace: shop, action: ALLOW, rules: [{}] }
  - { name: bank-deny, namespace: bank, action: DENY, rules: [{}] }
peer_authentications:
  - { name: shop-strict, namespace: shop, mode: STRICT }
  - { name: bank-strict, namespace: bank, mode: STRICT }
"#;

struct Harness {
    models: watch::Sender<Arc<MeshModel>>,
    _trust: watch::Sender<TrustBundle>,
    xds: XdsServer,
    addr: SocketAddr,
}

fn model() -> MeshModel {
    MeshModel::from_yaml(MODEL).unwrap()
}

async fn start_with(model: MeshModel, options: XdsOptions) -> Harness {
    let (models, models_rx) = watch::channel(Arc::new(model));
    let bundle = LocalCa::generate("cluster.local").unwrap().trust_bundle();
    let (trust, trust_rx) = watch::channel(bundle);
    let xds = XdsServer::new(models_rx, trust_rx, options);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let svc = xds.clone().into_service();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(TcpIncoming::from(listener)),
    );
    Harness {
        models,
        _trust: trust,
        xds,
        addr,
    }
}

async fn start() -> Harness {
    start_with(model(), XdsOptions::default()).await
}

impl Harness {
    fn change(&self, f: impl FnOnce(&mut MeshModel)) {
        let mut m = (**self.models.borrow()).clone();
        f(&mut m);
        self.models.send_replace(Arc::new(m));
    }
}

struct Sub {
    tx: mpsc::Sender<SubscribeRequest>,
    rx: Streaming<ConfigUpdate>,
}

async fn open(
    addr: SocketAddr,
    first: SubscribeRequest,
    token: Option<&str>,
) -> Result<Sub, Status> {
    let mut client = MeshConfigClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(8);
    tx.send(first).await.unwrap();
    let outbound =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|r| (r, rx)) });
    let mut req = tonic::Request::new(outbound);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let rx = client.subscribe(req).await?.into_inner();
    Ok(Sub { tx, rx })
}

async fn subscribe(addr: SocketAddr, node: &str, resume: Option<ResumePoint>) -> Sub {
    open(addr, SubscribeRequest::hello(node, resume), None)
        .await
        .unwrap()
}

impl Sub {
    async fn next(&mut self) -> ConfigUpdate {
        tokio::time::timeout(Duration::from_secs(5), self.rx.message())
            .await
            .expect("no update within 5 s")
            .expect("stream error")
            .expect("stream ended")
    }

    async fn quiet(&mut self, ms: u64) {
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(ms), self.rx.message()).await {
            panic!("unexpected message: {m:?}");
        }
    }

    async fn ack(&self, u: &ConfigUpdate) {
        self.tx
            .send(SubscribeRequest::ack(u.version))
            .await
            .unwrap();
    }
}

fn names<T>(items: &[T], f: impl Fn(&T) -> String) -> Vec<String> {
    let mut v: Vec<String> = items.iter().map(f).collect();
    v.sort();
    v
}

async fn eventually(what: &str, f: impl Fn() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test]
async fn xds_initial_full_sync_then_a_pod_change_is_a_one_workload_delta() {
    let h = start().await;
    let mut s = subscribe(h.addr, "n1", None).await;
    let full = s.next().await;
    assert!(full.full);
    assert_eq!(full.instance_id, h.xds.instance_id());
    assert_eq!(full.trust_bundle_pem.len(), 1);
    let up = full.upserts.clone().unwrap();
    assert_eq!(up.namespaces.len(), 2);
    assert_eq!(up.workloads.len(), 2, "every node gets every workload");
    assert_eq!(up.services.len(), 2);
    // The model round-trips.
    // The model round-trips (sent in key order: namespace/name).
    let mut m = up.to_model(&full.trust_domain).unwrap();
    let mut want = model();
    m.workloads.sort_by(|a, b| a.name.cmp(&b.name));
    want.workloads.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(m.workloads, want.workloads);
    s.ack(&full).await;

    h.change(|m| m.workloads[1].ips = vec!["10.0.2.99".parse().unwrap()]);
    let delta = s.next().await;
    assert!(!delta.full);
    assert!(delta.version > full.version);
    let up = delta.upserts.clone().unwrap();
    assert_eq!(names(&up.workloads, |w| w.name.clone()), vec!["b"]);
    assert_eq!(up.workloads[0].ips, vec!["10.0.2.99"]);
    assert!(up.namespaces.is_empty() && up.services.is_empty() && up.policies.is_empty());
    assert!(delta.removals.clone().unwrap_or_default().is_empty());
    s.ack(&delta).await;

    h.change(|m| {
        m.workloads.remove(1);
    });
    let removal = s.next().await;
    assert!(removal.upserts.clone().unwrap_or_default().is_empty());
    assert_eq!(
        removal.removals.clone().unwrap().workloads,
        vec![ResourceKey::new("bank", "b")]
    );
    s.ack(&removal).await;
    eventually("3 acks", || h.xds.counters().snapshot().acks == 3).await;
    let stats = h.xds.counters().snapshot();
    assert_eq!(
        (stats.pushes, stats.full_pushes, stats.subscribers),
        (3, 1, 1)
    );
    assert!(stats.bytes_pushed > 0);
}

/// When many clients connect at once (a controller restart), full
/// snapshots take turns: an answer frees a turn, and a client that never
/// answers gives its turn up after `FULL_SNAPSHOT_TURN`.
#[tokio::test]
async fn xds_full_snapshots_take_turns_and_a_silent_client_gives_its_turn_up() {
    let h = start().await;
    let n = FULL_SNAPSHOTS_IN_FLIGHT;
    let mut subs = Vec::new();
    for i in 0..=n {
        subs.push(subscribe(h.addr, &format!("n{i}"), None).await);
    }
    let mut fulls = Vec::new();
    for s in subs.iter_mut().take(n) {
        let u = s.next().await;
        assert!(u.full);
        fulls.push(u);
    }
    // The one past the limit waits for a turn...
    subs[n].quiet(300).await;
    // ...which an answer frees.
    subs[0].ack(&fulls[0]).await;
    assert!(subs[n].next().await.full);
    // Every turn is now held by a client that does not answer: the next
    // one gets its snapshot once the oldest turn runs out.
    let mut late = subscribe(h.addr, "late", None).await;
    late.quiet(300).await;
    let u = tokio::time::timeout(
        FULL_SNAPSHOT_TURN + Duration::from_secs(5),
        late.rx.message(),
    )
    .await
    .expect("no full snapshot once a silent client's turn ran out")
    .expect("stream error")
    .expect("stream ended");
    assert!(u.full);
    assert_eq!(h.xds.counters().snapshot().full_pushes, n as u64 + 2);
}

#[tokio::test]
async fn xds_node_gets_only_policies_of_namespaces_with_pods_on_it() {
    let h = start().await;
    let mut s = subscribe(h.addr, "n1", None).await;
    let full = s.next().await;
    let up = full.upserts.clone().unwrap();
    assert_eq!(names(&up.policies, |p| p.name.clone()), vec!["shop-allow"]);
    assert_eq!(
        names(&up.peer_authentications, |p| p.name.clone()),
        vec!["shop-strict"]
    );
    s.ack(&full).await;

    // A change to bank's policy means nothing to n1: no push.
    h.change(|m| m.policies[1].rules.clear());
    s.quiet(300).await;

    // A bank pod lands on n1: bank's policies arrive.
    h.change(|m| {
        let mut w = m.workloads[1].clone();
        w.name = "b2".into();
        w.node = "n1".into();
        m.workloads.push(w);
    });
    let d = s.next().await;
    let up = d.upserts.clone().unwrap();
    assert_eq!(names(&up.workloads, |w| w.name.clone()), vec!["b2"]);
    assert_eq!(names(&up.policies, |p| p.name.clone()), vec!["bank-deny"]);
    assert_eq!(
        names(&up.peer_authentications, |p| p.name.clone()),
        vec!["bank-strict"]
    );
    s.ack(&d).await;

    // It leaves again: bank's policies are removed.
    h.change(|m| {
        m.workloads.retain(|w| w.name != "b2");
    });
    let d = s.next().await;
    let rm = d.removals.clone().unwrap();
    assert_eq!(rm.policies, vec![ResourceKey::new("bank", "bank-deny")]);
    assert_eq!(
        rm.peer_authentications,
        vec![ResourceKey::new("bank", "bank-strict")]
    );
    assert_eq!(rm.workloads, vec![ResourceKey::new("bank", "b2")]);

    // n2 sees bank's and not shop's.
    let mut s2 = subscribe(h.addr, "n2", None).await;
    let full2 = s2.next().await;
    assert_eq!(
        names(&full2.upserts.unwrap().policies, |p| p.name.clone()),
        vec!["bank-deny"]
    );
}

#[tokio::test]
async fn xds_nack_is_counted_not_resent_and_the_next_delta_builds_on_the_last_ack() {
    let h = start().await;
    let mut s = subscribe(h.addr, "n1", None).await;
    let full = s.next().await;
    s.ack(&full).await;

    h.change(|m| m.services[0].vips = vec!["10.96.0.100".parse().unwrap()]);
    let bad = s.next().await;
    s.tx.send(SubscribeRequest::nack(bad.version, "service shop/a: nope"))
        .await
        .unwrap();
    eventually("nack counted", || h.xds.counters().snapshot().nacks == 1).await;
    // Not resent in a loop.
    s.quiet(400).await;

    // The model changes again: the delta is against the last ACKed version,
    // so it carries the NACKed change as well.
    h.change(|m| m.workloads[0].ips = vec!["10.0.1.77".parse().unwrap()]);
    let next = s.next().await;
    assert!(!next.full);
    assert!(next.version > bad.version);
    let up = next.upserts.unwrap();
    assert_eq!(names(&up.services, |s| s.name.clone()), vec!["a"]);
    assert_eq!(names(&up.workloads, |w| w.name.clone()), vec!["a"]);
    let stats = h.xds.counters().snapshot();
    assert_eq!((stats.acks, stats.nacks), (1, 1));
}

/// What `/debug/subscribers` and the per-subscriber metrics read: each
/// stream's node, role, versions sent and acknowledged, its last NACK with
/// the reason, and the push and apply latency histograms.
#[tokio::test]
async fn xds_subscriber_status_records_versions_nacks_and_latency() {
    let h = start().await;
    let mut s = subscribe(h.addr, "n1", None).await;
    let full = s.next().await;
    let c = h.xds.counters();
    let st = c.subscriber_statuses();
    assert_eq!(st.len(), 1);
    assert_eq!((st[0].node.as_str(), st[0].role), ("n1", "ztunnel"));
    assert_eq!(
        (st[0].sent_version, st[0].acked_version, st[0].in_flight),
        (full.version, 0, true)
    );
    s.ack(&full).await;
    eventually("ack recorded", || {
        c.subscriber_statuses()[0].acked_version == full.version
    })
    .await;
    assert_eq!(
        c.latest_version.load(std::sync::atomic::Ordering::Relaxed),
        full.version
    );

    h.change(|m| m.services[0].vips = vec!["10.96.0.101".parse().unwrap()]);
    let bad = s.next().await;
    s.tx.send(SubscribeRequest::nack(bad.version, "service shop/a: nope"))
        .await
        .unwrap();
    eventually("nack recorded", || {
        c.subscriber_statuses()[0].last_nack.is_some()
    })
    .await;
    let st = &c.subscriber_statuses()[0];
    let nack = st.last_nack.as_ref().unwrap();
    assert_eq!(
        (nack.version, nack.error.as_str()),
        (bad.version, "service shop/a: nope")
    );
    assert_eq!(
        st.acked_version, full.version,
        "the NACK leaves the last ACK"
    );
    assert!(!st.in_flight);

    let metrics =
        weft_controller::metrics::ControllerMetrics::new(weft_controller::metrics::Sources {
            counters: c.clone(),
            instance_id: h.xds.instance_id().to_owned(),
            models: h.models.subscribe(),
            status: watch::channel(Arc::new(Vec::new())).1,
            trust: watch::channel(LocalCa::generate("cluster.local").unwrap().trust_bundle()).1,
        });
    let text = metrics.encode();
    for want in [
        format!(
            "weft_controller_subscriber_acked_version{{node=\"n1\",role=\"ztunnel\"}} {}",
            full.version
        ),
        "weft_controller_subscriber_nacked{node=\"n1\",role=\"ztunnel\"} 1".to_owned(),
        "weft_controller_config_push_duration_seconds_count 2".to_owned(),
        "weft_controller_config_apply_duration_seconds_count 1".to_owned(),
        "weft_controller_root_expiration_timestamp_seconds{subject=".to_owned(),
        "weft_build_info{component=\"controller\"".to_owned(),
    ] {
        assert!(text.contains(&want), "{want} missing from:\n{text}");
    }
    let json = metrics.subscribers_json();
    assert_eq!(
        json["subscribers"][0]["last_nack"]["error"],
        "service shop/a: nope"
    );

    drop(s);
    eventually("stream gone", || c.subscriber_statuses().is_empty()).await;
}

#[tokio::test]
async fn xds_resume_with_same_instance_gets_only_changes_and_a_restart_gets_full() {
    let h = start().await;
    let mut s = subscribe(h.addr, "n1", None).await;
    let full = s.next().await;
    s.ack(&full).await;
    eventually("ack", || h.xds.counters().snapshot().acks == 1).await;
    drop(s);
    eventually("disconnect", || {
        h.xds.counters().snapshot().subscribers == 0
    })
    .await;

    h.change(|m| {
        m.workloads[1].labels.insert("v".into(), "2".into());
    });
    eventually("new version", || h.xds.current_version() > full.version).await;

    let resume = ResumePoint {
        instance_id: full.instance_id.clone(),
        version: full.version,
    };
    let mut s = subscribe(h.addr, "n1", Some(resume.clone())).await;
    let d = s.next().await;
    assert!(!d.full, "same instance, known version: no full resend");
    let up = d.upserts.clone().unwrap();
    assert_eq!(names(&up.workloads, |w| w.name.clone()), vec!["b"]);
    assert!(up.services.is_empty() && up.namespaces.is_empty() && up.policies.is_empty());
    s.ack(&d).await;

    // Resuming at the current version: an empty delta, still no full.
    let mut s2 = subscribe(
        h.addr,
        "n1",
        Some(ResumePoint {
            instance_id: d.instance_id.clone(),
            version: d.version,
        }),
    )
    .await;
    let same = s2.next().await;
    assert!(!same.full);
    assert!(same.upserts.unwrap_or_default().is_empty());
    assert_eq!(h.xds.counters().snapshot().full_pushes, 1);

    // A controller restart: a new instance id, so the old resume point
    // means nothing and a full snapshot comes.
    let restarted = start_with((**h.models.borrow()).clone(), XdsOptions::default()).await;
    assert_ne!(restarted.xds.instance_id(), h.xds.instance_id());
    let mut s3 = subscribe(restarted.addr, "n1", Some(resume)).await;
    let f = s3.next().await;
    assert!(f.full);
    assert_eq!(f.upserts.unwrap().workloads.len(), 2);

    // A version that fell out of the bounded history: full as well.
    let small = start_with(
        model(),
        XdsOptions {
            history: 2,
            ..Default::default()
        },
    )
    .await;
    let first = small.xds.instance_id().to_owned();
    for i in 0..4u8 {
        small.change(|m| m.workloads[0].ips = vec![format!("10.0.1.{}", 10 + i).parse().unwrap()]);
        let want = 2 + u64::from(i);
        eventually("versions", || small.xds.current_version() == want).await;
    }
    let mut s4 = subscribe(
        small.addr,
        "n1",
        Some(ResumePoint {
            instance_id: first,
            version: 1,
        }),
    )
    .await;
    assert!(s4.next().await.full);
}

mod raw {
    //! A codec that sends raw bytes, to put undecodable frames on the wire.
    use bytes::{Buf, BufMut};
    use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
    use tonic::Status;

    pub struct Raw;
    pub struct RawEnc;
    pub struct RawDec;

    impl Codec for Raw {
        type Encode = Vec<u8>;
        type Decode = Vec<u8>;
        type Encoder = RawEnc;
        type Decoder = RawDec;
        fn encoder(&mut self) -> RawEnc {
            RawEnc
        }
        fn decoder(&mut self) -> RawDec {
            RawDec
        }
    }

    impl Encoder for RawEnc {
        type Item = Vec<u8>;
        type Error = Status;
        fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
            dst.put_slice(&item);
            Ok(())
        }
    }

    impl Decoder for RawDec {
        type Item = Vec<u8>;
        type Error = Status;
        fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
            let v = src.chunk().to_vec();
            src.advance(v.len());
            Ok(Some(v))
        }
    }
}

async fn send_garbage(addr: SocketAddr) -> Status {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    // Field 1, wire type 2, length far beyond the frame: not decodable.
    let frames = futures::stream::iter(vec![vec![0x0a, 0xff, 0xff, 0x7f, 0x01]])
        .chain(futures::stream::pending());
    let path = http::uri::PathAndQuery::from_static("/weft.v1.MeshConfig/Subscribe");
    match grpc
        .streaming::<_, Vec<u8>, Vec<u8>, _>(tonic::Request::new(frames), path, raw::Raw)
        .await
    {
        Err(s) => s,
        Ok(resp) => {
            let mut body = resp.into_inner();
            match body.message().await {
                Err(s) => s,
                Ok(m) => panic!("garbage accepted: {m:?}"),
            }
        }
    }
}

use futures::StreamExt;

#[tokio::test]
async fn xds_malformed_first_messages_get_invalid_argument_and_others_keep_streaming() {
    let h = start().await;
    let mut good = subscribe(h.addr, "n1", None).await;
    let full = good.next().await;
    good.ack(&full).await;

    let not_hello = open(h.addr, SubscribeRequest::ack(1), None).await;
    let s = not_hello.err().expect("ack as first message accepted");
    assert_eq!(s.code(), Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("Hello"), "{}", s.message());

    let no_node = open(h.addr, SubscribeRequest::hello("", None), None).await;
    assert_eq!(no_node.err().unwrap().code(), Code::InvalidArgument);

    let empty = open(h.addr, SubscribeRequest { request: None }, None).await;
    assert_eq!(empty.err().unwrap().code(), Code::InvalidArgument);

    let garbage = send_garbage(h.addr).await;
    assert_eq!(garbage.code(), Code::InvalidArgument, "{garbage:?}");

    // A second Hello mid-stream ends only that stream.
    let mut twice = subscribe(h.addr, "n2", None).await;
    let f2 = twice.next().await;
    twice.ack(&f2).await;
    twice
        .tx
        .send(SubscribeRequest::hello("n2", None))
        .await
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(5), twice.rx.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    // The good subscriber is undisturbed.
    h.change(|m| m.workloads[0].ips = vec!["10.0.1.3".parse().unwrap()]);
    let d = good.next().await;
    assert_eq!(d.upserts.unwrap().workloads.len(), 1);
    assert!(h.xds.counters().snapshot().rejected >= 5);
}

#[tokio::test]
async fn xds_with_tokens_refuses_unknown_tokens_and_other_nodes_names() {
    let tokens = BootstrapTokens::parse("n1: tok-1\nn2: tok-2\n").unwrap();
    let h = start_with(
        model(),
        XdsOptions {
            authenticator: Some(Arc::new(tokens)),
            ..Default::default()
        },
    )
    .await;
    let none = open(h.addr, SubscribeRequest::hello("n1", None), None).await;
    assert_eq!(none.err().unwrap().code(), Code::Unauthenticated);
    let bad = open(h.addr, SubscribeRequest::hello("n1", None), Some("nope")).await;
    assert_eq!(bad.err().unwrap().code(), Code::Unauthenticated);
    let other = open(h.addr, SubscribeRequest::hello("n1", None), Some("tok-2")).await;
    assert_eq!(other.err().unwrap().code(), Code::PermissionDenied);
    let mut ok = open(h.addr, SubscribeRequest::hello("n1", None), Some("tok-1"))
        .await
        .unwrap();
    assert!(ok.next().await.full);
}
