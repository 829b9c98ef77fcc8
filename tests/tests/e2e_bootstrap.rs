//! A node that cannot be wedged by a half-installed mesh, end to end on the
//! simulated cluster with the real `weft-cni`, `weft-ztunnel` and
//! `weft-controller`: with neither controller nor ztunnel running, the
//! plugin lets every pod that stays out of the mesh start (a kube-system
//! pod, a hostNetwork pod, a pod of an unlabelled namespace, a pod opting
//! out) and answers "try again" for a pod that belongs in it; once the
//! ztunnel and the controller are up, in either order, the retried ADD
//! succeeds with capture in place and the pod's traffic crosses nodes as
//! mTLS only.
//!
//! The plugin reads namespaces and pods from the Kubernetes API. No API
//! server can run here, so it talks to the fake of `weft-testsupport`
//! (the same one the controller's and weftctl's tests use), behind a real TLS
//! front in the node's network namespace that the kubeconfig names, as the
//! installer would write it. The controller itself runs in embedded mode on
//! manifests of the same objects.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use weft_e2e::cluster::{Capture as PacketCapture, CniError, Node};
use weft_e2e::mesh::{wait_until, Mesh};
use weft_e2e::Pod;
use weft_testsupport::fake_api::{self, FakeApi, NAMESPACES, PODS};

/// CNI's "try again later".
const TRY_AGAIN: u64 = 11;

/// The fake API server with a TLS front listening in a node's netns.
struct Api {
    fake: FakeApi,
    kubeconfig: PathBuf,
    _rt: tokio::runtime::Runtime,
}

impl Api {
    fn start(node: &Node, dir: &Path) -> Api {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let fake = rt.block_on(FakeApi::start(&[NAMESPACES, PODS]));
        // A CA and a serving certificate for the front's address.
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "fake kube-apiserver CA");
        let ca = ca_params.self_signed(&ca_key).expect("CA");
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .expect("params")
            .signed_by(&key, &ca, &ca_key)
            .expect("leaf");
        let tls = rustls::ServerConfig::builder_with_provider(weft_hbone::tls::provider())
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        let listener = listen_in(&node.netns_path, "127.0.0.1:0".parse().expect("addr"));
        let front = listener.local_addr().expect("addr");
        let backend = fake.addr;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    return;
                };
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut up) = tokio::net::TcpStream::connect(backend).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        });
        std::fs::create_dir_all(dir).expect("dir");
        std::fs::write(dir.join("ca.crt"), ca.pem()).expect("ca");
        std::fs::write(dir.join("token"), "weft-cni-token\n").expect("token");
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://{front}\n    certificate-authority: {}\nusers:\n- name: u\n  user:\n    tokenFile: {}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\ncurrent-context: x\n",
                dir.join("ca.crt").display(),
                dir.join("token").display()
            ),
        )
        .expect("kubeconfig");
        Api {
            fake,
            kubeconfig,
            _rt: rt,
        }
    }

    fn namespace(&self, name: &str, labels: Value) {
        self.fake
            .apply(NAMESPACES, fake_api::namespace(name, labels));
    }

    fn pod(&self, pod: &Pod, node: &str, labels: Value, host_network: bool) {
        let mut obj = fake_api::pod(&pod.namespace, &pod.name, node, &pod.ip.to_string(), labels);
        obj["spec"]["hostNetwork"] = json!(host_network);
        self.fake.apply(PODS, obj);
    }

    /// GETs of pods and namespaces the plugin made so far.
    fn gets(&self) -> usize {
        self.fake
            .requests()
            .iter()
            .filter(|r| r.method == "GET")
            .count()
    }
}

/// A TCP listener made inside the network namespace at `netns` (a socket
/// keeps its namespace for life; the thread that made it ends).
fn listen_in(netns: &Path, addr: SocketAddr) -> std::net::TcpListener {
    let netns = netns.to_owned();
    std::thread::spawn(move || {
        let f = std::fs::File::open(&netns).expect("open netns");
        // SAFETY: setns on a namespace fd only changes this thread's netns.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        let l = std::net::TcpListener::bind(addr).expect("bind");
        l.set_nonblocking(true).expect("nonblocking");
        l
    })
    .join()
    .expect("listener thread")
}

/// The chained entry as the installer writes it, for this cluster.
fn netconf(mesh: &Mesh, api: &Api) -> Value {
    json!({
        "kubeconfig": api.kubeconfig,
        "exclude_namespaces": ["kube-system", "weft-system"],
        "state_dir": mesh.ztunnel_state_dir(0),
        "timeout_seconds": 10,
    })
}

fn code_of(err: &anyhow::Error) -> Option<u64> {
    err.downcast_ref::<CniError>().and_then(CniError::code)
}

/// ADD that must pass at once, whatever runs.
fn add_passes(mesh: &Mesh, conf: &Value, pod: &Pod) {
    let start = Instant::now();
    let out = mesh
        .cni_with(pod, "ADD", conf)
        .unwrap_or_else(|e| panic!("ADD of {} was held up: {e:#}", pod.key()));
    assert_eq!(
        out["ips"][0]["address"],
        json!(format!("{}/32", pod.ip)),
        "the previous result passes through"
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "ADD of {} took {:?}",
        pod.key(),
        start.elapsed()
    );
}

/// ADD of a pod that belongs in the mesh, with nothing yet to capture it:
/// "try again" (and the DEL a runtime sends after a failed ADD succeeds).
fn add_waits(mesh: &Mesh, conf: &Value, pod: &Pod, why: &str) {
    let err = mesh
        .cni_with(pod, "ADD", conf)
        .expect_err("an ambient pod must not start uncaptured");
    assert_eq!(code_of(&err), Some(TRY_AGAIN), "{why}: {err:#}");
    mesh.cni_with(pod, "DEL", conf)
        .expect("DEL after a failed ADD");
}

/// The runtime's retries: DEL and ADD again until ADD succeeds.
fn add_retried(mesh: &Mesh, conf: &Value, pod: &Pod) {
    let mut last = String::new();
    let ok = wait_until(Duration::from_secs(30), || {
        match mesh.cni_with(pod, "ADD", conf) {
            Ok(_) => Some(()),
            Err(e) => {
                assert_eq!(
                    code_of(&e),
                    Some(TRY_AGAIN),
                    "only try-again while waiting: {e:#}"
                );
                last = format!("{e:#}");
                let _ = mesh.cni_with(pod, "DEL", conf);
                std::thread::sleep(Duration::from_millis(200));
                None
            }
        }
    });
    ok.unwrap_or_else(|_| panic!("the retried ADD never succeeded; last: {last}"));
}

struct Pods {
    coredns: Pod,
    hostnet: Pod,
    web: Pod,
    optout: Pod,
    client: Pod,
}

/// Namespaces and pods of node 1 in the API, the model and the cluster; then
/// the first round of ADDs with neither controller nor ztunnel running.
fn nothing_running(mesh: &mut Mesh, api: &Api) -> Pods {
    let node = mesh.cluster.node(0).name.clone();
    api.namespace("kube-system", json!({}));
    api.namespace("plain", json!({}));
    api.namespace("shop", json!({"weft.dev/dataplane-mode": "ambient"}));
    let coredns = mesh.create_pod(0, "kube-system", "coredns").expect("pod");
    let web = mesh.create_pod(0, "plain", "web").expect("pod");
    let optout = mesh.create_pod(0, "shop", "optout").expect("pod");
    let client = mesh.create_pod(0, "shop", "client").expect("pod");
    let hostnet = mesh.host_network_pod(0, "shop", "node-agent");
    api.pod(&coredns, &node, json!({"app": "coredns"}), false);
    api.pod(&web, &node, json!({"app": "web"}), false);
    api.pod(
        &optout,
        &node,
        json!({"weft.dev/dataplane-mode": "none"}),
        false,
    );
    api.pod(&client, &node, json!({"app": "client"}), false);
    api.pod(&hostnet, &node, json!({}), true);
    mesh.record_pod(&web, "default", &[]).expect("model");
    mesh.record_pod(&optout, "default", &[("weft.dev/dataplane-mode", "none")])
        .expect("model");
    mesh.record_pod(&client, "client", &[]).expect("model");

    let conf = netconf(mesh, api);
    let before = api.gets();
    add_passes(mesh, &conf, &coredns);
    add_passes(mesh, &conf, &hostnet);
    assert_eq!(
        api.gets(),
        before,
        "excluded namespaces and the host's netns are decided without the API"
    );
    add_passes(mesh, &conf, &web);
    add_passes(mesh, &conf, &optout);
    add_waits(mesh, &conf, &client, "no ztunnel, no controller");
    // The pods that started without a ztunnel left their records for it.
    for p in [&web, &optout] {
        let record = mesh
            .ztunnel_state_dir(0)
            .join(format!("pods/{}__{}.json", p.namespace, p.name));
        assert!(record.is_file(), "{} has no record", p.key());
    }
    Pods {
        coredns,
        hostnet,
        web,
        optout,
        client,
    }
}

/// With both up: the retried ADD succeeded, the ztunnel knows the pods that
/// started without it, and the client's traffic to a pod on node 2 is
/// captured: mutual TLS on the wire only, counted by the source ztunnel,
/// the client's IP seen by the server.
fn captured_through_the_mesh(mesh: &mut Mesh, pods: &Pods) {
    mesh.wait_enrolled(0, &pods.client, true)
        .expect("client enrolled");
    mesh.wait_enrolled(0, &pods.web, false)
        .expect("the ztunnel found the record of the pod that started without it");
    mesh.wait_enrolled(0, &pods.optout, false)
        .expect("opted out");
    let dump = mesh.config_dump(0).expect("config dump");
    let known: Vec<&str> = dump["pods"]
        .as_array()
        .expect("pods")
        .iter()
        .filter_map(|p| p["pod"].as_str())
        .collect();
    for never in [&pods.coredns, &pods.hostnet] {
        assert!(
            !known.contains(&never.key().as_str()),
            "{} reached the ztunnel",
            never.key()
        );
    }

    mesh.start_ztunnel(1).expect("ztunnel 2");
    let server = mesh.add_pod(1, "shop", "server", "server").expect("server");
    mesh.wait_enrolled(1, &server, true)
        .expect("server enrolled");
    mesh.serve_testapp(&server, 7000).expect("server app");
    let cap = PacketCapture::start(&mesh.cluster, "tcp").expect("capture");
    mesh.assert_mtls_from(
        &pods.client,
        &format!("{}:7000", server.ip),
        "spiffe://cluster.local/ns/shop/sa/client",
    );
    let packets = cap.stop().expect("capture");
    // The pods' packets (the nodes also talk to the controller on 15010).
    let pod_ips: [std::net::IpAddr; 2] = [pods.client.ip.into(), server.ip.into()];
    let packets: Vec<_> = packets
        .iter()
        .filter(|p| pod_ips.contains(&p.src) || pod_ips.contains(&p.dst))
        .collect();
    assert!(!packets.is_empty(), "nothing crossed the wire");
    for p in &packets {
        assert!(
            p.src_port == 15008 || p.dst_port == 15008,
            "a packet around the mesh: {}:{} -> {}:{}",
            p.src,
            p.src_port,
            p.dst,
            p.dst_port
        );
    }
}

/// Nothing running; then the ztunnel (no model: still waiting); then the
/// controller: the retried ADD succeeds.
#[test]
fn e2e_bootstrap_ztunnel_then_controller() {
    let mut mesh = Mesh::unstarted(2, &["shop"], true).expect("mesh");
    // The controller ran once (its root exists, as the ConfigMap does in a
    // cluster the ztunnel pod could start on) and is down now.
    mesh.start_controller().expect("controller");
    mesh.stop_controller().expect("stop controller");
    let api = Api::start(mesh.cluster.node(0), &mesh.cluster.run_dir().join("kube"));
    let pods = nothing_running(&mut mesh, &api);
    let conf = netconf(&mesh, &api);

    mesh.start_ztunnel_before_model(0).expect("ztunnel");
    let err = mesh
        .cni_with(&pods.client, "ADD", &conf)
        .expect_err("no model, no capture");
    assert_eq!(code_of(&err), Some(TRY_AGAIN), "{err:#}");
    assert!(format!("{err:#}").contains("no mesh model"), "{err:#}");
    mesh.cni_with(&pods.client, "DEL", &conf).expect("DEL");
    // Pods that stay out still start, now with the ztunnel there.
    let late = mesh.create_pod(0, "plain", "late").expect("pod");
    api.pod(&late, &mesh.cluster.node(0).name.clone(), json!({}), false);
    add_passes(&mesh, &conf, &late);

    mesh.start_controller().expect("controller");
    mesh.wait_ztunnel_ready(0).expect("ztunnel got its model");
    add_retried(&mesh, &conf, &pods.client);
    captured_through_the_mesh(&mut mesh, &pods);
}

/// Nothing running; then the controller (no ztunnel: still waiting); then
/// the ztunnel: the retried ADD succeeds.
#[test]
fn e2e_bootstrap_controller_then_ztunnel() {
    let mut mesh = Mesh::unstarted(2, &["shop"], true).expect("mesh");
    let api = Api::start(mesh.cluster.node(0), &mesh.cluster.run_dir().join("kube"));
    let pods = nothing_running(&mut mesh, &api);
    let conf = netconf(&mesh, &api);

    mesh.start_controller().expect("controller");
    add_waits(&mesh, &conf, &pods.client, "controller up, no ztunnel");
    add_passes(&mesh, &conf, &pods.web);

    mesh.start_ztunnel(0).expect("ztunnel");
    add_retried(&mesh, &conf, &pods.client);
    captured_through_the_mesh(&mut mesh, &pods);
}
